//! The SGEMMs a user would otherwise pick, timed on a [`Product`]'s
//! operands as they lie (row-major, or stored transposed): the
//! matrixmultiply and gemm crates, and OpenBLAS's `cblas_sgemm` loaded at
//! run time (`KILN_OPENBLAS` names the library, else the usual names and
//! Debian's `openblas-pthread` folder are tried).

use libloading::Library;

use crate::suite::time_op;
use crate::Product;

/// The most threads matrixmultiply runs on (its `MAX_THREADS`).
const MATRIXMULTIPLY_MAX_THREADS: usize = 4;

/// The threads matrixmultiply's products run on in this process, asked
/// for `threads`. It reads `MATMUL_NUM_THREADS` once, at its first
/// product, and otherwise takes every physical core: unless the user set
/// it, the first call sets it to `threads` (before any product), so that
/// a comparison on 1 thread does not time matrixmultiply on all of them.
/// The count in force afterwards is returned whatever a later call asks
/// (callers label a comparison made on another count); as matrixmultiply
/// does, a value it cannot parse counts as 1 and counts are kept to 1–4.
///
/// ```
/// let t = kiln_bench::comparators::matrixmultiply_threads(1);
/// assert!((1..=4).contains(&t));
/// assert_eq!(kiln_bench::comparators::matrixmultiply_threads(3), t);
/// ```
pub fn matrixmultiply_threads(threads: usize) -> usize {
    static IN_FORCE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *IN_FORCE.get_or_init(|| {
        let given = std::env::var("MATMUL_NUM_THREADS")
            .ok()
            .filter(|s| !s.is_empty());
        let n = match given {
            Some(s) => s.parse().unwrap_or(1),
            None => {
                // Before matrixmultiply's first product, which reads it.
                std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
                threads
            }
        };
        n.clamp(1, MATRIXMULTIPLY_MAX_THREADS)
    })
}

/// The label of matrixmultiply's column in a comparison on `threads`: its
/// name, and its own thread count where that differs
/// ([`matrixmultiply_threads`]).
pub fn matrixmultiply_label(threads: usize) -> String {
    match matrixmultiply_threads(threads) {
        t if t == threads => "matrixmultiply".into(),
        t => format!(
            "matrixmultiply ({t} thread{})",
            if t > 1 { "s" } else { "" }
        ),
    }
}

/// Median seconds of matrixmultiply's `sgemm` for `p`, on the threads
/// [`matrixmultiply_threads`] gives for `threads`.
pub fn matrixmultiply(p: Product, threads: usize, budget_s: f64) -> f64 {
    matrixmultiply_threads(threads);
    let Product { m, k, n, .. } = p;
    let a = vec![0.25f32; m * k];
    let b = vec![0.5f32; k * n];
    let mut c = vec![0f32; m * n];
    let ((rsa, csa), (rsb, csb)) = (p.a_strides(), p.b_strides());
    median(budget_s, || {
        // SAFETY: the pointers and strides describe the three buffers
        // above, of exactly m·k, k·n and m·n elements (A and B row-major
        // or transposed, as `p` says; C row-major).
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    })
}

/// Median seconds of the gemm crate for `p` on `threads`.
pub fn gemm_crate(p: Product, threads: usize, budget_s: f64) -> f64 {
    let Product { m, k, n, .. } = p;
    let a = vec![0.25f32; m * k];
    let b = vec![0.5f32; k * n];
    let mut c = vec![0f32; m * n];
    let ((rsa, csa), (rsb, csb)) = (p.a_strides(), p.b_strides());
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    median(budget_s, || {
        // SAFETY: as above (the gemm crate takes column, then row strides).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                csa as isize,
                rsa as isize,
                b.as_ptr(),
                csb as isize,
                rsb as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
    })
}

fn median(budget_s: f64, mut f: impl FnMut()) -> f64 {
    time_op(budget_s, || {
        f();
        Ok(())
    })
    .map_or(f64::NAN, |t| t.0)
}

type Sgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

/// OpenBLAS, loaded at run time.
pub struct OpenBlas {
    lib: Library,
    core: String,
}

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

impl OpenBlas {
    /// Loads OpenBLAS and sets its thread count; `None` where it is not
    /// installed (or the library found is another BLAS).
    pub fn load(threads: usize) -> Option<Self> {
        let mut names: Vec<String> = kiln_core::env::setting("KILN_OPENBLAS")
            .ok()
            .flatten()
            .into_iter()
            .collect();
        names.extend(
            [
                "libopenblas.so.0",
                "libopenblas.so",
                "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
                "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
            ]
            .map(String::from),
        );
        let lib = names.iter().find_map(|n| {
            // SAFETY: loading a shared library runs its initialisers;
            // OpenBLAS's only set up its thread pool and read the CPU type.
            unsafe { Library::new(n) }.ok()
        })?;
        // SAFETY: the symbols are looked up with the C signatures OpenBLAS
        // exports (cblas.h, openblas_config.h).
        let core = unsafe {
            let set: libloading::Symbol<unsafe extern "C" fn(i32)> =
                lib.get(b"openblas_set_num_threads\0").ok()?;
            set(threads as i32);
            let name: libloading::Symbol<unsafe extern "C" fn() -> *const std::ffi::c_char> =
                lib.get(b"openblas_get_corename\0").ok()?;
            lib.get::<Sgemm>(b"cblas_sgemm\0").ok()?;
            std::ffi::CStr::from_ptr(name())
                .to_string_lossy()
                .into_owned()
        };
        Some(OpenBlas { lib, core })
    }

    /// `openblas (CORE)`, naming the kernel it runs (an `OPENBLAS_CORETYPE`
    /// override in the environment shows here).
    pub fn label(&self) -> String {
        format!("openblas ({})", self.core)
    }

    /// Median seconds of `cblas_sgemm` for `p`.
    pub fn sgemm(&self, p: Product, budget_s: f64) -> f64 {
        let Product { m, k, n, .. } = p;
        let a = vec![0.25f32; m * k];
        let b = vec![0.5f32; k * n];
        let mut c = vec![0f32; m * n];
        // SAFETY: checked present in `load`, with this signature.
        let Ok(f) = (unsafe { self.lib.get::<Sgemm>(b"cblas_sgemm\0") }) else {
            return f64::NAN;
        };
        let (mi, ki, ni) = (m as i32, k as i32, n as i32);
        // Row-major storage: a transposed A is [k, m] (leading dimension
        // m), a transposed B [n, k] (leading dimension k).
        let (ta, lda) = if p.a_transposed {
            (TRANS, mi)
        } else {
            (NO_TRANS, ki)
        };
        let (tb, ldb) = if p.b_transposed {
            (TRANS, ki)
        } else {
            (NO_TRANS, ni)
        };
        median(budget_s, || {
            // SAFETY: row-major operands of exactly m·k, k·n and m·n floats
            // with the leading dimensions their transpose flags imply, and
            // C's n.
            unsafe {
                f(
                    ROW_MAJOR,
                    ta,
                    tb,
                    mi,
                    ni,
                    ki,
                    1.0,
                    a.as_ptr(),
                    lda,
                    b.as_ptr(),
                    ldb,
                    0.0,
                    c.as_mut_ptr(),
                    ni,
                )
            }
        })
    }
}
