//! Raft-replicated cluster membership and room directory.
//!
//! Every Arbor node runs one [`MembershipNode`]: a sans-IO driver around raft-rs's `RawNode`
//! whose replicated state machine ([`MembershipState`]) holds the things the cluster must agree
//! on — which nodes exist, which node originates each room (under a fenced lease), and which
//! tracks are published where. The driver takes `now` and inputs (ticks, peer messages,
//! proposals) and produces outputs (messages to send, completed proposals); all persistence goes
//! through a [`LogBackend`] ([`RedbBackend`] on disk, [`MemBackend`] in the simulator), synced
//! before any message that depends on it leaves the node.
//!
//! Viewer joins, presence, speaker and load figures are deliberately *not* here: they are soft
//! state, gossiped or recomputed, so a 100k-viewer event never touches the Raft log. See
//! `docs/membership.md`.

mod node;
mod redb_store;
mod rng;
mod state;
mod storage;

pub use node::{
    Applied, ClusterStatus, Completion, MembershipNode, NodeConfig, Output, PeerProgress,
    ProposeError,
};
pub use redb_store::RedbBackend;
pub use rng::SplitMix64;
pub use state::{
    room_sid, InjectedDefect, LeaseGrant, MembershipState, Outcome, Rejection, StateConfig,
};
pub use storage::{snapshot_of, LogBackend, MemBackend, PersistedState, RaftStore, WriteBatch};

/// Re-exported raft-rs types that appear in this module's API.
pub use raft::prelude::{ConfState, Message as RaftMessage};

/// Errors of the membership core and its storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// A persisted file or image is damaged. Never "fixed" automatically.
    #[error("corrupt raft state: {0}")]
    Corrupt(String),
    #[error("raft storage I/O error: {0}")]
    Io(String),
    #[error("decode error: {0}")]
    Decode(String),
    #[error("the raft store is already initialized; refusing to bootstrap it again")]
    AlreadyInitialized,
    #[error("raft error: {0}")]
    Raft(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl From<raft::Error> for MembershipError {
    fn from(e: raft::Error) -> Self {
        MembershipError::Raft(e.to_string())
    }
}

/// Encodes a raft-rs message with raft's own (protobuf 2) codec, for the transport.
pub fn encode_raft_message(m: &RaftMessage) -> Result<Vec<u8>, MembershipError> {
    protobuf::Message::write_to_bytes(m).map_err(|e| MembershipError::Decode(e.to_string()))
}

/// Decodes a raft-rs message received from a peer. Garbage is an error, never a panic.
pub fn decode_raft_message(bytes: &[u8]) -> Result<RaftMessage, MembershipError> {
    <RaftMessage as protobuf::Message>::parse_from_bytes(bytes)
        .map_err(|e| MembershipError::Decode(format!("raft message: {e}")))
}
