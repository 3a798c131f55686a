//! Decoders for what clients send, as pure functions: signal messages (protobuf or protojson)
//! and data-channel packets. They never panic; garbage is an error that says what was wrong.
//! `fuzz/` drives each of them with arbitrary input.

use livekit_protocol as lk;
use prost::Message as _;
use thiserror::Error;

/// Why a client's message was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid SignalRequest protobuf: {0}")]
    SignalProtobuf(String),
    #[error("invalid SignalRequest JSON: {0}")]
    SignalJson(String),
    #[error("data packet of {0} bytes exceeds limit.max_data_packet_bytes ({1})")]
    DataTooLarge(usize, usize),
    #[error("invalid DataPacket protobuf: {0}")]
    DataProtobuf(String),
}

/// Decode a binary signal frame.
pub fn decode_signal_binary(bytes: &[u8]) -> Result<lk::SignalRequest, DecodeError> {
    lk::SignalRequest::decode(bytes).map_err(|e| DecodeError::SignalProtobuf(e.to_string()))
}

/// Decode a text (protojson) signal frame.
pub fn decode_signal_text(text: &str) -> Result<lk::SignalRequest, DecodeError> {
    serde_json::from_str(text).map_err(|e| DecodeError::SignalJson(e.to_string()))
}

/// Encode a response as protobuf, or protojson when the client speaks JSON.
pub fn encode_signal(msg: lk::signal_response::Message, json: bool) -> Result<String, Vec<u8>> {
    let resp = lk::SignalResponse { message: Some(msg) };
    if json {
        if let Ok(s) = serde_json::to_string(&resp) {
            return Ok(s);
        }
    }
    Err(resp.encode_to_vec())
}

/// A data packet ready to forward: re-encoded with the sender's identity and its destinations.
#[derive(Debug, Clone, PartialEq)]
pub struct StampedData {
    pub packet: lk::DataPacket,
    /// Destination identities; empty means everyone else in the room.
    pub destinations: Vec<String>,
}

/// Decode a client's data packet and overwrite the sender fields with the server's view of the
/// sender (blank for hidden participants), as the LiveKit server does.
pub fn stamp_data_packet(
    bytes: &[u8],
    max_bytes: usize,
    identity: &str,
    sid: &str,
    hidden: bool,
) -> Result<StampedData, DecodeError> {
    if bytes.len() > max_bytes {
        return Err(DecodeError::DataTooLarge(bytes.len(), max_bytes));
    }
    let mut pkt =
        lk::DataPacket::decode(bytes).map_err(|e| DecodeError::DataProtobuf(e.to_string()))?;
    let (identity, sid) = if hidden { ("", "") } else { (identity, sid) };
    pkt.participant_identity = identity.to_string();
    pkt.participant_sid = sid.to_string();
    let mut destinations = std::mem::take(&mut pkt.destination_identities);
    #[allow(deprecated)]
    if let Some(lk::data_packet::Value::User(u)) = &mut pkt.value {
        u.participant_identity = identity.to_string();
        u.participant_sid = sid.to_string();
        if destinations.is_empty() {
            destinations = u.destination_identities.clone();
        }
    }
    pkt.destination_identities = destinations.clone();
    Ok(StampedData {
        packet: pkt,
        destinations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_sender_and_keeps_destinations() {
        let pkt = lk::DataPacket {
            participant_identity: "spoofed".into(),
            destination_identities: vec!["bob".into()],
            value: Some(lk::data_packet::Value::User(lk::UserPacket {
                payload: b"hi".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let s = stamp_data_packet(&pkt.encode_to_vec(), 1024, "alice", "PA_a", false).unwrap();
        assert_eq!(s.packet.participant_identity, "alice");
        assert_eq!(s.destinations, vec!["bob".to_string()]);
        let h = stamp_data_packet(&pkt.encode_to_vec(), 1024, "alice", "PA_a", true).unwrap();
        assert_eq!(h.packet.participant_identity, "");
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        assert!(matches!(
            stamp_data_packet(&[0xff; 10], 1024, "a", "b", false),
            Err(DecodeError::DataProtobuf(_))
        ));
        assert!(matches!(
            stamp_data_packet(&[0; 2048], 1024, "a", "b", false),
            Err(DecodeError::DataTooLarge(2048, 1024))
        ));
        assert!(decode_signal_binary(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_signal_text("{").is_err());
    }
}
