//! # kiln-nn
//!
//! Neural-network building blocks over any [`kiln_core::Backend`]: layers
//! ([`layers`]), a serialisable model description ([`spec::ModelSpec`]),
//! initialisers, losses, optimisers with Keras defaults, and
//! [`Sequential`] with a Keras-style [`Sequential::summary`].
//!
//! ```
//! use kiln_core::{HostData, Tensor};
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::{ActivationSpec::{Softmax, Tanh}, Adam, Loss, ModelSpec, Optimizer};
//!
//! // XOR, learned by a model built in code and a hand-written loop.
//! let b = CpuBackend::reference();
//! let mut model = ModelSpec::new("xor", [2]).dense(8, Tanh).dense(2, Softmax).build(1, &b)?;
//! let x = Tensor::from_slice(&[0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0], &[4, 2], &b)?;
//! let y = Tensor::from_host(HostData::U32(vec![0, 1, 1, 0]), &[4], &b)?;
//! let mut adam = Adam::new(0.05)?;
//! for _ in 0..300 {
//!     // Cross-entropy wants the logits before the final softmax.
//!     let loss = Loss::CategoricalCrossEntropy.compute(&model.forward_logits(&x)?, &y)?;
//!     let grads = loss.backward()?;
//!     adam.step(&mut model.params_mut(), &grads)?;
//! }
//! assert_eq!(model.predict(&x)?.argmax()?.to_vec_u32()?, [0, 1, 1, 0]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

pub mod attention;
pub mod decode;
pub mod embedding;
pub mod gpt;
pub mod init;
pub mod layers;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod residual;
pub mod schedule;
pub mod sequential;
pub mod spec;

pub use attention::CausalSelfAttention;
pub use decode::DecodeState;
pub use embedding::{Embedding, LmHead, PositionEmbedding};
pub use gpt::GptConfig;
pub use init::Initializer;
pub use layers::{Conv2D, Dense, Dropout, Flatten, Layer, LayerNorm, MaxPool2D, Nonlinearity};
pub use loss::Loss;
pub use optim::{Adam, AdamForm, AdamSettings, Optimizer, OptimizerState, Sgd};
pub use precision::Precision;
pub use residual::Residual;
pub use schedule::{clip_grad_norm, LrSchedule};
pub use sequential::Sequential;
pub use spec::{
    memory_limit, ActivationSpec, LayerSpec, MemoryPlan, ModelSpec, Padding, Pair, MAX_PARAMS,
};
