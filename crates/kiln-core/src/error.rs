//! The one error type of every fallible kiln function.
//!
//! ```
//! use kiln_core::{Error, Tensor};
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let x = Tensor::from_slice(&[1.0, 2.0, 3.0], &[3], &b)?;
//! let e = x.reshape(&[2, 2]).unwrap_err();
//! // Errors say which op failed and why; match on the kind when it matters.
//! assert!(matches!(e, Error::Shape { .. }), "{e}");
//! assert!(e.to_string().starts_with("reshape"), "{e}");
//! assert_eq!(Error::invalid("--epochs 0").to_string(), "--epochs 0");
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::path::PathBuf;

use crate::DType;

/// Result alias used throughout kiln.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kiln. Messages name the offending value and
/// what was expected, so the CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Shapes do not fit the op (`matmul: lhs is [2, 3] but rhs is [4, 5]`).
    #[error("{op}: {msg}")]
    Shape {
        /// The op that rejected the shapes.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
    /// An operand has the wrong element type.
    #[error("{op}: expected dtype {expected}, got {got}")]
    DType {
        /// The op that rejected the dtype.
        op: &'static str,
        /// The dtype the op needs.
        expected: DType,
        /// The dtype it got.
        got: DType,
    },
    /// The backend does not implement this op for this dtype (yet).
    #[error("{op} is not supported for {dtype} on the {backend} backend")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// The dtype that was asked for.
        dtype: DType,
        /// The backend's name.
        backend: String,
    },
    /// An argument is out of its domain (an axis past the rank, a negative learning rate...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A data file is malformed.
    #[error("{}: {source}", path.display())]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: DataError,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What kiln was doing (`reading /x/train-images-idx3-ubyte.gz`).
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A backend-specific failure (device lost, out of memory, driver error).
    #[error("{0}")]
    Backend(String),
    /// Work stopped on request (Ctrl-C, SIGTERM) after saving what it had.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// What is wrong with a data file (IDX images or labels, checkpoints, model specs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file ends before the header or the data it declares.
    #[error("file is truncated: expected {expected} bytes, found {found} (re-download or re-extract it)")]
    Truncated {
        /// Bytes the header promises.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The magic number is not an IDX one.
    #[error("not an IDX file: magic bytes are {found:02x?}, expected [00, 00, type, ndim]")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The IDX type code is unknown or not supported.
    #[error("IDX type code 0x{code:02x} is not supported (only 0x08, unsigned byte, is)")]
    UnsupportedType {
        /// The type code found.
        code: u8,
    },
    /// The dimensions are not what the reader expects.
    #[error("{0}")]
    BadDimensions(String),
    /// Bytes follow the data the header declares.
    #[error("{extra} bytes follow the data the header declares")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The images and labels files disagree on the number of examples.
    #[error("{images} images but {labels} labels")]
    CountMismatch {
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A label is outside `0..classes`.
    #[error("label {label} at index {index} is outside 0..{classes}")]
    LabelOutOfRange {
        /// The label value.
        label: u32,
        /// Where it is.
        index: usize,
        /// The number of classes.
        classes: usize,
    },
    /// The gzip stream is corrupt.
    #[error("corrupt gzip stream: {0}")]
    Gzip(String),
    /// Anything else (checkpoint metadata, model specs).
    #[error("{0}")]
    Invalid(String),
}
