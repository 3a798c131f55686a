//! Shared vocabulary for the cluster: node and region identifiers, node descriptions, capacity
//! budgets and the inter-region round-trip/loss matrix.
//!
//! These types are plain data. They carry no I/O and no clock, so the relay-tree planner
//! ([`crate::planner`]), the capacity simulator and the live relay fabric can all share them.
//!
//! # Units
//!
//! Everything is an integer so that sums and comparisons are exact and reproducible:
//!
//! * bandwidth in **kbit/s** (`kbps`),
//! * forwarding work in **packets per second** (`pps`),
//! * time in **microseconds** (`_us`),
//! * loss in **parts per million** (`_ppm`; 1 % = 10 000 ppm),
//! * prices in **micro-dollars** (`_micro_usd`; $0.05 = 50 000 µ$).

use std::fmt;

use thiserror::Error;

/// Identifies one media node (one SFU process) in the cluster.
///
/// Identifiers are assigned by whoever owns the registry (Raft membership at run time, the
/// scenario loader in the simulator). The planner only needs them to be unique and ordered:
/// every tie in the planner is broken by the lower `NodeId`, which keeps plans deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// Index of a region in an [`RttMatrix`].
///
/// Regions are dense indices rather than strings so that per-region tables are plain vectors;
/// [`RttMatrix::name`] maps an index back to its human name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u16);

impl RegionId {
    /// The index as a `usize`, for indexing per-region vectors.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A bandwidth-and-packet-rate pair: either a demand (what one stream costs to forward) or a
/// budget (what a node may send in total).
///
/// A node is "over capacity" when **either** component of its load exceeds its budget: a
/// node can run out of NIC bandwidth (large video packets) or of CPU (many small audio
/// packets, see the LiveKit benchmark figures in `shared/design-notes.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Load {
    /// Egress bandwidth in kbit/s.
    pub kbps: u64,
    /// Forwarded packets per second.
    pub pps: u64,
}

impl Load {
    /// No load.
    pub const ZERO: Load = Load { kbps: 0, pps: 0 };

    /// A load of `kbps` kbit/s and `pps` packets/s.
    pub const fn new(kbps: u64, pps: u64) -> Self {
        Load { kbps, pps }
    }

    /// Component-wise sum, saturating (a saturated sum can never fit a real budget).
    pub fn saturating_add(self, other: Load) -> Load {
        Load {
            kbps: self.kbps.saturating_add(other.kbps),
            pps: self.pps.saturating_add(other.pps),
        }
    }

    /// Component-wise difference, saturating at zero.
    pub fn saturating_sub(self, other: Load) -> Load {
        Load {
            kbps: self.kbps.saturating_sub(other.kbps),
            pps: self.pps.saturating_sub(other.pps),
        }
    }

    /// `self` repeated `n` times, saturating.
    pub fn times(self, n: u64) -> Load {
        Load {
            kbps: self.kbps.saturating_mul(n),
            pps: self.pps.saturating_mul(n),
        }
    }

    /// True when both components are within `budget`.
    pub fn fits_in(self, budget: Load) -> bool {
        self.kbps <= budget.kbps && self.pps <= budget.pps
    }

    /// `budget` scaled to `percent` % (rounded down), used for head-room reservations.
    pub fn percent(self, percent: u8) -> Load {
        let p = u64::from(percent.min(100));
        Load {
            kbps: self.kbps.saturating_mul(p) / 100,
            pps: self.pps.saturating_mul(p) / 100,
        }
    }

    /// How many copies of `unit` fit in `self` (the binding component decides).
    /// A zero unit component never binds; an all-zero unit returns `u64::MAX`.
    pub fn how_many(self, unit: Load) -> u64 {
        let by_kbps = self.kbps.checked_div(unit.kbps).unwrap_or(u64::MAX);
        let by_pps = self.pps.checked_div(unit.pps).unwrap_or(u64::MAX);
        by_kbps.min(by_pps)
    }
}

/// A media node as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Unique identifier.
    pub id: NodeId,
    /// Region the node runs in (index into the [`RttMatrix`]).
    pub region: RegionId,
    /// Total egress budget: viewer streams plus relay streams to child nodes must fit.
    pub capacity: Load,
    /// Price of one GB of egress from this node, in micro-dollars. Used by cost reports; the
    /// planner itself does not optimise price (see the trade-offs in [`crate::planner`]).
    pub egress_micro_usd_per_gb: u64,
}

/// Errors building an [`RttMatrix`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RttError {
    /// No regions were given.
    #[error("the RTT matrix needs at least one region")]
    Empty,
    /// More regions than a [`RegionId`] can index.
    #[error("too many regions: {0} (limit {max})", max = u16::MAX)]
    TooMany(usize),
    /// A region name appears twice.
    #[error("duplicate region name {0:?}")]
    DuplicateRegion(String),
    /// A name used in a pair is not in the region list.
    #[error("unknown region {0:?}")]
    UnknownRegion(String),
    /// A pair was given no value and no default applies.
    #[error("no RTT given between {0:?} and {1:?}")]
    MissingPair(String, String),
    /// Loss must be below 100 %.
    #[error("loss between {0:?} and {1:?} is {2} ppm; it must be below 1 000 000")]
    LossOutOfRange(String, String, u32),
}

/// Round-trip time and loss between every pair of regions, including each region with itself
/// (the intra-region figure: between availability zones or racks of one cloud region).
///
/// The planner uses **one-way delay = RTT / 2** per hop: it assumes symmetric paths, which is
/// what ping tables measure. The simulator uses loss to size NACK recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RttMatrix {
    names: Vec<String>,
    rtt_us: Vec<u32>,
    loss_ppm: Vec<u32>,
}

impl RttMatrix {
    /// Builds a matrix from region names and a list of symmetric pairs
    /// `(a, b, rtt_us, loss_ppm)`. A pair `(a, a, ..)` sets the intra-region figure.
    ///
    /// `intra_default` fills the diagonal for regions not listed as `(a, a)`; every
    /// inter-region pair must be given exactly (no silent defaults across regions).
    pub fn from_pairs(
        names: Vec<String>,
        pairs: &[(String, String, u32, u32)],
        intra_default: (u32, u32),
    ) -> Result<Self, RttError> {
        let n = names.len();
        if n == 0 {
            return Err(RttError::Empty);
        }
        if n > usize::from(u16::MAX) {
            return Err(RttError::TooMany(n));
        }
        for (i, a) in names.iter().enumerate() {
            if names[..i].contains(a) {
                return Err(RttError::DuplicateRegion(a.clone()));
            }
        }
        let mut rtt = vec![None; n * n];
        let mut loss = vec![0u32; n * n];
        let find = |name: &str| {
            names
                .iter()
                .position(|x| x == name)
                .ok_or_else(|| RttError::UnknownRegion(name.to_string()))
        };
        for (a, b, r, l) in pairs {
            let (i, j) = (find(a)?, find(b)?);
            if *l >= 1_000_000 {
                return Err(RttError::LossOutOfRange(a.clone(), b.clone(), *l));
            }
            rtt[i * n + j] = Some(*r);
            rtt[j * n + i] = Some(*r);
            loss[i * n + j] = *l;
            loss[j * n + i] = *l;
        }
        let mut rtt_us = Vec::with_capacity(n * n);
        for i in 0..n {
            for j in 0..n {
                let v = match rtt[i * n + j] {
                    Some(v) => v,
                    None if i == j => {
                        if intra_default.1 >= 1_000_000 {
                            return Err(RttError::LossOutOfRange(
                                names[i].clone(),
                                names[i].clone(),
                                intra_default.1,
                            ));
                        }
                        loss[i * n + j] = intra_default.1;
                        intra_default.0
                    }
                    None => return Err(RttError::MissingPair(names[i].clone(), names[j].clone())),
                };
                rtt_us.push(v);
            }
        }
        Ok(RttMatrix {
            names,
            rtt_us,
            loss_ppm: loss,
        })
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false for a constructed matrix (construction rejects zero regions).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// All region ids in index order.
    pub fn regions(&self) -> impl Iterator<Item = RegionId> + '_ {
        (0..self.names.len()).map(|i| RegionId(i as u16))
    }

    /// Human name of a region, or `"?"` for an id outside the matrix.
    pub fn name(&self, r: RegionId) -> &str {
        self.names.get(r.index()).map(String::as_str).unwrap_or("?")
    }

    /// Looks a region up by name.
    pub fn region(&self, name: &str) -> Option<RegionId> {
        self.names
            .iter()
            .position(|x| x == name)
            .map(|i| RegionId(i as u16))
    }

    /// True when `r` indexes this matrix.
    pub fn contains(&self, r: RegionId) -> bool {
        r.index() < self.names.len()
    }

    /// Round-trip time between two regions in µs. Ids outside the matrix read as
    /// `u32::MAX` (unreachable) rather than panicking; callers validate ids up front.
    pub fn rtt_us(&self, a: RegionId, b: RegionId) -> u32 {
        let n = self.names.len();
        if a.index() >= n || b.index() >= n {
            return u32::MAX;
        }
        self.rtt_us[a.index() * n + b.index()]
    }

    /// One-way delay, taken as half the round trip.
    pub fn one_way_us(&self, a: RegionId, b: RegionId) -> u32 {
        self.rtt_us(a, b) / 2
    }

    /// Packet loss between two regions in parts per million (0 for unknown ids).
    pub fn loss_ppm(&self, a: RegionId, b: RegionId) -> u32 {
        let n = self.names.len();
        if a.index() >= n || b.index() >= n {
            return 0;
        }
        self.loss_ppm[a.index() * n + b.index()]
    }

    /// Regions ordered by RTT from `from` (nearest first; ties by lower index). `from` itself
    /// comes first unless some other region is strictly closer than its own intra-region RTT.
    pub fn nearest_first(&self, from: RegionId) -> Vec<RegionId> {
        let mut v: Vec<RegionId> = self.regions().collect();
        v.sort_by_key(|&r| (self.rtt_us(from, r), r != from, r));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[test]
    fn matrix_is_symmetric_and_fills_diagonal() {
        let m = RttMatrix::from_pairs(
            vec![s("a"), s("b")],
            &[(s("a"), s("b"), 80_000, 100)],
            (1_000, 0),
        )
        .expect("valid matrix");
        let (a, b) = (RegionId(0), RegionId(1));
        assert_eq!(m.rtt_us(a, b), 80_000);
        assert_eq!(m.rtt_us(b, a), 80_000);
        assert_eq!(m.one_way_us(a, b), 40_000);
        assert_eq!(m.rtt_us(a, a), 1_000);
        assert_eq!(m.loss_ppm(b, a), 100);
        assert_eq!(m.nearest_first(b), vec![b, a]);
        assert_eq!(m.rtt_us(a, RegionId(9)), u32::MAX);
    }

    #[test]
    fn matrix_rejects_bad_input() {
        assert_eq!(
            RttMatrix::from_pairs(vec![], &[], (0, 0)),
            Err(RttError::Empty)
        );
        assert_eq!(
            RttMatrix::from_pairs(vec![s("a"), s("a")], &[], (0, 0)),
            Err(RttError::DuplicateRegion(s("a")))
        );
        assert_eq!(
            RttMatrix::from_pairs(vec![s("a"), s("b")], &[], (0, 0)),
            Err(RttError::MissingPair(s("a"), s("b")))
        );
        assert_eq!(
            RttMatrix::from_pairs(vec![s("a")], &[(s("a"), s("x"), 1, 0)], (0, 0)),
            Err(RttError::UnknownRegion(s("x")))
        );
    }

    #[test]
    fn load_arithmetic() {
        let cap = Load::new(10_000, 1_000);
        assert_eq!(cap.how_many(Load::new(2_500, 300)), 3);
        assert_eq!(cap.how_many(Load::new(0, 0)), u64::MAX);
        assert!(Load::new(10_000, 1_000).fits_in(cap));
        assert!(!Load::new(10_001, 1).fits_in(cap));
        assert_eq!(cap.percent(90), Load::new(9_000, 900));
    }
}
