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
            if cur.codec.is_none() {
                let name = v
                    .split_whitespace()
                    .nth(1)
                    .and_then(|e| e.split('/').next());
                if let Some(n) = name {
                    cur.codec = Some(n.to_string());
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
}
