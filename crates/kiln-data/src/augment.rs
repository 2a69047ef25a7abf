//! Random affine augmentation, the equivalent of Keras'
//! `ImageDataGenerator(rotation_range=20, width_shift_range=0.1,
//! height_shift_range=0.1, zoom_range=0.1)`: per image, a rotation, a shift
//! and a zoom about the centre, sampled bilinearly with `nearest` fill
//! (coordinates outside the image take the edge's value).
//!
//! Each image's transform is drawn from the Philox stream of the seed at a
//! counter given by the epoch and the example's index in the dataset, so it
//! does not depend on batch size, order or thread count, and a resumed run
//! draws the same transforms.
//!
//! ```
//! use kiln_data::Augment;
//!
//! // Keras' defaults: ±20° rotation, 10 % shifts and zoom, drawn per (epoch, example).
//! let a = Augment::keras_default(7);
//! let t = a.transform(0, 42, 28, 28);
//! assert_eq!(t, a.transform(0, 42, 28, 28), "the same draw every time");
//! assert_ne!(t, a.transform(1, 42, 28, 28), "another epoch, another draw");
//! let src = vec![1.0f32; 28 * 28];
//! let mut dst = vec![0.0f32; 28 * 28];
//! t.apply(&src, 28, 28, &mut dst);
//! assert!(dst.iter().all(|&v| (0.0..=1.0).contains(&v)));
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::rng;

/// The ranges transforms are drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Rotation angle, uniform in ±this many degrees.
    pub rotation_degrees: f32,
    /// Horizontal shift, uniform in ±this fraction of the width.
    pub width_shift: f32,
    /// Vertical shift, uniform in ±this fraction of the height.
    pub height_shift: f32,
    /// Zoom, per axis uniform in [1 − z, 1 + z] (Keras' `zoom_range`).
    pub zoom: f32,
    /// The seed of the transforms.
    pub seed: u64,
}

/// One image's transform: output pixel `(r, c)` samples the input at
/// `R(θ)·(Z·p + t) + centre` with `p = (r, c) − centre` (Keras' composition
/// of rotation, shift and zoom).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    /// Rotation in radians (counter-clockwise as displayed).
    pub theta: f32,
    /// Shift in pixels: rows, columns.
    pub shift: [f32; 2],
    /// Zoom: rows, columns (above 1 shows more of the image, smaller).
    pub zoom: [f32; 2],
}

impl Affine {
    /// The identity.
    pub const IDENTITY: Affine = Affine {
        theta: 0.0,
        shift: [0.0, 0.0],
        zoom: [1.0, 1.0],
    };

    /// Warps the `h × w` image `src` into `dst` (both row-major).
    pub fn apply(&self, src: &[f32], h: usize, w: usize, dst: &mut [f32]) {
        if h == 0 || w == 0 {
            return;
        }
        let (cr, cc) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
        let (sin, cos) = self.theta.sin_cos();
        for r in 0..h {
            for c in 0..w {
                let pr = (r as f32 - cr) * self.zoom[0] + self.shift[0];
                let pc = (c as f32 - cc) * self.zoom[1] + self.shift[1];
                // Rows grow downwards: a positive angle turns the picture
                // counter-clockwise on screen.
                let sr = cos * pr + sin * pc + cr;
                let sc = -sin * pr + cos * pc + cc;
                dst[r * w + c] = bilinear(src, h, w, sr, sc);
            }
        }
    }
}

/// The image at fractional `(r, c)`, coordinates clamped to the image
/// (`nearest` fill). Exactly the pixel at integer coordinates.
fn bilinear(src: &[f32], h: usize, w: usize, r: f32, c: f32) -> f32 {
    let r = r.clamp(0.0, (h - 1) as f32);
    let c = c.clamp(0.0, (w - 1) as f32);
    let (r0, c0) = (r.floor() as usize, c.floor() as usize);
    let (fr, fc) = (r - r0 as f32, c - c0 as f32);
    let (r1, c1) = ((r0 + 1).min(h - 1), (c0 + 1).min(w - 1));
    let at = |rr: usize, cc: usize| src[rr * w + cc];
    if fr == 0.0 && fc == 0.0 {
        return at(r0, c0);
    }
    let top = at(r0, c0) + (at(r0, c1) - at(r0, c0)) * fc;
    let bottom = at(r1, c0) + (at(r1, c1) - at(r1, c0)) * fc;
    top + (bottom - top) * fr
}

/// Philox counters per image: five draws each.
const DRAWS: u64 = 5;

impl Augment {
    /// Keras' `ImageDataGenerator(rotation_range=20, width_shift_range=0.1,
    /// height_shift_range=0.1, zoom_range=0.1)`.
    pub fn keras_default(seed: u64) -> Self {
        Augment {
            rotation_degrees: 20.0,
            width_shift: 0.1,
            height_shift: 0.1,
            zoom: 0.1,
            seed,
        }
    }

    /// The transform of example `index` in `epoch`, for `h × w` images.
    pub fn transform(&self, epoch: u64, index: u64, h: usize, w: usize) -> Affine {
        let base = index * DRAWS;
        // Each epoch its own Philox key stream.
        let key = self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let u = |k: u64| 2.0 * rng::uniform(key, 0, base + k) - 1.0; // [−1, 1)
        Affine {
            theta: (self.rotation_degrees * u(0)).to_radians(),
            shift: [
                self.height_shift * h as f32 * u(1),
                self.width_shift * w as f32 * u(2),
            ],
            zoom: [1.0 + self.zoom * u(3), 1.0 + self.zoom * u(4)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<f32> {
        (0..28 * 28)
            .map(|i| ((i * 37) % 256) as f32 / 255.0)
            .collect()
    }

    #[test]
    fn the_identity_returns_the_input_exactly() {
        let src = image();
        let mut dst = vec![0.0; src.len()];
        Affine::IDENTITY.apply(&src, 28, 28, &mut dst);
        assert_eq!(src, dst);
    }

    #[test]
    fn a_quarter_turn_moves_a_known_pixel() {
        // One bright pixel at row 2, column 20 of a 28×28 image (centre
        // 13.5, 13.5): 6.5 right of and 11.5 above the centre. A quarter
        // turn counter-clockwise puts it 6.5 above and 11.5 left of the
        // centre: row 7, column 2.
        let mut src = vec![0.0; 28 * 28];
        src[2 * 28 + 20] = 1.0;
        let mut dst = vec![0.0; 28 * 28];
        let turn = Affine {
            theta: std::f32::consts::FRAC_PI_2,
            ..Affine::IDENTITY
        };
        turn.apply(&src, 28, 28, &mut dst);
        let (at, max) = dst
            .iter()
            .enumerate()
            .fold((0, 0.0f32), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        assert_eq!((at / 28, at % 28), (7, 2), "brightest pixel");
        assert!(max > 0.99, "a quarter turn lands on the grid: {max}");
    }

    #[test]
    fn shifts_move_content_and_fill_with_the_edge() {
        let src: Vec<f32> = (0..5 * 5).map(|i| i as f32).collect();
        let mut dst = vec![0.0; 25];
        // Shift by +1 column: output (r, c) reads input (r, c + 1).
        Affine {
            shift: [0.0, 1.0],
            ..Affine::IDENTITY
        }
        .apply(&src, 5, 5, &mut dst);
        assert_eq!(&dst[..5], &[1.0, 2.0, 3.0, 4.0, 4.0]);
    }

    #[test]
    fn transforms_are_reproducible_and_in_range() {
        let a = Augment::keras_default(7);
        let mut seen = 0.0f32;
        for i in 0..1000 {
            let t = a.transform(3, i, 28, 28);
            assert_eq!(t, a.transform(3, i, 28, 28));
            assert!(t.theta.abs() <= 20f32.to_radians() + 1e-6);
            assert!(t.shift.iter().all(|s| s.abs() <= 2.8 + 1e-5));
            assert!(t.zoom.iter().all(|z| (0.9..=1.1).contains(z)));
            seen = seen.max(t.theta.abs());
        }
        assert!(seen > 19f32.to_radians(), "the range is used");
        assert_ne!(a.transform(3, 0, 28, 28), a.transform(4, 0, 28, 28));
    }
}
