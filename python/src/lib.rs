//! # kiln for Python
//!
//! The extension module `kiln`, built with maturin (`pip install ./python`):
//! load a model file or checkpoint, or build a model from a spec, then
//! `predict` on NumPy arrays, `fit` and `evaluate` on NumPy arrays or the
//! bundled and IDX datasets, `save`, and read or replace the weights by
//! name. Errors are `kiln.KilnError` exceptions carrying kiln's message.
//!
//! ```python
//! import kiln, numpy as np
//! m = kiln.load("runs/mlp-mnist-sample")          # a model file, its folder or a checkpoint
//! probs = m.predict(np.random.rand(4, 1, 28, 28))  # [4, 10], rows sum to 1
//! ```
//!
//! Inputs are images with pixels in `[0, 1]` (bytes over 255), shaped
//! `[n, channels, height, width]` (or `[n, channels·height·width]`). A
//! C-contiguous float32 array is read in place and copied once (one
//! `memcpy`) into the backend's memory; other dtypes are converted by NumPy
//! first, and other layouts (Fortran order, strided views) copied element
//! by element in C order. Results come back as NumPy arrays that take over
//! kiln's buffer, without a copy. Compute runs with the GIL released.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use numpy::{
    AllowTypeChange, IntoPyArray, PyArrayDyn, PyArrayLike1, PyArrayLikeDyn, PyArrayMethods,
    PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use kiln_core::{Backend, HostData, Tensor};
use kiln_cpu::CpuBackend;
use kiln_data::{Dataset, IdxArray, Split, Targets};
use kiln_nn::{Adam, Loss, ModelSpec, Optimizer, Sequential};
use kiln_train::{model_file, Evaluation, FitConfig, Trainer, Verbosity};

/// The extension's allocator, as the `kiln` command's: every op allocates
/// its result and frees its inputs' buffers, and with glibc's `malloc`
/// (which Python's process would otherwise give kiln) buffers over 128 KiB
/// went back to the kernel on free and were faulted in again on the next
/// allocation. Only kiln's own Rust allocations use it — buffers handed to
/// NumPy are freed by the extension too — not Python's or NumPy's. Purged
/// memory is reset, not decommitted, as in the `kiln` command (its
/// `main.rs` has the measurements).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_decommits` (the same index in its v2 and
/// v3 headers).
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

create_exception!(
    kiln,
    KilnError,
    PyException,
    "An error kiln reported: a bad argument, shape or file, with what to do about it."
);

/// kiln's error as a Python exception.
fn err(e: kiln_core::Error) -> PyErr {
    KilnError::new_err(e.to_string())
}

/// A Python exception with `msg`.
fn fail(msg: impl Into<String>) -> PyErr {
    KilnError::new_err(msg.into())
}

/// A kiln model on a CPU backend, with the Adam optimiser `fit` trains it
/// with (its state carries over from one `fit` to the next, as Keras').
#[pyclass(module = "kiln", name = "Model", frozen)]
struct Model {
    backend: CpuBackend,
    trainer: Mutex<Trainer<CpuBackend>>,
}

impl Model {
    fn new(backend: CpuBackend, model: Sequential<CpuBackend>) -> PyResult<Self> {
        let adam: Box<dyn Optimizer<CpuBackend>> = Box::new(Adam::new(1e-3).map_err(err)?);
        let trainer = Trainer::new(model, adam, Loss::CategoricalCrossEntropy, backend.clone());
        Ok(Model {
            backend,
            trainer: Mutex::new(trainer),
        })
    }

    /// The trainer, locked, unless a panic during an earlier call spoiled it.
    fn locked(&self) -> PyResult<std::sync::MutexGuard<'_, Trainer<CpuBackend>>> {
        self.trainer.lock().map_err(|_| {
            fail("a panic interrupted an earlier call on this model, whose weights may be half updated: load or build it again")
        })
    }

    /// u8 `images` and integer `labels` as a dataset of this model's classes.
    fn arrays(
        &self,
        images: &Bound<'_, PyAny>,
        labels: PyArrayLike1<'_, i64, AllowTypeChange>,
    ) -> PyResult<Dataset> {
        dataset(images, labels, self.classes()?)
    }

    /// Runs `f` with the trainer locked (an image model), or says why not.
    fn with<R>(&self, f: impl FnOnce(&mut Trainer<CpuBackend>) -> PyResult<R>) -> PyResult<R> {
        let mut t = self.locked()?;
        if t.model().takes_tokens() {
            return Err(fail(format!(
                "model `{}` is a language model: the Python package runs image classifiers (use `kiln generate` or `kiln serve` for text)",
                t.model().name()
            )));
        }
        f(&mut t)
    }

    /// Floats per example and the model's input shape.
    fn input_of(t: &Trainer<CpuBackend>) -> (usize, Vec<usize>) {
        let shape = t.model().input_shape().to_vec();
        (shape.iter().product(), shape)
    }
}

/// An array's elements in C order, owned: one `memcpy` of a C-contiguous
/// array, an element-by-element copy in C order of any other (for a
/// 60,000-image uint8 training set, about 0.14 s more: most of an MLP
/// epoch). Not NumPy's `as_slice`, which also takes a Fortran-ordered
/// array, whose memory order is not C order: ndarray's gives a slice only
/// for the standard (C) layout.
fn owned<T: numpy::Element + Copy>(array: &PyReadonlyArrayDyn<'_, T>) -> Vec<T> {
    let view = array.as_array();
    match view.as_slice() {
        Some(s) => s.to_vec(),
        None => view.iter().copied().collect(),
    }
}

/// Images and integer labels `[n]` as a dataset of `classes` classes:
/// uint8 images `[n, h, w]` or `[n, 1, h, w]` (scaled by 1/255, as IDX
/// files are), or float examples `[n, …]` of the model's input shape, used
/// as they are.
fn dataset(
    images: &Bound<'_, PyAny>,
    labels: PyArrayLike1<'_, i64, AllowTypeChange>,
    classes: usize,
) -> PyResult<Dataset> {
    let raw = labels.as_array();
    // uint8 arrays as IDX images; anything else NumPy can make float32 of
    // (lists included) as f32 examples.
    let (bytes, floats, dims) = match images.extract::<PyReadonlyArrayDyn<'_, u8>>() {
        Ok(b) => {
            let dims = b.shape().to_vec();
            (Some(b), None, dims)
        }
        Err(_) => {
            let f = images.extract::<PyArrayLikeDyn<'_, f32, AllowTypeChange>>()?;
            let dims = f.shape().to_vec();
            (None, Some(f), dims)
        }
    };
    let n = dims.first().copied().unwrap_or(0);
    if raw.len() != n {
        return Err(fail(format!(
            "{} labels for {n} images: one class index per image",
            raw.len()
        )));
    }
    let mut ls = Vec::with_capacity(n);
    for (i, &l) in raw.iter().enumerate() {
        if l < 0 || l as usize >= classes {
            return Err(fail(format!(
                "label {l} at index {i}: class indices run from 0 to {}",
                classes.saturating_sub(1)
            )));
        }
        ls.push(l as u32);
    }
    let Some(bytes) = bytes else {
        let data: Vec<f32> = floats.map_or_else(Vec::new, |f| owned(&f));
        let targets = Targets::Classes {
            labels: ls,
            classes,
        };
        return Dataset::from_f32("arrays", data, &dims[1..], targets).map_err(err);
    };
    let (rows, cols) = match dims[..] {
        [_, h, w] | [_, 1, h, w] => (h, w),
        _ => {
            return Err(fail(format!(
                "images have shape {dims:?}: uint8 images are [n, height, width] or [n, 1, height, width] (float arrays may have any channels)"
            )))
        }
    };
    if classes > 256 {
        return Err(fail(format!(
            "{classes} classes: uint8 image sets hold labels below 256; pass float images"
        )));
    }
    Dataset::from_idx(
        "arrays",
        IdxArray {
            dims: vec![n, rows, cols],
            data: owned(&bytes),
        },
        IdxArray {
            dims: vec![n],
            data: ls.iter().map(|&l| l as u8).collect(),
        },
        classes,
    )
    .map_err(|e| fail(format!("the arrays: {e}")))
}

/// An evaluation as a dict.
fn evaluation_dict<'py>(py: Python<'py>, e: &Evaluation) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("loss", e.loss)?;
    d.set_item("accuracy", e.accuracy)?;
    d.set_item("examples", e.examples)?;
    Ok(d)
}

#[pymethods]
impl Model {
    /// The model's name.
    #[getter]
    fn name(&self) -> PyResult<String> {
        let t = self.locked()?;
        Ok(t.model().name().to_string())
    }

    /// The shape of one example, `[channels, height, width]`.
    #[getter]
    fn input_shape(&self) -> PyResult<Vec<usize>> {
        self.with(|t| Ok(t.model().input_shape().to_vec()))
    }

    /// How many classes the model outputs.
    #[getter]
    fn classes(&self) -> PyResult<usize> {
        self.with(|t| Ok(t.model().output_shape().map_err(err)?.iter().product()))
    }

    /// Trainable parameters.
    #[getter]
    fn num_params(&self) -> PyResult<usize> {
        let t = self.locked()?;
        Ok(t.model().num_params())
    }

    /// A Keras-style summary of the layers.
    fn summary(&self) -> PyResult<String> {
        let t = self.locked()?;
        Ok(t.model().summary())
    }

    fn __repr__(&self) -> PyResult<String> {
        let t = self.locked()?;
        Ok(format!(
            "kiln.Model('{}', input {:?}, {} parameters, on {})",
            t.model().name(),
            t.model().input_shape(),
            t.model().num_params(),
            self.backend.name()
        ))
    }

    /// Class probabilities `[n, classes]` for `x`: `[n, channels, height,
    /// width]` (or `[n, features]`) pixels in `[0, 1]`.
    fn predict<'py>(
        &self,
        py: Python<'py>,
        x: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let dims = x.shape().to_vec();
        let data = owned(&x);
        let (probs, n, classes) =
            py.detach(|| {
                self.with(|t| {
                    let (per, shape) = Self::input_of(t);
                    let n = dims.first().copied().unwrap_or(0);
                    let fits = dims.len() >= 2 && (dims[1..] == shape[..] || dims[1..] == [per]);
                    if !fits || n == 0 {
                        return Err(fail(format!(
                        "x has shape {dims:?}: the model takes [n, {}] (or [n, {per}]) with n ≥ 1",
                        shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    )));
                    }
                    let mut full = vec![n];
                    full.extend_from_slice(&shape);
                    let x = Tensor::from_host(HostData::F32(data), &full, &self.backend)
                        .map_err(err)?;
                    let p = t.model().predict(&x).map_err(err)?;
                    let classes = p.dims()[1..].iter().product();
                    Ok((p.to_vec_f32().map_err(err)?, n, classes))
                })
            })?;
        probs.into_pyarray(py).reshape(vec![n, classes])
    }

    /// Trains on `images` — uint8 `[n, h, w]` or `[n, 1, h, w]` (scaled by
    /// 1/255 on the way in), or float `[n, …input shape]` used as they are —
    /// and integer `labels` `[n]`, with Adam and
    /// cross-entropy; returns the last epoch's `loss`, `accuracy` and the
    /// `seconds` all took.
    #[pyo3(signature = (images, labels, epochs=1, batch_size=128, learning_rate=1e-3, seed=1, verbose=false))]
    #[allow(clippy::too_many_arguments)]
    fn fit<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        labels: PyArrayLike1<'py, i64, AllowTypeChange>,
        epochs: usize,
        batch_size: usize,
        learning_rate: f32,
        seed: u64,
        verbose: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ds = self.arrays(images, labels)?;
        self.fit_dataset(py, &ds, epochs, batch_size, learning_rate, seed, verbose)
    }

    /// Loss and accuracy on `images` and integer `labels`, as `fit` takes
    /// them.
    #[pyo3(signature = (images, labels, batch_size=1000))]
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        labels: PyArrayLike1<'py, i64, AllowTypeChange>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ds = self.arrays(images, labels)?;
        let e = py.detach(|| self.with(|t| t.evaluate(&ds, batch_size).map_err(err)))?;
        evaluation_dict(py, &e)
    }

    /// Saves the spec and weights to `path` (atomically); `kiln.load`, and
    /// the `kiln` command's `eval`, `predict` and `serve`, read it.
    fn save(&self, path: PathBuf) -> PyResult<()> {
        let t = self.locked()?;
        model_file::save(&path, t.model(), &HashMap::new()).map_err(err)
    }

    /// Every parameter by name (`"1.dense.weight"`, …) as a float32 array.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = self.locked()?;
        let d = PyDict::new(py);
        for (name, value) in t.model().state_dict() {
            let dims = value.dims().to_vec();
            let data = value.to_vec_f32().map_err(err)?;
            d.set_item(name, data.into_pyarray(py).reshape(dims)?)?;
        }
        Ok(d)
    }

    /// Replaces every parameter's values with `state`'s (name → array, as
    /// `state_dict` gives them): all or nothing.
    fn load_state_dict(
        &self,
        state: HashMap<String, PyArrayLikeDyn<'_, f32, AllowTypeChange>>,
    ) -> PyResult<()> {
        let mut tensors = std::collections::BTreeMap::new();
        for (name, array) in state {
            let dims = array.shape().to_vec();
            let data = owned(&array);
            let t = Tensor::from_host(HostData::F32(data), &dims, &self.backend).map_err(err)?;
            tensors.insert(name, t);
        }
        let mut t = self.locked()?;
        t.model_mut().load_state_dict(&tensors).map_err(err)
    }
}

impl Model {
    /// `fit` on a dataset.
    #[allow(clippy::too_many_arguments)]
    fn fit_dataset<'py>(
        &self,
        py: Python<'py>,
        ds: &Dataset,
        epochs: usize,
        batch_size: usize,
        learning_rate: f32,
        seed: u64,
        verbose: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        kiln_nn::optim::check_lr(learning_rate).map_err(err)?;
        let cfg = FitConfig {
            epochs,
            batch_size,
            seed,
            verbosity: if verbose {
                Verbosity::Lines
            } else {
                Verbosity::Silent
            },
            ..FitConfig::default()
        };
        // Checked before the learning rate is set: a refused call changes nothing.
        cfg.check().map_err(err)?;
        let history = py.detach(|| {
            self.with(|t| {
                t.optimizer_mut().set_lr(learning_rate);
                t.fit(ds, None, &cfg).map_err(err)
            })
        })?;
        let last = history.epochs.last();
        let d = PyDict::new(py);
        d.set_item("epochs", history.epochs.len())?;
        d.set_item("loss", last.map_or(f64::NAN, |e| e.loss))?;
        d.set_item("accuracy", last.map_or(f64::NAN, |e| e.accuracy))?;
        d.set_item(
            "seconds",
            history.epochs.iter().map(|e| e.seconds).sum::<f64>(),
        )?;
        Ok(d)
    }
}

/// The CPU backend: `kernels` None or "auto" for the best this processor
/// runs, else "scalar", "avx2", "avx512" or "neon"; `threads` 0 for
/// `KILN_THREADS` or every core.
fn backend(kernels: Option<&str>, threads: usize) -> PyResult<CpuBackend> {
    CpuBackend::configured(kernels, threads).map_err(err)
}

/// Loads a model file written by `kiln train` or `Model.save`, its
/// folder, or a checkpoint.
#[pyfunction]
#[pyo3(signature = (path, kernels=None, threads=0))]
fn load(path: PathBuf, kernels: Option<&str>, threads: usize) -> PyResult<Model> {
    let b = backend(kernels, threads)?;
    let (loaded, _) = model_file::load_for_inference(&path, &b).map_err(err)?;
    Model::new(b, loaded.model)
}

/// A freshly initialised model: `spec` is a built-in model's name ("mlp",
/// "cnn") or the path of a spec file; `seed` fixes the initial weights.
#[pyfunction]
#[pyo3(signature = (spec="mlp", seed=1, kernels=None, threads=0))]
fn build(spec: &str, seed: u64, kernels: Option<&str>, threads: usize) -> PyResult<Model> {
    let b = backend(kernels, threads)?;
    let spec = ModelSpec::resolve(spec).map_err(err)?;
    let model = Sequential::from_spec(&spec, seed, &b).map_err(err)?;
    Model::new(b, model)
}

/// Builds `model` and trains it on a named dataset ("mnist-sample", bundled;
/// "mnist", "fashion-mnist" from `data_dir` or the system's datasets), then
/// evaluates it on the test split. Returns `(model, report)`.
#[pyfunction]
#[pyo3(signature = (model="mlp", dataset="mnist-sample", epochs=1, batch_size=128, learning_rate=1e-3, seed=1, data_dir=None, verbose=false, kernels=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn train<'py>(
    py: Python<'py>,
    model: &str,
    dataset: &str,
    epochs: usize,
    batch_size: usize,
    learning_rate: f32,
    seed: u64,
    data_dir: Option<PathBuf>,
    verbose: bool,
    kernels: Option<&str>,
    threads: usize,
) -> PyResult<(Model, Bound<'py, PyDict>)> {
    let m = build(model, seed, kernels, threads)?;
    let (train_set, test_set) = py
        .detach(|| {
            let dir = data_dir.as_deref();
            Ok::<_, kiln_core::Error>((
                Dataset::load(dataset, Split::Train, dir)?,
                Dataset::load(dataset, Split::Test, dir)?,
            ))
        })
        .map_err(err)?;
    let report = m.fit_dataset(
        py,
        &train_set,
        epochs,
        batch_size,
        learning_rate,
        seed,
        verbose,
    )?;
    let e = py.detach(|| m.with(|t| t.evaluate(&test_set, 1000).map_err(err)))?;
    report.set_item("test_loss", e.loss)?;
    report.set_item("test_accuracy", e.accuracy)?;
    Ok((m, report))
}

/// The extension module, imported as `kiln`.
#[pymodule(name = "kiln")]
fn kiln_python(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The environment's setting, if any, wins (mimalloc read it at load).
    if std::env::var_os("MIMALLOC_PURGE_DECOMMITS").is_none() {
        // SAFETY: `mi_option_set` is an unsynchronised store into mimalloc's
        // option table; module initialisation runs once, under the GIL, before
        // any kiln thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0) };
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KilnError", m.py().get_type::<KilnError>())?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(build, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    Ok(())
}
