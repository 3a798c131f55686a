//! Datagrams from a *connected* publisher. `datagram` shows the engine arbitrary bytes from
//! unknown sources, and those stop at ICE (str0m accepts nothing but a STUN request carrying
//! the peer's random ufrag). This target first connects a real str0m client to the engine's
//! publisher peer — SDP offer/answer through `Command::PublisherOffer`, then ICE and DTLS over a
//! simulated wire — so the fuzz input reaches what lies behind: the DTLS/SRTP/SRTCP demultiplexer
//! and parsers for datagrams from the nominated address, and the depacketisers and the engine's
//! per-packet path for media the client encrypts properly.
//!
//! Input layout: records `[mode:u8][len:u8][bytes...]`. Mode even: the bytes are a raw datagram
//! from the client's address. Mode odd: the bytes are a media sample the client sends on its
//! audio (mode & 2 == 0) or video m-line, through its real SRTP.
#![no_main]
use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use arbor_actors::media::engine::{Engine, EngineConfig, Output};
use arbor_actors::media::{Command, PeerEvent, PeerId, PeerRole};
use libfuzzer_sys::fuzz_target;
use str0m::change::SdpAnswer;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Rtc};

/// The engine's side of the wire: what it sends, queued for the client.
#[derive(Default)]
struct Wire {
    to_client: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}
impl Output for Wire {
    fn transmit(&mut self, _: Protocol, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        if self.to_client.len() < 1024 {
            self.to_client.push((source, destination, data.to_vec()));
        }
    }
    fn event(&mut self, _: PeerId, _: PeerEvent) {}
    fn relay(&mut self, _: u64, _: &[u8]) {}
    fn relay_max(&self, _: u64) -> usize {
        1200
    }
}

static INIT: Once = Once::new();

struct Setup {
    engine: Engine,
    client: Rtc,
    wire: Wire,
    now: Instant,
    client_addr: SocketAddr,
    server_addr: SocketAddr,
    audio: Mid,
    video: Mid,
}

/// Step both sides for `steps` × 5 ms of simulated time; returns whether the client saw
/// `Event::Connected`.
fn pump(s: &mut Setup, steps: usize) -> bool {
    let mut connected = false;
    for _ in 0..steps {
        loop {
            match s.client.poll_output() {
                Ok(str0m::Output::Transmit(t)) => {
                    s.engine.handle_datagram(
                        s.now,
                        t.proto,
                        t.source,
                        t.destination,
                        &t.contents,
                        &mut s.wire,
                    );
                }
                Ok(str0m::Output::Event(Event::Connected)) => connected = true,
                Ok(str0m::Output::Event(_)) => {}
                Ok(str0m::Output::Timeout(_)) | Err(_) => break,
            }
        }
        for (source, destination, data) in std::mem::take(&mut s.wire.to_client) {
            if let Ok(contents) = data.as_slice().try_into() {
                let _ = s.client.handle_input(Input::Receive(
                    s.now,
                    Receive {
                        proto: Protocol::Udp,
                        source,
                        destination,
                        contents,
                    },
                ));
            }
        }
        s.now += Duration::from_millis(5);
        let _ = s.client.handle_input(Input::Timeout(s.now));
        s.engine.handle_timeout(s.now, &mut s.wire);
    }
    connected
}

fn setup() -> Option<Setup> {
    let now = Instant::now();
    let server_addr: SocketAddr = "10.200.0.1:7882".parse().ok()?;
    let client_addr: SocketAddr = "10.200.0.2:40000".parse().ok()?;
    let mut engine = Engine::new(EngineConfig {
        candidates: vec![Candidate::host(server_addr, "udp").ok()?],
        udp_local: server_addr,
        max_peers: 4,
        wall_anchor: (now, 1_700_000_000_000_000),
        rtp_mode: true,
    });
    let mut wire = Wire::default();
    let (events, _rx) = tokio::sync::mpsc::channel(64);
    let (reply, _r) = tokio::sync::oneshot::channel();
    let peer = PeerId(1);
    engine.handle_command(
        now,
        Command::AddPeer {
            peer,
            role: PeerRole::Publisher,
            events,
            reply,
        },
        &mut wire,
    );

    let mut client = Rtc::new(now);
    client.add_local_candidate(Candidate::host(client_addr, "udp").ok()?);
    let mut api = client.sdp_api();
    let audio = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let video = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, pending) = api.apply()?;
    let (reply, mut answer_rx) = tokio::sync::oneshot::channel();
    engine.handle_command(
        now,
        Command::PublisherOffer {
            peer,
            sdp: offer.to_sdp_string(),
            bind: vec![],
            unbind: vec![],
            reply,
        },
        &mut wire,
    );
    let answer = answer_rx.try_recv().ok()?.ok()?;
    client
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).ok()?)
        .ok()?;
    let mut s = Setup {
        engine,
        client,
        wire,
        now,
        client_addr,
        server_addr,
        audio,
        video,
    };
    // ICE + DTLS: a few round trips of simulated time.
    if !pump(&mut s, 200) {
        return None;
    }
    Some(s)
}

fuzz_target!(|data: &[u8]| {
    INIT.call_once(arbor_actors::media::init_crypto);
    let Some(mut s) = setup() else {
        panic!("the harness could not connect a client to the engine");
    };
    let mut rest = data;
    let mut rtp_time = 0u64;
    while rest.len() >= 2 {
        let (mode, len) = (rest[0], rest[1] as usize);
        rest = &rest[2..];
        let n = len.min(rest.len());
        let bytes = &rest[..n];
        rest = &rest[n..];
        if mode & 1 == 0 {
            let (src, dst) = (s.client_addr, s.server_addr);
            s.engine
                .handle_datagram(s.now, Protocol::Udp, src, dst, bytes, &mut s.wire);
        } else {
            let mid = if mode & 2 == 0 { s.audio } else { s.video };
            rtp_time += 960;
            if let Some(w) = s.client.writer(mid) {
                let pt = w.payload_params().next().map(|p| p.pt());
                if let Some(pt) = pt {
                    let t = MediaTime::new(rtp_time, Frequency::NINETY_KHZ);
                    let _ = w.write(pt, s.now, t, bytes.to_vec());
                }
            }
        }
        pump(&mut s, 1);
    }
});
