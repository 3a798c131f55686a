//! The relay fabric as the control plane sees it: a room served by several nodes.
//!
//! A clustered node runs each room in one of two roles, decided by the Raft room directory:
//!
//! * **origin** — this node holds the room's origin lease. Other nodes' rooms link to it.
//! * **edge** — another node is the origin; this node's room opens a *room link* to its
//!   *parent*: the node the relay-tree planner puts above it in the room's tree (the origin,
//!   or a node of its own region nearer the origin). A parent that does not have the room yet
//!   opens it as an edge and links upward in turn, so a track crosses each link once.
//!
//! Every node's [`crate::room::Room`] holds its *local* participants (with sessions here) and
//! the *remote* ones it learned over its links. Links form a tree (edges → parents → origin), and every
//! message a node receives on one link is passed on to its other links (never back), so state
//! floods the tree exactly once: participants, departures, data packets (in order per sender:
//! one ordered stream per link), speaker levels. Media takes the same tree in QUIC datagrams
//! (see [`crate::media::relay`]), only where someone downstream `Want`s the track.
//!
//! Links come and go: a node dies (its children re-plan without it and link to a new parent),
//! or a re-plan finds a better parent (the edge brings the new link up as a *candidate*, waits
//! until it has confirmed the room, then closes the old one: make-before-break). What a room
//! learned over a link that closed is not dropped: those participants become *orphans* until
//! another link confirms them (they are then adopted, relayed tracks and local subscriptions
//! intact) or a grace period ends. See `Room::on_link_closed`, `Room::replan` and
//! `ARCHITECTURE.md` (*Failure and re-planning*).
//!
//! This module only defines what the room needs from the outside — [`Directory`] (who is the
//! origin, open a link) and [`LinkIo`] (a link as two bounded queues). The binary implements
//! them over the Raft service and quinn.

use std::future::Future;
use std::pin::Pin;

use arbor_proto::relay::link_frame::Kind as LinkMsg;
use tokio::sync::mpsc;

/// Frames queued per link direction. A link whose queue is full is reset (and re-synchronised
/// from scratch when it comes back), never allowed to grow or to lose state silently.
pub const LINK_QUEUE: usize = 4096;

/// A boxed future (the directory is called from actors through a trait object).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One room link as two bounded queues of frames. Dropping `tx` closes the link; `rx` ends when
/// the peer closes or the connection dies.
pub struct LinkIo {
    pub tx: mpsc::Sender<LinkMsg>,
    pub rx: mpsc::Receiver<LinkMsg>,
}

/// A room as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The node holding the room's origin lease.
    pub origin: u64,
    /// The room's sid, the same on every node (the directory derives it from the log position
    /// that created the room); empty if the directory has none.
    pub sid: String,
    /// When the room was created (cluster time, ms since the Unix epoch).
    pub created_ms: u64,
}

/// What a clustered room needs from its node.
pub trait Directory: Send + Sync + 'static {
    /// This node's cluster id.
    fn node_id(&self) -> u64;
    /// The room's origin and identity (creating the room in the directory, with this node as
    /// origin, if it does not exist).
    fn resolve(&self, room: String) -> BoxFuture<Result<Resolved, String>>;
    /// The node this node's room should link to (its parent in the room's relay tree, planned
    /// by the relay-tree planner; the origin when the plan has nothing better).
    fn parent(&self, room: String, origin: u64) -> BoxFuture<Result<u64, String>>;
    /// Reports the node the room's upstream link is open to (`None`: none now), for
    /// observability.
    fn upstream(&self, room: &str, peer: Option<u64>);
    /// Opens a room link to `peer`.
    fn open_link(&self, peer: u64, room: String) -> BoxFuture<Result<LinkIo, String>>;
}

/// The events of one link, as an actix stream: frames, then `Closed` once.
pub(crate) struct LinkStream {
    pub id: u64,
    pub rx: mpsc::Receiver<LinkMsg>,
    pub done: bool,
}

/// An event of link `id`.
pub(crate) enum LinkEvent {
    Frame(u64, Box<LinkMsg>),
    Closed(u64),
}

impl futures_core::Stream for LinkStream {
    type Item = LinkEvent;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        let id = self.id;
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(m)) => {
                std::task::Poll::Ready(Some(LinkEvent::Frame(id, Box::new(m))))
            }
            std::task::Poll::Ready(None) => {
                self.done = true;
                std::task::Poll::Ready(Some(LinkEvent::Closed(id)))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}
