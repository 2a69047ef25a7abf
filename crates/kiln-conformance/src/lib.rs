//! # kiln-conformance
//!
//! The suite that proves a [`Backend`] computes the same function as an f64
//! oracle, within the error bound each op states ([`bound`]), on the
//! awkward cases ([`values`]): extents 0, 1 and primes, transposed, sliced
//! and broadcast layouts, ±0, subnormals, huge and tiny magnitudes, ±∞, NaN.
//!
//! Every check is an op × dtype pair listed in [`CHECKS`]. A backend crate
//! runs them all from its own tests with one line (in a file under
//! `tests/`; here with kiln's CPU backend):
//!
//! ```
//! use kiln_cpu::CpuBackend;
//! kiln_conformance::suite!(CpuBackend::reference);
//! # fn main() {}
//! ```
//!
//! which expands to one `#[test]` per op and dtype (`gemm::F32`, …); outside
//! a test harness, [`run_check`] runs one check and returns a [`Report`]
//! (the `kiln conformance` command prints them as a table):
//!
//! ```
//! use kiln_conformance::{run_check, Config, Depth};
//! use kiln_core::DType;
//! let backend = kiln_cpu::CpuBackend::reference();
//! let mut cfg = Config::new("cpu:scalar");
//! cfg.cases = 8;
//! cfg.depth = Depth::Edge;
//! let report = run_check(&backend, "softmax", DType::F32, &cfg);
//! assert!(report.passed(), "{:?}", report.failure);
//! ```
//!
//! Sizes come in tiers ([`tier`]): `edge` (0, 1, primes, tile ± 1),
//! `blocked` (every blocking boundary the backend declares in its
//! [`kiln_core::SwitchPoints`], long rows) and `large` (1024–2048 per
//! dimension, k ≥ 4096). The default depth runs edge and blocked.
//!
//! Environment: `KILN_CONFORMANCE_CASES` (or `PROPTEST_CASES`) sets the edge
//! tier's cases per check (default 48), `KILN_CONFORMANCE_BLOCKED_CASES`
//! (24) and `KILN_CONFORMANCE_LARGE_CASES` (2) the others';
//! `KILN_CONFORMANCE_TIER` the depth; `KILN_CONFORMANCE_BUDGET` the seconds
//! a check may spend per tier (or `none`); `KILN_CONFORMANCE_SEED` fixes the
//! seed a failure report names. A failure prints a line that reruns it
//! exactly.

pub mod bound;
mod checks;
mod gradcheck;
pub mod tier;
pub mod values;

use std::cell::Cell;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use kiln_core::{Backend, DType, SwitchPoints};
use proptest::strategy::BoxedStrategy;
use proptest::test_runner::{
    Config as PropConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use serde::{Deserialize, Serialize};

pub use bound::Bound;
pub use tier::{Depth, Sizer, Tier};

/// How a run of the suite is set up. Build one with [`Config::new`] or
/// [`Config::from_env`] and adjust its fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// Random cases per check in the edge tier.
    pub cases: u32,
    /// Cases per check in the blocked tier (at least the check's corners:
    /// [`Sizer::corners_first`]).
    pub blocked_cases: u32,
    /// Random cases per check in the large tier.
    pub large_cases: u32,
    /// The seed every check derives its inputs from.
    pub seed: u64,
    /// How to name the backend in reproduction lines (`cpu:scalar`).
    pub backend: String,
    /// Which size tiers run.
    pub depth: Depth,
    /// Wall-clock time per check and tier after which no new cases start
    /// (`None`: each tier's [`Tier::default_budget`]; `Duration::MAX`:
    /// unlimited). At least [`Tier::min_cases`] cases, and every corner a
    /// check pins ([`Sizer::corners_first`]), always run.
    pub budget: Option<Duration>,
    /// How a failure's reproduction line reruns the check.
    pub rerun: Rerun,
    /// The backend's switch points (set by [`run_check`]).
    points: Option<SwitchPoints>,
}

/// The command a reproduction line names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rerun {
    /// A command line such as `kiln conformance`, completed with
    /// `--backend`, `--op`, `--dtype` and `--tier`.
    Command(String),
    /// A test of the `suite!` macro: `cargo test -p PACKAGE TARGET --
    /// FILTER::op::DTYPE --exact`.
    CargoTest {
        /// The package (`-p`).
        package: String,
        /// The test target's selector: `--lib`, `--test NAME`, …
        target: String,
        /// The path of the module holding the suite, without the crate name.
        filter: String,
    },
}

/// The setting `k` ([`kiln_core::env::setting`]: blank is unset).
fn env_var(k: &str) -> Result<Option<String>, String> {
    kiln_core::env::setting(k).map_err(|e| e.to_string())
}

/// A whole number as a setting gives it (`_` between digits allowed).
fn parse_u64(v: &str) -> Option<u64> {
    v.replace('_', "").parse::<u64>().ok()
}

impl Config {
    /// Defaults: 48 edge cases, 24 blocked, 2 large, a fixed seed, the
    /// `blocked` depth, each tier's own time budget, and `kiln conformance`
    /// as the rerun command.
    pub fn new(backend: &str) -> Self {
        Config {
            cases: 48,
            blocked_cases: 24,
            large_cases: 2,
            seed: 0x6b69_6c6e,
            backend: backend.to_string(),
            depth: Depth::default(),
            budget: None,
            rerun: Rerun::Command("kiln conformance".into()),
            points: None,
        }
    }

    /// [`Config::new`] with what the environment sets:
    /// `KILN_CONFORMANCE_CASES` (or `PROPTEST_CASES`),
    /// `KILN_CONFORMANCE_BLOCKED_CASES`, `KILN_CONFORMANCE_LARGE_CASES`,
    /// `KILN_CONFORMANCE_SEED`, `KILN_CONFORMANCE_TIER`
    /// (`edge|blocked|large|all`) and `KILN_CONFORMANCE_BUDGET` (seconds
    /// per check and tier, or `none`). A malformed value is an error that
    /// names the variable.
    pub fn from_env(backend: &str) -> Result<Self, String> {
        let mut cfg = Config::new(backend);
        let cases = |k: &str| -> Result<Option<u32>, String> {
            match env_var(k)? {
                None => Ok(None),
                Some(v) => match parse_u64(&v) {
                    Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => Ok(Some(n as u32)),
                    _ => Err(format!("{k}={v}: expected a number of cases ≥ 1")),
                },
            }
        };
        if let Some(n) = cases("KILN_CONFORMANCE_CASES")?.or(cases("PROPTEST_CASES")?) {
            cfg.cases = n;
        }
        if let Some(n) = cases("KILN_CONFORMANCE_BLOCKED_CASES")? {
            cfg.blocked_cases = n;
        }
        if let Some(n) = cases("KILN_CONFORMANCE_LARGE_CASES")? {
            cfg.large_cases = n;
        }
        if let Some(v) = env_var("KILN_CONFORMANCE_SEED")? {
            cfg.seed = parse_u64(&v).ok_or_else(|| {
                format!("KILN_CONFORMANCE_SEED={v}: expected an unsigned integer")
            })?;
        }
        if let Some(v) = env_var("KILN_CONFORMANCE_TIER")? {
            cfg.depth = Depth::parse(&v).map_err(|e| format!("KILN_CONFORMANCE_TIER: {e}"))?;
        }
        if let Some(v) = env_var("KILN_CONFORMANCE_BUDGET")? {
            cfg.budget =
                Some(parse_budget(&v).map_err(|e| format!("KILN_CONFORMANCE_BUDGET: {e}"))?);
        }
        Ok(cfg)
    }

    /// The cases a tier runs.
    pub fn cases_for(&self, tier: Tier) -> u32 {
        match tier {
            Tier::Edge => self.cases,
            Tier::Blocked => self.blocked_cases,
            Tier::Large => self.large_cases,
        }
    }

    /// The depth, each tier's cases and the seed, as run headers print them:
    /// `tiers blocked (cases per check: edge 48, blocked 24), seed 1802071150`.
    pub fn describe(&self) -> String {
        let tiers: Vec<String> = self
            .depth
            .tiers()
            .iter()
            .map(|&t| format!("{t} {}", self.cases_for(t)))
            .collect();
        format!(
            "tiers {} (cases per check: {}), seed {}",
            self.depth,
            tiers.join(", "),
            self.seed
        )
    }

    /// The time budget of one check in `tier`.
    pub fn budget_for(&self, tier: Tier) -> Duration {
        self.budget.unwrap_or(tier.default_budget())
    }

    /// The command line that reruns exactly `op`/`dtype` at `tier`, with
    /// the same seed and case count and no time budget.
    pub fn reproduce(&self, op: &str, dtype: DType, tier: Tier) -> String {
        let env = format!(
            "KILN_CONFORMANCE_SEED={} {}={} KILN_CONFORMANCE_BUDGET=none",
            self.seed,
            tier.cases_var(),
            self.cases_for(tier)
        );
        match &self.rerun {
            Rerun::Command(cmd) => format!(
                "{env} {cmd} --backend {} --op {op} --dtype {dtype} --tier {tier}",
                self.backend
            ),
            Rerun::CargoTest {
                package,
                target,
                filter,
            } => {
                let dt = dtype.as_str().to_uppercase();
                let path = if filter.is_empty() {
                    format!("{op}::{dt}")
                } else {
                    format!("{filter}::{op}::{dt}")
                };
                format!(
                    "{env} KILN_CONFORMANCE_TIER={tier} cargo test -p {package} {target} -- {path} --exact"
                )
            }
        }
    }
}

/// Parses a time budget: seconds (`2.5`) or `none` for no limit.
pub fn parse_budget(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "none" {
        return Ok(Duration::MAX);
    }
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e6 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "`{s}`: expected seconds (0 < s ≤ 1000000) or `none`"
        )),
    }
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every case was within its bound.
    Pass,
    /// A case was not; see [`Report::failure`].
    Fail,
    /// The backend does not support the op/dtype (declared in its
    /// [`kiln_core::Capabilities`], or an `Unsupported` error).
    Unsupported,
    /// It failed, and the backend declared that it would.
    ExpectedFailure,
    /// It passed although the backend declared that it would fail.
    UnexpectedPass,
}

impl Status {
    /// Lowercase words for tables.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Unsupported => "unsupported",
            Status::ExpectedFailure => "expected failure",
            Status::UnexpectedPass => "unexpected pass",
        }
    }
}

/// What one tier of a check found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TierReport {
    /// The tier.
    pub tier: Tier,
    /// Pass, fail or unsupported.
    pub status: Status,
    /// Cases run.
    pub cases: u32,
    /// Cases not run because the time budget ran out.
    pub over_budget: u32,
    /// The largest error seen, as a fraction of its bound.
    pub worst: f64,
    /// The error of the element closest to its bound, in units in the last
    /// place of the result.
    pub worst_ulps: f64,
    /// Wall-clock seconds, shrinking included.
    pub seconds: f64,
}

/// What one check found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The op (`gemm`, `unary_exp`, …).
    pub op: String,
    /// The dtype.
    pub dtype: DType,
    /// The verdict over every tier that ran.
    pub status: Status,
    /// Cases run, over every tier.
    pub cases: u32,
    /// The largest error seen, as a fraction of its bound (0 = exact).
    pub worst: f64,
    /// The error of the element closest to its bound, in ulps of the result.
    pub worst_ulps: f64,
    /// For a failure: the tier, the shrunk minimal case, the bound, the observed error.
    pub failure: Option<String>,
    /// A command that reruns exactly this check (the failing tier, if any).
    pub reproduce: String,
    /// Each tier's own result, smallest first.
    pub tiers: Vec<TierReport>,
    /// Anything else worth saying (why a tier did not run, say).
    pub note: Option<String>,
}

impl Report {
    /// Whether the check passed (including an unexpected pass).
    pub fn passed(&self) -> bool {
        matches!(self.status, Status::Pass | Status::UnexpectedPass)
    }

    /// Whether the check counts as a failure: it failed and no expected
    /// failure was declared.
    pub fn is_failure(&self) -> bool {
        self.status == Status::Fail
    }

    /// Seconds spent, over every tier.
    pub fn seconds(&self) -> f64 {
        self.tiers.iter().map(|t| t.seconds).sum()
    }

    pub(crate) fn without_cases(
        op: &str,
        dtype: DType,
        cfg: &Config,
        status: Status,
        note: String,
    ) -> Self {
        Report {
            op: op.to_string(),
            dtype,
            status,
            cases: 0,
            worst: 0.0,
            worst_ulps: 0.0,
            failure: None,
            reproduce: cfg.reproduce(op, dtype, Tier::Edge),
            tiers: Vec::new(),
            note: Some(note),
        }
    }
}

/// Runs `test` on inputs drawn from `strategy`, once per tier of the
/// config's depth (seeded by the config, the check's name and the tier),
/// shrinking any failure to a minimal input; stops at the first failing
/// tier. `test` returns the worst error of its case as a fraction of the
/// bound.
pub(crate) fn run_cases<V, G, F>(
    op: &str,
    dtype: DType,
    cfg: &Config,
    strategy: G,
    test: F,
) -> Report
where
    V: Debug,
    G: Fn(&Sizer) -> BoxedStrategy<V>,
    F: Fn(V) -> Result<f64, CaseError>,
{
    run_tiers(op, dtype, cfg, cfg.depth.tiers(), strategy, test)
}

/// [`run_cases`] for a check whose subject does not change with size (a
/// gradient check composes kernels the other checks size): it runs the
/// edge tier only, and says so.
pub(crate) fn run_edge_cases<S, F>(
    op: &str,
    dtype: DType,
    cfg: &Config,
    strategy: S,
    test: F,
) -> Report
where
    S: proptest::strategy::Strategy + Clone + 'static,
    S::Value: Debug,
    F: Fn(S::Value) -> Result<f64, CaseError>,
{
    let tiers: &[Tier] = if cfg.depth.tiers().contains(&Tier::Edge) {
        &[Tier::Edge]
    } else {
        &[]
    };
    let mut r = run_tiers(
        op,
        dtype,
        cfg,
        tiers,
        |_| proptest::strategy::Strategy::boxed(strategy.clone()),
        test,
    );
    r.note = Some("size-independent: runs in the edge tier only".into());
    r
}

fn run_tiers<V, G, F>(
    op: &str,
    dtype: DType,
    cfg: &Config,
    tiers: &[Tier],
    strategy: G,
    test: F,
) -> Report
where
    V: Debug,
    G: Fn(&Sizer) -> BoxedStrategy<V>,
    F: Fn(V) -> Result<f64, CaseError>,
{
    let points = cfg.points.clone().unwrap_or_default();
    let mut report = Report {
        op: op.to_string(),
        dtype,
        status: Status::Pass,
        cases: 0,
        worst: 0.0,
        worst_ulps: 0.0,
        failure: None,
        reproduce: cfg.reproduce(op, dtype, tiers.last().copied().unwrap_or(Tier::Edge)),
        tiers: Vec::new(),
        note: None,
    };
    for &tier in tiers {
        let sizer = Sizer::new(tier, points.clone());
        let strategy = strategy(&sizer);
        let (t, failure) = run_tier(op, dtype, cfg, tier, sizer.pinned(), strategy, &test);
        report.cases += t.cases;
        if t.worst >= report.worst {
            report.worst = t.worst;
            report.worst_ulps = t.worst_ulps;
        }
        let status = t.status;
        report.tiers.push(t);
        if status != Status::Pass {
            report.status = status;
            report.failure = failure;
            report.reproduce = cfg.reproduce(op, dtype, tier);
            break;
        }
    }
    report
}

/// The most time shrinking a failure may take, whatever the budget.
const SHRINK_TIME_CAP: Duration = Duration::from_secs(60);

fn run_tier<V, F>(
    op: &str,
    dtype: DType,
    cfg: &Config,
    tier: Tier,
    pinned: u32,
    strategy: BoxedStrategy<V>,
    test: &F,
) -> (TierReport, Option<String>)
where
    V: Debug,
    F: Fn(V) -> Result<f64, CaseError>,
{
    let mut seed = [0u8; 32];
    let tag = match tier {
        Tier::Edge => format!("{op}/{dtype}"),
        _ => format!("{op}/{dtype}/{tier}"),
    };
    let h = tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    seed[..8].copy_from_slice(&cfg.seed.to_le_bytes());
    seed[8..16].copy_from_slice(&h.to_le_bytes());
    let budget = cfg.budget_for(tier);
    // Every pinned corner is drawn, and run whatever the budget says.
    let min_cases = tier.min_cases().max(pinned);
    let config = PropConfig {
        cases: cfg.cases_for(tier).max(pinned),
        failure_persistence: None,
        // Shrinking is bounded by steps, not by the tier's time budget, so
        // that a failure's reproduction line (which runs with no budget)
        // shrinks to the same case on any machine; a large case re-runs
        // slowly, so its tier takes fewer steps. The time cap is only a
        // safety net, the same for the run and its rerun.
        max_shrink_iters: tier.shrink_steps(),
        max_shrink_time: SHRINK_TIME_CAP.as_millis() as u32,
        ..PropConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let start = Instant::now();
    WORST.with(|w| w.set((0.0, 0.0)));
    let (worst, unsupported, ran, skipped) = (
        Cell::new(0f64),
        Cell::new(false),
        Cell::new(0u32),
        Cell::new(0u32),
    );
    let shrinking = Cell::new(false);
    let result = runner.run(&strategy, |input| {
        if !shrinking.get() && ran.get() >= min_cases && start.elapsed() > budget {
            skipped.set(skipped.get() + 1);
            return Ok(());
        }
        if !shrinking.get() {
            ran.set(ran.get() + 1);
        }
        match test(input) {
            Ok(w) => {
                worst.set(worst.get().max(w));
                Ok(())
            }
            Err(CaseError::Unsupported) => {
                unsupported.set(true);
                Ok(())
            }
            Err(CaseError::Fail(msg)) => {
                shrinking.set(true);
                Err(TestCaseError::fail(msg))
            }
        }
    });
    let (status, failure) = match result {
        _ if unsupported.get() => (Status::Unsupported, None),
        Ok(()) => (Status::Pass, None),
        Err(TestError::Fail(reason, input)) => (
            Status::Fail,
            Some(format!("[{tier} tier] {reason}\nminimal case: {input:#?}")),
        ),
        Err(TestError::Abort(reason)) => (
            Status::Fail,
            Some(format!("[{tier} tier] aborted: {reason}")),
        ),
    };
    let t = TierReport {
        tier,
        status,
        cases: ran.get(),
        over_budget: skipped.get(),
        worst: worst.get(),
        worst_ulps: WORST.with(|w| w.get().1),
        seconds: start.elapsed().as_secs_f64(),
    };
    (t, failure)
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
        WORST.with(|w| {
            if v.fraction > w.get().0 && v.ulps.is_finite() {
                w.set((v.fraction, v.ulps));
            }
        });
    }
    Ok(worst)
}

thread_local! {
    /// The element [`compare`] has accepted closest to its bound on this
    /// thread since the tier running here began (cases run on the thread
    /// that runs the tier): its fraction of the bound and its distance in
    /// ulps. (The largest distance in ulps overall means little for dot
    /// products: a result near 0 is many ulps from a tiny exact value
    /// while well inside its absolute bound.)
    static WORST: Cell<(f64, f64)> = const { Cell::new((0.0, 0.0)) };
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
            contiguous: F32 F16 BF16 U32;
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
            unary_gelu: F32 F16 BF16;
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
            unary_backward_gelu: F32 F16 BF16;
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
            softmax_causal: F32 F16 BF16;
            attention_causal: F32 F16 BF16;
            attention_causal_backward: F32 F16 BF16;
            softmax_cross_entropy: F32 F16 BF16;
            layer_norm: F32 F16 BF16;
            embedding: F32 F16 BF16;
            embedding_backward: F32 F16 BF16;
            layer_norm_backward: F32 F16 BF16;
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
            grad_norm: F32;
            grad_embedding: F32;
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
                // The closure names what the caller's module imports.
                #[allow(unused_imports)]
                use super::*;
                $(
                    #[test]
                    #[allow(non_snake_case)]
                    fn $dt() {
                        let make = $make;
                        match make() {
                            Some(b) => $crate::assert_check_as(
                                &b,
                                stringify!($name),
                                kiln_core::DType::$dt,
                                $crate::cargo_test_rerun(
                                    env!("CARGO_PKG_NAME"),
                                    env!("CARGO_CRATE_NAME"),
                                    module_path!(),
                                ),
                            ),
                            None => eprintln!("skipped: backend not available here"),
                        }
                    }
                )+
            }
        )+
    };
}

/// The [`Rerun`] of a `suite!` test, from the package, the test target's
/// crate name and the module path of the test (`crate::…::suite::op`).
#[doc(hidden)]
pub fn cargo_test_rerun(package: &str, crate_name: &str, module_path: &str) -> Rerun {
    let segments: Vec<&str> = module_path.split("::").collect();
    // Drop the crate name and the op's own module.
    let filter = segments[1..segments.len().saturating_sub(1).max(1)].join("::");
    let target = if crate_name == package.replace('-', "_") {
        "--lib".to_string()
    } else {
        format!("--test {crate_name}")
    };
    Rerun::CargoTest {
        package: package.to_string(),
        target,
        filter,
    }
}

/// Runs one check on `backend`. What the backend declares
/// ([`Backend::capabilities`]) decides how it runs: the blocked tier aims at
/// its switch points; a check it declares unsupported is not run and is
/// reported [`Status::Unsupported`]; a declared expected failure that fails
/// is reported [`Status::ExpectedFailure`], and one that passes
/// [`Status::UnexpectedPass`].
pub fn run_check<B: Backend>(backend: &B, op: &str, dtype: DType, cfg: &Config) -> Report {
    let caps = backend.capabilities();
    if let Err(e) = caps.validate() {
        let mut r = checks::unknown(op, dtype, cfg);
        r.failure = Some(format!("the backend's capabilities are malformed: {e}"));
        return r;
    }
    if !caps.supports(op, dtype) {
        return Report::without_cases(
            op,
            dtype,
            cfg,
            Status::Unsupported,
            "declared unsupported by the backend".into(),
        );
    }
    let mut cfg = cfg.clone();
    cfg.points = Some(caps.switch_points.clone());
    let mut r = checks::run(backend, op, dtype, &cfg);
    if caps.expects_failure(op, dtype) {
        r.status = match r.status {
            Status::Fail => Status::ExpectedFailure,
            Status::Pass => Status::UnexpectedPass,
            other => other,
        };
        r.note = Some("declared an expected failure by the backend".into());
    }
    r
}

/// Runs one check with the configuration from the environment and panics
/// with the full report if it fails; an unsupported check or an expected
/// failure is noted on stderr and passes.
pub fn assert_check<B: Backend>(backend: &B, op: &str, dtype: DType) {
    assert_check_as(
        backend,
        op,
        dtype,
        Rerun::Command("kiln conformance".into()),
    )
}

/// [`assert_check`], naming `rerun` in the reproduction line.
pub fn assert_check_as<B: Backend>(backend: &B, op: &str, dtype: DType, rerun: Rerun) {
    let mut cfg = match Config::from_env(&backend.name()) {
        Ok(c) => c,
        Err(e) => panic!("conformance configuration: {e}"),
    };
    cfg.rerun = rerun;
    let r = run_check(backend, op, dtype, &cfg);
    let tiers: Vec<String> = r
        .tiers
        .iter()
        .map(|t| {
            let budget = if t.over_budget > 0 {
                format!(", {} over budget", t.over_budget)
            } else {
                String::new()
            };
            format!("{} {} cases{budget} in {:.2} s", t.tier, t.cases, t.seconds)
        })
        .collect();
    eprintln!(
        "{op}/{dtype}: {}, {} cases ({}), worst {:.3} of bound{}",
        r.status.label(),
        r.cases,
        tiers.join("; "),
        r.worst,
        r.note
            .as_deref()
            .map(|n| format!(" — {n}"))
            .unwrap_or_default()
    );
    if r.is_failure() {
        panic!(
            "conformance check {op}/{dtype} on {}: {}\n{}\nreproduce: {}",
            backend.name(),
            r.status.label(),
            r.failure.as_deref().unwrap_or("no failure recorded"),
            r.reproduce
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rerun_lines_name_the_test_that_failed() {
        let mut cfg = Config::new("cpu:avx512");
        cfg.rerun = cargo_test_rerun("kiln-cpu", "conformance", "conformance::avx512::gemm");
        assert_eq!(
            cfg.reproduce("gemm", DType::F32, Tier::Blocked),
            "KILN_CONFORMANCE_SEED=1802071150 KILN_CONFORMANCE_BLOCKED_CASES=24 \
             KILN_CONFORMANCE_BUDGET=none KILN_CONFORMANCE_TIER=blocked \
             cargo test -p kiln-cpu --test conformance -- avx512::gemm::F32 --exact"
        );
        let lib = cargo_test_rerun("my-device", "my_device", "my_device::tests::softmax");
        assert!(
            matches!(lib, Rerun::CargoTest { ref target, ref filter, .. }
            if target == "--lib" && filter == "tests")
        );
        cfg.rerun = Rerun::Command("target/release/kiln conformance".into());
        assert!(cfg
            .reproduce("softmax", DType::BF16, Tier::Large)
            .ends_with("target/release/kiln conformance --backend cpu:avx512 --op softmax --dtype bf16 --tier large"));
    }
}
