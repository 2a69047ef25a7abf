//! # kiln-core
//!
//! The device-independent half of kiln: [`Shape`] and strided [`Layout`]s,
//! [`DType`]s, the [`Backend`] trait every device implements, [`Tensor`]
//! with zero-copy views, reverse-mode autograd ([`Tensor::backward`]),
//! trainable [`Var`]s, the shared counter-based RNG ([`rng`]), the plans that
//! validate each op once ([`plan`]), the error bound every op is held to
//! ([`bounds`]), the count of calls that took a slow path ([`slow_path`]),
//! the environment settings read one way ([`mod@env`]), numbers written for
//! people ([`Number`]) and the one [`Error`] type.
//!
//! ```
//! use kiln_core::{Tensor, Var};
//! use kiln_cpu::CpuBackend;
//!
//! let backend = CpuBackend::reference();
//! let w = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2, 1], &backend)?)?;
//! let x = Tensor::from_slice(&[3.0, 4.0], &[1, 2], &backend)?;
//! let loss = x.matmul(&w.as_tensor())?.sum_all()?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get_id(w.id()).unwrap().to_vec_f32()?, vec![3.0, 4.0]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

pub mod attention;
pub mod autograd;
pub mod backend;
pub mod bounds;
pub mod capabilities;
pub mod conv;
pub mod dtype;
pub mod embedding;
pub mod env;
pub mod error;
pub mod files;
pub mod idle;
pub mod layout;
pub mod norm;
pub mod number;
pub mod plan;
pub mod rng;
pub mod shape;
pub mod slow_path;
pub mod tensor;
pub mod var;

pub use attention::{AttentionDropout, AttentionGrads, AttentionOptions};
pub use autograd::{is_grad_enabled, no_grad, GradStore, NoGradGuard};
pub use backend::{
    flush_state, Activation, AdamSchedule, AdamStep, Backend, BackendStorage, BinaryOp, ConvGrads,
    Distribution, GemmEpilogue, ReduceOp, ReducePlan, SgdStep, UnaryOp, View,
};
pub use capabilities::{Capabilities, SwitchPoints};
pub use conv::Window2d;
pub use dtype::{bf16_from_f64, f16_from_f64, round_to_format, DType, HostData};
pub use error::{DataError, Error, Result};
pub use idle::IdleWork;
pub use layout::Layout;
pub use norm::{LayerNormGrads, LayerNormOut};
pub use number::Number;
pub use plan::{
    AttentionPlan, CausalSoftmaxPlan, EmbeddingPlan, GemmPlan, LayerNormPlan, OptimizerPlan,
    SoftmaxCePlan,
};
pub use shape::Shape;
pub use tensor::{Tensor, TensorId};
pub use var::Var;

/// Re-exported so backends and users name the same half-precision types.
pub use half::{bf16, f16};
