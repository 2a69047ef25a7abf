//! # kiln-capi
//!
//! kiln's C ABI: create a CPU backend, build a model from a spec or load a
//! model file or checkpoint, train it on IDX files or on the caller's
//! buffers, evaluate it, save it, and compute class probabilities for the
//! caller's float buffers. The header, `include/kiln.h`, is generated from
//! this file by cbindgen (`cargo test -p kiln-capi --test header` fails
//! when it is stale; `KILN_BLESS=1` rewrites it), and `examples/c/` holds a
//! C program that uses every function.
//!
//! ## Conventions
//!
//! - Every function that can fail returns a [`KilnStatus`]; `KILN_STATUS_OK`
//!   is 0. After a failure, [`kiln_last_error`] gives a message saying what
//!   was wrong and what to do, kept per thread until that thread's next
//!   failing call.
//! - Objects are opaque handles made by `kiln_*_new` / `kiln_*_load` and
//!   released by the matching `kiln_*_free` (which accepts NULL). A handle
//!   of the wrong kind, a null or misaligned pointer and a buffer of the
//!   wrong length are refused with an error, never dereferenced blindly; a
//!   freed handle cannot be detected, so do not use one.
//! - No Rust panic crosses the boundary: one is caught and reported as
//!   `KILN_STATUS_PANIC` (a bug in kiln: please report it). A model a
//!   panic interrupted may hold half-updated weights, so later calls on it
//!   are refused with `KILN_STATUS_BAD_HANDLE`: free it.
//! - Handles may be used from any thread. Calls on one model are
//!   serialised by a lock of its own; datasets and backends are read-only
//!   once made (a backend's thread team runs one call at a time, and a
//!   second concurrent caller works on its own thread).
//! - Images are `float` pixels in `[0, 1]` (bytes divided by 255, as the
//!   trainer's loader scales them), laid out `[n, channels, height, width]`
//!   row-major; [`kiln_model_sizes`] gives the floats per example and the
//!   number of classes.
//!
//! ## Example (Rust, through the same functions C calls)
//!
//! ```
//! use kiln_capi::*;
//! use std::ptr;
//!
//! // SAFETY: every pointer passed is valid for what it is used for, and
//! // every handle made is freed once.
//! unsafe {
//!     let mut backend = ptr::null_mut();
//!     assert_eq!(kiln_backend_new(ptr::null(), 1, &mut backend), KilnStatus::Ok);
//!     let mut model = ptr::null_mut();
//!     assert_eq!(kiln_model_new(backend, c"mlp".as_ptr(), 7, &mut model), KilnStatus::Ok);
//!     let (mut input, mut classes) = (0, 0);
//!     assert_eq!(kiln_model_sizes(model, &mut input, &mut classes), KilnStatus::Ok);
//!     assert_eq!((input, classes), (784, 10));
//!
//!     let images = vec![0.5f32; 2 * input];
//!     let mut probs = vec![0f32; 2 * classes];
//!     let status = kiln_model_predict(
//!         model, images.as_ptr(), images.len(), 2, probs.as_mut_ptr(), probs.len(),
//!     );
//!     assert_eq!(status, KilnStatus::Ok);
//!     assert!((probs[..10].iter().sum::<f32>() - 1.0).abs() < 1e-5);
//!
//!     kiln_model_free(model);
//!     kiln_backend_free(backend);
//! }
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_core::{Backend, Error};
use kiln_cpu::CpuBackend;
use kiln_data::{Dataset, IdxArray, Split};
use kiln_nn::{Adam, Loss, ModelSpec, Optimizer, Sequential};
use kiln_train::{model_file, FitConfig, Trainer, Verbosity};

/// What a call did: `KILN_STATUS_OK` (0), or why it failed
/// ([`kiln_last_error`] says more).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KilnStatus {
    /// Success.
    Ok = 0,
    /// A required pointer was NULL.
    NullPointer = 1,
    /// A pointer was not aligned for its type (4 bytes for `float`).
    Misaligned = 2,
    /// A handle was of the wrong kind (a dataset given as a model, say),
    /// or a model a panic interrupted (free it).
    BadHandle = 3,
    /// A buffer's length or a count did not fit the model or dataset.
    Size = 4,
    /// An argument was invalid: an unknown spec, a bad option, a model
    /// that does not fit a dataset, a string that is not UTF-8.
    Invalid = 5,
    /// A file could not be read or written, or is not what it claims.
    Io = 6,
    /// The backend failed (an unsupported kernel set on this processor).
    Backend = 7,
    /// A bug in kiln: a panic was caught at the boundary.
    Panic = 8,
}

/// Which half of an IDX dataset folder to load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KilnSplit {
    /// `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`.
    Train = 0,
    /// `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`.
    Test = 1,
}

/// Settings of [`kiln_model_fit`]; start from [`kiln_fit_options_default`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KilnFitOptions {
    /// Passes over the training set (at least 1).
    pub epochs: u32,
    /// Examples per step (at least 1).
    pub batch_size: u32,
    /// Adam's learning rate (finite, above 0).
    pub learning_rate: f64,
    /// Seeds the example order each epoch.
    pub seed: u64,
    /// Print a line per epoch on standard output (0: silent).
    pub verbose: u32,
}

/// What [`kiln_model_fit`] measured over its last epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KilnFitResult {
    /// Epochs trained.
    pub epochs: u32,
    /// Mean training loss per example over the last epoch.
    pub loss: f64,
    /// Training accuracy over the last epoch, in `[0, 1]`.
    pub accuracy: f64,
    /// Seconds all epochs took.
    pub seconds: f64,
}

/// What [`kiln_model_evaluate`] measured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KilnEvaluation {
    /// Mean loss per example.
    pub loss: f64,
    /// Fraction classified correctly, in `[0, 1]`.
    pub accuracy: f64,
    /// Examples evaluated.
    pub examples: u64,
}

/// Tags that tell the handle kinds apart.
const BACKEND_TAG: u64 = u64::from_le_bytes(*b"kilnBack");
const MODEL_TAG: u64 = u64::from_le_bytes(*b"kilnModl");
const DATASET_TAG: u64 = u64::from_le_bytes(*b"kilnData");

/// A CPU backend: a kernel set and a team of threads (opaque).
pub struct KilnBackend {
    _opaque: [u8; 0],
}

/// A model on a backend, with the Adam optimiser [`kiln_model_fit`]
/// trains it with (opaque). It keeps its backend alive.
pub struct KilnModel {
    _opaque: [u8; 0],
}

/// A labelled image dataset held in memory, u8 pixels (opaque).
pub struct KilnDataset {
    _opaque: [u8; 0],
}

/// What a backend handle points to.
struct BackendState {
    backend: CpuBackend,
    name: CString,
}

/// What a model handle points to.
struct ModelState {
    /// Locked for each call; poisoned by a panic during one, and then
    /// refused.
    trainer: Mutex<Trainer<CpuBackend>>,
}

/// What a dataset handle points to.
struct DatasetState {
    dataset: Dataset,
}

/// Every handle's allocation: its kind's tag first (`repr(C)`: at offset
/// 0 whatever `T` is), so that a handle of one kind passed as another is
/// recognised by reading 8 bytes it is sure to own.
#[repr(C)]
struct Tagged<T> {
    tag: u64,
    state: T,
}

/// A handle kind: the opaque type C sees, the state behind it, its tag.
trait Kind {
    type State;
    const TAG: u64;
    const NAME: &'static str;
}

impl Kind for KilnBackend {
    type State = BackendState;
    const TAG: u64 = BACKEND_TAG;
    const NAME: &'static str = "backend";
}

impl Kind for KilnModel {
    type State = ModelState;
    const TAG: u64 = MODEL_TAG;
    const NAME: &'static str = "model";
}

impl Kind for KilnDataset {
    type State = DatasetState;
    const TAG: u64 = DATASET_TAG;
    const NAME: &'static str = "dataset";
}

/// A new handle of kind `K` owning `state`.
fn into_handle<K: Kind>(state: K::State) -> *mut K {
    Box::into_raw(Box::new(Tagged { tag: K::TAG, state })).cast()
}

/// A failed call: its status and message.
struct Failure(KilnStatus, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Shape { .. } => KilnStatus::Size,
            Error::Io { .. } | Error::Data { .. } => KilnStatus::Io,
            Error::Backend(_) | Error::Unsupported { .. } => KilnStatus::Backend,
            _ => KilnStatus::Invalid,
        };
        Failure(status, e.to_string())
    }
}

type Outcome = std::result::Result<(), Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
fn set_last_error(msg: &str) {
    // A message never holds a NUL; if one did, it is cut there.
    let text = CString::new(msg.split('\0').next().unwrap_or_default()).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs one entry point's body: its failure or panic becomes a status and
/// this thread's last error.
fn guard(body: impl FnOnce() -> Outcome) -> KilnStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => KilnStatus::Ok,
        Ok(Err(Failure(status, msg))) => {
            set_last_error(&msg);
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".into());
            set_last_error(&format!(
                "internal error in kiln (a bug: please report it): {what}"
            ));
            KilnStatus::Panic
        }
    }
}

fn null(what: &str) -> Failure {
    Failure(KilnStatus::NullPointer, format!("{what} is NULL"))
}

/// Checks that `p` is non-null and aligned for `T`.
fn check_ptr<T>(p: *const T, what: &str) -> Outcome {
    if p.is_null() {
        return Err(null(what));
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Failure(
            KilnStatus::Misaligned,
            format!(
                "{what} ({p:p}) is not aligned to {} bytes",
                std::mem::align_of::<T>()
            ),
        ));
    }
    Ok(())
}

/// The state behind the handle `p`, if it is one of kind `K`.
///
/// # Safety
/// `p` is NULL or a live kiln handle (of any kind).
unsafe fn handle<'a, K: Kind>(p: *const K, what: &str) -> Result<&'a K::State, Failure> {
    let tagged = p.cast::<Tagged<K::State>>();
    check_ptr(tagged, what)?;
    // SAFETY: non-null and aligned (checked); the caller promises a live
    // handle, and every kind's allocation starts with its `u64` tag.
    let tag = unsafe { tagged.cast::<u64>().read() };
    if tag != K::TAG {
        return Err(Failure(
            KilnStatus::BadHandle,
            format!("{what} is not a kiln {} handle", K::NAME),
        ));
    }
    // SAFETY: the tag says this allocation is a `Tagged<K::State>`.
    Ok(unsafe { &(*tagged).state })
}

/// The UTF-8 string behind `p`.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Failure(KilnStatus::Invalid, format!("{what} is not UTF-8")))
}

/// Stores `value` through the out-pointer `out`.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T, what: &str) -> Outcome {
    check_ptr(out, what)?;
    // SAFETY: non-null and aligned (checked), and the caller promises it
    // is valid for a write.
    unsafe { out.write(value) };
    Ok(())
}

/// Runs `f` with the trainer of the image model in `h` locked, unless a
/// panic spoiled it.
fn with_trainer<R>(
    h: &ModelState,
    f: impl FnOnce(&mut Trainer<CpuBackend>) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let mut trainer = locked(h)?;
    image_model(trainer.model())?;
    f(&mut trainer)
}

/// The trainer of the model in `h`, locked, unless a panic spoiled it.
fn locked(h: &ModelState) -> Result<std::sync::MutexGuard<'_, Trainer<CpuBackend>>, Failure> {
    h.trainer.lock().map_err(|_| spoiled())
}

fn spoiled() -> Failure {
    Failure(
        KilnStatus::BadHandle,
        "a panic interrupted an earlier call on this model, whose weights may be half updated: free it and load or build it again".into(),
    )
}

/// Refuses a language model where images are expected.
fn image_model(m: &Sequential<CpuBackend>) -> Result<&Sequential<CpuBackend>, Failure> {
    if m.takes_tokens() {
        return Err(Failure(
            KilnStatus::Invalid,
            format!(
                "model `{}` is a language model: the C ABI trains and runs image classifiers (use `kiln generate` or `kiln serve` for text)",
                m.name()
            ),
        ));
    }
    Ok(m)
}

/// kiln's version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn kiln_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("the version holds no NUL"),
        };
    VERSION.as_ptr()
}

/// The message of this thread's last failed call ("" if none failed yet).
/// The pointer stays valid until this thread's next failing call.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Creates a CPU backend into `*out`.
///
/// `kernels` is NULL or `"auto"` for the best kernel set this processor
/// runs, or one of `"scalar"`, `"avx2"`, `"avx512"`, `"neon"` (an error if
/// the processor lacks it); `threads` is the team's size, 0 for
/// `KILN_THREADS` or else every core. Results never depend on the thread
/// count.
///
/// # Safety
/// `kernels` is NULL or a NUL-terminated string; `out` is valid for a
/// write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn kiln_backend_new(
    kernels: *const c_char,
    threads: usize,
    out: *mut *mut KilnBackend,
) -> KilnStatus {
    guard(|| {
        check_ptr(out, "out")?;
        let kernels = if kernels.is_null() {
            None
        } else {
            // SAFETY: non-null, and the caller promises a C string.
            Some(unsafe { text(kernels, "kernels") }?)
        };
        let backend = CpuBackend::configured(kernels, threads)?;
        let name = CString::new(format!(
            "{} ({} threads)",
            backend.name(),
            backend.threads()
        ))
        .unwrap_or_default();
        let h = into_handle::<KilnBackend>(BackendState { backend, name });
        // SAFETY: `out` was checked; the caller promises it is writable.
        unsafe { put(out, h, "out") }
    })
}

/// The backend's description (its kernel set and thread count), valid
/// while the backend lives; NULL if `backend` is not a backend handle.
///
/// # Safety
/// `backend` is NULL or a live kiln handle.
#[no_mangle]
pub unsafe extern "C" fn kiln_backend_name(backend: *const KilnBackend) -> *const c_char {
    // SAFETY: as the caller promises.
    match unsafe { handle(backend, "backend") } {
        Ok(b) => b.name.as_ptr(),
        Err(Failure(_, msg)) => {
            set_last_error(&msg);
            std::ptr::null()
        }
    }
}

/// Frees a backend (NULL is ignored). Models made on it keep their own
/// reference and stay usable.
///
/// # Safety
/// `backend` is NULL or a backend handle not yet freed, not in use on
/// another thread.
#[no_mangle]
pub unsafe extern "C" fn kiln_backend_free(backend: *mut KilnBackend) {
    // SAFETY: as the caller promises; a handle of another kind is left
    // alone (and reported) rather than freed as the wrong type.
    unsafe { free_handle(backend, "backend") }
}

/// Frees a handle of kind `K` made by [`into_handle`].
///
/// # Safety
/// As the `kiln_*_free` functions.
unsafe fn free_handle<K: Kind>(p: *mut K, what: &str) {
    if p.is_null() {
        return;
    }
    let _ = guard(|| {
        // SAFETY: as the caller promises.
        unsafe { handle(p, what) }?;
        // SAFETY: a live handle of kind `K` (its tag checked), made by
        // `into_handle`'s `Box::into_raw`, freed once (the caller's promise).
        drop(unsafe { Box::from_raw(p.cast::<Tagged<K::State>>()) });
        Ok(())
    });
}

/// Builds a freshly initialised model into `*out`: `spec` is a built-in
/// model's name (`"mlp"`, `"cnn"`) or the path of a model spec file
/// (`.toml`, or `.json`); `seed` seeds the initial weights.
///
/// # Safety
/// `backend` is a live backend handle; `spec` a NUL-terminated string;
/// `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_new(
    backend: *const KilnBackend,
    spec: *const c_char,
    seed: u64,
    out: *mut *mut KilnModel,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let b = unsafe { handle(backend, "backend") }?;
        // SAFETY: as the caller promises.
        let spec = ModelSpec::resolve(unsafe { text(spec, "spec") }?)?;
        check_ptr(out, "out")?;
        let model = Sequential::from_spec(&spec, seed, &b.backend)?;
        // SAFETY: `out` was checked; the caller promises it is writable.
        unsafe { put(out, new_model(&b.backend, model)?, "out") }
    })
}

fn new_model(
    backend: &CpuBackend,
    model: Sequential<CpuBackend>,
) -> Result<*mut KilnModel, Failure> {
    let optimizer: Box<dyn Optimizer<CpuBackend>> = Box::new(Adam::new(1e-3)?);
    let trainer = Trainer::new(
        model,
        optimizer,
        Loss::CategoricalCrossEntropy,
        backend.clone(),
    );
    Ok(into_handle::<KilnModel>(ModelState {
        trainer: Mutex::new(trainer),
    }))
}

/// Loads a model into `*out` from a model file written by `kiln train` or
/// [`kiln_model_save`], its folder (`model.safetensors` in it), or a
/// checkpoint (its optimiser state is ignored).
///
/// # Safety
/// `backend` is a live backend handle; `path` a NUL-terminated string;
/// `out` valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_load(
    backend: *const KilnBackend,
    path: *const c_char,
    out: *mut *mut KilnModel,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let b = unsafe { handle(backend, "backend") }?;
        // SAFETY: as the caller promises.
        let path = PathBuf::from(unsafe { text(path, "path") }?);
        check_ptr(out, "out")?;
        let (loaded, _) = model_file::load_for_inference(&path, &b.backend)?;
        // SAFETY: `out` was checked; the caller promises it is writable.
        unsafe { put(out, new_model(&b.backend, loaded.model)?, "out") }
    })
}

/// Saves the model's spec and weights to `path` (written atomically: a
/// crash leaves the old file or the new one); `kiln_model_load`,
/// `kiln eval`, `kiln predict` and `kiln serve` read it.
///
/// # Safety
/// `model` is a live model handle; `path` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_save(
    model: *const KilnModel,
    path: *const c_char,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let h = unsafe { handle(model, "model") }?;
        // SAFETY: as the caller promises.
        let path = Path::new(unsafe { text(path, "path") }?);
        Ok(model_file::save(path, locked(h)?.model(), &HashMap::new())?)
    })
}

/// The floats one example takes (`channels × height × width`) into
/// `*input_len`, and the number of classes the model outputs into
/// `*classes`. Either pointer may be NULL.
///
/// # Safety
/// `model` is a live model handle; `input_len` and `classes` are NULL or
/// valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_sizes(
    model: *const KilnModel,
    input_len: *mut usize,
    classes: *mut usize,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let h = unsafe { handle(model, "model") }?;
        let (input, output) = with_trainer(h, |t| sizes(t.model()))?;
        if !input_len.is_null() {
            // SAFETY: non-null; the caller promises it is writable.
            unsafe { put(input_len, input, "input_len") }?;
        }
        if !classes.is_null() {
            // SAFETY: non-null; the caller promises it is writable.
            unsafe { put(classes, output, "classes") }?;
        }
        Ok(())
    })
}

/// Floats per example in, classes out.
fn sizes(m: &Sequential<CpuBackend>) -> Result<(usize, usize), Failure> {
    let input = m.input_shape().iter().product();
    let output = m.output_shape()?.iter().product();
    Ok((input, output))
}

/// Class probabilities for `n` examples: `input` holds `input_len` floats
/// (`n` times [`kiln_model_sizes`]' input length, pixels in `[0, 1]`,
/// `[n, channels, height, width]` row-major), and `probs` receives `n`
/// rows of `classes` probabilities (`probs_len` must be at least `n ×
/// classes`). Neither buffer is kept.
///
/// # Safety
/// `model` is a live model handle; `input` is valid for reads of
/// `input_len` floats and `probs` for writes of `probs_len` floats, and
/// the two do not overlap.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_predict(
    model: *const KilnModel,
    input: *const f32,
    input_len: usize,
    n: usize,
    probs: *mut f32,
    probs_len: usize,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let h = unsafe { handle(model, "model") }?;
        check_ptr(input, "input")?;
        check_ptr(probs, "probs")?;
        with_trainer(h, |t| {
            let m = t.model();
            let (per, classes) = sizes(m)?;
            if n == 0 {
                return Err(Failure(
                    KilnStatus::Size,
                    "n is 0: predict at least one example".into(),
                ));
            }
            let want = n.checked_mul(per).ok_or_else(|| too_many(n))?;
            if input_len != want {
                return Err(Failure(
                    KilnStatus::Size,
                    format!(
                        "input holds {input_len} floats; {n} examples of {per} ({:?}) take {want}",
                        m.input_shape()
                    ),
                ));
            }
            let out_len = n.checked_mul(classes).ok_or_else(|| too_many(n))?;
            if probs_len < out_len {
                return Err(Failure(
                KilnStatus::Size,
                format!("probs holds {probs_len} floats; {n} examples of {classes} classes take {out_len}"),
            ));
            }
            // SAFETY: non-null and aligned (checked); the caller promises
            // `input_len` readable floats.
            let pixels = unsafe { std::slice::from_raw_parts(input, input_len) };
            let p = t.predict(pixels, n)?.to_vec_f32()?;
            // SAFETY: non-null and aligned (checked); the caller promises
            // `probs_len ≥ out_len` writable floats not overlapping `input`.
            let dst = unsafe { std::slice::from_raw_parts_mut(probs, out_len) };
            dst.copy_from_slice(&p[..out_len]);
            Ok(())
        })
    })
}

fn too_many(n: usize) -> Failure {
    Failure(
        KilnStatus::Size,
        format!("n = {n} examples overflow a size_t"),
    )
}

/// Loads an IDX dataset folder (the layout of MNIST and Fashion-MNIST:
/// `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, and
/// `t10k-…` for the test split) into `*out`.
///
/// # Safety
/// `dir` is a NUL-terminated string; `out` is valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn kiln_dataset_load_idx(
    dir: *const c_char,
    split: KilnSplit,
    out: *mut *mut KilnDataset,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let dir = Path::new(unsafe { text(dir, "dir") }?);
        check_ptr(out, "out")?;
        let split = match split {
            KilnSplit::Train => Split::Train,
            KilnSplit::Test => Split::Test,
        };
        let name = dir
            .file_name()
            .map_or("idx".into(), |n| n.to_string_lossy());
        let dataset = Dataset::from_dir(&name, dir, split)?;
        // SAFETY: `out` was checked; the caller promises it is writable.
        unsafe { put(out, new_dataset(dataset), "out") }
    })
}

fn new_dataset(dataset: Dataset) -> *mut KilnDataset {
    into_handle::<KilnDataset>(DatasetState { dataset })
}

/// Makes a dataset into `*out` from the caller's buffers, which are
/// copied: `images` holds `n × rows × cols` bytes (one gray channel,
/// row-major), `labels` holds `n` class indices, each below `classes`.
///
/// # Safety
/// `images` is valid for reads of `n × rows × cols` bytes and `labels` of
/// `n` bytes; `out` is valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn kiln_dataset_from_buffers(
    images: *const u8,
    labels: *const u8,
    n: usize,
    rows: usize,
    cols: usize,
    classes: usize,
    out: *mut *mut KilnDataset,
) -> KilnStatus {
    guard(|| {
        check_ptr(images, "images")?;
        check_ptr(labels, "labels")?;
        check_ptr(out, "out")?;
        if !(1..=256).contains(&classes) {
            return Err(Failure(
                KilnStatus::Invalid,
                format!("classes = {classes}: u8 labels name 1 to 256 classes"),
            ));
        }
        let len = n
            .checked_mul(rows)
            .and_then(|v| v.checked_mul(cols))
            .ok_or_else(|| too_many(n))?;
        // SAFETY: non-null (checked); the caller promises `len` and `n`
        // readable bytes.
        let (px, ls) = unsafe {
            (
                std::slice::from_raw_parts(images, len),
                std::slice::from_raw_parts(labels, n),
            )
        };
        let dataset = Dataset::from_idx(
            "buffers",
            IdxArray {
                dims: vec![n, rows, cols],
                data: px.to_vec(),
            },
            IdxArray {
                dims: vec![n],
                data: ls.to_vec(),
            },
            classes,
        )
        .map_err(|e| Failure(KilnStatus::Invalid, format!("the buffers: {e}")))?;
        // SAFETY: `out` was checked; the caller promises it is writable.
        unsafe { put(out, new_dataset(dataset), "out") }
    })
}

/// The number of examples in a dataset into `*len`.
///
/// # Safety
/// `dataset` is a live dataset handle; `len` is valid for a write of a
/// `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kiln_dataset_len(
    dataset: *const KilnDataset,
    len: *mut usize,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let d = unsafe { handle(dataset, "dataset") }?;
        // SAFETY: as the caller promises.
        unsafe { put(len, d.dataset.len(), "len") }
    })
}

/// Frees a dataset (NULL is ignored).
///
/// # Safety
/// `dataset` is NULL or a dataset handle not yet freed, not in use on
/// another thread.
#[no_mangle]
pub unsafe extern "C" fn kiln_dataset_free(dataset: *mut KilnDataset) {
    // SAFETY: as the caller promises.
    unsafe { free_handle(dataset, "dataset") }
}

/// The defaults of [`kiln_model_fit`]: 1 epoch, batches of 128, learning
/// rate 0.001, seed 1, silent.
#[no_mangle]
pub extern "C" fn kiln_fit_options_default() -> KilnFitOptions {
    KilnFitOptions {
        epochs: 1,
        batch_size: 128,
        learning_rate: 1e-3,
        seed: 1,
        verbose: 0,
    }
}

/// Trains the model on `train` with Adam and categorical cross-entropy
/// (the seed's Keras recipe: `ε` = 1e-7 added to `√v`), shuffling every
/// epoch; `options` may be NULL for [`kiln_fit_options_default`], and
/// `result` NULL if not wanted. The images are scaled by 1/255 on the way
/// in, as [`kiln_model_predict`] expects its inputs. The optimiser's state
/// carries over from one call to the next, as Keras' `fit` does.
///
/// # Safety
/// `model` is a live model handle not in use elsewhere; `train` a live
/// dataset handle; `options` NULL or valid for a read and `result` NULL
/// or valid for a write of their structs.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_fit(
    model: *mut KilnModel,
    train: *const KilnDataset,
    options: *const KilnFitOptions,
    result: *mut KilnFitResult,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let h = unsafe { handle(model, "model") }?;
        // SAFETY: as the caller promises.
        let d = unsafe { handle(train, "train") }?;
        let o = if options.is_null() {
            kiln_fit_options_default()
        } else {
            check_ptr(options, "options")?;
            // SAFETY: non-null and aligned (checked); the caller promises
            // a readable struct.
            unsafe { options.read() }
        };
        if !result.is_null() {
            check_ptr(result, "result")?;
        }
        kiln_nn::optim::check_lr(o.learning_rate as f32)?;
        let cfg = FitConfig {
            epochs: o.epochs as usize,
            batch_size: o.batch_size as usize,
            seed: o.seed,
            shuffle: true,
            verbosity: if o.verbose == 0 {
                Verbosity::Silent
            } else {
                Verbosity::Lines
            },
            ..FitConfig::default()
        };
        // Checked before the learning rate is set: a refused call changes nothing.
        cfg.check()?;
        // A panic poisons the lock (the weights may be half updated).
        let history = with_trainer(h, |t| {
            t.optimizer_mut().set_lr(o.learning_rate as f32);
            Ok(t.fit(&d.dataset, None, &cfg)?)
        })?;
        if !result.is_null() {
            let last = history.epochs.last();
            let r = KilnFitResult {
                epochs: history.epochs.len() as u32,
                loss: last.map_or(f64::NAN, |e| e.loss),
                accuracy: last.map_or(f64::NAN, |e| e.accuracy),
                seconds: history.epochs.iter().map(|e| e.seconds).sum(),
            };
            // SAFETY: non-null and aligned (checked); the caller promises
            // it is writable.
            unsafe { put(result, r, "result") }?;
        }
        Ok(())
    })
}

/// Loss and accuracy of the model on `dataset` (in batches of
/// `batch_size`, 0 for 1000) into `*out`.
///
/// # Safety
/// `model` and `dataset` are live handles; `out` is valid for a write of a
/// [`KilnEvaluation`].
#[no_mangle]
pub unsafe extern "C" fn kiln_model_evaluate(
    model: *const KilnModel,
    dataset: *const KilnDataset,
    batch_size: usize,
    out: *mut KilnEvaluation,
) -> KilnStatus {
    guard(|| {
        // SAFETY: as the caller promises.
        let h = unsafe { handle(model, "model") }?;
        // SAFETY: as the caller promises.
        let d = unsafe { handle(dataset, "dataset") }?;
        check_ptr(out, "out")?;
        let batch = if batch_size == 0 { 1000 } else { batch_size };
        let e = with_trainer(h, |t| Ok(t.evaluate(&d.dataset, batch)?))?;
        let r = KilnEvaluation {
            loss: e.loss,
            accuracy: e.accuracy,
            examples: e.examples as u64,
        };
        // SAFETY: checked; the caller promises it is writable.
        unsafe { put(out, r, "out") }
    })
}

/// Frees a model (NULL is ignored).
///
/// # Safety
/// `model` is NULL or a model handle not yet freed, not in use on another
/// thread.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_free(model: *mut KilnModel) {
    // SAFETY: as the caller promises.
    unsafe { free_handle(model, "model") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_their_numbers() {
        assert_eq!(KilnStatus::Ok as i32, 0);
        assert_eq!(KilnStatus::Panic as i32, 8);
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom"));
        assert_eq!(status, KilnStatus::Panic);
        // SAFETY: kiln_last_error returns a live C string.
        let msg = unsafe { CStr::from_ptr(kiln_last_error()) }
            .to_str()
            .unwrap();
        assert!(msg.contains("boom") && msg.contains("bug"), "{msg}");
    }
}
