//! Datagrams at the media socket: the engine with a live publisher and subscriber peer gets
//! arbitrary datagrams from arbitrary sources (STUN, DTLS, SRTP demultiplexing and parsing).
#![no_main]
use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use arbor_actors::media::engine::{Engine, EngineConfig, Output};
use arbor_actors::media::{Command, PeerEvent, PeerId, PeerRole};
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
    let local: SocketAddr = "10.200.0.1:7882".parse().unwrap();
    let mut engine = Engine::new(EngineConfig {
        candidates: vec![str0m::Candidate::host(local, "udp").unwrap()],
        udp_local: local,
        max_peers: 4,
        wall_anchor: (Instant::now(), 1_700_000_000_000_000),
        rtp_mode: true,
    });
    let now = Instant::now();
    for (i, role) in [PeerRole::Publisher, PeerRole::Subscriber]
        .into_iter()
        .enumerate()
    {
        let (events, _rx) = tokio_channel();
        let (reply, _r) = tokio::sync::oneshot::channel();
        engine.handle_command(
            now,
            Command::AddPeer {
                peer: PeerId(i as u64 + 1),
                role,
                events,
                reply,
            },
            &mut Sink,
        );
    }
    // Split the input into datagrams: [len:u8][source port:u8][bytes...]...
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 2 {
        let len = rest[0] as usize;
        let port = 40000 + rest[1] as u16;
        rest = &rest[2..];
        let n = len.min(rest.len());
        let source = SocketAddr::from(([10, 200, 0, 2], port));
        engine.handle_datagram(t, Protocol::Udp, source, local, &rest[..n], &mut Sink);
        rest = &rest[n..];
        t += Duration::from_millis(7);
        engine.handle_timeout(t, &mut Sink);
    }
});

fn tokio_channel() -> (
    tokio::sync::mpsc::Sender<PeerEvent>,
    tokio::sync::mpsc::Receiver<PeerEvent>,
) {
    tokio::sync::mpsc::channel(16)
}
