//! Size tiers: how big the suite's cases get, and where it aims them.
//!
//! - [`Tier::Edge`]: small awkward extents — 0, 1, primes, one off the
//!   usual tile widths — with every layout and special value;
//! - [`Tier::Blocked`]: extents that cross every blocking boundary a
//!   backend has, taken from its [`SwitchPoints`] (each point, and one
//!   either side of it), plus long rows of 1k–70k elements: GEMMs past
//!   2·KC + 1 and full 128 × 128 tiles, multi-block softmax and reductions,
//!   convolutions whose implicit GEMM crosses tiles and split-K chunks;
//! - [`Tier::Large`]: a few cases at 1024–2048 per dimension, k ≥ 4096 and
//!   rows of up to a million elements, for accumulated rounding error.
//!
//! A run covers a [`Depth`]: `edge`, `blocked` (edge and blocked, the
//! default), `large` (the large tier alone) or `all`.
//!
//! ```
//! use kiln_conformance::tier::{Depth, Sizer, Tier};
//!
//! assert_eq!(Depth::parse("all")?.tiers(), &Tier::ALL);
//! assert!(Depth::parse("huge").is_err());
//! // Sizes either side of each switch point a backend declares (here 16 and 64).
//! assert_eq!(Sizer::near(&[16, 64], &[1]), [1, 15, 16, 17, 63, 64, 65]);
//! # Ok::<(), String>(())
//! ```

use std::cell::Cell;
use std::fmt;
use std::time::Duration;

use kiln_core::SwitchPoints;
use proptest::prelude::*;
use proptest::strategy::{NewTree, ValueTree};
use proptest::test_runner::TestRunner;

use crate::values;

/// One size tier; see the [module docs](self).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Small awkward extents.
    Edge,
    /// Extents across every blocking boundary.
    Blocked,
    /// A few very large cases.
    Large,
}

impl Tier {
    /// Every tier, smallest first.
    pub const ALL: [Tier; 3] = [Tier::Edge, Tier::Blocked, Tier::Large];

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Blocked => "blocked",
            Tier::Large => "large",
        }
    }

    /// The wall-clock time one check may spend on this tier's cases before
    /// it stops drawing new ones (at least [`Tier::min_cases`], and the
    /// corners a check pins, always run).
    pub fn default_budget(self) -> Duration {
        match self {
            Tier::Edge => Duration::from_secs(60),
            Tier::Blocked => Duration::from_secs(8),
            Tier::Large => Duration::from_secs(90),
        }
    }

    /// Steps a failure's shrinking may take in this tier (bounded by
    /// steps, so a reproduction line shrinks to the same case).
    pub fn shrink_steps(self) -> u32 {
        match self {
            Tier::Edge => 2048,
            Tier::Blocked => 256,
            Tier::Large => 32,
        }
    }

    /// Cases that run whatever the budget says.
    pub fn min_cases(self) -> u32 {
        match self {
            Tier::Edge => 16,
            Tier::Blocked => 6,
            Tier::Large => 1,
        }
    }

    /// The environment variable that sets this tier's case count.
    pub fn cases_var(self) -> &'static str {
        match self {
            Tier::Edge => "KILN_CONFORMANCE_CASES",
            Tier::Blocked => "KILN_CONFORMANCE_BLOCKED_CASES",
            Tier::Large => "KILN_CONFORMANCE_LARGE_CASES",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which tiers a run covers (`--tier`, `KILN_CONFORMANCE_TIER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Depth {
    /// The edge tier only.
    Edge,
    /// Edge and blocked: the default.
    #[default]
    Blocked,
    /// The large tier alone.
    Large,
    /// Every tier.
    All,
}

impl Depth {
    /// Parses `edge`, `blocked`, `large` or `all`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "edge" => Ok(Depth::Edge),
            "blocked" => Ok(Depth::Blocked),
            "large" => Ok(Depth::Large),
            "all" => Ok(Depth::All),
            other => Err(format!(
                "unknown conformance tier `{other}`: expected edge, blocked, large or all"
            )),
        }
    }

    /// Lowercase name, as [`Depth::parse`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Depth::Edge => "edge",
            Depth::Blocked => "blocked",
            Depth::Large => "large",
            Depth::All => "all",
        }
    }

    /// The tiers it runs, smallest first.
    pub fn tiers(self) -> &'static [Tier] {
        match self {
            Depth::Edge => &[Tier::Edge],
            Depth::Blocked => &[Tier::Edge, Tier::Blocked],
            Depth::Large => &[Tier::Large],
            Depth::All => &Tier::ALL,
        }
    }
}

impl fmt::Display for Depth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The size strategies of one tier, aimed at one backend's switch points.
#[derive(Clone, Debug)]
pub struct Sizer {
    /// The tier.
    pub tier: Tier,
    /// The backend's switch points.
    pub points: SwitchPoints,
    /// Corners the strategies built from this sizer draw first (see
    /// [`Sizer::corners_first`]): cases the run does not skip for time.
    pinned: Cell<u32>,
}

/// Elements per blocked-tier case of an elementwise or row op, at most.
pub const BLOCKED_ELEMENTS: usize = 200_000;

impl Sizer {
    /// The sizer of `tier` for a backend with switch points `points`.
    pub fn new(tier: Tier, points: SwitchPoints) -> Self {
        Sizer {
            tier,
            points,
            pinned: Cell::new(0),
        }
    }

    /// How many cases the strategies built from this sizer pin as corners:
    /// the run takes at least that many, whatever its time budget says.
    pub fn pinned(&self) -> u32 {
        self.pinned.get()
    }

    /// One past each of `points`: the first extent to take another block,
    /// tile or thread's share.
    pub fn past(points: &[usize]) -> Vec<usize> {
        points.iter().map(|&p| p + 1).collect()
    }

    /// Every point − 1, the point and + 1, with `extra`, sorted, ≥ 1.
    pub fn near(points: &[usize], extra: &[usize]) -> Vec<usize> {
        let mut v: Vec<usize> = points
            .iter()
            .flat_map(|&p| [p.saturating_sub(1), p, p + 1])
            .chain(extra.iter().copied())
            .filter(|&d| d >= 1)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// One of `list` (shrinking toward its first, smallest, entry).
    pub fn pick(list: Vec<usize>) -> BoxedStrategy<usize> {
        prop::sample::select(list).boxed()
    }

    /// Draws `corners` first, one per case and in order, then values of
    /// `rest`. A tier's cases are few, so a seeded random draw can miss a
    /// switch point altogether, and adding one point to a backend's list
    /// reshuffles which ones it hits; corners make the first cases of every
    /// run the same, whatever the seed, and the run takes them all however
    /// long they take ([`Sizer::pinned`]). A corner's value does not shrink
    /// (the rest of its case does).
    ///
    /// The strategy counts its draws, so it serves one run: build one per
    /// tier, as the checks do, and do not share it between runners.
    ///
    /// ```
    /// use kiln_conformance::tier::{Sizer, Tier};
    /// use proptest::strategy::{Strategy, ValueTree};
    /// use proptest::test_runner::TestRunner;
    ///
    /// let z = Sizer::new(Tier::Blocked, Default::default());
    /// let s = z.corners_first(vec![257, 513], (1usize..=9).boxed());
    /// assert_eq!(z.pinned(), 2);
    /// let mut runner = TestRunner::deterministic();
    /// let mut draw = || s.new_tree(&mut runner).unwrap().current();
    /// assert_eq!((draw(), draw()), (257, 513));
    /// assert!((1..=9).contains(&draw()));
    /// ```
    pub fn corners_first<T>(&self, corners: Vec<T>, rest: BoxedStrategy<T>) -> BoxedStrategy<T>
    where
        T: Clone + fmt::Debug + 'static,
    {
        let count = u32::try_from(corners.len()).unwrap_or(u32::MAX);
        self.pinned.set(self.pinned.get().saturating_add(count));
        CornersFirst {
            corners,
            rest,
            drawn: Cell::new(0),
        }
        .boxed()
    }

    /// Corners of several families in turns — each family's first, then
    /// each one's second, … — so that a short run still reaches every family.
    ///
    /// ```
    /// use kiln_conformance::tier::Sizer;
    ///
    /// assert_eq!(Sizer::take_turns(vec![vec![1, 2, 3], vec![], vec![10]]), [1, 10, 2, 3]);
    /// ```
    pub fn take_turns<T>(families: Vec<Vec<T>>) -> Vec<T> {
        let turns = families.iter().map(Vec::len).max().unwrap_or(0);
        let mut families: Vec<_> = families.into_iter().map(Vec::into_iter).collect();
        let mut v = Vec::new();
        for _ in 0..turns {
            v.extend(families.iter_mut().filter_map(Iterator::next));
        }
        v
    }

    /// A shape for an elementwise or memory op: at the edge, rank
    /// `1..=rank` with extents up to `max`; blocked, element counts at the
    /// [`SwitchPoints::elements`] (vector tails, the thread split) or up to
    /// [`BLOCKED_ELEMENTS`]; large, 1–4 million elements.
    pub fn elementwise(&self, rank: usize, max: usize) -> BoxedStrategy<Vec<usize>> {
        let total = match self.tier {
            Tier::Edge => return values::shape(rank, max),
            Tier::Blocked => prop_oneof![
                2 => Self::pick(Self::near(&self.points.elements, &[])),
                1 => 1000usize..BLOCKED_ELEMENTS,
            ]
            .boxed(),
            Tier::Large => (1usize << 20..=1 << 22).boxed(),
        };
        (total, 0usize..3)
            .prop_map(|(t, split)| match split {
                // One long row, or rows whose total sits next to t.
                0 => vec![t],
                1 => vec![2, t.div_ceil(2)],
                _ => vec![t.div_ceil(3), 3],
            })
            .boxed()
    }

    /// A length along the last axis for a row op (softmax, cross-entropy,
    /// reductions, argmax): at the edge up to `max`; blocked, at the
    /// [`SwitchPoints::row`] or 1k–70k; large, 100k–1M.
    pub fn row(&self, max: usize) -> BoxedStrategy<usize> {
        match self.tier {
            Tier::Edge => values::extent(max),
            Tier::Blocked => prop_oneof![
                1 => Self::pick(Self::near(&self.points.row, &[])),
                1 => 1000usize..=70_000,
            ]
            .boxed(),
            Tier::Large => (100_000usize..=1_000_000).boxed(),
        }
    }

    /// The number of rows that go with a row of `len` elements: up to
    /// `edge_max` at the edge, else as many as keep the case within
    /// [`BLOCKED_ELEMENTS`] (large: one or two).
    pub fn rows(&self, len: usize, edge_max: usize) -> BoxedStrategy<usize> {
        match self.tier {
            Tier::Edge => (0..=edge_max).boxed(),
            Tier::Blocked => (1..=(BLOCKED_ELEMENTS / len.max(1)).clamp(1, 4)).boxed(),
            Tier::Large => (1usize..=2).boxed(),
        }
    }
}

/// The strategy [`Sizer::corners_first`] returns.
#[derive(Debug)]
struct CornersFirst<T: fmt::Debug> {
    corners: Vec<T>,
    rest: BoxedStrategy<T>,
    /// Cases drawn so far: each tier builds its strategy afresh, so a run
    /// and its reproduction line draw the same sequence.
    drawn: Cell<usize>,
}

impl<T: Clone + fmt::Debug + 'static> Strategy for CornersFirst<T> {
    type Tree = Box<dyn ValueTree<Value = T>>;
    type Value = T;

    fn new_tree(&self, runner: &mut TestRunner) -> NewTree<Self> {
        let i = self.drawn.get();
        self.drawn.set(i + 1);
        match self.corners.get(i) {
            Some(c) => Ok(Box::new(Just(c.clone()))),
            None => self.rest.new_tree(runner),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_brackets_every_point() {
        assert_eq!(Sizer::near(&[1, 8], &[100]), vec![1, 2, 7, 8, 9, 100]);
    }

    #[test]
    fn depths() {
        assert_eq!(Depth::parse("all").unwrap().tiers(), &Tier::ALL);
        assert_eq!(Depth::default().tiers(), &[Tier::Edge, Tier::Blocked]);
        assert!(Depth::parse("huge")
            .unwrap_err()
            .contains("edge, blocked, large or all"));
    }
}
