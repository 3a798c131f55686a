//! Connection quality from loss, jitter and round-trip time, as LiveKit clients display it.
//!
//! The score follows the shape of the E-model's MOS (1..5): start at 4.5, subtract for loss,
//! for delay beyond 150 ms one way, and for jitter. The bands map to the protocol's
//! EXCELLENT / GOOD / POOR; a peer that sent nothing for [`LOST_AFTER`] is LOST.

use std::time::Duration;

use livekit_protocol::ConnectionQuality;

/// No packet at all from a peer for this long means the connection is lost.
pub const LOST_AFTER: Duration = Duration::from_secs(4);

/// One measurement of a participant's links (the worse of its publisher and subscriber).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkStats {
    /// Fraction of packets lost, 0..1.
    pub loss: f32,
    /// Round-trip time.
    pub rtt: Duration,
    /// Interarrival jitter.
    pub jitter: Duration,
    /// Time since the last packet arrived from the client.
    pub silent_for: Duration,
}

/// A MOS-like score, 1.0 (bad) ..= 4.5 (perfect).
pub fn score(s: &LinkStats) -> f32 {
    let loss_pct = (s.loss.clamp(0.0, 1.0)) * 100.0;
    let one_way_ms = s.rtt.as_secs_f32() * 500.0;
    let jitter_ms = s.jitter.as_secs_f32() * 1000.0;
    let mut score = 4.5;
    score -= loss_pct * 0.25;
    if one_way_ms > 150.0 {
        score -= (one_way_ms - 150.0) / 100.0;
    }
    if jitter_ms > 30.0 {
        score -= (jitter_ms - 30.0) / 50.0;
    }
    score.clamp(1.0, 4.5)
}

/// The quality band for a measurement.
pub fn quality(s: &LinkStats) -> ConnectionQuality {
    if s.silent_for >= LOST_AFTER {
        return ConnectionQuality::Lost;
    }
    let sc = score(s);
    if sc >= 4.2 {
        ConnectionQuality::Excellent
    } else if sc >= 3.5 {
        ConnectionQuality::Good
    } else {
        ConnectionQuality::Poor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(loss: f32, rtt_ms: u64) -> LinkStats {
        LinkStats {
            loss,
            rtt: Duration::from_millis(rtt_ms),
            ..Default::default()
        }
    }

    #[test]
    fn bands() {
        assert_eq!(quality(&stats(0.0, 20)), ConnectionQuality::Excellent);
        assert_eq!(quality(&stats(0.005, 40)), ConnectionQuality::Excellent);
        assert_eq!(quality(&stats(0.02, 40)), ConnectionQuality::Good);
        assert_eq!(quality(&stats(0.10, 40)), ConnectionQuality::Poor);
        assert_eq!(quality(&stats(0.0, 900)), ConnectionQuality::Poor);
        let lost = LinkStats {
            silent_for: Duration::from_secs(5),
            ..Default::default()
        };
        assert_eq!(quality(&lost), ConnectionQuality::Lost);
    }

    #[test]
    fn score_is_monotonic_in_loss() {
        let mut last = 5.0;
        for l in 0..50 {
            let s = score(&stats(l as f32 / 100.0, 50));
            assert!(s <= last);
            last = s;
        }
    }
}
