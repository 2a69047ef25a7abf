//! # kiln-conformance
//!
//! The suite that proves a [`Backend`] computes the same function as an f64
//! oracle, within the error bound each op states ([`bound`]), on the
//! awkward cases ([`values`]): extents 0, 1 and primes, transposed, sliced
//! and broadcast layouts, ±0, subnormals, huge and tiny magnitudes, ±∞, NaN.
//!
//! Every check is an op × dtype pair listed in [`CHECKS`]. A backend crate
//! runs them all from its own tests with one line:
//!
//! ```ignore
//! kiln_conformance::suite!(|| MyBackend::new().unwrap());
//! ```
//!
//! which expands to one `#[test]` per op and dtype (`gemm::f32`, …); outside
//! a test harness, [`run_check`] runs one check and returns a [`Report`]
//! (the `kiln conformance` command prints them as a table).
//!
//! Case counts: `KILN_CONFORMANCE_CASES` (or `PROPTEST_CASES`) sets how many
//! random cases each check runs (default 48); `KILN_CONFORMANCE_SEED` fixes
//! the seed a failure report names.

pub mod bound;
mod checks;
mod gradcheck;
pub mod values;

use std::cell::Cell;
use std::fmt::Debug;

use kiln_core::{Backend, DType};
use proptest::strategy::Strategy;
use proptest::test_runner::{
    Config as PropConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use serde::Serialize;

pub use bound::Bound;

/// How a run of the suite is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Random cases per check.
    pub cases: u32,
    /// The seed every check derives its inputs from.
    pub seed: u64,
    /// How to name the backend in reproduction lines (`cpu:scalar`).
    pub backend: String,
}

impl Config {
    /// Cases and seed from the environment (`KILN_CONFORMANCE_CASES` or
    /// `PROPTEST_CASES`, default 48; `KILN_CONFORMANCE_SEED`, default fixed).
    pub fn from_env(backend: &str) -> Self {
        let env_u64 = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let cases = env_u64("KILN_CONFORMANCE_CASES")
            .or_else(|| env_u64("PROPTEST_CASES"))
            .unwrap_or(48);
        Config {
            cases: cases.clamp(1, u64::from(u32::MAX)) as u32,
            seed: env_u64("KILN_CONFORMANCE_SEED").unwrap_or(0x6b69_6c6e),
            backend: backend.to_string(),
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every case was within its bound.
    Pass,
    /// A case was not; see [`Report::failure`].
    Fail,
    /// The backend reported the op/dtype as unsupported.
    Unsupported,
}

/// What one check found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The op (`gemm`, `unary_exp`, …).
    pub op: String,
    /// The dtype.
    pub dtype: DType,
    /// Pass, fail or unsupported.
    pub status: Status,
    /// Cases run.
    pub cases: u32,
    /// The largest error seen, as a fraction of its bound (0 = exact).
    pub worst: f64,
    /// For a failure: the shrunk minimal case, the bound, the observed error.
    pub failure: Option<String>,
    /// A command that reruns exactly this check.
    pub reproduce: String,
}

impl Report {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        self.status == Status::Pass
    }
}

/// Runs `test` on `cases` inputs drawn from `strategy` (seeded by the
/// config and the check's name), shrinking any failure to a minimal input.
/// `test` returns the worst error of its case as a fraction of the bound.
pub(crate) fn run_cases<S, F>(op: &str, dtype: DType, cfg: &Config, strategy: S, test: F) -> Report
where
    S: Strategy,
    S::Value: Debug,
    F: Fn(S::Value) -> Result<f64, CaseError>,
{
    let mut seed = [0u8; 32];
    let tag = format!("{op}/{dtype}");
    let h = tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    seed[..8].copy_from_slice(&cfg.seed.to_le_bytes());
    seed[8..16].copy_from_slice(&h.to_le_bytes());
    let config = PropConfig {
        cases: cfg.cases,
        failure_persistence: None,
        max_shrink_iters: 8192,
        ..PropConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let worst = Cell::new(0f64);
    let unsupported = Cell::new(false);
    let result = runner.run(&strategy, |input| match test(input) {
        Ok(w) => {
            worst.set(worst.get().max(w));
            Ok(())
        }
        Err(CaseError::Unsupported) => {
            unsupported.set(true);
            Ok(())
        }
        Err(CaseError::Fail(msg)) => Err(TestCaseError::fail(msg)),
    });
    let reproduce = format!(
        "KILN_CONFORMANCE_SEED={} KILN_CONFORMANCE_CASES={} kiln conformance --backend {} --op {op} --dtype {dtype}",
        cfg.seed, cfg.cases, cfg.backend
    );
    let (status, failure) = match result {
        _ if unsupported.get() => (Status::Unsupported, None),
        Ok(()) => (Status::Pass, None),
        Err(TestError::Fail(reason, input)) => (
            Status::Fail,
            Some(format!("{reason}\nminimal case: {input:#?}")),
        ),
        Err(TestError::Abort(reason)) => (Status::Fail, Some(format!("aborted: {reason}"))),
    };
    Report {
        op: op.to_string(),
        dtype,
        status,
        cases: cfg.cases,
        worst: worst.get(),
        failure,
        reproduce,
    }
}

/// Why a case did not pass.
#[derive(Debug)]
pub(crate) enum CaseError {
    /// Out of bound, or an error where a result was due.
    Fail(String),
    /// The backend does not support the op for this dtype.
    Unsupported,
}

impl From<kiln_core::Error> for CaseError {
    fn from(e: kiln_core::Error) -> Self {
        match e {
            kiln_core::Error::Unsupported { .. } => CaseError::Unsupported,
            other => CaseError::Fail(format!("the backend returned an error: {other}")),
        }
    }
}

/// Compares a backend's elements with the oracle's, element by element.
/// Returns the worst fraction of the bound.
pub(crate) fn compare(
    what: &str,
    dtype: DType,
    dims: &[usize],
    got: &[f64],
    want: &[(f64, Bound)],
) -> Result<f64, CaseError> {
    if got.len() != want.len() {
        return Err(CaseError::Fail(format!(
            "{what}: {} elements returned, {} expected",
            got.len(),
            want.len()
        )));
    }
    let mut worst = 0f64;
    for (i, (&g, &(w, b))) in got.iter().zip(want).enumerate() {
        let v = bound::judge(b, dtype, w, g);
        if !v.ok {
            return Err(CaseError::Fail(format!(
                "{what}: element {i} (index {:?} of {dims:?}): got {g:e}, exact {w:e} (rounded {:e}); bound {b:?}; \
                 error {:e} = {:.3}× the bound, {} ulps",
                unravel(i, dims),
                bound::round_to(dtype, w),
                v.abs_error,
                v.fraction,
                v.ulps
            )));
        }
        worst = worst.max(v.fraction);
    }
    Ok(worst)
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (k, &d) in dims.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// Calls `$cb!($($args)*; name: DTYPES; …)` with every check of the suite.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_checks {
    ($cb:ident!($($args:tt)*)) => {
        $crate::$cb!($($args)*;
            upload_download: F32 F16 BF16 U32;
            copy_strided: F32 F16 BF16 U32;
            full: F32 F16 BF16 U32;
            cast: F32 F16 BF16 U32;
            gemm: F32 F16 BF16;
            gemm_epilogue: F32 F16 BF16;
            unary_neg: F32 F16 BF16;
            unary_abs: F32 F16 BF16;
            unary_exp: F32 F16 BF16;
            unary_log: F32 F16 BF16;
            unary_sqrt: F32 F16 BF16;
            unary_square: F32 F16 BF16;
            unary_recip: F32 F16 BF16;
            unary_relu: F32 F16 BF16;
            unary_sigmoid: F32 F16 BF16;
            unary_tanh: F32 F16 BF16;
            unary_backward_neg: F32 F16 BF16;
            unary_backward_abs: F32 F16 BF16;
            unary_backward_exp: F32 F16 BF16;
            unary_backward_log: F32 F16 BF16;
            unary_backward_sqrt: F32 F16 BF16;
            unary_backward_square: F32 F16 BF16;
            unary_backward_recip: F32 F16 BF16;
            unary_backward_relu: F32 F16 BF16;
            unary_backward_sigmoid: F32 F16 BF16;
            unary_backward_tanh: F32 F16 BF16;
            affine: F32 F16 BF16;
            binary_add: F32 F16 BF16;
            binary_sub: F32 F16 BF16;
            binary_mul: F32 F16 BF16;
            binary_div: F32 F16 BF16;
            binary_maximum: F32 F16 BF16;
            binary_minimum: F32 F16 BF16;
            binary_eq: F32 F16 BF16;
            binary_gt: F32 F16 BF16;
            binary_ge: F32 F16 BF16;
            reduce_sum: F32 F16 BF16;
            reduce_mean: F32 F16 BF16;
            reduce_max: F32 F16 BF16;
            reduce_min: F32 F16 BF16;
            argmax: F32 F16 BF16;
            softmax: F32 F16 BF16;
            log_softmax: F32 F16 BF16;
            softmax_cross_entropy: F32 F16 BF16;
            conv2d: F32 F16 BF16;
            conv2d_backward_data: F32 F16 BF16;
            conv2d_backward_filter: F32 F16 BF16;
            conv2d_pool: F32 F16 BF16;
            max_pool2d: F32 F16 BF16;
            max_pool2d_backward: F32 F16 BF16;
            sgd_update: F32;
            adam_update: F32;
            random_uniform: F32 F16 BF16;
            random_normal: F32 F16 BF16;
            grad_unary: F32;
            grad_binary: F32;
            grad_views: F32;
            grad_reduce: F32;
            grad_softmax: F32;
            grad_linear: F32;
            grad_conv: F32;
            grad_model: F32;
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __checks_const {
    (; $($name:ident: $($dt:ident)+;)+) => {
        /// Every check of the suite: the op's name and the dtypes it is checked in.
        pub const CHECKS: &[(&str, &[kiln_core::DType])] = &[$((stringify!($name), &[$(kiln_core::DType::$dt),+]),)+];
    };
}

__with_checks!(__checks_const!());

/// Expands to one `#[test]` per op × dtype of the suite, each building a
/// backend with `$make` (a closure) and running [`assert_check`].
///
/// `suite!(optional: make)` takes a closure returning `Option<Backend>`;
/// `None` (e.g. the processor lacks an instruction set) skips the checks
/// with a note on stderr.
#[macro_export]
macro_rules! suite {
    (optional: $make:expr) => {
        $crate::__with_checks!(__suite_tests_optional!($make));
    };
    ($make:expr) => {
        $crate::__with_checks!(__suite_tests_optional!(|| Some(($make)())));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests_optional {
    ($make:expr; $($name:ident: $($dt:ident)+;)+) => {
        $(
            #[allow(non_snake_case)]
            mod $name {
                $(
                    #[test]
                    #[allow(non_snake_case)]
                    fn $dt() {
                        let make = $make;
                        match make() {
                            Some(b) => $crate::assert_check(&b, stringify!($name), kiln_core::DType::$dt),
                            None => eprintln!("skipped: backend not available here"),
                        }
                    }
                )+
            }
        )+
    };
}

pub(crate) fn checks_unknown(op: &str, cfg: &Config) -> Report {
    checks::unknown(op, DType::F32, cfg)
}

/// Runs one check on `backend`.
pub fn run_check<B: Backend>(backend: &B, op: &str, dtype: DType, cfg: &Config) -> Report {
    checks::run(backend, op, dtype, cfg)
}

/// Runs one check and panics with the full report unless it passed.
pub fn assert_check<B: Backend>(backend: &B, op: &str, dtype: DType) {
    let cfg = Config::from_env(&backend.name());
    let r = run_check(backend, op, dtype, &cfg);
    eprintln!(
        "{op}/{dtype}: {:?}, {} cases, worst {:.3} of bound",
        r.status, r.cases, r.worst
    );
    if !r.passed() {
        panic!(
            "conformance check {op}/{dtype} on {}: {:?}\n{}\nreproduce: {}",
            backend.name(),
            r.status,
            r.failure
                .as_deref()
                .unwrap_or("the backend does not support this op/dtype"),
            r.reproduce
        );
    }
}
