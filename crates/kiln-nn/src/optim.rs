//! Optimisers: fused per-parameter updates through the backend.
//!
//! State is kept per parameter *position* (the order of
//! [`crate::Sequential::params`]), so it can be saved and restored with the
//! weights.

use kiln_core::{
    AdamStep, Backend, BackendStorage, Error, GradStore, HostData, Layout, Number, Result, SgdStep,
    Shape, Tensor, Var, View,
};

/// An optimiser's state in host memory, for checkpoints: what it is, its
/// step count and learning rate, and its per-parameter slots.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// `adam`, `adamw` or `sgd` — a checkpoint resumes only with the same kind.
    pub kind: String,
    /// Steps taken.
    pub step: u64,
    /// The learning rate.
    pub lr: f32,
    /// Slot tensors: slot name (`m`, `v`, `velocity`), parameter position,
    /// contents (contiguous, the parameter's element count).
    pub slots: Vec<(String, usize, HostData)>,
}

/// Downloads a whole contiguous storage of `numel` elements.
fn to_host<B: Backend>(backend: &B, s: &B::Storage, numel: usize) -> Result<HostData> {
    backend.download(View::new(s, &Layout::contiguous(Shape::new(&[numel])?)))
}

/// The slot `name` of parameter `pos` in `state`, checked against it.
fn slot<B: Backend>(
    state: &OptimizerState,
    name: &str,
    pos: usize,
    p: &Var<B>,
) -> Result<Option<B::Storage>> {
    let Some((_, _, data)) = state.slots.iter().find(|(n, i, _)| n == name && *i == pos) else {
        return Ok(None);
    };
    if data.len() != p.numel() || data.dtype() != p.dtype() {
        return Err(Error::invalid(format!(
            "optimizer state `{name}` of parameter {pos} has {} {} elements, the parameter {} {}",
            data.len(),
            data.dtype(),
            p.numel(),
            p.dtype()
        )));
    }
    p.backend().upload(data).map(Some)
}

/// Checks that `state` is of `kind` and names only existing parameters.
fn check_state(state: &OptimizerState, kind: &str, params: usize) -> Result<()> {
    check_steps(state.step)?;
    if state.kind != kind {
        return Err(Error::invalid(format!(
            "the checkpoint's optimizer is {}, this run's is {kind}",
            state.kind
        )));
    }
    if let Some((n, i, _)) = state.slots.iter().find(|(_, i, _)| *i >= params) {
        return Err(Error::invalid(format!(
            "optimizer state `{n}` names parameter {i}; the model has {params}"
        )));
    }
    Ok(())
}

/// Updates parameters from their gradients.
pub trait Optimizer<B: Backend>: Send {
    /// The state to checkpoint, downloaded through `backend`.
    fn state(&self, backend: &B) -> Result<OptimizerState>;
    /// Restores a state saved by [`Optimizer::state`] for `params` (the
    /// model's parameters, in order): same kind, shapes checked.
    fn load_state(&mut self, state: &OptimizerState, params: &[&Var<B>]) -> Result<()>;
    /// Applies one step. Parameters without a gradient are left alone.
    fn step(&mut self, params: &mut [&mut Var<B>], grads: &GradStore<B>) -> Result<()>;
    /// The learning rate.
    fn lr(&self) -> f32;
    /// Changes the learning rate (schedules).
    fn set_lr(&mut self, lr: f32);
    /// A short description (`adam(lr=0.001, β₁=0.9, β₂=0.999, ε=1e-7)`),
    /// its numbers written by [`kiln_core::Number`].
    fn describe(&self) -> String;
}

/// Checks a learning rate: finite and above 0. Every optimiser's
/// constructor and the bindings' `fit` use this one rule and message.
///
/// ```
/// assert!(kiln_nn::optim::check_lr(1e-3).is_ok());
/// let e = kiln_nn::optim::check_lr(f32::NAN).unwrap_err().to_string();
/// assert!(e.contains("learning rate NaN"), "{e}");
/// ```
pub fn check_lr(lr: f32) -> Result<()> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "learning rate {}: expected a finite rate above 0 (1e-3 is usual)",
            Number(lr)
        )))
    }
}

/// Checks a decoupled weight decay `wd` at learning rate `lr`: finite, at
/// least 0, and with `lr·wd` below 1 (each step scales the weights by
/// `1 − lr·wd`: at 1 or more it would zero them or flip their signs).
///
/// ```
/// assert!(kiln_nn::optim::check_weight_decay(1e-3, 0.1).is_ok());
/// let e = kiln_nn::optim::check_weight_decay(1e-3, 1e9).unwrap_err().to_string();
/// assert!(e.contains("weight decay 1e9"), "{e}");
/// ```
pub fn check_weight_decay(lr: f32, wd: f32) -> Result<()> {
    if !(wd.is_finite() && wd >= 0.0) {
        return Err(Error::invalid(format!(
            "weight decay {}: expected a finite decay of 0 or more (0.1 is usual for AdamW)",
            Number(wd)
        )));
    }
    // In f32, as the update computes it (a product just under 1 in f64
    // can round to 1).
    if lr * wd >= 1.0 {
        return Err(Error::invalid(format!(
            "weight decay {} at learning rate {}: each step scales the weights by 1 − lr·wd, \
             which must stay above 0 (0.1 is usual for AdamW)",
            Number(wd),
            Number(lr)
        )));
    }
    Ok(())
}

/// The most optimiser steps a state may record: 2⁵³, beyond which a count
/// is not exact in f64 — a checkpoint that claims more is corrupt.
pub const MAX_STEPS: u64 = 1 << 53;

/// Checks an optimiser step count read from a checkpoint against
/// [`MAX_STEPS`] (the checkpoints' own checks and the optimisers' share
/// this rule and message).
///
/// ```
/// assert!(kiln_nn::optim::check_steps(40).is_ok());
/// let e = kiln_nn::optim::check_steps(u64::MAX).unwrap_err().to_string();
/// assert!(e.contains("optimizer step 18446744073709551615 is past 2⁵³"), "{e}");
/// ```
pub fn check_steps(step: u64) -> Result<()> {
    if step > MAX_STEPS {
        return Err(Error::invalid(format!(
            "optimizer step {step} is past 2⁵³, more than any run takes: the checkpoint is corrupt"
        )));
    }
    Ok(())
}

/// The gradient of `p`, if any, checked against its shape and made dense.
fn grad_of<B: Backend>(p: &Var<B>, grads: &GradStore<B>) -> Result<Option<Tensor<B>>> {
    let Some(g) = grads.get_id(p.id()) else {
        return Ok(None);
    };
    if g.shape() != p.shape() {
        return Err(Error::shape(
            "optimizer",
            format!("gradient {} for parameter {}", g.shape(), p.shape()),
        ));
    }
    g.dense().map(Some)
}

/// Stochastic gradient descent with optional (Nesterov) momentum and L2 decay.
#[derive(Debug)]
pub struct Sgd<B: Backend> {
    hyper: SgdStep,
    velocity: Vec<Option<B::Storage>>,
}

impl<B: Backend> Sgd<B> {
    /// SGD with learning rate `lr` and momentum `momentum` (Keras default: 0.01, 0).
    pub fn new(lr: f32, momentum: f32) -> Result<Self> {
        check_lr(lr)?;
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::invalid(format!(
                "momentum must be in [0, 1), got {momentum}"
            )));
        }
        Ok(Sgd {
            hyper: SgdStep {
                lr,
                momentum,
                weight_decay: 0.0,
                nesterov: false,
            },
            velocity: Vec::new(),
        })
    }

    /// Uses Nesterov momentum.
    pub fn nesterov(mut self, on: bool) -> Self {
        self.hyper.nesterov = on;
        self
    }
}

impl<B: Backend> Optimizer<B> for Sgd<B> {
    fn state(&self, backend: &B) -> Result<OptimizerState> {
        let mut slots = Vec::new();
        for (i, v) in self.velocity.iter().enumerate() {
            if let Some(v) = v {
                slots.push(("velocity".into(), i, to_host(backend, v, v.len())?));
            }
        }
        Ok(OptimizerState {
            kind: "sgd".into(),
            step: 0,
            lr: self.hyper.lr,
            slots,
        })
    }
    fn load_state(&mut self, state: &OptimizerState, params: &[&Var<B>]) -> Result<()> {
        check_state(state, "sgd", params.len())?;
        self.velocity = params
            .iter()
            .enumerate()
            .map(|(i, p)| slot(state, "velocity", i, p))
            .collect::<Result<_>>()?;
        self.hyper.lr = state.lr;
        Ok(())
    }
    fn step(&mut self, params: &mut [&mut Var<B>], grads: &GradStore<B>) -> Result<()> {
        self.velocity.resize_with(params.len(), || None);
        for (p, vel) in params.iter_mut().zip(&mut self.velocity) {
            let Some(g) = grad_of(p, grads)? else {
                continue;
            };
            let backend = p.backend().clone();
            if self.hyper.momentum != 0.0 && vel.is_none() {
                *vel = Some(backend.full(p.numel(), p.dtype(), 0.0)?);
            }
            backend.sgd_update(p.storage_mut(), g.storage(), vel.as_mut(), &self.hyper)?;
        }
        Ok(())
    }
    fn lr(&self) -> f32 {
        self.hyper.lr
    }
    fn set_lr(&mut self, lr: f32) {
        self.hyper.lr = lr;
    }
    fn describe(&self) -> String {
        format!(
            "sgd(lr={}, momentum={}{})",
            Number(self.hyper.lr),
            Number(self.hyper.momentum),
            if self.hyper.nesterov {
                ", nesterov"
            } else {
                ""
            }
        )
    }
}

/// Where Adam adds ε: the two formulations in use differ by orders of
/// magnitude for gradients near ε, so a model trains as its reference
/// framework does only in that framework's form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdamForm {
    /// Keras/TensorFlow: `p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε)`, ε added
    /// to the uncorrected √v. The seed's Keras MLP and CNN use it.
    #[default]
    Keras,
    /// PyTorch: `p ← p − lr/(1−β₁ᵗ) · m/(√v̂ + ε)` with `v̂ = v/(1−β₂ᵗ)`, ε
    /// added to the bias-corrected √v̂. The GPT uses it (as nanoGPT). The
    /// same fused kernel runs it, with `ε·√(1−β₂ᵗ)` in place of ε (an
    /// identity, computed in f64 and rounded once per step).
    PyTorch,
}

/// Adam (and AdamW with decoupled weight decay): Keras formulation and
/// defaults unless [`Adam::with_form`] says otherwise, weight decay on every
/// parameter unless [`Adam::with_decay_mask`] exempts some.
#[derive(Debug)]
pub struct Adam<B: Backend> {
    hyper: AdamStep,
    form: AdamForm,
    decay_mask: Option<Vec<bool>>,
    moments: Vec<Option<(B::Storage, B::Storage)>>,
}

impl<B: Backend> Adam<B> {
    /// Adam with Keras defaults (β₁ 0.9, β₂ 0.999, ε 1e-7) and learning rate `lr`.
    pub fn new(lr: f32) -> Result<Self> {
        check_lr(lr)?;
        Ok(Adam {
            hyper: AdamStep {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-7,
                weight_decay: 0.0,
                decoupled: false,
                step: 0,
            },
            form: AdamForm::Keras,
            decay_mask: None,
            moments: Vec::new(),
        })
    }

    /// PyTorch's `torch.optim.AdamW`: decoupled decay `wd`, β₁ 0.9, β₂
    /// 0.999, ε 1e-8, in [`AdamForm::PyTorch`] (change the betas with
    /// [`Adam::with_betas`]).
    ///
    /// ```
    /// use kiln_nn::{Adam, Optimizer};
    /// let opt = Adam::<kiln_cpu::CpuBackend>::pytorch_adamw(1e-3, 0.1)?
    ///     .with_betas(0.9, 0.99, 1e-8)?
    ///     .with_decay_mask(vec![true, false]);
    /// assert_eq!(opt.describe(), "adamw_torch(lr=0.001, β₁=0.9, β₂=0.99, ε=1e-8, wd=0.1)");
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn pytorch_adamw(lr: f32, wd: f32) -> Result<Self> {
        check_weight_decay(lr, wd)?;
        let mut a = Self::new(lr)?.with_betas(0.9, 0.999, 1e-8)?;
        a.hyper.weight_decay = wd;
        a.hyper.decoupled = true;
        a.form = AdamForm::PyTorch;
        Ok(a)
    }

    /// Chooses where ε goes ([`AdamForm`]).
    pub fn with_form(mut self, form: AdamForm) -> Self {
        self.form = form;
        self
    }

    /// Which parameters (by position) weight decay applies to; the others
    /// (biases, norms, embeddings, by the usual rule) are not decayed.
    pub fn with_decay_mask(mut self, mask: Vec<bool>) -> Self {
        self.decay_mask = Some(mask);
        self
    }

    /// AdamW: decoupled weight decay `wd` (Keras default 0.004).
    pub fn adamw(lr: f32, wd: f32) -> Result<Self> {
        check_weight_decay(lr, wd)?;
        let mut a = Self::new(lr)?;
        a.hyper.weight_decay = wd;
        a.hyper.decoupled = true;
        Ok(a)
    }

    /// Sets β₁, β₂ and ε.
    pub fn with_betas(mut self, beta1: f32, beta2: f32, eps: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&beta1)
            || !(0.0..1.0).contains(&beta2)
            || eps.is_nan()
            || eps <= 0.0
        {
            return Err(Error::invalid(format!(
                "Adam needs 0 ≤ β₁, β₂ < 1 and ε > 0, got {beta1}, {beta2}, {eps}"
            )));
        }
        self.hyper.beta1 = beta1;
        self.hyper.beta2 = beta2;
        self.hyper.eps = eps;
        Ok(self)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.hyper.step
    }

    /// What shapes each update besides the learning rate and the step.
    ///
    /// ```
    /// use kiln_nn::Adam;
    /// let opt = Adam::<kiln_cpu::CpuBackend>::pytorch_adamw(1e-3, 0.1)?.with_betas(0.9, 0.99, 1e-8)?;
    /// let s = opt.settings();
    /// assert_eq!((s.beta2, s.weight_decay, s.decoupled), (0.99, 0.1, true));
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn settings(&self) -> AdamSettings {
        AdamSettings {
            beta1: self.hyper.beta1,
            beta2: self.hyper.beta2,
            eps: self.hyper.eps,
            weight_decay: self.hyper.weight_decay,
            decoupled: self.hyper.decoupled,
            form: self.form,
        }
    }
}

/// An [`Adam`]'s settings apart from its learning rate and step count —
/// what a checkpoint records so that a resumed run updates its weights
/// exactly as the run it continues.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamSettings {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Decoupled (AdamW) rather than L2 decay.
    pub decoupled: bool,
    /// Where ε goes.
    pub form: AdamForm,
}

impl<B: Backend> Adam<B> {
    fn kind(&self) -> &'static str {
        match (self.hyper.decoupled, self.form) {
            (true, AdamForm::Keras) => "adamw",
            (false, AdamForm::Keras) => "adam",
            (true, AdamForm::PyTorch) => "adamw_torch",
            (false, AdamForm::PyTorch) => "adam_torch",
        }
    }
}

impl<B: Backend> Optimizer<B> for Adam<B> {
    fn state(&self, backend: &B) -> Result<OptimizerState> {
        let mut slots = Vec::new();
        for (i, mv) in self.moments.iter().enumerate() {
            if let Some((m, v)) = mv {
                slots.push(("m".into(), i, to_host(backend, m, m.len())?));
                slots.push(("v".into(), i, to_host(backend, v, v.len())?));
            }
        }
        Ok(OptimizerState {
            kind: self.kind().into(),
            step: self.hyper.step,
            lr: self.hyper.lr,
            slots,
        })
    }
    fn load_state(&mut self, state: &OptimizerState, params: &[&Var<B>]) -> Result<()> {
        check_state(state, self.kind(), params.len())?;
        self.moments = params
            .iter()
            .enumerate()
            .map(|(i, p)| Ok(slot(state, "m", i, p)?.zip(slot(state, "v", i, p)?)))
            .collect::<Result<_>>()?;
        self.hyper.step = state.step;
        self.hyper.lr = state.lr;
        Ok(())
    }
    fn step(&mut self, params: &mut [&mut Var<B>], grads: &GradStore<B>) -> Result<()> {
        self.hyper.step = self
            .hyper
            .step
            .checked_add(1)
            .filter(|s| *s <= MAX_STEPS)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Adam has taken {MAX_STEPS} (2⁵³) steps, the most it counts"
                ))
            })?;
        self.moments.resize_with(params.len(), || None);
        if let Some(mask) = &self.decay_mask {
            if mask.len() != params.len() {
                return Err(Error::invalid(format!(
                    "the weight-decay mask covers {} parameters, the model has {}",
                    mask.len(),
                    params.len()
                )));
            }
        }
        let mut hyper = self.hyper;
        if self.form == AdamForm::PyTorch {
            let t = i32::try_from(hyper.step).unwrap_or(i32::MAX);
            let correction = (1.0 - f64::from(hyper.beta2).powi(t)).sqrt();
            hyper.eps = (f64::from(hyper.eps) * correction) as f32;
        }
        for (i, (p, state)) in params.iter_mut().zip(&mut self.moments).enumerate() {
            let decays = self.decay_mask.as_ref().is_none_or(|m| m[i]);
            let step = AdamStep {
                weight_decay: if decays { hyper.weight_decay } else { 0.0 },
                ..hyper
            };
            let Some(g) = grad_of(p, grads)? else {
                continue;
            };
            let backend = p.backend().clone();
            if state.is_none() {
                *state = Some((
                    backend.full(p.numel(), p.dtype(), 0.0)?,
                    backend.full(p.numel(), p.dtype(), 0.0)?,
                ));
            }
            let (m, v) = state.as_mut().expect("initialised above");
            backend.adam_update(p.storage_mut(), g.storage(), m, v, &step)?;
        }
        Ok(())
    }
    fn lr(&self) -> f32 {
        self.hyper.lr
    }
    fn set_lr(&mut self, lr: f32) {
        self.hyper.lr = lr;
    }
    fn describe(&self) -> String {
        let wd = if self.hyper.weight_decay > 0.0 {
            format!(", wd={}", Number(self.hyper.weight_decay))
        } else {
            String::new()
        };
        format!(
            "{}(lr={}, β₁={}, β₂={}, ε={}{wd})",
            self.kind(),
            Number(self.hyper.lr),
            Number(self.hyper.beta1),
            Number(self.hyper.beta2),
            Number(self.hyper.eps)
        )
    }
}
