//! RTP forwarding: what an SFU must know about a packet's payload, and how it rewrites one
//! incoming stream into the continuous outgoing stream each subscriber sees. Pure and sans-IO.
//!
//! In RTP mode (`rtc.rtp_mode`) the engine never depacketises. Each packet a publisher sends
//! is forwarded as is — the same `Arc` payload for every subscriber — with only its header
//! changed per subscriber. Three things make that work:
//!
//! * **Keyframe detection** ([`keyframe_start`]): a subscriber may only start a stream, or
//!   switch simulcast layers, on the *first packet of a keyframe*; anything else would hand
//!   its decoder frames that reference pictures it never saw. Each codec marks that packet
//!   differently in its RTP payload format (VP8 and VP9 payload descriptors, H.264/H.265 NAL
//!   unit types, AV1's aggregation header); [`keyframe_start`] reads just enough of it.
//! * **Header rewriting** ([`Rewriter`]): each simulcast layer is its own RTP stream with its
//!   own sequence numbers, timestamps and (VP8) picture ids. The subscriber sees one stream
//!   whose numbers never jump: when the forwarded source changes (a layer switch, or a resume
//!   after a pause) the rewriter computes new offsets so that the next packet continues where
//!   the last one written left off. The decoder then sees no gap (a gap in sequence numbers
//!   would be NACKed for nothing; a jump in picture id would be taken as lost frames).
//! * **VP8 descriptor patches** ([`vp8_descriptor`]): VP8's picture id and TL0PICIDX live in
//!   the payload, which is shared between subscribers. str0m applies a fixed-size patch while
//!   serialising each copy (`RtpWrite::vp8_patch`), so the shared payload is never copied or
//!   modified.
//!
//! Every parser here takes untrusted bytes and returns `None`/`false` on anything it does not
//! understand; none of them can panic (see the unit tests and `fuzz/fuzz_targets/rtp.rs`).

use std::time::Instant;

/// The codecs whose payload formats the forwarder understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Vp8,
    Vp9,
    H264,
    H265,
    Av1,
    /// Audio (Opus, RED, G.711, ...): every packet is independently decodable.
    Audio,
    /// A video codec this module cannot parse: its keyframes cannot be found, so a subscriber
    /// starts on any packet (the decoder asks for a keyframe itself).
    OtherVideo,
}

impl PayloadKind {
    /// The payload kind of a str0m codec.
    pub fn of(codec: str0m::format::Codec) -> PayloadKind {
        use str0m::format::Codec;
        match codec {
            Codec::Vp8 => PayloadKind::Vp8,
            Codec::Vp9 => PayloadKind::Vp9,
            Codec::H264 => PayloadKind::H264,
            Codec::H265 => PayloadKind::H265,
            Codec::Av1 => PayloadKind::Av1,
            c if c.is_audio() => PayloadKind::Audio,
            _ => PayloadKind::OtherVideo,
        }
    }

    /// Whether a stream of this kind must start on a keyframe.
    pub fn needs_keyframe(self) -> bool {
        !matches!(self, PayloadKind::Audio | PayloadKind::OtherVideo)
    }
}

/// Whether `payload` (an RTP payload, no header) is the first packet of a keyframe.
///
/// Only the first packet matters: the forwarder switches a subscriber at that packet and
/// forwards the rest of the frame because it follows in sequence.
pub fn keyframe_start(kind: PayloadKind, payload: &[u8]) -> bool {
    match kind {
        PayloadKind::Vp8 => vp8_descriptor(payload).is_some_and(|d| d.keyframe_start),
        PayloadKind::Vp9 => vp9_keyframe_start(payload),
        PayloadKind::H264 => h264_keyframe_start(payload),
        PayloadKind::H265 => h265_keyframe_start(payload),
        PayloadKind::Av1 => av1_keyframe_start(payload),
        PayloadKind::Audio | PayloadKind::OtherVideo => false,
    }
}

/// The fields of a VP8 payload descriptor (RFC 7741 §4.2) the forwarder uses.
///
/// ```text
///       0 1 2 3 4 5 6 7
///      +-+-+-+-+-+-+-+-+
///      |X|R|N|S|R| PID | (REQUIRED)
///      +-+-+-+-+-+-+-+-+
/// X:   |I|L|T|K| RSV   | (OPTIONAL)
///      +-+-+-+-+-+-+-+-+
/// I:   |M| PictureID   | (OPTIONAL, M=1: 15 bits over two octets)
///      +-+-+-+-+-+-+-+-+
/// L:   |   TL0PICIDX   | (OPTIONAL)
///      +-+-+-+-+-+-+-+-+
/// T/K: |TID|Y| KEYIDX  | (OPTIONAL)
///      +-+-+-+-+-+-+-+-+
/// ```
///
/// followed, on the first packet of a frame (S=1, PID=0), by the VP8 payload header whose
/// lowest bit P is 0 for a keyframe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// PictureID and whether it is 15 bits wide.
    pub picture_id: Option<(u16, bool)>,
    pub tl0_pic_idx: Option<u8>,
    /// Temporal layer index, if the T bit is set.
    pub tid: Option<u8>,
    /// First packet of a keyframe.
    pub keyframe_start: bool,
}

/// Parses a VP8 payload descriptor; `None` if it is truncated or malformed.
pub fn vp8_descriptor(p: &[u8]) -> Option<Vp8Descriptor> {
    let b0 = *p.first()?;
    let mut at = 1;
    let mut d = Vp8Descriptor {
        picture_id: None,
        tl0_pic_idx: None,
        tid: None,
        keyframe_start: false,
    };
    if b0 & 0x80 != 0 {
        let x = *p.get(at)?;
        at += 1;
        if x & 0x80 != 0 {
            let m = *p.get(at)?;
            at += 1;
            if m & 0x80 != 0 {
                let lo = *p.get(at)?;
                at += 1;
                d.picture_id = Some(((u16::from(m & 0x7f) << 8) | u16::from(lo), true));
            } else {
                d.picture_id = Some((u16::from(m), false));
            }
        }
        if x & 0x40 != 0 {
            d.tl0_pic_idx = Some(*p.get(at)?);
            at += 1;
        }
        if x & 0x30 != 0 {
            let t = *p.get(at)?;
            at += 1;
            if x & 0x20 != 0 {
                d.tid = Some(t >> 6);
            }
        }
    }
    let header = *p.get(at)?;
    d.keyframe_start = b0 & 0x10 != 0 && b0 & 0x07 == 0 && header & 0x01 == 0;
    Some(d)
}

/// VP9 (RFC 9628 §4.2): first byte `I P L F B E V Z`. A keyframe starts where the packet
/// begins a frame (B), the frame is not inter-predicted (P=0), and it is the base spatial
/// layer (no layer indices, or SID 0).
fn vp9_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let (i, pbit, l, b) = (
        b0 & 0x80 != 0,
        b0 & 0x40 != 0,
        b0 & 0x20 != 0,
        b0 & 0x08 != 0,
    );
    if pbit || !b {
        return false;
    }
    if !l {
        return true;
    }
    let mut at = 1;
    if i {
        let Some(&m) = p.get(at) else {
            return false;
        };
        at += if m & 0x80 != 0 { 2 } else { 1 };
    }
    // Layer indices: TID(3) U(1) SID(3) D(1).
    p.get(at).is_some_and(|li| (li >> 1) & 0x07 == 0)
}

/// H.264 (RFC 6184): a single NAL unit, a STAP-A aggregate or the first FU-A fragment that
/// carries an SPS (7) or an IDR slice (5).
fn h264_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let key = |t: u8| t == 5 || t == 7;
    match b0 & 0x1f {
        24 => {
            // STAP-A: (size u16, NAL unit)*
            let mut at = 1;
            while at + 2 < p.len() {
                let n = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
                if let Some(h) = p.get(at + 2) {
                    if key(h & 0x1f) {
                        return true;
                    }
                }
                at += 2 + n;
            }
            false
        }
        28 => p.get(1).is_some_and(|fu| fu & 0x80 != 0 && key(fu & 0x1f)),
        t => key(t),
    }
}

/// H.265 (RFC 7798): IRAP pictures (types 16-21) or a VPS (32), alone, aggregated (48) or in
/// the first fragment (49).
fn h265_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let key = |t: u8| (16..=21).contains(&t) || t == 32;
    match (b0 >> 1) & 0x3f {
        48 => {
            let mut at = 2;
            while at + 2 < p.len() {
                let n = usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
                if let Some(h) = p.get(at + 2) {
                    if key((h >> 1) & 0x3f) {
                        return true;
                    }
                }
                at += 2 + n;
            }
            false
        }
        49 => p.get(2).is_some_and(|fu| fu & 0x80 != 0 && key(fu & 0x3f)),
        t => key(t),
    }
}

/// AV1 (RTP payload format §4.4): aggregation header `Z Y W W N - - -`; N=1 marks the first
/// packet of a coded video sequence, which starts with a keyframe.
fn av1_keyframe_start(p: &[u8]) -> bool {
    p.first().is_some_and(|h| h & 0x08 != 0 && h & 0x80 == 0)
}

/// A VP8 packet's picture id (value, 15 bits wide?) and TL0PICIDX, each if present.
pub type Vp8Ids = (Option<(u16, bool)>, Option<u8>);

/// What the rewriter needs to know about one incoming packet.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    /// Extended (64-bit) sequence number of the packet in its source stream.
    pub seq: u64,
    /// RTP timestamp.
    pub ts: u32,
    /// The codec's clock rate (Hz).
    pub clock: u32,
    /// VP8 picture id (with its width) and TL0PICIDX, if present.
    pub vp8: Option<Vp8Ids>,
}

/// The rewritten header fields of one outgoing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    /// Extended outgoing sequence number (its low 16 bits go on the wire).
    pub seq: u64,
    pub ts: u32,
    /// New VP8 picture id and TL0PICIDX (each only if the descriptor carries the field).
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
}

/// Turns the packets of a changing source (simulcast layers, pauses) into one continuous
/// outgoing RTP stream for one subscriber.
///
/// Outgoing sequence numbers start at 1; each new source is *rebased* on its first packet
/// (which the engine only does on a keyframe's first packet) so that it continues at the
/// last written sequence number + 1, the last timestamp + the time that passed (at least
/// one frame at 30 fps, so two frames never share a timestamp), and the last picture id
/// and TL0PICIDX + 1. Packets of the source that predate the rebase point (late or
/// reordered ones from before the keyframe) are refused, so the outgoing numbers never go
/// back into the previous source's range.
#[derive(Debug, Clone, Default)]
pub struct Rewriter {
    /// Outgoing = incoming + these (wrapping).
    seq_off: u64,
    ts_off: u32,
    pid_off: u16,
    tl0_off: u8,
    /// The incoming sequence number at which the current source was rebased.
    base: Option<u64>,
    /// Highest outgoing sequence number written, and the timestamp, instant, picture id and
    /// TL0PICIDX written with it.
    last: Option<Last>,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    seq: u64,
    ts: u32,
    at: Instant,
    pid: Option<u16>,
    tl0: Option<u8>,
}

impl Rewriter {
    /// Whether any packet was written yet.
    pub fn started(&self) -> bool {
        self.base.is_some()
    }

    /// Makes `first` the start of a new source: the next outgoing packet continues the
    /// stream written so far.
    pub fn rebase(&mut self, now: Instant, first: &InHeader) {
        self.base = Some(first.seq);
        let Some(last) = self.last else {
            // The very first source: keep its timestamps and picture ids, number from 1.
            self.seq_off = 1u64.wrapping_sub(first.seq);
            self.ts_off = 0;
            self.pid_off = 0;
            self.tl0_off = 0;
            return;
        };
        self.seq_off = last.seq.wrapping_add(1).wrapping_sub(first.seq);
        let hz = u64::from(first.clock.max(1));
        let elapsed = now.saturating_duration_since(last.at).as_micros() as u64;
        let gap = (elapsed.saturating_mul(hz) / 1_000_000).max(hz / 30).max(1);
        let ts = last.ts.wrapping_add(gap as u32);
        self.ts_off = ts.wrapping_sub(first.ts);
        if let Some((pid, tl0)) = first.vp8 {
            if let (Some((p, _)), Some(lp)) = (pid, last.pid) {
                self.pid_off = lp.wrapping_add(1).wrapping_sub(p);
            }
            if let (Some(t), Some(lt)) = (tl0, last.tl0) {
                self.tl0_off = lt.wrapping_add(1).wrapping_sub(t);
            }
        }
    }

    /// The outgoing header of `p`, or `None` if `p` predates the current source's start (or
    /// no source was started yet).
    pub fn rewrite(&mut self, now: Instant, p: &InHeader) -> Option<OutHeader> {
        let base = self.base?;
        if p.seq < base {
            return None;
        }
        let seq = p.seq.wrapping_add(self.seq_off);
        let ts = p.ts.wrapping_add(self.ts_off);
        let (picture_id, tl0_pic_idx) = match p.vp8 {
            Some((pid, tl0)) => (
                pid.map(|(v, wide)| {
                    let mask = if wide { 0x7fff } else { 0x7f };
                    v.wrapping_add(self.pid_off) & mask
                }),
                tl0.map(|t| t.wrapping_add(self.tl0_off)),
            ),
            None => (None, None),
        };
        let newest = self.last.is_none_or(|l| seq > l.seq);
        if newest {
            self.last = Some(Last {
                seq,
                ts,
                at: now,
                pid: picture_id.or(self.last.and_then(|l| l.pid)),
                tl0: tl0_pic_idx.or(self.last.and_then(|l| l.tl0)),
            });
        }
        Some(OutHeader {
            seq,
            ts,
            picture_id,
            tl0_pic_idx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn vp8_payload(pid: u16, tl0: u8, start: bool, key: bool) -> Vec<u8> {
        let b0 = 0x80 | if start { 0x10 } else { 0 };
        let pid_hi = 0x80 | ((pid >> 8) as u8 & 0x7f);
        vec![
            b0,
            0xc0 | 0x20,
            pid_hi,
            pid as u8,
            tl0,
            0x00,
            if key { 0x00 } else { 0x01 },
            1,
            2,
        ]
    }

    fn hdr(seq: u64, ts: u32, payload: &[u8]) -> InHeader {
        let d = vp8_descriptor(payload).unwrap();
        InHeader {
            seq,
            ts,
            clock: 90_000,
            vp8: Some((d.picture_id, d.tl0_pic_idx)),
        }
    }

    #[test]
    fn vp8_descriptor_fields_and_keyframes() {
        let p = vp8_payload(0x1234, 7, true, true);
        let d = vp8_descriptor(&p).unwrap();
        assert_eq!(d.picture_id, Some((0x1234, true)));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert_eq!(d.tid, Some(0));
        assert!(d.keyframe_start);
        assert!(keyframe_start(PayloadKind::Vp8, &p));
        assert!(!keyframe_start(
            PayloadKind::Vp8,
            &vp8_payload(1, 1, true, false)
        ));
        assert!(!keyframe_start(
            PayloadKind::Vp8,
            &vp8_payload(1, 1, false, true)
        ));
        // Minimal descriptor, 7-bit picture id.
        let d = vp8_descriptor(&[0x90, 0x80, 0x05, 0x00]).unwrap();
        assert_eq!(d.picture_id, Some((5, false)));
        assert!(d.keyframe_start);
        // Truncated anywhere: refused, never a panic.
        for n in 0..p.len() - 2 {
            assert!(vp8_descriptor(&p[..n]).is_none(), "{n}");
        }
    }

    #[test]
    fn keyframes_of_other_codecs() {
        // VP9: B=1, P=0 (no layer indices) / P=1 / SID 1.
        assert!(keyframe_start(PayloadKind::Vp9, &[0x08, 0]));
        assert!(!keyframe_start(PayloadKind::Vp9, &[0x48, 0]));
        assert!(keyframe_start(PayloadKind::Vp9, &[0xa8, 0x81, 0x02, 0x00]));
        assert!(!keyframe_start(PayloadKind::Vp9, &[0xa8, 0x81, 0x02, 0x02]));
        // H.264: IDR, SPS in a STAP-A, FU-A start of an IDR, a P slice.
        assert!(keyframe_start(PayloadKind::H264, &[0x65, 1]));
        assert!(keyframe_start(
            PayloadKind::H264,
            &[0x78, 0, 2, 0x67, 0x42, 0, 1, 0x68]
        ));
        assert!(keyframe_start(PayloadKind::H264, &[0x7c, 0x85, 0]));
        assert!(!keyframe_start(PayloadKind::H264, &[0x7c, 0x05, 0]));
        assert!(!keyframe_start(PayloadKind::H264, &[0x41, 0]));
        // H.265: IDR_W_RADL (19) and a trailing picture (1).
        assert!(keyframe_start(PayloadKind::H265, &[19 << 1, 1]));
        assert!(!keyframe_start(PayloadKind::H265, &[1 << 1, 1]));
        // AV1: N=1.
        assert!(keyframe_start(PayloadKind::Av1, &[0x18]));
        assert!(!keyframe_start(PayloadKind::Av1, &[0x10]));
        // Nothing at all.
        for k in [
            PayloadKind::Vp8,
            PayloadKind::Vp9,
            PayloadKind::H264,
            PayloadKind::H265,
            PayloadKind::Av1,
        ] {
            assert!(!keyframe_start(k, &[]));
        }
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        // Seeded random byte strings of every short length through every parser.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50_000 {
            let n = rng.random_range(0..24);
            let buf: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            for k in [
                PayloadKind::Vp8,
                PayloadKind::Vp9,
                PayloadKind::H264,
                PayloadKind::H265,
                PayloadKind::Av1,
                PayloadKind::Audio,
            ] {
                let _ = keyframe_start(k, &buf);
            }
            let _ = vp8_descriptor(&buf);
        }
    }

    /// A simulcast switch from layer A to layer B (different sequence numbers, timestamps and
    /// picture ids) continues every number of the outgoing stream by exactly one step.
    #[test]
    fn seq_ts_and_picture_id_continue_across_a_layer_switch() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        // Layer A: seq 1000.., ts 50_000.., pid 300.., tl0 10..
        let mut now = t0;
        let mut outs = Vec::new();
        for i in 0..10u64 {
            let p = vp8_payload(300 + i as u16, 10 + i as u8, true, i == 0);
            let h = hdr(1000 + i, 50_000 + 3000 * i as u32, &p);
            if i == 0 {
                assert!(!rw.started());
                rw.rebase(now, &h);
            }
            outs.push(rw.rewrite(now, &h).unwrap());
            now += Duration::from_millis(33);
        }
        assert_eq!(outs[0].seq, 1);
        assert_eq!(outs[0].ts, 50_000, "the first source keeps its timestamps");
        assert_eq!(outs[9].picture_id, Some(309));
        // Layer B starts on a keyframe: seq 7_000, ts 900_000, pid 20_000, tl0 200.
        now += Duration::from_millis(33);
        let p = vp8_payload(20_000, 200, true, true);
        let h = hdr(7_000, 900_000, &p);
        rw.rebase(now, &h);
        let o = rw.rewrite(now, &h).unwrap();
        assert_eq!(o.seq, outs[9].seq + 1);
        // 66 ms after the last written packet: 5940 ticks at 90 kHz.
        assert_eq!(o.ts, outs[9].ts.wrapping_add(5940));
        assert_eq!(o.picture_id, Some(310));
        assert_eq!(o.tl0_pic_idx, Some(20));
        // The rest of B follows one to one; a late packet of B from before the switch is
        // refused.
        let p2 = vp8_payload(20_001, 200, true, false);
        let o2 = rw.rewrite(now, &hdr(7_001, 903_000, &p2)).unwrap();
        assert_eq!(
            (o2.seq, o2.ts, o2.picture_id),
            (o.seq + 1, o.ts + 3000, Some(311))
        );
        assert!(rw.rewrite(now, &hdr(6_999, 897_000, &p2)).is_none());
        // A retransmission (older but after the base) keeps its own numbers and does not
        // move the stream back.
        let again = rw.rewrite(now, &hdr(7_000, 900_000, &p)).unwrap();
        assert_eq!(again, o);
        let o3 = rw
            .rewrite(
                now,
                &hdr(7_002, 906_000, &vp8_payload(20_002, 201, true, false)),
            )
            .unwrap();
        assert_eq!(o3.seq, o.seq + 2);
        assert_eq!(o3.tl0_pic_idx, Some(21));
    }

    /// Timestamps keep moving with wall time across a pause, and never repeat even when the
    /// switch is immediate; sequence numbers and 7-bit picture ids wrap cleanly.
    #[test]
    fn pause_resume_and_wraparound() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        let h = InHeader {
            seq: 65_530,
            ts: u32::MAX - 100,
            clock: 90_000,
            vp8: Some((Some((126, false)), None)),
        };
        rw.rebase(t0, &h);
        let a = rw.rewrite(t0, &h).unwrap();
        // Immediate switch: at least one 30 fps frame later.
        let h2 = InHeader {
            seq: 3,
            ts: 17,
            clock: 90_000,
            vp8: Some((Some((127, false)), None)),
        };
        rw.rebase(t0, &h2);
        let b = rw.rewrite(t0, &h2).unwrap();
        assert_eq!(b.seq, a.seq + 1);
        assert_eq!(b.ts, a.ts.wrapping_add(3000));
        assert_eq!(b.picture_id, Some(127));
        let c = rw
            .rewrite(
                t0,
                &InHeader {
                    seq: 4,
                    ts: 3017,
                    clock: 90_000,
                    vp8: Some((Some((0, false)), None)),
                },
            )
            .unwrap();
        assert_eq!(c.picture_id, Some(0), "7-bit picture ids wrap at 128");
        // A 10 s pause, then audio-style 48 kHz source: the timestamp moves 10 s on.
        let later = t0 + Duration::from_secs(10);
        let h3 = InHeader {
            seq: 100,
            ts: 5,
            clock: 48_000,
            vp8: None,
        };
        rw.rebase(later, &h3);
        let d = rw.rewrite(later, &h3).unwrap();
        assert_eq!(d.seq, c.seq + 1);
        assert_eq!(d.ts, c.ts.wrapping_add(480_000));
    }

    #[test]
    fn nothing_is_written_before_a_start() {
        let mut rw = Rewriter::default();
        let h = InHeader {
            seq: 5,
            ts: 5,
            clock: 48_000,
            vp8: None,
        };
        assert!(rw.rewrite(Instant::now(), &h).is_none());
    }
}
