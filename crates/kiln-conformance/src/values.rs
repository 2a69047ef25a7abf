//! Strategies for shapes, layouts and values: the awkward cases.
//!
//! - extents: 0, 1, primes, and sizes one off the usual tile widths;
//! - layouts: contiguous, permuted (transposed), sliced out of a larger
//!   buffer with an offset, and broadcast (stride 0);
//! - values: ordinary ones mixed with ±0, ±1, subnormals, magnitudes from
//!   1e-30 to 1e30, ±∞ and NaN, each rounded to the storage type first so the
//!   oracle sees exactly what the backend sees.
//!
//! ```
//! use kiln_conformance::values::shape;
//! use proptest::strategy::{Strategy, ValueTree};
//! use proptest::test_runner::TestRunner;
//!
//! // Shapes of rank ≤ 3 with extents ≤ 5, zeros and ones included.
//! let mut runner = TestRunner::deterministic();
//! for _ in 0..20 {
//!     let dims = shape(3, 5).new_tree(&mut runner).unwrap().current();
//!     assert!(dims.len() <= 3 && dims.iter().all(|&d| d <= 5));
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Backend, DType, HostData, Layout, Result, Shape};
use proptest::prelude::*;

use crate::bound::round_to;

/// Which values an operand may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Domain {
    /// Anything: mostly moderate values, some specials (±0, ±1, subnormals,
    /// ±1e±30, ±∞, NaN).
    General,
    /// Finite values only, including very large and very small ones.
    Finite,
    /// Uniform in `[-r, r]`.
    Moderate(f64),
    /// Non-negative, with zeros, subnormals and large values.
    Positive,
}

const SPECIALS: [f64; 14] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e-30,
    -1e-30,
    1e30,
    -1e30,
    1e-40, // an f32 subnormal
    -1e-40,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::NAN,
    65504.0,
];

/// One value of `domain`, rounded to `dtype`.
pub fn value(domain: Domain, dtype: DType) -> BoxedStrategy<f64> {
    if dtype == DType::U32 {
        return prop_oneof![
            1 => prop::sample::select(vec![0u32, 1, 2, 255, 1 << 24, (1 << 24) + 1, u32::MAX]),
            3 => any::<u32>(),
        ]
        .prop_map(f64::from)
        .boxed();
    }
    let s: BoxedStrategy<f64> = match domain {
        Domain::General => prop_oneof![
            8 => -4.0f64..4.0,
            2 => prop::sample::select(SPECIALS.to_vec()),
        ]
        .boxed(),
        Domain::Finite => prop_oneof![
            8 => -4.0f64..4.0,
            2 => prop::sample::select(SPECIALS.iter().copied().filter(|v| v.is_finite()).collect::<Vec<_>>()),
            1 => (-30i32..30, -1.0f64..1.0).prop_map(|(e, m)| m * 10f64.powi(e)),
        ]
        .boxed(),
        Domain::Moderate(r) => (-r..r).boxed(),
        Domain::Positive => prop_oneof![
            8 => 0.0f64..8.0,
            2 => prop::sample::select(vec![0.0, 1e-40, 1e-30, 1e30, f64::INFINITY, 1.0]),
        ]
        .boxed(),
    };
    // Finite domains stay finite in narrow formats (1e30 is ∞ in f16).
    let clamp = !matches!(domain, Domain::General | Domain::Positive);
    s.prop_map(move |v| {
        let r = round_to(dtype, v);
        if clamp && r.is_infinite() {
            crate::bound::max_finite(dtype).copysign(r)
        } else {
            r
        }
    })
    .boxed()
}

/// Extents that stress edge handling: 0, 1, primes, one off a tile.
pub fn extent(max: usize) -> BoxedStrategy<usize> {
    let awkward: Vec<usize> = [0, 1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 33, 63, 65]
        .into_iter()
        .filter(|&d| d <= max)
        .collect();
    prop_oneof![2 => prop::sample::select(awkward), 1 => 1..=max.max(1)].boxed()
}

/// Extents that are never 0.
pub fn nonzero_extent(max: usize) -> BoxedStrategy<usize> {
    extent(max).prop_map(|d| d.max(1)).boxed()
}

/// A shape of rank `1..=max_rank` with extents up to `max`.
pub fn shape(max_rank: usize, max: usize) -> BoxedStrategy<Vec<usize>> {
    prop::collection::vec(extent(max), 1..=max_rank).boxed()
}

/// How an operand's logical elements sit in its storage.
#[derive(Clone, Debug, PartialEq)]
pub enum Arrangement {
    /// Row-major, from offset 0.
    Contiguous,
    /// Stored in another dimension order (a transposed view).
    Permuted(Vec<usize>),
    /// A window of a larger buffer: per dimension, `(start, padding)`.
    Sliced(Vec<(usize, usize)>),
    /// Dimensions in the mask are stored once and broadcast (stride 0).
    Broadcast(Vec<bool>),
}

/// An operand: storage values (already representable in the dtype) and the
/// layout through which the op reads them. Its `Debug` form lists short
/// storages in full and summarises long ones (a failure report stays
/// readable when the case is a 2048 × 4096 matrix).
#[derive(Clone)]
pub struct Operand {
    /// The element type.
    pub dtype: DType,
    /// Every storage element.
    pub storage: Vec<f64>,
    /// The view the op sees.
    pub layout: Layout,
}

impl Operand {
    /// A contiguous operand.
    pub fn contiguous(dtype: DType, dims: &[usize], values: Vec<f64>) -> Self {
        Operand {
            dtype,
            storage: values,
            layout: Layout::contiguous(Shape::new(dims).expect("valid shape")),
        }
    }

    /// The logical dimensions.
    pub fn dims(&self) -> &[usize] {
        self.layout.dims()
    }

    /// The logical elements, row-major.
    pub fn logical(&self) -> Vec<f64> {
        self.layout
            .offsets()
            .into_iter()
            .map(|o| self.storage[o])
            .collect()
    }

    /// The storage as host data of the operand's dtype.
    pub fn host(&self) -> HostData {
        to_host(self.dtype, &self.storage)
    }

    /// Uploads the storage to a backend.
    pub fn upload<B: Backend>(&self, b: &B) -> Result<B::Storage> {
        b.upload(&self.host())
    }
}

impl std::fmt::Debug for Operand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Operand");
        d.field("dtype", &self.dtype)
            .field("dims", &self.layout.dims())
            .field("strides", &self.layout.strides())
            .field("offset", &self.layout.offset());
        if self.storage.len() <= SHOWN {
            d.field("storage", &self.storage);
        } else {
            let count = |p: fn(&f64) -> bool| self.storage.iter().filter(|v| p(v)).count();
            let finite = self.storage.iter().filter(|v| v.is_finite());
            let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            d.field(
                "storage",
                &format_args!(
                    "{} values in [{lo:e}, {hi:e}] with {} NaN and {} ±∞, starting {:?}",
                    self.storage.len(),
                    count(|v| v.is_nan()),
                    count(|v| v.is_infinite()),
                    &self.storage[..8]
                ),
            );
        }
        d.finish()
    }
}

/// Storages up to this length are shown in full in failure reports.
const SHOWN: usize = 32;

/// Operands with more storage elements than this are filled from one
/// drawn seed instead of element by element: generating (and shrinking)
/// hundreds of thousands of proptest values would dominate the run.
pub const DENSE_MAX: usize = 4096;

/// `len` values of `domain` in `dtype`, from `seed`: the domain's main
/// distribution, with about four of its special values (±0, ±∞, NaN,
/// subnormals, huge and tiny magnitudes, as the domain allows) at random
/// places, so that long rows and dot products still mostly hold finite
/// results the bounds can judge.
pub fn seeded_values(domain: Domain, dtype: DType, len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // SplitMix64.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let unit = |bits: u64| (bits >> 11) as f64 / (1u64 << 53) as f64;
    if dtype == DType::U32 {
        return (0..len).map(|_| f64::from(next() as u32)).collect();
    }
    let specials: Vec<f64> = match domain {
        Domain::General => SPECIALS.to_vec(),
        Domain::Finite => SPECIALS.iter().copied().filter(|v| v.is_finite()).collect(),
        Domain::Moderate(_) => Vec::new(),
        Domain::Positive => vec![0.0, 1e-40, 1e-30, 1e30, f64::INFINITY, 1.0],
    };
    let special_odds = 4.0 / len.max(1) as f64;
    let clamp = !matches!(domain, Domain::General | Domain::Positive);
    (0..len)
        .map(|_| {
            let r = next();
            let v = if !specials.is_empty() && unit(next()) < special_odds {
                specials[(r % specials.len() as u64) as usize]
            } else {
                match domain {
                    Domain::General | Domain::Finite => -4.0 + 8.0 * unit(r),
                    Domain::Moderate(m) => m * (2.0 * unit(r) - 1.0),
                    Domain::Positive => 8.0 * unit(r),
                }
            };
            let v = round_to(dtype, v);
            if clamp && v.is_infinite() {
                crate::bound::max_finite(dtype).copysign(v)
            } else {
                v
            }
        })
        .collect()
}

/// `len` storage values of `domain`: drawn one by one for short storages,
/// from one seed ([`seeded_values`]) past [`DENSE_MAX`].
pub fn storage(domain: Domain, dtype: DType, len: usize) -> BoxedStrategy<Vec<f64>> {
    if len > DENSE_MAX {
        any::<u64>()
            .prop_map(move |seed| seeded_values(domain, dtype, len, seed))
            .boxed()
    } else {
        prop::collection::vec(value(domain, dtype), len).boxed()
    }
}

/// f64 values (representable in `dtype`) as host data.
pub fn to_host(dtype: DType, v: &[f64]) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(v.iter().map(|&x| x as f32).collect()),
        DType::F16 => HostData::F16(v.iter().map(|&x| kiln_core::f16_from_f64(x)).collect()),
        DType::BF16 => HostData::BF16(v.iter().map(|&x| kiln_core::bf16_from_f64(x)).collect()),
        DType::U32 => HostData::U32(v.iter().map(|&x| x as u32).collect()),
    }
}

fn arrangement(dims: &[usize], broadcast: bool) -> BoxedStrategy<Arrangement> {
    let rank = dims.len();
    let perm = Just((0..rank).collect::<Vec<_>>())
        .prop_shuffle()
        .prop_map(Arrangement::Permuted);
    let slice = prop::collection::vec((0usize..3, 0usize..3), rank).prop_map(Arrangement::Sliced);
    if broadcast {
        let mask = prop::collection::vec(any::<bool>(), rank).prop_map(Arrangement::Broadcast);
        prop_oneof![3 => Just(Arrangement::Contiguous), 2 => perm, 2 => slice, 2 => mask].boxed()
    } else {
        prop_oneof![3 => Just(Arrangement::Contiguous), 2 => perm, 2 => slice].boxed()
    }
}

/// The storage extent and the layout mapping `dims` onto it.
fn arrange(dims: &[usize], a: &Arrangement) -> (usize, Layout) {
    let shape = |d: &[usize]| Shape::new(d).expect("small shapes");
    match a {
        Arrangement::Contiguous => (shape(dims).numel(), Layout::contiguous(shape(dims))),
        Arrangement::Permuted(p) => {
            // Storage dimension i holds logical dimension p[i].
            let stored: Vec<usize> = p.iter().map(|&i| dims[i]).collect();
            let mut inverse = vec![0; p.len()];
            for (i, &pi) in p.iter().enumerate() {
                inverse[pi] = i;
            }
            let l = Layout::contiguous(shape(&stored))
                .permute(&inverse)
                .expect("a permutation");
            (shape(&stored).numel(), l)
        }
        Arrangement::Sliced(w) => {
            let big: Vec<usize> = dims.iter().zip(w).map(|(&d, &(s, p))| d + s + p).collect();
            let mut l = Layout::contiguous(shape(&big));
            for (i, (&d, &(s, _))) in dims.iter().zip(w).enumerate() {
                l = l.narrow(i, s, d).expect("inside the padded buffer");
            }
            (shape(&big).numel(), l)
        }
        Arrangement::Broadcast(mask) => {
            let stored: Vec<usize> = dims
                .iter()
                .zip(mask)
                .map(|(&d, &m)| if m { 1 } else { d })
                .collect();
            let l = Layout::contiguous(shape(&stored))
                .broadcast_as(&shape(dims))
                .expect("broadcastable");
            (shape(&stored).numel(), l)
        }
    }
}

/// An operand of logical shape `dims` in any arrangement (broadcast ones
/// only if `broadcast`), with values from `domain`.
pub fn operand(
    dtype: DType,
    dims: Vec<usize>,
    domain: Domain,
    broadcast: bool,
) -> BoxedStrategy<Operand> {
    arrangement(&dims, broadcast)
        .prop_flat_map(move |a| {
            let (len, layout) = arrange(&dims, &a);
            storage(domain, dtype, len).prop_map(move |storage| Operand {
                dtype,
                storage,
                layout: layout.clone(),
            })
        })
        .boxed()
}

/// A contiguous operand of shape `dims`.
pub fn contiguous(dtype: DType, dims: Vec<usize>, domain: Domain) -> BoxedStrategy<Operand> {
    let n: usize = dims.iter().product();
    storage(domain, dtype, n)
        .prop_map(move |v| Operand::contiguous(dtype, &dims, v))
        .boxed()
}
