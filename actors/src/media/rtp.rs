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
//! * **SVC layer dropping** ([`SvcSelector`]): a scalable stream (VP9 with layer indices in
//!   its payload descriptor, [`vp9_descriptor`]; AV1 with the dependency descriptor header
//!   extension, [`parse_dd`]) carries all spatial layers in one RTP stream. Per subscriber,
//!   the selector drops the layers above its target and sets the marker bit where the
//!   thinned picture ends; the [`Rewriter`] closes the sequence gaps ([`Rewriter::skip`]).
//!
//! Every parser here takes untrusted bytes and returns `None`/`false` on anything it does not
//! understand; none of them can panic (see the unit tests and `fuzz/fuzz_targets/rtp.rs`).

use std::time::{Duration, Instant};

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
    /// Y: a layer sync frame (it references only the base temporal layer, so a subscriber
    /// that did not get the frames of its layer can start receiving them here).
    pub layer_sync: bool,
    /// First packet of a frame (S=1, partition index 0).
    pub begin: bool,
    /// First packet of a keyframe.
    pub keyframe_start: bool,
}

/// The picture id of a VP8 or VP9 payload descriptor at `p[*at..]` (the same encoding in both,
/// RFC 7741 §4.2 and RFC 9628 §4.2): one byte of 7 bits, or with the M bit two bytes of 15 bits.
/// Returns `(id, fifteen_bits)` and advances `at`; `None` if the payload ends first.
fn picture_id(p: &[u8], at: &mut usize) -> Option<(u16, bool)> {
    let m = *p.get(*at)?;
    *at += 1;
    if m & 0x80 != 0 {
        let lo = *p.get(*at)?;
        *at += 1;
        Some(((u16::from(m & 0x7f) << 8) | u16::from(lo), true))
    } else {
        Some((u16::from(m), false))
    }
}

/// Parses a VP8 payload descriptor; `None` if it is truncated or malformed.
pub fn vp8_descriptor(p: &[u8]) -> Option<Vp8Descriptor> {
    let b0 = *p.first()?;
    let mut at = 1;
    let mut d = Vp8Descriptor {
        picture_id: None,
        tl0_pic_idx: None,
        tid: None,
        layer_sync: false,
        begin: b0 & 0x10 != 0 && b0 & 0x07 == 0,
        keyframe_start: false,
    };
    if b0 & 0x80 != 0 {
        let x = *p.get(at)?;
        at += 1;
        if x & 0x80 != 0 {
            d.picture_id = Some(picture_id(p, &mut at)?);
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
                d.layer_sync = t & 0x20 != 0;
            }
        }
    }
    let header = *p.get(at)?;
    d.keyframe_start = d.begin && header & 0x01 == 0;
    Some(d)
}

/// VP9 (RFC 9628 §4.2): a keyframe starts where the packet begins a frame (B), the frame is
/// not inter-predicted (P=0), and it is the base spatial layer (no layer indices, or SID 0).
fn vp9_keyframe_start(p: &[u8]) -> bool {
    vp9_descriptor(p).is_some_and(|d| d.keyframe_start())
}

/// The fields of a VP9 payload descriptor (RFC 9628 §4.2) the SVC forwarder uses.
///
/// ```text
///       0 1 2 3 4 5 6 7
///      +-+-+-+-+-+-+-+-+
///      |I|P|L|F|B|E|V|Z| (REQUIRED)
///      +-+-+-+-+-+-+-+-+
/// I:   |M| PICTURE ID  | (M=1: 15 bits over two octets)
///      +-+-+-+-+-+-+-+-+
/// L:   | TID |U| SID |D| (layer indices)
///      +-+-+-+-+-+-+-+-+
///      |   TL0PICIDX   | (only with L=1 and F=0: non-flexible mode)
///      +-+-+-+-+-+-+-+-+
/// F,P: | P_DIFF      |N| (flexible mode, inter-picture predicted: up to 3 reference diffs)
///      +-+-+-+-+-+-+-+-+
/// V:   | SS            | (scalability structure, see below)
/// ```
///
/// One *picture* (all spatial layers of one instant, one RTP timestamp) is sent as one
/// *layer frame* per spatial layer, lowest first; B and E mark the first and last packet of
/// each layer frame, and the RTP marker bit the last packet of the picture. Chromium's
/// `L3T3_KEY` (three spatial, three temporal layers; upper spatial layers depend on lower
/// ones only in keyframes) is sent in flexible mode with layer indices on every packet.
///
/// The scalability structure (on keyframes) is `N_S(3) Y G - - -`, then with Y=1 a 16-bit
/// width and height per spatial layer, then with G=1 `N_G` and `N_G` picture-group entries
/// `T(3) U R(2) - -` each followed by R P_DIFF octets. It is parsed fully (so that a
/// truncated one is refused) and its layer count and sizes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp9Descriptor {
    /// PictureID and whether it is 15 bits wide.
    pub picture_id: Option<(u16, bool)>,
    /// P: the frame references earlier pictures (inter-picture predicted).
    pub inter_picture: bool,
    /// L: the descriptor carries layer indices (TID/SID). Without them the stream has no
    /// layers this forwarder can drop.
    pub layer_indices: bool,
    /// F: flexible mode (reference diffs in the descriptor) rather than a picture group.
    pub flexible: bool,
    /// B: first packet of a layer frame.
    pub begin: bool,
    /// E: last packet of a layer frame.
    pub end: bool,
    /// Temporal layer id (0 without layer indices).
    pub tid: u8,
    /// U: switching-up point (no later frame of this temporal layer references an earlier
    /// frame of the same or a higher temporal layer).
    pub switch_up: bool,
    /// Spatial layer id (0 without layer indices).
    pub sid: u8,
    /// D: the layer frame depends on the lower spatial layer of the same picture.
    pub inter_layer: bool,
    /// TL0PICIDX (non-flexible mode only).
    pub tl0_pic_idx: Option<u8>,
    /// From the scalability structure: the number of spatial layers (1..=8)...
    pub spatial_layers: Option<u8>,
    /// ... and the width and height of the first three (when the structure has sizes).
    pub sizes: [Option<(u16, u16)>; 3],
}

impl Vp9Descriptor {
    /// First packet of a keyframe: begins the base layer frame of a picture that references
    /// no earlier picture.
    pub fn keyframe_start(&self) -> bool {
        self.begin && !self.inter_picture && self.sid == 0
    }
}

/// Parses a VP9 payload descriptor; `None` if it is truncated or malformed.
pub fn vp9_descriptor(p: &[u8]) -> Option<Vp9Descriptor> {
    let b0 = *p.first()?;
    let mut d = Vp9Descriptor {
        inter_picture: b0 & 0x40 != 0,
        layer_indices: b0 & 0x20 != 0,
        flexible: b0 & 0x10 != 0,
        begin: b0 & 0x08 != 0,
        end: b0 & 0x04 != 0,
        ..Default::default()
    };
    let has_ss = b0 & 0x02 != 0;
    let mut at = 1;
    if b0 & 0x80 != 0 {
        d.picture_id = Some(picture_id(p, &mut at)?);
    }
    if d.layer_indices {
        let li = *p.get(at)?;
        at += 1;
        d.tid = li >> 5;
        d.switch_up = li & 0x10 != 0;
        d.sid = (li >> 1) & 0x07;
        d.inter_layer = li & 0x01 != 0;
        if !d.flexible {
            d.tl0_pic_idx = Some(*p.get(at)?);
            at += 1;
        }
    }
    if d.flexible && d.inter_picture {
        // Up to three reference diffs, each with N (another follows).
        for i in 0..3 {
            let diff = *p.get(at)?;
            at += 1;
            if diff & 0x01 == 0 {
                break;
            }
            if i == 2 {
                return None;
            }
        }
    }
    if has_ss {
        let ss = *p.get(at)?;
        at += 1;
        let n_s = (ss >> 5) + 1;
        d.spatial_layers = Some(n_s);
        if ss & 0x10 != 0 {
            for i in 0..usize::from(n_s) {
                let w = u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]);
                let h = u16::from_be_bytes([*p.get(at + 2)?, *p.get(at + 3)?]);
                at += 4;
                if let Some(s) = d.sizes.get_mut(i) {
                    *s = Some((w, h));
                }
            }
        }
        if ss & 0x08 != 0 {
            let n_g = *p.get(at)?;
            at += 1;
            for _ in 0..n_g {
                let g = *p.get(at)?;
                at += 1 + usize::from((g >> 2) & 0x03);
            }
        }
    }
    // Something must follow the descriptor: the VP9 frame data.
    if at > p.len() {
        return None;
    }
    Some(d)
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

/// The URI of the dependency descriptor RTP header extension (AV1 RTP specification,
/// appendix A), as libwebrtc and livekit-client spell it.
pub const DD_URI: &str =
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension";

/// Most frame dependency templates a structure may have (the template id is 6 bits).
const DD_MAX_TEMPLATES: usize = 64;

/// The part of a dependency descriptor's *template dependency structure* the forwarder uses:
/// which spatial and temporal layer each frame dependency template describes.
///
/// The structure is sent (at least) with every keyframe; later descriptors only name a
/// template (`frame_dependency_template_id`), so the forwarder keeps the latest structure
/// per track and looks the layers up in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdStructure {
    /// Template ids are `(template_id_offset + index) % 64`.
    pub template_id_offset: u8,
    /// `(spatial id, temporal id)` per template, in template order.
    pub layers: Vec<(u8, u8)>,
    /// Bit `i`: template `i` (in template order) is a *switch* point for some decode target
    /// (a decode target indication of 2, `SWITCH`): a subscriber may start receiving that
    /// target's frames at a frame of this template.
    pub switches: u64,
}

impl DdStructure {
    /// The (spatial, temporal) layer of a frame that uses template `id`.
    pub fn layer_of(&self, id: u8) -> Option<(u8, u8)> {
        let index = (usize::from(id) + DD_MAX_TEMPLATES - usize::from(self.template_id_offset))
            % DD_MAX_TEMPLATES;
        self.layers.get(index).copied()
    }

    /// Whether a frame that uses template `id` is a switch point (see [`Self::switches`]).
    pub fn is_switch(&self, id: u8) -> bool {
        let index = (usize::from(id) + DD_MAX_TEMPLATES - usize::from(self.template_id_offset))
            % DD_MAX_TEMPLATES;
        index < self.layers.len() && self.switches & (1u64 << index) != 0
    }
}

/// One parsed dependency descriptor (the fields the forwarder uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dd {
    /// First packet of a frame (one layer frame of a temporal unit).
    pub start_of_frame: bool,
    /// Last packet of a frame.
    pub end_of_frame: bool,
    pub template_id: u8,
    pub frame_number: u16,
    /// The template dependency structure, when this descriptor carries one.
    pub structure: Option<DdStructure>,
}

/// Reads bits most significant first, as the AV1 RTP specification's `f(n)`.
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn f(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.data.get(self.at / 8)?;
            v = (v << 1) | u32::from((byte >> (7 - self.at % 8)) & 1);
            self.at += 1;
        }
        Some(v)
    }

    /// `ns(n)`: a non-symmetric unsigned value in `0..n`.
    fn ns(&mut self, n: u32) -> Option<u32> {
        if n <= 1 {
            return Some(0);
        }
        let w = 32 - n.leading_zeros();
        let m = (1u32 << w) - n;
        let v = self.f(w - 1)?;
        if v < m {
            return Some(v);
        }
        let extra = self.f(1)?;
        Some((v << 1) - m + extra)
    }
}

/// Parses a dependency descriptor (AV1 RTP specification, appendix A.8); `None` if it is
/// truncated or malformed. Only the mandatory fields and, when present, the template
/// structure's layers are kept; the rest of the structure (decode target indications,
/// frame diffs, chains, resolutions) is read to validate it.
pub fn parse_dd(data: &[u8]) -> Option<Dd> {
    let mut b = Bits { data, at: 0 };
    let start_of_frame = b.f(1)? == 1;
    let end_of_frame = b.f(1)? == 1;
    let template_id = b.f(6)? as u8;
    let frame_number = b.f(16)? as u16;
    let mut dd = Dd {
        start_of_frame,
        end_of_frame,
        template_id,
        frame_number,
        structure: None,
    };
    if data.len() <= 3 {
        return Some(dd);
    }
    let structure_present = b.f(1)? == 1;
    let _active_decode_targets_present = b.f(1)?;
    let _custom_dtis = b.f(1)?;
    let _custom_fdiffs = b.f(1)?;
    let _custom_chains = b.f(1)?;
    if structure_present {
        let template_id_offset = b.f(6)? as u8;
        let dt_cnt = b.f(5)? + 1;
        // template_layers()
        let mut layers = Vec::new();
        let (mut spatial, mut temporal) = (0u8, 0u8);
        loop {
            if layers.len() >= DD_MAX_TEMPLATES {
                return None;
            }
            layers.push((spatial, temporal));
            match b.f(2)? {
                0 => {}
                1 => temporal = temporal.checked_add(1)?,
                2 => {
                    temporal = 0;
                    spatial = spatial.checked_add(1)?;
                }
                _ => break,
            }
        }
        // template_dtis(): 2 bits per decode target, 2 = SWITCH.
        let mut switches = 0u64;
        for i in 0..layers.len() {
            for _ in 0..dt_cnt {
                if b.f(2)? == 2 {
                    switches |= 1u64 << i;
                }
            }
        }
        // template_fdiffs()
        for _ in 0..layers.len() {
            let mut n = 0;
            while b.f(1)? == 1 {
                b.f(4)?;
                n += 1;
                if n > 15 {
                    return None;
                }
            }
        }
        // template_chains()
        let chains = b.ns(dt_cnt + 1)?;
        if chains > 0 {
            for _ in 0..dt_cnt {
                b.ns(chains)?;
            }
            for _ in 0..layers.len() {
                for _ in 0..chains {
                    b.f(4)?;
                }
            }
        }
        // Resolutions, one per spatial layer.
        if b.f(1)? == 1 {
            for _ in 0..=spatial {
                b.f(32)?;
            }
        }
        dd.structure = Some(DdStructure {
            template_id_offset,
            layers,
            switches,
        });
    }
    Some(dd)
}

/// The raw bytes of a packet's dependency descriptor, as str0m hands them over
/// (`ExtensionValues::user_values`) and writes them again on forwarded copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdBytes(pub std::sync::Arc<[u8]>);

/// str0m (de)serializer of the dependency descriptor extension: the bytes pass through
/// unchanged (the forwarder reads them with [`parse_dd`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct DdSerializer;

impl str0m::rtp::ExtensionSerializer for DdSerializer {
    fn write_to(&self, buf: &mut [u8], ev: &str0m::rtp::ExtensionValues) -> usize {
        match ev.user_values.get::<DdBytes>() {
            Some(d) if d.0.len() <= buf.len() => {
                buf[..d.0.len()].copy_from_slice(&d.0);
                d.0.len()
            }
            _ => 0,
        }
    }

    fn parse_value(&self, buf: &[u8], ev: &mut str0m::rtp::ExtensionValues) -> bool {
        if buf.len() < 3 {
            return false;
        }
        ev.user_values.set(DdBytes(buf.into()));
        true
    }

    fn is_video(&self) -> bool {
        true
    }

    fn is_audio(&self) -> bool {
        false
    }

    fn requires_two_byte_form(&self, ev: &str0m::rtp::ExtensionValues) -> bool {
        ev.user_values
            .get::<DdBytes>()
            .is_some_and(|d| d.0.len() > 16)
    }
}

/// What the SVC layer selector needs to know about one packet of a layered stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvcPacket {
    /// Spatial layer id.
    pub sid: u8,
    /// Temporal layer id.
    pub tid: u8,
    /// Last packet of its layer frame (VP9: E bit).
    pub end: bool,
    /// First packet of a frame after which higher temporal layers may be joined: no later
    /// frame of a higher layer references one from before it (VP9: B and U bits, U being
    /// set by libwebrtc when every higher temporal decode target switches here; AV1: start
    /// of a frame whose template switches some decode target, which in libwebrtc's
    /// structures are the targets above the frame's own temporal layer or its own T0).
    pub switch_up: bool,
    /// First packet of a keyframe (the base layer of a picture that references nothing).
    pub keyframe: bool,
    /// RTP timestamp: every layer frame of one picture carries the same one.
    pub ts: u32,
    /// The publisher's marker bit (last packet of the whole picture).
    pub marker: bool,
}

impl SvcPacket {
    /// The SVC view of a VP9 packet; `None` when its descriptor carries no layer indices
    /// (a stream without layers is forwarded whole).
    pub fn vp9(d: &Vp9Descriptor, ts: u32, marker: bool) -> Option<SvcPacket> {
        d.layer_indices.then_some(SvcPacket {
            sid: d.sid,
            tid: d.tid,
            end: d.end,
            switch_up: d.begin && d.switch_up,
            keyframe: d.keyframe_start(),
            ts,
            marker,
        })
    }
}

impl SvcPacket {
    /// The SVC view of an AV1 packet from its dependency descriptor and the track's latest
    /// template structure; `None` without either (the stream is forwarded whole).
    pub fn av1(
        dd: &Dd,
        structure: &DdStructure,
        keyframe: bool,
        ts: u32,
        marker: bool,
    ) -> Option<SvcPacket> {
        let (sid, tid) = structure.layer_of(dd.template_id)?;
        Some(SvcPacket {
            sid,
            tid,
            end: dd.end_of_frame,
            switch_up: dd.start_of_frame && structure.is_switch(dd.template_id),
            keyframe,
            ts,
            marker,
        })
    }
}

/// Temporal layers tracked per stream (VP8 and VP9 carry a 2-bit or 3-bit TID; encoders
/// use at most three or four). A higher TID is counted with the top one.
pub const MAX_TEMPORAL: usize = 4;

/// Everything: the temporal target that forwards every layer.
pub const ALL_TEMPORAL: u8 = (MAX_TEMPORAL - 1) as u8;

/// How long [`FrameRates`] counts before it updates its rates.
pub const FPS_WINDOW: Duration = Duration::from_secs(1);

/// A request is met by a layer that has at least this share of the requested frame rate
/// (measured rates wobble around the encoder's nominal ones; LiveKit allows the same slack).
const FPS_TOLERANCE: f32 = 0.9;

/// The frame rate of each temporal layer of one stream (one simulcast layer, or one SVC
/// stream), measured from the packets that pass: sans-IO (`now` is an input), fixed size, no
/// allocation.
///
/// A *frame* is counted on the first packet of a newer RTP timestamp (one picture: every
/// spatial layer frame of an SVC picture has the same timestamp and TID), in the layer of its
/// TID. Every [`FPS_WINDOW`] the counts become rates, averaged with the previous ones; after a
/// gap of more than two windows (a paused stream) the old rates are forgotten.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FrameRates {
    start: Option<Instant>,
    last_ts: Option<u32>,
    frames: [u16; MAX_TEMPORAL],
    fps: [f32; MAX_TEMPORAL],
}

impl FrameRates {
    /// Count one packet of temporal layer `tid` with RTP timestamp `ts`.
    pub fn observe(&mut self, now: Instant, ts: u32, tid: u8) {
        let start = *self.start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= FPS_WINDOW {
            if elapsed <= 2 * FPS_WINDOW {
                let secs = elapsed.as_secs_f32();
                for (f, n) in self.fps.iter_mut().zip(self.frames.iter()) {
                    let now_fps = f32::from(*n) / secs;
                    *f = if *f == 0.0 {
                        now_fps
                    } else {
                        (*f + now_fps) / 2.0
                    };
                }
            } else {
                self.fps = [0.0; MAX_TEMPORAL];
            }
            self.frames = [0; MAX_TEMPORAL];
            self.start = Some(now);
        }
        if self.last_ts.is_none_or(|t| (ts.wrapping_sub(t) as i32) > 0) {
            self.last_ts = Some(ts);
            let i = usize::from(tid).min(MAX_TEMPORAL - 1);
            self.frames[i] = self.frames[i].saturating_add(1);
        }
    }

    /// Frames per second of each temporal layer alone (0 until a window was measured).
    pub fn per_layer(&self) -> [f32; MAX_TEMPORAL] {
        self.fps
    }

    /// Frames per second a subscriber gets with layers `0..=t`, for each `t`.
    pub fn cumulative(&self) -> [f32; MAX_TEMPORAL] {
        let mut out = self.fps;
        for i in 1..MAX_TEMPORAL {
            out[i] += out[i - 1];
        }
        out
    }

    /// The lowest temporal layer whose cumulative frame rate meets `fps` (within
    /// [`FPS_TOLERANCE`]); [`ALL_TEMPORAL`] for 0 (no request), before anything was measured,
    /// or when even all layers together fall short.
    pub fn layer_for_fps(&self, fps: u32) -> u8 {
        if fps == 0 {
            return ALL_TEMPORAL;
        }
        let want = fps as f32 * FPS_TOLERANCE;
        let cumulative = self.cumulative();
        // Only the layers that exist: above the highest one with frames, nothing is gained.
        let Some(top) = self.fps.iter().rposition(|f| *f > 0.0) else {
            return ALL_TEMPORAL;
        };
        cumulative
            .iter()
            .take(top + 1)
            .position(|f| *f >= want)
            .map_or(ALL_TEMPORAL, |t| t as u8)
    }
}

/// What a packet says about joining higher temporal layers (see [`TemporalSelector`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchHint {
    None,
    /// The first packet of a frame after which higher temporal layers can be decoded from
    /// their next frame on (VP9 U bit, AV1 switch template).
    UpSwitch,
    /// The first packet of a frame of its layer that references only the base layer (VP8
    /// Y bit): its layer can be decoded from here.
    LayerSync,
}

/// Per-subscriber temporal layer selection: the frames of temporal layers above the one
/// forwarded are dropped, so the subscriber gets a fraction of the frame rate. Sans-IO, pure.
///
/// * The stream starts (after [`TemporalSelector::reset`], at a keyframe) at the target.
/// * **Down**: at the first packet of the next picture (a newer RTP timestamp), so a frame
///   is never cut.
/// * **Up**: only where the higher layers can be decoded without the frames the subscriber
///   did not get: at a keyframe (to the target); at a forwarded frame that is an *up-switch
///   point* (VP9 U bit, AV1 switch template: later frames of higher layers reference none
///   from before it), to the target; or at a *layer sync* frame (VP8 Y bit: the frame
///   references only the base layer) of a layer between the current and the target, to
///   that layer.
/// * A dropped frame is always a whole picture, so the frames forwarded keep their own
///   end-of-frame marker; the caller closes the sequence gap ([`Rewriter::skip`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TemporalSelector {
    current: Option<u8>,
    picture_ts: Option<u32>,
    /// Whether the newest picture is forwarded (the verdict for all its packets).
    picture_forwarded: bool,
}

impl TemporalSelector {
    /// The temporal layer forwarded now (`None` before the first packet).
    pub fn current(&self) -> Option<u8> {
        self.current
    }

    /// Forget the stream: the next packet (a new source's keyframe) starts at the target.
    pub fn reset(&mut self) {
        *self = TemporalSelector::default();
    }

    /// Whether to forward one packet of temporal layer `tid` with RTP timestamp `ts`,
    /// `target` being the highest layer the subscriber should get. `hint` says whether the
    /// packet starts an up-switch point or a layer sync frame; `keyframe`: it starts a
    /// keyframe.
    pub fn select(
        &mut self,
        target: u8,
        tid: u8,
        ts: u32,
        hint: SwitchHint,
        keyframe: bool,
    ) -> bool {
        let new_picture = self
            .picture_ts
            .is_none_or(|t| (ts.wrapping_sub(t) as i32) > 0);
        if !new_picture {
            // A later packet of the newest picture follows its first; an older picture's
            // (late) packet is judged by the layer forwarded now.
            let same = self.picture_ts == Some(ts);
            return if same {
                self.picture_forwarded
            } else {
                self.current.is_none_or(|c| tid <= c)
            };
        }
        self.picture_ts = Some(ts);
        let current = match self.current {
            None => target,
            Some(_) if keyframe => target,
            Some(c) if target < c => target,
            Some(c) if target > c && hint == SwitchHint::UpSwitch && tid <= c => target,
            Some(c) if target > c && hint == SwitchHint::LayerSync && tid > c && tid <= target => {
                tid
            }
            Some(c) => c,
        };
        self.current = Some(current);
        self.picture_forwarded = tid <= current;
        self.picture_forwarded
    }
}

/// The selector's verdict on one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvcChoice {
    /// Forward the packet (else drop it and let the [`Rewriter`] close the gap).
    pub forward: bool,
    /// The marker bit to write: set on the last packet of the highest forwarded layer
    /// frame, so that the subscriber's decoder emits the picture without waiting for layers
    /// it will never get.
    pub marker: bool,
    /// The subscriber wants a higher spatial layer than it can switch to now: ask the
    /// publisher for a keyframe.
    pub want_keyframe: bool,
    /// Hold this (forwarded) packet back instead of writing it now: it ends a layer frame
    /// below the forwarded layer, and whether it ends the *picture* is only known when the
    /// next packet arrives (see [`SvcSelector`]).
    pub hold: bool,
    /// Write the packet held earlier, before this one, with this marker bit.
    pub release: Option<bool>,
}

/// Per-subscriber spatial layer selection of an SVC stream (VP9 `L3T3_KEY` and the like):
/// every layer frame above the forwarded spatial layer is dropped. Sans-IO and pure.
///
/// Rules (the same as LiveKit's VP9 selector, from its documentation of the behaviour):
///
/// * A stream starts at a keyframe, at the target layer.
/// * **Up**: only at a keyframe. In `K-SVC` (`_KEY` modes) an upper spatial layer references
///   the lower one only in keyframes and otherwise its own earlier frames, so a subscriber
///   that did not get those frames can only join the layer at the next keyframe.
/// * **Down**: at the first packet of the next picture (a newer RTP timestamp), so the
///   picture in flight is finished with the layers it started with.
/// * Lower spatial layers are always forwarded with the chosen one: the decoder decodes the
///   whole (thinned) picture and shows its highest layer.
/// * The marker bit goes on the end of the forwarded layer's frame (the publisher's own
///   marker is kept too).
/// * A picture may lack upper layers: libvpx drops single layer frames when it overshoots
///   its rate, after the lower ones were sent without the marker (measured with Chromium's
///   `L3T3_KEY` at a few hundred kbit/s: about a third of the pictures). A libwebrtc receiver
///   decodes a picture only once a packet with the marker completes it, so such a picture,
///   and everything that references it, would never be shown. So the last packet of a
///   layer frame below the forwarded layer is *held* until the next packet shows whether a
///   forwarded layer of the same picture follows (written without the marker) or not (a new
///   picture, or a higher layer: written with it). One packet per subscriber at most, held
///   for the gap to the publisher's next packet.
///
/// Temporal layers above the subscriber's temporal target are dropped too (whole pictures,
/// by the embedded [`TemporalSelector`]); a dropped picture ends the previous forwarded one.
#[derive(Debug, Clone, Default)]
pub struct SvcSelector {
    /// The spatial layer forwarded now (`None`: not started, waiting for a keyframe).
    current: Option<u8>,
    /// RTP timestamp of the newest picture seen.
    picture_ts: Option<u32>,
    /// The held packet's (timestamp, spatial id).
    held: Option<(u32, u8)>,
    /// The temporal layers forwarded.
    temporal: TemporalSelector,
}

impl SvcSelector {
    /// The spatial layer forwarded now.
    pub fn current(&self) -> Option<u8> {
        self.current
    }

    /// Forget the stream (a pause, or a new source): the next forwarded packet must be a
    /// keyframe's.
    pub fn reset(&mut self) {
        *self = SvcSelector::default();
    }

    /// The temporal layer forwarded now.
    pub fn current_temporal(&self) -> Option<u8> {
        self.temporal.current()
    }

    /// Decide about one packet, `target` being the spatial layer the subscriber should get
    /// and `temporal` the highest temporal layer ([`ALL_TEMPORAL`]: every one).
    pub fn select(&mut self, target: u8, temporal: u8, p: &SvcPacket) -> SvcChoice {
        let new_picture = self
            .picture_ts
            .is_none_or(|t| (p.ts.wrapping_sub(t) as i32) > 0);
        // A packet of an earlier picture (a retransmission, or reordered by the network).
        let late = self
            .picture_ts
            .is_some_and(|t| (p.ts.wrapping_sub(t) as i32) < 0);
        if new_picture {
            self.picture_ts = Some(p.ts);
        }
        let mut want_keyframe = false;
        let current = match self.current {
            None if p.keyframe => target,
            None => {
                return SvcChoice {
                    forward: false,
                    marker: false,
                    want_keyframe: true,
                    hold: false,
                    release: None,
                };
            }
            Some(c) if target > c && p.keyframe => target,
            Some(c) if target > c => {
                want_keyframe = new_picture;
                c
            }
            Some(c) if target < c && new_picture => target,
            Some(c) => c,
        };
        self.current = Some(current);
        let hint = if p.switch_up {
            SwitchHint::UpSwitch
        } else {
            SwitchHint::None
        };
        let in_time = self
            .temporal
            .select(temporal, p.tid, p.ts, hint, p.keyframe);
        let forward = p.sid <= current && in_time;
        // The held packet ends its picture unless this packet is a forwarded layer frame of
        // the same picture above it. A late packet says nothing about the current picture:
        // it is written as it is and the held one stays.
        let release = if late {
            None
        } else {
            self.held
                .take()
                .map(|(ts, sid)| !(forward && ts == p.ts && p.sid > sid))
        };
        let marker = forward && (p.marker || (p.end && p.sid == current));
        let hold = forward && p.end && !marker && !late;
        if hold {
            self.held = Some((p.ts, p.sid));
        }
        SvcChoice {
            forward,
            marker,
            want_keyframe,
            hold,
            release,
        }
    }

    /// Whether a packet is held (the engine keeps it until [`SvcChoice::release`]).
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }
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
    /// Highest incoming sequence number of the current source seen (written or skipped).
    in_high: u64,
    /// Where `seq_off` (and `pid_off`) changed within the current source because packets
    /// were skipped: `(first incoming sequence number, sequence offset, picture id offset)`
    /// from there on, oldest first, at most [`SKIP_HISTORY`] entries (a run of consecutive
    /// skipped packets takes one). A late packet (a retransmission, or one reordered by the
    /// network) gets the offsets that were in force at its place in the stream.
    offsets: std::collections::VecDeque<(u64, u64, u16)>,
    /// VP8: the (incoming) picture id of the newest skipped picture, so that a dropped
    /// picture moves the later picture ids down once, however many packets it has.
    skipped_pid: Option<u16>,
    /// Highest outgoing sequence number written, and the timestamp, instant, picture id and
    /// TL0PICIDX written with it.
    last: Option<Last>,
}

/// Offset changes remembered per source; a packet older than the oldest is refused (it is
/// hundreds of packets late: its decoder gave up on it long ago).
pub const SKIP_HISTORY: usize = 64;

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
        self.in_high = first.seq;
        self.offsets.clear();
        self.skipped_pid = None;
        let Some(last) = self.last else {
            // The very first source: keep its timestamps and picture ids, number from 1.
            self.seq_off = 1u64.wrapping_sub(first.seq);
            self.ts_off = 0;
            self.pid_off = 0;
            self.tl0_off = 0;
            self.offsets.push_back((first.seq, self.seq_off, 0));
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
        self.offsets
            .push_back((first.seq, self.seq_off, self.pid_off));
    }

    /// The outgoing header of `p`, or `None` if `p` predates the current source's start (or
    /// no source was started yet).
    pub fn rewrite(&mut self, now: Instant, p: &InHeader) -> Option<OutHeader> {
        let base = self.base?;
        if p.seq < base {
            return None;
        }
        let (off, pid_off) = self.offset_at(p.seq)?;
        self.in_high = self.in_high.max(p.seq);
        let seq = p.seq.wrapping_add(off);
        let ts = p.ts.wrapping_add(self.ts_off);
        let (picture_id, tl0_pic_idx) = match p.vp8 {
            Some((pid, tl0)) => (
                pid.map(|(v, wide)| {
                    let mask = if wide { 0x7fff } else { 0x7f };
                    v.wrapping_add(pid_off) & mask
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

    /// A packet of the current source that is deliberately not forwarded (an SVC layer or a
    /// temporal layer the subscriber does not get): the packets after it move one number
    /// down, so the outgoing stream has no gap (which the subscriber would NACK and nobody
    /// could repair). A skipped VP8 picture also moves the later picture ids one down (once
    /// per picture), so that the subscriber sees no missing picture: libwebrtc's VP8
    /// reference finder waits for every picture id between a frame and its reference.
    ///
    /// Only a packet newer than every one seen can be closed over; a late one (its
    /// neighbours already written) leaves its hole.
    pub fn skip(&mut self, p: &InHeader) {
        let Some(base) = self.base else {
            return;
        };
        if p.seq < base || p.seq <= self.in_high {
            return;
        }
        self.in_high = p.seq;
        self.seq_off = self.seq_off.wrapping_sub(1);
        if let Some((Some((pid, _)), _)) = p.vp8 {
            if self.skipped_pid != Some(pid) {
                self.skipped_pid = Some(pid);
                self.pid_off = self.pid_off.wrapping_sub(1);
            }
        }
        // Saturating: the extended sequence number is str0m's u64, far from its end in
        // practice, but it is input.
        let from = p.seq.saturating_add(1);
        match self.offsets.back_mut() {
            // The packet right after the previous skip: no packet was written with the
            // offsets in force since, so one entry covers the whole run.
            Some(last) if last.0 == p.seq => {
                *last = (from, self.seq_off, self.pid_off);
            }
            _ => {
                if self.offsets.len() >= SKIP_HISTORY {
                    self.offsets.pop_front();
                }
                self.offsets.push_back((from, self.seq_off, self.pid_off));
            }
        }
    }

    /// The sequence and picture id offsets in force at incoming `seq` (`None`: older than
    /// the history).
    fn offset_at(&self, seq: u64) -> Option<(u64, u16)> {
        self.offsets
            .iter()
            .rev()
            .find(|(from, _, _)| *from <= seq)
            .map(|(_, off, pid)| (*off, *pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 90 kHz header with sequence number `seq` (timestamp 0, no VP8 descriptor).
    fn h(seq: u64) -> InHeader {
        InHeader {
            seq,
            ts: 0,
            clock: 90_000,
            vp8: None,
        }
    }
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
        assert!(keyframe_start(
            PayloadKind::Vp9,
            &[0xa8, 0x81, 0x02, 0x00, 0x05]
        ));
        assert!(!keyframe_start(
            PayloadKind::Vp9,
            &[0xa8, 0x81, 0x02, 0x02, 0x05]
        ));
        // Non-flexible mode without its TL0PICIDX: truncated.
        assert!(!keyframe_start(PayloadKind::Vp9, &[0xa8, 0x81, 0x02, 0x00]));
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
            if let Some(d) = vp9_descriptor(&buf) {
                let mut sel = SvcSelector::default();
                if let Some(p) = SvcPacket::vp9(&d, 0, false) {
                    let _ = sel.select(d.sid, d.tid, &p);
                }
            }
        }
    }

    /// A VP9 packet as Chromium sends `L3T3_KEY`: flexible mode, 15-bit picture id, layer
    /// indices; inter-picture frames carry one reference diff; the keyframe's base layer
    /// carries the scalability structure (three layers with sizes).
    fn vp9_packet(pid: u16, sid: u8, tid: u8, inter: bool, begin: bool, end: bool) -> Vec<u8> {
        let b0 = 0x80
            | if inter { 0x40 } else { 0 }
            | 0x20
            | 0x10
            | if begin { 0x08 } else { 0 }
            | if end { 0x04 } else { 0 }
            | if !inter && sid == 0 && begin { 0x02 } else { 0 };
        let mut v = vec![b0, 0x80 | (pid >> 8) as u8, pid as u8];
        v.push((tid << 5) | (sid << 1) | u8::from(!inter && sid > 0));
        if inter {
            v.push(1 << 1); // P_DIFF 1, N=0
        }
        if b0 & 0x02 != 0 {
            v.push((2 << 5) | 0x10); // N_S = 3, Y
            for (w, h) in [(240u16, 135u16), (480, 270), (960, 540)] {
                v.extend_from_slice(&w.to_be_bytes());
                v.extend_from_slice(&h.to_be_bytes());
            }
        }
        v.extend_from_slice(&[0xaa, 0xbb]); // frame data
        v
    }

    #[test]
    fn vp9_descriptor_fields() {
        let k = vp9_packet(0x1234, 0, 0, false, true, false);
        let d = vp9_descriptor(&k).unwrap();
        assert_eq!(d.picture_id, Some((0x1234, true)));
        assert!(d.flexible && d.layer_indices && d.begin && !d.end && !d.inter_picture);
        assert_eq!((d.sid, d.tid), (0, 0));
        assert_eq!(d.spatial_layers, Some(3));
        assert_eq!(
            d.sizes,
            [Some((240, 135)), Some((480, 270)), Some((960, 540))]
        );
        assert!(d.keyframe_start());
        // The keyframe's S1: inter-layer predicted, not a keyframe start.
        let d = vp9_descriptor(&vp9_packet(7, 1, 0, false, true, true)).unwrap();
        assert_eq!(d.sid, 1);
        assert!(d.inter_layer && d.end && !d.keyframe_start());
        // A delta frame of S2, temporal layer 2.
        let d = vp9_descriptor(&vp9_packet(8, 2, 2, true, false, true)).unwrap();
        assert_eq!((d.sid, d.tid, d.inter_picture), (2, 2, true));
        // Non-flexible mode: TL0PICIDX after the layer indices.
        let d = vp9_descriptor(&[0xac, 0x05, 0x42, 0x09, 0xff]).unwrap();
        assert_eq!((d.tid, d.switch_up, d.sid), (2, false, 1));
        assert_eq!(d.tl0_pic_idx, Some(9));
        // Three reference diffs all saying "another follows": malformed.
        assert!(vp9_descriptor(&[0x70, 0x00, 0x03, 0x03, 0x03, 0x00]).is_none());
        // Truncated anywhere inside the descriptor: refused, never a panic.
        let desc_len = k.len() - 2;
        for n in 0..desc_len {
            assert!(vp9_descriptor(&k[..n]).is_none(), "{n}");
        }
    }

    /// One subscriber of an `L3T3_KEY` stream (three spatial layers, two packets per layer
    /// frame): only the layers up to its target are forwarded, the end of its top layer
    /// carries the marker, the outgoing sequence numbers have no gaps; up-switches wait for
    /// a keyframe (and ask for one), down-switches happen at the next picture.
    #[test]
    fn svc_selector_thins_layers_and_keeps_the_stream_continuous() {
        let t0 = Instant::now();
        let mut sel = SvcSelector::default();
        let mut rw = Rewriter::default();
        let mut seq = 5_000u64;
        let mut out: Vec<(u64, u8, bool)> = Vec::new();
        let mut keyframe_asked = 0;
        // Sends picture `n` (keyframe or not) with the subscriber at `target`.
        let mut picture = |sel: &mut SvcSelector,
                           n: u32,
                           key: bool,
                           target: u8,
                           out: &mut Vec<(u64, u8, bool)>| {
            let mut asked = false;
            for sid in 0..3u8 {
                for part in 0..2 {
                    let payload = vp9_packet(n as u16, sid, 0, !key, part == 0, part == 1);
                    let d = vp9_descriptor(&payload).unwrap();
                    let ts = 3000 * n;
                    let marker = sid == 2 && part == 1;
                    let p = SvcPacket::vp9(&d, ts, marker).unwrap();
                    let h = InHeader {
                        seq,
                        ts,
                        clock: 90_000,
                        vp8: None,
                    };
                    seq += 1;
                    if !rw.started() {
                        if !p.keyframe {
                            continue;
                        }
                        rw.rebase(t0, &h);
                    }
                    let c = sel.select(target, ALL_TEMPORAL, &p);
                    asked |= c.want_keyframe;
                    if c.forward {
                        let o = rw.rewrite(t0, &h).unwrap();
                        out.push((o.seq, sid, c.marker));
                    } else {
                        assert!(!c.marker);
                        rw.skip(&h);
                    }
                }
            }
            asked
        };
        // Starts at the keyframe on the low layer.
        picture(&mut sel, 0, true, 0, &mut out);
        picture(&mut sel, 1, false, 0, &mut out);
        assert_eq!(
            out,
            vec![(1, 0, false), (2, 0, true), (3, 0, false), (4, 0, true)]
        );
        out.clear();
        // Asks for the top layer: delta pictures stay on S0 and a keyframe is requested.
        for n in 2..4 {
            keyframe_asked += u32::from(picture(&mut sel, n, false, 2, &mut out));
        }
        assert_eq!(keyframe_asked, 2);
        assert_eq!(
            out.iter().map(|o| o.1).collect::<Vec<_>>(),
            vec![0, 0, 0, 0]
        );
        assert_eq!(sel.current(), Some(0));
        out.clear();
        // The keyframe: all three layers, marker only at the end of S2.
        assert!(!picture(&mut sel, 4, true, 2, &mut out));
        assert_eq!(
            out,
            vec![
                (9, 0, false),
                (10, 0, false),
                (11, 1, false),
                (12, 1, false),
                (13, 2, false),
                (14, 2, true)
            ]
        );
        out.clear();
        // Down to S1 at the next picture (no keyframe needed): S2 dropped, S1 ends it.
        picture(&mut sel, 5, false, 1, &mut out);
        assert_eq!(
            out,
            vec![
                (15, 0, false),
                (16, 0, false),
                (17, 1, false),
                (18, 1, true)
            ]
        );
        assert_eq!(sel.current(), Some(1));
    }

    /// A picture whose upper layers the encoder dropped after sending the lower ones without
    /// the marker: the end of each forwarded lower layer frame is held until the next packet
    /// says whether the picture goes on (released without marker) or not (with it).
    #[test]
    fn svc_selector_marks_pictures_that_lack_upper_layers() {
        let mut sel = SvcSelector::default();
        let pkt = |sid: u8, ts: u32, end: bool, key: bool, marker: bool| SvcPacket {
            sid,
            tid: 0,
            end,
            switch_up: false,
            keyframe: key,
            ts,
            marker,
        };
        // Keyframe picture with all three layers (one packet each): S0 and S1 ends are held
        // and released unmarked as the next layer follows; S2 carries the marker.
        let c = sel.select(2, ALL_TEMPORAL, &pkt(0, 0, true, true, false));
        assert!(c.forward && c.hold && c.release.is_none());
        let c = sel.select(2, ALL_TEMPORAL, &pkt(1, 0, true, false, false));
        assert_eq!((c.forward, c.hold, c.release), (true, true, Some(false)));
        let c = sel.select(2, ALL_TEMPORAL, &pkt(2, 0, true, false, true));
        assert_eq!(
            (c.forward, c.hold, c.marker, c.release),
            (true, false, true, Some(false))
        );
        assert!(!sel.holding());
        // Picture 2: only S0 and S1, no marker from the publisher.
        let c = sel.select(2, ALL_TEMPORAL, &pkt(0, 3000, true, false, false));
        assert!(c.hold && c.release.is_none());
        let c = sel.select(2, ALL_TEMPORAL, &pkt(1, 3000, true, false, false));
        assert_eq!((c.hold, c.release), (true, Some(false)));
        // Picture 3 begins: the held S1 end closes picture 2 with the marker.
        let c = sel.select(2, ALL_TEMPORAL, &pkt(0, 6000, false, false, false));
        assert_eq!((c.forward, c.hold, c.release), (true, false, Some(true)));
        // Picture 3 skips S1: S2 of the same picture follows S0, so S0's end goes out
        // unmarked and S2 ends the picture.
        let c = sel.select(2, ALL_TEMPORAL, &pkt(0, 6000, true, false, false));
        assert!(c.hold);
        let c = sel.select(2, ALL_TEMPORAL, &pkt(2, 6000, true, false, true));
        assert_eq!((c.marker, c.release), (true, Some(false)));
        // A subscriber on S0 never holds: the end of S0 is its picture's end.
        let mut low = SvcSelector::default();
        let c = low.select(0, ALL_TEMPORAL, &pkt(0, 0, true, true, false));
        assert!(c.forward && c.marker && !c.hold);
        // A packet above the forwarded layer right after a held end of the same picture
        // means no forwarded layer follows: the held one is marked.
        let mut mid = SvcSelector::default();
        assert!(
            mid.select(1, ALL_TEMPORAL, &pkt(0, 0, true, true, false))
                .hold
        );
        let c = mid.select(1, ALL_TEMPORAL, &pkt(2, 0, true, false, true));
        assert_eq!((c.forward, c.release), (false, Some(true)));
        // A late packet of an earlier picture neither releases nor replaces the held one.
        assert!(
            mid.select(1, ALL_TEMPORAL, &pkt(0, 3000, true, false, false))
                .hold
        );
        let c = mid.select(1, ALL_TEMPORAL, &pkt(0, 0, true, false, false));
        assert_eq!((c.forward, c.hold, c.release), (true, false, None));
        assert!(mid.holding());
        let c = mid.select(1, ALL_TEMPORAL, &pkt(1, 3000, true, false, false));
        assert_eq!((c.marker, c.release), (true, Some(false)));
    }

    /// A VP8 payload with the T bit: picture id (15 bits), TL0PICIDX, TID and Y.
    fn vp8_temporal(pid: u16, tl0: u8, tid: u8, sync: bool, start: bool, key: bool) -> Vec<u8> {
        let mut v = vp8_payload(pid, tl0, start, key);
        v[5] = (tid << 6) | if sync { 0x20 } else { 0 };
        v
    }

    #[test]
    fn vp8_temporal_fields() {
        let d = vp8_descriptor(&vp8_temporal(9, 3, 2, true, true, false)).unwrap();
        assert_eq!((d.tid, d.layer_sync, d.begin), (Some(2), true, true));
        let d = vp8_descriptor(&vp8_temporal(9, 3, 1, false, false, false)).unwrap();
        assert_eq!((d.tid, d.layer_sync, d.begin), (Some(1), false, false));
        // No T bit: no layer, no sync.
        let d = vp8_descriptor(&[0x90, 0x80, 0x05, 0x00]).unwrap();
        assert_eq!((d.tid, d.layer_sync, d.begin), (None, false, true));
    }

    /// The TIDs of libwebrtc's three-layer pattern (L1T3): 0 2 1 2 0 2 1 2 ...
    fn l1t3(n: u32) -> u8 {
        [0, 2, 1, 2][n as usize % 4]
    }

    #[test]
    fn frame_rates_measure_each_temporal_layer() {
        let t0 = Instant::now();
        let mut r = FrameRates::default();
        assert_eq!(
            r.layer_for_fps(5),
            ALL_TEMPORAL,
            "nothing measured yet: everything"
        );
        // 20 fps for 3 s, two packets per frame (counted once), L1T3.
        for n in 0..60u32 {
            let at = t0 + Duration::from_millis(50 * u64::from(n));
            r.observe(at, 4500 * n, l1t3(n));
            r.observe(at, 4500 * n, l1t3(n));
        }
        let per = r.per_layer();
        let near = |a: f32, b: f32| (a - b).abs() < 0.6;
        assert!(
            near(per[0], 5.0) && near(per[1], 5.0) && near(per[2], 10.0),
            "{per:?}"
        );
        let cum = r.cumulative();
        assert!(
            near(cum[0], 5.0) && near(cum[1], 10.0) && near(cum[2], 20.0),
            "{cum:?}"
        );
        assert_eq!(r.layer_for_fps(0), ALL_TEMPORAL);
        assert_eq!(r.layer_for_fps(1), 0);
        assert_eq!(r.layer_for_fps(5), 0);
        assert_eq!(r.layer_for_fps(6), 1);
        assert_eq!(r.layer_for_fps(10), 1);
        assert_eq!(r.layer_for_fps(15), 2);
        assert_eq!(r.layer_for_fps(20), 2);
        assert_eq!(
            r.layer_for_fps(60),
            ALL_TEMPORAL,
            "more than all layers have"
        );
        // Late packets (older timestamps) are not frames; a TID beyond the table counts with
        // the top layer instead of indexing out of it.
        r.observe(t0 + Duration::from_millis(3000), 0, 0);
        r.observe(t0 + Duration::from_millis(3000), 4500 * 61, 7);
        // A pause longer than two windows forgets the rates.
        r.observe(t0 + Duration::from_secs(10), 4500 * 300, 0);
        assert_eq!(r.per_layer(), [0.0; MAX_TEMPORAL]);
        assert_eq!(r.layer_for_fps(5), ALL_TEMPORAL);
    }

    /// VP8 L1T3 at a temporal target: frames above it are dropped whole, the outgoing
    /// sequence numbers and picture ids have no gap, every forwarded frame keeps its marker,
    /// the target goes down at the next frame and up only at a layer sync frame.
    #[test]
    fn vp8_temporal_thinning_is_contiguous_and_switches_up_at_sync() {
        let t0 = Instant::now();
        let mut sel = TemporalSelector::default();
        let mut rw = Rewriter::default();
        // (out seq, out picture id, tid, marker) of every packet written.
        let mut out: Vec<(u64, u16, u8, bool)> = Vec::new();
        let mut seq = 1000u64;
        let mut frame = |sel: &mut TemporalSelector,
                         n: u32,
                         target: u8,
                         sync: bool,
                         out: &mut Vec<(u64, u16, u8, bool)>| {
            let tid = l1t3(n);
            for part in 0..2u8 {
                let payload =
                    vp8_temporal(100 + n as u16, (n / 4) as u8, tid, sync, part == 0, n == 0);
                let d = vp8_descriptor(&payload).unwrap();
                let h = hdr(seq, 3000 * n, &payload);
                seq += 1;
                if !rw.started() {
                    rw.rebase(t0, &h);
                }
                let hint = if d.begin && d.layer_sync {
                    SwitchHint::LayerSync
                } else {
                    SwitchHint::None
                };
                let fwd = sel.select(target, tid, h.ts, hint, d.keyframe_start);
                if fwd {
                    let o = rw.rewrite(t0, &h).unwrap();
                    out.push((o.seq, o.picture_id.unwrap(), tid, part == 1));
                } else {
                    rw.skip(&h);
                }
            }
        };
        // Base layer only (a quarter of the frame rate).
        for n in 0..8 {
            frame(&mut sel, n, 0, false, &mut out);
        }
        assert_eq!(
            out.iter().map(|o| o.2).collect::<Vec<_>>(),
            vec![0, 0, 0, 0]
        );
        // Up to TL1: not at the TL2 frame 9 without sync, nor at TL1 frame 10 without sync;
        // TL2 frame 13 with sync is above the target; TL1 frame 14 with sync is the switch.
        for n in 8..16 {
            frame(&mut sel, n, 1, matches!(n, 13 | 14), &mut out);
        }
        assert_eq!(sel.current(), Some(1));
        // Down to TL0 at the next frame, then up to everything at a sync frame (17: TL2).
        frame(&mut sel, 16, 0, false, &mut out);
        frame(&mut sel, 17, 2, true, &mut out);
        frame(&mut sel, 18, 2, false, &mut out);
        frame(&mut sel, 19, 2, false, &mut out);
        let tids: Vec<u8> = out.iter().step_by(2).map(|o| o.2).collect();
        assert_eq!(tids, vec![0, 0, 0, 0, 1, 0, 2, 1, 2]);
        // Contiguous sequence numbers and picture ids, the marker on each frame's end.
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o.0, i as u64 + 1, "{out:?}");
            assert_eq!(o.1, 100 + (i / 2) as u16, "{out:?}");
            assert_eq!(o.3, i % 2 == 1);
        }
        // A late (retransmitted) packet of the first forwarded frame keeps its numbers.
        let payload = vp8_temporal(100, 0, 0, false, false, false);
        let o = rw.rewrite(t0, &hdr(1001, 0, &payload)).unwrap();
        assert_eq!((o.seq, o.picture_id), (2, Some(100)));
        // A keyframe goes straight to the target.
        let none = SwitchHint::None;
        let mut sel = TemporalSelector::default();
        assert!(sel.select(0, 0, 0, none, true));
        assert!(!sel.select(0, 2, 3000, none, false));
        assert!(sel.select(2, 0, 6000, none, true));
        assert!(sel.select(2, 2, 9000, none, false));
        // A late packet of an older picture is judged by the current layer.
        assert!(sel.select(0, 2, 3000, none, false));
        assert!(sel.select(0, 0, 12000, none, false));
        assert!(!sel.select(0, 2, 9000, none, false));
        // An up-switch point of a layer above the current one is not one to join there (its
        // own references may be missing); one of a forwarded layer is.
        let up = SwitchHint::UpSwitch;
        assert!(!sel.select(2, 1, 15000, up, false));
        assert_eq!(sel.current(), Some(0));
        assert!(sel.select(2, 0, 18000, up, false));
        assert_eq!(sel.current(), Some(2));
    }

    /// VP9 L3T3 thinned in space and time at once: pictures above the temporal target are
    /// dropped whole, the marker ends each forwarded picture at the forwarded spatial layer,
    /// sequence numbers stay contiguous, and the temporal target goes up at a U-bit picture.
    #[test]
    fn svc_selector_thins_temporal_layers() {
        let t0 = Instant::now();
        let mut sel = SvcSelector::default();
        let mut rw = Rewriter::default();
        let mut seq = 0u64;
        // (out seq, picture, sid, marker)
        let mut out: Vec<(u64, u32, u8, bool)> = Vec::new();
        let mut picture =
            |n: u32, spatial: u8, temporal: u8, up: bool, out: &mut Vec<(u64, u32, u8, bool)>| {
                let tid = l1t3(n);
                for sid in 0..3u8 {
                    let mut payload = vp9_packet(n as u16, sid, tid, n > 0, true, true);
                    if up {
                        payload[3] |= 0x10; // U
                    }
                    let d = vp9_descriptor(&payload).unwrap();
                    let ts = 3000 * n;
                    let p = SvcPacket::vp9(&d, ts, sid == 2).unwrap();
                    let h = InHeader {
                        seq,
                        ts,
                        clock: 90_000,
                        vp8: None,
                    };
                    seq += 1;
                    if !rw.started() {
                        rw.rebase(t0, &h);
                    }
                    let c = sel.select(spatial, temporal, &p);
                    if c.forward {
                        let o = rw.rewrite(t0, &h).unwrap();
                        // The marker of a held packet is decided later: the test's packets are
                        // one per layer frame, so a held one is released by the next packet.
                        if let Some(m) = c.release {
                            out.last_mut().unwrap().3 = m;
                        }
                        out.push((o.seq, n, sid, c.marker));
                    } else {
                        if let Some(m) = c.release {
                            out.last_mut().unwrap().3 = m;
                        }
                        rw.skip(&h);
                    }
                }
            };
        // S1 at TL0: pictures 0 and 4 only, two layer frames each, the marker on S1.
        for n in 0..8 {
            picture(n, 1, 0, false, &mut out);
        }
        assert_eq!(
            out,
            vec![
                (1, 0, 0, false),
                (2, 0, 1, true),
                (3, 4, 0, false),
                (4, 4, 1, true)
            ]
        );
        out.clear();
        // TL1 wanted: picture 8 (TL0) has no U bit; picture 10 (TL1) has, but is above the
        // forwarded layer; picture 12 (TL0) has: TL1 is forwarded from there on.
        for n in 8..16 {
            picture(n, 1, 1, matches!(n, 10 | 12), &mut out);
        }
        let pictures: Vec<u32> = out.iter().map(|o| o.1).collect();
        assert_eq!(pictures, vec![8, 8, 12, 12, 14, 14]);
        assert_eq!(sel.current_temporal(), Some(1));
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o.0, 5 + i as u64);
            assert_eq!(o.3, o.2 == 1, "{out:?}");
        }
    }

    /// Consecutive skips take one history entry, so a long run of dropped frames does not
    /// push the offsets of older packets out of the history.
    #[test]
    fn consecutive_skips_share_one_history_entry() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        rw.rebase(t0, &h(0));
        assert_eq!(rw.rewrite(t0, &h(0)).unwrap().seq, 1);
        // 100 frames of 10 packets: 1 forwarded, 9 dropped each.
        for f in 0..100u64 {
            assert_eq!(rw.rewrite(t0, &h(1 + f * 10)).unwrap().seq, 2 + f);
            for k in 2..11 {
                rw.skip(&h(f * 10 + k));
            }
        }
        assert!(rw.offsets.len() <= SKIP_HISTORY);
        // The latest 60 forwarded packets, retransmitted, keep their numbers.
        for f in 40..100u64 {
            assert_eq!(rw.rewrite(t0, &h(1 + f * 10)).unwrap().seq, 2 + f);
        }
    }

    /// Skipped packets close up the outgoing numbering, and a late packet (reordered or
    /// retransmitted) still gets the number it would have had in order.
    #[test]
    fn rewriter_skips_close_gaps_and_late_packets_keep_their_place() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        rw.rebase(t0, &h(100));
        assert_eq!(rw.rewrite(t0, &h(100)).unwrap().seq, 1);
        // 101 is late, 102 dropped, 103 written; 101 then arrives and takes number 2.
        rw.skip(&h(102));
        assert_eq!(rw.rewrite(t0, &h(103)).unwrap().seq, 3);
        assert_eq!(rw.rewrite(t0, &h(101)).unwrap().seq, 2);
        // A late packet that must be dropped leaves its hole (nothing moves back).
        rw.skip(&h(101));
        assert_eq!(rw.rewrite(t0, &h(104)).unwrap().seq, 4);
        // The history is bounded: after many skips, very old packets are refused.
        for i in 0..(SKIP_HISTORY as u64 + 10) {
            rw.skip(&h(105 + 2 * i));
            rw.rewrite(t0, &h(106 + 2 * i)).unwrap();
        }
        assert!(rw.rewrite(t0, &h(103)).is_none());
        // A new source starts right after the last written number.
        let last = rw
            .rewrite(t0, &h(106 + 2 * (SKIP_HISTORY as u64 + 9)))
            .unwrap();
        rw.rebase(t0, &h(9));
        assert_eq!(rw.rewrite(t0, &h(9)).unwrap().seq, last.seq + 1);
    }

    /// Found by the `rtp` fuzz target: a skip at the very end of the extended sequence space
    /// overflowed `seq + 1`.
    #[test]
    fn skip_at_the_end_of_the_sequence_space_does_not_overflow() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        rw.rebase(t0, &h(u64::MAX - 1));
        assert!(rw.rewrite(t0, &h(u64::MAX - 1)).is_some());
        rw.skip(&h(u64::MAX));
        let _ = rw.rewrite(t0, &h(u64::MAX));
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

    /// Writes bits most significant first (the inverse of `Bits::f`).
    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        n: usize,
    }

    impl BitWriter {
        fn put(&mut self, v: u32, bits: u32) {
            for i in (0..bits).rev() {
                if self.n.is_multiple_of(8) {
                    self.bytes.push(0);
                }
                let bit = ((v >> i) & 1) as u8;
                let last = self.bytes.len() - 1;
                self.bytes[last] |= bit << (7 - self.n % 8);
                self.n += 1;
            }
        }
    }

    /// A keyframe's descriptor with an L2T2 structure (templates S0T0, S0T1, S1T0, S1T1,
    /// offset 5), then mandatory-only descriptors resolved through it.
    #[test]
    fn dependency_descriptor_structure_and_templates() {
        let mut w = BitWriter::default();
        w.put(1, 1); // start_of_frame
        w.put(0, 1); // end_of_frame
        w.put(5, 6); // template id
        w.put(1234, 16); // frame number
        w.put(1, 1); // structure present
        w.put(0, 4); // active targets, custom dtis/fdiffs/chains
        w.put(5, 6); // template_id_offset
        w.put(3, 5); // dt_cnt - 1 = 3
        for idc in [1, 2, 1, 3] {
            w.put(idc, 2); // next_layer_idc
        }
        // dtis, 4 targets x 2 bits: switch (2) in the first and third template only.
        for dtis in [0xaa, 0xf5, 0x9f, 0x00] {
            w.put(dtis, 8);
        }
        for fdiffs in [0u32, 1, 1, 2] {
            for _ in 0..fdiffs {
                w.put(1, 1);
                w.put(0, 4);
            }
            w.put(0, 1);
        }
        w.put(0, 2); // chain_cnt = ns(5) = 0
        w.put(1, 1); // resolutions
        for _ in 0..2 {
            w.put(319, 16);
            w.put(179, 16);
        }
        let dd = parse_dd(&w.bytes).unwrap();
        assert!(dd.start_of_frame && !dd.end_of_frame);
        assert_eq!((dd.template_id, dd.frame_number), (5, 1234));
        let st = dd.structure.clone().unwrap();
        assert_eq!(st.layers, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert_eq!(st.layer_of(5), Some((0, 0)));
        assert_eq!(st.layer_of(7), Some((1, 0)));
        assert_eq!(st.layer_of(4), None);
        assert_eq!(st.switches, 0b0101);
        assert!(st.is_switch(5) && !st.is_switch(6) && st.is_switch(7) && !st.is_switch(8));
        assert!(!st.is_switch(4) && !st.is_switch(9));
        // A mandatory-only descriptor: end of a frame of template 8 (S1T1).
        let d = parse_dd(&[0x40 | 8, 0x04, 0xd3]).unwrap();
        assert!(d.end_of_frame && d.structure.is_none());
        let p = SvcPacket::av1(&d, &st, false, 90, false).unwrap();
        assert_eq!((p.sid, p.tid, p.end, p.switch_up), (1, 1, true, false));
        // The start of a frame of template 7 (S1T0, a switch point).
        let d = parse_dd(&[0x80 | 7, 0x04, 0xd4]).unwrap();
        let p = SvcPacket::av1(&d, &st, false, 90, false).unwrap();
        assert_eq!((p.sid, p.tid, p.switch_up), (1, 0, true));
        // Truncated anywhere: refused, never a panic.
        for n in 0..w.bytes.len() - 1 {
            if n == 3 {
                continue; // three bytes are a valid mandatory-only descriptor
            }
            assert!(parse_dd(&w.bytes[..n]).is_none(), "{n}");
        }
        // ns() corner cases and garbage.
        let mut b = Bits {
            data: &[0xff],
            at: 0,
        };
        assert_eq!(b.ns(5), Some(4));
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for _ in 0..20_000 {
            let n = rng.random_range(0..40);
            let buf: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if let Some(d) = parse_dd(&buf) {
                if let Some(st) = &d.structure {
                    let _ = st.layer_of(d.template_id);
                }
            }
        }
    }
}
