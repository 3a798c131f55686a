//! Shared by the `forward` and `memory` benches: an [`Engine`] with one publisher and N
//! subscribers, each a real str0m client connected over an in-memory wire (ICE, DTLS-SRTP,
//! SDP through the engine's commands, exactly as in production).
//!
//! One [`Room::step`] is one frame: the publisher sends one 1000-byte frame that fits one RTP
//! packet (Opus-framed audio, or a VP8 keyframe so every subscriber takes it at once),
//! datagrams cross the wire both ways, and 20 ms of simulated time pass. Only the engine's public API is
//! used (commands, datagrams, timeouts), so whatever forwarding mode the engine uses is what
//! gets measured.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbor_actors::media::engine::{Engine, EngineConfig, EngineLimits, Output};
use arbor_actors::media::{Command, PeerEvent, PeerId, PeerRole, TrackKey};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Rtc};

/// Simulated time per iteration (one 50 fps frame).
const FRAME: Duration = Duration::from_millis(20);

/// The engine's side of the wire: datagrams per destination, offers per peer.
#[derive(Default)]
pub struct Wire {
    to_clients: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    offers: Vec<(PeerId, String)>,
    pub sent: usize,
}

impl Output for Wire {
    fn transmit(&mut self, _: Protocol, source: SocketAddr, destination: SocketAddr, d: &[u8]) {
        self.sent += 1;
        self.to_clients.push((source, destination, d.to_vec()));
    }
    fn event(&mut self, peer: PeerId, event: PeerEvent) {
        if let PeerEvent::Offer { sdp, .. } = event {
            self.offers.push((peer, sdp));
        }
    }
    fn relay(&mut self, _: u64, _: &[u8]) {}
    fn relay_max(&self, _: u64) -> usize {
        1200
    }
}

/// One client: its `Rtc`, its address and the engine peer it talks to.
pub struct Client {
    rtc: Rtc,
    addr: SocketAddr,
    peer: PeerId,
    /// Media frames this client received (subscribers).
    pub received: usize,
}

/// An engine with a publisher and `n` subscribers of its video track, all connected.
pub struct Room {
    pub engine: Engine,
    pub wire: Wire,
    clients: Vec<Client>, // [0] is the publisher
    by_addr: HashMap<SocketAddr, usize>,
    server: SocketAddr,
    media: Mid,
    kind: MediaKind,
    now: Instant,
    rtp_time: u64,
}

const TRACK: TrackKey = TrackKey(1);

impl Room {
    pub fn new(n: usize) -> Room {
        Room::with_limits(n, EngineLimits::default(), MediaKind::Audio)
    }

    /// A room whose engine uses `limits` and whose track is of `kind`.
    ///
    /// Audio is what the forward bench and the test use: on this zero-delay wire str0m's
    /// bandwidth estimate for a subscriber drops below a video track's rate after a few
    /// seconds and the allocator then pauses video (as it should on a congested link), while
    /// audio is never paused. Video is what the memory bench uses (its retransmission history
    /// is the large one); it fills during the first seconds.
    pub fn with_limits(n: usize, limits: EngineLimits, kind: MediaKind) -> Room {
        let now = Instant::now();
        let server: SocketAddr = "10.0.0.1:7882".parse().expect("addr");
        let engine = Engine::new(EngineConfig {
            candidates: vec![Candidate::host(server, "udp").expect("candidate")],
            udp_local: server,
            max_peers: n + 8,
            wall_anchor: (now, 1_700_000_000_000_000),
            rtp_mode: true,
        })
        .with_limits(limits);
        let mut room = Room {
            engine,
            wire: Wire::default(),
            clients: Vec::new(),
            by_addr: HashMap::new(),
            server,
            media: Mid::from("0"),
            kind,
            now,
            rtp_time: 0,
        };
        room.add_publisher();
        for i in 0..n {
            room.add_subscriber(i);
        }
        // ICE, DTLS, SCTP, the subscription's renegotiation and the first keyframe.
        for _ in 0..400 {
            room.step(true);
        }
        room
    }

    fn add_client(&mut self, peer: PeerId, role: PeerRole, port: u16) -> usize {
        let addr: SocketAddr = SocketAddr::from(([10, 0, 1, (port % 250) as u8 + 1], port));
        let (events, rx) = tokio::sync::mpsc::channel(1024);
        std::mem::forget(rx); // the engine's events also reach `Wire::event`
        let (reply, _r) = tokio::sync::oneshot::channel();
        self.engine.handle_command(
            self.now,
            Command::AddPeer {
                peer,
                role,
                events,
                reply,
            },
            &mut self.wire,
        );
        let mut rtc = Rtc::new(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        self.clients.push(Client {
            rtc,
            addr,
            peer,
            received: 0,
        });
        self.by_addr.insert(addr, self.clients.len() - 1);
        self.clients.len() - 1
    }

    fn add_publisher(&mut self) {
        let i = self.add_client(PeerId(1), PeerRole::Publisher, 20_000);
        let mut api = self.clients[i].rtc.sdp_api();
        let media = api.add_media(self.kind, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().expect("offer");
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        self.engine.handle_command(
            self.now,
            Command::PublisherOffer {
                peer: PeerId(1),
                sdp: offer.to_sdp_string(),
                bind: vec![(media.to_string(), TRACK)],
                unbind: vec![],
                reply,
            },
            &mut self.wire,
        );
        let answer = rx.try_recv().expect("reply").expect("answer");
        self.clients[i]
            .rtc
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("sdp"))
            .expect("accept");
        self.media = media;
    }

    fn add_subscriber(&mut self, k: usize) {
        let peer = PeerId(100 + k as u64);
        self.add_client(peer, PeerRole::Subscriber, 20_001 + k as u16);
        self.engine.handle_command(
            self.now,
            Command::Subscribe {
                sub: peer,
                track: TRACK,
                stream_id: "PA_bench|TR_bench".into(),
                track_id: "TR_bench".into(),
            },
            &mut self.wire,
        );
    }

    /// Frames received by each subscriber client so far.
    pub fn received(&self) -> Vec<usize> {
        self.clients[1..].iter().map(|c| c.received).collect()
    }

    /// Take the clients out (to measure what the engine alone holds).
    pub fn take_clients(&mut self) -> Vec<Client> {
        self.by_addr.clear();
        std::mem::take(&mut self.clients)
    }

    /// Answer the engine's offers (subscriber renegotiations).
    fn answer_offers(&mut self) {
        for (peer, sdp) in std::mem::take(&mut self.wire.offers) {
            let Some(c) = self.clients.iter_mut().find(|c| c.peer == peer) else {
                continue;
            };
            let offer = SdpOffer::from_sdp_string(&sdp).expect("offer");
            let answer = c.rtc.sdp_api().accept_offer(offer).expect("accept");
            let (reply, _rx) = tokio::sync::oneshot::channel();
            self.engine.handle_command(
                self.now,
                Command::SubscriberAnswer {
                    peer,
                    sdp: answer.to_sdp_string(),
                    reply,
                },
                &mut self.wire,
            );
        }
    }

    /// The shell's loop without sockets: `handle_timeout` while the engine's deadline is due
    /// (bounded: each round pops only the peers due when it starts).
    fn run_due_timers(&mut self) {
        for _ in 0..8 {
            if self.engine.poll_timeout(self.now) > self.now {
                break;
            }
            self.engine.handle_timeout(self.now, &mut self.wire);
        }
    }

    /// One frame: the publisher writes a frame (if `media`), datagrams cross the wire both
    /// ways, time advances by [`FRAME`]. Returns the time spent inside the engine.
    pub fn step(&mut self, media: bool) -> Duration {
        let mut engine_time = Duration::ZERO;
        self.answer_offers();
        if media {
            let mut frame = vec![0u8; 1000];
            let clock = if self.kind == MediaKind::Video {
                // VP8 frame tag of a shown keyframe (P bit clear), then the keyframe start
                // code: every frame is a keyframe, so every subscriber takes it at once.
                frame[..6].copy_from_slice(&[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]);
                self.rtp_time += 1800;
                Frequency::NINETY_KHZ
            } else {
                self.rtp_time += 960; // 20 ms of Opus at 48 kHz
                Frequency::FORTY_EIGHT_KHZ
            };
            let pub_rtc = &mut self.clients[0].rtc;
            let pt = pub_rtc
                .writer(self.media)
                .and_then(|w| w.payload_params().next().map(|p| p.pt()));
            if let (Some(pt), Some(w)) = (pt, pub_rtc.writer(self.media)) {
                let t = MediaTime::new(self.rtp_time, clock);
                let _ = w.write(pt, self.now, t, frame);
            }
        }
        // Clients → engine (timed).
        for c in 0..self.clients.len() {
            loop {
                let out = self.clients[c].rtc.poll_output();
                match out {
                    Ok(str0m::Output::Transmit(t)) => {
                        let t0 = Instant::now();
                        self.engine.handle_datagram(
                            self.now,
                            t.proto,
                            t.source,
                            t.destination,
                            &t.contents,
                            &mut self.wire,
                        );
                        engine_time += t0.elapsed();
                    }
                    Ok(str0m::Output::Event(Event::MediaData(_))) => {
                        self.clients[c].received += 1;
                    }
                    Ok(str0m::Output::Event(_)) => {}
                    Ok(str0m::Output::Timeout(_)) | Err(_) => break,
                }
            }
        }
        // What the shell does after every wake-up: the timers due now (str0m's pacer releases
        // a written packet on a timeout, and asks for another one right after sending it).
        let t0 = Instant::now();
        self.run_due_timers();
        engine_time += t0.elapsed();
        // Engine → clients (not timed).
        for (source, destination, data) in std::mem::take(&mut self.wire.to_clients) {
            let Some(&c) = self.by_addr.get(&destination) else {
                continue;
            };
            if let Ok(contents) = data.as_slice().try_into() {
                let _ = self.clients[c].rtc.handle_input(Input::Receive(
                    self.now,
                    Receive {
                        proto: Protocol::Udp,
                        source,
                        destination,
                        contents,
                    },
                ));
            }
        }
        self.now += FRAME;
        for c in &mut self.clients {
            let _ = c.rtc.handle_input(Input::Timeout(self.now));
        }
        let t0 = Instant::now();
        self.run_due_timers();
        engine_time += t0.elapsed();
        let _ = self.server;
        engine_time
    }
}
