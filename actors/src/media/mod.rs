//! The media data plane: WebRTC transports (str0m) and the packet forwarder.
//!
//! * [`engine`] — the sans-IO core: peers, forwarding table, negotiation state.
//! * [`shell`] — one thread per media shard, each owning an engine and its UDP socket (shard 0
//!   also the node's ICE-TCP listener); carries [`Command`]s in and [`PeerEvent`]s out.
//! * [`shard`] — which shard runs a room, and how commands, relay datagrams and ICE-TCP
//!   connections find it.
//! * [`batch_io`] — the shell's batched UDP system calls (`recvmmsg`, `sendmmsg`, UDP GSO).
//!
//! The control plane (actors) talks to the data plane only through [`MediaHandle`] (one room's
//! shard; [`MediaPlane`] is the node's set of shards): bounded command queue in, one bounded
//! event queue per peer out. Media packets never leave the shard
//! thread.

pub mod alloc;
pub mod audio;
pub mod batch_io;
pub mod engine;
pub mod relay;
pub mod rtp;
pub mod sdp;
pub mod shard;
pub mod shell;

use std::fmt;

use tokio::sync::{mpsc, oneshot};

use crate::error::MediaError;

pub use shell::{MediaHandle, MediaPlane, MediaSettings};

/// Identifies one peer connection (a publisher or a subscriber PC of one participant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// Identifies one published track in the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackKey(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// Which side of a LiveKit dual-PeerConnection session a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The client offers; media flows client → server.
    Publisher,
    /// The server offers; media flows server → client.
    Subscriber,
}

/// A control-plane request to the data plane.
#[derive(Debug)]
pub enum Command {
    /// Create a peer connection. Its events go to `events`.
    AddPeer {
        peer: PeerId,
        role: PeerRole,
        events: mpsc::Sender<PeerEvent>,
        reply: oneshot::Sender<Result<(), MediaError>>,
    },
    /// Close a peer connection and forget it.
    RemovePeer { peer: PeerId },
    /// Apply a publisher's SDP offer. `bind` maps offer mids to newly published tracks,
    /// `unbind` lists tracks whose m-lines stopped sending. Replies with the answer SDP.
    PublisherOffer {
        peer: PeerId,
        sdp: String,
        bind: Vec<(String, TrackKey)>,
        unbind: Vec<TrackKey>,
        reply: oneshot::Sender<Result<String, MediaError>>,
    },
    /// Apply a subscriber's SDP answer to our last offer.
    SubscriberAnswer {
        peer: PeerId,
        sdp: String,
        reply: oneshot::Sender<Result<(), MediaError>>,
    },
    /// A trickled remote ICE candidate (`candidate:...` SDP attribute value).
    RemoteCandidate { peer: PeerId, candidate: String },
    /// Start forwarding `track` to the subscriber peer `sub` (adds an m-line, renegotiates).
    Subscribe {
        sub: PeerId,
        track: TrackKey,
        /// msid stream id, `PA_xxx|TR_yyy`.
        stream_id: String,
        /// msid track id, `TR_yyy`.
        track_id: String,
    },
    /// Stop forwarding `track` to `sub`.
    Unsubscribe { sub: PeerId, track: TrackKey },
    /// The track is unpublished: stop it everywhere.
    UnbindTrack { track: TrackKey },
    /// Send a data-channel message (a serialized `DataPacket`) on a subscriber peer.
    SendData {
        peer: PeerId,
        reliable: bool,
        data: Vec<u8>,
    },
    /// Ask the publisher of `track` for a keyframe (coalesced).
    RequestKeyframe { track: TrackKey },
    /// The best simulcast layer rank (1 = low, 2 = medium, 3 = high) `sub` wants of `track`;
    /// 0 pauses the track for that subscriber.
    SetTrackSettings {
        sub: PeerId,
        track: TrackKey,
        max_rank: u8,
        /// Frames per second the subscriber asked for (0: all); RTP mode drops the temporal
        /// layers it does not need.
        fps: u32,
    },
    /// Relay fabric: `track` is fed by flow `flow` of the room link from node `node`.
    RelayIn {
        track: TrackKey,
        node: u64,
        flow: u64,
        video: bool,
    },
    /// Relay fabric (re-parenting): relayed `track` is now fed by flow `flow` of the room link
    /// from node `node` (its old upstream died or was replaced). Unlike `RelayIn` this keeps
    /// the track's subscribers and downstream links: the engine swaps the flow's receiver,
    /// makes every local video subscriber wait for a keyframe, and asks the new upstream for
    /// one, so viewers' decoders resume cleanly instead of decoding across the missing frames.
    RelayRebind {
        track: TrackKey,
        node: u64,
        flow: u64,
    },
    /// Relay fabric: start (`on`) or stop sending `track` to node `node`: every simulcast
    /// layer up to `max_rank` (what the far side's viewers need; higher layers are shed).
    RelayOut {
        track: TrackKey,
        node: u64,
        on: bool,
        max_rank: u8,
    },
    /// Relay fabric: the QUIC connection to `node` (new or replaced). Handled by the shell,
    /// which reads its datagrams and sends on it.
    RelayConnection { node: u64, conn: quinn::Connection },
}

/// Something the data plane tells the owner of a peer.
#[derive(Debug)]
pub enum PeerEvent {
    /// ICE + DTLS are up.
    Connected,
    /// ICE lost the remote (consent expired); the peer may recover or be closed.
    IceDisconnected,
    /// The peer is gone (closed by command or died).
    Closed,
    /// A new offer to send to the client on the subscriber PC.
    Offer {
        sdp: String,
        mid_to_track: Vec<(String, String)>,
    },
    /// A data-channel message received from the client.
    Data { reliable: bool, data: Vec<u8> },
    /// Subscriber: a track stopped or resumed for this subscriber (bandwidth or settings).
    StreamState {
        track_sid: String,
        publisher_sid: String,
        paused: bool,
    },
    /// Publisher: speech level of one of its audio tracks over the last window.
    AudioLevel {
        track: TrackKey,
        level: f32,
        active: bool,
    },
    /// Link statistics of this peer connection.
    Stats(crate::quality::LinkStats),
}

/// Install str0m's crypto provider for the process. Call once before starting the engine.
pub fn init_crypto() {
    str0m::crypto::from_feature_flags().install_process_default();
}
