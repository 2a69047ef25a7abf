//! # kiln-data
//!
//! Datasets for kiln: a validating [`idx`] reader (raw or gzip), named
//! [`Dataset`]s found on disk or bundled, and a [`DataLoader`] that shuffles
//! with a seed and assembles batches on a background thread; character
//! [`text`] corpora (bundled Shakespeare, or any UTF-8 file) for language
//! models.

pub mod augment;
pub mod dataset;
pub mod idx;
pub mod loader;
pub mod text;

pub use augment::{Affine, Augment};
pub use dataset::{Dataset, Split, Targets};
pub use idx::{parse_idx, read_idx, IdxArray};
pub use loader::{Batch, DataLoader};
pub use text::{TextCorpus, TextSplit, Vocab};
