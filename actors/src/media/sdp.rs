//! A small, forgiving reader for the parts of a client's SDP the control plane needs:
//! which m-line (mid) carries which client track id (msid), in which direction.
//!
//! str0m parses and validates the full SDP; this reader only extracts identifiers, and never
//! panics on garbage (it just finds nothing).

/// One m-section of an SDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSection {
    /// `audio`, `video`, `application`, ...
    pub kind: String,
    /// `a=mid:` value.
    pub mid: String,
    /// The track id of `a=msid:<stream> <track>` (LiveKit clients put the `cid` there).
    pub msid_track: Option<String>,
    /// `sendrecv`, `sendonly`, `recvonly`, `inactive` (default `sendrecv`).
    pub direction: String,
    /// The m-line port is 0 (rejected / stopped section).
    pub port_zero: bool,
    /// `a=rid:<id> send` values (simulcast layers).
    pub rids: Vec<String>,
    /// The first codec name of the section's `a=rtpmap` lines, e.g. `VP8`, `opus`.
    pub codec: Option<String>,
    /// Every codec name of its `a=rtpmap` lines, in order (at most 64).
    pub codecs: Vec<String>,
}

impl MediaSection {
    /// Whether the client sends media on this section.
    pub fn is_sending(&self) -> bool {
        !self.port_zero && (self.direction == "sendonly" || self.direction == "sendrecv")
    }
}

/// Extract all m-sections. Lines may end in `\r\n` or `\n`.
pub fn media_sections(sdp: &str) -> Vec<MediaSection> {
    let mut out: Vec<MediaSection> = Vec::new();
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("m=") {
            let mut it = rest.split_whitespace();
            let kind = it.next().unwrap_or("").to_string();
            let port_zero = it.next().map(|p| p == "0").unwrap_or(false);
            out.push(MediaSection {
                kind,
                mid: String::new(),
                msid_track: None,
                direction: "sendrecv".into(),
                port_zero,
                rids: Vec::new(),
                codec: None,
                codecs: Vec::new(),
            });
            continue;
        }
        let Some(cur) = out.last_mut() else {
            continue;
        };
        if let Some(v) = line.strip_prefix("a=mid:") {
            cur.mid = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("a=msid:") {
            let mut it = v.split_whitespace();
            let _stream = it.next();
            if let Some(track) = it.next() {
                cur.msid_track = Some(track.to_string());
            }
        } else if let Some(v) = line.strip_prefix("a=rid:") {
            let mut it = v.split_whitespace();
            if let (Some(id), Some("send")) = (it.next(), it.next()) {
                cur.rids.push(id.to_string());
            }
        } else if let Some(v) = line.strip_prefix("a=rtpmap:") {
            let name = v
                .split_whitespace()
                .nth(1)
                .and_then(|e| e.split('/').next());
            if let Some(n) = name {
                if cur.codec.is_none() {
                    cur.codec = Some(n.to_string());
                }
                if cur.codecs.len() < 64 {
                    cur.codecs.push(n.to_string());
                }
            }
        } else if matches!(
            line,
            "a=sendonly" | "a=recvonly" | "a=sendrecv" | "a=inactive"
        ) {
            cur.direction = line[2..].to_string();
        }
    }
    out
}

/// Extract the `candidate:...` value from a trickle `candidateInit` JSON
/// (`{"candidate":"candidate:...","sdpMid":"0",...}`). Returns `None` for end-of-candidates or
/// anything unparsable.
pub fn candidate_from_init(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let c = v.get("candidate")?.as_str()?;
    let c = c.strip_prefix("a=").unwrap_or(c);
    if c.is_empty() {
        None
    } else {
        Some(c.to_string())
    }
}

/// Moves the payload types of a preferred codec to the front of the `m=` line of the sections
/// named in `prefs` (`(mid, codec name)`, e.g. `("1", "vp9")`, matched case-insensitively
/// against `a=rtpmap`), with their RTX payload types (`a=fmtp:<rtx> apt=<pt>`).
///
/// This is how the codec a client asked for in `AddTrackRequest` wins (LiveKit does the
/// same): Chromium offers VP8 first whatever codec livekit-client wants, and encodes with the
/// first codec of the answer, whose order [`order_answer_like_offer`] then takes from this
/// rewritten offer. A section without the codec is left as it is.
pub fn prefer_codecs(sdp: &str, prefs: &[(String, String)]) -> String {
    if prefs.is_empty() {
        return sdp.to_string();
    }
    let sep = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let mut lines: Vec<String> = sdp.split(sep).map(str::to_string).collect();
    // Section boundaries: (index of the m= line, end exclusive).
    let starts: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].starts_with("m="))
        .collect();
    for (n, &at) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(lines.len());
        let body = &lines[at + 1..end];
        let Some(mid) = body.iter().find_map(|l| l.strip_prefix("a=mid:")) else {
            continue;
        };
        let Some((_, codec)) = prefs.iter().find(|(m, _)| m == mid.trim()) else {
            continue;
        };
        let mut chosen: Vec<String> = body
            .iter()
            .filter_map(|l| {
                let v = l.strip_prefix("a=rtpmap:")?;
                let (pt, name) = v.split_once(' ')?;
                let name = name.split('/').next()?;
                name.eq_ignore_ascii_case(codec).then(|| pt.to_string())
            })
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let rtx: Vec<String> = body
            .iter()
            .filter_map(|l| {
                let v = l.strip_prefix("a=fmtp:")?;
                let (pt, params) = v.split_once(' ')?;
                let apt = params
                    .split(';')
                    .find_map(|kv| kv.trim().strip_prefix("apt="))?;
                chosen.iter().any(|c| c == apt).then(|| pt.to_string())
            })
            .collect();
        chosen.extend(rtx);
        let mut parts: Vec<&str> = lines[at].split(' ').collect();
        if parts.len() <= 4 {
            continue;
        }
        parts[3..].sort_by_key(|pt| !chosen.iter().any(|c| c == pt));
        lines[at] = parts.join(" ");
    }
    lines.join(sep)
}

/// Reorders the payload types of each `m=` line of `answer` into the order the same m-section
/// (by `a=mid`) lists them in `offer`.
///
/// A WebRTC sender encodes with the *first* codec of the answer's `m=` line. str0m answers in
/// its own configured order (VP8 first), so a client that put VP9 or AV1 first in its offer
/// (livekit-client does, with `setCodecPreferences`, for `videoCodec: 'vp9'`) would be made to
/// send VP8. The answer keeps its codecs; only their order changes: payload types the offer
/// lists come first, in the offer's order, anything else after them as it was. Sections or
/// lines that do not parse are left untouched.
pub fn order_answer_like_offer(offer: &str, answer: &str) -> String {
    // The offer's payload type order per mid.
    let mut orders: Vec<(String, Vec<String>)> = Vec::new();
    let mut fmts: Option<Vec<String>> = None;
    for line in offer.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("m=") {
            fmts = Some(
                rest.split_whitespace()
                    .skip(3)
                    .map(str::to_string)
                    .collect(),
            );
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            if let Some(f) = fmts.take() {
                orders.push((mid.trim().to_string(), f));
            }
        }
    }
    // The answer: find each section's mid first, then rewrite its m= line.
    let lines: Vec<&str> = answer.split("\r\n").collect();
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut m_at: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("m=") {
            m_at = Some(i);
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            let Some(at) = m_at.take() else {
                continue;
            };
            let Some((_, order)) = orders.iter().find(|(m, _)| m == mid.trim()) else {
                continue;
            };
            let mut parts: Vec<&str> = lines[at].split(' ').collect();
            if parts.len() <= 4 {
                continue;
            }
            let rank = |pt: &str| order.iter().position(|o| o == pt).unwrap_or(usize::MAX);
            // A stable sort keeps the answer's order among payload types the offer lacks.
            parts[3..].sort_by_key(|pt| rank(pt));
            out[at] = parts.join(" ");
        }
    }
    out.join("\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=msid:- cam-cid\r\n\
a=rid:f send\r\na=rid:h send\r\na=rid:q send\r\n\
m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:3\r\n";

    #[test]
    fn reads_sections() {
        let s = media_sections(OFFER);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].direction, "recvonly");
        assert!(!s[0].is_sending());
        assert_eq!(s[1].msid_track.as_deref(), Some("cam-cid"));
        assert!(s[1].is_sending());
        assert_eq!(s[1].rids, vec!["f", "h", "q"]);
        assert_eq!(s[0].codec, None);
        assert!(s[2].port_zero);
        assert_eq!(s[3].kind, "application");
        assert_eq!(s[3].mid, "3");
    }

    #[test]
    fn garbage_finds_nothing() {
        assert!(media_sections("\u{0}\u{1}garbage\nm=\na=msid:").len() <= 1);
        assert!(media_sections("").is_empty());
    }

    #[test]
    fn trickle_candidate() {
        let j =
            r#"{"candidate":"candidate:1 1 udp 2122260223 10.200.0.2 5000 typ host","sdpMid":"0"}"#;
        assert!(candidate_from_init(j).unwrap().starts_with("candidate:1"));
        assert_eq!(candidate_from_init(r#"{"candidate":""}"#), None);
        assert_eq!(candidate_from_init("not json"), None);
    }

    #[test]
    fn answer_follows_the_offers_codec_order() {
        let offer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=mid:0\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 98 99 96 97 45\r\na=mid:1\r\n";
        let answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97 98 99 45 120\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=rtpmap:96 VP8/90000\r\n";
        let fixed = order_answer_like_offer(offer, answer);
        assert!(
            fixed.contains("m=video 9 UDP/TLS/RTP/SAVPF 98 99 96 97 45 120\r\nc="),
            "{fixed}"
        );
        assert!(fixed.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0"));
        assert!(fixed.contains("a=rtpmap:96 VP8/90000"));
        // Garbage in either argument changes nothing and never panics.
        assert_eq!(order_answer_like_offer("\u{0}m=", answer), answer);
        assert_eq!(
            order_answer_like_offer(offer, "m=\r\na=mid:1"),
            "m=\r\na=mid:1"
        );
    }

    #[test]
    fn preferred_codec_goes_first_with_its_rtx() {
        let offer = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 97 98 99 45\r\na=mid:1\r\n\
a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
a=rtpmap:98 VP9/90000\r\na=rtpmap:99 rtx/90000\r\na=fmtp:99 apt=98\r\na=rtpmap:45 AV1/90000\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 98\r\na=mid:2\r\na=rtpmap:96 VP8/90000\r\n";
        let prefs = vec![
            ("1".to_string(), "vp9".to_string()),
            ("2".into(), "av1".into()),
        ];
        let out = prefer_codecs(offer, &prefs);
        assert!(
            out.contains("m=video 9 UDP/TLS/RTP/SAVPF 98 99 96 97 45\r\na=mid:1"),
            "{out}"
        );
        // Section 2 has no AV1: unchanged.
        assert!(out.contains("m=video 9 UDP/TLS/RTP/SAVPF 96 98\r\na=mid:2"));
        assert_eq!(prefer_codecs(offer, &[]), offer);
        assert_eq!(
            prefer_codecs("m=\na=mid:1\na=rtpmap:", &prefs),
            "m=\na=mid:1\na=rtpmap:"
        );
    }
}
