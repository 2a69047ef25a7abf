//! A world of one process.

use kiln_core::{Error, Result};

use crate::Collective;

/// The collective of a process that trains alone: rank 0 of 1, every
/// reduction the identity. Single-process training runs through the same
/// code as a distributed run, with this engine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Local {
    /// A world of one.
    pub fn new() -> Self {
        Local
    }
}

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn describe(&self) -> String {
        "local (1 process)".to_string()
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::invalid(format!(
                "broadcast from rank {root} in a world of one process"
            )));
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
