//! Bandwidth adaptation of one subscriber, end to end through the real engine and real str0m
//! peers, in simulated time (issue 4, bug B6).
//!
//! The set-up mirrors the e2e test `test_bandwidth_limit_drops_one_subscriber_to_low`, without
//! sockets or clocks:
//!
//! ```text
//!  publisher (str0m, simulcast q/h/f VP8) ──► Engine ──► bottleneck link ──► subscriber (str0m)
//!                                               ▲                               │
//!                                               └──────── feedback link ◄───────┘
//! ```
//!
//! * The publisher is a str0m `Rtc` that offers one simulcast video m-line and writes frames of
//!   realistic sizes on each layer (150 / 500 / 1500 kbit/s at 20 fps), answering the engine's
//!   keyframe requests per layer like a browser does. Every frame carries its layer's rank, so
//!   the subscriber can tell which layer it receives.
//! * The subscriber is a str0m `Rtc` that answers the engine's offers. It sends the transport-wide
//!   congestion control feedback the engine's bandwidth estimator lives on, and NACKs.
//! * The bottleneck models a `tbf` qdisc like the e2e router's: a rate, and a queue in which a
//!   packet may wait at most 300 ms before it is dropped.
//! * "Load": each side is serviced only at jittered instants (seeded), the way a starved
//!   process reads its socket late and in bursts. The engine's timers fire late the same way.
//!
//! The load, the camera's frame sizes and the link are functions of the seed. str0m draws its
//! own SSRCs, ICE credentials and DTLS keys from the system's randomness, which changes some
//! packet sizes, so two runs of one seed can differ by a few hundred milliseconds; the
//! assertions therefore run several seeds against generous bounds.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbor_actors::media::engine::{Engine, EngineConfig, Output};
use arbor_actors::media::{Command, PeerEvent, PeerId, PeerRole, TrackKey};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{
    Direction, Frequency, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output as RtcOutput, Rtc};

const SERVER: &str = "10.200.0.1:7882";
const PUBLISHER: &str = "10.200.0.2:40000";
const SUBSCRIBER: &str = "10.201.1.2:40000";
const TRACK: TrackKey = TrackKey(7);
const FPS: u64 = 20;
/// Layer bitrates of the simulated camera, like the e2e Chromium publisher's (bits/s).
const LAYERS: [(&str, u64); 3] = [("q", 150_000), ("h", 500_000), ("f", 1_500_000)];

/// What the engine emits, captured for the simulation loop.
#[derive(Default)]
struct Wire {
    /// (destination, datagram)
    datagrams: Vec<(SocketAddr, Vec<u8>)>,
    events: Vec<(PeerId, PeerEvent)>,
}

impl Output for Wire {
    fn transmit(&mut self, _: Protocol, _: SocketAddr, destination: SocketAddr, data: &[u8]) {
        self.datagrams.push((destination, data.to_vec()));
    }
    fn event(&mut self, peer: PeerId, event: PeerEvent) {
        self.events.push((peer, event));
    }
    fn relay(&mut self, _: u64, _: &[u8]) {}
    fn relay_max(&self, _: u64) -> usize {
        0
    }
}

/// One direction of a path: propagation delay plus, optionally, a `tbf`-like rate limit.
struct Link {
    delay: Duration,
    /// (bits per second, longest time a packet may wait in the queue)
    limit: Option<(u64, Duration)>,
    /// When the bottleneck finishes sending what it has queued.
    busy_until: Option<Instant>,
    in_flight: VecDeque<(Instant, Vec<u8>)>,
    dropped: u64,
}

impl Link {
    fn new(delay: Duration) -> Self {
        Link {
            delay,
            limit: None,
            busy_until: None,
            in_flight: VecDeque::new(),
            dropped: 0,
        }
    }

    fn send(&mut self, now: Instant, data: Vec<u8>) {
        let at = match self.limit {
            None => now + self.delay,
            Some((bps, max_wait)) => {
                let start = self.busy_until.filter(|b| *b > now).unwrap_or(now);
                if start.duration_since(now) > max_wait {
                    self.dropped += 1;
                    return;
                }
                let tx = Duration::from_nanos(data.len() as u64 * 8 * 1_000_000_000 / bps);
                self.busy_until = Some(start + tx);
                start + tx + self.delay
            }
        };
        // Deliveries stay in order: a rate change never lets a packet overtake another.
        let at = self.in_flight.back().map_or(at, |(b, _)| at.max(*b));
        self.in_flight.push_back((at, data));
    }

    fn due(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while self.in_flight.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, d)) = self.in_flight.pop_front() {
                v.push(d);
            }
        }
        v
    }
}

/// How starved the processes are: each is serviced after a random pause, and sometimes after a
/// long stall (a run queue of 14 on two cores).
#[derive(Clone, Copy)]
struct Load {
    /// Longest ordinary pause between two services (uniform).
    jitter: Duration,
    /// Probability, per service, of a stall, and its longest duration (uniform).
    stall_p: f64,
    stall: Duration,
}

impl Load {
    const IDLE: Load = Load {
        jitter: Duration::from_millis(1),
        stall_p: 0.0,
        stall: Duration::ZERO,
    };
    /// A busy machine on which an unimpaired subscriber still holds the high layer: each side
    /// wakes up every 0.5–5 ms, and one wake-up in 200 is 0–100 ms late.
    const MODERATE: Load = Load {
        jitter: Duration::from_millis(5),
        stall_p: 0.005,
        stall: Duration::from_millis(100),
    };

    fn next(&self, now: Instant, rng: &mut ChaCha8Rng) -> Instant {
        let mut d =
            Duration::from_micros(rng.random_range(500..=self.jitter.as_micros().max(501) as u64));
        if self.stall_p > 0.0 && rng.random_bool(self.stall_p) {
            d += Duration::from_micros(rng.random_range(0..=self.stall.as_micros() as u64));
        }
        now + d
    }
}

struct Sim {
    now: Instant,
    t0: Instant,
    rng: ChaCha8Rng,
    load: Load,
    engine: Engine,
    wire: Wire,
    server: SocketAddr,
    publisher: Rtc,
    pub_addr: SocketAddr,
    pub_mid: Mid,
    sub: Rtc,
    sub_addr: SocketAddr,
    /// Engine → subscriber (the bottleneck) and subscriber → engine.
    down: Link,
    up: Link,
    /// Datagrams that reached a side but wait for that side's next service.
    engine_inbox: Vec<(SocketAddr, Vec<u8>)>,
    sub_inbox: Vec<Vec<u8>>,
    engine_next: Instant,
    sub_next: Instant,
    frame: u64,
    next_frame_at: Instant,
    keyframe_due: [bool; 3],
    /// (time since start, layer rank) of every frame the subscriber received.
    received: Vec<(Duration, u8)>,
    stream_paused: bool,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A VP8 frame: a real frame tag (so keyframe detection works), then the layer's rank.
fn vp8_frame(rank: u8, keyframe: bool, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(16)];
    if keyframe {
        v[..10].copy_from_slice(&[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xb4, 0x00]);
        v[10] = rank;
    } else {
        v[..3].copy_from_slice(&[0x11, 0x02, 0x00]);
        v[3] = rank;
    }
    v
}

/// The layer rank a received frame says it belongs to.
fn rank_of(data: &[u8]) -> Option<u8> {
    let key = data.first()? & 1 == 0;
    data.get(if key { 10 } else { 3 }).copied()
}

impl Sim {
    fn new(seed: u64, load: Load) -> Sim {
        arbor_actors::media::init_crypto();
        let now = Instant::now();
        let server = addr(SERVER);
        let engine = Engine::new(EngineConfig {
            candidates: vec![Candidate::host(server, "udp").expect("candidate")],
            udp_local: server,
            max_peers: 8,
            wall_anchor: (now, 1_700_000_000_000_000),
            rtp_mode: true,
        });
        let pub_addr = addr(PUBLISHER);
        let sub_addr = addr(SUBSCRIBER);
        let mut publisher = Rtc::new(now);
        publisher.add_local_candidate(Candidate::host(pub_addr, "udp").expect("candidate"));
        let mut sub = Rtc::new(now);
        sub.add_local_candidate(Candidate::host(sub_addr, "udp").expect("candidate"));
        let mut sim = Sim {
            now,
            t0: now,
            rng: ChaCha8Rng::seed_from_u64(seed),
            load,
            engine,
            wire: Wire::default(),
            server,
            publisher,
            pub_addr,
            pub_mid: Mid::from("0"),
            sub,
            sub_addr,
            down: Link::new(Duration::from_millis(10)),
            up: Link::new(Duration::from_millis(10)),
            engine_inbox: Vec::new(),
            sub_inbox: Vec::new(),
            engine_next: now,
            sub_next: now,
            frame: 0,
            next_frame_at: now,
            keyframe_due: [true; 3],
            received: Vec::new(),
            stream_paused: false,
        };
        sim.connect_publisher();
        sim.connect_subscriber();
        sim
    }

    fn command(&mut self, cmd: Command) {
        self.engine.handle_command(self.now, cmd, &mut self.wire);
    }

    fn add_peer(&mut self, peer: PeerId, role: PeerRole) {
        let (events, _rx) = tokio::sync::mpsc::channel(64);
        let (reply, mut r) = tokio::sync::oneshot::channel();
        self.command(Command::AddPeer {
            peer,
            role,
            events,
            reply,
        });
        assert!(matches!(r.try_recv(), Ok(Ok(()))), "AddPeer failed");
    }

    fn connect_publisher(&mut self) {
        self.add_peer(PeerId(1), PeerRole::Publisher);
        let mut api = self.publisher.sdp_api();
        let simulcast = Simulcast {
            send: LAYERS.iter().map(|(r, _)| SimulcastLayer::new(r)).collect(),
            recv: vec![],
        };
        self.pub_mid = api.add_media(
            MediaKind::Video,
            Direction::SendOnly,
            Some("stream".into()),
            Some("video".into()),
            Some(simulcast),
        );
        let (offer, pending) = api.apply().expect("publisher offer");
        let (reply, mut r) = tokio::sync::oneshot::channel();
        self.command(Command::PublisherOffer {
            peer: PeerId(1),
            sdp: offer.to_sdp_string(),
            bind: vec![(self.pub_mid.to_string(), TRACK)],
            unbind: vec![],
            reply,
        });
        let answer = r.try_recv().expect("reply").expect("answer");
        self.publisher
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("sdp"))
            .expect("accept answer");
    }

    fn connect_subscriber(&mut self) {
        self.add_peer(PeerId(2), PeerRole::Subscriber);
        self.command(Command::Subscribe {
            sub: PeerId(2),
            track: TRACK,
            stream_id: "PA_pub|TR_video".into(),
            track_id: "TR_video".into(),
        });
    }

    /// Answers the engine's offers and notes pause/resume reports.
    fn handle_events(&mut self) {
        for (peer, ev) in std::mem::take(&mut self.wire.events) {
            match ev {
                PeerEvent::Offer { sdp, .. } if peer == PeerId(2) => {
                    let offer = SdpOffer::from_sdp_string(&sdp).expect("offer");
                    let answer = self.sub.sdp_api().accept_offer(offer).expect("answer");
                    let (reply, _r) = tokio::sync::oneshot::channel();
                    self.command(Command::SubscriberAnswer {
                        peer,
                        sdp: answer.to_sdp_string(),
                        reply,
                    });
                }
                PeerEvent::StreamState { paused, .. } => self.stream_paused = paused,
                _ => {}
            }
        }
    }

    /// Routes what the engine sent: publisher directly, subscriber through the bottleneck.
    fn route_engine_output(&mut self) {
        for (dst, d) in std::mem::take(&mut self.wire.datagrams) {
            if dst == self.pub_addr {
                let _ = self.publisher.handle_input(Input::Receive(
                    self.now,
                    Receive {
                        proto: Protocol::Udp,
                        source: self.server,
                        destination: self.pub_addr,
                        contents: d.as_slice().try_into().expect("datagram"),
                    },
                ));
            } else if dst == self.sub_addr {
                self.down.send(self.now, d);
            }
        }
    }

    fn poll_publisher(&mut self) {
        loop {
            match self.publisher.poll_output() {
                Ok(RtcOutput::Transmit(t)) => {
                    self.engine_inbox.push((t.source, t.contents.to_vec()))
                }
                Ok(RtcOutput::Event(Event::KeyframeRequest(req))) => match req.rid {
                    Some(rid) => {
                        if let Some(i) = LAYERS.iter().position(|(r, _)| Rid::from(*r) == rid) {
                            self.keyframe_due[i] = true;
                        }
                    }
                    None => self.keyframe_due = [true; 3],
                },
                Ok(RtcOutput::Event(_)) => {}
                Ok(RtcOutput::Timeout(_)) | Err(_) => return,
            }
        }
    }

    fn poll_subscriber(&mut self) {
        loop {
            match self.sub.poll_output() {
                Ok(RtcOutput::Transmit(t)) => self.up.send(self.now, t.contents.to_vec()),
                Ok(RtcOutput::Event(Event::MediaData(m))) => {
                    if let Some(rank) = rank_of(&m.data) {
                        self.received.push((self.now - self.t0, rank));
                    }
                }
                Ok(RtcOutput::Event(_)) => {}
                Ok(RtcOutput::Timeout(_)) | Err(_) => return,
            }
        }
    }

    /// The publisher's camera: one frame per layer every 1/FPS s, keyframes when asked.
    fn write_frames(&mut self) {
        while self.now >= self.next_frame_at {
            let time = MediaTime::new(self.frame * 90_000 / FPS, Frequency::NINETY_KHZ);
            for (i, (rid, bps)) in LAYERS.iter().enumerate() {
                let key = std::mem::take(&mut self.keyframe_due[i]);
                let mean = (*bps / 8 / FPS) as usize;
                let len = if key {
                    mean * 3
                } else {
                    mean * self.rng.random_range(80..120) / 100
                };
                let data = vp8_frame(i as u8 + 1, key, len);
                let Some(w) = self.publisher.writer(self.pub_mid) else {
                    continue;
                };
                let Some(pt) = w.payload_params().next().map(|p| p.pt()) else {
                    continue;
                };
                let _ = w.rid(Rid::from(*rid)).write(pt, self.now, time, data);
            }
            self.frame += 1;
            self.next_frame_at += Duration::from_micros(1_000_000 / FPS);
        }
    }

    /// One millisecond of simulated time.
    fn step(&mut self) {
        self.now += Duration::from_millis(1);
        let now = self.now;
        self.write_frames();
        let _ = self.publisher.handle_input(Input::Timeout(now));
        self.poll_publisher();

        // Deliveries: they wait in each side's socket until that side is serviced.
        for d in self.down.due(now) {
            self.sub_inbox.push(d);
        }
        for d in self.up.due(now) {
            self.engine_inbox.push((self.sub_addr, d));
        }

        if now >= self.engine_next {
            for (src, d) in std::mem::take(&mut self.engine_inbox) {
                self.engine.handle_datagram(
                    now,
                    Protocol::Udp,
                    src,
                    self.server,
                    &d,
                    &mut self.wire,
                );
            }
            if self.engine.poll_timeout(now) <= now {
                self.engine.handle_timeout(now, &mut self.wire);
            }
            self.handle_events();
            self.route_engine_output();
            self.engine_next = self.load.next(now, &mut self.rng);
        }
        if now >= self.sub_next {
            for d in std::mem::take(&mut self.sub_inbox) {
                let _ = self.sub.handle_input(Input::Receive(
                    now,
                    Receive {
                        proto: Protocol::Udp,
                        source: self.server,
                        destination: self.sub_addr,
                        contents: d.as_slice().try_into().expect("datagram"),
                    },
                ));
                self.poll_subscriber();
            }
            let _ = self.sub.handle_input(Input::Timeout(now));
            self.poll_subscriber();
            self.sub_next = self.load.next(now, &mut self.rng);
        }
        self.poll_publisher();
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until the last `n` frames the subscriber received are all of layer `rank`, at most
    /// `limit`; returns how long that took.
    fn run_until_layer(&mut self, rank: u8, n: usize, limit: Duration) -> Option<Duration> {
        let start = self.now;
        let end = self.now + limit;
        while self.now < end {
            self.step();
            let recent: Vec<u8> = self
                .received
                .iter()
                .rev()
                .filter(|(t, _)| self.t0 + *t >= start)
                .take(n)
                .map(|(_, r)| *r)
                .collect();
            if recent.len() == n && recent.iter().all(|r| *r == rank) {
                return Some(self.now - start);
            }
        }
        None
    }

    fn layers_since(&self, since: Duration) -> Vec<(u64, u8)> {
        let mut v: Vec<(u64, u8)> = Vec::new();
        for (t, r) in self.received.iter().filter(|(t, _)| *t >= since) {
            let s = t.as_secs();
            match v.last_mut() {
                Some((ls, lr)) if *ls == s && *lr == *r => {}
                _ => v.push((s, *r)),
            }
        }
        v
    }
}

/// The e2e scenario: high layer, then 300 kbit/s (drop to low), then the limit lifted (back to
/// high). Returns (time to low, time back to high).
fn limit_and_lift(seed: u64, load: Load) -> (Option<Duration>, Option<Duration>, String) {
    let mut sim = Sim::new(seed, load);
    let high = sim.run_until_layer(3, 20, Duration::from_secs(30));
    assert!(
        high.is_some(),
        "seed {seed}: never reached the high layer: {:?}",
        sim.layers_since(Duration::ZERO)
    );
    sim.run_for(Duration::from_secs(5));
    sim.down.limit = Some((300_000, Duration::from_millis(300)));
    sim.up.limit = Some((300_000, Duration::from_millis(300)));
    let lim_at = sim.now - sim.t0;
    let low = sim.run_until_layer(1, 10, Duration::from_secs(20));
    sim.run_for(Duration::from_secs(8));
    sim.down.limit = None;
    sim.up.limit = None;
    let lift_at = sim.now - sim.t0;
    let up = sim.run_until_layer(3, 20, Duration::from_secs(60));
    let story = format!(
        "limit at {lim_at:?}, lift at {lift_at:?}, dropped {}: {:?}",
        sim.down.dropped,
        sim.layers_since(lim_at)
    );
    (low, up, story)
}

#[test]
fn limited_subscriber_drops_to_low_and_climbs_back_idle() {
    let (low, up, story) = limit_and_lift(1, Load::IDLE);
    println!("idle: low after {low:?}, high again after {up:?}; {story}");
    assert!(low.is_some(), "never dropped to low: {story}");
    assert!(up.is_some(), "never climbed back to high: {story}");
}

/// B6: on a loaded machine the limited subscriber used to stay on the low layer after its
/// link was freed (in this simulation: one seed of eight never climbed back within 60 s, the
/// others took 9–26 s). Every seed must now be back on the high layer within 30 s.
#[test]
fn limited_subscriber_climbs_back_on_a_loaded_machine() {
    let mut ups = Vec::new();
    for seed in 1..=8 {
        let (low, up, story) = limit_and_lift(seed, Load::MODERATE);
        println!("seed {seed}: low after {low:?}, high again after {up:?}; {story}");
        assert!(low.is_some(), "seed {seed}: never dropped to low: {story}");
        let up = up.unwrap_or_else(|| panic!("seed {seed}: never climbed back to high: {story}"));
        ups.push(up);
    }
    let worst = ups.iter().max().copied().unwrap_or_default();
    println!("back to high after the limit was lifted: {ups:?}");
    assert!(
        worst <= Duration::from_secs(30),
        "slowest climb back {worst:?}: {ups:?}"
    );
}

/// No flapping on a healthy link: an unimpaired subscriber on a loaded machine keeps the high
/// layer (the downgrade rules that make the drop fast must not fire on scheduling noise).
#[test]
fn unimpaired_subscriber_stays_high_on_a_loaded_machine() {
    for seed in 1..=4 {
        let mut sim = Sim::new(seed, Load::MODERATE);
        let high = sim.run_until_layer(3, 20, Duration::from_secs(30));
        assert!(high.is_some(), "seed {seed}: never reached the high layer");
        let from = sim.now - sim.t0;
        sim.run_for(Duration::from_secs(30));
        let frames: Vec<u8> = sim
            .received
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(_, r)| *r)
            .collect();
        let at_high = frames.iter().filter(|r| **r == 3).count();
        let switches = frames.windows(2).filter(|w| w[0] != w[1]).count();
        println!(
            "seed {seed}: {at_high}/{} frames at high, {switches} switches: {:?}",
            frames.len(),
            sim.layers_since(from)
        );
        assert!(
            frames.len() >= 500,
            "seed {seed}: only {} frames in 30 s",
            frames.len()
        );
        // A dip (two switches) can happen; flapping cannot.
        assert!(
            switches <= 4,
            "seed {seed}: {switches} layer switches: {:?}",
            sim.layers_since(from)
        );
        assert!(
            at_high * 10 >= frames.len() * 8,
            "seed {seed}: only {at_high} of {} frames at high: {:?}",
            frames.len(),
            sim.layers_since(from)
        );
    }
}
