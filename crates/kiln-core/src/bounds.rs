//! The error bounds every backend is held to, in one place.
//!
//! Each op of [`Backend`](crate::Backend) promises its results within a
//! stated distance of the exact (real-number) value. This module states
//! those promises as functions: the conformance suite (`kiln-conformance`)
//! judges every backend with them, the CPU kernel sets' own sweeps read
//! their ulp budgets from them, and the table below is their summary. A
//! vendor backend is held to exactly these numbers.
//!
//! | op | bound |
//! |---|---|
//! | `neg`, `abs`, `relu`, `max`/`min` reductions, comparisons, copies, casts to a wider type | exact |
//! | `sqrt`, `square`, `recip`, `add`/`sub`/`mul`/`div`/`maximum`/`minimum`, f32 `affine` (one fma) | correctly rounded |
//! | `exp`, `log` (f32) | [`unary_ulps`]: 2 ulps |
//! | `tanh` (f32) | 3 ulps |
//! | `sigmoid` (f32) | 4 ulps |
//! | `gelu` (f32; tanh form) | [`gelu`]: `|y|·(9u + 6u·(1 − σ)·|s|)` plus underflow |
//! | any transcendental, f16/bf16 `affine` (computed in f32, rounded once) | 1 ulp of the storage type |
//! | sum of n terms, dot product of length n (GEMM, convolution) | [`dot`]: `(γₙ + n·2⁻⁵³)·Σ|termᵢ| + n·η` |
//! | mean | [`mean`] |
//! | GEMM / conv epilogue (α, β·C₀, bias, activation) | [`epilogue`] over [`dot`] |
//! | softmax, log-softmax, cross-entropy | [`SoftmaxRow`] |
//! | layer norm, its backward | [`LayerNormRow`], [`LayerNormBackwardRow`] |
//! | causal attention, its backward | [`attention`], [`attention_backward`] |
//! | unary derivatives | [`unary_backward`] |
//! | SGD, Adam | [`sgd`], [`adam`] |
//!
//! Here `u = 2⁻²⁴` is the unit roundoff of f32 — every op accumulates in at
//! least f32, whatever the storage type — `γₙ = n·u/(1 − n·u)` ([`gamma`]),
//! `η` the error of one operation whose result is subnormal ([`ETA_F32`]),
//! and `2⁻⁵³` the f64 oracle's own rounding. An [`Bound::Abs`] bound also
//! admits half an ulp of the storage type for the final store.
//!
//! ```
//! use kiln_core::bounds::{gamma, unit_roundoff, U};
//! use kiln_core::DType;
//!
//! // f32's unit roundoff is 2⁻²⁴; bf16's 2⁻⁸.
//! assert_eq!(unit_roundoff(DType::F32), U);
//! assert_eq!(unit_roundoff(DType::BF16), 1.0 / 256.0);
//! // γₙ = n·u / (1 − n·u): the relative error bound of an n-term sum.
//! let g = gamma(1000, U);
//! assert!(g > 1000.0 * U && g < 1001.0 * U);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::backend::{gelu_parts_f64, GELU_C, GELU_K2};
use crate::{Activation, BinaryOp, DType, ReduceOp, UnaryOp};

/// How far a computed element may be from the exact value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// Bitwise equal to the exact value (which the format holds).
    Exact,
    /// Equal to the exact value rounded to nearest-even.
    CorrectlyRounded,
    /// Within this many ulps of the correctly rounded value.
    Ulps(u32),
    /// Within this absolute error, plus the final rounding.
    Abs(f64),
    /// As [`Bound::Abs`], for a value `f(s)` of a sum `s` whose partial
    /// sums may leave the f32 range (their magnitudes add up past
    /// `f32::MAX`). IEEE arithmetic may then make `s` ±∞ or NaN whatever
    /// its exact value, so NaN and `f(−∞)`, `f(+∞)` — the `images`, e.g. 0
    /// and +∞ under ReLU — are admitted too. [`Bound::accumulated`] picks
    /// this or `Abs`.
    Overflowing {
        /// The absolute error when nothing overflows.
        abs: f64,
        /// `f(−∞)` and `f(+∞)`.
        images: [f64; 2],
    },
}

impl Bound {
    /// The bound of `f(s)` for a sum `s` of `n` terms accumulated in f32,
    /// off by at most `err` when no partial sum overflows: [`Bound::Abs`]
    /// when the terms' magnitudes `mass` keep every partial sum inside the
    /// f32 range, else [`Bound::Overflowing`] with `images` = `[f(−∞), f(+∞)]`.
    pub fn accumulated(err: f64, mass: f64, n: usize, images: [f64; 2]) -> Bound {
        if mass * (1.0 + gamma(n, U)) >= f64::from(f32::MAX) || mass.is_nan() {
            Bound::Overflowing { abs: err, images }
        } else {
            Bound::Abs(err)
        }
    }

    /// A plain sum (the identity after it): `f(±∞) = ±∞`.
    pub fn summed(err: f64, mass: f64, n: usize) -> Bound {
        Bound::accumulated(err, mass, n, [f64::NEG_INFINITY, f64::INFINITY])
    }
}

/// `u`, the unit roundoff of f32 (2⁻²⁴): every op computes in at least f32.
pub const U: f64 = 1.0 / 16_777_216.0;

/// The f64 oracle's own unit roundoff (2⁻⁵³), charged once per term of a
/// sum so that the oracle's error is not blamed on the backend.
pub const U_ORACLE: f64 = 1.0 / 9_007_199_254_740_992.0;

/// η: the absolute error one f32 operation may add when its result is
/// subnormal (half the subnormal spacing 2⁻¹⁴⁹). γₙ-style bounds assume no
/// underflow; adding `n·η` covers gradual underflow in `n` operations.
pub const ETA_F32: f64 = 1.0 / (1u128 << 100) as f64 / (1u64 << 50) as f64;

/// The unit roundoff of a storage type (f32's for the integer type).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        DType::F32 | DType::U32 => U,
    }
}

/// `γₙ = n·u/(1 − n·u)`, the classic bound factor for n roundings
/// (∞ once `n·u ≥ 1`).
pub fn gamma(n: usize, u: f64) -> f64 {
    let nu = n as f64 * u;
    if nu >= 1.0 {
        f64::INFINITY
    } else {
        nu / (1.0 - nu)
    }
}

/// The ulps an f32 transcendental may be off (the CPU kernel sets and the
/// CUDA kernels are built to these; the reference uses the platform's libm,
/// within 2); `None` for the ops whose bound is not a number of ulps (exact,
/// correctly rounded, or GELU's, see [`gelu`]).
pub const fn unary_ulps(op: UnaryOp) -> Option<u32> {
    match op {
        UnaryOp::Exp | UnaryOp::Log => Some(2),
        UnaryOp::Tanh => Some(3),
        UnaryOp::Sigmoid => Some(4),
        _ => None,
    }
}

/// The bound of `op(x)` stored as `dtype`. Transcendentals: [`unary_ulps`]
/// in f32; in f16/bf16 (computed in f32, rounded once) 1 ulp; GELU: [`gelu`].
pub fn unary(op: UnaryOp, dtype: DType, x: f64) -> Bound {
    match op {
        UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => Bound::Exact,
        UnaryOp::Sqrt | UnaryOp::Square | UnaryOp::Recip => Bound::CorrectlyRounded,
        _ if dtype != DType::F32 => Bound::Ulps(1),
        UnaryOp::Gelu => gelu(x),
        _ => Bound::Ulps(unary_ulps(op).unwrap_or(0)),
    }
}

/// GELU's bound in f32 at `x`. It is computed as `x·σ(s)` with
/// `s = K·x·(1 + C·x²)`: `s` carries about 6 roundings (the two constants
/// included), which σ turns into a relative error `(1 − σ)·|Δs|`; σ itself
/// is within 4 ulps and the product adds one rounding. So
/// `|Δy| ≤ |y|·(9u + 6u·(1 − σ)·|s|) + (|x| + 1)·4η` — the last term for a
/// σ that underflows into the subnormals (x below about −10). Not a fixed
/// number of ulps: for x near −10, `(1 − σ)·|s|` is about 87.
pub fn gelu(x: f64) -> Bound {
    if !x.is_finite() {
        return Bound::Exact;
    }
    let (sig, s) = gelu_parts_f64(x);
    let y = x * sig;
    Bound::Abs(
        y.abs() * (9.0 * U + 6.0 * U * (1.0 - sig) * s.abs()) + (x.abs() + 1.0) * 4.0 * ETA_F32,
    )
}

/// The bound of a unary op's derivative `dy·f′(x)` (exact for the
/// piecewise-linear ops, else four roundings of its terms' magnitude;
/// GELU's also grows with `|s|` as [`gelu`]'s does).
pub fn unary_backward(op: UnaryOp, x: f64, y: f64, dy: f64) -> Bound {
    let mass = match op {
        UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => return Bound::Exact,
        UnaryOp::Exp => (dy * y).abs(),
        UnaryOp::Log => (dy / x).abs(),
        UnaryOp::Sqrt => (dy * 0.5 / y).abs(),
        UnaryOp::Square => (2.0 * dy * x).abs(),
        UnaryOp::Recip => (dy * y * y).abs(),
        UnaryOp::Sigmoid => (dy * y).abs() * ((1.0 - y).abs() + 2.0 * U),
        UnaryOp::Tanh => dy.abs() * ((1.0 - y * y).abs() + y * y),
        // σ + x·σ(1 − σ)·s′: σ's relative error grows with |s| as GELU's.
        UnaryOp::Gelu => {
            let (sig, s) = gelu_parts_f64(x);
            let slope = x * sig * (1.0 - sig) * GELU_K2 * (1.0 + 3.0 * GELU_C * x * x);
            let mass = dy.abs() * (sig + slope.abs());
            if !mass.is_finite() {
                return Bound::Exact;
            }
            return Bound::Abs(
                mass * (16.0 * U + 6.0 * U * s.abs()) + (dy.abs() + 1.0) * 8.0 * ETA_F32,
            );
        }
    };
    if mass == 0.0 {
        Bound::Exact
    } else {
        Bound::Abs(4.0 * U * mass)
    }
}

/// The bound of `op(a, b)`: arithmetic correctly rounded; comparisons
/// exact; maximum and minimum correctly rounded (of +0 and −0 either zero
/// may come back).
pub fn binary(op: BinaryOp) -> Bound {
    match op {
        BinaryOp::Eq | BinaryOp::Gt | BinaryOp::Ge => Bound::Exact,
        _ => Bound::CorrectlyRounded,
    }
}

/// `x·mul + add`: one fma, so correctly rounded in f32; in f16/bf16 that
/// f32 result is rounded again to the storage type (1 ulp).
pub fn affine(dtype: DType) -> Bound {
    if dtype == DType::F32 {
        Bound::CorrectlyRounded
    } else {
        Bound::Ulps(1)
    }
}

/// The error of a sum or dot product of `n` terms, accumulated in f32 in
/// any order, whose terms' magnitudes add up to `mass`:
/// `(γₙ + n·2⁻⁵³)·mass + n·η`.
pub fn dot(n: usize, mass: f64) -> f64 {
    (gamma(n, U) + n as f64 * U_ORACLE) * mass + n as f64 * ETA_F32
}

/// The bound of a reduction of `n` terms of magnitudes `mass`: sums within [`dot`], means within that divided by `n` plus
/// the division's rounding, max and min correctly rounded (they pick an
/// element).
pub fn reduce(op: ReduceOp, n: usize, mass: f64) -> Bound {
    let err = dot(n, mass);
    match op {
        ReduceOp::Sum => Bound::Abs(err),
        ReduceOp::Mean => Bound::Abs(mean(n, mass)),
        ReduceOp::Max | ReduceOp::Min => Bound::CorrectlyRounded,
    }
}

/// The error of the mean of `n` terms of magnitudes `mass`.
pub fn mean(n: usize, mass: f64) -> f64 {
    (gamma(n + 1, U) * mass + dot(n, mass)) / n as f64 + ETA_F32
}

/// The error after `steps` more f32 roundings (epilogue additions) of a
/// value already off by `err`, whose terms' magnitudes add up to `terms`.
pub fn epilogue(steps: usize, terms: f64, err: f64) -> f64 {
    err + gamma(steps, U) * (terms + err) + steps as f64 * ETA_F32
}

/// An activation's effect on a bound: `(L, ulps)` — the Lipschitz constant
/// that multiplies the error of its argument, and the ulps of the result
/// its own evaluation adds (fused epilogues evaluate the transcendental
/// once more, so one ulp above [`unary_ulps`] for tanh).
pub fn activation(act: Activation) -> (f64, f64) {
    match act {
        Activation::None | Activation::Relu => (1.0, 0.0),
        Activation::Sigmoid => (0.25, 4.0),
        Activation::Tanh => (1.0, 4.0),
    }
}

/// The bound of `act(pre)` where `pre`, the result of a sum of `n` terms
/// of magnitudes `mass`, is off by `err`: the activation's Lipschitz
/// constant times `err`, plus its own ulps at the result `y`.
pub fn activated(act: Activation, y: f64, err: f64, mass: f64, n: usize) -> Bound {
    let (lipschitz, ulps) = activation(act);
    let e = lipschitz * err + ulps * 2.0 * U * y.abs();
    let image = |x: f64| act.as_unary().map_or(x, |u| u.eval_f64(x));
    Bound::accumulated(e, mass, n, [image(f64::NEG_INFINITY), image(f64::INFINITY)])
}

/// The error a bf16 product-accumulate path may add by flushing subnormal
/// intermediate sums (AVX-512 BF16's `vdpbf16ps`, tensor cores): 2⁻¹²⁶ per
/// step, for `k` steps; 0 for other types.
pub fn flush(dtype: DType, k: usize) -> f64 {
    if dtype == DType::BF16 {
        k as f64 * 2f64.powi(-126)
    } else {
        0.0
    }
}

/// The bound of a gradient routed through max-pool windows and then summed
/// in a dot product of `len` terms: the dot product's own (`mass` = Σ|terms|
/// with the routed values exact), plus the routed values' roundings — each
/// is a sum of up to `overlap` pooled gradients (overlapping windows) and
/// may have been stored as `dtype`, so off by `(γ_overlap + 4u_dtype)` times
/// `routed_mass` (Σ|terms| with each routed value replaced by its sum of
/// magnitudes).
pub fn routed(dtype: DType, mass: f64, routed_mass: f64, len: usize, overlap: usize) -> f64 {
    dot(len.max(1), mass) + (gamma(overlap, U) + 4.0 * unit_roundoff(dtype)) * routed_mass
}

/// One row of a softmax along the last axis, and the bounds of what is
/// computed from it.
///
/// The model follows the computation `m = max x`, `eⱼ = exp(xⱼ − m)`,
/// `S = Σ eⱼ`: `xⱼ − m` is off by `u·|xⱼ − m|` (which `exp` turns into a
/// relative error), each `exp` by 2 ulps, and the sum by γₙ; so `S` carries
/// the relative error `δ_S = Σ eⱼ·(u|xⱼ − m| + 4u)/S + γₙ`, and
/// - softmax: `|Δyᵢ| ≤ yᵢ·(u|xᵢ − m| + 6u + δ_S) + (n + 4)·η`;
/// - log-softmax: `|Δyᵢ| ≤ u|xᵢ − m| + δ_S + 4u·|ln S| + u·|yᵢ|`;
/// - cross-entropy `m + ln S − x_l`: `u·(2|m| + 4|ln S| + 2|x_l| + |loss|) + δ_S`;
/// - its gradient `yⱼ − [j = l]`: the softmax bound plus `u·|gⱼ|`.
#[derive(Clone, Debug)]
pub struct SoftmaxRow<'a> {
    row: &'a [f64],
    /// The row's maximum (NaN if any element is NaN).
    pub max: f64,
    /// `S = Σ exp(xⱼ − max)`, exactly.
    pub sum: f64,
    /// `δ_S`, the relative error of the computed `S`.
    pub delta: f64,
}

impl<'a> SoftmaxRow<'a> {
    /// The statistics of the exact row `row`.
    pub fn new(row: &'a [f64]) -> Self {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| {
            if m.is_nan() || v.is_nan() {
                f64::NAN
            } else {
                m.max(v)
            }
        });
        let sum: f64 = row.iter().map(|&v| (v - max).exp()).sum();
        // Terms that underflow to 0 carry no relative error (and would give 0·∞).
        let weighted: f64 = row
            .iter()
            .map(|&v| {
                let e = (v - max).exp();
                if e == 0.0 {
                    0.0
                } else {
                    e * (U * (v - max).abs() + 4.0 * U)
                }
            })
            .sum();
        SoftmaxRow {
            row,
            max,
            sum,
            delta: weighted / sum + gamma(row.len(), U),
        }
    }

    /// Element `i` of the softmax and its error bound.
    pub fn prob(&self, i: usize) -> (f64, f64) {
        let v = self.row[i];
        let y = (v - self.max).exp() / self.sum;
        // exp and the division may underflow: add their η.
        let e = y * (U * (v - self.max).abs() + 6.0 * U + self.delta)
            + (self.row.len() + 4) as f64 * ETA_F32;
        (y, e)
    }

    /// Element `i` of the log-softmax and its error bound.
    pub fn log_prob(&self, i: usize) -> (f64, f64) {
        let v = self.row[i];
        let lse = self.sum.ln();
        let y = v - self.max - lse;
        let e = U * (v - self.max).abs() + self.delta + 4.0 * U * lse.abs() + U * y.abs();
        (y, e)
    }

    /// The cross-entropy loss for class `label` and its error bound.
    pub fn loss(&self, label: usize) -> (f64, f64) {
        let lse = self.sum.ln();
        let x = self.row[label];
        let loss = self.max + lse - x;
        let e =
            U * (2.0 * self.max.abs() + 4.0 * lse.abs() + 2.0 * x.abs() + loss.abs()) + self.delta;
        (loss, e)
    }

    /// Element `j` of the loss's gradient (`softmax − one-hot`) for class
    /// `label`, and its error bound.
    pub fn grad(&self, j: usize, label: usize) -> (f64, f64) {
        let (p, e) = self.prob(j);
        let g = p - if j == label { 1.0 } else { 0.0 };
        (g, e + U * g.abs())
    }
}

/// One row of a layer normalisation (see [`crate::norm`]) and the bounds
/// of what the forward pass computes from it.
///
/// The model follows the two-pass computation in f32 (any summation
/// order): `μ̂` is off by `Δμ = dot(C, Σ|x|)/C + u·|μ| + η`; the centred
/// squares, their sum and the division give
/// `Δσ² = (γ_{C+3} + C·2⁻⁵³)·(σ² + Δμ²) + Δμ² + (C + 3)·η` (the cross term of
/// `Σ(d − Δμ)²` vanishes, as `Σd = 0`); `+ ε`, `√` and the reciprocal give
/// `rstd` a relative error `ρ = ½·(Δσ² + u·(σ² + ε))/(σ² + ε) + 2u`; then
/// `x̂ᵢ = (xᵢ − μ̂)·rstd` is off by `(Δμ + u|dᵢ|)·r + |dᵢ|·r·(ρ + u)` and
/// `yᵢ = x̂ᵢγᵢ + βᵢ` adds two roundings. A one-pass variance
/// (`E[x²] − μ²`) does not meet this bound for rows with a large mean.
#[derive(Clone, Debug)]
pub struct LayerNormRow {
    /// The exact mean.
    pub mean: f64,
    /// The exact `1/√(σ² + ε)`.
    pub rstd: f64,
    /// `Δμ`.
    pub mean_err: f64,
    /// `rstd·ρ`.
    pub rstd_err: f64,
    d: Vec<f64>,
    rho: f64,
}

impl LayerNormRow {
    /// The statistics of the exact row `x` with `eps`.
    pub fn new(x: &[f64], eps: f64) -> Self {
        let c = x.len().max(1);
        let n = c as f64;
        let mean = x.iter().sum::<f64>() / n;
        let mass: f64 = x.iter().map(|v| v.abs()).sum();
        let mean_err = dot(c, mass) / n + U * mean.abs() + ETA_F32;
        let d: Vec<f64> = x.iter().map(|v| v - mean).collect();
        let var = d.iter().map(|v| v * v).sum::<f64>() / n;
        let dm2 = mean_err * mean_err;
        let var_err = (gamma(c + 3, U) + n * U_ORACLE) * (var + dm2) + dm2 + (n + 3.0) * ETA_F32;
        let v = var + eps;
        let rho = 0.5 * (var_err + U * v) / v + 2.0 * U;
        let rstd = 1.0 / v.sqrt();
        LayerNormRow {
            mean,
            rstd,
            mean_err,
            rstd_err: rstd * rho * 1.01,
            d,
            rho,
        }
    }

    /// `x̂ᵢ` exactly, and its error bound.
    pub fn xhat(&self, i: usize) -> (f64, f64) {
        let (d, r) = (self.d[i], self.rstd);
        let e = (self.mean_err + U * d.abs()) * r + d.abs() * r * (self.rho + U);
        (d * r, e * 1.01 + ETA_F32)
    }

    /// `yᵢ = x̂ᵢ·γᵢ + βᵢ` exactly, and its error bound.
    pub fn y(&self, i: usize, gamma: f64, beta: f64) -> (f64, f64) {
        let (xh, e) = self.xhat(i);
        let scaled = xh * gamma;
        let y = scaled + beta;
        let err =
            gamma.abs() * e + U * scaled.abs() + U * (scaled.abs() + beta.abs()) + 2.0 * ETA_F32;
        (y, err)
    }
}

/// One row of a layer normalisation's backward pass, from the `mean` and
/// `rstd` it is given (taken as exact: the contract is the gradient formula
/// at those statistics), with the bounds of `dx` and of the row's terms of
/// `dγ`, `dβ`.
///
/// With `d̂ᵢ = xᵢ − μ` (one rounding), `x̂ᵢ = d̂ᵢ·r` (off by `2u|x̂ᵢ|`),
/// `gᵢ = dyᵢγᵢ`, `A = Σg/C`, `B = Σ g x̂/C` (sums within [`dot`]), and
/// `dxᵢ = r·(gᵢ − A − x̂ᵢ·B)`: the error of each term, carried through, plus
/// three roundings of the bracket and one of the product.
#[derive(Clone, Debug)]
pub struct LayerNormBackwardRow {
    /// `dxᵢ` exactly, and its error bound.
    pub dx: Vec<(f64, f64)>,
    /// `dyᵢ·x̂ᵢ` (the row's term of `dγᵢ`) exactly, `|dyᵢ·x̂ᵢ|`, and the
    /// error `x̂ᵢ`'s rounding brings to it.
    pub dgamma_terms: Vec<(f64, f64, f64)>,
}

impl LayerNormBackwardRow {
    /// The row `x` with its `gamma`, `dy` and the given statistics.
    pub fn new(x: &[f64], gamma: &[f64], dy: &[f64], mean: f64, rstd: f64) -> Self {
        let c = x.len().max(1);
        let n = c as f64;
        let xhat: Vec<f64> = x.iter().map(|v| (v - mean) * rstd).collect();
        let xhat_err: Vec<f64> = xhat.iter().map(|v| 2.0 * U * v.abs() + ETA_F32).collect();
        let g: Vec<f64> = dy.iter().zip(gamma).map(|(d, w)| d * w).collect();
        let g_mass: f64 = g.iter().map(|v| v.abs()).sum();
        let a = g.iter().sum::<f64>() / n;
        let a_err = (dot(c, g_mass) + U * g_mass) / n + U * a.abs() + ETA_F32;
        let t: Vec<f64> = g.iter().zip(&xhat).map(|(g, h)| g * h).collect();
        let t_mass: f64 = t.iter().map(|v| v.abs()).sum();
        let t_err: f64 = g.iter().zip(&xhat_err).map(|(g, e)| g.abs() * e).sum();
        let bm = t.iter().sum::<f64>() / n;
        let bm_err = (dot(c, t_mass) + 2.0 * U * t_mass + t_err) / n + U * bm.abs() + ETA_F32;
        let dx = (0..x.len())
            .map(|i| {
                let inner = g[i] - a - xhat[i] * bm;
                let e = U * g[i].abs()
                    + a_err
                    + xhat_err[i] * bm.abs()
                    + xhat[i].abs() * bm_err
                    + 3.0 * U * (g[i].abs() + a.abs() + (xhat[i] * bm).abs());
                let v = rstd * inner;
                (
                    v,
                    (rstd * e * (1.0 + U) + U * v.abs()) * 1.01 + 2.0 * ETA_F32,
                )
            })
            .collect();
        let dgamma_terms = dy
            .iter()
            .zip(&xhat)
            .zip(&xhat_err)
            .map(|((d, h), e)| (d * h, (d * h).abs(), d.abs() * e))
            .collect();
        LayerNormBackwardRow { dx, dgamma_terms }
    }
}

/// Whether optimiser state computed as `x ± err` may be stored as zero
/// ([`crate::flush_state`]): its f32 value may fall below 2⁻¹²⁶.
fn may_flush(x: f64, err: f64) -> bool {
    x.abs() - err < f64::from(f32::MIN_POSITIVE)
}

/// One element of an SGD step, exactly and with its error bound.
///
/// `g ← grad + wd·p`; without momentum `p ← p − lr·g`; with it
/// `v ← μ·v + g` and `p ← p − lr·v` (Nesterov: `p ← p − lr·(g + μ·v)`).
/// Returns `(p, p_err, v, v_err)` (`v` = 0 without momentum). A velocity
/// that may round below 2⁻¹²⁶ may be stored as zero ([`crate::flush_state`])
/// and used so: its bound, and the parameter's, allow that.
pub fn sgd(
    p: f64,
    grad: f64,
    v: f64,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) -> [f64; 4] {
    // Each rounding also adds at most η where its result is subnormal.
    let gi = grad + weight_decay * p;
    let ge = (grad.abs() + (weight_decay * p).abs()) * 2.0 * U + 2.0 * ETA_F32;
    if momentum == 0.0 {
        let d = lr * gi;
        return [
            p - d,
            4.0 * U * (p.abs() + d.abs()) + lr * ge + 2.0 * ETA_F32,
            0.0,
            0.0,
        ];
    }
    let vi = momentum * v + gi;
    let mut ve = 3.0 * U * ((momentum * v).abs() + gi.abs()) + ge + 2.0 * ETA_F32;
    if may_flush(vi, ve) {
        ve += vi.abs();
    }
    let (d, de) = if nesterov {
        (
            gi + momentum * vi,
            ge + momentum * ve + 3.0 * U * (gi.abs() + (momentum * vi).abs()),
        )
    } else {
        (vi, ve)
    };
    [
        p - lr * d,
        4.0 * U * (p.abs() + (lr * d).abs()) + lr * de + 4.0 * ETA_F32,
        vi,
        ve,
    ]
}

/// The hyper-parameters of one Adam step, as f64, for [`adam`].
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    /// Learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε, added to the uncorrected `√v` (Keras' form).
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Decoupled (AdamW) rather than L2 weight decay.
    pub decoupled: bool,
    /// The step number, from 1.
    pub step: u64,
}

/// One element of an Adam step, exactly and with its error bounds, in the
/// formulation of [`Backend::adam_update`](crate::Backend::adam_update):
/// returns `[p, p_err, m, m_err, v, v_err]`. A moment that may round below
/// 2⁻¹²⁶ may be stored as zero ([`crate::flush_state`]) and used so: its
/// bound, and the parameter's, allow that.
pub fn adam(p: f64, grad: f64, m: f64, v: f64, h: &AdamHyper) -> [f64; 6] {
    let t = h.step as i32;
    let lr_t = h.lr * (1.0 - h.beta2.powi(t)).sqrt() / (1.0 - h.beta1.powi(t));
    let pd = if h.decoupled {
        p - h.lr * h.weight_decay * p
    } else {
        p
    };
    let gi = grad
        + if h.decoupled {
            0.0
        } else {
            h.weight_decay * pd
        };
    let mi = h.beta1 * m + (1.0 - h.beta1) * gi;
    let vi = h.beta2 * v + (1.0 - h.beta2) * gi * gi;
    let upd = lr_t * mi / (vi.sqrt() + h.eps);
    // Each moment: 3 roundings of its terms (β's themselves are f32 values),
    // each adding at most η more where its result is subnormal.
    let me =
        4.0 * U * ((h.beta1 * m).abs() + ((1.0 - h.beta1) * gi).abs() + gi.abs()) + 4.0 * ETA_F32;
    let ve = 4.0 * U * ((h.beta2 * v).abs() + ((1.0 - h.beta2) * gi * gi).abs()) + 4.0 * ETA_F32;
    // The step: relative errors of m, √v and the ops, plus lr_t's f32 rounding.
    let rel = me / mi.abs().max(f64::MIN_POSITIVE) + 0.5 * ve / vi.max(f64::MIN_POSITIVE) + 8.0 * U;
    let mut pe = 4.0 * U * (p.abs() + pd.abs())
        + upd.abs() * rel.min(1.0)
        + lr_t * me / (vi.sqrt() + h.eps)
        + 8.0 * ETA_F32;
    let (flush_m, flush_v) = (may_flush(mi, me), may_flush(vi, ve));
    if flush_m {
        // m stored as zero: no step at all.
        pe += upd.abs();
    }
    if flush_v {
        // v stored as zero: the step divides by ε alone.
        pe += (lr_t * mi / h.eps - upd).abs();
    }
    let me = if flush_m { me + mi.abs() } else { me };
    let ve = if flush_v { ve + vi } else { ve };
    [pd - upd, pe, mi, me, vi, ve]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_half_the_f32_subnormal_spacing() {
        assert_eq!(ETA_F32, f64::from(f32::from_bits(1)) / 2.0);
    }

    #[test]
    fn gamma_grows_with_n_and_saturates() {
        assert_eq!(gamma(0, U), 0.0);
        assert!((gamma(1, U) - U).abs() < U * U * 2.0);
        assert!(gamma(1000, U) > 1000.0 * U);
        assert_eq!(gamma(1 << 24, U), f64::INFINITY);
    }

    #[test]
    fn transcendental_budgets_are_the_stated_ones() {
        assert_eq!(unary(UnaryOp::Exp, DType::F32, 1.0), Bound::Ulps(2));
        assert_eq!(unary(UnaryOp::Sigmoid, DType::F32, 1.0), Bound::Ulps(4));
        assert_eq!(unary(UnaryOp::Tanh, DType::BF16, 1.0), Bound::Ulps(1));
        assert_eq!(unary(UnaryOp::Relu, DType::F16, 1.0), Bound::Exact);
        assert_eq!(
            unary(UnaryOp::Sqrt, DType::F32, 1.0),
            Bound::CorrectlyRounded
        );
        // GELU near 1 is within a few ulps; near −10 the bound widens.
        let Bound::Abs(e) = unary(UnaryOp::Gelu, DType::F32, 1.0) else {
            panic!("GELU's bound is absolute")
        };
        assert!(e < 20.0 * U);
        let Bound::Abs(far) = gelu(-10.0) else {
            panic!("GELU's bound is absolute")
        };
        let y = UnaryOp::Gelu.eval_f64(-10.0).abs();
        assert!(
            far > 100.0 * U * y && far < 1000.0 * U * y + 1e-43,
            "{far:e} {y:e}"
        );
    }

    #[test]
    fn sums_that_may_overflow_admit_infinities() {
        assert!(matches!(
            Bound::summed(1.0, 1e39, 4),
            Bound::Overflowing { .. }
        ));
        assert_eq!(Bound::summed(1e-6, 3.0, 4), Bound::Abs(1e-6));
    }

    #[test]
    fn softmax_row_is_a_distribution_with_small_bounds() {
        let row = [1.0, 2.0, 3.0];
        let r = SoftmaxRow::new(&row);
        let total: f64 = (0..3).map(|i| r.prob(i).0).sum();
        assert!((total - 1.0).abs() < 1e-15);
        for i in 0..3 {
            assert!(r.prob(i).1 < 1e-5 && r.log_prob(i).1 < 1e-5);
        }
        let (loss, _) = r.loss(2);
        assert!((loss + r.log_prob(2).0).abs() < 1e-15);
    }
}

/// The extents of one causal attention problem: `T` queries, `S ≥ T` keys
/// and values, head width `D`, and the scale of the scores.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    /// Queries `T`.
    pub queries: usize,
    /// Keys and values `S` (query `i` sees `0..=i + S − T`).
    pub keys: usize,
    /// Head width `D`.
    pub dim: usize,
    /// The scores' scale.
    pub scale: f64,
    /// Dropout on the probabilities, if any, and the index in its stream
    /// of this problem's first weight (`b·T·S` for problem `b` of a batch).
    pub dropout: Option<(crate::AttentionDropout, u64)>,
}

impl AttentionDims {
    /// The dropout factor of weight `(i, j)` (1 without dropout).
    fn factor(&self, i: usize, j: usize) -> f64 {
        self.dropout.map_or(1.0, |(d, first)| {
            f64::from(d.factor(first + (i * self.keys + j) as u64))
        })
    }
}

/// One problem's causal probabilities: per query row, the visible keys'
/// `(Pᵢⱼ, bound)`.
///
/// The scores `sⱼ = scale·Σₚ qₚkⱼₚ` are computed in f32 (a dot product and
/// one scaling), off by `Eⱼ = |scale|·dot(D + 1, Σₚ|qₚkⱼₚ|)`; a softmax of
/// scores each off by at most `E = maxⱼ Eⱼ` moves by at most
/// `Pⱼ·(e^{2E} − 1)`, on top of [`SoftmaxRow`]'s bound for the exact scores.
fn attention_probabilities(q: &[f64], k: &[f64], dims: AttentionDims) -> Vec<Vec<(f64, f64)>> {
    let AttentionDims {
        queries: t,
        keys: s,
        dim: d,
        scale,
        ..
    } = dims;
    (0..t)
        .map(|i| {
            let seen = i + s - t + 1;
            let qi = &q[i * d..(i + 1) * d];
            let (scores, errs): (Vec<f64>, Vec<f64>) = (0..seen)
                .map(|j| {
                    let kj = &k[j * d..(j + 1) * d];
                    let dot_: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                    let mass: f64 = qi.iter().zip(kj).map(|(a, b)| (a * b).abs()).sum();
                    (scale * dot_, scale.abs() * dot(d + 1, mass))
                })
                .unzip();
            let shift = (2.0 * errs.iter().fold(0f64, |m, &e| m.max(e))).exp_m1();
            let row = SoftmaxRow::new(&scores);
            (0..seen)
                .map(|j| {
                    let (p, e) = row.prob(j);
                    (p, e + p * shift)
                })
                .collect()
        })
        .collect()
}

/// Causal attention `softmax_causal(scale·q·kᵀ)·v` of one problem —
/// `q` `[T, D]`, `k`, `v` `[S, D]` row-major, exact — as `(value, bound)`
/// per output element, row-major `[T, D]`.
///
/// The bound: the scores `sⱼ = scale·Σₚ qₚkⱼₚ`, computed in f32, are off by
/// `Eⱼ = |scale|·dot(D + 1, Σₚ|qₚkⱼₚ|)`; a softmax of scores each off by at
/// most `E = maxⱼ Eⱼ` moves by at most `Pⱼ·(e^{2E} − 1)`, on top of
/// [`SoftmaxRow`]'s bound `ΔPⱼ` for the exact scores; then
/// `yᵢₚ = Σⱼ Pᵢⱼvⱼₚ` over the `seen` visible keys in f32:
/// `Σⱼ ΔPᵢⱼ·|vⱼₚ| + dot(seen + 1, Σⱼ Pᵢⱼ|vⱼₚ|)` (one more rounding for a
/// normalisation after the sum). With dropout, `Pᵢⱼ` is the dropped
/// `P̃ᵢⱼ = Pᵢⱼ·Mᵢⱼ` (`M` 0 or `1/(1 − rate)`), one more rounding:
/// `ΔP̃ = M·ΔP + u·P̃`.
///
/// ```
/// use kiln_core::bounds::{attention, AttentionDims};
///
/// // One query, one key: the value itself.
/// let dims = AttentionDims { queries: 1, keys: 1, dim: 2, scale: 0.5, dropout: None };
/// let y = attention(&[1.0, 2.0], &[3.0, 4.0], &[5.0, -6.0], dims);
/// assert_eq!(y[0].0, 5.0);
/// // Within a few hundred f32 roundings of the value.
/// assert!(y[1].1 > 0.0 && y[1].1 < 300.0 * 6.0 * kiln_core::bounds::U);
/// ```
pub fn attention(q: &[f64], k: &[f64], v: &[f64], dims: AttentionDims) -> Vec<(f64, f64)> {
    let d = dims.dim;
    let probs = dropped(attention_probabilities(q, k, dims), dims);
    let mut out = Vec::with_capacity(dims.queries * d);
    for row in &probs {
        for p in 0..d {
            let (mut y, mut err, mut mass) = (0.0, 0.0, 0.0);
            for (j, &(pj, ej)) in row.iter().enumerate() {
                let vj = v[j * d + p];
                y += pj * vj;
                err += ej * vj.abs();
                mass += pj * vj.abs();
            }
            out.push((y, err + dot(row.len() + 1, mass)));
        }
    }
    out
}

/// The probabilities after dropout, `(P·M, M·ΔP + u·P·M)` (unchanged
/// without dropout).
fn dropped(probs: Vec<Vec<(f64, f64)>>, dims: AttentionDims) -> Vec<Vec<(f64, f64)>> {
    if dims.dropout.is_none() {
        return probs;
    }
    probs
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            row.into_iter()
                .enumerate()
                .map(|(j, (p, e))| {
                    let m = dims.factor(i, j);
                    (p * m, m * e + U * p * m)
                })
                .collect()
        })
        .collect()
}

/// The gradients of [`attention`] with respect to `q`, `k` and `v` given
/// `dy` (`[T, D]`), each as `(value, bound)` row-major.
///
/// The model follows the backward pass in f32 from recomputed
/// probabilities (bounds `ΔP` as in [`attention`]): `dPᵢⱼ = Σₚ dyᵢₚvⱼₚ`
/// within `dot(D, ·)`; `δᵢ = Σⱼ PᵢⱼdPᵢⱼ` within
/// `Σⱼ(ΔPᵢⱼ|dPᵢⱼ| + PᵢⱼΔdPᵢⱼ) + dot(seen, Σⱼ Pᵢⱼ|dPᵢⱼ|)`;
/// `dSᵢⱼ = Pᵢⱼ(dPᵢⱼ − δᵢ)` within
/// `ΔPᵢⱼ|dPᵢⱼ − δᵢ| + Pᵢⱼ(ΔdPᵢⱼ + Δδᵢ) + 2u·Pᵢⱼ(|dPᵢⱼ| + |δᵢ|)`; then
/// `dq = scale·dS·k`, `dk = scale·dSᵀ·q` and `dv = Pᵀ·dy` are sums whose
/// terms carry those errors: `Σ Δterm + dot(n + 1, Σ|term|)`. With
/// dropout, `dPᵢⱼ` is `(dy·vᵀ)ᵢⱼ·Mᵢⱼ` (one more rounding) and `dv` sums the
/// dropped `P̃ = P∘M` as [`attention`] bounds them; `δ` and `dS` use `P`.
pub fn attention_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dy: &[f64],
    dims: AttentionDims,
) -> [Vec<(f64, f64)>; 3] {
    let AttentionDims {
        queries: t,
        keys: s,
        dim: d,
        scale,
        ..
    } = dims;
    let probs = attention_probabilities(q, k, dims);
    // dS per query row, with bounds.
    let ds: Vec<Vec<(f64, f64)>> = probs
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let dyi = &dy[i * d..(i + 1) * d];
            let dp: Vec<(f64, f64)> = (0..row.len())
                .map(|j| {
                    let vj = &v[j * d..(j + 1) * d];
                    let val: f64 = dyi.iter().zip(vj).map(|(a, b)| a * b).sum();
                    let mass: f64 = dyi.iter().zip(vj).map(|(a, b)| (a * b).abs()).sum();
                    let m = dims.factor(i, j);
                    let err = if dims.dropout.is_some() {
                        m * dot(d, mass) + U * m * val.abs()
                    } else {
                        dot(d, mass)
                    };
                    (val * m, err)
                })
                .collect();
            let (mut delta, mut e_delta, mut mass) = (0.0, 0.0, 0.0);
            for (&(p, ep), &(g, eg)) in row.iter().zip(&dp) {
                delta += p * g;
                e_delta += ep * g.abs() + p * eg;
                mass += p * g.abs();
            }
            e_delta += dot(row.len(), mass);
            row.iter()
                .zip(&dp)
                .map(|(&(p, ep), &(g, eg))| {
                    let c = g - delta;
                    let e =
                        ep * c.abs() + p * (eg + e_delta) + 2.0 * U * p * (g.abs() + delta.abs());
                    (p * c, e)
                })
                .collect()
        })
        .collect();
    // Σ over terms (value, error, magnitude) → (value, bound).
    let total = |terms: &mut dyn Iterator<Item = (f64, f64, f64)>, factor: f64| {
        let (mut val, mut err, mut mass, mut n) = (0.0, 0.0, 0.0, 0usize);
        for (x, e, m) in terms {
            val += x;
            err += e;
            mass += m;
            n += 1;
        }
        (factor * val, factor.abs() * (err + dot(n + 1, mass)))
    };
    let mut dq = Vec::with_capacity(t * d);
    for row in &ds {
        for p in 0..d {
            let mut terms = row.iter().enumerate().map(|(j, &(g, e))| {
                let kj = k[j * d + p];
                (g * kj, e * kj.abs(), (g * kj).abs())
            });
            dq.push(total(&mut terms, scale));
        }
    }
    let kept = dropped(probs, dims);
    let (mut dk, mut dv) = (Vec::with_capacity(s * d), Vec::with_capacity(s * d));
    for j in 0..s {
        // The queries that see key j.
        let first = j.saturating_sub(s - t);
        for p in 0..d {
            let mut terms = (first..t).map(|i| {
                let (g, e) = ds[i][j];
                let qi = q[i * d + p];
                (g * qi, e * qi.abs(), (g * qi).abs())
            });
            dk.push(total(&mut terms, scale));
            let mut terms = (first..t).map(|i| {
                let (pij, e) = kept[i][j];
                let g = dy[i * d + p];
                (pij * g, e * g.abs(), (pij * g).abs())
            });
            dv.push(total(&mut terms, 1.0));
        }
    }
    [dq, dk, dv]
}
