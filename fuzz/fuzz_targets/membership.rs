//! Node-to-node and Raft wire input: `PeerFrame`s off a relay/membership QUIC stream (and the
//! raft-rs message inside), committed `Command`s applied to the replicated state machine, and
//! state images (snapshots) decoded from bytes.
//!
//! Input layout: a sequence of `[len:u8][bytes...]` records. Every record is tried as a
//! `PeerFrame`, as a `StateImage` and as a `Command`; decodable commands are applied in order to one
//! `MembershipState`. At the end the state must survive an image round trip unchanged.
#![no_main]
use arbor_proto::membership::{peer_frame, Command, PeerFrame};
use arbor_topology::membership::{decode_raft_message, MembershipState, StateConfig};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let cfg = StateConfig {
        lease_ms: 6_000,
        max_rooms: 8,
        max_publications: 16,
        max_nodes: 4,
    };
    let mut state = MembershipState::new();
    let mut rest = data;
    let mut index = 1u64;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let (record, tail) = tail.split_at(n);
        rest = tail;
        if let Ok(PeerFrame {
            kind: Some(peer_frame::Kind::Raft(env)),
        }) = PeerFrame::decode(record)
        {
            let _ = decode_raft_message(&env.message);
        }
        let _ = MembershipState::from_image(record);
        if let Ok(cmd) = Command::decode(record) {
            let _ = state.apply(&cfg, None, index, 1, &cmd);
            index += 1;
        }
    }
    let image = state.to_image();
    let back = MembershipState::from_image(&image).expect("own image decodes");
    assert_eq!(back, state, "state image round trip");
});
