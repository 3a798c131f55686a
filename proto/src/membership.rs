//! Membership wire types: the commands replicated through Raft, the records of the replicated
//! state machine, its snapshot, and the frames exchanged between cluster nodes.
//!
//! These are written by hand with `#[derive(prost::Message)]` (no `protoc` is needed). Field
//! numbers are part of the on-disk format (log entries and snapshots are stored encoded), so they
//! must never be reused or renumbered; only add new fields.
//!
//! Raft's own messages (`eraftpb::Message`) are carried as opaque bytes encoded by raft-rs's own
//! codec ([`RaftEnvelope::message`]); this crate does not depend on raft-rs.

use serde::{Deserialize, Serialize};

/// One node of the cluster as recorded in the replicated state.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Raft id of the node (non-zero, unique in the cluster).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Region label, e.g. `eu-west`.
    #[prost(string, tag = "2")]
    pub region: String,
    /// Address of the node's QUIC endpoint (Raft and, later, media relay).
    #[prost(string, tag = "3")]
    pub quic_addr: String,
    /// Address of the node's HTTP API (signalling and `/cluster/` admin).
    #[prost(string, tag = "4")]
    pub http_addr: String,
    /// Declared capacity in abstract units (the planner decides what they mean).
    #[prost(uint32, tag = "5")]
    pub capacity: u32,
    /// Timestamp (ms, proposer clock) of the last heartbeat committed for this node.
    #[prost(uint64, tag = "6")]
    pub last_heartbeat_ms: u64,
    /// Timestamp (ms) at which the node first registered.
    #[prost(uint64, tag = "7")]
    pub registered_ms: u64,
}

/// Per-room configuration chosen at creation.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct RoomConfig {
    /// Maximum participants (0 = unlimited).
    #[prost(uint32, tag = "1")]
    pub max_participants: u32,
    /// Seconds an empty room lives before the origin may delete it.
    #[prost(uint32, tag = "2")]
    pub empty_timeout_s: u32,
    /// Opaque application metadata.
    #[prost(string, tag = "3")]
    pub metadata: String,
}

/// A room in the replicated directory.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct RoomRecord {
    /// Room name (unique key).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Room sid (`RM_...`), derived deterministically from the log position that created it.
    #[prost(string, tag = "2")]
    pub sid: String,
    /// Node that currently originates the room (holder of the origin lease).
    #[prost(uint64, tag = "3")]
    pub origin_node: u64,
    /// Generation: 1 at creation, +1 each time the origin changes.
    #[prost(uint64, tag = "4")]
    pub generation: u64,
    /// Fencing token of the current origin lease. Strictly increasing across the whole cluster.
    #[prost(uint64, tag = "5")]
    pub fencing_token: u64,
    /// Cluster time (ms) at which the current lease expires unless renewed.
    #[prost(uint64, tag = "6")]
    pub lease_expires_ms: u64,
    /// Cluster time (ms) of creation.
    #[prost(uint64, tag = "7")]
    pub created_ms: u64,
    /// Configuration given at creation.
    #[prost(message, optional, tag = "8")]
    pub config: Option<RoomConfig>,
    /// Node that proposed the creation, with its request id (makes retries idempotent).
    #[prost(uint64, tag = "9")]
    pub created_by_node: u64,
    #[prost(uint64, tag = "10")]
    pub created_by_request: u64,
}

/// A published track: which node originates it, under which lease.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct PublicationRecord {
    #[prost(string, tag = "1")]
    pub track_sid: String,
    #[prost(string, tag = "2")]
    pub room: String,
    #[prost(uint64, tag = "3")]
    pub origin_node: u64,
    /// Fencing token the publication was accepted under.
    #[prost(uint64, tag = "4")]
    pub fencing_token: u64,
}

/// A command proposed to the replicated log. `proposer`/`request_id` let the proposing node match
/// the applied entry to its pending request; `now_ms` is the proposer's clock, the only notion of
/// time the state machine ever sees (it never reads a clock itself).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    #[prost(uint64, tag = "1")]
    pub proposer: u64,
    #[prost(uint64, tag = "2")]
    pub request_id: u64,
    #[prost(uint64, tag = "3")]
    pub now_ms: u64,
    #[prost(
        oneof = "command::Kind",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19"
    )]
    pub kind: Option<command::Kind>,
}

/// The variants of [`Command`].
pub mod command {
    /// What the command does.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "10")]
        RegisterNode(super::NodeRecord),
        #[prost(message, tag = "11")]
        Heartbeat(super::Heartbeat),
        #[prost(message, tag = "12")]
        CreateRoom(super::CreateRoom),
        #[prost(message, tag = "13")]
        AcquireLease(super::AcquireLease),
        #[prost(message, tag = "14")]
        RenewLease(super::RenewLease),
        #[prost(message, tag = "15")]
        ReleaseLease(super::ReleaseLease),
        #[prost(message, tag = "16")]
        PublishTrack(super::PublishTrack),
        #[prost(message, tag = "17")]
        UnpublishTrack(super::UnpublishTrack),
        #[prost(message, tag = "18")]
        RemoveNode(super::RemoveNode),
        #[prost(message, tag = "19")]
        RenewLeases(super::RenewLeases),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    #[prost(uint64, tag = "1")]
    pub node: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateRoom {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Node that will originate the room.
    #[prost(uint64, tag = "2")]
    pub origin_node: u64,
    #[prost(message, optional, tag = "3")]
    pub config: Option<RoomConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AcquireLease {
    #[prost(string, tag = "1")]
    pub room: String,
    /// Node that wants to become the origin.
    #[prost(uint64, tag = "2")]
    pub node: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RenewLease {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub node: u64,
    #[prost(uint64, tag = "3")]
    pub fencing_token: u64,
}

/// One origin renewing many leases in one log entry (log traffic per node, not per room).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RenewLeases {
    #[prost(uint64, tag = "1")]
    pub node: u64,
    #[prost(message, repeated, tag = "2")]
    pub leases: Vec<LeaseRef>,
}

/// A room and the fencing token its lease is held under.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRef {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub fencing_token: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReleaseLease {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub node: u64,
    #[prost(uint64, tag = "3")]
    pub fencing_token: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishTrack {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(string, tag = "2")]
    pub track_sid: String,
    #[prost(uint64, tag = "3")]
    pub node: u64,
    #[prost(uint64, tag = "4")]
    pub fencing_token: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UnpublishTrack {
    #[prost(string, tag = "1")]
    pub track_sid: String,
    #[prost(uint64, tag = "2")]
    pub node: u64,
    #[prost(uint64, tag = "3")]
    pub fencing_token: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveNode {
    #[prost(uint64, tag = "1")]
    pub node: u64,
}

/// Full image of the replicated state machine, stored as Raft snapshot data.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateImage {
    #[prost(message, repeated, tag = "1")]
    pub nodes: Vec<NodeRecord>,
    #[prost(message, repeated, tag = "2")]
    pub rooms: Vec<RoomRecord>,
    #[prost(message, repeated, tag = "3")]
    pub publications: Vec<PublicationRecord>,
    /// Next fencing token to hand out.
    #[prost(uint64, tag = "4")]
    pub next_fencing_token: u64,
    /// Largest proposer timestamp applied so far.
    #[prost(uint64, tag = "5")]
    pub cluster_time_ms: u64,
    /// Nodes removed from the cluster (ids are never reused).
    #[prost(uint64, repeated, tag = "6")]
    pub removed_nodes: Vec<u64>,
}

/// One frame on a node-to-node QUIC stream (length-delimited).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerFrame {
    #[prost(oneof = "peer_frame::Kind", tags = "1, 2")]
    pub kind: Option<peer_frame::Kind>,
}

/// The variants of [`PeerFrame`].
pub mod peer_frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        #[prost(message, tag = "2")]
        Raft(super::RaftEnvelope),
    }
}

/// First frame on every stream: who is speaking, in which cluster.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(string, tag = "1")]
    pub cluster_id: String,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
}

/// A Raft message, encoded by raft-rs's own codec.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RaftEnvelope {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub message: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn command_round_trips() {
        let cmd = Command {
            proposer: 2,
            request_id: 7,
            now_ms: 1234,
            kind: Some(command::Kind::CreateRoom(CreateRoom {
                name: "standup".into(),
                origin_node: 2,
                config: Some(RoomConfig {
                    max_participants: 10,
                    ..Default::default()
                }),
            })),
        };
        let bytes = cmd.encode_to_vec();
        assert_eq!(Command::decode(bytes.as_slice()).unwrap(), cmd);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Command::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
