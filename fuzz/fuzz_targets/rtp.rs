//! RTP payload parsing for forwarding (`media::rtp`): keyframe detection for every codec, the
//! VP8 and VP9 descriptor parsers, the AV1 dependency descriptor parser, the SVC layer selector fed with what the VP9 parser
//! accepts (spatial and temporal targets from the input), the temporal selector and the
//! per-layer frame-rate meter fed with arbitrary packets, and the rewriter (writes and skips)
//! fed with arbitrary headers. Nothing may panic.
#![no_main]
use std::time::{Duration, Instant};

use arbor_actors::media::rtp::{
    keyframe_start, parse_dd, vp8_descriptor, vp9_descriptor, FrameRates, InHeader, PayloadKind,
    Rewriter, SvcPacket, SvcSelector, SwitchHint, TemporalSelector,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for k in [
        PayloadKind::Vp8,
        PayloadKind::Vp9,
        PayloadKind::H264,
        PayloadKind::H265,
        PayloadKind::Av1,
        PayloadKind::Audio,
        PayloadKind::OtherVideo,
    ] {
        let _ = keyframe_start(k, data);
    }
    let _ = vp8_descriptor(data);
    // The dependency descriptor, and its template lookup.
    if let Some(dd) = parse_dd(data) {
        if let Some(st) = &dd.structure {
            if let Some(p) = SvcPacket::av1(&dd, st, false, 0, dd.end_of_frame) {
                let _ = SvcSelector::default().select(p.sid, p.tid, &p);
            }
        }
    }
    // Every suffix through the VP9 parser, and what it accepts through one selector whose
    // target follows the input.
    let mut sel = SvcSelector::default();
    for (i, _) in data.iter().enumerate().take(64) {
        if let Some(d) = vp9_descriptor(&data[i..]) {
            if let Some(p) = SvcPacket::vp9(&d, u32::from(data[i]) << 8, d.end) {
                let _ = sel.select(data[i] & 7, data[i] >> 5, &p);
            }
        }
    }
    // Packets from the input, 6 bytes each: ts u32 | tid/target/hint/keyframe | elapsed ms.
    let t0 = Instant::now();
    let (mut ts_sel, mut rates, mut now) = (TemporalSelector::default(), FrameRates::default(), t0);
    for c in data.chunks_exact(6) {
        let ts = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let hint = match c[4] >> 6 {
            0 => SwitchHint::None,
            1 => SwitchHint::UpSwitch,
            _ => SwitchHint::LayerSync,
        };
        now += Duration::from_millis(u64::from(c[5]) * 8);
        rates.observe(now, ts, c[4] & 7);
        let target = rates.layer_for_fps(u32::from(c[5] >> 3));
        let _ = ts_sel.select(
            target.min((c[4] >> 3) & 7),
            c[4] & 7,
            ts,
            hint,
            c[5] & 1 == 1,
        );
    }
    // Headers from the input, 16 bytes each: seq u64 | ts u32 | clock u16 | flags | pid.
    let mut rw = Rewriter::default();
    for (i, c) in data.chunks_exact(16).enumerate() {
        let seq = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let ts = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
        let clock = u32::from(u16::from_le_bytes([c[12], c[13]]));
        let vp8 =
            (c[14] & 1 != 0).then_some((Some((u16::from(c[15]), c[14] & 2 != 0)), Some(c[15])));
        let h = InHeader {
            seq,
            ts,
            clock,
            vp8,
        };
        let now = t0 + Duration::from_millis(i as u64 * u64::from(c[14] >> 2));
        if c[14] & 4 != 0 || !rw.started() {
            rw.rebase(now, &h);
        }
        if c[14] & 8 != 0 {
            rw.skip(&h);
        } else {
            let _ = rw.rewrite(now, &h);
        }
    }
});
