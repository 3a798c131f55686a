//! The relay-tree planner: which media node forwards which track to which other node, and
//! which node serves which viewer.
//!
//! The planner is a pure state machine. It owns no socket, no clock and no random number
//! generator: callers feed it facts (a node exists, a viewer joined, a node died) and get back a
//! [`Diff`] — an ordered list of [`Action`]s for the relay fabric. The same code runs inside
//! the capacity simulator (`arbor-sim`) and, later, inside the live relay fabric.
//!
//! ```
//! use arbor_topology::nodes::{Load, NodeId, NodeSpec, RegionId, RttMatrix};
//! use arbor_topology::planner::{Action, Planner, PlannerConfig, TrackId, TrackSpec, ViewerId};
//!
//! // Two regions, 78 ms apart (New York–Paris), 1 ms inside each.
//! let rtt = RttMatrix::from_pairs(
//!     vec!["nyc".into(), "par".into()],
//!     &[("nyc".into(), "par".into(), 78_000, 0)],
//!     (1_000, 0),
//! )?;
//! let mut planner = Planner::new(PlannerConfig::default(), rtt)?;
//! for (id, region) in [(0, 0), (1, 1)] {
//!     planner.add_node(NodeSpec {
//!         id: NodeId(id),
//!         region: RegionId(region),
//!         capacity: Load::new(10_000_000, 640_000), // 10 Gbit/s, 640k pkt/s
//!         egress_micro_usd_per_gb: 50_000,
//!     })?;
//! }
//! // The publisher is on n0; relays forward all layers, a viewer gets ~1.9 Mbit/s.
//! planner.add_track(TrackSpec {
//!     id: TrackId(0),
//!     origin: NodeId(0),
//!     relay_load: Load::new(3_500, 400),
//!     viewer_load: Load::new(1_930, 220),
//! })?;
//! // A viewer in Paris: n1 joins the tree under n0, then serves the viewer.
//! let diff = planner.join(ViewerId(7), RegionId(1))?;
//! assert_eq!(
//!     diff.actions,
//!     [
//!         Action::Link { track: TrackId(0), parent: NodeId(0), child: NodeId(1) },
//!         Action::AttachViewer { viewer: ViewerId(7), node: NodeId(1) },
//!     ]
//! );
//! // n1 fails: the viewer moves to n0 (make-before-break), the link n0 → n1 goes.
//! let removal = planner.remove_node(NodeId(1))?;
//! assert_eq!(
//!     removal.diff.actions,
//!     [
//!         Action::MoveViewer { viewer: ViewerId(7), from: NodeId(1), to: NodeId(0) },
//!         Action::Unlink { track: TrackId(0), parent: NodeId(0), child: NodeId(1) },
//!     ]
//! );
//! planner.check_invariants().map_err(std::io::Error::other)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Model
//!
//! * A **room** has published **tracks** ([`TrackSpec`]); each track's publisher is connected
//!   to one node, the track's **origin**.
//! * Every viewer receives every track of the room from exactly one **edge** node.
//! * Each track has one **relay tree** ([`TrackTree`]) rooted at its origin. A node is a
//!   member of a track's tree when it serves viewers or relays the track to a member that
//!   does. Forwarding one track over one hop costs the parent the track's `relay_load` (the
//!   whole simulcast set); serving one viewer costs the edge the sum of the tracks'
//!   `viewer_load`.
//!
//! # Invariants (checked by [`Planner::check_invariants`] and the property tests)
//!
//! 1. **Reachable**: every node that serves a viewer is a member of every track's tree, and
//!    every member is reachable from the origin by parent links.
//! 2. **Acyclic**: following parents from any member reaches the origin in exactly `depth`
//!    steps; depths strictly increase downward.
//! 3. **Depth bound**: no member is deeper than [`PlannerConfig::max_depth`].
//! 4. **Degree bound**: no member has more than [`PlannerConfig::max_fanout`] children in one
//!    tree.
//! 5. **Capacity**: no node's load (viewer streams + relay streams) exceeds its capacity, and
//!    viewer streams alone stay within [`PlannerConfig::viewer_share_percent`] of it.
//! 6. **No dangling relays**: a non-origin member serves viewers or has children.
//! 7. **Make-before-break**: in every [`Diff`], all additive steps precede all removals.
//!
//! # Algorithm and trade-offs
//!
//! * **Viewer placement — nearest region first, first-fit inside it.** A viewer goes to the
//!   region nearest to it (by RTT) that has a node with room, and inside that region to the
//!   lowest-id node with room. First-fit packs viewers onto few nodes, so trees stay small
//!   and idle nodes can be retired; the price is a larger blast radius per node failure
//!   than spreading would give.
//! * **Parent choice — greedy, latency first.** A node joining a tree attaches to the member
//!   that minimises `path(parent) + one_way(parent, child) + hop_processing`, plus
//!   [`PlannerConfig::cross_region_penalty_us`] when the hop crosses regions, among members
//!   with a free child slot, spare capacity and depth below the bound. The penalty turns
//!   near-ties into "one trunk per region, then intra-region fan-out", which cuts
//!   inter-region egress at the cost of at most `penalty` µs of extra modelled delay per
//!   viewer. Greedy attachment is not globally optimal (an optimal degree-bounded
//!   minimum-latency tree is NP-hard); full rebuilds (new origin) attach nodes in order of
//!   their direct distance from the origin (Prim-like), which gives near-shortest-path trees
//!   when fan-out is not binding.
//! * **Relay-only nodes are not recruited.** Only nodes that serve viewers (and the origin)
//!   relay. If no member can adopt a node, the operation fails cleanly and the caller adds
//!   capacity. With the default head-room (10 % of each node reserved for relaying) this
//!   does not bind in practice: 10 % of a 10 Gbit/s node is ~250 full simulcast sets.
//! * **Pruning is eager.** A node that loses its last viewer and has no children leaves every
//!   tree at once. There is no hysteresis; a flapping viewer can make a leaf join and leave.
//! * **Failures and drains** ([`Planner::remove_node`]): each orphaned child keeps its
//!   subtree and is re-parented to the best member outside that subtree that fits the depth
//!   bound; if none fits, the subtree is dissolved and its viewer-serving nodes re-attached
//!   one by one. If the origin is lost, the publisher is assumed to reconnect to the alive
//!   node nearest to the old origin and the tree is rebuilt around it. Viewers of the
//!   removed node move to the nearest node with room; those that fit nowhere are returned to
//!   the caller as *unplaced*.
//! * **Determinism**: every collection is ordered (`BTreeMap`/`BTreeSet`), every tie breaks on
//!   the lower id, and no operation reads a clock or a random source.

mod action;
mod tree;

pub use action::{Action, Diff, ViewerId};
pub use tree::{Member, TrackId, TrackSpec, TrackTree};

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use action::DiffBuilder;
use thiserror::Error;

use crate::nodes::{Load, NodeId, NodeSpec, RegionId, RttMatrix};

/// Tuning knobs. Every limit the planner enforces is named here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannerConfig {
    /// Maximum children of one node in one track's tree (the degree bound). Interior fan-out
    /// is limited by per-link control work (NACK, PLI, congestion control per hop), not by
    /// bandwidth; 16 gives two relay hops for 100k viewers (design notes, "tree sizing").
    pub max_fanout: u32,
    /// Maximum relay hops from the origin to any member (origin = depth 0).
    pub max_depth: u32,
    /// Modelled processing delay added by each hop (receive, decrypt, re-encrypt, send), µs.
    pub hop_processing_us: u32,
    /// Score penalty for a cross-region hop when choosing a parent, µs. 0 = pure latency.
    pub cross_region_penalty_us: u32,
    /// Share of each node's capacity that viewer streams may use, in percent; the rest is
    /// reserved so the node can always relay to children.
    pub viewer_share_percent: u8,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            max_fanout: 16,
            max_depth: 4,
            hop_processing_us: 1_000,
            cross_region_penalty_us: 5_000,
            viewer_share_percent: 90,
        }
    }
}

/// Why an operation was refused. A refused operation leaves the planner unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlannerError {
    /// Invalid configuration value.
    #[error("invalid planner config: {0}")]
    Config(&'static str),
    /// A node id was registered twice.
    #[error("node {0} already exists")]
    DuplicateNode(NodeId),
    /// The operation names a node the planner does not know.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// A node's region is outside the RTT matrix.
    #[error("node {0} is in region {1:?}, which is not in the RTT matrix")]
    UnknownRegion(NodeId, RegionId),
    /// A viewer's region is outside the RTT matrix.
    #[error("viewer region {0:?} is not in the RTT matrix")]
    UnknownViewerRegion(RegionId),
    /// A track id was registered twice.
    #[error("track {0} already exists")]
    DuplicateTrack(TrackId),
    /// The operation names a track the planner does not know.
    #[error("unknown track {0}")]
    UnknownTrack(TrackId),
    /// A viewer id joined twice.
    #[error("viewer {0:?} already joined")]
    DuplicateViewer(ViewerId),
    /// The operation names a viewer the planner does not know.
    #[error("unknown viewer {0:?}")]
    UnknownViewer(ViewerId),
    /// No node has room for the viewer, or no tree can reach a node that has.
    #[error("no node can serve another viewer from region {0:?}")]
    NoCapacity(RegionId),
    /// Adding the track would push a node that already serves viewers over capacity.
    #[error("adding track {0} would overload node {1}")]
    TrackDoesNotFit(TrackId, NodeId),
    /// A node that serves viewers cannot be attached to the new track's tree.
    #[error("track {0} cannot reach node {1} within the fan-out, depth and capacity bounds")]
    Unreachable(TrackId, NodeId),
    /// The last node cannot be removed while tracks exist (there would be no origin).
    #[error("no node left to take over the origin of track {0}")]
    NoOriginLeft(TrackId),
}

/// Result of [`Planner::remove_node`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// Steps for the fabric, make-before-break.
    pub diff: Diff,
    /// Viewers that were on the removed node (or on a node that lost its path) and could not
    /// be placed anywhere; they are no longer known to the planner. The caller re-joins them
    /// when capacity appears.
    pub unplaced: Vec<(ViewerId, RegionId)>,
    /// Tracks whose origin moved, with the new origin.
    pub new_origins: Vec<(TrackId, NodeId)>,
}

/// Read-only view of one node's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's description.
    pub region: RegionId,
    /// Its capacity.
    pub capacity: Load,
    /// Current total load (viewer + relay streams).
    pub load: Load,
    /// Current load from viewer streams alone.
    pub viewer_load: Load,
    /// Viewers served.
    pub viewers: u32,
}

/// One member of a tree in a [`Plan`] snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedHop {
    /// Upstream node (`None` for the origin).
    pub parent: Option<NodeId>,
    /// Hops from the origin.
    pub depth: u32,
    /// Modelled origin→node one-way delay, µs.
    pub path_us: u64,
}

/// A snapshot of a whole plan, in id order (stable to print or compare).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Tree per track: member → its place in the tree.
    pub trees: BTreeMap<TrackId, BTreeMap<NodeId, PlannedHop>>,
    /// Per node: viewers served and load.
    pub nodes: BTreeMap<NodeId, NodeStatus>,
}

#[derive(Clone, Debug)]
struct NodeState {
    spec: NodeSpec,
    /// Cordoned nodes take no new viewers and adopt no new children (about to be removed).
    cordoned: bool,
    load: Load,
    viewer_load: Load,
    viewers: BTreeSet<ViewerId>,
}

#[derive(Clone, Copy, Debug)]
struct ViewerState {
    region: RegionId,
    node: NodeId,
}

/// The planner for one room (one event): its nodes, its tracks' trees and its viewers.
///
/// Capacity given to the planner is the budget for this room. Running several rooms on one
/// fleet means giving each room's planner a share of each node.
#[derive(Clone, Debug)]
pub struct Planner {
    config: PlannerConfig,
    rtt: RttMatrix,
    nodes: BTreeMap<NodeId, NodeState>,
    /// Per region: nodes that can take one more viewer, by id (first-fit order).
    open: Vec<BTreeSet<NodeId>>,
    /// Per region: all regions nearest first.
    nearest: Vec<Vec<RegionId>>,
    tracks: BTreeMap<TrackId, TrackTree>,
    viewers: BTreeMap<ViewerId, ViewerState>,
    /// Viewers served outside their nearest region (spilled while it was full).
    away: BTreeSet<ViewerId>,
    /// Where the last [`Planner::rehome`] pass stopped (round robin over `away`).
    rehome_cursor: Option<ViewerId>,
    /// Where the last [`Planner::optimize`] pass stopped.
    optimize_cursor: Option<(TrackId, NodeId)>,
    /// Sum of all tracks' `viewer_load`: the cost of one viewer at its edge.
    per_viewer: Load,
}

impl Planner {
    /// An empty planner (no nodes, tracks or viewers).
    pub fn new(config: PlannerConfig, rtt: RttMatrix) -> Result<Self, PlannerError> {
        if config.max_fanout == 0 {
            return Err(PlannerError::Config("max_fanout must be at least 1"));
        }
        if config.max_depth == 0 {
            return Err(PlannerError::Config("max_depth must be at least 1"));
        }
        if config.viewer_share_percent == 0 || config.viewer_share_percent > 100 {
            return Err(PlannerError::Config(
                "viewer_share_percent must be in 1..=100",
            ));
        }
        let nearest = rtt.regions().map(|r| rtt.nearest_first(r)).collect();
        Ok(Planner {
            config,
            open: vec![BTreeSet::new(); rtt.len()],
            nearest,
            rtt,
            nodes: BTreeMap::new(),
            tracks: BTreeMap::new(),
            viewers: BTreeMap::new(),
            away: BTreeSet::new(),
            rehome_cursor: None,
            optimize_cursor: None,
            per_viewer: Load::ZERO,
        })
    }

    /// Plans a whole room in one call: registers `nodes` and `tracks`, then joins
    /// `viewers[r]` viewers from each region `r` (ids `0..`, regions in index order).
    pub fn plan_room(
        config: PlannerConfig,
        rtt: RttMatrix,
        nodes: &[NodeSpec],
        tracks: &[TrackSpec],
        viewers: &[(RegionId, u64)],
    ) -> Result<(Planner, Plan), PlannerError> {
        let mut p = Planner::new(config, rtt)?;
        for n in nodes {
            p.add_node(n.clone())?;
        }
        for t in tracks {
            p.add_track(*t)?;
        }
        let mut next = 0u64;
        for &(region, count) in viewers {
            for _ in 0..count {
                p.join(ViewerId(next), region)?;
                next += 1;
            }
        }
        let plan = p.plan();
        Ok((p, plan))
    }

    // ---------------------------------------------------------------- read accessors

    /// The configuration.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// The RTT matrix.
    pub fn rtt(&self) -> &RttMatrix {
        &self.rtt
    }

    /// Cost of one viewer at its edge (sum of the tracks' viewer loads).
    pub fn per_viewer_load(&self) -> Load {
        self.per_viewer
    }

    /// All node ids, in order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied()
    }

    /// One node's state.
    pub fn node(&self, id: NodeId) -> Option<NodeStatus> {
        self.nodes.get(&id).map(|n| NodeStatus {
            region: n.spec.region,
            capacity: n.spec.capacity,
            load: n.load,
            viewer_load: n.viewer_load,
            viewers: n.viewers.len() as u32,
        })
    }

    /// The viewers one node serves, in id order.
    pub fn viewers_on(&self, id: NodeId) -> impl Iterator<Item = ViewerId> + '_ {
        self.nodes
            .get(&id)
            .into_iter()
            .flat_map(|n| n.viewers.iter().copied())
    }

    /// The edge serving `viewer`.
    pub fn viewer_node(&self, viewer: ViewerId) -> Option<NodeId> {
        self.viewers.get(&viewer).map(|v| v.node)
    }

    /// Number of viewers placed.
    pub fn viewer_count(&self) -> usize {
        self.viewers.len()
    }

    /// One track's tree.
    pub fn tree(&self, track: TrackId) -> Option<&TrackTree> {
        self.tracks.get(&track)
    }

    /// All trees, in track order.
    pub fn trees(&self) -> impl Iterator<Item = &TrackTree> {
        self.tracks.values()
    }

    /// How many more viewers `id` could take now (ignoring whether trees can reach it).
    pub fn viewer_room(&self, id: NodeId) -> u64 {
        let Some(n) = self.nodes.get(&id) else {
            return 0;
        };
        if n.cordoned {
            return 0;
        }
        let by_share = n
            .spec
            .capacity
            .percent(self.config.viewer_share_percent)
            .saturating_sub(n.viewer_load)
            .how_many(self.per_viewer);
        let by_total = n
            .spec
            .capacity
            .saturating_sub(n.load)
            .how_many(self.per_viewer);
        by_share.min(by_total)
    }

    /// Snapshot of the whole plan.
    pub fn plan(&self) -> Plan {
        let trees = self
            .tracks
            .iter()
            .map(|(id, t)| {
                let m = t
                    .members()
                    .map(|(n, m)| {
                        let hop = PlannedHop {
                            parent: m.parent,
                            depth: m.depth,
                            path_us: m.path_us,
                        };
                        (n, hop)
                    })
                    .collect();
                (*id, m)
            })
            .collect();
        let nodes = self
            .nodes
            .keys()
            .filter_map(|id| self.node(*id).map(|s| (*id, s)))
            .collect();
        Plan { trees, nodes }
    }

    // ---------------------------------------------------------------- operations

    /// Registers a node. It takes viewers and relays from now on. Nothing for the fabric to
    /// do, so no diff.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<(), PlannerError> {
        if self.nodes.contains_key(&spec.id) {
            return Err(PlannerError::DuplicateNode(spec.id));
        }
        if !self.rtt.contains(spec.region) {
            return Err(PlannerError::UnknownRegion(spec.id, spec.region));
        }
        let id = spec.id;
        self.nodes.insert(
            id,
            NodeState {
                spec,
                cordoned: false,
                load: Load::ZERO,
                viewer_load: Load::ZERO,
                viewers: BTreeSet::new(),
            },
        );
        self.refresh_open(id);
        Ok(())
    }

    /// Cordons a node: it keeps serving what it serves, but takes no new viewers and adopts
    /// no new children. Cordon every node of a failing region (or a batch of nodes to drain)
    /// before removing them one by one, so that viewers and subtrees moved off the first are
    /// not placed on the next. Irreversible until the node is removed.
    pub fn cordon(&mut self, id: NodeId) -> Result<(), PlannerError> {
        let n = self
            .nodes
            .get_mut(&id)
            .ok_or(PlannerError::UnknownNode(id))?;
        n.cordoned = true;
        self.refresh_open(id);
        Ok(())
    }

    /// Adds a published track and builds its tree over every node that serves viewers.
    /// Atomic: on error nothing changes.
    pub fn add_track(&mut self, spec: TrackSpec) -> Result<Diff, PlannerError> {
        if self.tracks.contains_key(&spec.id) {
            return Err(PlannerError::DuplicateTrack(spec.id));
        }
        if !self.nodes.contains_key(&spec.origin) {
            return Err(PlannerError::UnknownNode(spec.origin));
        }
        // Every current viewer now also receives this track: check edges first.
        for (id, n) in &self.nodes {
            let extra = spec.viewer_load.times(n.viewers.len() as u64);
            let share = n.spec.capacity.percent(self.config.viewer_share_percent);
            if !n.viewer_load.saturating_add(extra).fits_in(share)
                || !n.load.saturating_add(extra).fits_in(n.spec.capacity)
            {
                return Err(PlannerError::TrackDoesNotFit(spec.id, *id));
            }
        }
        let snapshot = self.clone();
        let mut diff = DiffBuilder::default();
        self.per_viewer = self.per_viewer.saturating_add(spec.viewer_load);
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            if let Some(n) = self.nodes.get_mut(id) {
                let extra = spec.viewer_load.times(n.viewers.len() as u64);
                n.viewer_load = n.viewer_load.saturating_add(extra);
                n.load = n.load.saturating_add(extra);
            }
        }
        self.tracks.insert(spec.id, TrackTree::new(spec));
        let hosts: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.viewers.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for node in self.prim_order(spec.origin, hosts) {
            if self.attach_leaf(spec.id, node, &mut diff).is_err() {
                *self = snapshot;
                return Err(PlannerError::Unreachable(spec.id, node));
            }
        }
        for id in ids {
            self.refresh_open(id);
        }
        Ok(diff.finish(&self.tracks))
    }

    /// Removes a track (its publisher stopped) and tears its tree down.
    pub fn remove_track(&mut self, id: TrackId) -> Result<Diff, PlannerError> {
        let tree = self
            .tracks
            .remove(&id)
            .ok_or(PlannerError::UnknownTrack(id))?;
        let mut diff = DiffBuilder::default();
        let relay = tree.spec.relay_load;
        let viewer = tree.spec.viewer_load;
        for (node, m) in tree.members() {
            if let Some(p) = m.parent {
                diff.parent_changed(id, node, Some(p), None);
                self.sub_load(p, relay);
            }
        }
        self.per_viewer = self.per_viewer.saturating_sub(viewer);
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for nid in ids {
            if let Some(n) = self.nodes.get_mut(&nid) {
                let less = viewer.times(n.viewers.len() as u64);
                n.viewer_load = n.viewer_load.saturating_sub(less);
                n.load = n.load.saturating_sub(less);
            }
            self.refresh_open(nid);
        }
        Ok(diff.finish(&self.tracks))
    }

    /// A viewer from `region` joins: it is placed on the nearest node with room, and that node
    /// joins every tree it is not yet in. Atomic: on error nothing changes.
    pub fn join(&mut self, viewer: ViewerId, region: RegionId) -> Result<Diff, PlannerError> {
        if self.viewers.contains_key(&viewer) {
            return Err(PlannerError::DuplicateViewer(viewer));
        }
        if !self.rtt.contains(region) {
            return Err(PlannerError::UnknownViewerRegion(region));
        }
        let mut diff = DiffBuilder::default();
        self.place(viewer, region, &mut diff)?;
        Ok(diff.finish(&self.tracks))
    }

    /// Brings spilled viewers home: moves up to `max_moves` viewers that are served outside
    /// their nearest region to a strictly nearer node that now has room (for example after
    /// the autoscaler added nodes there). Each move is a make-before-break
    /// [`Action::MoveViewer`]: the viewer connects to its new edge before leaving the old
    /// one. Scans at most `8 × max_moves` spilled viewers per call, round robin, so the cost
    /// per call is bounded however many viewers spilled.
    pub fn rehome(&mut self, max_moves: usize) -> Diff {
        let mut diff = DiffBuilder::default();
        let scan_limit = max_moves.saturating_mul(8);
        let (mut moves, mut scanned) = (0usize, 0usize);
        let mut cursor = self.rehome_cursor;
        while moves < max_moves && scanned < scan_limit {
            let lower = match cursor {
                None => Bound::Unbounded,
                Some(c) => Bound::Excluded(c),
            };
            let Some(&v) = self.away.range((lower, Bound::Unbounded)).next() else {
                cursor = None;
                break;
            };
            cursor = Some(v);
            scanned += 1;
            let Some(state) = self.viewers.get(&v).copied() else {
                continue;
            };
            let Some(cur) = self.nodes.get(&state.node).map(|n| n.spec.region) else {
                continue;
            };
            let limit = self.rtt.rtt_us(state.region, cur);
            let nearer_open = self.nearest[state.region.index()]
                .iter()
                .take_while(|r| self.rtt.rtt_us(state.region, **r) < limit)
                .any(|r| !self.open[r.index()].is_empty());
            if !nearer_open {
                continue;
            }
            diff.viewer_changed(v, Some(state.node), Some(state.node));
            if self.place_within(v, state.region, limit, &mut diff).is_ok() {
                self.unhost(v, state.node);
                self.prune_everywhere(state.node, &mut diff);
                moves += 1;
            }
        }
        self.rehome_cursor = cursor;
        diff.finish(&self.tracks)
    }

    /// Improves trees in place: moves up to `max_moves` members (with their subtrees) to a
    /// parent whose score (modelled delay plus cross-region penalty) beats the current one by
    /// at least `min_gain_us` without a longer delay, within the fan-out, depth and capacity
    /// bounds. The typical catch: a node that joined when the only reachable parent was far
    /// away, and can now go through a member in a better-connected region. Trees drift from
    /// the greedy optimum through churn, failures and rehoming; this pass pulls them back.
    ///
    /// A move shifts a whole subtree by the same gain, so **no member's delay ever grows**.
    /// Each move is make-before-break: `Link` to the new parent, then `Unlink` from the old;
    /// an old parent left relaying to no one (and serving no viewer) leaves the tree.
    /// Scans at most `max(4 × max_moves, 16)` members per call, round robin over (track,
    /// node) in id order, so one call costs O(scan × members) however large the trees are.
    pub fn optimize(&mut self, max_moves: usize, min_gain_us: u64) -> Diff {
        let mut diff = DiffBuilder::default();
        let scan_limit = max_moves.saturating_mul(4).max(16);
        let (mut moves, mut scanned) = (0usize, 0usize);
        let mut cursor = self.optimize_cursor;
        while moves < max_moves && scanned < scan_limit {
            let Some((tid, n)) = self.next_member_after(cursor) else {
                cursor = None;
                break;
            };
            cursor = Some((tid, n));
            scanned += 1;
            let Some(tree) = self.tracks.get(&tid) else {
                continue;
            };
            let Some(cur) = tree.parent(n) else {
                continue; // the origin
            };
            let Some(cur_path) = tree.path_us(cur) else {
                continue;
            };
            let current = self.score(cur_path, cur, n);
            let height = tree.height(n);
            let mut exclude: BTreeSet<NodeId> = tree.subtree(n).into_iter().collect();
            exclude.insert(cur);
            let Some(best) = self.best_parent(tid, n, height, &exclude) else {
                continue;
            };
            let Some(best_path) = self.tracks.get(&tid).and_then(|t| t.path_us(best)) else {
                continue;
            };
            // Better score by the margin, and never a longer delay (the penalty may favour a
            // same-region parent whose raw delay is higher: skip those).
            let new_delay = best_path + self.hop_us(best, n);
            let old_delay = cur_path + self.hop_us(cur, n);
            if self.score(best_path, best, n).saturating_add(min_gain_us) <= current
                && new_delay <= old_delay
            {
                self.detach_member(tid, n, &mut diff);
                self.link(tid, best, n, &mut diff);
                // The old parent may now relay to no one.
                self.prune(tid, cur, &mut diff);
                moves += 1;
            }
        }
        self.optimize_cursor = cursor;
        diff.finish(&self.tracks)
    }

    /// The (track, member) after `cursor` in (track id, node id) order; `None` at the end.
    fn next_member_after(&self, cursor: Option<(TrackId, NodeId)>) -> Option<(TrackId, NodeId)> {
        let (tracks_from, after_node) = match cursor {
            None => (Bound::Unbounded, None),
            Some((t, n)) => (Bound::Included(t), Some((t, n))),
        };
        for (tid, tree) in self.tracks.range((tracks_from, Bound::Unbounded)) {
            let lower = match after_node {
                Some((t, n)) if t == *tid => Bound::Excluded(n),
                _ => Bound::Unbounded,
            };
            if let Some((&n, _)) = tree.members.range((lower, Bound::Unbounded)).next() {
                return Some((*tid, n));
            }
        }
        None
    }

    /// A viewer leaves. Its edge leaves every tree if it no longer serves anyone and relays
    /// to no one (and so on upward).
    pub fn leave(&mut self, viewer: ViewerId) -> Result<Diff, PlannerError> {
        let v = self
            .viewers
            .remove(&viewer)
            .ok_or(PlannerError::UnknownViewer(viewer))?;
        self.away.remove(&viewer);
        let mut diff = DiffBuilder::default();
        diff.viewer_changed(viewer, Some(v.node), None);
        self.unhost(viewer, v.node);
        self.prune_everywhere(v.node, &mut diff);
        Ok(diff.finish(&self.tracks))
    }

    /// Removes a node, whether it failed or is being drained: re-parents its children in
    /// every tree, moves the publisher of any track it originated, and moves its viewers.
    ///
    /// The diff is make-before-break: new links and viewer moves come first, then the
    /// removal of the old links. For a failure the removals are bookkeeping (the old node is
    /// gone); for a planned drain they are real, and executing the list in order means no
    /// viewer ever loses its path.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Removal, PlannerError> {
        let Some(dead) = self.nodes.get(&id) else {
            return Err(PlannerError::UnknownNode(id));
        };
        let dead_region = dead.spec.region;
        // Origin replacement must exist before we mutate anything.
        let mut origin_moves = Vec::new();
        for t in self.tracks.values() {
            if t.origin() == id {
                let new_origin = self
                    .nodes
                    .values()
                    .filter(|n| n.spec.id != id && !n.cordoned)
                    .min_by_key(|n| {
                        // Nearest to the old origin; among equals one that can still relay,
                        // then one already carrying the track (warm), then the lower id.
                        let can_relay = n
                            .load
                            .saturating_add(t.spec.relay_load)
                            .fits_in(n.spec.capacity);
                        (
                            self.rtt.rtt_us(dead_region, n.spec.region),
                            !can_relay,
                            !t.contains(n.spec.id),
                            n.spec.id,
                        )
                    })
                    .map(|n| n.spec.id)
                    .ok_or(PlannerError::NoOriginLeft(t.spec.id))?;
                origin_moves.push((t.spec.id, new_origin));
            }
        }

        let mut diff = DiffBuilder::default();
        let mut displaced: Vec<(ViewerId, RegionId, NodeId)> = Vec::new();
        // 1. Detach the node's viewers and take it out of the pool.
        let viewers: Vec<ViewerId> = self.viewers_on(id).collect();
        for v in viewers {
            if let Some(state) = self.viewers.remove(&v) {
                self.away.remove(&v);
                self.unhost(v, id);
                displaced.push((v, state.region, id));
            }
        }
        self.open[dead_region.index()].remove(&id);
        let mut evicted: BTreeSet<NodeId> = BTreeSet::new();

        // 2. Repair every tree.
        let track_ids: Vec<TrackId> = self.tracks.keys().copied().collect();
        for tid in track_ids {
            if let Some(&(_, new_origin)) = origin_moves.iter().find(|(t, _)| *t == tid) {
                self.rebuild(tid, new_origin, Some(id), &mut diff, &mut evicted);
                continue;
            }
            let Some(tree) = self.tracks.get(&tid) else {
                continue;
            };
            let Some(member) = tree.member(id) else {
                continue;
            };
            let parent = member.parent;
            let orphans: Vec<NodeId> = member.children.iter().copied().collect();
            // Detach the removed node from its parent and its children from it.
            self.detach_member(tid, id, &mut diff);
            for c in &orphans {
                self.cut_child(tid, id, *c, &mut diff);
            }
            if let Some(tree) = self.tracks.get_mut(&tid) {
                tree.members.remove(&id);
            }
            for c in orphans {
                if !self.reparent_subtree(tid, c, &mut diff) {
                    self.dissolve(tid, c, &mut diff, &mut evicted);
                }
            }
            // The removed node's parent may now be a dangling relay.
            if let Some(p) = parent {
                self.prune(tid, p, &mut diff);
            }
        }
        // The node is now in no tree; forget it (and any open-set entry a load change
        // during the repair may have re-created).
        self.nodes.remove(&id);
        self.open[dead_region.index()].remove(&id);

        // 3. Nodes that lost a track they serve give up their viewers.
        for n in evicted {
            let vs: Vec<ViewerId> = self.viewers_on(n).collect();
            for v in vs {
                if let Some(state) = self.viewers.remove(&v) {
                    self.away.remove(&v);
                    self.unhost(v, n);
                    displaced.push((v, state.region, n));
                }
            }
            self.prune_everywhere(n, &mut diff);
        }

        // 4. Re-place displaced viewers (in id order, for determinism).
        displaced.sort();
        let mut unplaced = Vec::new();
        for (v, region, from) in displaced {
            diff.viewer_changed(v, Some(from), None);
            if self.place(v, region, &mut diff).is_err() {
                unplaced.push((v, region));
            }
        }
        Ok(Removal {
            diff: diff.finish(&self.tracks),
            unplaced,
            new_origins: origin_moves,
        })
    }

    // ---------------------------------------------------------------- invariants

    /// Checks every invariant listed in the module docs, returning the first violation.
    /// O(nodes × tracks + viewers); meant for tests and debug runs, not hot paths.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut expected: BTreeMap<NodeId, Load> = BTreeMap::new();
        for (id, n) in &self.nodes {
            let vl = self.per_viewer.times(n.viewers.len() as u64);
            if vl != n.viewer_load {
                return Err(format!("{id}: viewer load {:?} != {:?}", n.viewer_load, vl));
            }
            expected.insert(*id, vl);
            if !n
                .viewer_load
                .fits_in(n.spec.capacity.percent(self.config.viewer_share_percent))
            {
                return Err(format!("{id}: viewer load above its share"));
            }
        }
        for (tid, t) in &self.tracks {
            if t.spec.id != *tid {
                return Err(format!("{tid}: key mismatch"));
            }
            let origin = t.origin();
            match t.member(origin) {
                Some(m) if m.parent.is_none() && m.depth == 0 && m.path_us == 0 => {}
                _ => return Err(format!("{tid}: origin {origin} is not a proper root")),
            }
            for (nid, m) in t.members() {
                if !self.nodes.contains_key(&nid) {
                    return Err(format!("{tid}: member {nid} is not a live node"));
                }
                if m.children.len() as u64 > u64::from(self.config.max_fanout) {
                    return Err(format!("{tid}: {nid} has {} children", m.children.len()));
                }
                if m.depth > self.config.max_depth {
                    return Err(format!("{tid}: {nid} at depth {}", m.depth));
                }
                for c in &m.children {
                    match t.member(*c) {
                        Some(cm) if cm.parent == Some(nid) => {}
                        _ => return Err(format!("{tid}: child link {nid}->{c} is one-sided")),
                    }
                    if let Some(load) = expected.get_mut(&nid) {
                        *load = load.saturating_add(t.spec.relay_load);
                    }
                }
                if let Some(p) = m.parent {
                    let Some(pm) = t.member(p) else {
                        return Err(format!("{tid}: {nid}'s parent {p} is not a member"));
                    };
                    if !pm.children.contains(&nid) {
                        return Err(format!("{tid}: parent link {p}->{nid} is one-sided"));
                    }
                    if m.depth != pm.depth + 1 {
                        return Err(format!("{tid}: {nid} depth {} under {}", m.depth, pm.depth));
                    }
                    if m.path_us != pm.path_us + self.hop_us(p, nid) {
                        return Err(format!("{tid}: {nid} path delay is stale"));
                    }
                    let serves = self.nodes.get(&nid).is_some_and(|n| !n.viewers.is_empty());
                    if !serves && m.children.is_empty() {
                        return Err(format!("{tid}: {nid} is a dangling relay"));
                    }
                } else if nid != origin {
                    return Err(format!("{tid}: {nid} has no parent but is not the origin"));
                }
            }
            // Reachability and acyclicity: a walk from the origin visits every member once.
            let reached = t.subtree(origin);
            let unique: BTreeSet<NodeId> = reached.iter().copied().collect();
            if reached.len() != t.len() || unique.len() != t.len() {
                return Err(format!(
                    "{tid}: {} members but {} reachable from the origin",
                    t.len(),
                    unique.len()
                ));
            }
        }
        for (id, n) in &self.nodes {
            let exp = expected.get(id).copied().unwrap_or_default();
            if exp != n.load {
                return Err(format!("{id}: load {:?} != recomputed {:?}", n.load, exp));
            }
            if !n.load.fits_in(n.spec.capacity) {
                return Err(format!("{id}: over capacity {:?}", n.load));
            }
            if !n.viewers.is_empty() {
                for (tid, t) in &self.tracks {
                    if !t.contains(*id) {
                        return Err(format!("{id} serves viewers but is not in {tid}"));
                    }
                }
            }
            let should_be_open = self.can_take_viewer(*id);
            if self.open[n.spec.region.index()].contains(id) != should_be_open {
                return Err(format!("{id}: open-set entry is stale"));
            }
            for v in &n.viewers {
                if self.viewers.get(v).map(|s| s.node) != Some(*id) {
                    return Err(format!("{v:?} is listed on {id} but recorded elsewhere"));
                }
            }
        }
        for (v, st) in &self.viewers {
            let nearest = self.nearest[st.region.index()].first().copied();
            let region = self.nodes.get(&st.node).map(|n| n.spec.region);
            if (region != nearest) != self.away.contains(v) {
                return Err(format!("{v:?}: spilled-viewer index is stale"));
            }
        }
        if self.away.len() > self.viewers.len() {
            return Err("spilled-viewer index lists departed viewers".into());
        }
        let listed: usize = self.nodes.values().map(|n| n.viewers.len()).sum();
        if listed != self.viewers.len() {
            return Err(format!(
                "{} viewers recorded, {listed} listed on nodes",
                self.viewers.len()
            ));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- internals

    /// Modelled delay of the hop `parent → child`.
    fn hop_us(&self, parent: NodeId, child: NodeId) -> u64 {
        let (Some(p), Some(c)) = (self.nodes.get(&parent), self.nodes.get(&child)) else {
            return u64::from(u32::MAX);
        };
        u64::from(self.rtt.one_way_us(p.spec.region, c.spec.region))
            + u64::from(self.config.hop_processing_us)
    }

    /// Parent-choice score: delay plus the cross-region penalty.
    fn score(&self, parent_path: u64, parent: NodeId, child: NodeId) -> u64 {
        let cross = match (self.nodes.get(&parent), self.nodes.get(&child)) {
            (Some(p), Some(c)) if p.spec.region != c.spec.region => {
                u64::from(self.config.cross_region_penalty_us)
            }
            _ => 0,
        };
        parent_path + self.hop_us(parent, child) + cross
    }

    fn can_take_viewer(&self, id: NodeId) -> bool {
        self.viewer_room(id) >= 1
    }

    fn refresh_open(&mut self, id: NodeId) {
        let Some(region) = self.nodes.get(&id).map(|n| n.spec.region) else {
            return;
        };
        if self.can_take_viewer(id) {
            self.open[region.index()].insert(id);
        } else {
            self.open[region.index()].remove(&id);
        }
    }

    fn add_load(&mut self, id: NodeId, load: Load) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.load = n.load.saturating_add(load);
        }
        self.refresh_open(id);
    }

    fn sub_load(&mut self, id: NodeId, load: Load) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.load = n.load.saturating_sub(load);
        }
        self.refresh_open(id);
    }

    /// Removes `viewer` from `node`'s books (the `viewers` map is the caller's business).
    fn unhost(&mut self, viewer: ViewerId, node: NodeId) {
        let pv = self.per_viewer;
        if let Some(n) = self.nodes.get_mut(&node) {
            if n.viewers.remove(&viewer) {
                n.viewer_load = n.viewer_load.saturating_sub(pv);
                n.load = n.load.saturating_sub(pv);
            }
        }
        self.refresh_open(node);
    }

    /// Nodes sorted by their direct score from `origin` (Prim-like attach order).
    fn prim_order(&self, origin: NodeId, mut nodes: Vec<NodeId>) -> Vec<NodeId> {
        nodes.retain(|n| *n != origin);
        nodes.sort_by_key(|n| (self.score(0, origin, *n), *n));
        nodes
    }

    /// Places a viewer on the nearest node with room, attaching that node to every tree.
    fn place(
        &mut self,
        viewer: ViewerId,
        region: RegionId,
        diff: &mut DiffBuilder,
    ) -> Result<NodeId, PlannerError> {
        self.place_within(viewer, region, u32::MAX, diff)
    }

    /// [`Self::place`] restricted to regions whose RTT from `region` is below `limit_us`
    /// (`u32::MAX` = every region).
    fn place_within(
        &mut self,
        viewer: ViewerId,
        region: RegionId,
        limit_us: u32,
        diff: &mut DiffBuilder,
    ) -> Result<NodeId, PlannerError> {
        let order = self
            .nearest
            .get(region.index())
            .cloned()
            .ok_or(PlannerError::UnknownViewerRegion(region))?;
        let home = order.first().copied().unwrap_or(region);
        for r in order {
            if limit_us != u32::MAX && self.rtt.rtt_us(region, r) >= limit_us {
                break;
            }
            let mut after: Option<NodeId> = None;
            loop {
                let lower = match after {
                    None => Bound::Unbounded,
                    Some(a) => Bound::Excluded(a),
                };
                let Some(&node) = self.open[r.index()].range((lower, Bound::Unbounded)).next()
                else {
                    break;
                };
                after = Some(node);
                if self.ensure_member_everywhere(node, diff) {
                    let pv = self.per_viewer;
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.viewers.insert(viewer);
                        n.viewer_load = n.viewer_load.saturating_add(pv);
                        n.load = n.load.saturating_add(pv);
                    }
                    self.refresh_open(node);
                    self.viewers.insert(viewer, ViewerState { region, node });
                    if r == home {
                        self.away.remove(&viewer);
                    } else {
                        self.away.insert(viewer);
                    }
                    diff.viewer_changed(viewer, None, Some(node));
                    return Ok(node);
                }
            }
        }
        Err(PlannerError::NoCapacity(region))
    }

    /// Makes `node` a member of every tree; all-or-nothing.
    fn ensure_member_everywhere(&mut self, node: NodeId, diff: &mut DiffBuilder) -> bool {
        let missing: Vec<TrackId> = self
            .tracks
            .iter()
            .filter(|(_, t)| !t.contains(node))
            .map(|(id, _)| *id)
            .collect();
        let mut done = Vec::new();
        for tid in missing {
            if self.attach_leaf(tid, node, diff).is_ok() {
                done.push(tid);
            } else {
                for t in done {
                    self.detach_member(t, node, diff);
                    if let Some(tree) = self.tracks.get_mut(&t) {
                        tree.members.remove(&node);
                    }
                }
                return false;
            }
        }
        true
    }

    /// Best adoptive parent for a subtree rooted at `child` of height `height`, excluding
    /// `exclude` (the subtree itself).
    fn best_parent(
        &self,
        tid: TrackId,
        child: NodeId,
        height: u32,
        exclude: &BTreeSet<NodeId>,
    ) -> Option<NodeId> {
        let tree = self.tracks.get(&tid)?;
        let relay = tree.spec.relay_load;
        let mut best: Option<(u64, u32, NodeId)> = None;
        for (pid, m) in tree.members() {
            if exclude.contains(&pid)
                || m.children.len() as u64 >= u64::from(self.config.max_fanout)
                || m.depth + 1 + height > self.config.max_depth
            {
                continue;
            }
            let Some(pn) = self.nodes.get(&pid) else {
                continue;
            };
            if pn.cordoned {
                continue;
            }
            if !pn.load.saturating_add(relay).fits_in(pn.spec.capacity) {
                continue;
            }
            let key = (self.score(m.path_us, pid, child), m.depth, pid);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }

    /// Attaches a non-member `node` as a leaf of `tid`.
    fn attach_leaf(
        &mut self,
        tid: TrackId,
        node: NodeId,
        diff: &mut DiffBuilder,
    ) -> Result<(), PlannerError> {
        let parent = self
            .best_parent(tid, node, 0, &BTreeSet::from([node]))
            .ok_or(PlannerError::Unreachable(tid, node))?;
        self.link(tid, parent, node, diff);
        Ok(())
    }

    /// Creates the edge `parent → child` (child not yet a member or currently detached) and
    /// recomputes depths and delays below `child`.
    fn link(&mut self, tid: TrackId, parent: NodeId, child: NodeId, diff: &mut DiffBuilder) {
        let hop = self.hop_us(parent, child);
        let Some(tree) = self.tracks.get_mut(&tid) else {
            return;
        };
        let relay = tree.spec.relay_load;
        let Some(pm) = tree.members.get_mut(&parent) else {
            return;
        };
        pm.children.insert(child);
        let (pdepth, ppath) = (pm.depth, pm.path_us);
        let entry = tree.members.entry(child).or_insert(Member {
            parent: None,
            children: BTreeSet::new(),
            depth: 0,
            path_us: 0,
        });
        let old = entry.parent;
        entry.parent = Some(parent);
        entry.depth = pdepth + 1;
        entry.path_us = ppath + hop;
        diff.parent_changed(tid, child, old, Some(parent));
        self.refresh_below(tid, child);
        self.add_load(parent, relay);
    }

    /// Recomputes depth and delay of everything below `node` from `node`'s own values.
    fn refresh_below(&mut self, tid: TrackId, node: NodeId) {
        let Some(order) = self.tracks.get(&tid).map(|t| t.subtree(node)) else {
            return;
        };
        for n in order.into_iter().skip(1) {
            let Some(p) = self.tracks.get(&tid).and_then(|t| t.parent(n)) else {
                continue;
            };
            let hop = self.hop_us(p, n);
            let Some(tree) = self.tracks.get_mut(&tid) else {
                return;
            };
            let Some((pd, pp)) = tree.members.get(&p).map(|m| (m.depth, m.path_us)) else {
                continue;
            };
            if let Some(m) = tree.members.get_mut(&n) {
                m.depth = pd + 1;
                m.path_us = pp + hop;
            }
        }
    }

    /// Cuts `node` from its parent (keeps the member record and its children).
    fn detach_member(&mut self, tid: TrackId, node: NodeId, diff: &mut DiffBuilder) {
        let Some(tree) = self.tracks.get_mut(&tid) else {
            return;
        };
        let relay = tree.spec.relay_load;
        let Some(parent) = tree.members.get_mut(&node).and_then(|m| m.parent.take()) else {
            return;
        };
        if let Some(pm) = tree.members.get_mut(&parent) {
            pm.children.remove(&node);
        }
        diff.parent_changed(tid, node, Some(parent), None);
        self.sub_load(parent, relay);
    }

    /// Cuts the edge `parent → child` from the parent's side (used when the parent dies).
    fn cut_child(&mut self, tid: TrackId, parent: NodeId, child: NodeId, diff: &mut DiffBuilder) {
        let Some(tree) = self.tracks.get_mut(&tid) else {
            return;
        };
        let relay = tree.spec.relay_load;
        if let Some(pm) = tree.members.get_mut(&parent) {
            pm.children.remove(&child);
        }
        if let Some(cm) = tree.members.get_mut(&child) {
            cm.parent = None;
        }
        diff.parent_changed(tid, child, Some(parent), None);
        self.sub_load(parent, relay);
    }

    /// Re-attaches the detached subtree rooted at `child` as a whole. False if no member
    /// outside it can adopt it within the bounds.
    fn reparent_subtree(&mut self, tid: TrackId, child: NodeId, diff: &mut DiffBuilder) -> bool {
        let Some(tree) = self.tracks.get(&tid) else {
            return false;
        };
        let sub = tree.subtree(child);
        let child_depth = tree.depth(child).unwrap_or(0);
        let height = sub
            .iter()
            .filter_map(|n| tree.depth(*n))
            .max()
            .unwrap_or(child_depth)
            .saturating_sub(child_depth);
        let exclude: BTreeSet<NodeId> = sub.into_iter().collect();
        // Members of the detached subtree are still in `members` with stale depths; exclude
        // them so they can never become their own ancestor.
        let Some(parent) = self.best_parent_excluding_detached(tid, child, height, &exclude) else {
            return false;
        };
        self.link(tid, parent, child, diff);
        true
    }

    /// Like [`Self::best_parent`] but also skips members that are currently detached from
    /// the origin (other orphaned subtrees still waiting for a parent).
    fn best_parent_excluding_detached(
        &self,
        tid: TrackId,
        child: NodeId,
        height: u32,
        exclude: &BTreeSet<NodeId>,
    ) -> Option<NodeId> {
        let tree = self.tracks.get(&tid)?;
        let attached: BTreeSet<NodeId> = tree.subtree(tree.origin()).into_iter().collect();
        let mut ex = exclude.clone();
        ex.extend(tree.members.keys().filter(|k| !attached.contains(k)));
        self.best_parent(tid, child, height, &ex)
    }

    /// Dissolves the detached subtree rooted at `root`: every member leaves the tree, then
    /// the nodes that serve viewers re-attach one by one (nearest to the origin first).
    /// Nodes that cannot re-attach are added to `evicted`.
    fn dissolve(
        &mut self,
        tid: TrackId,
        root: NodeId,
        diff: &mut DiffBuilder,
        evicted: &mut BTreeSet<NodeId>,
    ) {
        let Some(sub) = self.tracks.get(&tid).map(|t| t.subtree(root)) else {
            return;
        };
        for n in sub.iter().rev() {
            self.detach_member(tid, *n, diff);
        }
        if let Some(tree) = self.tracks.get_mut(&tid) {
            for n in &sub {
                tree.members.remove(n);
            }
        }
        // `root` was cut from its dead parent already; record its exit.
        let origin = match self.tracks.get(&tid) {
            Some(t) => t.origin(),
            None => return,
        };
        let hosts: Vec<NodeId> = sub
            .into_iter()
            .filter(|n| self.nodes.get(n).is_some_and(|s| !s.viewers.is_empty()))
            .collect();
        for n in self.prim_order(origin, hosts) {
            if self.attach_leaf(tid, n, diff).is_err() {
                evicted.insert(n);
            }
        }
    }

    /// Rebuilds `tid` around `new_origin`, keeping every node that serves viewers.
    fn rebuild(
        &mut self,
        tid: TrackId,
        new_origin: NodeId,
        removed: Option<NodeId>,
        diff: &mut DiffBuilder,
        evicted: &mut BTreeSet<NodeId>,
    ) {
        let Some(old) = self.tracks.remove(&tid) else {
            return;
        };
        let relay = old.spec.relay_load;
        for (n, m) in old.members() {
            if let Some(p) = m.parent {
                diff.parent_changed(tid, n, Some(p), None);
                self.sub_load(p, relay);
            }
        }
        let mut spec = old.spec;
        spec.origin = new_origin;
        self.tracks.insert(tid, TrackTree::new(spec));
        let hosts: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| Some(**id) != removed && !n.viewers.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for n in self.prim_order(new_origin, hosts) {
            if self.attach_leaf(tid, n, diff).is_err() {
                evicted.insert(n);
            }
        }
    }

    /// Removes `node` from `tid` if it is a dangling relay, then walks upward.
    fn prune(&mut self, tid: TrackId, mut node: NodeId, diff: &mut DiffBuilder) {
        loop {
            let Some(tree) = self.tracks.get(&tid) else {
                return;
            };
            let Some(m) = tree.member(node) else {
                return;
            };
            let serves = self.nodes.get(&node).is_some_and(|n| !n.viewers.is_empty());
            if node == tree.origin() || serves || !m.children.is_empty() {
                return;
            }
            let Some(parent) = m.parent else {
                return;
            };
            self.detach_member(tid, node, diff);
            if let Some(tree) = self.tracks.get_mut(&tid) {
                tree.members.remove(&node);
            }
            node = parent;
        }
    }

    fn prune_everywhere(&mut self, node: NodeId, diff: &mut DiffBuilder) {
        let ids: Vec<TrackId> = self.tracks.keys().copied().collect();
        for tid in ids {
            self.prune(tid, node, diff);
        }
    }
}

#[cfg(test)]
mod tests;
