//! The engine with real str0m clients over an in-memory wire (the benches' harness): a
//! publisher and several subscribers connect through the engine's commands, and for ten
//! simulated seconds every subscriber receives every frame. This exercises the data path end
//! to end without sockets — ICE-lite, DTLS-SRTP, SDP renegotiation for the subscription, the
//! per-peer timer heap (consent, pacer, RTCP) and forwarding.

#[path = "../benches/harness/mod.rs"]
mod harness;

use harness::Room;

#[test]
fn every_subscriber_receives_every_frame_for_ten_seconds() {
    arbor_actors::media::init_crypto();
    let n = 4;
    let mut room = Room::new(n); // connects and subscribes (8 simulated seconds)
    let start = room.received();
    assert!(
        start.iter().all(|&r| r > 0),
        "every subscriber gets media once connected: {start:?}"
    );
    let frames = 500; // 10 s at 50 frames/s
    for _ in 0..frames {
        room.step(true);
    }
    let end = room.received();
    for (i, (a, b)) in start.iter().zip(&end).enumerate() {
        let got = b - a;
        assert!(
            got + 2 >= frames,
            "subscriber {i} received {got} of {frames} frames"
        );
    }
    assert_eq!(room.engine.peer_count(), n + 1, "no peer was reaped");
}
