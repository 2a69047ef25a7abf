//! # kiln-data
//!
//! Datasets for kiln: a validating [`idx`] reader (raw or gzip), named
//! [`Dataset`]s found on disk or bundled, and a [`DataLoader`] that shuffles
//! with a seed and assembles batches ahead of training (in a backend's
//! idle threads where it lends them, else on a thread of its own); character
//! [`text`] corpora (bundled Shakespeare, or any UTF-8 file) for language
//! models.
//!
//! ```
//! use kiln_data::{Dataset, Split, Targets};
//!
//! // IDX image sets by name (the MNIST sample is bundled) …
//! let mnist = Dataset::bundled_sample(Split::Test)?;
//! assert_eq!((mnist.len(), mnist.classes()), (2000, 10));
//! // … or any f32 examples with labels or regression targets.
//! let xor = Dataset::from_f32(
//!     "xor",
//!     vec![0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0],
//!     &[2],
//!     Targets::Classes { labels: vec![0, 1, 1, 0], classes: 2 },
//! )?;
//! assert_eq!(xor.example_shape(), [2]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

pub mod augment;
pub mod dataset;
pub mod idx;
pub mod loader;
mod pixels;
pub mod text;

pub use augment::{Affine, Augment};
pub use dataset::{Dataset, Split, Targets};
pub use idx::{parse_idx, read_idx, IdxArray};
pub use loader::{Batch, Batches, DataLoader};
pub use text::{TextCorpus, TextSplit, Vocab};
