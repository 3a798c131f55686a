//! The media every simulated publisher sends: a short pre-encoded VP8 clip and an Opus clip,
//! read once into memory and looped. No encoder runs in the loop, so a publisher costs little
//! more than packetising and encrypting.
//!
//! The clips live in `load/media/` (generated once with Debian's ffmpeg, see
//! `load/media/README.md`); both are small enough to commit. Timestamps are re-stamped by the
//! sender on every loop (the RTP timestamp only ever grows), so a receiver sees one endless
//! stream.

use bytes::Bytes;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::LoadError;

/// VP8 frames (one per entry) and Opus packets, in playback order.
#[derive(Debug, Clone)]
pub struct Clip {
    pub video: Arc<Vec<Bytes>>,
    pub frame_interval: Duration,
    pub audio: Arc<Vec<Bytes>>,
    pub audio_interval: Duration,
}

/// Default clip shipped with the crate: 640x360, 30 fps, about 600 kbit/s VP8; 20 ms Opus.
pub const VIDEO_FILE: &str = "clip.ivf";
pub const AUDIO_FILE: &str = "clip.ogg";

impl Clip {
    /// Loads `dir/clip.ivf` and `dir/clip.ogg`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let ivf = std::fs::read(dir.join(VIDEO_FILE))
            .map_err(|e| LoadError::Clip(format!("{}: {e}", dir.join(VIDEO_FILE).display())))?;
        let ogg = std::fs::read(dir.join(AUDIO_FILE))
            .map_err(|e| LoadError::Clip(format!("{}: {e}", dir.join(AUDIO_FILE).display())))?;
        Self::from_bytes(&ivf, &ogg)
    }

    /// Parses an IVF (VP8) file and an Ogg Opus file with one packet per page
    /// (`ffmpeg ... -page_duration 20000`).
    pub fn from_bytes(ivf: &[u8], ogg: &[u8]) -> Result<Self, LoadError> {
        use rtc::media::io::ivf_reader::IVFReader;
        use rtc::media::io::ogg_reader::OggReader;

        let (mut r, header) =
            IVFReader::new(Cursor::new(ivf)).map_err(|e| LoadError::Clip(format!("ivf: {e}")))?;
        if &header.four_cc != b"VP80" {
            return Err(LoadError::Clip("ivf: not VP8".into()));
        }
        let mut video = Vec::new();
        while let Ok((frame, _)) = r.parse_next_frame() {
            video.push(frame.freeze());
        }
        if video.is_empty() {
            return Err(LoadError::Clip("ivf: no frames".into()));
        }
        let (num, den) = (
            header.timebase_numerator.max(1) as u64,
            header.timebase_denominator.max(1) as u64,
        );
        let frame_interval = Duration::from_micros((1_000_000 * num / den).clamp(5_000, 200_000));

        let (mut o, _) = OggReader::new(Cursor::new(ogg), true)
            .map_err(|e| LoadError::Clip(format!("ogg: {e}")))?;
        let mut audio = Vec::new();
        while let Ok((page, _)) = o.parse_next_page() {
            // Skip the OpusHead/OpusTags header pages.
            if page.starts_with(b"OpusHead") || page.starts_with(b"OpusTags") || page.is_empty() {
                continue;
            }
            audio.push(page.freeze());
        }
        if audio.is_empty() {
            return Err(LoadError::Clip("ogg: no opus packets".into()));
        }
        Ok(Self {
            video: Arc::new(video),
            frame_interval,
            audio: Arc::new(audio),
            audio_interval: Duration::from_millis(20),
        })
    }
}

/// Splits one VP8 frame into RTP payloads of at most `mtu` bytes, each starting with the
/// one-byte VP8 payload descriptor of RFC 7741 (S bit on the first). Used by the plain relay
/// baseline, whose publisher builds RTP itself.
pub fn vp8_payloads(frame: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let chunk = mtu.saturating_sub(1).max(1);
    frame
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| {
            let mut p = Vec::with_capacity(c.len() + 1);
            p.push(if i == 0 { 0x10 } else { 0x00 });
            p.extend_from_slice(c);
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_clip_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("media");
        let clip = Clip::load(&dir).expect("clip");
        assert!(clip.video.len() >= 30);
        assert!(clip.audio.len() >= 50);
        assert_eq!(clip.frame_interval, Duration::from_micros(33_333));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Clip::from_bytes(b"nonsense", b"more nonsense").is_err());
        assert!(Clip::from_bytes(&[], &[]).is_err());
    }

    #[test]
    fn vp8_split_marks_start() {
        let f = vec![7u8; 2500];
        let p = vp8_payloads(&f, 1200);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0][0], 0x10);
        assert_eq!(p[1][0], 0);
        assert_eq!(p.iter().map(|x| x.len() - 1).sum::<usize>(), 2500);
    }
}
