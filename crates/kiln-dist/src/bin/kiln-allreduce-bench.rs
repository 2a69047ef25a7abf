//! `mpirun -np N kiln-allreduce-bench`: the time of one in-place f32
//! all-reduce on this job's ranks, by size — what data-parallel training's
//! gradient exchange costs without the training around it. Every timing
//! starts after a barrier, so it measures the transfer and the reduction,
//! not a slow rank. Rank 0 prints one JSON line per size: the ranks, the
//! bytes per rank, the median seconds over the repetitions, and the "bus"
//! rate a ring all-reduce would need for that time, 2·(N−1)/N·bytes / s.
//!
//! Needs the `mpi` feature: `cargo build --release -p kiln-dist --features mpi`.

use std::process::ExitCode;
use std::time::Instant;

use kiln_dist::{Collective, Mpi};

/// Bytes per rank, from 4 KiB to 16 MiB (a quarter-step of PyTorch's 25 MB
/// bucket and below).
const SIZES: [usize; 7] = [
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
];

fn main() -> ExitCode {
    let mpi = match Mpi::init() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let n = mpi.world();
    for bytes in SIZES {
        let mut buf = vec![1.0f32; bytes / 4];
        // Fewer repetitions of the large sizes: about 64 MiB moved per size.
        let reps = ((64 << 20) / bytes).clamp(5, 200);
        let mut times = Vec::with_capacity(reps);
        for rep in 0..reps + 3 {
            if let Err(e) = mpi.barrier() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let t = Instant::now();
            if let Err(e) = mpi.all_reduce_sum_f32(&mut buf) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            // The first three are warm-up (connections, page faults).
            if rep >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        if mpi.rank() == 0 {
            let moved = 2.0 * (n - 1) as f64 / n as f64 * bytes as f64;
            println!(
                "{{\"world\":{n},\"bytes\":{bytes},\"median_s\":{median:e},\"bus_gb_per_s\":{:.3}}}",
                moved / median / 1e9
            );
        }
    }
    ExitCode::SUCCESS
}
