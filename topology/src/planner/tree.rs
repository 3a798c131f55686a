//! One relay tree: the set of nodes that carry one published track, and who feeds whom.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::nodes::{Load, NodeId};

/// Identifies one published track (one publisher's camera, microphone or screen share).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrackId(pub u32);

impl std::fmt::Display for TrackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// What the planner needs to know about a published track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackSpec {
    /// Unique identifier.
    pub id: TrackId,
    /// The node the publisher is connected to: the root of the tree.
    pub origin: NodeId,
    /// Cost for a parent to forward this track to one child node: the **whole** simulcast set
    /// (relays forward every layer, edges pick per viewer; see design notes).
    pub relay_load: Load,
    /// Average cost for an edge to send this track to one viewer (one layer, weighted by the
    /// expected layer mix).
    pub viewer_load: Load,
}

/// A node's place in one tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Upstream node; `None` only for the origin.
    pub parent: Option<NodeId>,
    /// Downstream nodes, ordered by id.
    pub children: BTreeSet<NodeId>,
    /// Relay hops from the origin (origin = 0).
    pub depth: u32,
    /// Modelled one-way delay from the origin to this node in µs: the sum over hops of the
    /// one-way region delay plus the per-hop processing time.
    pub path_us: u64,
}

/// The relay tree of one track.
///
/// The struct only stores structure; every rule (capacity, fan-out, depth) is enforced by
/// [`super::Planner`], which is the only code that mutates trees. Read accessors are public so
/// that the relay fabric and the simulator can inspect plans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackTree {
    pub(crate) spec: TrackSpec,
    pub(crate) members: BTreeMap<NodeId, Member>,
}

impl TrackTree {
    /// A tree holding only its origin.
    pub(crate) fn new(spec: TrackSpec) -> Self {
        let mut members = BTreeMap::new();
        members.insert(
            spec.origin,
            Member {
                parent: None,
                children: BTreeSet::new(),
                depth: 0,
                path_us: 0,
            },
        );
        TrackTree { spec, members }
    }

    /// The track this tree carries.
    pub fn spec(&self) -> &TrackSpec {
        &self.spec
    }

    /// The root node (where the publisher is connected).
    pub fn origin(&self) -> NodeId {
        self.spec.origin
    }

    /// True when `node` receives this track.
    pub fn contains(&self, node: NodeId) -> bool {
        self.members.contains_key(&node)
    }

    /// A member's record.
    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }

    /// All members in id order.
    pub fn members(&self) -> impl Iterator<Item = (NodeId, &Member)> {
        self.members.iter().map(|(k, v)| (*k, v))
    }

    /// Number of nodes carrying the track (origin included).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never true: a tree always holds its origin.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Upstream of `node`, if `node` is a non-origin member.
    pub fn parent(&self, node: NodeId) -> Option<NodeId> {
        self.members.get(&node).and_then(|m| m.parent)
    }

    /// Depth of `node` (hops from the origin).
    pub fn depth(&self, node: NodeId) -> Option<u32> {
        self.members.get(&node).map(|m| m.depth)
    }

    /// Modelled origin→`node` one-way delay in µs.
    pub fn path_us(&self, node: NodeId) -> Option<u64> {
        self.members.get(&node).map(|m| m.path_us)
    }

    /// Deepest member's depth.
    pub fn max_depth(&self) -> u32 {
        self.members.values().map(|m| m.depth).max().unwrap_or(0)
    }

    /// `node` and everything below it, breadth-first, children in id order. Empty when `node`
    /// is not a member.
    pub fn subtree(&self, node: NodeId) -> Vec<NodeId> {
        let mut out = Vec::new();
        if !self.members.contains_key(&node) {
            return out;
        }
        let mut queue = VecDeque::from([node]);
        while let Some(n) = queue.pop_front() {
            out.push(n);
            if let Some(m) = self.members.get(&n) {
                queue.extend(m.children.iter().copied());
            }
        }
        out
    }

    /// Height of the subtree under `node` (0 for a leaf).
    pub fn height(&self, node: NodeId) -> u32 {
        let base = self.depth(node).unwrap_or(0);
        self.subtree(node)
            .iter()
            .filter_map(|n| self.depth(*n))
            .max()
            .unwrap_or(base)
            - base
    }

    /// The origin→`node` path, origin first. Empty when `node` is not a member.
    pub fn path(&self, node: NodeId) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut cur = Some(node);
        // A path can never be longer than the member count; the bound guards against a
        // corrupted tree turning this into an endless loop.
        while let Some(n) = cur {
            if !self.members.contains_key(&n) || out.len() > self.members.len() {
                break;
            }
            out.push(n);
            cur = self.parent(n);
        }
        out.reverse();
        out
    }
}
