//! The C ABI called from Rust: datasets from buffers, training that fails
//! and hands the model back intact, and arguments refused with messages.

use std::ffi::CStr;
use std::ptr;

use kiln_capi::*;

fn last_error() -> String {
    // SAFETY: kiln_last_error always returns a live C string.
    unsafe { CStr::from_ptr(kiln_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A backend with one thread.
fn backend() -> *mut KilnBackend {
    let mut b = ptr::null_mut();
    // SAFETY: `b` is a valid out-pointer.
    let status = unsafe { kiln_backend_new(ptr::null(), 1, &mut b) };
    assert_eq!(status, KilnStatus::Ok);
    b
}

/// `n` images of `side × side` bytes, each of class `i % 10` with one
/// bright row band per class (rows `l·side/10 ..`): linearly separable.
fn buffers(n: usize, side: usize) -> (Vec<u8>, Vec<u8>) {
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let band = (side / 10).max(1);
    let images = labels
        .iter()
        .flat_map(|&l| {
            (0..side * side).map(move |p| {
                if p / side / band == usize::from(l) {
                    255
                } else {
                    0
                }
            })
        })
        .collect();
    (images, labels)
}

#[test]
fn a_model_trained_on_buffers_learns_them() {
    let b = backend();
    let (images, labels) = buffers(500, 28);
    let (mut ds, mut model) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: the buffers outlive the calls and hold what the sizes say;
    // every handle is freed once, at the end.
    unsafe {
        let s =
            kiln_dataset_from_buffers(images.as_ptr(), labels.as_ptr(), 500, 28, 28, 10, &mut ds);
        assert_eq!(s, KilnStatus::Ok, "{}", last_error());
        assert_eq!(
            kiln_model_new(b, c"mlp".as_ptr(), 3, &mut model),
            KilnStatus::Ok
        );
        let opts = KilnFitOptions {
            epochs: 5,
            batch_size: 50,
            learning_rate: 1e-2,
            ..kiln_fit_options_default()
        };
        let mut fit = KilnFitResult::default();
        assert_eq!(
            kiln_model_fit(model, ds, &opts, &mut fit),
            KilnStatus::Ok,
            "{}",
            last_error()
        );
        assert_eq!(fit.epochs, 5);
        let mut ev = KilnEvaluation::default();
        assert_eq!(kiln_model_evaluate(model, ds, 0, &mut ev), KilnStatus::Ok);
        assert_eq!(ev.examples, 500);
        assert!(
            ev.accuracy > 0.9,
            "accuracy {} on ten separable classes",
            ev.accuracy
        );
        kiln_model_free(model);
        kiln_dataset_free(ds);
        kiln_backend_free(b);
    }
}

#[test]
fn a_dataset_that_does_not_fit_the_model_is_refused_and_the_model_survives() {
    let b = backend();
    let (images, labels) = buffers(20, 10);
    let (mut ds, mut model) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            kiln_dataset_from_buffers(images.as_ptr(), labels.as_ptr(), 20, 10, 10, 10, &mut ds),
            KilnStatus::Ok
        );
        assert_eq!(
            kiln_model_new(b, c"mlp".as_ptr(), 3, &mut model),
            KilnStatus::Ok
        );
        let s = kiln_model_fit(model, ds, ptr::null(), ptr::null_mut());
        assert_eq!(s, KilnStatus::Size);
        let msg = last_error();
        assert!(msg.contains("28") && msg.contains("10"), "{msg}");
        // The model is intact: it still predicts.
        let (x, mut p) = (vec![0.25f32; 784], vec![0f32; 10]);
        let s = kiln_model_predict(model, x.as_ptr(), 784, 1, p.as_mut_ptr(), 10);
        assert_eq!(s, KilnStatus::Ok, "{}", last_error());
        kiln_model_free(model);
        kiln_dataset_free(ds);
        kiln_backend_free(b);
    }
}

#[test]
fn bad_buffers_and_handles_are_refused_with_a_message() {
    let b = backend();
    let (images, mut labels) = buffers(10, 4);
    labels[3] = 12;
    let mut ds = ptr::null_mut();
    // SAFETY: the buffers hold what the sizes say; nothing is made.
    unsafe {
        let s = kiln_dataset_from_buffers(images.as_ptr(), labels.as_ptr(), 10, 4, 4, 10, &mut ds);
        assert_eq!(s, KilnStatus::Invalid);
        assert!(last_error().contains("12"), "{}", last_error());
        assert!(ds.is_null());
        let s = kiln_dataset_from_buffers(images.as_ptr(), labels.as_ptr(), 10, 4, 4, 0, &mut ds);
        assert_eq!(s, KilnStatus::Invalid);
        let mut n = 0;
        assert_eq!(
            kiln_dataset_len(ptr::null(), &mut n),
            KilnStatus::NullPointer
        );
        assert_eq!(last_error(), "dataset is NULL");
        assert_eq!(
            kiln_dataset_len(b.cast::<KilnDataset>(), &mut n),
            KilnStatus::BadHandle
        );
        assert!(!kiln_backend_name(b).is_null());
        assert_eq!(
            kiln_model_sizes(ptr::null(), ptr::null_mut(), ptr::null_mut()),
            KilnStatus::NullPointer
        );
        kiln_backend_free(b);
    }
}
