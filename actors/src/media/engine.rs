//! The sans-IO media engine: every WebRTC peer connection of one shard and the forwarding table
//! between them.
//!
//! The engine never touches a socket or a clock. The shell ([`super::shell`]) feeds it
//! datagrams, control [`Command`]s and timeouts, each with the `now` it observed, and the engine
//! answers through an [`Output`] sink: datagrams to transmit and [`PeerEvent`]s for the
//! control plane. That makes every behaviour here testable without a network.
//!
//! # The life of one RTP packet
//!
//! 1. The shell receives a datagram and calls [`Engine::handle_datagram`].
//! 2. The engine finds the publisher's [`Rtc`] (by cached source address, else by
//!    `Rtc::accepts`), hands the datagram to it and drains it. str0m decrypts the SRTP, NACKs
//!    gaps, unwraps retransmissions and emits the media:
//!    * in **RTP mode** ([`EngineConfig::rtp_mode`]) as `Event::RtpPacket`, one per packet,
//!      payload an `Arc<[u8]>`. The engine reads the payload once (keyframe start, VP8
//!      descriptor: [`super::rtp`]), then for every subscriber of the track picks the layer,
//!      rewrites sequence number / timestamp / picture id with that subscriber's
//!      [`Rewriter`] and writes the packet with `StreamTx::write_rtp` (the same `Arc`, a
//!      reference-count increment; VP8 fields patched by str0m while it serialises);
//!    * in **frame mode** as `Event::MediaData` (reordered, depacketised frames), which the
//!      engine writes into every subscriber's `Rtc` (again the same `Arc`), which packetises
//!      it anew.
//! 3. Each write is followed by a drain of the subscriber's `Rtc`, which encrypts and
//!    transmits.
//!
//! Nothing on that path goes through an actor mailbox or takes a lock.
//!
//! # Invariant from str0m
//!
//! Every mutation of an `Rtc` (input, write, SDP change) is followed by a full drain of
//! `poll_output` until it returns a timeout, before the next mutation of the same `Rtc`.
//! [`Engine::drain`] is the only place that polls, and every mutation site calls it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{DirectApi, SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::media::MediaTime;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{
    Candidate, Event, IceConnectionState, IceCreds, Input, Output as RtcOutput, Rtc, RtcConfig,
};

use crate::media::alloc::{allocate, next_step_bps, AllocTrack, Decision, Recovery, SpatialRates};
use crate::media::audio::{LevelConfig, LevelMeter};
use crate::media::relay::{
    self, RelayFrame, RelayLimits, RelayReceiver, RelayRtp, RelaySender, RELAY_METRICS,
};
use crate::media::rtp::{
    self as rtpfwd, DdBytes, DdSerializer, FrameRates, InHeader, PayloadKind, Rewriter, SvcPacket,
    SvcSelector, SwitchHint, TemporalSelector, ALL_TEMPORAL,
};
use crate::media::shard;
use crate::quality::LinkStats;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use str0m::format::{CodecExtra, PayloadParams};
use str0m::media::Pt;
use str0m::media::{ExtensionValues, Frequency};
use str0m::rtp::{Extension, RtpPacket, RtpWrite, SeqNo, Ssrc, VideoOrientation};

use crate::error::MediaError;
use crate::media::{Command, PeerEvent, PeerId, PeerRole, TrackKey};
use crate::metrics::METRICS;

/// Where the engine's outputs go. Implemented by the shell (sockets + channels) and by tests.
pub trait Output {
    /// Send `contents` from `source` to `destination` over `proto`.
    fn transmit(
        &mut self,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    );
    /// Deliver an event to the control plane owner of `peer`.
    fn event(&mut self, peer: PeerId, event: PeerEvent);
    /// Send a relay datagram to cluster node `node` (dropped and counted if impossible).
    fn relay(&mut self, node: u64, datagram: &[u8]);
    /// The largest relay datagram that fits the connection to `node` (0: no connection).
    fn relay_max(&self, node: u64) -> usize;
}

/// The minimum interval between two keyframe requests sent upstream for one track layer.
/// Subscribers' PLIs arriving faster are coalesced into one request.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

/// A simulcast layer that produced no packet for this long is considered stopped.
const LAYER_IDLE: Duration = Duration::from_millis(1500);

/// Period of the engine's housekeeping: layer bitrates, audio levels, bandwidth allocation.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// Link statistics are reported every this many housekeeping periods.
const STATS_EVERY: u32 = 4;

/// Initial bandwidth estimate for a subscriber connection.
const BWE_INITIAL_KBPS: u64 = 1_500;

/// Fraction of the estimate the allocator may fill (headroom for audio, RTX, RTCP).
const BWE_USABLE: f64 = 0.85;

/// Packets held for reordering per incoming video stream. str0m needs at least as many as the
/// largest keyframe spans, or it releases keyframes incomplete (a 960x540 keyframe is often 40+).
const VIDEO_REORDER_PACKETS: usize = 512;

/// Consecutive allocation rounds a layer must fail to fit before a subscriber is moved down
/// (unless the link is clearly overloaded).
const DOWNGRADE_ROUNDS: u8 = 2;

/// Loss (fraction of packets NACKed) above which a subscriber's link counts as overloaded:
/// its budget is cut at once instead of waiting for the delay-based estimate.
const OVERLOAD_LOSS: f32 = 0.10;

/// str0m paces a subscriber's media at this multiple of its bandwidth estimate. A subscriber
/// whose current layers need more than that while its estimate falls is building a queue in
/// the pacer with every frame (latency, then a burst of loss when the queue limit forces it
/// out), so its downgrade is applied at once instead of after [`DOWNGRADE_ROUNDS`].
const PACING_FACTOR: f64 = 1.1;

/// Most source addresses remembered in the address → peer cache (each peer keeps at most 8).
const MAX_ADDR_CACHE: usize = 65_536;

/// How far into the future the engine may sleep when no peer has a deadline.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// Static configuration of one engine (shard).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Host candidates advertised to every peer (UDP, and TCP passive if enabled).
    pub candidates: Vec<Candidate>,
    /// Address used as the `destination` of received UDP datagrams (the advertised address).
    pub udp_local: SocketAddr,
    /// Maximum number of peer connections this engine accepts.
    pub max_peers: usize,
    /// Wall clock at one instant: `(instant, microseconds since the Unix epoch)`. Relay frames
    /// carry wall-clock ingest times derived from it.
    pub wall_anchor: (Instant, u64),
    /// Forward RTP packets (str0m's RTP mode: headers rewritten per subscriber, payloads
    /// never depacketised) instead of frames (str0m's frame mode: depacketise, repacketise
    /// per subscriber). Every node of a relay fabric must use the same mode.
    pub rtp_mode: bool,
}

/// A subscriber-side outgoing track and the state of its m-line negotiation.
#[derive(Debug)]
struct OutTrack {
    track: TrackKey,
    kind: MediaKind,
    stream_id: String,
    track_id: String,
    state: OutState,
    /// The simulcast layer currently forwarded to this subscriber (None: non-simulcast).
    rid: Option<Rid>,
    /// Waiting for a keyframe before forwarding anything (new subscription or layer switch).
    need_keyframe: bool,
    /// The best layer rank the subscriber asked for (`UpdateTrackSettings`); 0 = disabled.
    max_rank: u8,
    /// The frame rate the subscriber asked for (`UpdateTrackSettings.fps`; 0 = all): RTP
    /// mode forwards the lowest temporal layer that has it.
    fps: u32,
    /// RTP mode, a non-SVC stream with temporal layers (VP8 with TIDs): the temporal layer
    /// forwarded (an SVC stream's is in `svc`).
    temporal: TemporalSelector,
    /// The allocator's decision under this subscriber's bandwidth estimate.
    alloc: Decision,
    /// Whether the subscriber was last told the stream is paused.
    reported_paused: bool,
    /// Added to incoming RTP timestamps so a layer switch continues the outgoing timeline.
    ts_offset: i64,
    /// Last written (timestamp numerator, wallclock), to place the next layer after it.
    last_out: Option<(u64, Instant)>,
    /// Consecutive allocation rounds that wanted a lower layer than the current one.
    down_votes: u8,
    /// RTP mode: sequence number, timestamp and VP8 picture id rewriting.
    rw: Rewriter,
    /// RTP mode, SVC stream (VP9 with layer indices, AV1 with a dependency descriptor): the
    /// spatial layer forwarded.
    svc: SvcSelector,
    /// RTP mode, SVC stream: the packet the selector holds until it knows whether it ends
    /// its picture (see [`SvcSelector`]); at most one.
    held: Option<HeldRtp>,
    /// RTP mode: the publisher's payload type → this subscriber's (None: no match).
    pt_map: Vec<(Pt, Option<Pt>)>,
    /// The SSRC of the str0m send stream of the open m-line, once looked up: str0m finds a
    /// stream by mid with a scan of all of the peer's send streams, by SSRC with one hash.
    tx_ssrc: Option<Ssrc>,
}

impl OutTrack {
    /// The layer rank this subscriber may receive now (0: nothing).
    fn allowed_rank(&self) -> u8 {
        match self.alloc {
            _ if self.max_rank == 0 => 0,
            Decision::Layer(r) => r.min(self.max_rank),
            Decision::PausedBySubscriber | Decision::PausedByCongestion => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    ToOpen,
    Negotiating(Mid),
    Open(Mid),
    ToStop(Mid),
    NegotiatingStop(Mid),
}

impl OutState {
    fn mid(&self) -> Option<Mid> {
        match *self {
            OutState::ToOpen => None,
            OutState::Negotiating(m)
            | OutState::Open(m)
            | OutState::ToStop(m)
            | OutState::NegotiatingStop(m) => Some(m),
        }
    }
}

struct Peer {
    rtc: Rtc,
    role: PeerRole,
    /// Deadline returned by the last drain.
    next_timeout: Instant,
    /// The earliest entry this peer has in the engine's [`TimerQueue`] (`None`: none that
    /// counts). See [`TimerQueue`] for the lazy-invalidation rule.
    scheduled: Option<Instant>,
    /// Our ICE username fragment (indexes `Engine::by_ufrag`).
    local_ufrag: String,
    /// Publisher: mid → published track.
    media_in: HashMap<Mid, TrackKey>,
    /// Subscriber: outgoing tracks.
    media_out: Vec<OutTrack>,
    /// Subscriber: the offer we are waiting an answer for.
    pending: Option<SdpPendingOffer>,
    /// Subscriber: the first offer (data channels) has been made.
    initial_offer_done: bool,
    reliable: Option<ChannelId>,
    lossy: Option<ChannelId>,
    /// Data channels opened by the remote, by id.
    channels: HashMap<ChannelId, ChanKind>,
    connected: bool,
    remote_addrs: Vec<SocketAddr>,
    /// Running NACK totals per (mid, rid, incoming?) from str0m's stats, for the counters.
    nacks: crate::metrics::Tally<(Mid, Option<Rid>, bool)>,
    /// Subscriber: the latest bandwidth estimate (bits/s).
    bwe_bps: Option<u64>,
    /// Last time any datagram arrived from this peer.
    last_rx: Instant,
    /// Latest link statistics from str0m.
    link: LinkStats,
    /// Cumulative (packets, NACKs) per media stream at the last stats event.
    nack_seen: HashMap<(Mid, Option<Rid>), (u64, u64)>,
    /// Packets and NACKs since the last loss estimate.
    window: (u64, u64),
    /// Subscriber: when to restart the bandwidth estimator after a drop (`media::alloc`).
    recovery: Recovery,
    /// Subscriber: the estimate the previous allocation round saw.
    last_alloc_bwe: Option<u64>,
    /// RTP mode, publisher: incoming SSRC → (mid, rid), learned from str0m's receive streams.
    ssrcs: Vec<(Ssrc, Mid, Option<Rid>)>,
}

struct FwdTrack {
    publisher: PeerId,
    mid: Mid,
    kind: MediaKind,
    /// (subscriber peer) — the out-track state lives in the subscriber's `Peer`.
    subscribers: Vec<PeerId>,
    /// Last time a packet of each simulcast layer was seen.
    layers: Vec<(Rid, Instant)>,
    last_keyframe_request: HashMap<Option<Rid>, Instant>,
    /// Per layer (None: non-simulcast): bytes in the current window and the measured bitrate.
    rates: Vec<(Option<Rid>, u64, u64)>,
    /// RTP mode, SVC stream: the same per spatial layer (the allocator's layers when live).
    spatial: SpatialRates,
    /// RTP mode: the frame rate of each temporal layer, per simulcast layer (index rank - 1;
    /// a non-simulcast or SVC stream uses the first).
    frame_rates: [FrameRates; 3],
    /// RTP mode: the latest dependency descriptor template structure, per simulcast layer
    /// (index rank - 1; an SVC stream uses the first).
    dd_structures: [Option<rtpfwd::DdStructure>; 3],
    /// Audio tracks: speech level meter.
    meter: LevelMeter,
    /// Relayed track: fed by this (node, flow) instead of a local publisher.
    relay_src: Option<(u64, u64)>,
    /// Relayed track: reassembly and loss repair of the incoming flow.
    receiver: Option<RelayReceiver>,
    /// Codec parameters: serialised for relay links (publisher side), or as received.
    params: Option<(PayloadParams, Arc<[u8]>)>,
    /// Nodes this track is relayed to, each with its sending state and the best layer rank it
    /// needs (higher simulcast layers are not sent).
    relay_outs: Vec<OutLink>,
    /// RTP mode: the publisher's payload types with their codec parameters, how to read their
    /// payloads, and (for relay links) the parameters as JSON.
    pts: Vec<PtInfo>,
}

/// RTP mode: one payload type of a forwarded track.
#[derive(Debug, Clone)]
struct PtInfo {
    pt: Pt,
    params: PayloadParams,
    kind: PayloadKind,
    json: Option<Arc<[u8]>>,
}

/// Our id for the dependency descriptor extension (free in str0m's standard map; a
/// client's offer may use another, str0m maps by URI).
const DD_EXTENSION_ID: u8 = 12;

/// Payload types remembered per track (a track normally uses one or two).
const MAX_PTS: usize = 8;
/// SSRCs remembered per publisher connection (three simulcast layers per video track).
const MAX_SSRCS: usize = 64;

/// RTP mode: one packet on its way to subscribers and relay links, whether it came from a
/// local publisher or a relay link. Built once per packet; every subscriber shares `payload`.
struct RtpIn {
    rid: Option<Rid>,
    pt: Pt,
    params: PayloadParams,
    kind: PayloadKind,
    seq: u64,
    ts: u32,
    marker: bool,
    keyframe: bool,
    vp8: Option<rtpfwd::Vp8Descriptor>,
    /// The packet's spatial/temporal layer if it belongs to an SVC stream (VP9 with layer
    /// indices, AV1 with a dependency descriptor).
    svc: Option<SvcPacket>,
    /// The packet's temporal layer and what it says about joining higher ones (see
    /// [`temporal_of`]); `None` for a stream without temporal layers.
    temporal: Option<(u8, SwitchHint)>,
    /// The dependency descriptor, forwarded unchanged (to subscribers and relay links). An
    /// `Arc`, which str0m takes as it is (`set_arc`): no allocation per subscriber for it.
    dd: Option<Arc<DdBytes>>,
    audio_level: Option<i8>,
    voice_activity: Option<bool>,
    video_orientation: Option<VideoOrientation>,
    payload: Arc<[u8]>,
}

impl RtpIn {
    fn header(&self) -> InHeader {
        InHeader {
            seq: self.seq,
            ts: self.ts,
            clock: self.params.spec().clock_rate.get(),
            vp8: self.vp8.map(|d| (d.picture_id, d.tl0_pic_idx)),
        }
    }
}

/// RTP mode: a rewritten packet waiting for its marker bit (an SVC layer frame's end).
#[derive(Debug)]
struct HeldRtp {
    pt: Pt,
    seq: u64,
    ts: u32,
    payload: Arc<[u8]>,
    ext: ExtensionValues,
}

/// One downstream link of a track.
#[derive(Debug)]
struct OutLink {
    node: u64,
    sender: RelaySender,
    /// The best layer the far side needs (its `Want`).
    max_rank: u8,
    /// Congestion cap: layers above it are shed until `cap_until`.
    cap: u8,
    cap_until: Option<Instant>,
}

impl OutLink {
    /// The best layer rank sent on this link now.
    fn sending(&self) -> u8 {
        self.max_rank.min(self.cap)
    }
}

impl FwdTrack {
    fn new(publisher: PeerId, mid: Mid, kind: MediaKind) -> Self {
        FwdTrack {
            publisher,
            mid,
            kind,
            subscribers: Vec::new(),
            layers: Vec::new(),
            last_keyframe_request: HashMap::new(),
            rates: Vec::new(),
            spatial: SpatialRates::default(),
            frame_rates: [FrameRates::default(); 3],
            dd_structures: [None, None, None],
            meter: LevelMeter::default(),
            relay_src: None,
            receiver: None,
            params: None,
            relay_outs: Vec::new(),
            pts: Vec::new(),
        }
    }
}

impl FwdTrack {
    /// Account one received unit (an RTP packet in RTP mode, a frame in frame mode) of
    /// `len` payload bytes on layer `rid`: per-layer byte counts for the allocator, layer
    /// liveness, and the speaker meter for audio. At most 8 layers are tracked (bounded).
    fn observe_ingress(
        &mut self,
        now: Instant,
        rid: Option<Rid>,
        len: usize,
        audio_level: Option<i8>,
        level_config: &LevelConfig,
    ) {
        match self.rates.iter_mut().find(|(r, _, _)| *r == rid) {
            Some(r) => r.1 += len as u64,
            None => {
                if self.rates.len() < 8 {
                    self.rates.push((rid, len as u64, 0));
                }
            }
        }
        if let Some(rid) = rid {
            match self.layers.iter_mut().find(|(r, _)| *r == rid) {
                Some(l) => l.1 = now,
                None => {
                    if self.layers.len() < 8 {
                        self.layers.push((rid, now));
                    }
                }
            }
        }
        if self.kind == MediaKind::Audio {
            self.meter.observe(audio_level, level_config);
        }
    }

    /// Live layers as `(rank, bits/s)` sorted by rank. An SVC stream's spatial layers are
    /// its ranks (each costing the layers up to it).
    fn live_layers(&self, now: Instant) -> Vec<(u8, u64)> {
        if self.spatial.active(now, LAYER_IDLE) {
            return self.spatial.live(now, LAYER_IDLE);
        }
        let mut v: Vec<(u8, u64)> = Vec::with_capacity(3);
        for (rid, _, bps) in &self.rates {
            let live = match rid {
                Some(r) => self
                    .layers
                    .iter()
                    .any(|(x, seen)| x == r && now.saturating_duration_since(*seen) < LAYER_IDLE),
                None => true,
            };
            if live {
                v.push((rid.as_ref().map(rid_rank).unwrap_or(1), (*bps).max(1)));
            }
        }
        v.sort_unstable();
        v
    }
}

/// Work produced while draining one peer that involves other peers.
///
/// `MediaData` is large, but boxing it would allocate once per packet; the queue's storage is
/// reused, so the size costs nothing after warm-up.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Media { from: PeerId, data: MediaData },
    Rtp { from: PeerId, pkt: RtpPacket },
    Keyframe { sub: PeerId, mid: Mid },
}

/// Limits of the data path that are configuration, not protocol (`rtc.*` keys; see
/// `deploy/config-sample.yaml`). The defaults suit the benchmark and typical rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// How long a subscriber connection keeps each sent packet for retransmission (NACK →
    /// RTX). This is most of a subscription's memory: every packet sent in this window is
    /// held once per subscriber (str0m's default is 3 s). One second covers several
    /// retransmission rounds at any round-trip time a call tolerates.
    pub rtx_history: Duration,
    /// Upper bound on packets kept for retransmission per outgoing video stream, whatever
    /// the bitrate (str0m's default is 1000).
    pub rtx_packets_video: usize,
    /// The same for audio streams (str0m's default is 50).
    pub rtx_packets_audio: usize,
    /// Full scans over all peers (`Rtc::accepts`) allowed per second for non-STUN datagrams
    /// from unknown source addresses. Known addresses and STUN requests (found by our ICE
    /// ufrag) never scan; this bounds what garbage from the internet can cost.
    pub fallback_scans_per_sec: u32,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            rtx_history: Duration::from_millis(1000),
            rtx_packets_video: 512,
            rtx_packets_audio: 64,
            fallback_scans_per_sec: 20,
        }
    }
}

/// Share of retransmissions in a stream's traffic above which str0m drops queued resends
/// (str0m's own default): a subscriber that NACKs everything cannot double its bitrate.
const RTX_RATIO_CAP: f32 = 0.15;

/// When each peer's `Rtc` next needs [`Input::Timeout`]: a min-heap of `(deadline, peer)`.
///
/// Waking up costs `O(due · log n)` instead of a scan over every peer. Entries are never
/// updated in place; instead each peer remembers in `Peer::scheduled` the deadline of the one
/// entry that counts, and:
///
/// * a new deadline earlier than the scheduled one pushes a new entry (the old one becomes
///   stale);
/// * a later one pushes nothing: when the earlier entry comes due the engine sees the peer's
///   real `next_timeout` is still ahead and re-schedules it then;
/// * a popped entry whose deadline is not the peer's `scheduled` (or whose peer is gone) is
///   stale and skipped.
///
/// Stale entries are bounded: [`Engine::handle_timeout`] rebuilds the heap from the peers when
/// it holds more than twice as many entries as there are peers (plus a constant).
#[derive(Default)]
struct TimerQueue {
    heap: BinaryHeap<Reverse<(Instant, PeerId)>>,
}

impl TimerQueue {
    /// Record that `id` needs a timeout at `at`; `scheduled` is the peer's current entry.
    fn schedule(&mut self, id: PeerId, scheduled: &mut Option<Instant>, at: Instant) {
        if scheduled.is_none_or(|s| at < s) {
            self.heap.push(Reverse((at, id)));
            *scheduled = Some(at);
        }
    }

    /// The earliest deadline in the heap (possibly a stale entry: waking early is harmless).
    fn peek(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Move every entry due at `now` into `due`.
    fn pop_due(&mut self, now: Instant, due: &mut Vec<(Instant, PeerId)>) {
        while let Some(Reverse((t, id))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            due.push((t, id));
        }
    }
}

/// Everything draining a peer produces beyond its own `Rtc`: work that involves other peers
/// (media to forward, keyframe requests), its next deadline, and whether it died.
///
/// [`Engine::drain`] takes this (not the whole engine) so that it can run while one peer is
/// borrowed mutably.
#[derive(Default)]
struct WorkQueue {
    pending: VecDeque<Pending>,
    timers: TimerQueue,
    /// Peers whose `Rtc` is no longer alive, reaped by the next [`Engine::handle_timeout`].
    dead: Vec<PeerId>,
    /// Scratch for [`TimerQueue::pop_due`], reused so waking up does not allocate.
    due: Vec<(Instant, PeerId)>,
}

impl WorkQueue {
    fn push_back(&mut self, p: Pending) {
        self.pending.push_back(p);
    }

    fn pop_front(&mut self) -> Option<Pending> {
        self.pending.pop_front()
    }

    /// Note that `id` died (once).
    fn mark_dead(&mut self, id: PeerId) {
        if !self.dead.contains(&id) {
            self.dead.push(id);
        }
    }
}

/// The local ICE ufrag a STUN binding request is addressed to: the part of its USERNAME
/// attribute before the colon (RFC 8445 §7.2.2: `<receiver ufrag>:<sender ufrag>`). `None` if
/// `d` is not a STUN message or carries no well-formed USERNAME. Looks at the bytes only; the
/// owning `Rtc` still authenticates the message.
pub(crate) fn stun_local_ufrag(d: &[u8]) -> Option<&str> {
    // STUN header: type (2, top two bits zero), length (2), magic cookie (4), id (12).
    if d.len() < 20 || d[0] & 0xc0 != 0 || d[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    let body = d.get(20..20 + len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
        let value = body.get(at + 4..at + 4 + alen)?;
        if kind == 0x0006 {
            let user = std::str::from_utf8(value).ok()?;
            return user.split(':').next().filter(|u| !u.is_empty());
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// RTP mode: what the forwarder reads from a payload, once for all subscribers: the VP8
/// descriptor, the SVC layer of a VP9 packet with layer indices, and whether the packet starts
/// a keyframe. Malformed payloads give `None`s and `false` (never a panic). (An AV1 packet's
/// layer is in its dependency descriptor, a header extension: see `forward_rtp_from`.)
fn read_payload(
    kind: PayloadKind,
    payload: &[u8],
    ts: u32,
    marker: bool,
) -> (Option<rtpfwd::Vp8Descriptor>, Option<SvcPacket>, bool) {
    match kind {
        PayloadKind::Vp8 => {
            let d = rtpfwd::vp8_descriptor(payload);
            (d, None, d.is_some_and(|d| d.keyframe_start))
        }
        PayloadKind::Vp9 => match rtpfwd::vp9_descriptor(payload) {
            Some(d) => (None, SvcPacket::vp9(&d, ts, marker), d.keyframe_start()),
            None => (None, None, false),
        },
        k => (None, None, rtpfwd::keyframe_start(k, payload)),
    }
}

/// The SVC layer of an AV1 packet from its dependency descriptor: the descriptor names a
/// frame dependency template, whose (spatial, temporal) layer is looked up in the latest
/// template structure the track sent (keyframes carry it; `structure` remembers it).
/// `None` without a descriptor, before the first structure, or for a malformed descriptor.
fn av1_layer(
    structure: &mut Option<rtpfwd::DdStructure>,
    dd: Option<&DdBytes>,
    keyframe: bool,
    ts: u32,
    marker: bool,
) -> Option<SvcPacket> {
    let d = rtpfwd::parse_dd(&dd?.0)?;
    if let Some(st) = &d.structure {
        *structure = Some(st.clone());
    }
    SvcPacket::av1(&d, structure.as_ref()?, keyframe, ts, marker)
}

/// The temporal layer of a packet and whether a subscriber may join higher layers at it:
///
/// * an SVC packet (VP9 with layer indices, AV1 with a dependency descriptor): its TID, and
///   an up-switch point where the VP9 U bit or the AV1 template says so;
/// * VP8 with the descriptor's T bit: its TID, and a layer sync frame where the Y bit is set;
/// * any other packet with a dependency descriptor (Chromium sends VP8 without picture id or
///   T bit once the descriptor is negotiated, the layers being in the descriptor): the TID
///   of its template in the latest structure of its stream (`structure`, kept up to date
///   here), and an up-switch point where the template switches some decode target.
///
/// `None`: no temporal layers known (the stream is forwarded whole in time).
fn temporal_of(
    kind: PayloadKind,
    vp8: Option<rtpfwd::Vp8Descriptor>,
    svc: Option<&SvcPacket>,
    dd: Option<&DdBytes>,
    structure: &mut Option<rtpfwd::DdStructure>,
) -> Option<(u8, SwitchHint)> {
    if let Some(s) = svc {
        let hint = if s.switch_up {
            SwitchHint::UpSwitch
        } else {
            SwitchHint::None
        };
        return Some((s.tid, hint));
    }
    if let Some(tid) = vp8.and_then(|d| d.tid) {
        let sync = vp8.is_some_and(|d| d.begin && d.layer_sync);
        let hint = if sync {
            SwitchHint::LayerSync
        } else {
            SwitchHint::None
        };
        return Some((tid, hint));
    }
    if kind == PayloadKind::Av1 || kind == PayloadKind::Audio {
        // AV1 without an SVC view has no usable structure; audio has no layers.
        return None;
    }
    let d = rtpfwd::parse_dd(&dd?.0)?;
    if let Some(st) = &d.structure {
        *structure = Some(st.clone());
    }
    let st = structure.as_ref()?;
    let (_, tid) = st.layer_of(d.template_id)?;
    let hint = if d.start_of_frame && st.is_switch(d.template_id) {
        SwitchHint::UpSwitch
    } else {
        SwitchHint::None
    };
    Some((tid, hint))
}

/// Index of a simulcast layer in per-layer tables (rank - 1; 0 without a rid).
fn rid_index(rid: Option<&Rid>) -> usize {
    usize::from(rid.map_or(1, rid_rank).clamp(1, 3) - 1)
}

/// Rank of a simulcast rid: higher is better quality. LiveKit uses q/h/f (also 0/1/2 reversed).
fn rid_rank(rid: &Rid) -> u8 {
    match &**rid {
        "f" | "0" => 3,
        "h" | "1" => 2,
        _ => 1,
    }
}

/// The simulcast layer a subscriber allowed up to `allowed` should get now: the best live
/// layer at or below it, else the lowest live layer.
fn best_layer(layers: &[(Rid, Instant)], allowed: u8, now: Instant) -> Option<Rid> {
    let mut best_fit: Option<(u8, Rid)> = None;
    let mut lowest: Option<(u8, Rid)> = None;
    for (r, seen) in layers {
        if now.saturating_duration_since(*seen) >= LAYER_IDLE {
            continue;
        }
        let rank = rid_rank(r);
        if rank <= allowed && best_fit.is_none_or(|(b, _)| rank > b) {
            best_fit = Some((rank, *r));
        }
        if lowest.is_none_or(|(l, _)| rank < l) {
            lowest = Some((rank, *r));
        }
    }
    best_fit.or(lowest).map(|(_, r)| r)
}

/// Hasher for the engine's own ids ([`PeerId`], [`TrackKey`]): numbers the engine assigns
/// itself, never taken from the network, so the lookups made per packet and subscriber need
/// no SipHash (its DoS resistance protects maps keyed by input, such as `by_addr`).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: a bijection that spreads sequential ids over every bit.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by the engine's own ids (see [`IdHasher`]).
type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The media engine of one shard. See the module documentation.
pub struct Engine {
    config: EngineConfig,
    peers: IdMap<PeerId, Peer>,
    tracks: IdMap<TrackKey, FwdTrack>,
    /// Cache: remote address → peer, filled when a peer first accepts a datagram.
    by_addr: HashMap<SocketAddr, PeerId>,
    /// Our ICE ufrag → peer: a STUN request from a new address names the peer it is for.
    by_ufrag: HashMap<String, PeerId>,
    /// Work between peers, per-peer deadlines and peers to reap (see [`WorkQueue`]).
    queue: WorkQueue,
    /// Data-path limits (send history, lookup budget), see [`EngineLimits`].
    limits: EngineLimits,
    /// Fallback scans (non-STUN datagrams from unknown addresses) left in this second, and
    /// when the budget refills.
    scan_budget: (u32, Option<Instant>),
    /// Relayed tracks by (node, flow).
    relay_in: HashMap<(u64, u64), TrackKey>,
    relay_limits: RelayLimits,
    next_housekeeping: Option<Instant>,
    housekeeping_count: u32,
    level_config: LevelConfig,
    /// This engine's media shard (its number starts every local ICE ufrag).
    shard: usize,
    /// Peers of every shard of the node, when `max_peers` is a node-wide limit shared by
    /// several engines (`None`: this engine's own peers count).
    node_peers: Option<Arc<AtomicUsize>>,
}

impl Engine {
    /// A new engine with no peers.
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            peers: IdMap::default(),
            tracks: IdMap::default(),
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            queue: WorkQueue::default(),
            limits: EngineLimits::default(),
            scan_budget: (0, None),
            relay_in: HashMap::new(),
            relay_limits: RelayLimits::default(),
            next_housekeeping: None,
            housekeeping_count: 0,
            level_config: LevelConfig::default(),
            shard: 0,
            node_peers: None,
        }
    }

    /// The same engine as shard `shard` of a node whose shards share `node_peers` (the
    /// number of peers on all of them, bounded by [`EngineConfig::max_peers`]).
    pub fn with_shard(mut self, shard: usize, node_peers: Arc<AtomicUsize>) -> Self {
        self.shard = shard;
        self.node_peers = Some(node_peers);
        self
    }

    /// The same engine with data-path limits other than the defaults.
    pub fn with_limits(mut self, limits: EngineLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Wall-clock microseconds at `now` (from the configured anchor).
    fn wall_us(&self, now: Instant) -> u64 {
        let (at, us) = self.config.wall_anchor;
        if now >= at {
            us + now.duration_since(at).as_micros() as u64
        } else {
            us.saturating_sub(at.duration_since(now).as_micros() as u64)
        }
    }

    /// Number of live peer connections.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The earliest instant at which [`Engine::handle_timeout`] must be called.
    ///
    /// `O(relayed tracks)`: the peers' deadlines come from the top of the timer heap.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        if !self.queue.dead.is_empty() {
            return now;
        }
        let mut t = now + IDLE_TICK;
        if let Some(h) = self.next_housekeeping {
            t = t.min(h);
        }
        if let Some(p) = self.queue.timers.peek() {
            t = t.min(p);
        }
        for k in self.relay_in.values() {
            if let Some(r) = self.tracks.get(k).and_then(|f| f.receiver.as_ref()) {
                if let Some(d) = r.poll_timeout() {
                    t = t.min(d.max(now));
                }
            }
        }
        t
    }

    /// Drive time forward: every peer whose deadline passed gets a timeout input.
    ///
    /// Only the peers due at `now` are touched (popped from the timer heap); a peer whose
    /// deadline comes due again while this runs waits for the next call.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut dyn Output) {
        let mut due = std::mem::take(&mut self.queue.due);
        self.queue.timers.pop_due(now, &mut due);
        for (at, id) in due.drain(..) {
            let Some(peer) = self.peers.get_mut(&id) else {
                continue; // the peer is gone: a stale entry
            };
            if peer.scheduled != Some(at) {
                continue; // superseded by an earlier entry
            }
            peer.scheduled = None;
            if peer.next_timeout > now {
                // The deadline moved later after this entry was pushed.
                let next = peer.next_timeout;
                self.queue.timers.schedule(id, &mut peer.scheduled, next);
                continue;
            }
            Self::timeout_and_drain(now, id, peer, &mut self.queue, out);
        }
        self.queue.due = due;
        if self.queue.timers.heap.len() > 2 * self.peers.len() + 1024 {
            self.rebuild_timers();
        }
        self.process_queue(now, out);
        self.poll_relays(now, out);
        self.reap_dead(out);
        match self.next_housekeeping {
            None => self.next_housekeeping = Some(now + HOUSEKEEPING),
            Some(h) if h <= now => {
                self.housekeeping(now, out);
                self.next_housekeeping = Some(now + HOUSEKEEPING);
            }
            _ => {}
        }
    }

    /// Drop every stale timer entry: one fresh entry per peer. `O(n)`, rare.
    fn rebuild_timers(&mut self) {
        self.queue.timers.heap.clear();
        for (id, p) in self.peers.iter_mut() {
            p.scheduled = None;
            self.queue
                .timers
                .schedule(*id, &mut p.scheduled, p.next_timeout);
        }
    }

    /// Feed one received datagram.
    ///
    /// The owning peer is found, cheapest first: the source-address cache (one hash lookup,
    /// the case of nearly every packet); for a STUN request from a new address, the peer
    /// whose ICE ufrag it names; for anything else from an unknown address, a scan over all
    /// peers, allowed only `fallback_scans_per_sec` times per second (str0m accepts media
    /// from an address only after ICE saw it, so this is the rare start-of-connection case
    /// of a second candidate pair).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
        out: &mut dyn Output,
    ) {
        let ufrag = stun_local_ufrag(contents);
        let Ok(parsed) = contents.try_into() else {
            METRICS.inc_dropped_packets();
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto,
                source,
                destination,
                contents: parsed,
            },
        );

        let id = match self.by_addr.get(&source) {
            Some(id) if self.peers.get(id).is_some_and(|p| p.rtc.accepts(&input)) => *id,
            _ => {
                let found = match ufrag {
                    Some(u) => self
                        .by_ufrag
                        .get(u)
                        .copied()
                        .filter(|id| self.peers.get(id).is_some_and(|p| p.rtc.accepts(&input))),
                    None if self.take_scan(now) => self
                        .peers
                        .iter()
                        .find(|(_, p)| p.rtc.accepts(&input))
                        .map(|(id, _)| *id),
                    None => None,
                };
                let Some(id) = found else {
                    METRICS.inc_dropped_packets();
                    return;
                };
                // Cache the address only where remove_peer will find it again.
                if let Some(p) = self.peers.get_mut(&id) {
                    if !p.remote_addrs.contains(&source) && p.remote_addrs.len() < 8 {
                        p.remote_addrs.push(source);
                    }
                    if p.remote_addrs.contains(&source) && self.by_addr.len() < MAX_ADDR_CACHE {
                        self.by_addr.insert(source, id);
                    }
                }
                id
            }
        };
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.last_rx = now;
            if let Err(e) = peer.rtc.handle_input(input) {
                tracing::debug!(peer = id.0, error = %e, "input rejected");
            }
            Self::drain(id, peer, &mut self.queue, out);
        }
        self.process_queue(now, out);
    }

    /// Take one fallback scan from this second's budget (`fallback_scans_per_sec`).
    fn take_scan(&mut self, now: Instant) -> bool {
        let (left, refill) = &mut self.scan_budget;
        if refill.is_none_or(|r| now >= r) {
            *left = self.limits.fallback_scans_per_sec;
            *refill = Some(now + Duration::from_secs(1));
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    /// Apply one control command.
    pub fn handle_command(&mut self, now: Instant, cmd: Command, out: &mut dyn Output) {
        match cmd {
            Command::AddPeer {
                peer, role, reply, ..
            } => {
                let r = self.add_peer(now, peer, role, out);
                let _ = reply.send(r);
            }
            Command::RemovePeer { peer } => self.remove_peer(peer, out),
            Command::PublisherOffer {
                peer,
                sdp,
                bind,
                unbind,
                reply,
            } => {
                let r = self.publisher_offer(now, peer, &sdp, bind, unbind, out);
                let _ = reply.send(r);
            }
            Command::SubscriberAnswer { peer, sdp, reply } => {
                let r = self.subscriber_answer(now, peer, &sdp, out);
                let _ = reply.send(r);
            }
            Command::RemoteCandidate { peer, candidate } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    match Candidate::from_sdp_string(&candidate) {
                        Ok(c) => {
                            p.rtc.add_remote_candidate(c);
                            Self::drain(peer, p, &mut self.queue, out);
                        }
                        Err(e) => {
                            tracing::debug!(peer = peer.0, error = %e, "bad remote candidate")
                        }
                    }
                }
            }
            Command::Subscribe {
                sub,
                track,
                stream_id,
                track_id,
            } => self.subscribe(now, sub, track, stream_id, track_id, out),
            Command::Unsubscribe { sub, track } => self.unsubscribe(now, sub, track, out),
            Command::UnbindTrack { track } => self.unbind_track(now, track, out),
            Command::SendData {
                peer,
                reliable,
                data,
            } => self.send_data(peer, reliable, &data, out),
            Command::RequestKeyframe { track } => self.request_keyframe(now, track, None, out),
            Command::SetTrackSettings {
                sub,
                track,
                max_rank,
                fps,
            } => {
                if let Some(p) = self.peers.get_mut(&sub) {
                    if let Some(o) = p.media_out.iter_mut().find(|o| o.track == track) {
                        let was = o.allowed_rank();
                        o.max_rank = max_rank;
                        o.fps = fps;
                        if was == 0 && o.allowed_rank() > 0 {
                            o.need_keyframe = o.kind == MediaKind::Video;
                        }
                    }
                }
                self.allocate_peer(now, sub, out);
            }
            Command::RelayIn {
                track,
                node,
                flow,
                video,
            } => {
                let kind = if video {
                    MediaKind::Video
                } else {
                    MediaKind::Audio
                };
                let mut ft = FwdTrack::new(PeerId(0), Mid::from("relay"), kind);
                ft.relay_src = Some((node, flow));
                ft.receiver = Some(RelayReceiver::new(flow, self.relay_limits));
                self.tracks.insert(track, ft);
                self.relay_in.insert((node, flow), track);
            }
            Command::RelayRebind { track, node, flow } => {
                self.relay_rebind(now, track, node, flow, out)
            }
            Command::RelayOut {
                track,
                node,
                on,
                max_rank,
            } => {
                let mut fresh = false;
                if let Some(ft) = self.tracks.get_mut(&track) {
                    match ft.relay_outs.iter_mut().find(|o| o.node == node) {
                        // An existing flow keeps its sequence numbers; only the layers change.
                        Some(o) if on => {
                            fresh = max_rank > o.max_rank;
                            o.max_rank = max_rank.clamp(1, 3);
                        }
                        Some(_) => ft.relay_outs.retain(|o| o.node != node),
                        None if on => {
                            fresh = true;
                            ft.relay_outs.push(OutLink {
                                node,
                                sender: RelaySender::new(track.0, self.relay_limits),
                                max_rank: max_rank.clamp(1, 3),
                                cap: 3,
                                cap_until: None,
                            });
                        }
                        None => {}
                    }
                }
                if fresh {
                    // A new downstream, or a newly needed layer, starts with a keyframe.
                    self.request_keyframe(now, track, None, out);
                }
            }
            Command::RelayConnection { .. } => {}
        }
        self.process_queue(now, out);
    }

    /// Re-parenting (`Command::RelayRebind`): feed relayed `track` from `(node, flow)` from now
    /// on, keeping its subscribers and downstream links. Frames lost in the switch are never
    /// repaired (the old link is gone), so local video subscribers wait for a keyframe and
    /// one is requested from the new upstream at once (the per-layer throttle is reset: the
    /// old requests went to a dead link).
    fn relay_rebind(
        &mut self,
        now: Instant,
        track: TrackKey,
        node: u64,
        flow: u64,
        out: &mut dyn Output,
    ) {
        let Some(ft) = self.tracks.get_mut(&track) else {
            return;
        };
        if ft.relay_src == Some((node, flow)) {
            return;
        }
        if let Some(old) = ft.relay_src.replace((node, flow)) {
            self.relay_in.remove(&old);
        }
        ft.receiver = Some(RelayReceiver::new(flow, self.relay_limits));
        ft.last_keyframe_request.clear();
        let video = ft.kind == MediaKind::Video;
        for sub in &ft.subscribers {
            if let Some(o) = self
                .peers
                .get_mut(sub)
                .and_then(|p| p.media_out.iter_mut().find(|o| o.track == track))
            {
                o.need_keyframe = video;
            }
        }
        self.relay_in.insert((node, flow), track);
        self.request_keyframe(now, track, None, out);
    }

    /// One datagram from the relay connection of cluster node `node`.
    pub fn handle_relay_datagram(
        &mut self,
        now: Instant,
        node: u64,
        buf: &[u8],
        out: &mut dyn Output,
    ) {
        RELAY_METRICS.datagrams_received.fetch_add(1, Relaxed);
        let d = match relay::decode(buf) {
            Ok(d) => d,
            Err(e) => {
                RELAY_METRICS.garbage.fetch_add(1, Relaxed);
                tracing::debug!(node, error = %e, "bad relay datagram");
                return;
            }
        };
        // A cluster runs one forwarding mode; the other mode's media datagrams are refused.
        let media_in_other_mode = match &d {
            relay::Datagram::Fragment(_) => self.config.rtp_mode,
            relay::Datagram::Rtp(_) | relay::Datagram::Params { .. } => !self.config.rtp_mode,
            _ => false,
        };
        if media_in_other_mode {
            RELAY_METRICS.garbage.fetch_add(1, Relaxed);
            return;
        }
        match d {
            relay::Datagram::Fragment(f) => {
                let Some(track) = self.relay_in.get(&(node, f.flow)).copied() else {
                    return;
                };
                if let Some(r) = self
                    .tracks
                    .get_mut(&track)
                    .and_then(|t| t.receiver.as_mut())
                {
                    r.on_fragment(now, &f);
                }
                self.poll_relay(now, track, out);
            }
            relay::Datagram::Params {
                flow,
                seq,
                pt,
                params,
            } => {
                let Some(track) = self.relay_in.get(&(node, flow)).copied() else {
                    return;
                };
                let Some(ft) = self.tracks.get_mut(&track) else {
                    return;
                };
                if let Some(r) = ft.receiver.as_mut() {
                    r.on_rtp_seq(seq);
                }
                let pt = Pt::new_with_value(pt);
                if ft
                    .pts
                    .iter()
                    .any(|i| i.pt == pt && i.json.as_deref() == Some(params))
                {
                    return;
                }
                match serde_json::from_slice::<PayloadParams>(params) {
                    Ok(p) => {
                        ft.pts.retain(|i| i.pt != pt);
                        if ft.pts.len() >= MAX_PTS {
                            ft.pts.remove(0);
                        }
                        ft.pts.push(PtInfo {
                            pt,
                            params: p,
                            kind: PayloadKind::of(p.spec().codec),
                            json: Some(params.into()),
                        });
                    }
                    Err(e) => {
                        RELAY_METRICS.garbage.fetch_add(1, Relaxed);
                        tracing::debug!(error = %e, "bad relayed codec parameters");
                    }
                }
            }
            relay::Datagram::Rtp(r) => {
                let Some(track) = self.relay_in.get(&(node, r.flow)).copied() else {
                    return;
                };
                let Some(ft) = self.tracks.get_mut(&track) else {
                    return;
                };
                let fresh = ft.receiver.as_mut().is_none_or(|rx| rx.on_rtp_seq(r.seq));
                if !fresh {
                    return;
                }
                let pt = Pt::new_with_value(r.pt);
                let Some(info) = ft.pts.iter().find(|i| i.pt == pt) else {
                    // No codec parameters yet: they come with the next keyframe.
                    self.request_keyframe(now, track, None, out);
                    self.poll_relay(now, track, out);
                    return;
                };
                let (params, kind) = (info.params, info.kind);
                let (vp8, mut svc, _) = read_payload(kind, r.payload, r.rtp_ts, r.marker);
                // The dependency descriptor crossed the link byte for byte: this node drops
                // AV1 SVC layers per subscriber exactly like the publisher's node.
                let dd = r.dd.map(|d| Arc::new(DdBytes(d.into())));
                let rid = r.rid.map(Rid::from);
                let structure = &mut ft.dd_structures[rid_index(rid.as_ref())];
                if kind == PayloadKind::Av1 {
                    svc = av1_layer(structure, dd.as_deref(), r.keyframe, r.rtp_ts, r.marker);
                }
                let temporal = temporal_of(kind, vp8, svc.as_ref(), dd.as_deref(), structure);
                let input = RtpIn {
                    rid,
                    pt,
                    params,
                    kind,
                    seq: r.rtp_seq,
                    ts: r.rtp_ts,
                    marker: r.marker,
                    keyframe: r.keyframe,
                    vp8,
                    svc,
                    temporal,
                    dd,
                    audio_level: r.audio_level,
                    voice_activity: r.voice_activity,
                    video_orientation: None,
                    payload: r.payload.into(),
                };
                let wall = self.wall_us(now);
                if r.ingest_us > 0 && wall >= r.ingest_us && wall - r.ingest_us < 60_000_000 {
                    RELAY_METRICS.transit_count.fetch_add(1, Relaxed);
                    RELAY_METRICS
                        .transit_us_sum
                        .fetch_add(wall - r.ingest_us, Relaxed);
                }
                self.forward_rtp(now, track, &input, Some(r.ingest_us), out);
                self.poll_relay(now, track, out);
            }
            relay::Datagram::Nack { flow, seqs } => {
                let Some(ft) = self.tracks.get_mut(&TrackKey(flow)) else {
                    return;
                };
                if let Some(o) = ft.relay_outs.iter_mut().find(|o| o.node == node) {
                    for d in o.sender.on_nack(&seqs) {
                        RELAY_METRICS.datagrams_sent.fetch_add(1, Relaxed);
                        out.relay(node, &d);
                    }
                }
            }
            relay::Datagram::Congestion {
                flow,
                loss_permille,
            } => {
                // Shed this link's highest layer (never the lowest) and hold it off.
                if let Some(ft) = self.tracks.get_mut(&TrackKey(flow)) {
                    let video = ft.kind == MediaKind::Video;
                    if let Some(o) = ft.relay_outs.iter_mut().find(|o| o.node == node) {
                        let sending = o.sending();
                        if video && sending > 1 {
                            o.cap = sending - 1;
                            RELAY_METRICS.layers_shed.fetch_add(1, Relaxed);
                            tracing::info!(
                                node,
                                flow,
                                loss_permille,
                                cap = o.cap,
                                "relay link congested: shedding a layer"
                            );
                        }
                        o.cap_until = Some(now + relay::CONGESTION_HOLD);
                    }
                }
            }
            relay::Datagram::Keyframe { flow, rank } => {
                RELAY_METRICS
                    .keyframe_requests_received
                    .fetch_add(1, Relaxed);
                let track = TrackKey(flow);
                let relayed_to_them = self
                    .tracks
                    .get(&track)
                    .is_some_and(|t| t.relay_outs.iter().any(|o| o.node == node));
                if relayed_to_them {
                    let rid = match rank {
                        0 => None,
                        r => self.tracks.get(&track).and_then(|t| {
                            t.layers
                                .iter()
                                .map(|(rid, _)| *rid)
                                .find(|rid| rid_rank(rid) == r)
                        }),
                    };
                    self.request_keyframe(now, track, rid, out);
                }
            }
        }
        self.process_queue(now, out);
    }

    /// Timers of every relayed track: NACK retries and hold expiry.
    fn poll_relays(&mut self, now: Instant, out: &mut dyn Output) {
        let keys: Vec<TrackKey> = self.relay_in.values().copied().collect();
        for k in keys {
            self.poll_relay(now, k, out);
        }
    }

    /// Sends the NACKs a relayed track's receiver wants and forwards the frames it released.
    fn poll_relay(&mut self, now: Instant, track: TrackKey, out: &mut dyn Output) {
        let Some(ft) = self.tracks.get_mut(&track) else {
            return;
        };
        let (Some((node, flow)), Some(r)) = (ft.relay_src, ft.receiver.as_mut()) else {
            return;
        };
        let nacks = r.poll_nacks(now);
        if !nacks.is_empty() {
            out.relay(node, &relay::encode_nack(flow, &nacks));
        }
        let frames = r.poll_frames(now);
        for f in frames {
            let Some(ft) = self.tracks.get_mut(&track) else {
                return;
            };
            if let Some(p) = &f.params {
                let stale = ft.params.as_ref().is_none_or(|(_, b)| b != p);
                if stale {
                    match serde_json::from_slice::<PayloadParams>(p) {
                        Ok(params) => ft.params = Some((params, p.clone())),
                        Err(e) => {
                            RELAY_METRICS.garbage.fetch_add(1, Relaxed);
                            tracing::debug!(error = %e, "bad relayed codec parameters");
                        }
                    }
                }
            }
            let Some((params, _)) = ft.params.as_ref() else {
                // No codec parameters yet: they come with the next keyframe.
                self.request_keyframe(now, track, None, out);
                continue;
            };
            let params = *params;
            let spec = params.spec();
            let clock = Frequency::new(spec.clock_rate.get()).unwrap_or(Frequency::NINETY_KHZ);
            let data = MediaData {
                mid: ft.mid,
                pt: params.pt(),
                rid: f.rid,
                params,
                time: MediaTime::new(f.time, clock),
                network_time: now,
                seq_range: str0m::rtp::SeqNo::from(0)..=str0m::rtp::SeqNo::from(0),
                contiguous: f.contiguous,
                data: f.payload,
                ext_vals: ExtensionValues {
                    audio_level: f.audio_level,
                    ..Default::default()
                },
                codec_extra: CodecExtra::None,
                last_sender_info: None,
                audio_start_of_talk_spurt: false,
            };
            if !f.contiguous && ft.kind == MediaKind::Video {
                self.request_keyframe(now, track, data.rid, out);
            }
            let wall = self.wall_us(now);
            if f.ingest_us > 0 && wall >= f.ingest_us && wall - f.ingest_us < 60_000_000 {
                RELAY_METRICS.transit_count.fetch_add(1, Relaxed);
                RELAY_METRICS
                    .transit_us_sum
                    .fetch_add(wall - f.ingest_us, Relaxed);
            }
            self.forward_track(now, track, data, f.keyframe, Some(f.ingest_us), out);
        }
    }

    fn add_peer(
        &mut self,
        now: Instant,
        id: PeerId,
        role: PeerRole,
        out: &mut dyn Output,
    ) -> Result<(), MediaError> {
        if self.peers.contains_key(&id) {
            return Err(MediaError::DuplicatePeer(id.0));
        }
        let max = self.config.max_peers;
        let full = match &self.node_peers {
            // Reserve a place in the node-wide count (shards add peers concurrently).
            Some(n) => n
                .fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |c| {
                    (c < max).then_some(c + 1)
                })
                .is_err(),
            None => self.peers.len() >= max,
        };
        if full {
            return Err(MediaError::TooManyPeers(max));
        }
        let mut cfg = RtcConfig::new()
            .set_ice_lite(true)
            .enable_opus(true, false)
            .set_stats_interval(Some(Duration::from_secs(1)))
            .set_reordering_size_video(VIDEO_REORDER_PACKETS)
            .set_send_buffer_video(self.limits.rtx_packets_video.max(1))
            .set_send_buffer_audio(self.limits.rtx_packets_audio.max(1))
            .set_rtp_mode(self.config.rtp_mode);
        if self.config.rtp_mode {
            // The AV1 dependency descriptor: read from publishers (layers of an AV1 SVC
            // stream), passed on to subscribers unchanged.
            cfg = cfg.set_extension(
                DD_EXTENSION_ID,
                Extension::with_serializer(rtpfwd::DD_URI, DdSerializer),
            );
        }
        if role == PeerRole::Subscriber {
            cfg = cfg.enable_bwe(Some(Bitrate::kbps(BWE_INITIAL_KBPS)));
        }
        // Every local ufrag starts with the shard's number, so the node's one ICE-TCP
        // listener can hand a connection to this shard (`media::shard`).
        let mut creds = IceCreds::new();
        creds.ufrag = format!("{}{}", shard::ufrag_prefix(self.shard), creds.ufrag);
        cfg = cfg.set_local_ice_credentials(creds);
        let mut rtc = cfg.build(now);
        for c in &self.config.candidates {
            rtc.add_local_candidate(c.clone());
        }
        let local_ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let mut peer = Peer {
            rtc,
            role,
            next_timeout: now,
            scheduled: None,
            local_ufrag,
            media_in: HashMap::new(),
            media_out: Vec::new(),
            pending: None,
            initial_offer_done: false,
            reliable: None,
            lossy: None,
            channels: HashMap::new(),
            connected: false,
            remote_addrs: Vec::new(),
            nacks: Default::default(),
            bwe_bps: None,
            last_rx: now,
            link: LinkStats::default(),
            nack_seen: HashMap::new(),
            window: (0, 0),
            recovery: Recovery::default(),
            last_alloc_bwe: None,
            ssrcs: Vec::new(),
        };
        Self::drain(id, &mut peer, &mut self.queue, out);
        self.by_ufrag.insert(peer.local_ufrag.clone(), id);
        self.peers.insert(id, peer);
        if role == PeerRole::Subscriber {
            self.negotiate(id, out);
        }
        Ok(())
    }

    fn remove_peer(&mut self, id: PeerId, out: &mut dyn Output) {
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        if let Some(n) = &self.node_peers {
            n.fetch_sub(1, AtomicOrdering::Relaxed);
        }
        peer.rtc.disconnect();
        if self.by_ufrag.get(&peer.local_ufrag) == Some(&id) {
            self.by_ufrag.remove(&peer.local_ufrag);
        }
        for a in &peer.remote_addrs {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        // Tracks published on this peer stop; subscribers are told through the control plane,
        // which sends UnbindTrack. Forwarding simply stops here.
        for t in peer.media_in.values() {
            if let Some(ft) = self.tracks.get(t) {
                if ft.publisher == id {
                    let track = *t;
                    let subs = ft.subscribers.clone();
                    self.tracks.remove(&track);
                    for s in subs {
                        self.mark_out_stopped(s, track, out);
                    }
                }
            }
        }
        for o in &peer.media_out {
            if let Some(ft) = self.tracks.get_mut(&o.track) {
                ft.subscribers.retain(|s| *s != id);
            }
        }
        out.event(id, PeerEvent::Closed);
    }

    fn publisher_offer(
        &mut self,
        now: Instant,
        id: PeerId,
        sdp: &str,
        bind: Vec<(String, TrackKey)>,
        unbind: Vec<TrackKey>,
        out: &mut dyn Output,
    ) -> Result<String, MediaError> {
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| MediaError::Sdp(e.to_string()))?;
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or(MediaError::UnknownPeer(id.0))?;
        if peer.role != PeerRole::Publisher {
            return Err(MediaError::WrongRole("offer on a subscriber connection"));
        }
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| MediaError::Sdp(e.to_string()))?;
        Self::drain(id, peer, &mut self.queue, out);
        for (mid, track) in bind {
            let mid = Mid::from(mid.as_str());
            let kind = peer
                .rtc
                .media(mid)
                .map(|m| m.kind())
                .unwrap_or(MediaKind::Video);
            peer.media_in.insert(mid, track);
            self.tracks.insert(track, FwdTrack::new(id, mid, kind));
        }
        for track in unbind {
            self.unbind_track(now, track, out);
        }
        // The client encodes with the first codec of the answer: keep its preference.
        Ok(super::sdp::order_answer_like_offer(
            sdp,
            &answer.to_sdp_string(),
        ))
    }

    fn subscriber_answer(
        &mut self,
        now: Instant,
        id: PeerId,
        sdp: &str,
        out: &mut dyn Output,
    ) -> Result<(), MediaError> {
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| MediaError::Sdp(e.to_string()))?;
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or(MediaError::UnknownPeer(id.0))?;
        let Some(pending) = peer.pending.take() else {
            return Err(MediaError::NoPendingOffer);
        };
        peer.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| MediaError::Sdp(e.to_string()))?;
        let mut opened = Vec::new();
        let mut opened_mids = Vec::new();
        for o in &mut peer.media_out {
            if let OutState::Negotiating(m) = o.state {
                o.state = OutState::Open(m);
                o.tx_ssrc = None;
                o.need_keyframe = o.kind == MediaKind::Video;
                opened.push(o.track);
                opened_mids.push((m, o.kind));
            }
        }
        peer.media_out
            .retain(|o| !matches!(o.state, OutState::NegotiatingStop(_)));
        Self::limit_send_history(peer, &opened_mids, &self.limits);
        Self::drain(id, peer, &mut self.queue, out);
        for track in opened {
            self.request_keyframe(now, track, None, out);
        }
        self.negotiate(id, out);
        Ok(())
    }

    /// Bound the retransmission history of a subscriber's outgoing streams by time
    /// (`rtx_history`; str0m keeps 3 s) as well as by count (`rtx_packets_*`, set when the
    /// `Rtc` was built). The history is most of what a subscription costs in memory.
    /// Re-applying it to a stream empties that stream's history, so only streams whose
    /// m-line just opened are touched (their history is empty anyway).
    fn limit_send_history(peer: &mut Peer, opened: &[(Mid, MediaKind)], limits: &EngineLimits) {
        let mut api = peer.rtc.direct_api();
        for &(mid, kind) in opened {
            let packets = if kind == MediaKind::Audio {
                limits.rtx_packets_audio
            } else {
                limits.rtx_packets_video
            };
            if let Some(tx) = api.stream_tx_by_mid(mid, None) {
                tx.set_rtx_cache(packets.max(1), limits.rtx_history, Some(RTX_RATIO_CAP));
            }
        }
    }

    fn subscribe(
        &mut self,
        now: Instant,
        sub: PeerId,
        track: TrackKey,
        stream_id: String,
        track_id: String,
        out: &mut dyn Output,
    ) {
        let Some(ft) = self.tracks.get_mut(&track) else {
            tracing::debug!(track = track.0, "subscribe to unknown track");
            return;
        };
        let kind = ft.kind;
        let Some(peer) = self.peers.get_mut(&sub) else {
            return;
        };
        if peer.media_out.iter().any(|o| {
            o.track == track
                && !matches!(o.state, OutState::ToStop(_) | OutState::NegotiatingStop(_))
        }) {
            return;
        }
        if !ft.subscribers.contains(&sub) {
            ft.subscribers.push(sub);
        }
        peer.media_out.push(OutTrack {
            track,
            kind,
            stream_id,
            track_id,
            state: OutState::ToOpen,
            rid: None,
            need_keyframe: kind == MediaKind::Video,
            max_rank: 3,
            fps: 0,
            temporal: TemporalSelector::default(),
            alloc: Decision::Layer(u8::MAX),
            reported_paused: false,
            ts_offset: 0,
            last_out: None,
            down_votes: 0,
            rw: Rewriter::default(),
            svc: SvcSelector::default(),
            held: None,
            pt_map: Vec::new(),
            tx_ssrc: None,
        });
        let _ = now;
        self.negotiate(sub, out);
    }

    fn unsubscribe(&mut self, _now: Instant, sub: PeerId, track: TrackKey, out: &mut dyn Output) {
        if let Some(ft) = self.tracks.get_mut(&track) {
            ft.subscribers.retain(|s| *s != sub);
        }
        self.mark_out_stopped(sub, track, out);
    }

    /// Mark the subscriber's out-track for `track` as to be stopped and renegotiate.
    fn mark_out_stopped(&mut self, sub: PeerId, track: TrackKey, out: &mut dyn Output) {
        let Some(peer) = self.peers.get_mut(&sub) else {
            return;
        };
        peer.media_out.retain_mut(|o| {
            if o.track != track {
                return true;
            }
            match o.state {
                OutState::ToOpen => false,
                OutState::Negotiating(m) | OutState::Open(m) => {
                    o.state = OutState::ToStop(m);
                    true
                }
                _ => true,
            }
        });
        self.negotiate(sub, out);
    }

    fn unbind_track(&mut self, _now: Instant, track: TrackKey, out: &mut dyn Output) {
        let Some(ft) = self.tracks.remove(&track) else {
            return;
        };
        if let Some(src) = ft.relay_src {
            self.relay_in.remove(&src);
        }
        if let Some(p) = self.peers.get_mut(&ft.publisher) {
            p.media_in.remove(&ft.mid);
        }
        for s in ft.subscribers {
            self.mark_out_stopped(s, track, out);
        }
    }

    fn send_data(&mut self, id: PeerId, reliable: bool, data: &[u8], out: &mut dyn Output) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let cid = if reliable { peer.reliable } else { peer.lossy };
        let Some(cid) = cid else {
            METRICS.inc_dropped_data();
            return;
        };
        if let Some(mut ch) = peer.rtc.channel(cid) {
            match ch.write(true, data) {
                Ok(true) => {}
                Ok(false) | Err(_) => METRICS.inc_dropped_data(),
            }
        } else {
            METRICS.inc_dropped_data();
        }
        Self::drain(id, peer, &mut self.queue, out);
    }

    /// Ask the publisher of `track` for a keyframe, coalesced per layer.
    fn request_keyframe(
        &mut self,
        now: Instant,
        track: TrackKey,
        rid: Option<Rid>,
        out: &mut dyn Output,
    ) {
        let Some(ft) = self.tracks.get_mut(&track) else {
            return;
        };
        if ft.kind != MediaKind::Video {
            return;
        }
        let rids: Vec<Option<Rid>> = if rid.is_some() {
            vec![rid]
        } else if ft.layers.is_empty() {
            vec![None]
        } else {
            ft.layers.iter().map(|(r, _)| Some(*r)).collect()
        };
        if let Some((node, flow)) = ft.relay_src {
            // Relayed: one request upstream per layer per interval (coalesced per hop).
            for r in rids {
                if let Some(last) = ft.last_keyframe_request.get(&r) {
                    if now.saturating_duration_since(*last) < KEYFRAME_REQUEST_INTERVAL {
                        continue;
                    }
                }
                ft.last_keyframe_request.insert(r, now);
                RELAY_METRICS.keyframe_requests_sent.fetch_add(1, Relaxed);
                out.relay(
                    node,
                    &relay::encode_keyframe(flow, r.as_ref().map_or(0, rid_rank)),
                );
            }
            return;
        }
        let Some(peer) = self.peers.get_mut(&ft.publisher) else {
            return;
        };
        for r in rids {
            if let Some(last) = ft.last_keyframe_request.get(&r) {
                if now.saturating_duration_since(*last) < KEYFRAME_REQUEST_INTERVAL {
                    continue;
                }
            }
            ft.last_keyframe_request.insert(r, now);
            if self.config.rtp_mode {
                // RTP mode has no `Writer`: ask the receive stream of the layer directly.
                let mut api = peer.rtc.direct_api();
                if let Some(rx) = api.stream_rx_by_mid(ft.mid, r) {
                    rx.request_keyframe(KeyframeRequestKind::Pli);
                    METRICS.inc_plis();
                }
            } else if let Some(mut w) = peer.rtc.writer(ft.mid) {
                if w.request_keyframe(r, KeyframeRequestKind::Pli).is_ok() {
                    METRICS.inc_plis();
                }
            }
            Self::drain(ft.publisher, peer, &mut self.queue, out);
        }
    }

    /// Make an offer on a subscriber peer if it has pending changes and no offer in flight.
    fn negotiate(&mut self, id: PeerId, out: &mut dyn Output) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.role != PeerRole::Subscriber || peer.pending.is_some() {
            return;
        }
        let mut change = peer.rtc.sdp_api();
        if !peer.initial_offer_done {
            peer.reliable = Some(change.add_channel_with_config(ChannelConfig {
                label: "_reliable".into(),
                ordered: true,
                reliability: Reliability::Reliable,
                ..Default::default()
            }));
            peer.lossy = Some(change.add_channel_with_config(ChannelConfig {
                label: "_lossy".into(),
                ordered: false,
                reliability: Reliability::MaxRetransmits { retransmits: 0 },
                ..Default::default()
            }));
            peer.initial_offer_done = true;
        }
        for o in &mut peer.media_out {
            match o.state {
                OutState::ToOpen => {
                    let mid = change.add_media(
                        o.kind,
                        Direction::SendOnly,
                        Some(o.stream_id.clone()),
                        Some(o.track_id.clone()),
                        None,
                    );
                    o.state = OutState::Negotiating(mid);
                }
                OutState::ToStop(mid) => {
                    change.stop_media(mid);
                    o.state = OutState::NegotiatingStop(mid);
                }
                _ => {}
            }
        }
        if !change.has_changes() {
            return;
        }
        let Some((offer, pending)) = change.apply() else {
            return;
        };
        peer.pending = Some(pending);
        let mut mid_to_track = Vec::new();
        for o in &peer.media_out {
            if let OutState::Negotiating(m) | OutState::Open(m) = o.state {
                mid_to_track.push((m.to_string(), o.track_id.clone()));
            }
        }
        Self::drain(id, peer, &mut self.queue, out);
        out.event(
            id,
            PeerEvent::Offer {
                sdp: offer.to_sdp_string(),
                mid_to_track,
            },
        );
    }

    /// The send stream of a subscriber's m-line `mid`, found by the SSRC remembered in
    /// `cache` (looked up by mid and remembered when missing or stale).
    ///
    /// The cache is cleared whenever the m-line (re)opens; a stale SSRC (a stream str0m
    /// removed) costs one packet, and the next lookup goes by mid again.
    fn stream_tx<'a>(
        api: &'a mut DirectApi<'_>,
        mid: Mid,
        cache: &mut Option<Ssrc>,
    ) -> Option<&'a mut str0m::rtp::StreamTx> {
        let ssrc = match *cache {
            Some(s) => s,
            None => {
                let s = api.stream_tx_by_mid(mid, None)?.ssrc();
                *cache = Some(s);
                s
            }
        };
        let tx = api.stream_tx(&ssrc);
        if tx.is_none() {
            *cache = None;
        }
        tx
    }

    /// Give a peer's `Rtc` a timeout input at `now`, then drain it: for a due timer, and
    /// right after writing RTP to a subscriber, to send what was just written (str0m
    /// time-stamps it in its send queue and the pacer releases it).
    ///
    /// Without that timeout input str0m answers a write with a due timeout, which costs a
    /// poll of the whole `Rtc`, a timer-heap round and a second timeout round; str0m's
    /// documentation allows a timeout input at any time.
    fn timeout_and_drain(
        now: Instant,
        id: PeerId,
        peer: &mut Peer,
        queue: &mut WorkQueue,
        out: &mut dyn Output,
    ) {
        METRICS.peer_timeouts.fetch_add(1, Relaxed);
        if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
            tracing::debug!(peer = id.0, error = %e, "timeout input failed");
            peer.rtc.disconnect();
        }
        Self::drain(id, peer, queue, out);
    }

    /// Poll one peer until it has nothing more to say. The only place that calls `poll_output`.
    fn drain(id: PeerId, peer: &mut Peer, queue: &mut WorkQueue, out: &mut dyn Output) {
        loop {
            if !peer.rtc.is_alive() {
                queue.mark_dead(id);
                return;
            }
            match peer.rtc.poll_output() {
                Ok(RtcOutput::Timeout(t)) => {
                    peer.next_timeout = t;
                    queue.timers.schedule(id, &mut peer.scheduled, t);
                    return;
                }
                Ok(RtcOutput::Transmit(t)) => {
                    out.transmit(t.proto, t.source, t.destination, &t.contents);
                }
                Ok(RtcOutput::Event(e)) => match e {
                    Event::Connected => {
                        peer.connected = true;
                        out.event(id, PeerEvent::Connected);
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        out.event(id, PeerEvent::IceDisconnected);
                    }
                    Event::MediaData(data) if peer.role == PeerRole::Publisher => {
                        queue.push_back(Pending::Media { from: id, data });
                    }
                    Event::RtpPacket(pkt) if peer.role == PeerRole::Publisher => {
                        queue.push_back(Pending::Rtp { from: id, pkt });
                    }
                    Event::KeyframeRequest(req) => {
                        queue.push_back(Pending::Keyframe {
                            sub: id,
                            mid: req.mid,
                        });
                    }
                    Event::ChannelOpen(cid, label) => {
                        let kind = match label.as_str() {
                            "_lossy" => ChanKind::Lossy,
                            "_reliable" => ChanKind::Reliable,
                            _ => ChanKind::Other,
                        };
                        peer.channels.insert(cid, kind);
                    }
                    Event::ChannelData(d) => {
                        // `_data_track` and unknown channels do not carry DataPackets.
                        let reliable = match peer.channels.get(&d.id) {
                            Some(ChanKind::Reliable) => true,
                            Some(ChanKind::Lossy) => false,
                            _ => continue,
                        };
                        out.event(
                            id,
                            PeerEvent::Data {
                                reliable,
                                data: d.data,
                            },
                        );
                    }
                    Event::ChannelClose(cid) => {
                        peer.channels.remove(&cid);
                    }
                    Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                        peer.bwe_bps = Some(estimate.as_u64());
                    }
                    Event::MediaEgressStats(st) => {
                        Self::count_nacks(peer, (st.mid, st.rid), st.packets, st.nacks);
                        let n = peer.nacks.delta((st.mid, st.rid, false), st.nacks);
                        METRICS
                            .nacks_received
                            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    Event::MediaIngressStats(st) => {
                        Self::count_nacks(peer, (st.mid, st.rid), st.packets, st.nacks);
                        let n = peer.nacks.delta((st.mid, st.rid, true), st.nacks);
                        METRICS
                            .nacks_sent
                            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    Event::PeerStats(st) => {
                        // Loss before repair: NACKed packets per packet over the last second.
                        // (RTCP's fraction-lost counts after RTX repaired the gaps.)
                        let (packets, nacks) = std::mem::take(&mut peer.window);
                        let nack_loss = if packets >= 20 {
                            (nacks as f32 / packets as f32).min(1.0)
                        } else {
                            0.0
                        };
                        let loss = nack_loss
                            .max(st.egress_loss_fraction.unwrap_or(0.0))
                            .max(st.ingress_loss_fraction.unwrap_or(0.0));
                        // Smooth: one lossy second should move the figure, not own it.
                        peer.link.loss = 0.5 * peer.link.loss + 0.5 * loss;
                        if let Some(rtt) = st.rtt {
                            peer.link.rtt = rtt;
                        }
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(peer = id.0, error = %e, "poll_output failed; disconnecting");
                    peer.rtc.disconnect();
                }
            }
        }
    }

    fn count_nacks(peer: &mut Peer, key: (Mid, Option<Rid>), packets: u64, nacks: u64) {
        let last = peer
            .nack_seen
            .insert(key, (packets, nacks))
            .unwrap_or((0, 0));
        peer.window.0 += packets.saturating_sub(last.0);
        peer.window.1 += nacks.saturating_sub(last.1);
    }

    fn process_queue(&mut self, now: Instant, out: &mut dyn Output) {
        while let Some(p) = self.queue.pop_front() {
            match p {
                Pending::Media { from, data } => self.forward(now, from, data, out),
                Pending::Rtp { from, pkt } => self.forward_rtp_from(now, from, pkt, out),
                Pending::Keyframe { sub, mid } => {
                    let Some(peer) = self.peers.get(&sub) else {
                        continue;
                    };
                    let Some(o) = peer.media_out.iter().find(|o| o.state.mid() == Some(mid)) else {
                        continue;
                    };
                    let (track, rid) = (o.track, o.rid);
                    self.request_keyframe(now, track, rid, out);
                }
            }
        }
    }

    /// Forward one media frame from a publisher to all subscribers of its track.
    fn forward(&mut self, now: Instant, from: PeerId, data: MediaData, out: &mut dyn Output) {
        let Some(publisher) = self.peers.get_mut(&from) else {
            return;
        };
        let Some(track) = publisher.media_in.get(&data.mid).copied() else {
            return;
        };
        let is_video = self
            .tracks
            .get(&track)
            .is_some_and(|f| f.kind == MediaKind::Video);
        if !data.contiguous && is_video {
            // A gap the receive buffer could not repair: ask for a fresh keyframe.
            self.request_keyframe(now, track, data.rid, out);
        }
        let is_keyframe = data.is_keyframe();
        self.forward_track(now, track, data, is_keyframe, None, out);
    }

    /// Forward one frame of `track` (from a local publisher or a relay link) to its local
    /// subscribers and its relay links.
    fn forward_track(
        &mut self,
        now: Instant,
        track: TrackKey,
        data: MediaData,
        is_keyframe: bool,
        ingest_us: Option<u64>,
        out: &mut dyn Output,
    ) {
        let ingest_us = ingest_us.unwrap_or_else(|| self.wall_us(now));
        let Some(ft) = self.tracks.get_mut(&track) else {
            return;
        };
        METRICS.add_received(data.data.len());
        if !ft.relay_outs.is_empty() {
            let stale = ft
                .params
                .as_ref()
                .is_none_or(|(p, _)| p.pt() != data.params.pt() || p.spec() != data.params.spec());
            if stale {
                if let Ok(json) = serde_json::to_vec(&data.params) {
                    ft.params = Some((data.params, json.into()));
                }
            }
            let frame = RelayFrame {
                rid: data.rid,
                time: data.time.numer(),
                ingest_us,
                keyframe: is_keyframe,
                audio_level: data.ext_vals.audio_level,
                params: None,
                payload: data.data.clone(),
                contiguous: data.contiguous,
            };
            let params = ft.params.as_ref().map(|(_, j)| j.clone());
            let rank = data.rid.as_ref().map_or(1, rid_rank);
            for o in ft.relay_outs.iter_mut() {
                if rank > o.sending() {
                    continue;
                }
                let max = out.relay_max(o.node);
                for d in o.sender.push(&frame, params.as_deref(), max) {
                    RELAY_METRICS.datagrams_sent.fetch_add(1, Relaxed);
                    out.relay(o.node, &d);
                }
            }
        }

        ft.observe_ingress(
            now,
            data.rid,
            data.data.len(),
            data.ext_vals.audio_level,
            &self.level_config,
        );
        // VP8 temporal layers (str0m reads the TID and the layer sync bit while it
        // depacketises; 0 without the T bit): measured here, thinned per subscriber below.
        let frame_ts = data.time.numer() as u32;
        let rates_at = rid_index(data.rid.as_ref());
        let vp8_layer = match data.codec_extra {
            CodecExtra::Vp8(e) => Some((e.layer_index, e.sync)),
            _ => None,
        };
        if let Some((tid, _)) = vp8_layer {
            ft.frame_rates[rates_at].observe(now, frame_ts, tid);
        }
        let mut want_keyframe: Option<Option<Rid>> = None;
        for sub in &ft.subscribers {
            let Some(peer) = self.peers.get_mut(sub) else {
                continue;
            };
            let Some(o) = peer.media_out.iter_mut().find(|o| o.track == track) else {
                continue;
            };
            let OutState::Open(mid) = o.state else {
                continue;
            };
            let allowed = if o.kind == MediaKind::Video {
                o.allowed_rank()
            } else {
                3
            };
            if allowed == 0 {
                continue;
            }
            if data.rid.is_some() {
                // Simulcast: one layer per subscriber, the best live one it may receive;
                // layers switch on a keyframe only.
                let mut best_fit: Option<(u8, Rid)> = None;
                let mut lowest: Option<(u8, Rid)> = None;
                for (r, seen) in &ft.layers {
                    if now.saturating_duration_since(*seen) >= LAYER_IDLE {
                        continue;
                    }
                    let rank = rid_rank(r);
                    if rank <= allowed && best_fit.is_none_or(|(b, _)| rank > b) {
                        best_fit = Some((rank, *r));
                    }
                    if lowest.is_none_or(|(l, _)| rank < l) {
                        lowest = Some((rank, *r));
                    }
                }
                let best = best_fit.or(lowest).map(|(_, r)| r);
                if o.rid != best && data.rid == best {
                    if is_keyframe {
                        o.rid = best;
                        o.need_keyframe = false;
                        // Another layer: another RTP timestamp base.
                        o.temporal.reset();
                        // Continue the outgoing timeline from the last frame written.
                        if let Some((last_ts, last_at)) = o.last_out {
                            let hz = data.time.frequency().get() as u64;
                            // At least one frame interval (30 fps) after the last frame written, so
                            // the receiver never sees two frames a fraction of a millisecond
                            // apart.
                            let gap = (now.saturating_duration_since(last_at).as_micros() as u64
                                * hz
                                / 1_000_000)
                                .max(hz / 30);
                            o.ts_offset = (last_ts + gap) as i64 - data.time.numer() as i64;
                        }
                    } else {
                        want_keyframe = Some(best);
                    }
                }
                if data.rid != o.rid {
                    continue;
                }
            }
            if o.need_keyframe {
                if !is_keyframe {
                    want_keyframe = Some(data.rid);
                    continue;
                }
                o.need_keyframe = false;
                o.temporal.reset();
            }
            if let (Some((tid, sync)), true) =
                (vp8_layer, o.fps > 0 || o.temporal.current().is_some())
            {
                // Frames above the temporal layer that gives the requested rate are not
                // written; str0m numbers the written ones (sequence and picture id) without
                // gaps, and a subscriber that joins a layer again does so at a sync frame.
                let target = if o.fps > 0 {
                    ft.frame_rates[rates_at].layer_for_fps(o.fps)
                } else {
                    ALL_TEMPORAL
                };
                let hint = if sync {
                    SwitchHint::LayerSync
                } else {
                    SwitchHint::None
                };
                if !o.temporal.select(target, tid, frame_ts, hint, is_keyframe) {
                    continue;
                }
            }
            let ts = (data.time.numer() as i64 + o.ts_offset).max(0) as u64;
            let time = MediaTime::new(ts, data.time.frequency());
            o.last_out = Some((ts, now));
            let Some(w) = peer.rtc.writer(mid) else {
                continue;
            };
            let Some(pt) = w.match_params(data.params) else {
                continue;
            };
            match w.write(pt, data.network_time, time, data.data.clone()) {
                Ok(()) => METRICS.add_forwarded(data.data.len()),
                Err(e) => {
                    tracing::debug!(peer = sub.0, error = %e, "write failed");
                    METRICS.inc_dropped_packets();
                }
            }
            Self::drain(*sub, peer, &mut self.queue, out);
        }
        if let Some(rid) = want_keyframe {
            self.request_keyframe(now, track, rid, out);
        }
    }

    /// RTP mode: one RTP packet from a local publisher. Finds its track (by the SSRC's mid)
    /// and codec (by payload type, from the publisher's negotiated codecs), reads what the
    /// forwarder needs from the payload once, and forwards it.
    fn forward_rtp_from(
        &mut self,
        now: Instant,
        from: PeerId,
        pkt: RtpPacket,
        out: &mut dyn Output,
    ) {
        let Some(publisher) = self.peers.get_mut(&from) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let (mid, rid) = match publisher.ssrcs.iter().find(|(s, _, _)| *s == ssrc) {
            Some(&(_, mid, rid)) => (mid, rid),
            None => {
                let mut api = publisher.rtc.direct_api();
                let Some((mid, rid)) = api.stream_rx(&ssrc).map(|s| (s.mid(), s.rid())) else {
                    return;
                };
                if publisher.ssrcs.len() >= MAX_SSRCS {
                    publisher.ssrcs.remove(0);
                }
                publisher.ssrcs.push((ssrc, mid, rid));
                (mid, rid)
            }
        };
        let Some(track) = publisher.media_in.get(&mid).copied() else {
            return;
        };
        let Some(ft) = self.tracks.get_mut(&track) else {
            return;
        };
        let pt = pkt.header.payload_type;
        let info = match ft.pts.iter().find(|i| i.pt == pt) {
            Some(i) => (i.params, i.kind),
            None => {
                let Some(params) = publisher.rtc.codec_config().find(|p| p.pt() == pt).copied()
                else {
                    METRICS.inc_dropped_packets();
                    return;
                };
                let kind = PayloadKind::of(params.spec().codec);
                if ft.pts.len() >= MAX_PTS {
                    ft.pts.remove(0);
                }
                ft.pts.push(PtInfo {
                    pt,
                    params,
                    kind,
                    json: serde_json::to_vec(&params).ok().map(Arc::from),
                });
                (params, kind)
            }
        };
        let (params, kind) = info;
        let (vp8, mut svc, keyframe) =
            read_payload(kind, &pkt.payload, pkt.header.timestamp, pkt.header.marker);
        let dd = pkt.header.ext_vals.user_values.get_arc::<DdBytes>();
        let structure = &mut ft.dd_structures[rid_index(rid.as_ref())];
        if kind == PayloadKind::Av1 {
            svc = av1_layer(
                structure,
                dd.as_deref(),
                keyframe,
                pkt.header.timestamp,
                pkt.header.marker,
            );
        }
        let temporal = temporal_of(kind, vp8, svc.as_ref(), dd.as_deref(), structure);
        let ext = &pkt.header.ext_vals;
        let input = RtpIn {
            rid,
            pt,
            params,
            kind,
            seq: *pkt.seq_no,
            ts: pkt.header.timestamp,
            marker: pkt.header.marker,
            keyframe,
            vp8,
            svc,
            temporal,
            dd,
            audio_level: ext.audio_level,
            voice_activity: ext.voice_activity,
            video_orientation: ext.video_orientation,
            payload: pkt.payload,
        };
        self.forward_rtp(now, track, &input, None, out);
    }

    /// RTP mode: forward one packet of `track` to its relay links and its local subscribers.
    ///
    /// Per subscriber: the simulcast layer it should get (switching only at a keyframe's first
    /// packet, like frame mode), then the [`Rewriter`] maps sequence number, timestamp and VP8
    /// picture id onto the subscriber's continuous stream, and the packet is written with
    /// `write_rtp` — the payload `Arc` shared, the VP8 descriptor patched by str0m while it
    /// serialises. Video is written *nackable*, so str0m answers the subscriber's NACKs from
    /// its send buffer (RTX) and can reuse the packets as probing padding.
    fn forward_rtp(
        &mut self,
        now: Instant,
        track: TrackKey,
        p: &RtpIn,
        ingest_us: Option<u64>,
        out: &mut dyn Output,
    ) {
        let ingest_us = ingest_us.unwrap_or_else(|| self.wall_us(now));
        let Some(ft) = self.tracks.get_mut(&track) else {
            return;
        };
        let len = p.payload.len();
        METRICS.add_received(len);
        if !ft.relay_outs.is_empty() {
            let json = ft
                .pts
                .iter()
                .find(|i| i.pt == p.pt)
                .and_then(|i| i.json.clone());
            let r = RelayRtp {
                pt: *p.pt,
                rtp_seq: p.seq,
                rtp_ts: p.ts,
                marker: p.marker,
                keyframe: p.keyframe,
                ingest_us,
                audio_level: p.audio_level,
                voice_activity: p.voice_activity,
                rid: p.rid,
                dd: p.dd.as_ref().map(|d| &d.0[..]),
                payload: &p.payload,
            };
            let rank = p.rid.as_ref().map_or(1, rid_rank);
            for o in ft.relay_outs.iter_mut() {
                if rank > o.sending() {
                    continue;
                }
                let max = out.relay_max(o.node);
                let node = o.node;
                o.sender.push_rtp(&r, json.as_deref(), max, |d| {
                    RELAY_METRICS.datagrams_sent.fetch_add(1, Relaxed);
                    out.relay(node, d);
                });
            }
        }

        ft.observe_ingress(now, p.rid, len, p.audio_level, &self.level_config);
        if let Some(svc) = &p.svc {
            ft.spatial.observe(now, svc.sid, len);
        }
        // The packet's temporal layer (VP8 TID, or the SVC layer's), measured per simulcast
        // layer.
        let tid = p.temporal.map(|t| t.0);
        let rates_at = rid_index(p.rid.as_ref());
        if let Some(t) = tid {
            ft.frame_rates[rates_at].observe(now, p.ts, t);
        }
        let header = p.header();
        let video = ft.kind == MediaKind::Video;
        // str0m's view of the VP8 descriptor (for patches), parsed once for all subscribers.
        let vp8_patchable = p
            .vp8
            .and_then(|_| str0m::rtp::Vp8Descriptor::parse(&p.payload).ok());
        let in_pid = p.vp8.and_then(|d| d.picture_id).map(|(v, _)| v);
        let in_tl0 = p.vp8.and_then(|d| d.tl0_pic_idx);
        let mut want_keyframe: Option<Option<Rid>> = None;
        for sub in &ft.subscribers {
            let Some(peer) = self.peers.get_mut(sub) else {
                continue;
            };
            let Some(o) = peer.media_out.iter_mut().find(|o| o.track == track) else {
                continue;
            };
            let OutState::Open(mid) = o.state else {
                continue;
            };
            let allowed = if video { o.allowed_rank() } else { 3 };
            if allowed == 0 {
                continue;
            }
            let mut rebase = false;
            if p.rid.is_some() {
                let best = best_layer(&ft.layers, allowed, now);
                if o.rid != best && p.rid == best {
                    if p.keyframe || !p.kind.needs_keyframe() {
                        o.rid = best;
                        o.need_keyframe = false;
                        rebase = true;
                    } else {
                        want_keyframe = Some(best);
                    }
                }
                if p.rid != o.rid {
                    continue;
                }
            }
            if o.need_keyframe {
                if !p.keyframe && p.kind.needs_keyframe() {
                    want_keyframe = Some(p.rid);
                    continue;
                }
                o.need_keyframe = false;
                rebase = true;
            }
            if rebase || !o.rw.started() {
                o.rw.rebase(now, &header);
                o.svc.reset();
                o.temporal.reset();
                o.held = None;
            }
            // The highest temporal layer that gives the subscriber the frame rate it asked for.
            let temporal = if video && o.fps > 0 {
                ft.frame_rates[rates_at].layer_for_fps(o.fps)
            } else {
                ALL_TEMPORAL
            };
            let mut marker = p.marker;
            let mut hold = false;
            if let (None, Some((t, hint))) = (&p.svc, p.temporal) {
                // A non-SVC stream with temporal layers (VP8 simulcast layers are L1T3): drop
                // whole frames above the temporal target.
                if !o.temporal.select(temporal, t, p.ts, hint, p.keyframe) {
                    o.rw.skip(&header);
                    continue;
                }
            }
            if let Some(svc) = &p.svc {
                // SVC: drop the spatial layers above the one this subscriber may get, and the
                // temporal layers above its temporal target.
                let choice = o.svc.select(allowed.saturating_sub(1), temporal, svc);
                if choice.want_keyframe {
                    want_keyframe = Some(None);
                }
                let mut released = false;
                if let (Some(m), Some(held)) = (choice.release, o.held.take()) {
                    let w =
                        RtpWrite::new(held.pt, SeqNo::from(held.seq), held.ts, now, held.payload)
                            .marker(m)
                            .nackable(true)
                            .ext_vals(held.ext);
                    let mut api = peer.rtc.direct_api();
                    if let Some(tx) = Self::stream_tx(&mut api, mid, &mut o.tx_ssrc) {
                        tx.write_rtp(w);
                        released = true;
                    }
                }
                if !choice.forward {
                    o.rw.skip(&header);
                    if released {
                        Self::timeout_and_drain(now, *sub, peer, &mut self.queue, out);
                    }
                    continue;
                }
                marker = choice.marker;
                hold = choice.hold;
            }
            let Some(h) = o.rw.rewrite(now, &header) else {
                continue;
            };
            let out_pt = match o.pt_map.iter().find(|(i, _)| *i == p.pt) {
                Some(&(_, m)) => m,
                None => {
                    let m = peer
                        .rtc
                        .codec_config()
                        .match_params(p.params)
                        .map(|m| m.pt());
                    if o.pt_map.len() >= MAX_PTS {
                        o.pt_map.remove(0);
                    }
                    o.pt_map.push((p.pt, m));
                    m
                }
            };
            let Some(out_pt) = out_pt else {
                continue;
            };
            let mut ext = ExtensionValues {
                audio_level: p.audio_level,
                voice_activity: p.voice_activity,
                video_orientation: p.video_orientation,
                ..Default::default()
            };
            if let Some(dd) = &p.dd {
                ext.user_values.set_arc(dd.clone());
            }
            if hold {
                o.held = Some(HeldRtp {
                    pt: out_pt,
                    seq: h.seq,
                    ts: h.ts,
                    payload: p.payload.clone(),
                    ext,
                });
                METRICS.add_forwarded(len);
                continue;
            }
            let mut w = RtpWrite::new(out_pt, SeqNo::from(h.seq), h.ts, now, p.payload.clone())
                .marker(marker)
                .nackable(video)
                .ext_vals(ext);
            if h.picture_id != in_pid || h.tl0_pic_idx != in_tl0 {
                // Patch the shared payload's descriptor while str0m serialises this copy (only
                // when the rewrite changed it: a subscriber on its first source needs none).
                let patch = vp8_patchable.and_then(|d| {
                    let mut b = d.patch();
                    if let (Some(v), Some(_)) = (h.picture_id, d.picture_id()) {
                        b = b.picture_id(v);
                    }
                    if let (Some(v), Some(_)) = (h.tl0_pic_idx, d.tl0_pic_idx()) {
                        b = b.tl0_pic_idx(v);
                    }
                    b.build().ok()
                });
                if let Some(patch) = patch {
                    w = w.vp8_patch(patch);
                }
            }
            let mut api = peer.rtc.direct_api();
            let Some(tx) = Self::stream_tx(&mut api, mid, &mut o.tx_ssrc) else {
                continue;
            };
            tx.write_rtp(w);
            METRICS.add_forwarded(len);
            Self::timeout_and_drain(now, *sub, peer, &mut self.queue, out);
        }
        if let Some(rid) = want_keyframe {
            self.request_keyframe(now, track, rid, out);
        }
    }

    /// Periodic work: measure layer bitrates, report audio levels and link statistics, and
    /// re-run every subscriber's bandwidth allocation.
    fn housekeeping(&mut self, now: Instant, out: &mut dyn Output) {
        self.housekeeping_count = self.housekeeping_count.wrapping_add(1);
        let secs = HOUSEKEEPING.as_secs_f64();
        // Relay links: report congestion upstream; give shed layers another try when the
        // reports stopped.
        for ft in self.tracks.values_mut() {
            if let (Some((node, flow)), Some(r)) = (ft.relay_src, ft.receiver.as_mut()) {
                if let Some(loss) = r.take_loss() {
                    if loss > relay::CONGESTION_LOSS {
                        RELAY_METRICS.congestion_reports_sent.fetch_add(1, Relaxed);
                        out.relay(node, &relay::encode_congestion(flow, loss));
                    }
                }
            }
            for o in ft.relay_outs.iter_mut() {
                if o.cap < 3 && o.cap_until.is_some_and(|t| now >= t) {
                    o.cap += 1;
                    o.cap_until = (o.cap < 3).then_some(now + relay::CONGESTION_HOLD);
                }
            }
        }
        for (key, ft) in self.tracks.iter_mut() {
            for r in ft.rates.iter_mut() {
                let bps = (r.1 as f64 * 8.0 / secs) as u64;
                // Smooth over about two periods; a stopped layer decays to zero.
                r.2 = (r.2 + bps) / 2;
                r.1 = 0;
            }
            ft.spatial.roll(secs);
            if ft.kind == MediaKind::Audio {
                let (level, active) = ft.meter.take(&self.level_config);
                out.event(
                    ft.publisher,
                    PeerEvent::AudioLevel {
                        track: *key,
                        level,
                        active,
                    },
                );
            }
        }
        let subs: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.role == PeerRole::Subscriber)
            .map(|(id, _)| *id)
            .collect();
        for id in subs {
            self.allocate_peer(now, id, out);
        }
        if self.housekeeping_count.is_multiple_of(STATS_EVERY) {
            for (id, p) in self.peers.iter() {
                let mut link = p.link;
                link.silent_for = now.saturating_duration_since(p.last_rx);
                out.event(*id, PeerEvent::Stats(link));
            }
        }
    }

    /// Fit one subscriber's video tracks into its bandwidth estimate and tell it about
    /// streams that pause or resume.
    fn allocate_peer(&mut self, now: Instant, id: PeerId, out: &mut dyn Output) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let overloaded = peer.link.loss > OVERLOAD_LOSS;
        let mut inputs = Vec::new();
        let mut idx = Vec::new();
        for (i, o) in peer.media_out.iter().enumerate() {
            if o.kind != MediaKind::Video || !matches!(o.state, OutState::Open(_)) {
                continue;
            }
            let Some(ft) = self.tracks.get(&o.track) else {
                continue;
            };
            let layers = ft.live_layers(now);
            if layers.is_empty() {
                continue;
            }
            inputs.push(AllocTrack {
                priority: 0,
                max_rank: o.max_rank,
                layers,
            });
            idx.push(i);
        }
        // Bits/s of what this subscriber receives now, and of the lowest layers of everything.
        let mut current_use = 0u64;
        let mut lowest_use = 0u64;
        for (t, i) in inputs.iter().zip(&idx) {
            let cur = match peer.media_out[*i].alloc {
                Decision::Layer(r) => r.min(3),
                _ => 0,
            };
            current_use += t
                .layers
                .iter()
                .find(|(r, _)| *r == cur)
                .map(|l| l.1)
                .unwrap_or(0);
            lowest_use += t.layers.first().map(|l| l.1).unwrap_or(0);
        }
        // More than the pacer sends: every round spent on these layers adds to the queue. Only
        // while the estimate is falling: a layer's measured bitrate also jumps for a round
        // after a large keyframe, and that is no reason to move anyone down.
        let falling = matches!((peer.bwe_bps, peer.last_alloc_bwe), (Some(b), Some(p)) if b < p);
        let saturated = falling
            && peer
                .bwe_bps
                .is_some_and(|b| current_use as f64 > b as f64 * PACING_FACTOR);
        peer.last_alloc_bwe = peer.bwe_bps;
        // On an overloaded link (heavy loss) the delay-based estimate lags: budget what is
        // actually getting through, but never less than the lowest layers (pausing is the
        // estimator's call, not this heuristic's).
        let estimate = match (peer.bwe_bps, overloaded) {
            (Some(b), true) => {
                let through = (current_use as f64 * (1.0 - peer.link.loss as f64) * 0.8) as u64;
                let floor = (lowest_use as f64 / BWE_USABLE) as u64 + 1;
                Some(b.min(through.max(floor)))
            }
            (b, _) => b,
        };
        // Upgrades need head-room; keeping the current layer tolerates a fuller link.
        let budget = match estimate {
            Some(b) => (b as f64 * BWE_USABLE) as u64,
            None => u64::MAX,
        };
        let keep_budget = match estimate {
            Some(b) => (b as f64 * 0.97) as u64,
            None => u64::MAX,
        };
        let (decisions, desired) = allocate(budget, &inputs);
        let (keep, _) = allocate(keep_budget, &inputs);
        let rank_of = |d: Decision| match d {
            Decision::Layer(r) => r,
            _ => 0,
        };
        let mut keyframes = Vec::new();
        for ((d, k), &i) in decisions.into_iter().zip(keep).zip(&idx) {
            let o = &mut peer.media_out[i];
            let was = o.allowed_rank();
            let current = match o.alloc {
                Decision::Layer(r) => r.min(3),
                _ => 0,
            };
            let d = if rank_of(d) >= current || o.max_rank < current {
                // An upgrade, or the subscriber itself asked for less: apply at once.
                o.down_votes = 0;
                d
            } else if rank_of(k) >= current && !overloaded && !saturated {
                // The current layer still fits the fuller budget: stay.
                o.down_votes = 0;
                o.alloc
            } else {
                o.down_votes = o.down_votes.saturating_add(1);
                // A saturated pacer moves down at once, but pausing a track still takes two
                // rounds: one low estimate is not enough to stop someone's video.
                let urgent = overloaded || (saturated && rank_of(d) > 0);
                if o.down_votes >= DOWNGRADE_ROUNDS || urgent {
                    o.down_votes = 0;
                    d
                } else {
                    o.alloc
                }
            };
            if d != o.alloc {
                tracing::debug!(peer = id.0, track = o.track.0, estimate = ?peer.bwe_bps, from = ?o.alloc, to = ?d, "allocation changed");
            }
            o.alloc = d;
            let now_allowed = o.allowed_rank();
            if was == 0 && now_allowed > 0 {
                o.need_keyframe = true;
                keyframes.push(o.track);
            }
            let paused = now_allowed == 0;
            if paused != o.reported_paused {
                o.reported_paused = paused;
                let publisher_sid = o.stream_id.split('|').next().unwrap_or("").to_string();
                out.event(
                    id,
                    PeerEvent::StreamState {
                        track_sid: o.track_id.clone(),
                        publisher_sid,
                        paused,
                    },
                );
            }
        }
        if peer.bwe_bps.is_some() && desired > 0 {
            // Probe beyond the need so that the need fits under the usable fraction.
            let target = (desired as f64 / BWE_USABLE * 1.2) as u64;
            // While bandwidth holds a track below what its subscriber asked for, pad towards
            // the next upgrade (str0m caps padding at the estimate), so that the estimate is
            // anchored to what the link carries, not to the lower layer (see `media::alloc`).
            let finals: Vec<Decision> = idx.iter().map(|i| peer.media_out[*i].alloc).collect();
            let step = next_step_bps(&inputs, &finals);
            let min = step
                .map_or(0, |s| (s as f64 / BWE_USABLE) as u64)
                .min(target);
            peer.rtc
                .bwe()
                .set_bitrate(Bitrate::bps(min), Bitrate::bps(target));
            // Held back for a while on a clean link: restart the estimator from where it is,
            // which makes str0m probe the path again (bounded by `Recovery`'s back-off).
            if peer.recovery.on_round(now, step.is_some(), peer.link.loss) {
                if let Some(b) = peer.bwe_bps {
                    tracing::debug!(
                        peer = id.0,
                        estimate = b,
                        "restarting the bandwidth estimator to probe upwards"
                    );
                    peer.rtc.bwe().reset(Bitrate::bps(b));
                }
            }
            Self::drain(id, peer, &mut self.queue, out);
        }
        for t in keyframes {
            self.request_keyframe(now, t, None, out);
        }
    }

    /// Remove peers whose `Rtc` died (ICE timeout, DTLS failure) and tell their owners.
    ///
    /// Only the peers [`Engine::drain`] found dead are looked at: every `Rtc` mutation is
    /// followed by a drain, so a peer cannot die unnoticed.
    fn reap_dead(&mut self, out: &mut dyn Output) {
        if self.queue.dead.is_empty() {
            return;
        }
        let dead = std::mem::take(&mut self.queue.dead);
        for id in dead {
            if self.peers.get(&id).is_some_and(|p| !p.rtc.is_alive()) {
                self.remove_peer(id, out);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChanKind {
    Reliable,
    Lossy,
    Other,
}

#[cfg(test)]
mod relay_tests {
    //! The engine as a middle hop of the relay fabric: frames relayed in from node 1 are
    //! reassembled, forwarded to node 3 (only the layers node 3 needs), NACKs and keyframe
    //! requests are answered per hop, and garbage is counted, never a panic.
    use super::*;
    use crate::media::relay::{decode, Datagram, RelayReceiver};
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use str0m::format::{Codec, CodecSpec, FormatParams};
    use str0m::media::Pt;

    #[derive(Default)]
    struct Sink {
        relayed: Vec<(u64, Vec<u8>)>,
    }
    impl Output for Sink {
        fn transmit(&mut self, _: Protocol, _: SocketAddr, _: SocketAddr, _: &[u8]) {}
        fn event(&mut self, _: PeerId, _: PeerEvent) {}
        fn relay(&mut self, node: u64, d: &[u8]) {
            self.relayed.push((node, d.to_vec()));
        }
        fn relay_max(&self, _: u64) -> usize {
            1200
        }
    }

    fn engine_in(now: Instant, rtp_mode: bool) -> Engine {
        let local: SocketAddr = "127.0.0.1:7882".parse().unwrap();
        Engine::new(EngineConfig {
            candidates: vec![],
            udp_local: local,
            max_peers: 4,
            wall_anchor: (now, 1_700_000_000_000_000),
            rtp_mode,
        })
    }

    fn vp8_params() -> Vec<u8> {
        let spec = CodecSpec {
            codec: Codec::Vp8,
            clock_rate: Frequency::NINETY_KHZ,
            channels: None,
            format: FormatParams::default(),
        };
        serde_json::to_vec(&PayloadParams::new(Pt::new_with_value(96), None, spec)).unwrap()
    }

    /// An engine relaying track `track` (flow `flow`) from node `up` to node `down`, which
    /// needs layers up to `max_rank`: a middle hop of a relay tree.
    fn middle_hop(
        now: Instant,
        track: TrackKey,
        flow: u64,
        up: u64,
        down: u64,
        max_rank: u8,
    ) -> (Engine, Sink) {
        middle_hop_in(now, track, flow, up, down, max_rank, false)
    }

    fn middle_hop_in(
        now: Instant,
        track: TrackKey,
        flow: u64,
        up: u64,
        down: u64,
        max_rank: u8,
        rtp_mode: bool,
    ) -> (Engine, Sink) {
        let mut e = engine_in(now, rtp_mode);
        let mut out = Sink::default();
        e.handle_command(
            now,
            Command::RelayIn {
                track,
                node: up,
                flow,
                video: true,
            },
            &mut out,
        );
        e.handle_command(
            now,
            Command::RelayOut {
                track,
                node: down,
                on: true,
                max_rank,
            },
            &mut out,
        );
        (e, out)
    }

    #[test]
    fn middle_hop_forwards_needed_layers_and_answers_nacks() {
        let t0 = Instant::now();
        let (key, flow) = (TrackKey(500), 9u64);
        // Node 3 needs only the low layer.
        let (mut e, mut out) = middle_hop(t0, key, flow, 1, 3, 1);
        // A new downstream asks its upstream (node 1) for a keyframe.
        assert!(out
            .relayed
            .iter()
            .any(|(n, d)| *n == 1 && matches!(decode(d), Ok(Datagram::Keyframe { flow: 9, .. }))));
        out.relayed.clear();

        let params = vp8_params();
        let mut upstream = RelaySender::new(flow, RelayLimits::default());
        let mut now = t0;
        for i in 0..60u64 {
            for rid in ["q", "h", "f"] {
                let f = RelayFrame {
                    rid: Some(rid.into()),
                    time: i * 3000,
                    ingest_us: 1_700_000_000_000_000 + i * 33_000,
                    keyframe: i == 0,
                    audio_level: None,
                    params: None,
                    payload: vec![i as u8; 1500].into(),
                    contiguous: true,
                };
                for d in upstream.push(&f, Some(&params), 1200) {
                    e.handle_relay_datagram(now, 1, &d, &mut out);
                }
            }
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        // Node 3 gets every low-layer frame and nothing else, reassembled in order.
        let mut down = RelayReceiver::new(key.0, RelayLimits::default());
        for (n, d) in &out.relayed {
            assert_eq!(*n, 3, "only node 3 is relayed to");
            if let Ok(Datagram::Fragment(f)) = decode(d) {
                down.on_fragment(now, &f);
            }
        }
        let frames = down.poll_frames(now);
        assert_eq!(frames.len(), 60);
        assert!(frames
            .iter()
            .all(|f| f.rid.as_deref() == Some("q") && f.contiguous));
        assert!(frames[0].keyframe && frames[0].params.is_some());

        // Node 3 NACKs two of its datagrams: this hop resends them from its own cache.
        out.relayed.clear();
        e.handle_relay_datagram(now, 3, &relay::encode_nack(key.0, &[3, 4]), &mut out);
        assert_eq!(out.relayed.len(), 2);
        // Node 3 asks for a keyframe: it goes upstream (coalesced: once per interval).
        out.relayed.clear();
        now += Duration::from_secs(1);
        for _ in 0..5 {
            e.handle_relay_datagram(now, 3, &relay::encode_keyframe(key.0, 1), &mut out);
        }
        let upstream_requests = out
            .relayed
            .iter()
            .filter(|(n, d)| *n == 1 && matches!(decode(d), Ok(Datagram::Keyframe { .. })))
            .count();
        assert_eq!(upstream_requests, 1);
    }

    /// RTP mode: a middle hop relays RTP packets (with their codec parameters) of the layers
    /// the far side needs, unchanged and in order, answers NACKs from its own cache and
    /// coalesces keyframe requests upstream.
    #[test]
    fn rtp_mode_middle_hop_relays_packets_of_needed_layers() {
        let t0 = Instant::now();
        let (key, flow) = (TrackKey(700), 12u64);
        let (mut e, mut out) = middle_hop_in(t0, key, flow, 1, 3, 2, true);
        out.relayed.clear();
        let params = vp8_params();
        let mut upstream = RelaySender::new(flow, RelayLimits::default());
        let mut now = t0;
        for i in 0..40u64 {
            for (k, rid) in ["q", "h", "f"].into_iter().enumerate() {
                // A VP8 descriptor with a 15-bit picture id; a keyframe first.
                let payload = [0x90, 0x80, 0x80, i as u8, u8::from(i != 0), 7, 7, 7];
                let p = RelayRtp {
                    pt: 96,
                    rtp_seq: 1000 * k as u64 + i,
                    rtp_ts: (i * 3000) as u32,
                    marker: true,
                    keyframe: i == 0,
                    ingest_us: 1_700_000_000_000_000,
                    audio_level: None,
                    voice_activity: None,
                    rid: Some(rid.into()),
                    dd: None,
                    payload: &payload,
                };
                let mut ds = Vec::new();
                upstream.push_rtp(&p, Some(&params), 1200, |d| ds.push(d.to_vec()));
                for d in ds {
                    e.handle_relay_datagram(now, 1, &d, &mut out);
                }
            }
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut params_seen = 0;
        for (n, d) in &out.relayed {
            assert_eq!(*n, 3, "only node 3 is relayed to");
            match decode(d) {
                Ok(Datagram::Rtp(r)) => {
                    assert_eq!(r.payload.len(), 8);
                    seqs.entry(r.rid.unwrap_or("").to_string())
                        .or_default()
                        .push(r.rtp_seq);
                }
                Ok(Datagram::Params { .. }) => params_seen += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(params_seen >= 1);
        assert_eq!(seqs.keys().cloned().collect::<Vec<_>>(), ["h", "q"]);
        assert_eq!(seqs["q"], (0..40).collect::<Vec<_>>());
        assert_eq!(seqs["h"], (1000..1040).collect::<Vec<_>>());
        // NACKs from node 3 are answered from this hop's cache.
        out.relayed.clear();
        e.handle_relay_datagram(now, 3, &relay::encode_nack(key.0, &[1, 2, 5]), &mut out);
        assert_eq!(out.relayed.len(), 3);
        // Keyframe requests from node 3 go upstream once per interval.
        out.relayed.clear();
        now += Duration::from_secs(1);
        for _ in 0..5 {
            e.handle_relay_datagram(now, 3, &relay::encode_keyframe(key.0, 2), &mut out);
        }
        let up: Vec<_> = out.relayed.iter().filter(|(n, _)| *n == 1).collect();
        assert_eq!(up.len(), 1);
    }

    /// Sends one frame of each layer of `flow` into `e` from node 1, dropping every datagram
    /// for which `drop` says so.
    fn feed(
        e: &mut Engine,
        up: &mut RelaySender,
        i: u64,
        now: Instant,
        out: &mut Sink,
        mut drop: impl FnMut() -> bool,
    ) {
        let params = vp8_params();
        for rid in ["q", "h", "f"] {
            let f = RelayFrame {
                rid: Some(rid.into()),
                time: i * 3000,
                ingest_us: 0,
                keyframe: i == 0,
                audio_level: None,
                params: None,
                payload: vec![i as u8; 1500].into(),
                contiguous: true,
            };
            for d in up.push(&f, Some(&params), 1200) {
                if !drop() {
                    e.handle_relay_datagram(now, 1, &d, out);
                }
            }
        }
    }

    fn rids_sent_to(out: &Sink, node: u64) -> BTreeSet<String> {
        out.relayed
            .iter()
            .filter(|(n, _)| *n == node)
            .filter_map(|(_, d)| match decode(d) {
                Ok(Datagram::Fragment(f)) => f.rid.map(str::to_string),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn congestion_is_reported_upstream_and_sheds_the_top_layer() {
        let t0 = Instant::now();
        let (key, flow) = (TrackKey(600), 11u64);
        let (mut e, mut out) = middle_hop(t0, key, flow, 1, 3, 3);
        let mut up = RelaySender::new(flow, RelayLimits::default());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut now = t0;
        // Receiver side: 30% of what node 1 sends is lost: within a housekeeping period or
        // two, a congestion report goes to node 1.
        for i in 0..40u64 {
            feed(&mut e, &mut up, i, now, &mut out, || rng.random_bool(0.3));
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        assert!(out.relayed.iter().any(|(n, d)| *n == 1
            && matches!(decode(d), Ok(Datagram::Congestion { flow: 11, loss_permille }) if loss_permille > 100)));

        // Sender side: node 3 reports congestion; the top layer stops on that link.
        let (mut e, mut out) = middle_hop(now, key, flow, 1, 3, 3);
        let mut up = RelaySender::new(flow, RelayLimits::default());
        for i in 0..10u64 {
            feed(&mut e, &mut up, i, now, &mut out, || false);
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        assert_eq!(rids_sent_to(&out, 3).len(), 3);
        e.handle_relay_datagram(now, 3, &relay::encode_congestion(key.0, 0.25), &mut out);
        out.relayed.clear();
        for i in 10..40u64 {
            feed(&mut e, &mut up, i, now, &mut out, || false);
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        let shed: BTreeSet<String> = ["q", "h"].iter().map(|s| s.to_string()).collect();
        assert_eq!(rids_sent_to(&out, 3), shed);
        // No more reports: after the hold the layer comes back.
        now += relay::CONGESTION_HOLD + Duration::from_secs(1);
        e.handle_timeout(now, &mut out);
        out.relayed.clear();
        for i in 40..50u64 {
            feed(&mut e, &mut up, i, now, &mut out, || false);
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        assert_eq!(rids_sent_to(&out, 3).len(), 3);
    }

    /// Re-parenting: the track's upstream moves from node 1 (flow 11) to node 2 (flow 21). The
    /// hop asks node 2 for a keyframe at once, ignores what still comes from the old flow, and
    /// keeps relaying to node 3 on the same downstream flow, whose sequence continues.
    #[test]
    fn rebind_moves_the_source_and_keeps_the_downstream() {
        let t0 = Instant::now();
        let key = TrackKey(700);
        let (mut e, mut out) = middle_hop(t0, key, 11, 1, 3, 3);
        let mut old_up = RelaySender::new(11, RelayLimits::default());
        let mut now = t0;
        for i in 0..10u64 {
            feed(&mut e, &mut old_up, i, now, &mut out, || false);
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        let before = out.relayed.iter().filter(|(n, _)| *n == 3).count();
        assert!(before > 0);
        out.relayed.clear();
        e.handle_command(
            now,
            Command::RelayRebind {
                track: key,
                node: 2,
                flow: 21,
            },
            &mut out,
        );
        assert!(out
            .relayed
            .iter()
            .any(|(n, d)| *n == 2 && matches!(decode(d), Ok(Datagram::Keyframe { flow: 21, .. }))));
        // The old source is no longer listened to.
        out.relayed.clear();
        feed(&mut e, &mut old_up, 10, now, &mut out, || false);
        assert_eq!(out.relayed.iter().filter(|(n, _)| *n == 3).count(), 0);
        // The new source's frames (from node 2's own numbering) reach node 3.
        let mut new_up = RelaySender::new(21, RelayLimits::default());
        let params = vp8_params();
        for i in 0..5u64 {
            let f = RelayFrame {
                rid: Some("q".into()),
                time: (100 + i) * 3000,
                ingest_us: 0,
                keyframe: i == 0,
                audio_level: None,
                params: None,
                payload: vec![i as u8; 800].into(),
                contiguous: true,
            };
            for d in new_up.push(&f, Some(&params), 1200) {
                e.handle_relay_datagram(now, 2, &d, &mut out);
            }
            now += Duration::from_millis(33);
            e.handle_timeout(now, &mut out);
        }
        let flows: BTreeSet<u64> = out
            .relayed
            .iter()
            .filter(|(n, _)| *n == 3)
            .filter_map(|(_, d)| match decode(d) {
                Ok(Datagram::Fragment(f)) => Some(f.flow),
                _ => None,
            })
            .collect();
        assert_eq!(flows, [key.0].into_iter().collect());
        // Rebinding to the same source again is a no-op (no new keyframe request).
        out.relayed.clear();
        now += Duration::from_secs(1);
        e.handle_command(
            now,
            Command::RelayRebind {
                track: key,
                node: 2,
                flow: 21,
            },
            &mut out,
        );
        assert!(out.relayed.is_empty());
    }

    #[test]
    fn garbage_relay_datagrams_are_harmless() {
        let t0 = Instant::now();
        let (mut e, mut out) = middle_hop(t0, TrackKey(7), 7, 1, 2, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut now = t0;
        for _ in 0..5000 {
            let n = rng.random_range(0..200);
            let mut d: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if !d.is_empty() {
                // Mostly valid kinds and the known flow, so the parsers go deep.
                d[0] = rng.random_range(0..5);
                if d.len() >= 9 {
                    d[1..9].copy_from_slice(&7u64.to_be_bytes());
                }
            }
            e.handle_relay_datagram(now, rng.random_range(1..3), &d, &mut out);
            now += Duration::from_millis(1);
            e.handle_timeout(now, &mut out);
        }
    }
}

#[cfg(test)]
pub(crate) mod lookup_tests {
    //! The pure pieces of the engine's per-packet bookkeeping: the timer heap's lazy
    //! invalidation and the STUN ufrag parser used to find a peer without scanning.
    use super::*;

    #[test]
    fn timer_heap_pops_only_current_deadlines() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = TimerQueue::default();
        let (a, b) = (PeerId(1), PeerId(2));
        let (mut sa, mut sb) = (None, None);
        q.schedule(a, &mut sa, ms(50));
        q.schedule(a, &mut sa, ms(80)); // later: nothing pushed, the 50 ms entry stands
        q.schedule(a, &mut sa, ms(10)); // earlier: pushed, the 50 ms entry is now stale
        q.schedule(b, &mut sb, ms(30));
        assert_eq!(q.heap.len(), 3);
        assert_eq!((sa, sb), (Some(ms(10)), Some(ms(30))));
        assert_eq!(q.peek(), Some(ms(10)));
        let mut due = Vec::new();
        q.pop_due(ms(40), &mut due);
        assert_eq!(due, vec![(ms(10), a), (ms(30), b)]);
        due.clear();
        q.pop_due(ms(60), &mut due);
        // The stale 50 ms entry of `a` comes out; `handle_timeout` skips it because it is not
        // `a`'s scheduled deadline.
        assert_eq!(due, vec![(ms(50), a)]);
        assert!(q.heap.is_empty());
    }

    /// A STUN binding request carrying only a USERNAME (also used by the shell's ICE-TCP
    /// hand-off tests).
    pub(crate) fn stun_request(username: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut d = vec![0x00, 0x01];
        d.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        d.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        d.extend_from_slice(&[7; 12]);
        d.extend_from_slice(&attrs);
        d
    }

    #[test]
    fn stun_ufrag_is_the_receiver_part_of_username() {
        assert_eq!(stun_local_ufrag(&stun_request(b"srv1:cli2")), Some("srv1"));
        assert_eq!(stun_local_ufrag(&stun_request(b"abc")), Some("abc"));
        assert_eq!(stun_local_ufrag(&stun_request(b":x")), None);
        // Not STUN: RTP (version 2), DTLS, short, wrong cookie, truncated attribute.
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None);
        assert_eq!(stun_local_ufrag(&[22, 254, 253, 0, 0]), None);
        let mut bad = stun_request(b"srv1:cli2");
        bad[4] = 0;
        assert_eq!(stun_local_ufrag(&bad), None);
        let mut cut = stun_request(b"srv1:cli2");
        cut.truncate(26);
        assert_eq!(stun_local_ufrag(&cut), None);
        let mut long = stun_request(b"srv1:cli2");
        long[2] = 0xff; // length beyond the datagram
        assert_eq!(stun_local_ufrag(&long), None);
    }
}

#[cfg(test)]
mod temporal_tests {
    //! Where a packet's temporal layer comes from ([`temporal_of`]).
    use super::*;

    /// Bits, most significant first.
    fn bits(fields: &[(u32, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut n = 0usize;
        for &(v, width) in fields {
            for i in (0..width).rev() {
                if n.is_multiple_of(8) {
                    out.push(0);
                }
                let last = out.len() - 1;
                out[last] |= (((v >> i) & 1) as u8) << (7 - n % 8);
                n += 1;
            }
        }
        out
    }

    /// A keyframe's dependency descriptor with libwebrtc's L1T3 structure: templates T0
    /// (`SSS`), T1 (`-DS`), T2 (`--D`), ids 0-2.
    fn l1t3_keyframe_dd() -> DdBytes {
        let b = bits(&[
            (1, 1),        // start of frame
            (1, 1),        // end of frame
            (0, 6),        // template 0
            (7, 16),       // frame number
            (1, 1),        // structure present
            (0, 4),        // active targets, custom dtis/fdiffs/chains
            (0, 6),        // template id offset
            (2, 5),        // three decode targets
            (1, 2),        // T0 -> next temporal layer
            (1, 2),        // T1 -> next temporal layer
            (3, 2),        // T2: end
            (0b101010, 6), // T0: S S S
            (0b000110, 6), // T1: - D S
            (0b000001, 6), // T2: - - D
            (0, 1),        // no fdiffs, x3
            (0, 1),
            (0, 1),
            (0, 2), // no chains
            (0, 1), // no resolutions
        ]);
        DdBytes(b.into())
    }

    fn dd(start: bool, template: u8) -> DdBytes {
        DdBytes(vec![(u8::from(start) << 7) | template, 0, 9].into())
    }

    #[test]
    fn temporal_layer_from_the_vp8_descriptor_or_the_dependency_descriptor() {
        let mut st = None;
        // Chromium's VP8 once the descriptor is negotiated: no T bit in the payload.
        let plain = rtpfwd::vp8_descriptor(&[0x10, 0x00]);
        assert_eq!(plain.and_then(|d| d.tid), None);
        let key = l1t3_keyframe_dd();
        let t = |st: &mut _, d: &DdBytes| temporal_of(PayloadKind::Vp8, plain, None, Some(d), st);
        assert_eq!(t(&mut st, &key), Some((0, SwitchHint::UpSwitch)));
        assert!(st.is_some(), "the structure is kept for later packets");
        assert_eq!(t(&mut st, &dd(true, 1)), Some((1, SwitchHint::UpSwitch)));
        assert_eq!(t(&mut st, &dd(false, 1)), Some((1, SwitchHint::None)));
        assert_eq!(t(&mut st, &dd(true, 2)), Some((2, SwitchHint::None)));
        assert_eq!(t(&mut st, &dd(true, 9)), None, "unknown template");
        // Without a structure yet, or without a descriptor: no layer.
        assert_eq!(t(&mut None, &dd(true, 1)), None);
        assert_eq!(
            temporal_of(PayloadKind::Vp8, plain, None, None, &mut st),
            None
        );
        // The VP8 T bit wins, with its Y bit as a layer sync.
        let tbit = rtpfwd::vp8_descriptor(&[0x90, 0x20, 0x60, 0x00]);
        assert_eq!(
            temporal_of(PayloadKind::Vp8, tbit, None, Some(&key), &mut st),
            Some((1, SwitchHint::LayerSync))
        );
        // Audio has no layers.
        assert_eq!(
            temporal_of(PayloadKind::Audio, None, None, Some(&key), &mut st),
            None
        );
    }
}

#[cfg(test)]
mod shard_tests {
    //! What the engine does for sharding: every local ICE ufrag names the engine's shard (the
    //! node's ICE-TCP listener routes by it), and `max_peers` bounds the peers of all shards
    //! together when they share a counter.
    use super::*;
    use tokio::sync::oneshot;

    #[derive(Default)]
    struct Offers(Vec<String>);
    impl Output for Offers {
        fn transmit(&mut self, _: Protocol, _: SocketAddr, _: SocketAddr, _: &[u8]) {}
        fn event(&mut self, _: PeerId, e: PeerEvent) {
            if let PeerEvent::Offer { sdp, .. } = e {
                self.0.push(sdp);
            }
        }
        fn relay(&mut self, _: u64, _: &[u8]) {}
        fn relay_max(&self, _: u64) -> usize {
            0
        }
    }

    fn engine(now: Instant, max_peers: usize) -> Engine {
        Engine::new(EngineConfig {
            candidates: vec![],
            udp_local: "127.0.0.1:7882".parse().unwrap(),
            max_peers,
            wall_anchor: (now, 0),
            rtp_mode: true,
        })
    }

    fn add(e: &mut Engine, now: Instant, id: u64, out: &mut Offers) -> Result<(), MediaError> {
        let (reply, mut rx) = oneshot::channel();
        let (events, _keep) = tokio::sync::mpsc::channel(8);
        e.handle_command(
            now,
            Command::AddPeer {
                peer: PeerId(id),
                role: PeerRole::Subscriber,
                events,
                reply,
            },
            out,
        );
        rx.try_recv().expect("add_peer replies at once")
    }

    #[test]
    fn local_ufrags_name_the_shard() {
        let now = Instant::now();
        let counter = Arc::new(AtomicUsize::new(0));
        for shard_no in [0usize, 1, 3, 63] {
            let mut e = engine(now, 8).with_shard(shard_no, counter.clone());
            let mut out = Offers::default();
            add(&mut e, now, 1, &mut out).unwrap();
            let sdp = out.0.first().expect("a subscriber gets an initial offer");
            let ufrag = sdp
                .lines()
                .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
                .expect("the offer has an ufrag");
            assert_eq!(shard::shard_of_ufrag(ufrag, 64), Some(shard_no), "{ufrag}");
            assert!(ufrag.starts_with(&shard::ufrag_prefix(shard_no)));
        }
    }

    #[test]
    fn max_peers_counts_every_shard() {
        let now = Instant::now();
        let counter = Arc::new(AtomicUsize::new(0));
        let mut a = engine(now, 3).with_shard(0, counter.clone());
        let mut b = engine(now, 3).with_shard(1, counter.clone());
        let mut out = Offers::default();
        add(&mut a, now, 1, &mut out).unwrap();
        add(&mut b, now, 2, &mut out).unwrap();
        add(&mut b, now, 3, &mut out).unwrap();
        assert!(matches!(
            add(&mut a, now, 4, &mut out),
            Err(MediaError::TooManyPeers(3))
        ));
        // A duplicate is refused without taking a place.
        assert!(matches!(
            add(&mut b, now, 3, &mut out),
            Err(MediaError::DuplicatePeer(3))
        ));
        assert_eq!(counter.load(AtomicOrdering::Relaxed), 3);
        b.handle_command(now, Command::RemovePeer { peer: PeerId(2) }, &mut out);
        assert_eq!(counter.load(AtomicOrdering::Relaxed), 2);
        add(&mut a, now, 4, &mut out).unwrap();
        assert_eq!((a.peer_count(), b.peer_count()), (2, 1));
    }
}
