//! # kiln-nn
//!
//! Neural-network building blocks over any [`kiln_core::Backend`]: layers
//! ([`layers`]), a serialisable model description ([`spec::ModelSpec`]),
//! initialisers, losses, optimisers with Keras defaults, and
//! [`Sequential`] with a Keras-style [`Sequential::summary`].

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
pub use optim::{Adam, AdamForm, Optimizer, OptimizerState, Sgd};
pub use precision::Precision;
pub use residual::Residual;
pub use schedule::{clip_grad_norm, LrSchedule};
pub use sequential::Sequential;
pub use spec::{
    memory_limit, ActivationSpec, LayerSpec, MemoryPlan, ModelSpec, Padding, Pair, MAX_PARAMS,
};
