//! Speaker detection from the RFC 6464 audio-level header extension.
//!
//! Each audio packet carries the level of its audio in -dBov (0 = loudest, 127 = silence).
//! [`LevelMeter`] gathers one observation window (500 ms by default): a window is *active* when
//! at least `min_active_fraction` of its packets are louder than `active_dbov`. The reported
//! level is the mean linear amplitude of the loud packets, smoothed over `smooth_windows`
//! windows, so one cough does not make a speaker and one pause does not unmake one.

/// Thresholds (the defaults follow the LiveKit server's audio config).
#[derive(Debug, Clone, Copy)]
pub struct LevelConfig {
    /// Packets at or louder than this -dBov count as voice (LiveKit: 35).
    pub active_dbov: u8,
    /// Fraction of voice packets in a window for the window to count (LiveKit: 40%).
    pub min_active_fraction: f32,
    /// Windows averaged into the reported level (LiveKit: 2).
    pub smooth_windows: u32,
}

impl Default for LevelConfig {
    fn default() -> Self {
        LevelConfig {
            active_dbov: 35,
            min_active_fraction: 0.4,
            smooth_windows: 2,
        }
    }
}

/// Accumulates one track's levels between two [`LevelMeter::take`] calls.
#[derive(Debug, Clone, Default)]
pub struct LevelMeter {
    packets: u32,
    loud: u32,
    loud_linear_sum: f32,
    /// The last windows' levels (a moving average over `smooth_windows`, at most 8).
    history: [f32; 8],
    next: usize,
}

/// Linear amplitude (0..1) of a -dBov level.
pub fn linear(dbov: u8) -> f32 {
    10f32.powf(-(dbov.min(127) as f32) / 20.0)
}

impl LevelMeter {
    /// Record one packet's level (`None` when the packet carries no extension).
    pub fn observe(&mut self, level: Option<i8>, cfg: &LevelConfig) {
        let Some(l) = level else { return };
        // The extension's 7-bit value is -dBov; some stacks hand it over negated.
        let dbov = l.unsigned_abs().min(127);
        self.packets += 1;
        if dbov <= cfg.active_dbov {
            self.loud += 1;
            self.loud_linear_sum += linear(dbov);
        }
    }

    /// Close the window: returns `(smoothed level 0..1, active)` and starts a new window.
    /// A window without packets counts as silence.
    pub fn take(&mut self, cfg: &LevelConfig) -> (f32, bool) {
        let window = if self.packets > 0
            && (self.loud as f32) / (self.packets as f32) >= cfg.min_active_fraction
        {
            self.loud_linear_sum / self.loud.max(1) as f32
        } else {
            0.0
        };
        let n = (cfg.smooth_windows as usize).clamp(1, self.history.len());
        self.history[self.next % n] = window;
        self.next = (self.next + 1) % n;
        let smoothed = self.history[..n].iter().sum::<f32>() / n as f32;
        self.packets = 0;
        self.loud = 0;
        self.loud_linear_sum = 0.0;
        // Active while the average stays above a quiet voice (-35 dBov, spread over n windows).
        let floor = linear(cfg.active_dbov) / n as f32;
        (smoothed, smoothed >= floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_is_active_silence_is_not() {
        let cfg = LevelConfig::default();
        let mut tone = LevelMeter::default();
        let mut quiet = LevelMeter::default();
        let mut last = (0.0, false);
        let mut last_q = (0.0, false);
        for _ in 0..4 {
            for _ in 0..25 {
                tone.observe(Some(10), &cfg);
                quiet.observe(Some(127), &cfg);
            }
            last = tone.take(&cfg);
            last_q = quiet.take(&cfg);
        }
        assert!(last.1 && last.0 > 0.2, "{last:?}");
        assert!(!last_q.1 && last_q.0 == 0.0, "{last_q:?}");
    }

    #[test]
    fn a_single_loud_packet_does_not_make_a_speaker() {
        let cfg = LevelConfig::default();
        let mut m = LevelMeter::default();
        m.observe(Some(0), &cfg);
        for _ in 0..24 {
            m.observe(Some(120), &cfg);
        }
        assert!(!m.take(&cfg).1);
    }

    #[test]
    fn stops_being_active_after_silence() {
        let cfg = LevelConfig::default();
        let mut m = LevelMeter::default();
        for _ in 0..25 {
            m.observe(Some(5), &cfg);
        }
        assert!(m.take(&cfg).1);
        for _ in 0..3 {
            for _ in 0..25 {
                m.observe(Some(127), &cfg);
            }
            m.take(&cfg);
        }
        assert!(!m.take(&cfg).1);
    }
}
