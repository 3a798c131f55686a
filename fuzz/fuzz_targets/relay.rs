//! Relay fabric input: room-link frames (prost, length-delimited) and relay datagrams, both
//! straight into their decoders and into an engine with a relayed track (reassembly, NACK
//! and keyframe handling). Nothing may panic.
#![no_main]
use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use arbor_actors::media::engine::{Engine, EngineConfig, Output};
use arbor_actors::media::{relay, Command, PeerEvent, PeerId, TrackKey};
use libfuzzer_sys::fuzz_target;
use str0m::net::Protocol;

struct Sink;
impl Output for Sink {
    fn transmit(&mut self, _: Protocol, _: SocketAddr, _: SocketAddr, _: &[u8]) {}
    fn event(&mut self, _: PeerId, _: PeerEvent) {}
    fn relay(&mut self, _: u64, _: &[u8]) {}
    fn relay_max(&self, _: u64) -> usize {
        1200
    }
}

static INIT: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    INIT.call_once(arbor_actors::media::init_crypto);
    let _ = arbor_proto::relay::decode_link_frame(data);
    let _ = relay::decode(data);
    let local: SocketAddr = "10.200.0.1:7882".parse().unwrap();
    let now = Instant::now();
    // Both forwarding modes: frame fragments and RTP datagrams reach different code.
    let rtp_mode = data.first().is_some_and(|b| b & 1 == 1);
    let mut engine = Engine::new(EngineConfig {
        candidates: vec![str0m::Candidate::host(local, "udp").unwrap()],
        udp_local: local,
        max_peers: 4,
        wall_anchor: (now, 1_700_000_000_000_000),
        rtp_mode,
    });
    for (video, flow) in [(true, 7u64), (false, 8u64)] {
        engine.handle_command(
            now,
            Command::RelayIn {
                track: TrackKey(flow + 100),
                node: 2,
                flow,
                video,
            },
            &mut Sink,
        );
        engine.handle_command(
            now,
            Command::RelayOut {
                track: TrackKey(flow + 100),
                node: 3,
                on: true,
                max_rank: 3,
            },
            &mut Sink,
        );
    }
    // Split the input into datagrams: [len:u8][node:u8][bytes...]...
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 2 {
        let len = rest[0] as usize;
        let node = 1 + (rest[1] % 3) as u64;
        rest = &rest[2..];
        let n = len.min(rest.len());
        engine.handle_relay_datagram(t, node, &rest[..n], &mut Sink);
        rest = &rest[n..];
        t += Duration::from_millis(20);
        engine.handle_timeout(t, &mut Sink);
    }
});
