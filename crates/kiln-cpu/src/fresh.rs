//! Fresh output buffers, written once with no zeroing pass first.
//!
//! A kernel that writes every element of its output does not need the
//! output zeroed beforehand; zeroing it anyway is one more pass over memory
//! (about a tenth of a GPT training step's samples were `memset`). Kernels
//! that write fresh outputs take `&mut [MaybeUninit<f32>]` — or any
//! [`Slot`] — and the buffer becomes a `Vec<f32>` once every element is
//! written ([`crate::workers::Workers::filled`]).

use std::mem::MaybeUninit;

/// An output element: `f32` in a buffer that already holds values, or
/// `MaybeUninit<f32>` in a fresh one (written, never read before that).
pub(crate) trait Slot {
    /// Stores `v`.
    fn put(&mut self, v: f32);
}

impl Slot for f32 {
    #[inline(always)]
    fn put(&mut self, v: f32) {
        *self = v;
    }
}

impl Slot for MaybeUninit<f32> {
    #[inline(always)]
    fn put(&mut self, v: f32) {
        self.write(v);
    }
}

/// Fills `s` with zeros and returns it initialised.
#[inline]
pub(crate) fn zeros(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    filled_with(s, 0.0)
}

/// Fills `s` with `v` and returns it initialised.
#[inline]
pub(crate) fn filled_with<T: Copy>(s: &mut [MaybeUninit<T>], v: T) -> &mut [T] {
    s.fill(MaybeUninit::new(v));
    // SAFETY: every element was just written, and `MaybeUninit<T>` has
    // the layout of `T`.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `s` as the floats it holds.
///
/// # Safety
/// Every element of `s` has been written.
#[inline]
pub(crate) unsafe fn assume_written(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: initialised (the caller's promise); same layout.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// An initialised buffer seen as slots, for kernels that take fresh ones.
///
/// # Safety
/// Only initialised values are written through the result (a `Slot` or
/// `MaybeUninit::write` does that; `MaybeUninit::uninit()` must not be).
#[inline]
pub(crate) unsafe fn as_slots<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: same layout; the caller writes only initialised values, so
    // `s` stays initialised.
    unsafe { &mut *(s as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// Copies `src` into the fresh `dst` (of the same length).
#[inline]
pub(crate) fn copy(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "a fresh copy's lengths");
    // SAFETY: both hold `src.len()` floats and cannot overlap (`dst` is
    // borrowed mutably); `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) };
}
