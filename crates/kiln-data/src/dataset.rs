//! Named image-classification datasets: where to find them and how to load them.
//!
//! ```
//! use kiln_data::{Dataset, Split};
//!
//! // The bundled 10,000-digit MNIST sample needs no download.
//! let train = Dataset::bundled_sample(Split::Train)?;
//! assert_eq!((train.len(), train.example_shape(), train.classes()), (8000, [1, 28, 28], 10));
//! assert_eq!(train.image(0).len(), 784);
//! assert!(train.labels().iter().all(|&l| l < 10));
//! // By name: the system's datasets, or an error saying how to get one.
//! assert!(Dataset::load("no-such-set", Split::Test, None).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::path::{Path, PathBuf};

use kiln_core::{DataError, Error, Result};

use crate::idx::{decode, read_idx, IdxArray};

/// The datasets `kiln` knows by name.
pub const KNOWN: [&str; 3] = ["mnist-sample", "mnist", "fashion-mnist"];

/// Which half of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training images (`train-*`).
    Train,
    /// The test images (`t10k-*`).
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    /// `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Single-channel images with class labels, held as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    name: String,
    rows: usize,
    cols: usize,
    classes: usize,
    images: Vec<u8>,
    labels: Vec<u8>,
}

const BUNDLED_TRAIN_IMAGES: &[u8] =
    include_bytes!("../data/mnist-sample/train-images-idx3-ubyte.gz");
const BUNDLED_TRAIN_LABELS: &[u8] =
    include_bytes!("../data/mnist-sample/train-labels-idx1-ubyte.gz");
const BUNDLED_TEST_IMAGES: &[u8] = include_bytes!("../data/mnist-sample/t10k-images-idx3-ubyte.gz");
const BUNDLED_TEST_LABELS: &[u8] = include_bytes!("../data/mnist-sample/t10k-labels-idx1-ubyte.gz");

impl Dataset {
    /// Builds a dataset from decoded IDX arrays, checking that they fit:
    /// images `[n, rows, cols]`, labels `[n]`, every label below `classes`.
    pub fn from_idx(
        name: &str,
        images: IdxArray,
        labels: IdxArray,
        classes: usize,
    ) -> std::result::Result<Self, DataError> {
        let &[n, rows, cols] = images.dims.as_slice() else {
            return Err(DataError::BadDimensions(format!(
                "an images file needs 3 dimensions [n, rows, cols], this one has {:?}",
                images.dims
            )));
        };
        if rows == 0 || cols == 0 {
            return Err(DataError::BadDimensions(format!(
                "images of {rows}×{cols} pixels"
            )));
        }
        if n == 0 {
            return Err(DataError::BadDimensions(
                "the images file holds 0 images: nothing to train or evaluate on".into(),
            ));
        }
        let &[m] = labels.dims.as_slice() else {
            return Err(DataError::BadDimensions(format!(
                "a labels file needs 1 dimension [n], this one has {:?}",
                labels.dims
            )));
        };
        if n != m {
            return Err(DataError::CountMismatch {
                images: n,
                labels: m,
            });
        }
        if let Some((index, &label)) = labels
            .data
            .iter()
            .enumerate()
            .find(|(_, &l)| usize::from(l) >= classes)
        {
            return Err(DataError::LabelOutOfRange {
                label: u32::from(label),
                index,
                classes,
            });
        }
        Ok(Dataset {
            name: name.to_string(),
            rows,
            cols,
            classes,
            images: images.data,
            labels: labels.data,
        })
    }

    /// Loads `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]`
    /// from `dir` (`prefix` is `train` or `t10k`).
    pub fn from_dir(name: &str, dir: &Path, split: Split) -> Result<Self> {
        let images_path = find_file(dir, &format!("{}-images-idx3-ubyte", split.prefix()))?;
        let labels_path = find_file(dir, &format!("{}-labels-idx1-ubyte", split.prefix()))?;
        let images = read_idx(&images_path)?;
        let labels = read_idx(&labels_path)?;
        Self::from_idx(name, images, labels, 10).map_err(|source| Error::Data {
            path: dir.to_path_buf(),
            source,
        })
    }

    /// The bundled 10,000-digit MNIST sample (8,000 train, 2,000 test).
    pub fn bundled_sample(split: Split) -> Result<Self> {
        let (img, lab) = match split {
            Split::Train => (BUNDLED_TRAIN_IMAGES, BUNDLED_TRAIN_LABELS),
            Split::Test => (BUNDLED_TEST_IMAGES, BUNDLED_TEST_LABELS),
        };
        let wrap = |source| Error::Data {
            path: PathBuf::from("<bundled mnist-sample>"),
            source,
        };
        Self::from_idx(
            "mnist-sample",
            decode(img).map_err(wrap)?,
            decode(lab).map_err(wrap)?,
            10,
        )
        .map_err(wrap)
    }

    /// Loads a dataset by name (see [`KNOWN`]). With `data_dir`, from there
    /// alone — the dataset's folder itself or a folder holding `<name>/` —
    /// and an error naming the missing file if neither has the split (an
    /// explicit folder is never silently replaced by another). Without it,
    /// from `$KILN_DATA/<name>`, then `/usr/share/datasets/<name>`; the
    /// `mnist-sample` falls back to the copy bundled in the binary.
    pub fn load(name: &str, split: Split, data_dir: Option<&Path>) -> Result<Self> {
        if !KNOWN.contains(&name) {
            return Err(Error::invalid(format!(
                "unknown dataset `{name}`: expected one of {}",
                KNOWN.join(", ")
            )));
        }
        if let Some(d) = data_dir {
            return Self::load_from(name, d, split);
        }
        let candidates = candidate_dirs(name);
        for dir in &candidates {
            if has_split(dir, split) {
                return Self::from_dir(name, dir, split);
            }
        }
        if name == "mnist-sample" {
            return Self::bundled_sample(split);
        }
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        let hint = if name == "fashion-mnist" {
            "install it with `apt-get install dataset-fashion-mnist`, or pass --data DIR"
        } else {
            "download the four IDX files (train-images-idx3-ubyte.gz, …) into a folder and pass --data DIR"
        };
        Err(Error::invalid(format!(
            "dataset `{name}` not found (looked in {}): {hint}",
            looked.join(", ")
        )))
    }

    /// `split` from an explicit folder `d` (or `d/<name>`), or an error
    /// that says what is missing.
    fn load_from(name: &str, d: &Path, split: Split) -> Result<Self> {
        if !d.is_dir() {
            let what = if d.exists() {
                "is not a folder"
            } else {
                "does not exist"
            };
            return Err(Error::invalid(format!(
                "--data {}: {what}; pass the folder holding the IDX files",
                d.display()
            )));
        }
        for dir in [d.to_path_buf(), d.join(name)] {
            if has_split(&dir, split) {
                return Self::from_dir(name, &dir, split);
            }
        }
        let p = split.prefix();
        Err(Error::invalid(format!(
            "--data {}: no {p}-images-idx3-ubyte[.gz] there or in {}/ (the {} split of `{name}` needs \
             {p}-images-idx3-ubyte.gz and {p}-labels-idx1-ubyte.gz)",
            d.display(),
            d.join(name).display(),
            match split {
                Split::Train => "train",
                Split::Test => "test",
            }
        )))
    }

    /// The dataset's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The shape of one example: `[1, rows, cols]`.
    pub fn example_shape(&self) -> [usize; 3] {
        [1, self.rows, self.cols]
    }

    /// Pixels per example.
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The pixels of example `i` (row-major bytes).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.pixels()..(i + 1) * self.pixels()]
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The classes' names, in label order (see [`class_names`]).
    pub fn class_names(&self) -> Vec<String> {
        class_names(&self.name, self.classes())
    }

    /// The first `n` examples (or all, if fewer).
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Dataset {
            name: self.name.clone(),
            rows: self.rows,
            cols: self.cols,
            classes: self.classes,
            images: self.images[..n * self.pixels()].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// A short content hash (FNV-1a 64 of labels and pixels), to tell
    /// datasets apart in run metadata.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in self.labels.iter().chain(&self.images) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

fn candidate_dirs(name: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("KILN_DATA") {
        v.push(PathBuf::from(d).join(name));
    }
    v.push(Path::new("/usr/share/datasets").join(name));
    v
}

fn has_split(dir: &Path, split: Split) -> bool {
    find_file(dir, &format!("{}-images-idx3-ubyte", split.prefix())).is_ok()
}

fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::invalid(format!(
        "{}: no {stem}[.gz] there",
        dir.display()
    )))
}

/// The names of `classes` classes of the dataset `name`: Fashion-MNIST's
/// article names, else the label numbers (MNIST's digits).
pub fn class_names(name: &str, classes: usize) -> Vec<String> {
    const FASHION: [&str; 10] = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ];
    (0..classes)
        .map(|c| match (name, FASHION.get(c)) {
            ("fashion-mnist", Some(n)) => n.to_string(),
            _ => c.to_string(),
        })
        .collect()
}
