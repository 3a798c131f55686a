//! Relay-fabric wire types: the *room link* between two nodes serving the same room.
//!
//! A room link is one bidirectional QUIC stream on the nodes' mutual-TLS connection, opened by
//! the edge towards the room's origin (or towards its parent in the relay tree). Both directions
//! carry length-delimited [`LinkFrame`]s: a `u32` big-endian length, then the prost body. The
//! first frame the opener sends is a [`LinkHello`].
//!
//! What travels on a link is *state and control*, never media: participants (their LiveKit
//! `ParticipantInfo`, with the relay flow id of each track), departures, data packets (in order
//! per link, hence per sender), speaker levels, room metadata, and track demand (`Want`).
//! Media travels in QUIC datagrams tagged with the flow id (see `arbor_actors::media::relay`).
//!
//! Field numbers are part of the wire format: never reuse or renumber, only add.

use livekit_protocol as lk;
use prost::Message as _;

/// Largest link frame accepted or sent (a `ParticipantInfo` with many tracks and attributes fits
/// easily; a data packet is bounded by the room's data limit, far below this).
pub const MAX_LINK_FRAME: usize = 1 << 20;

/// Errors decoding link frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayWireError {
    #[error("link frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("truncated link frame: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("undecodable link frame: {0}")]
    Decode(String),
    #[error("link frame without a kind")]
    Empty,
}

/// One frame on a room link.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkFrame {
    #[prost(
        oneof = "link_frame::Kind",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14"
    )]
    pub kind: Option<link_frame::Kind>,
}

/// The variants of [`LinkFrame`].
pub mod link_frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Hello(super::LinkHello),
        #[prost(message, tag = "2")]
        Participant(super::ParticipantState),
        #[prost(message, tag = "3")]
        Gone(super::ParticipantGone),
        #[prost(message, tag = "4")]
        Data(super::DataMessage),
        #[prost(message, tag = "5")]
        Want(super::Want),
        #[prost(message, tag = "6")]
        Levels(super::Levels),
        #[prost(message, tag = "7")]
        RoomMetadata(super::RoomMetadata),
        #[prost(message, tag = "8")]
        Remove(super::RemoveParticipant),
        #[prost(message, tag = "9")]
        Mute(super::MuteTrack),
        #[prost(message, tag = "10")]
        Update(super::UpdateParticipant),
        #[prost(message, tag = "11")]
        Subscribe(super::UpdateSubscriptions),
        #[prost(message, tag = "12")]
        ServerData(super::ServerData),
        #[prost(message, tag = "13")]
        Rpc(super::RpcCall),
        #[prost(message, tag = "14")]
        RpcReply(super::RpcReply),
    }
}

/// The server API calls an RPC method on a participant that another node serves
/// (`PerformRpc`): forwarded like [`RemoveParticipant`]; every node on the way remembers the
/// link it came from (for a bounded time), so the participant's ack and response travel back
/// as [`RpcReply`]s to the calling node, which keeps the call's timeouts.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RpcCall {
    #[prost(string, tag = "1")]
    pub sid: String,
    /// The calling node's request id (the sender identity of the `RpcRequest` packet).
    #[prost(string, tag = "2")]
    pub request_id: String,
    #[prost(string, tag = "3")]
    pub method: String,
    #[prost(string, tag = "4")]
    pub payload: String,
    #[prost(uint32, tag = "5")]
    pub response_timeout_ms: u32,
}

/// A participant's `RpcAck` or `RpcResponse` (the encoded LiveKit `DataPacket`, as its client
/// sent it) to an [`RpcCall`], on its way back to the calling node.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RpcReply {
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// The answering participant.
    #[prost(string, tag = "2")]
    pub from_sid: String,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// The server API changes the name, metadata, attributes and/or permission of a participant
/// that another node serves (`UpdateParticipant`): forwarded like [`RemoveParticipant`]; the
/// participant's node applies it (and tells the client its new permission), and the new
/// `ParticipantInfo` floods back as usual.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateParticipant {
    #[prost(string, tag = "1")]
    pub sid: String,
    /// Empty: unchanged.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Empty: unchanged.
    #[prost(string, tag = "3")]
    pub metadata: String,
    /// Attributes to set; an empty value deletes the key.
    #[prost(map = "string, string", tag = "4")]
    pub attributes: std::collections::HashMap<String, String>,
    /// Absent: unchanged.
    #[prost(message, optional, tag = "5")]
    pub permission: Option<lk::ParticipantPermission>,
}

/// The server API subscribes (or unsubscribes) a participant that another node serves to
/// tracks (`UpdateSubscriptions`): forwarded like [`RemoveParticipant`]; the participant's node
/// subscribes it as if its client had asked (pulling relayed tracks through the tree as usual).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct UpdateSubscriptions {
    #[prost(string, tag = "1")]
    pub sid: String,
    #[prost(string, repeated, tag = "2")]
    pub track_sids: Vec<String>,
    #[prost(bool, tag = "3")]
    pub subscribe: bool,
}

/// A data packet from the server API (`SendData`, no sender participant), flooded over the
/// room's links like [`DataMessage`] (in order per link, hence per calling node); every node
/// delivers it to its own members among `destinations` (empty = everyone).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ServerData {
    #[prost(bool, tag = "1")]
    pub reliable: bool,
    #[prost(string, repeated, tag = "2")]
    pub destinations: Vec<String>,
    /// The encoded LiveKit `DataPacket`.
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// The server API mutes (or unmutes) a track of a participant that another node serves:
/// forwarded like [`RemoveParticipant`]; the participant's node tells the publisher and the
/// new track state floods back as usual.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MuteTrack {
    #[prost(string, tag = "1")]
    pub sid: String,
    #[prost(string, tag = "2")]
    pub track_sid: String,
    #[prost(bool, tag = "3")]
    pub muted: bool,
}

/// The server API removes a participant that another node serves: the frame travels, link by
/// link, towards the node the participant is on, which disconnects it (its departure then
/// floods back as usual).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RemoveParticipant {
    #[prost(string, tag = "1")]
    pub sid: String,
    /// A LiveKit `DisconnectReason`.
    #[prost(int32, tag = "2")]
    pub reason: i32,
}

/// First frame from the opener: which room, which node (checked against its certificate).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LinkHello {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    #[prost(string, tag = "3")]
    pub cluster_id: String,
}

/// A participant served by some node (created or changed). `info.version` is the home node's.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParticipantState {
    #[prost(message, optional, tag = "1")]
    pub info: Option<lk::ParticipantInfo>,
    /// The relay flow of each of its tracks, as numbered by the *sending* node.
    #[prost(message, repeated, tag = "2")]
    pub flows: Vec<TrackFlow>,
}

/// A track's flow id on the link (the sender's data-plane key for it).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct TrackFlow {
    #[prost(string, tag = "1")]
    pub track_sid: String,
    #[prost(uint64, tag = "2")]
    pub flow: u64,
}

/// A participant left (its final info: state DISCONNECTED, disconnect reason).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParticipantGone {
    #[prost(message, optional, tag = "1")]
    pub info: Option<lk::ParticipantInfo>,
}

/// A data packet (a serialized LiveKit `DataPacket`, already stamped with the sender).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DataMessage {
    #[prost(string, tag = "1")]
    pub from_sid: String,
    #[prost(bool, tag = "2")]
    pub reliable: bool,
    /// Destination identities; empty = everyone else.
    #[prost(string, repeated, tag = "3")]
    pub destinations: Vec<String>,
    #[prost(bytes = "vec", tag = "4")]
    pub data: Vec<u8>,
}

/// Demand for a track from the receiver of this frame: `on` when the sender's branch has its
/// first viewer of it, off after the last left. `max_rank` is the best simulcast layer the
/// branch needs (1..=3), for dynacast across the tree.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Want {
    #[prost(string, tag = "1")]
    pub track_sid: String,
    #[prost(bool, tag = "2")]
    pub on: bool,
    #[prost(uint32, tag = "3")]
    pub max_rank: u32,
}

/// Speaker levels of the participants served by (or relayed through) the sending node.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Levels {
    #[prost(message, repeated, tag = "1")]
    pub levels: Vec<SpeakerLevel>,
}

/// One participant's speech level.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpeakerLevel {
    #[prost(string, tag = "1")]
    pub sid: String,
    #[prost(float, tag = "2")]
    pub level: f32,
    #[prost(bool, tag = "3")]
    pub active: bool,
}

/// The room's metadata changed (set on the origin through the server API).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RoomMetadata {
    #[prost(string, tag = "1")]
    pub metadata: String,
}

/// Encodes one frame with its `u32` big-endian length prefix.
pub fn encode_link_frame(kind: link_frame::Kind) -> Result<Vec<u8>, RelayWireError> {
    let body = LinkFrame { kind: Some(kind) }.encode_to_vec();
    if body.len() > MAX_LINK_FRAME {
        return Err(RelayWireError::TooLarge {
            len: body.len(),
            limit: MAX_LINK_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a length prefix against the limit; returns the body length.
pub fn check_link_len(prefix: [u8; 4]) -> Result<usize, RelayWireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_LINK_FRAME {
        return Err(RelayWireError::TooLarge {
            len,
            limit: MAX_LINK_FRAME,
        });
    }
    Ok(len)
}

/// Decodes one frame body (without its length prefix).
pub fn decode_link_body(body: &[u8]) -> Result<link_frame::Kind, RelayWireError> {
    if body.len() > MAX_LINK_FRAME {
        return Err(RelayWireError::TooLarge {
            len: body.len(),
            limit: MAX_LINK_FRAME,
        });
    }
    LinkFrame::decode(body)
        .map_err(|e| RelayWireError::Decode(e.to_string()))?
        .kind
        .ok_or(RelayWireError::Empty)
}

/// Decodes one length-prefixed frame from the front of `buf`; returns it and the bytes used.
pub fn decode_link_frame(buf: &[u8]) -> Result<(link_frame::Kind, usize), RelayWireError> {
    if buf.len() < 4 {
        return Err(RelayWireError::Truncated {
            need: 4,
            have: buf.len(),
        });
    }
    let len = check_link_len([buf[0], buf[1], buf[2], buf[3]])?;
    let need = 4 + len;
    if buf.len() < need {
        return Err(RelayWireError::Truncated {
            need,
            have: buf.len(),
        });
    }
    Ok((decode_link_body(&buf[4..need])?, need))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server-API frames (forwarded towards a participant's node) survive the wire.
    #[test]
    fn admin_frames_round_trip() {
        for kind in [
            link_frame::Kind::Remove(RemoveParticipant {
                sid: "PA_x".into(),
                reason: lk::DisconnectReason::ParticipantRemoved as i32,
            }),
            link_frame::Kind::Mute(MuteTrack {
                sid: "PA_x".into(),
                track_sid: "TR_y".into(),
                muted: true,
            }),
            link_frame::Kind::Update(UpdateParticipant {
                sid: "PA_x".into(),
                name: "Carol".into(),
                metadata: "{\"role\":\"host\"}".into(),
                attributes: [
                    ("k".to_string(), "v".to_string()),
                    ("gone".into(), String::new()),
                ]
                .into_iter()
                .collect(),
                permission: Some(lk::ParticipantPermission {
                    can_subscribe: true,
                    can_publish: false,
                    can_publish_data: true,
                    ..Default::default()
                }),
            }),
            link_frame::Kind::Update(UpdateParticipant {
                sid: "PA_x".into(),
                metadata: "m".into(),
                ..Default::default()
            }),
            link_frame::Kind::Subscribe(UpdateSubscriptions {
                sid: "PA_x".into(),
                track_sids: vec!["TR_a".into(), "TR_b".into()],
                subscribe: false,
            }),
            link_frame::Kind::ServerData(ServerData {
                reliable: true,
                destinations: vec!["alice".into(), "bob".into()],
                data: vec![0, 1, 2, 255],
            }),
            link_frame::Kind::Rpc(RpcCall {
                sid: "PA_x".into(),
                request_id: "RPC_1".into(),
                method: "greet".into(),
                payload: "hi".into(),
                response_timeout_ms: 10_000,
            }),
            link_frame::Kind::RpcReply(RpcReply {
                request_id: "RPC_1".into(),
                from_sid: "PA_x".into(),
                data: vec![9, 8, 7],
            }),
        ] {
            let bytes = encode_link_frame(kind.clone()).expect("encode");
            let (back, used) = decode_link_frame(&bytes).expect("decode");
            assert_eq!(back, kind);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn frames_round_trip() {
        let kind = link_frame::Kind::Participant(ParticipantState {
            info: Some(lk::ParticipantInfo {
                sid: "PA_x".into(),
                identity: "alice".into(),
                version: 3,
                ..Default::default()
            }),
            flows: vec![TrackFlow {
                track_sid: "TR_y".into(),
                flow: 42,
            }],
        });
        let bytes = encode_link_frame(kind.clone()).unwrap();
        let (back, used) = decode_link_frame(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, kind);
    }

    #[test]
    fn garbage_and_limits_are_errors() {
        assert!(matches!(
            decode_link_frame(&[0, 0]),
            Err(RelayWireError::Truncated { .. })
        ));
        assert!(matches!(
            decode_link_frame(&[0xff, 0xff, 0xff, 0xff, 1]),
            Err(RelayWireError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_link_frame(&[0, 0, 0, 3, 0xff, 0xff, 0xff]),
            Err(RelayWireError::Decode(_))
        ));
        assert_eq!(decode_link_body(&[]), Err(RelayWireError::Empty));
    }
}
