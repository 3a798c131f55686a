//! Media on relay links: RTP packets (or frames) in QUIC datagrams, with per-hop loss repair.
//! Sans-IO.
//!
//! What a node relays depends on the engine's forwarding mode (the same on every node):
//!
//! * **RTP mode**: each RTP packet of a relayed track becomes one datagram tagged with the
//!   track's *flow id* (the sending node's data-plane key for it) and a per-flow, per-link
//!   sequence number, carrying the source's own RTP sequence number and timestamp and the
//!   payload byte for byte ([`RelaySender::push_rtp`]); codec parameters travel in `params`
//!   datagrams of the same sequence. The receiving node forwards each packet as it arrives,
//!   exactly like a local publisher's.
//! * **Frame mode**: str0m depacketised what publishers sent, so each frame is cut into
//!   fragments that fit one QUIC datagram, tagged with the flow id and a per-flow sequence
//!   number; the receiving node reassembles frames and hands them to its engine, which
//!   re-packetises them for its own subscribers (and relays them further down the tree).
//!
//! Per hop, independently of the other hops:
//!
//! * the [`RelaySender`] keeps the last [`RelayLimits::cache_packets`] datagrams of each flow
//!   and answers NACKs from that cache (retransmissions are counted in `/metrics`);
//! * the [`RelayReceiver`] notices sequence gaps, NACKs the missing packets (again every
//!   [`RelayLimits::nack_retry`], at most [`RelayLimits::nack_tries`] times), releases frames in
//!   order, and gives up on a frame after [`RelayLimits::max_hold`] — the next frame then goes
//!   out marked non-contiguous, which makes the engine ask upstream for a keyframe.
//!
//! Both are pure state machines: they take `now` and bytes and return bytes; the media shell
//! moves the bytes over quinn.
//!
//! # Datagram format (all integers big-endian)
//!
//! ```text
//! kind u8 = 1 (fragment)
//!   flow u64 | seq u32 | frame u32 | index u16 | count u16 | flags u8 | time u64 | ingest u64
//!   [level i8 if flags&4] | rid_len u8 | rid | [params_len u16 | params if flags&2] | payload
//!   flags: 1 keyframe, 2 codec parameters follow (first fragment only), 4 audio level
//! kind u8 = 2 (nack)      flow u64 | n u16 | n × seq u32            (n ≤ MAX_NACK_SEQS)
//! kind u8 = 3 (keyframe)  flow u64 | rank u8 (0: every layer)
//! kind u8 = 4 (congestion) flow u64 | loss u16 (per mille, before repair)
//! kind u8 = 5 (rtp)       flow u64 | seq u32 | flags u8 | pt u8 | rtp_seq u64 | rtp_ts u32
//!   | ingest u64 | [level i8 if flags&4] | rid_len u8 | rid | [dd_len u8 | dd if flags&32]
//!   | payload
//!   flags: 1 keyframe start, 4 audio level, 8 marker, 16 voice activity,
//!   32 AV1 dependency descriptor follows (3..=MAX_DD bytes, as the publisher sent it)
//! kind u8 = 6 (params)    flow u64 | seq u32 | pt u8 | len u16 | PayloadParams JSON
//! ```
//!
//! # Congestion on a link
//!
//! The receiver measures the fraction of each flow's datagrams that went missing (before
//! repair) per window; above [`CONGESTION_LOSS`] it reports `congestion` upstream. The sender
//! then sheds that link's highest simulcast layer (the lower ones keep flowing, repaired by
//! NACK), and tries it again after [`CONGESTION_HOLD`] without a report.
//!
//! Codec parameters (str0m `PayloadParams`, JSON) ride on the first fragment of the first
//! frame, of every keyframe and of every [`PARAMS_EVERY`]th frame, so that a receiver that
//! joins late or lost them recovers quickly without paying for them on every frame.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::media::Rid;

/// Datagram kinds.
const KIND_FRAGMENT: u8 = 1;
const KIND_NACK: u8 = 2;
const KIND_KEYFRAME: u8 = 3;
const KIND_CONGESTION: u8 = 4;
const KIND_RTP: u8 = 5;
const KIND_PARAMS: u8 = 6;

const FLAG_KEYFRAME: u8 = 1;
const FLAG_PARAMS: u8 = 2;
const FLAG_LEVEL: u8 = 4;
const FLAG_MARKER: u8 = 8;
const FLAG_VOICE: u8 = 16;
const FLAG_DD: u8 = 32;

/// Largest dependency descriptor carried in an RTP datagram (the RTP two-byte header
/// extension form caps an element at 255 bytes).
pub const MAX_DD: usize = 255;
/// Smallest valid dependency descriptor (its mandatory fields).
const MIN_DD: usize = 3;

/// Largest number of sequence numbers in one NACK datagram.
pub const MAX_NACK_SEQS: usize = 128;
/// Largest codec-parameter blob carried in a fragment.
pub const MAX_PARAMS_BYTES: usize = 1024;
/// Largest rid carried (LiveKit uses one character).
const MAX_RID: usize = 16;
/// Largest frame accepted (fragments × size); a bigger announced frame is garbage.
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Loss (before repair) above which a receiver reports congestion on a flow.
pub const CONGESTION_LOSS: f32 = 0.10;
/// How long a sender keeps a shed layer off after the last congestion report.
pub const CONGESTION_HOLD: Duration = Duration::from_secs(5);
/// Fewest datagrams in a window for its loss figure to count.
const CONGESTION_MIN_PACKETS: u64 = 20;

/// Codec parameters are repeated at least every this many frames.
pub const PARAMS_EVERY: u32 = 64;
/// Fixed header bytes of a fragment before the optional parts.
const FRAGMENT_HEADER: usize = 1 + 8 + 4 + 4 + 2 + 2 + 1 + 8 + 8 + 1;
/// Fixed header bytes of an RTP datagram (kind .. ingest, the level byte and rid length).
const RTP_HEADER: usize = 1 + 8 + 4 + 1 + 1 + 8 + 4 + 8 + 1 + 1;

/// Errors decoding relay datagrams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("relay datagram truncated")]
    Truncated,
    #[error("unknown relay datagram kind {0}")]
    UnknownKind(u8),
    #[error("relay datagram field out of range: {0}")]
    Invalid(&'static str),
}

/// Counters of the relay data plane (rendered in `/metrics`).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    pub frames_sent: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    pub datagrams_dropped: AtomicU64,
    pub frames_received: AtomicU64,
    pub retransmits: AtomicU64,
    pub nack_misses: AtomicU64,
    pub nacks_sent: AtomicU64,
    pub frames_skipped: AtomicU64,
    pub keyframe_requests_sent: AtomicU64,
    pub keyframe_requests_received: AtomicU64,
    pub congestion_reports_sent: AtomicU64,
    pub layers_shed: AtomicU64,
    pub garbage: AtomicU64,
    /// Frames released by relay receivers, and the sum of their transit since ingest (µs).
    pub transit_count: AtomicU64,
    pub transit_us_sum: AtomicU64,
}

/// The process's relay counters.
pub static RELAY_METRICS: RelayMetrics = RelayMetrics {
    frames_sent: AtomicU64::new(0),
    datagrams_sent: AtomicU64::new(0),
    datagrams_received: AtomicU64::new(0),
    datagrams_dropped: AtomicU64::new(0),
    frames_received: AtomicU64::new(0),
    retransmits: AtomicU64::new(0),
    nack_misses: AtomicU64::new(0),
    nacks_sent: AtomicU64::new(0),
    frames_skipped: AtomicU64::new(0),
    keyframe_requests_sent: AtomicU64::new(0),
    keyframe_requests_received: AtomicU64::new(0),
    congestion_reports_sent: AtomicU64::new(0),
    layers_shed: AtomicU64::new(0),
    garbage: AtomicU64::new(0),
    transit_count: AtomicU64::new(0),
    transit_us_sum: AtomicU64::new(0),
};

impl RelayMetrics {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, s: &mut String) {
        let rows: [(&str, &str, &AtomicU64); 16] = [
            ("arbor_relay_congestion_reports_total", "Congestion reports sent upstream (loss before repair above 10% on a relayed flow).", &self.congestion_reports_sent),
            ("arbor_relay_layers_shed_total", "Simulcast layers a sending hop stopped relaying on a link because of congestion reports.", &self.layers_shed),
            ("arbor_relay_transit_frames_total", "Relayed frames whose transit from ingest was measured at this hop.", &self.transit_count),
            ("arbor_relay_transit_microseconds_total", "Sum of relayed frames' transit from ingest (first node) to release at this hop, in microseconds (mean = this / arbor_relay_transit_frames_total).", &self.transit_us_sum),
            (
                "arbor_relay_frames_sent_total",
                "Frames sent on relay links.",
                &self.frames_sent,
            ),
            (
                "arbor_relay_datagrams_sent_total",
                "Datagrams sent on relay links (retransmissions included).",
                &self.datagrams_sent,
            ),
            (
                "arbor_relay_datagrams_received_total",
                "Datagrams received on relay links.",
                &self.datagrams_received,
            ),
            (
                "arbor_relay_datagrams_dropped_total",
                "Relay datagrams that could not be sent (no connection, too large, queue full).",
                &self.datagrams_dropped,
            ),
            (
                "arbor_relay_frames_received_total",
                "Frames reassembled from relay links.",
                &self.frames_received,
            ),
            (
                "arbor_relay_retransmissions_total",
                "Datagrams resent from this hop's cache in answer to a NACK.",
                &self.retransmits,
            ),
            (
                "arbor_relay_nack_misses_total",
                "NACKed datagrams no longer in this hop's cache.",
                &self.nack_misses,
            ),
            (
                "arbor_relay_nacks_sent_total",
                "Sequence numbers NACKed upstream.",
                &self.nacks_sent,
            ),
            (
                "arbor_relay_frames_skipped_total",
                "Frames given up after the hold time (lost beyond repair).",
                &self.frames_skipped,
            ),
            (
                "arbor_relay_keyframe_requests_sent_total",
                "Keyframe requests sent upstream on relay links.",
                &self.keyframe_requests_sent,
            ),
            (
                "arbor_relay_keyframe_requests_received_total",
                "Keyframe requests received from downstream relay links.",
                &self.keyframe_requests_received,
            ),
            (
                "arbor_relay_garbage_total",
                "Undecodable relay datagrams.",
                &self.garbage,
            ),
        ];
        for (name, help, v) in rows {
            let v = v.load(Relaxed);
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
    }
}

/// Limits of the relay endpoints (all bounded; see [`RelayLimits::default`]).
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Datagrams kept per flow for retransmission.
    pub cache_packets: usize,
    /// Missing sequence numbers tracked per flow.
    pub max_missing: usize,
    /// Incomplete frames held per flow.
    pub max_frames: usize,
    /// How long a missing frame may hold back the frames behind it.
    pub max_hold: Duration,
    /// Delay between NACKs of the same packet.
    pub nack_retry: Duration,
    /// NACKs per missing packet.
    pub nack_tries: u8,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            cache_packets: 4096,
            max_missing: 1024,
            max_frames: 256,
            max_hold: Duration::from_millis(400),
            nack_retry: Duration::from_millis(120),
            nack_tries: 3,
        }
    }
}

/// One frame as the engine hands it to, or gets it from, the relay.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayFrame {
    /// Simulcast layer id (LiveKit: `q`, `h`, `f`), if any. str0m's `Rid` is an inline
    /// `Copy` value, so carrying it costs no allocation per frame.
    pub rid: Option<Rid>,
    /// RTP media time numerator (the clock rate is in the codec parameters).
    pub time: u64,
    /// Wall-clock microseconds at which the frame entered the fabric (the first node had it
    /// complete). Each hop measures its transit from it (`arbor_relay_transit_*`; meaningful
    /// when the nodes' clocks are synchronised, as the Raft leases already assume).
    pub ingest_us: u64,
    pub keyframe: bool,
    /// RFC 6464 level (−dBov) of an audio frame, if the publisher sent it.
    pub audio_level: Option<i8>,
    /// Codec parameters (str0m `PayloadParams` as JSON), when carried.
    pub params: Option<Arc<[u8]>>,
    pub payload: Arc<[u8]>,
    /// False when frames before this one were lost beyond repair.
    pub contiguous: bool,
}

/// A decoded relay datagram.
#[derive(Debug, Clone, PartialEq)]
pub enum Datagram<'a> {
    Fragment(Fragment<'a>),
    Nack {
        flow: u64,
        seqs: Vec<u32>,
    },
    Keyframe {
        flow: u64,
        rank: u8,
    },
    Congestion {
        flow: u64,
        loss_permille: u16,
    },
    /// RTP mode: one RTP packet of a relayed track.
    Rtp(RtpDatagram<'a>),
    /// RTP mode: the codec parameters (str0m `PayloadParams`, JSON) of payload type `pt`.
    Params {
        flow: u64,
        seq: u32,
        pt: u8,
        params: &'a [u8],
    },
}

/// One relayed RTP packet: the publisher's RTP header fields the next hop needs (its
/// extended sequence number and timestamp, so every hop's rewriters see the source's own
/// numbering), the flow's link sequence number (for NACKs on this hop), and the payload,
/// byte for byte.
#[derive(Debug, Clone, PartialEq)]
pub struct RtpDatagram<'a> {
    pub flow: u64,
    /// Per-flow, per-link sequence number (NACKed on this hop).
    pub seq: u32,
    /// The publisher's payload type; its codec parameters travel in [`Datagram::Params`].
    pub pt: u8,
    /// Extended RTP sequence number of the packet in its source stream.
    pub rtp_seq: u64,
    pub rtp_ts: u32,
    pub marker: bool,
    /// First packet of a keyframe.
    pub keyframe: bool,
    pub ingest_us: u64,
    pub audio_level: Option<i8>,
    pub voice_activity: Option<bool>,
    pub rid: Option<&'a str>,
    /// The AV1 dependency descriptor the publisher sent with this packet, byte for byte (the
    /// receiving node's SVC selector reads the layers from it and forwards it).
    pub dd: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// An RTP packet as the engine hands it to a [`RelaySender`].
#[derive(Debug, Clone)]
pub struct RelayRtp<'a> {
    pub pt: u8,
    pub rtp_seq: u64,
    pub rtp_ts: u32,
    pub marker: bool,
    pub keyframe: bool,
    pub ingest_us: u64,
    pub audio_level: Option<i8>,
    pub voice_activity: Option<bool>,
    pub rid: Option<Rid>,
    /// The AV1 dependency descriptor to carry (dropped when longer than [`MAX_DD`]).
    pub dd: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// One fragment of a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment<'a> {
    pub flow: u64,
    pub seq: u32,
    pub frame: u32,
    pub index: u16,
    pub count: u16,
    pub keyframe: bool,
    pub time: u64,
    pub ingest_us: u64,
    pub audio_level: Option<i8>,
    pub rid: Option<&'a str>,
    pub params: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A simulcast rid: one length byte (0: none, at most `MAX_RID`), then UTF-8.
    fn rid(&mut self) -> Result<Option<&'a str>, RelayError> {
        let len = self.u8()? as usize;
        if len > MAX_RID {
            return Err(RelayError::Invalid("rid length"));
        }
        if len == 0 {
            return Ok(None);
        }
        std::str::from_utf8(self.take(len)?)
            .map(Some)
            .map_err(|_| RelayError::Invalid("rid"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RelayError> {
        if self.0.len() < n {
            return Err(RelayError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, RelayError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RelayError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, RelayError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, RelayError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

/// Decodes one relay datagram. Never panics; garbage is an error.
pub fn decode(buf: &[u8]) -> Result<Datagram<'_>, RelayError> {
    let mut r = Reader(buf);
    match r.u8()? {
        KIND_FRAGMENT => {
            let flow = r.u64()?;
            let seq = r.u32()?;
            let frame = r.u32()?;
            let index = r.u16()?;
            let count = r.u16()?;
            let flags = r.u8()?;
            let time = r.u64()?;
            let ingest_us = r.u64()?;
            if count == 0 || index >= count {
                return Err(RelayError::Invalid("fragment index"));
            }
            let audio_level = if flags & FLAG_LEVEL != 0 {
                Some(r.u8()? as i8)
            } else {
                None
            };
            let rid = r.rid()?;
            let params = if flags & FLAG_PARAMS != 0 {
                let n = r.u16()? as usize;
                if n > MAX_PARAMS_BYTES {
                    return Err(RelayError::Invalid("params length"));
                }
                Some(r.take(n)?)
            } else {
                None
            };
            Ok(Datagram::Fragment(Fragment {
                flow,
                seq,
                frame,
                index,
                count,
                keyframe: flags & FLAG_KEYFRAME != 0,
                time,
                ingest_us,
                audio_level,
                rid,
                params,
                payload: r.0,
            }))
        }
        KIND_NACK => {
            let flow = r.u64()?;
            let n = r.u16()? as usize;
            if n > MAX_NACK_SEQS {
                return Err(RelayError::Invalid("nack count"));
            }
            let mut seqs = Vec::with_capacity(n);
            for _ in 0..n {
                seqs.push(r.u32()?);
            }
            Ok(Datagram::Nack { flow, seqs })
        }
        KIND_KEYFRAME => {
            let flow = r.u64()?;
            let rank = r.u8()?;
            if rank > 3 {
                return Err(RelayError::Invalid("keyframe rank"));
            }
            Ok(Datagram::Keyframe { flow, rank })
        }
        KIND_CONGESTION => {
            let flow = r.u64()?;
            let loss_permille = r.u16()?;
            if loss_permille > 1000 {
                return Err(RelayError::Invalid("loss"));
            }
            Ok(Datagram::Congestion {
                flow,
                loss_permille,
            })
        }
        KIND_RTP => {
            let flow = r.u64()?;
            let seq = r.u32()?;
            let flags = r.u8()?;
            let pt = r.u8()?;
            if pt > 127 {
                return Err(RelayError::Invalid("payload type"));
            }
            let rtp_seq = r.u64()?;
            let rtp_ts = r.u32()?;
            let ingest_us = r.u64()?;
            let audio_level = if flags & FLAG_LEVEL != 0 {
                let l = r.u8()? as i8;
                if !(-127..=0).contains(&l) {
                    return Err(RelayError::Invalid("audio level"));
                }
                Some(l)
            } else {
                None
            };
            let rid = r.rid()?;
            let dd = if flags & FLAG_DD != 0 {
                let n = r.u8()? as usize;
                if n < MIN_DD {
                    return Err(RelayError::Invalid("dependency descriptor length"));
                }
                Some(r.take(n)?)
            } else {
                None
            };
            Ok(Datagram::Rtp(RtpDatagram {
                flow,
                seq,
                pt,
                rtp_seq,
                rtp_ts,
                marker: flags & FLAG_MARKER != 0,
                keyframe: flags & FLAG_KEYFRAME != 0,
                ingest_us,
                audio_level,
                voice_activity: (flags & FLAG_LEVEL != 0).then_some(flags & FLAG_VOICE != 0),
                rid,
                dd,
                payload: r.0,
            }))
        }
        KIND_PARAMS => {
            let flow = r.u64()?;
            let seq = r.u32()?;
            let pt = r.u8()?;
            let n = r.u16()? as usize;
            if n > MAX_PARAMS_BYTES || pt > 127 {
                return Err(RelayError::Invalid("params"));
            }
            let params = r.take(n)?;
            Ok(Datagram::Params {
                flow,
                seq,
                pt,
                params,
            })
        }
        k => Err(RelayError::UnknownKind(k)),
    }
}

/// Encodes a NACK datagram (at most [`MAX_NACK_SEQS`] sequence numbers; the rest is cut).
pub fn encode_nack(flow: u64, seqs: &[u32]) -> Vec<u8> {
    let seqs = &seqs[..seqs.len().min(MAX_NACK_SEQS)];
    let mut out = Vec::with_capacity(11 + 4 * seqs.len());
    out.push(KIND_NACK);
    out.extend_from_slice(&flow.to_be_bytes());
    out.extend_from_slice(&(seqs.len() as u16).to_be_bytes());
    for s in seqs {
        out.extend_from_slice(&s.to_be_bytes());
    }
    out
}

/// Encodes a keyframe request for `flow` (rank 0: every layer).
pub fn encode_keyframe(flow: u64, rank: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.push(KIND_KEYFRAME);
    out.extend_from_slice(&flow.to_be_bytes());
    out.push(rank.min(3));
    out
}

/// Encodes a congestion report for `flow` (`loss` is a fraction, clamped to 0..=1).
pub fn encode_congestion(flow: u64, loss: f32) -> Vec<u8> {
    let permille = (loss.clamp(0.0, 1.0) * 1000.0) as u16;
    let mut out = Vec::with_capacity(11);
    out.push(KIND_CONGESTION);
    out.extend_from_slice(&flow.to_be_bytes());
    out.extend_from_slice(&permille.to_be_bytes());
    out
}

/// The sending half of one flow on one link: fragments frames, keeps a bounded cache, answers
/// NACKs from it.
#[derive(Debug)]
pub struct RelaySender {
    flow: u64,
    next_seq: u32,
    next_frame: u32,
    frames_since_params: u32,
    /// RTP mode: the payload type whose parameters were sent last.
    params_pt: Option<u8>,
    /// (seq, datagram), oldest first, at most `limits.cache_packets`.
    cache: VecDeque<(u32, Arc<[u8]>)>,
    limits: RelayLimits,
}

impl RelaySender {
    pub fn new(flow: u64, limits: RelayLimits) -> Self {
        RelaySender {
            flow,
            next_seq: 0,
            next_frame: 0,
            frames_since_params: PARAMS_EVERY,
            params_pt: None,
            cache: VecDeque::new(),
            limits,
        }
    }

    pub fn flow(&self) -> u64 {
        self.flow
    }

    /// Cuts `frame` into datagrams of at most `max_datagram` bytes (which the caller sends, in
    /// order). `params` go along when due (first frame, keyframes, every [`PARAMS_EVERY`]).
    pub fn push(
        &mut self,
        frame: &RelayFrame,
        params: Option<&[u8]>,
        max_datagram: usize,
    ) -> Vec<Arc<[u8]>> {
        let rid: &str = frame.rid.as_deref().unwrap_or("");
        let rid = &rid[..rid.len().min(MAX_RID)];
        let params = params.filter(|p| {
            p.len() <= MAX_PARAMS_BYTES
                && (frame.keyframe || self.frames_since_params >= PARAMS_EVERY)
        });
        if params.is_some() {
            self.frames_since_params = 0;
        } else {
            self.frames_since_params = self.frames_since_params.saturating_add(1);
        }
        let head = FRAGMENT_HEADER + 1 + rid.len();
        let first_extra = params.map_or(0, |p| 2 + p.len());
        let room = max_datagram.saturating_sub(head);
        if room <= first_extra + 16 || frame.payload.len() > MAX_FRAME_BYTES {
            RELAY_METRICS.datagrams_dropped.fetch_add(1, Relaxed);
            return Vec::new();
        }
        // Fragment sizes: the first carries the params.
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        let total = frame.payload.len();
        let mut first = true;
        while at < total || chunks.is_empty() {
            let cap = if first { room - first_extra } else { room };
            let n = cap.min(total - at);
            chunks.push((at, n));
            at += n;
            first = false;
        }
        let Ok(count) = u16::try_from(chunks.len()) else {
            RELAY_METRICS.datagrams_dropped.fetch_add(1, Relaxed);
            return Vec::new();
        };
        let frame_no = self.next_frame;
        self.next_frame = self.next_frame.wrapping_add(1);
        let mut out = Vec::with_capacity(chunks.len());
        for (i, (start, n)) in chunks.into_iter().enumerate() {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            let with_params = if i == 0 { params } else { None };
            let mut flags = 0;
            if frame.keyframe {
                flags |= FLAG_KEYFRAME;
            }
            if with_params.is_some() {
                flags |= FLAG_PARAMS;
            }
            if frame.audio_level.is_some() {
                flags |= FLAG_LEVEL;
            }
            let mut d = Vec::with_capacity(head + first_extra + n + 1);
            d.push(KIND_FRAGMENT);
            d.extend_from_slice(&self.flow.to_be_bytes());
            d.extend_from_slice(&seq.to_be_bytes());
            d.extend_from_slice(&frame_no.to_be_bytes());
            d.extend_from_slice(&(i as u16).to_be_bytes());
            d.extend_from_slice(&count.to_be_bytes());
            d.push(flags);
            d.extend_from_slice(&frame.time.to_be_bytes());
            d.extend_from_slice(&frame.ingest_us.to_be_bytes());
            if let Some(l) = frame.audio_level {
                d.push(l as u8);
            }
            d.push(rid.len() as u8);
            d.extend_from_slice(rid.as_bytes());
            if let Some(p) = with_params {
                d.extend_from_slice(&(p.len() as u16).to_be_bytes());
                d.extend_from_slice(p);
            }
            d.extend_from_slice(&frame.payload[start..start + n]);
            let d: Arc<[u8]> = d.into();
            self.cache.push_back((seq, d.clone()));
            while self.cache.len() > self.limits.cache_packets {
                self.cache.pop_front();
            }
            out.push(d);
        }
        RELAY_METRICS.frames_sent.fetch_add(1, Relaxed);
        out
    }

    /// RTP mode: encodes one RTP packet for this link (after the codec parameters of its
    /// payload type when they are due: the first packet, a change of payload type, every
    /// keyframe, and every [`PARAMS_EVERY`]th packet), caches what it emits for NACKs and
    /// hands each datagram to `emit`, in order. A packet that does not fit `max_datagram` is
    /// dropped and counted.
    pub fn push_rtp(
        &mut self,
        p: &RelayRtp<'_>,
        params: Option<&[u8]>,
        max_datagram: usize,
        mut emit: impl FnMut(&[u8]),
    ) {
        let rid: &str = p.rid.as_deref().unwrap_or("");
        let rid = &rid[..rid.len().min(MAX_RID)];
        let dd = p.dd.filter(|d| (MIN_DD..=MAX_DD).contains(&d.len()));
        let dd_len = dd.map_or(0, |d| 1 + d.len());
        if RTP_HEADER + rid.len() + dd_len + p.payload.len() > max_datagram {
            RELAY_METRICS.datagrams_dropped.fetch_add(1, Relaxed);
            return;
        }
        let due =
            p.keyframe || self.frames_since_params >= PARAMS_EVERY || self.params_pt != Some(p.pt);
        if let Some(params) = params.filter(|b| due && b.len() <= MAX_PARAMS_BYTES) {
            let mut d = Vec::with_capacity(16 + params.len());
            d.push(KIND_PARAMS);
            d.extend_from_slice(&self.flow.to_be_bytes());
            d.extend_from_slice(&self.next_seq.to_be_bytes());
            d.push(p.pt);
            d.extend_from_slice(&(params.len() as u16).to_be_bytes());
            d.extend_from_slice(params);
            self.params_pt = Some(p.pt);
            self.frames_since_params = 0;
            self.store(d.into(), &mut emit);
        }
        self.frames_since_params = self.frames_since_params.saturating_add(1);
        let mut flags = 0;
        if p.keyframe {
            flags |= FLAG_KEYFRAME;
        }
        if p.marker {
            flags |= FLAG_MARKER;
        }
        if p.audio_level.is_some() {
            flags |= FLAG_LEVEL;
            if p.voice_activity == Some(true) {
                flags |= FLAG_VOICE;
            }
        }
        if dd.is_some() {
            flags |= FLAG_DD;
        }
        let mut d = Vec::with_capacity(RTP_HEADER + rid.len() + dd_len + p.payload.len());
        d.push(KIND_RTP);
        d.extend_from_slice(&self.flow.to_be_bytes());
        d.extend_from_slice(&self.next_seq.to_be_bytes());
        d.push(flags);
        d.push(p.pt & 0x7f);
        d.extend_from_slice(&p.rtp_seq.to_be_bytes());
        d.extend_from_slice(&p.rtp_ts.to_be_bytes());
        d.extend_from_slice(&p.ingest_us.to_be_bytes());
        if let Some(l) = p.audio_level {
            d.push(l.clamp(-127, 0) as u8);
        }
        d.push(rid.len() as u8);
        d.extend_from_slice(rid.as_bytes());
        if let Some(dd) = dd {
            d.push(dd.len() as u8);
            d.extend_from_slice(dd);
        }
        d.extend_from_slice(p.payload);
        self.store(d.into(), &mut emit);
        RELAY_METRICS.frames_sent.fetch_add(1, Relaxed);
    }

    /// Numbers, caches and emits one datagram whose sequence number is `self.next_seq`.
    fn store(&mut self, d: Arc<[u8]>, emit: &mut impl FnMut(&[u8])) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        emit(&d);
        self.cache.push_back((seq, d));
        while self.cache.len() > self.limits.cache_packets {
            self.cache.pop_front();
        }
    }

    /// Datagrams to resend for a NACK (those still cached).
    pub fn on_nack(&mut self, seqs: &[u32]) -> Vec<Arc<[u8]>> {
        let mut out = Vec::new();
        for s in seqs {
            // The cache is ordered by seq (modulo wrap): binary search on the distance from
            // the oldest entry.
            let Some(&(oldest, _)) = self.cache.front() else {
                RELAY_METRICS.nack_misses.fetch_add(1, Relaxed);
                continue;
            };
            let idx = s.wrapping_sub(oldest) as usize;
            match self.cache.get(idx) {
                Some((seq, d)) if seq == s => {
                    out.push(d.clone());
                    RELAY_METRICS.retransmits.fetch_add(1, Relaxed);
                }
                _ => {
                    RELAY_METRICS.nack_misses.fetch_add(1, Relaxed);
                }
            }
        }
        out
    }
}

#[derive(Debug)]
struct Missing {
    last_nack: Option<Instant>,
    tries: u8,
}

#[derive(Debug)]
struct Partial {
    parts: Vec<Option<Vec<u8>>>,
    have: usize,
    keyframe: bool,
    time: u64,
    ingest_us: u64,
    audio_level: Option<i8>,
    rid: Option<Rid>,
    params: Option<Arc<[u8]>>,
    /// When the first fragment arrived.
    first_at: Instant,
}

/// The receiving half of one flow on one link: reassembly, gap detection, NACKs, in-order
/// release with a bounded hold.
#[derive(Debug)]
pub struct RelayReceiver {
    flow: u64,
    limits: RelayLimits,
    /// Highest sequence number seen (extended to 64 bits).
    highest: Option<u64>,
    missing: BTreeMap<u64, Missing>,
    frames: BTreeMap<u64, Partial>,
    /// Next frame number to release (extended).
    next_frame: Option<u64>,
    /// When the head-of-line frame started blocking.
    blocked_since: Option<Instant>,
    /// A frame was skipped: the next released one is not contiguous.
    gap: bool,
    /// Latest codec parameters received.
    params: Option<Arc<[u8]>>,
    /// Datagrams received and sequence numbers found missing since the last loss report.
    window: (u64, u64),
}

/// Extends a 32-bit counter to 64 bits next to a reference value.
fn extend(reference: Option<u64>, v: u32) -> u64 {
    let Some(r) = reference else {
        return v as u64 + (1 << 32);
    };
    let base = r & !0xffff_ffff;
    let cands = [
        base.wrapping_sub(1 << 32) | v as u64,
        base | v as u64,
        base.wrapping_add(1 << 32) | v as u64,
    ];
    cands
        .into_iter()
        .min_by_key(|c| c.abs_diff(r))
        .unwrap_or(base | v as u64)
}

impl RelayReceiver {
    pub fn new(flow: u64, limits: RelayLimits) -> Self {
        RelayReceiver {
            flow,
            limits,
            highest: None,
            missing: BTreeMap::new(),
            frames: BTreeMap::new(),
            next_frame: None,
            blocked_since: None,
            gap: false,
            params: None,
            window: (0, 0),
        }
    }

    /// Loss before repair since the last call (`None` when too few datagrams arrived to say).
    pub fn take_loss(&mut self) -> Option<f32> {
        let (got, missing) = std::mem::take(&mut self.window);
        if got + missing < CONGESTION_MIN_PACKETS {
            return None;
        }
        Some(missing as f32 / (got + missing) as f32)
    }

    pub fn flow(&self) -> u64 {
        self.flow
    }

    /// The latest codec parameters this flow carried.
    pub fn params(&self) -> Option<&Arc<[u8]>> {
        self.params.as_ref()
    }

    /// Records the arrival of link sequence number `seq`: notes the gap before it (to be
    /// NACKed) or fills one. Returns false for a duplicate.
    fn on_seq(&mut self, seq: u32) -> bool {
        let seq = extend(self.highest, seq);
        self.window.0 += 1;
        match self.highest {
            None => self.highest = Some(seq),
            Some(h) if seq > h => {
                // Everything between is missing (bounded: a huge jump resets the tracking).
                let gap = seq - h - 1;
                if gap as usize > self.limits.max_missing {
                    self.missing.clear();
                } else {
                    self.window.1 += gap;
                    for s in h + 1..seq {
                        self.missing.insert(
                            s,
                            Missing {
                                last_nack: None,
                                tries: 0,
                            },
                        );
                    }
                }
                self.highest = Some(seq);
            }
            Some(_) => {
                self.window.0 -= 1;
                if self.missing.remove(&seq).is_none() {
                    return false; // a duplicate
                }
                // A repair: counted as missing when the gap was seen, not as received.
            }
        }
        while self.missing.len() > self.limits.max_missing {
            self.missing.pop_first();
        }
        true
    }

    /// RTP mode: takes one relayed RTP packet (or codec-parameter datagram) by its link
    /// sequence number. Packets are released at once, in arrival order (the subscribers'
    /// jitter buffers reorder); returns false for a duplicate, which must not be forwarded.
    pub fn on_rtp_seq(&mut self, seq: u32) -> bool {
        let fresh = self.on_seq(seq);
        if fresh {
            RELAY_METRICS.frames_received.fetch_add(1, Relaxed);
        }
        fresh
    }

    /// Takes one fragment.
    pub fn on_fragment(&mut self, now: Instant, f: &Fragment<'_>) {
        if !self.on_seq(f.seq) {
            return;
        }
        let frame = extend(
            self.next_frame.or(self.frames.keys().next().copied()),
            f.frame,
        );
        if self.next_frame.is_none() {
            self.next_frame = Some(frame);
        }
        if self.next_frame.is_some_and(|n| frame < n) {
            return; // already released or skipped
        }
        if f.count as usize * 1500 > MAX_FRAME_BYTES * 2 {
            RELAY_METRICS.garbage.fetch_add(1, Relaxed);
            return;
        }
        if !self.frames.contains_key(&frame) && self.frames.len() >= self.limits.max_frames {
            // Too much in flight: drop the oldest incomplete frame.
            self.frames.pop_first();
            self.gap = true;
            RELAY_METRICS.frames_skipped.fetch_add(1, Relaxed);
        }
        let p = self.frames.entry(frame).or_insert_with(|| Partial {
            parts: vec![None; f.count as usize],
            have: 0,
            keyframe: f.keyframe,
            time: f.time,
            ingest_us: f.ingest_us,
            audio_level: f.audio_level,
            rid: f.rid.map(Rid::from),
            params: None,
            first_at: now,
        });
        let i = f.index as usize;
        if p.parts.len() != f.count as usize || i >= p.parts.len() || p.parts[i].is_some() {
            return;
        }
        p.parts[i] = Some(f.payload.to_vec());
        p.have += 1;
        if let Some(params) = f.params {
            let params: Arc<[u8]> = params.into();
            p.params = Some(params.clone());
            self.params = Some(params);
        }
    }

    /// Sequence numbers to NACK now (each at most `nack_tries` times, `nack_retry` apart).
    pub fn poll_nacks(&mut self, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        let mut exhausted = Vec::new();
        for (s, m) in self.missing.iter_mut() {
            if m.last_nack
                .is_some_and(|t| now.saturating_duration_since(t) < self.limits.nack_retry)
            {
                continue;
            }
            if m.tries >= self.limits.nack_tries {
                exhausted.push(*s);
                continue;
            }
            m.tries += 1;
            m.last_nack = Some(now);
            out.push(*s as u32);
            if out.len() >= MAX_NACK_SEQS {
                break;
            }
        }
        for s in exhausted {
            self.missing.remove(&s);
        }
        RELAY_METRICS
            .nacks_sent
            .fetch_add(out.len() as u64, Relaxed);
        out
    }

    /// Frames ready for the engine, in order.
    pub fn poll_frames(&mut self, now: Instant) -> Vec<RelayFrame> {
        let mut out = Vec::new();
        loop {
            let Some(next) = self.next_frame else {
                return out;
            };
            let complete = self
                .frames
                .get(&next)
                .is_some_and(|p| p.have == p.parts.len());
            if complete {
                let Some(p) = self.frames.remove(&next) else {
                    return out;
                };
                let mut payload = Vec::with_capacity(p.parts.iter().flatten().map(Vec::len).sum());
                for part in p.parts.into_iter().flatten() {
                    payload.extend_from_slice(&part);
                }
                out.push(RelayFrame {
                    rid: p.rid,
                    time: p.time,
                    ingest_us: p.ingest_us,
                    keyframe: p.keyframe,
                    audio_level: p.audio_level,
                    params: p.params,
                    payload: payload.into(),
                    contiguous: !std::mem::take(&mut self.gap),
                });
                RELAY_METRICS.frames_received.fetch_add(1, Relaxed);
                self.next_frame = Some(next + 1);
                self.blocked_since = None;
                continue;
            }
            // The head frame is incomplete (or not even started). Wait while frames behind it
            // exist, up to max_hold.
            let Some((&later, _)) = self.frames.range(next..).next() else {
                self.blocked_since = None;
                return out;
            };
            let since = *self.blocked_since.get_or_insert(
                self.frames
                    .get(&next)
                    .map(|p| p.first_at)
                    .unwrap_or(now)
                    .min(now),
            );
            if now.saturating_duration_since(since) < self.limits.max_hold {
                return out;
            }
            // Give up on everything before the next frame that is present.
            let skip_to = if later == next { next + 1 } else { later };
            for f in next..skip_to {
                self.frames.remove(&f);
            }
            RELAY_METRICS
                .frames_skipped
                .fetch_add(skip_to - next, Relaxed);
            self.gap = true;
            self.next_frame = Some(skip_to);
            self.blocked_since = None;
        }
    }

    /// When [`RelayReceiver::poll_frames`] / [`RelayReceiver::poll_nacks`] next have work
    /// without new input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hold = self.blocked_since.map(|t| t + self.limits.max_hold);
        let nack = self
            .missing
            .values()
            .filter_map(|m| m.last_nack.map(|t| t + self.limits.nack_retry))
            .min();
        match (hold, nack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn frame(i: u64, len: usize, key: bool) -> RelayFrame {
        RelayFrame {
            rid: Some("h".into()),
            time: i * 3000,
            ingest_us: 1_000_000 + i,
            keyframe: key,
            audio_level: None,
            params: None,
            payload: (0..len)
                .map(|b| (b as u64 ^ i) as u8)
                .collect::<Vec<_>>()
                .into(),
            contiguous: true,
        }
    }

    #[test]
    fn datagrams_round_trip_and_garbage_is_an_error() {
        let mut s = RelaySender::new(7, RelayLimits::default());
        let f = frame(1, 3000, true);
        let ds = s.push(&f, Some(b"{\"pt\":96}"), 1200);
        assert_eq!(ds.len(), 3);
        let Datagram::Fragment(first) = decode(&ds[0]).unwrap() else {
            panic!("not a fragment");
        };
        assert_eq!(
            (first.flow, first.seq, first.index, first.count),
            (7, 0, 0, 3)
        );
        assert_eq!(first.params, Some(&b"{\"pt\":96}"[..]));
        assert_eq!(first.rid, Some("h"));
        assert!(first.keyframe);
        for n in [
            encode_nack(7, &[1, 2, 3]),
            encode_keyframe(7, 2),
            encode_congestion(7, 0.2),
        ] {
            assert!(decode(&n).is_ok());
        }
        assert_eq!(decode(&[]), Err(RelayError::Truncated));
        assert_eq!(decode(&[9]), Err(RelayError::UnknownKind(9)));
        // Every truncation of a valid datagram is an error, never a panic.
        for d in &ds {
            for cut in 0..d.len().min(60) {
                let _ = decode(&d[..cut]);
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let n = rng.random_range(0..80);
            let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            let _ = decode(&junk);
        }
    }

    fn rtp(i: u64, key: bool, payload: &[u8]) -> RelayRtp<'_> {
        RelayRtp {
            pt: 96,
            rtp_seq: 70_000 + i,
            rtp_ts: (i * 3000) as u32,
            marker: i % 2 == 1,
            keyframe: key,
            ingest_us: 5 + i,
            audio_level: i.is_multiple_of(3).then_some(-30),
            voice_activity: i.is_multiple_of(3).then_some(true),
            rid: Some("f".into()),
            dd: i.is_multiple_of(2).then_some(&DD[..]),
            payload,
        }
    }

    /// A dependency descriptor as the relay carries it (opaque bytes here).
    const DD: [u8; 5] = [0x80, 0x01, 0x02, 0x03, 0x04];

    /// RTP mode: a packet crosses a link byte for byte with its header fields; the codec
    /// parameters go first (first packet, keyframes, every PARAMS_EVERY packets) and take a
    /// link sequence number of their own, so NACKs repair them too.
    #[test]
    fn rtp_datagrams_round_trip_with_their_parameters() {
        let mut s = RelaySender::new(9, RelayLimits::default());
        let payload: Vec<u8> = (0..1000).map(|b| b as u8).collect();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for i in 0..(PARAMS_EVERY as u64 + 2) {
            s.push_rtp(&rtp(i, i == 0, &payload), Some(b"{\"pt\":96}"), 1200, |d| {
                got.push(d.to_vec())
            });
        }
        // params, packet 0, ..., packet 63, params, packet 64, packet 65
        assert_eq!(got.len(), PARAMS_EVERY as usize + 4);
        let Ok(Datagram::Params {
            flow,
            seq,
            pt,
            params,
        }) = decode(&got[0])
        else {
            panic!("parameters first");
        };
        assert_eq!((flow, seq, pt, params), (9, 0, 96, &b"{\"pt\":96}"[..]));
        let Ok(Datagram::Rtp(r)) = decode(&got[1]) else {
            panic!("then the packet");
        };
        assert_eq!(
            (r.flow, r.seq, r.pt, r.rtp_seq, r.rtp_ts, r.marker, r.keyframe),
            (9, 1, 96, 70_000, 0, false, true)
        );
        assert_eq!(
            (r.audio_level, r.voice_activity, r.rid, r.dd),
            (Some(-30), Some(true), Some("f"), Some(&DD[..]))
        );
        assert_eq!(r.payload, &payload[..]);
        let Ok(Datagram::Rtp(r)) = decode(&got[2]) else {
            panic!("a packet");
        };
        assert_eq!(
            (r.rtp_seq, r.marker, r.keyframe, r.audio_level, r.dd),
            (70_001, true, false, None, None)
        );
        assert_eq!(r.payload, &payload[..]);
        // A descriptor shorter than its mandatory fields is refused (never read as payload).
        let mut short = got[1].clone();
        // The length byte follows the header (level byte and rid length included) and "f".
        let at = RTP_HEADER + 1;
        assert_eq!(short[at], DD.len() as u8);
        short[at] = 2;
        assert!(decode(&short).is_err());
        assert!(matches!(
            decode(&got[PARAMS_EVERY as usize + 1]),
            Ok(Datagram::Params { .. })
        ));
        // NACKs are answered from the cache, parameters included.
        assert_eq!(s.on_nack(&[0, 1]).len(), 2);
        // A packet too large for the link is dropped, never cut.
        let big = vec![0u8; 1300];
        let mut n = 0;
        s.push_rtp(&rtp(99, false, &big), None, 1200, |_| n += 1);
        assert_eq!(n, 0);
        // Truncations and junk in RTP/params datagrams are errors, never panics.
        for d in &got[..3] {
            for cut in 0..d.len().min(60) {
                assert!(decode(&d[..cut]).is_err() || cut >= RTP_HEADER - 1);
            }
        }
        // The receiver side: duplicates are refused, gaps NACKed.
        let mut rx = RelayReceiver::new(9, RelayLimits::default());
        assert!(rx.on_rtp_seq(0));
        assert!(rx.on_rtp_seq(3));
        assert!(!rx.on_rtp_seq(3));
        let t = Instant::now();
        assert_eq!(rx.poll_nacks(t), vec![1, 2]);
        assert!(rx.on_rtp_seq(2));
        assert!(!rx.on_rtp_seq(2));
    }

    /// Two relay endpoints wired in memory through a lossy, delaying link (seeded): every frame
    /// arrives, in order, repaired by NACKs from the sender's cache.
    #[test]
    fn lossy_link_is_repaired_by_per_hop_nacks() {
        for loss in [0.0, 0.02, 0.10] {
            let limits = RelayLimits::default();
            let mut tx = RelaySender::new(1, limits);
            let mut rx = RelayReceiver::new(1, limits);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
            let one_way = Duration::from_millis(40);
            let t0 = Instant::now();
            // In-flight datagrams: (arrival, bytes, towards receiver?).
            let mut wire: Vec<(Instant, Arc<[u8]>, bool)> = Vec::new();
            let mut got: Vec<RelayFrame> = Vec::new();
            let mut resent = 0;
            let frames = 300u64;
            let mut now = t0;
            for step in 0..(frames * 33 / 5 + 200) {
                now = t0 + Duration::from_millis(step * 5);
                // 30 fps: a frame every ~33 ms.
                if step % 7 == 0 && step / 7 < frames {
                    let i = step / 7;
                    let len = if i % 30 == 0 {
                        20_000
                    } else {
                        1_500 + (i as usize * 37) % 3000
                    };
                    for d in tx.push(&frame(i, len, i % 30 == 0), Some(b"p"), 1200) {
                        if !rng.random_bool(loss) {
                            wire.push((now + one_way, d, true));
                        }
                    }
                }
                let (due, rest): (Vec<_>, Vec<_>) =
                    wire.into_iter().partition(|(t, _, _)| *t <= now);
                wire = rest;
                for (_, d, to_rx) in due {
                    match decode(&d).unwrap() {
                        Datagram::Fragment(f) if to_rx => rx.on_fragment(now, &f),
                        Datagram::Nack { seqs, .. } if !to_rx => {
                            for r in tx.on_nack(&seqs) {
                                resent += 1;
                                if !rng.random_bool(loss) {
                                    wire.push((now + one_way, r, true));
                                }
                            }
                        }
                        _ => panic!("unexpected datagram"),
                    }
                }
                let nacks = rx.poll_nacks(now);
                if !nacks.is_empty() && !rng.random_bool(loss) {
                    wire.push((now + one_way, encode_nack(1, &nacks).into(), false));
                }
                got.extend(rx.poll_frames(now));
            }
            let _ = now;
            // Up to moderate loss every frame is repaired; at 10% (each packet and each NACK
            // lost one time in ten, three NACK rounds) a rare frame is given up: the ones
            // that arrive stay in order, intact, and the one after a gap says so.
            let min = if loss <= 0.02 {
                frames
            } else {
                frames * 98 / 100
            };
            assert!(
                got.len() as u64 >= min,
                "loss {loss}: {} of {frames} frames",
                got.len()
            );
            let mut expected = 0u64;
            for f in &got {
                let i = f.time / 3000;
                assert!(i >= expected, "loss {loss}: out of order");
                assert_eq!(
                    f.contiguous,
                    i == expected,
                    "loss {loss}: contiguity of frame {i}"
                );
                assert_eq!(
                    *f,
                    RelayFrame {
                        contiguous: f.contiguous,
                        params: f.params.clone(),
                        ..frame(i, f.payload.len(), i % 30 == 0)
                    }
                );
                expected = i + 1;
            }
            if loss > 0.0 {
                assert!(resent > 0, "loss {loss}: nothing was retransmitted");
            } else {
                assert_eq!(resent, 0);
            }
            assert!(rx.params().is_some());
        }
    }

    /// A frame lost for good holds the line at most `max_hold`; the next frame is released
    /// marked non-contiguous (the engine then asks upstream for a keyframe).
    #[test]
    fn unrepairable_loss_skips_after_the_hold() {
        let limits = RelayLimits::default();
        let mut tx = RelaySender::new(1, limits);
        let mut rx = RelayReceiver::new(1, limits);
        let t0 = Instant::now();
        let a = tx.push(&frame(0, 100, true), None, 1200);
        let _lost = tx.push(&frame(1, 100, false), None, 1200);
        let c = tx.push(&frame(2, 100, false), None, 1200);
        for d in a.iter().chain(c.iter()) {
            let Datagram::Fragment(f) = decode(d).unwrap() else {
                panic!()
            };
            rx.on_fragment(t0, &f);
        }
        let first = rx.poll_frames(t0);
        assert_eq!(first.len(), 1);
        assert!(rx.poll_frames(t0 + Duration::from_millis(100)).is_empty());
        let later = rx.poll_frames(t0 + limits.max_hold + Duration::from_millis(1));
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].time, 2 * 3000);
        assert!(!later[0].contiguous);
    }

    #[test]
    fn sequence_extension_handles_wrap() {
        let r = extend(None, 5);
        assert_eq!(extend(Some(r), 6), r + 1);
        let near_wrap = (1u64 << 32) + 0xffff_fff0;
        assert_eq!(extend(Some(near_wrap), 3), (2u64 << 32) + 3);
        assert_eq!(extend(Some((2u64 << 32) + 3), 0xffff_fff0), near_wrap);
    }
}
