//! Datasets held in memory: the named image-classification sets (IDX
//! files: where to find them and how to load them), and any f32 examples
//! with class labels or regression targets ([`Dataset::from_f32`]).
//!
//! ```
//! use kiln_data::{Dataset, Split};
//!
//! // The bundled 10,000-digit MNIST sample needs no download.
//! let train = Dataset::bundled_sample(Split::Train)?;
//! assert_eq!((train.len(), train.classes()), (8000, 10));
//! assert_eq!(train.example_shape(), [1, 28, 28]);
//! assert_eq!(train.image(0).len(), 784);
//! assert!(train.labels().iter().all(|&l| l < 10));
//! // By name: the system's datasets, or an error saying how to get one.
//! assert!(Dataset::load("no-such-set", Split::Test, None).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Single-channel images with class labels, held as bytes. Clones share
/// the examples instead of copying them.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    name: String,
    /// One example's shape.
    shape: Vec<usize>,
    /// Classes of a classification set; 0 for regression.
    classes: usize,
    /// Examples.
    n: usize,
    // Shared by clones: a trainer hands its loader a clone of the
    // training set (Fashion-MNIST's is 47 MB; copying it made `kiln train`
    // 25 ms slower to start and its peak memory 21 MB larger).
    /// u8 features (IDX images, scaled by 1/255 on assembly), or none.
    images: Arc<Vec<u8>>,
    /// f32 features, used as they are, or none.
    floats: Arc<Vec<f32>>,
    /// Class labels (classification), or none.
    labels: Arc<Vec<u32>>,
    /// Regression targets, `n × target_shape`, or none.
    targets: Arc<Vec<f32>>,
    /// One example's target shape (regression), or empty.
    target_shape: Vec<usize>,
}

/// What a [`Dataset::from_f32`] set's examples are labelled with.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// A class per example, each below `classes`: for cross-entropy.
    Classes {
        /// One label per example.
        labels: Vec<u32>,
        /// How many classes there are.
        classes: usize,
    },
    /// Values per example, of `shape` each: for mean squared error.
    Values {
        /// `n × shape` values, row-major.
        values: Vec<f32>,
        /// One example's target shape (`[1]` for a scalar).
        shape: Vec<usize>,
    },
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
            shape: vec![1, rows, cols],
            classes,
            n,
            images: Arc::new(images.data),
            floats: Arc::default(),
            labels: Arc::new(labels.data.into_iter().map(u32::from).collect()),
            targets: Arc::default(),
            target_shape: Vec::new(),
        })
    }

    /// A dataset of `features` — examples of `example_shape` (any rank:
    /// `[channels, height, width]` for images, `[features]` for vectors),
    /// row-major, used as they are (no scaling) — with class labels or
    /// regression targets. Sizes, labels and values are checked: a count
    /// that does not divide, a label out of range or a non-finite value is
    /// an error.
    ///
    /// ```
    /// use kiln_data::{Dataset, Targets};
    ///
    /// // Four 2-feature examples with a scalar target each (y = x₀ − x₁).
    /// let x = vec![1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.5, 0.5];
    /// let y = Targets::Values { values: vec![1.0, -1.0, 1.0, 0.0], shape: vec![1] };
    /// let ds = Dataset::from_f32("toy", x, &[2], y)?;
    /// assert_eq!((ds.len(), ds.example_shape(), ds.classes()), (4, &[2][..], 0));
    /// assert_eq!(ds.target_shape(), Some(&[1][..]));
    /// // Three-channel images with class labels.
    /// let rgb = Dataset::from_f32(
    ///     "rgb",
    ///     vec![0.5; 2 * 3 * 4 * 4],
    ///     &[3, 4, 4],
    ///     Targets::Classes { labels: vec![0, 2], classes: 3 },
    /// )?;
    /// assert_eq!(rgb.labels(), [0, 2]);
    /// assert!(Dataset::from_f32("bad", vec![0.0; 5], &[2], Targets::Classes { labels: vec![0, 0], classes: 1 }).is_err());
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn from_f32(
        name: &str,
        features: Vec<f32>,
        example_shape: &[usize],
        targets: Targets,
    ) -> Result<Self> {
        let bad = |msg: String| Error::invalid(format!("dataset `{name}`: {msg}"));
        let per: usize = example_shape.iter().product();
        if example_shape.is_empty() || per == 0 {
            return Err(bad(format!(
                "examples of shape {example_shape:?}: every extent must be at least 1"
            )));
        }
        if !features.len().is_multiple_of(per) || features.is_empty() {
            return Err(bad(format!(
                "{} features do not make whole examples of {per} ({example_shape:?})",
                features.len()
            )));
        }
        let n = features.len() / per;
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("feature {i} is {}", features[i])));
        }
        let mut ds = Dataset {
            name: name.to_string(),
            shape: example_shape.to_vec(),
            classes: 0,
            n,
            images: Arc::default(),
            floats: Arc::new(features),
            labels: Arc::default(),
            targets: Arc::default(),
            target_shape: Vec::new(),
        };
        match targets {
            Targets::Classes { labels, classes } => {
                if labels.len() != n {
                    return Err(bad(format!("{} labels for {n} examples", labels.len())));
                }
                if classes == 0 {
                    return Err(bad(
                        "0 classes: a classification set needs at least 1".into()
                    ));
                }
                if let Some(i) = labels.iter().position(|&l| l as usize >= classes) {
                    return Err(bad(format!(
                        "label {} at index {i}: classes run from 0 to {}",
                        labels[i],
                        classes - 1
                    )));
                }
                (ds.labels, ds.classes) = (Arc::new(labels), classes);
            }
            Targets::Values { values, shape } => {
                let each: usize = shape.iter().product();
                if shape.is_empty() || each == 0 || values.len() != n * each {
                    return Err(bad(format!(
                        "{} target values for {n} examples of shape {shape:?}",
                        values.len()
                    )));
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(bad(format!("target value {i} is {}", values[i])));
                }
                (ds.targets, ds.target_shape) = (Arc::new(values), shape);
            }
        }
        Ok(ds)
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
        self.n
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The shape of one example (`[1, rows, cols]` for IDX images).
    pub fn example_shape(&self) -> &[usize] {
        &self.shape
    }

    /// Values per example (pixels, for images).
    pub fn pixels(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of classes (0 for a regression set).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The bytes of example `i` of a u8 (IDX) dataset, row-major; empty
    /// for an f32 dataset (see [`Dataset::write_example`]).
    pub fn image(&self, i: usize) -> &[u8] {
        match self.images.is_empty() {
            true => &[],
            false => &self.images[i * self.pixels()..(i + 1) * self.pixels()],
        }
    }

    /// Example `i` as the model takes it, into `dst` (of
    /// [`Dataset::pixels`] values): bytes over 255 for a u8 dataset, the
    /// f32 features as they are otherwise.
    ///
    /// # Panics
    /// If `dst` does not hold exactly [`Dataset::pixels`] values, or `i` is
    /// not an example of the set.
    pub fn write_example(&self, i: usize, dst: &mut [f32]) {
        let px = self.pixels();
        if self.floats.is_empty() {
            // `b / 255`, correctly rounded (`crate::pixels`).
            crate::pixels::write_unit(dst, &self.images[i * px..(i + 1) * px]);
        } else {
            dst.copy_from_slice(&self.floats[i * px..(i + 1) * px]);
        }
    }

    /// Asks for example `i`'s stored values ahead of use (see
    /// [`crate::pixels::prefetch`]); out of range asks for nothing.
    pub(crate) fn prefetch_example(&self, i: usize) {
        let px = self.pixels();
        if self.floats.is_empty() {
            crate::pixels::prefetch(self.images.get(i * px..(i + 1) * px).unwrap_or(&[]));
        } else {
            crate::pixels::prefetch(self.floats.get(i * px..(i + 1) * px).unwrap_or(&[]));
        }
    }

    /// [`Dataset::write_example`] appended to `dst`, for a caller filling
    /// a batch that would otherwise zero its buffer only to overwrite it
    /// (a 400 KB `memset` per MNIST batch: 3 % of an MLP epoch's samples).
    pub(crate) fn extend_with_example(&self, i: usize, dst: &mut Vec<f32>) {
        let px = self.pixels();
        if self.floats.is_empty() {
            crate::pixels::extend_unit(dst, &self.images[i * px..(i + 1) * px]);
        } else {
            dst.extend_from_slice(&self.floats[i * px..(i + 1) * px]);
        }
    }

    /// All class labels (empty for a regression set).
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// One example's target shape, for a regression set.
    pub fn target_shape(&self) -> Option<&[usize]> {
        (!self.target_shape.is_empty()).then_some(self.target_shape.as_slice())
    }

    /// The regression targets of example `i` (empty for a classification set).
    pub fn targets(&self, i: usize) -> &[f32] {
        let each: usize = self.target_shape.iter().product();
        match self.targets.is_empty() {
            true => &[],
            false => &self.targets[i * each..(i + 1) * each],
        }
    }

    /// The classes' names, in label order (see [`class_names`]).
    pub fn class_names(&self) -> Vec<String> {
        class_names(&self.name, self.classes())
    }

    /// The first `n` examples (or all, if fewer).
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.len());
        let each: usize = self.target_shape.iter().product();
        // Each stored vector is empty or holds `len()` examples' worth.
        let (px, each) = (n * self.pixels(), n * each);
        Dataset {
            name: self.name.clone(),
            shape: self.shape.clone(),
            classes: self.classes,
            n,
            images: Arc::new(self.images[..px.min(self.images.len())].to_vec()),
            floats: Arc::new(self.floats[..px.min(self.floats.len())].to_vec()),
            labels: Arc::new(self.labels[..n.min(self.labels.len())].to_vec()),
            targets: Arc::new(self.targets[..each.min(self.targets.len())].to_vec()),
            target_shape: self.target_shape.clone(),
        }
    }

    /// A short content hash (FNV-1a 64 of labels and pixels, then of the
    /// f32 features' and targets' bits), to tell datasets apart in run
    /// metadata. (An IDX set's is what it was before f32 sets existed.)
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let words = self.labels.iter().map(|&l| u64::from(l));
        let bytes = self.images.iter().map(|&b| u64::from(b));
        let floats = self.floats.iter().chain(self.targets.iter());
        let bits = floats.map(|v| u64::from(v.to_bits()));
        let shape = self.shape.iter().chain(&self.target_shape);
        let extents = (!self.floats.is_empty()).then_some(shape.map(|&d| d as u64));
        for v in words
            .chain(bytes)
            .chain(bits)
            .chain(extents.into_iter().flatten())
        {
            h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

fn candidate_dirs(name: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    // A path need not be UTF-8; a blank one is unset, as every KILN_
    // setting (`kiln_core::env::setting`).
    if let Some(d) =
        std::env::var_os("KILN_DATA").filter(|d| !d.to_string_lossy().trim().is_empty())
    {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_examples_and_take_copies_its_part() {
        let labels = Targets::Classes {
            labels: vec![0, 1, 1],
            classes: 2,
        };
        let ds = Dataset::from_f32("toy", vec![0.5; 3 * 4], &[4], labels).unwrap();
        let copy = ds.clone();
        assert_eq!(copy, ds);
        assert!(Arc::ptr_eq(&copy.floats, &ds.floats));
        assert!(Arc::ptr_eq(&copy.labels, &ds.labels));
        let head = ds.take(2);
        assert_eq!((head.len(), head.labels()), (2, &[0, 1][..]));
        assert!(!Arc::ptr_eq(&head.floats, &ds.floats));
    }
}
