//! What the planner asks the relay fabric to do: an ordered list of [`Action`]s.

use std::collections::BTreeMap;

use super::tree::{TrackId, TrackTree};
use crate::nodes::NodeId;

/// Identifies one viewer (one subscriber connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ViewerId(pub u64);

/// One step for the relay fabric.
///
/// A [`Diff`] lists steps in **make-before-break** order: every step that adds a path
/// ([`Action::Link`], [`Action::AttachViewer`], [`Action::MoveViewer`]) comes before every
/// step that removes one ([`Action::Unlink`], [`Action::DetachViewer`]). Links are ordered
/// upstream first (by the child's depth in the new tree), so when the fabric executes the
/// list in order each new hop's parent already receives the track.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// `parent` starts forwarding `track` to `child`.
    Link {
        /// Track being forwarded.
        track: TrackId,
        /// Upstream node.
        parent: NodeId,
        /// Downstream node.
        child: NodeId,
    },
    /// A new viewer is served by `node`.
    AttachViewer {
        /// The viewer.
        viewer: ViewerId,
        /// Its edge node.
        node: NodeId,
    },
    /// The viewer connects to `to` first, then leaves `from` (session migration).
    MoveViewer {
        /// The viewer.
        viewer: ViewerId,
        /// Old edge node (may already be dead after a failure).
        from: NodeId,
        /// New edge node.
        to: NodeId,
    },
    /// `parent` stops forwarding `track` to `child`.
    Unlink {
        /// Track no longer forwarded on this hop.
        track: TrackId,
        /// Upstream node.
        parent: NodeId,
        /// Downstream node.
        child: NodeId,
    },
    /// The viewer is no longer served by `node` (it left, or could not be re-placed).
    DetachViewer {
        /// The viewer.
        viewer: ViewerId,
        /// Its former edge node.
        node: NodeId,
    },
}

impl Action {
    /// True for steps that add a path (the "make" half of make-before-break).
    pub fn is_make(&self) -> bool {
        matches!(
            self,
            Action::Link { .. } | Action::AttachViewer { .. } | Action::MoveViewer { .. }
        )
    }
}

/// The ordered result of one planner operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Steps in make-before-break order (see [`Action`]).
    pub actions: Vec<Action>,
}

impl Diff {
    /// True when the operation changed nothing the fabric must act on.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Collects the *net* effect of an operation, so that an edge removed and re-created within
/// one operation (for example while a subtree is dissolved and rebuilt) produces no step, and
/// a re-parented node produces exactly one `Link` (new parent) and one `Unlink` (old parent).
#[derive(Default)]
pub(crate) struct DiffBuilder {
    /// (track, child) → (parent before the operation, parent now). `None` = not a member.
    parents: BTreeMap<(TrackId, NodeId), (Option<NodeId>, Option<NodeId>)>,
    /// viewer → (edge before, edge now).
    viewers: BTreeMap<ViewerId, (Option<NodeId>, Option<NodeId>)>,
}

impl DiffBuilder {
    pub(crate) fn parent_changed(
        &mut self,
        track: TrackId,
        child: NodeId,
        old: Option<NodeId>,
        new: Option<NodeId>,
    ) {
        self.parents.entry((track, child)).or_insert((old, new)).1 = new;
    }

    pub(crate) fn viewer_changed(
        &mut self,
        viewer: ViewerId,
        old: Option<NodeId>,
        new: Option<NodeId>,
    ) {
        self.viewers.entry(viewer).or_insert((old, new)).1 = new;
    }

    /// Produces the ordered diff. `trees` is the state after the operation; it supplies the
    /// depth used to order links upstream-first.
    pub(crate) fn finish(self, trees: &BTreeMap<TrackId, TrackTree>) -> Diff {
        let mut links = Vec::new();
        let mut unlinks = Vec::new();
        for ((track, child), (old, new)) in self.parents {
            if old == new {
                continue;
            }
            if let Some(parent) = new {
                let depth = trees
                    .get(&track)
                    .and_then(|t| t.depth(child))
                    .unwrap_or(u32::MAX);
                links.push((track, depth, child, parent));
            }
            if let Some(parent) = old {
                unlinks.push(Action::Unlink {
                    track,
                    parent,
                    child,
                });
            }
        }
        links.sort();
        let mut actions: Vec<Action> = links
            .into_iter()
            .map(|(track, _, child, parent)| Action::Link {
                track,
                parent,
                child,
            })
            .collect();
        let mut detaches = Vec::new();
        for (viewer, (old, new)) in self.viewers {
            match (old, new) {
                (None, Some(node)) => actions.push(Action::AttachViewer { viewer, node }),
                (Some(from), Some(to)) if from != to => {
                    actions.push(Action::MoveViewer { viewer, from, to })
                }
                (Some(node), None) => detaches.push(Action::DetachViewer { viewer, node }),
                _ => {}
            }
        }
        actions.extend(unlinks);
        actions.extend(detaches);
        Diff { actions }
    }
}
