//! The per-subscriber bandwidth allocator: fit a subscriber's video tracks into its bandwidth
//! estimate.
//!
//! Inputs are the subscriber's estimate and, per track, the layers the publisher is sending
//! now (rank and measured bitrate) and the best layer the subscriber asked for. The allocator
//! first gives every track its lowest wanted layer, in priority order, pausing the tracks that
//! do not fit at all; then it upgrades tracks one layer at a time, round-robin, while the upgrade
//! fits. It also returns the bitrate the subscriber would need for everything it asked for, so
//! the congestion controller can probe towards it.
//!
//! Pure and deterministic: same inputs, same output.
//!
//! # Climbing back after a drop (bug B6)
//!
//! The estimate that feeds the allocator comes from str0m's delay-based congestion control
//! (GoogCC). When it sees queuing delay grow ("overuse") it cuts the estimate to 0.85 × the
//! *acknowledged* bitrate, and it never raises the estimate above 1.5 × that bitrate without a
//! probe. A subscriber that was dropped to the low layer therefore has its estimate anchored
//! to the low layer's ~150–250 kbit/s. On an idle machine probes lift it within seconds. On a
//! loaded machine the sender's and receiver's scheduling jitter looks like queuing delay, each
//! false overuse cuts the estimate back to 0.85 × the low layer, and a probe's gain is undone
//! before the allocator can use it: the subscriber stayed on low for a minute after its link
//! was freed (reproduced in simulated time by `actors/tests/bwe_recovery.rs`). Two remedies
//! live here and are applied by the engine:
//!
//! * [`next_step_bps`]: while a track is held below what its subscriber asked for, the engine
//!   asks str0m to pad the link up to the bitrate of the next upgrade (str0m caps the padding
//!   at the estimate). The acknowledged bitrate then follows the estimate rather than the low
//!   layer, so a false overuse costs 15% of the estimate, not the estimate itself.
//! * [`Recovery`]: if a subscriber stays held for [`RECOVERY_HOLD`] on a clean link (no
//!   loss), the engine restarts the estimator from its current value. A fresh estimator runs
//!   str0m's start-up probing (bursts at 3× and 6× the estimate), the same discovery that
//!   finds the capacity of a new connection. The probes measure the path: on a link that is
//!   still limited they find the limit and nothing changes. Retries back off from
//!   [`RECOVERY_BACKOFF_MIN`] to [`RECOVERY_BACKOFF_MAX`].

use std::time::{Duration, Instant};

/// One subscribed video track, as the allocator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocTrack {
    /// Higher goes first when bandwidth is short.
    pub priority: u8,
    /// The best layer rank the subscriber wants (0 = paused by the subscriber).
    pub max_rank: u8,
    /// Live layers `(rank, bits per second)`, sorted by rank ascending. A non-simulcast track
    /// has one layer.
    pub layers: Vec<(u8, u64)>,
}

/// The decision for one track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward this layer rank.
    Layer(u8),
    /// The subscriber asked for no video (disabled).
    PausedBySubscriber,
    /// Not enough bandwidth for even the lowest layer.
    PausedByCongestion,
}

/// Allocation result: one decision per input track (same order) and the bitrate the
/// subscriber would need for every track at its wanted layer.
pub fn allocate(budget_bps: u64, tracks: &[AllocTrack]) -> (Vec<Decision>, u64) {
    let mut decisions = vec![Decision::PausedByCongestion; tracks.len()];
    // Index of the chosen layer in `wanted[i]`.
    let mut chosen: Vec<Option<usize>> = vec![None; tracks.len()];
    let wanted: Vec<Vec<(u8, u64)>> = tracks
        .iter()
        .map(|t| {
            let w: Vec<(u8, u64)> = t
                .layers
                .iter()
                .copied()
                .filter(|(r, _)| *r <= t.max_rank)
                .collect();
            if w.is_empty() {
                // Nothing at or below the wanted quality is live: fall back to the lowest.
                t.layers.first().copied().into_iter().collect()
            } else {
                w
            }
        })
        .collect();
    let mut desired = 0u64;
    for (i, t) in tracks.iter().enumerate() {
        if t.max_rank == 0 {
            decisions[i] = Decision::PausedBySubscriber;
        } else if let Some((_, b)) = wanted[i].last() {
            desired += b;
        }
    }
    // Priority order, ties by input order (stable sort).
    let mut order: Vec<usize> = (0..tracks.len())
        .filter(|i| tracks[*i].max_rank > 0)
        .collect();
    order.sort_by(|a, b| tracks[*b].priority.cmp(&tracks[*a].priority));

    let mut used = 0u64;
    for &i in &order {
        if let Some((_, b)) = wanted[i].first() {
            if used + b <= budget_bps {
                used += b;
                chosen[i] = Some(0);
            }
        }
    }
    loop {
        let mut upgraded = false;
        for &i in &order {
            let Some(c) = chosen[i] else { continue };
            if c + 1 < wanted[i].len() {
                let delta = wanted[i][c + 1].1.saturating_sub(wanted[i][c].1);
                if used + delta <= budget_bps {
                    used += delta;
                    chosen[i] = Some(c + 1);
                    upgraded = true;
                }
            }
        }
        if !upgraded {
            break;
        }
    }
    for &i in &order {
        if let Some(c) = chosen[i] {
            decisions[i] = Decision::Layer(wanted[i][c].0);
        }
    }
    (decisions, desired)
}

/// The bitrate (bits/s) the subscriber would use after the cheapest next upgrade: what it
/// receives now under `decisions` plus the smallest step of one track to its next wanted
/// layer (or from paused to its lowest layer). `None` when every track already has the best
/// layer its subscriber asked for, i.e. nothing is held back by bandwidth.
pub fn next_step_bps(tracks: &[AllocTrack], decisions: &[Decision]) -> Option<u64> {
    let mut used = 0u64;
    let mut step: Option<u64> = None;
    for (t, d) in tracks.iter().zip(decisions) {
        let wanted: Vec<(u8, u64)> = t
            .layers
            .iter()
            .copied()
            .filter(|(r, _)| *r <= t.max_rank)
            .collect();
        let wanted = if wanted.is_empty() {
            t.layers.first().copied().into_iter().collect()
        } else {
            wanted
        };
        let (cur_bps, next_bps) = match d {
            Decision::PausedBySubscriber => continue,
            Decision::PausedByCongestion => (0, wanted.first().map(|l| l.1)),
            Decision::Layer(r) => {
                let cur = wanted.iter().rev().find(|(x, _)| x <= r).map_or(0, |l| l.1);
                (cur, wanted.iter().find(|(x, _)| x > r).map(|l| l.1))
            }
        };
        used += cur_bps;
        if let Some(n) = next_bps {
            let delta = n.saturating_sub(cur_bps);
            step = Some(step.map_or(delta, |s| s.min(delta)));
        }
    }
    step.map(|s| used + s)
}

/// How long a subscriber must be held below its wanted layers, on a clean link, before the
/// engine restarts its bandwidth estimator.
pub const RECOVERY_HOLD: Duration = Duration::from_secs(3);
/// First wait between two estimator restarts of one subscriber.
pub const RECOVERY_BACKOFF_MIN: Duration = Duration::from_secs(4);
/// Longest wait between two estimator restarts (the back-off doubles up to this).
pub const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(32);
/// Loss (fraction) at or above which a link is not clean: no restart while it lasts.
pub const RECOVERY_MAX_LOSS: f32 = 0.02;

/// Per-subscriber state of the climb back after a drop: decides when to restart the
/// bandwidth estimator (see the module documentation). Sans-IO: fed once per allocation
/// round with `now`.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Since when the subscriber has been held below its wanted layers on a clean link.
    held_since: Option<Instant>,
    /// No restart before this instant.
    not_before: Option<Instant>,
    /// The wait after the next restart.
    backoff: Duration,
}

impl Recovery {
    /// One allocation round. `held`: some track gets less than its subscriber asked for
    /// because of bandwidth; `loss`: the link's current loss fraction. Returns true when the
    /// estimator should be restarted now.
    pub fn on_round(&mut self, now: Instant, held: bool, loss: f32) -> bool {
        if !held {
            // Everything fits: the next drop starts from scratch.
            *self = Recovery::default();
            return false;
        }
        if loss >= RECOVERY_MAX_LOSS {
            // Congested: the estimate is right to be low. Wait for a clean stretch.
            self.held_since = None;
            return false;
        }
        let since = *self.held_since.get_or_insert(now);
        if now.saturating_duration_since(since) < RECOVERY_HOLD
            || self.not_before.is_some_and(|t| now < t)
        {
            return false;
        }
        let wait = self.backoff.max(RECOVERY_BACKOFF_MIN);
        self.not_before = Some(now + wait);
        self.backoff = (wait * 2).min(RECOVERY_BACKOFF_MAX);
        true
    }
}

/// Spatial layers of an SVC stream the allocator tracks (rank = spatial id + 1).
pub const SVC_MAX_SPATIAL: usize = 3;

/// Per-spatial-layer byte counters of one SVC stream (VP9 with layer indices): the
/// allocator's view of its layers, like the per-rid counters of simulcast.
///
/// An SVC stream is one RTP stream, but a subscriber of spatial layer *s* receives the layer
/// frames of every layer up to *s*, so the cost of rank *s + 1* is the sum of the bitrates of
/// layers `0..=s`. A layer not seen for `idle` is not offered (the publisher stopped sending
/// it). Spatial ids above [`SVC_MAX_SPATIAL`] - 1 are counted with the top layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpatialRates {
    /// Per spatial layer: bytes in the current window, smoothed bits/s, last packet seen.
    layers: [(u64, u64, Option<Instant>); SVC_MAX_SPATIAL],
}

impl SpatialRates {
    /// Count one packet of spatial layer `sid`.
    pub fn observe(&mut self, now: Instant, sid: u8, bytes: usize) {
        let i = usize::from(sid).min(SVC_MAX_SPATIAL - 1);
        let l = &mut self.layers[i];
        l.0 += bytes as u64;
        l.2 = Some(now);
    }

    /// Close a measuring window of `secs` seconds (smoothed over about two windows, like the
    /// simulcast counters).
    pub fn roll(&mut self, secs: f64) {
        for l in self.layers.iter_mut() {
            let bps = (l.0 as f64 * 8.0 / secs.max(1e-3)) as u64;
            l.1 = (l.1 + bps) / 2;
            l.0 = 0;
        }
    }

    /// Whether any layer was seen within `idle`: the stream is layered.
    pub fn active(&self, now: Instant, idle: Duration) -> bool {
        self.layers
            .iter()
            .any(|l| l.2.is_some_and(|t| now.saturating_duration_since(t) < idle))
    }

    /// Live layers as `(rank, cumulative bits/s)`, rank ascending, for [`AllocTrack::layers`].
    pub fn live(&self, now: Instant, idle: Duration) -> Vec<(u8, u64)> {
        let mut out = Vec::with_capacity(SVC_MAX_SPATIAL);
        let mut sum = 0u64;
        for (i, l) in self.layers.iter().enumerate() {
            sum = sum.saturating_add(l.1);
            if l.2.is_some_and(|t| now.saturating_duration_since(t) < idle) {
                out.push((i as u8 + 1, sum.max(1)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(max_rank: u8) -> AllocTrack {
        AllocTrack {
            priority: 0,
            max_rank,
            layers: vec![(1, 150_000), (2, 500_000), (3, 1_500_000)],
        }
    }

    #[test]
    fn plenty_gives_the_wanted_layer() {
        let (d, desired) = allocate(10_000_000, &[sim(3), sim(2)]);
        assert_eq!(d, vec![Decision::Layer(3), Decision::Layer(2)]);
        assert_eq!(desired, 2_000_000);
    }

    #[test]
    fn scarce_drops_to_low_then_pauses() {
        let (d, _) = allocate(300_000, &[sim(3)]);
        assert_eq!(d, vec![Decision::Layer(1)]);
        let (d, _) = allocate(200_000, &[sim(3), sim(3)]);
        assert_eq!(d, vec![Decision::Layer(1), Decision::PausedByCongestion]);
        let (d, _) = allocate(100_000, &[sim(3)]);
        assert_eq!(d, vec![Decision::PausedByCongestion]);
    }

    #[test]
    fn subscriber_pause_and_priority() {
        let mut hi = sim(3);
        hi.priority = 9;
        let (d, _) = allocate(200_000, &[sim(3), hi, sim(0)]);
        assert_eq!(
            d,
            vec![
                Decision::PausedByCongestion,
                Decision::Layer(1),
                Decision::PausedBySubscriber
            ]
        );
    }

    #[test]
    fn never_exceeds_budget() {
        for budget in (0..4_000_000).step_by(37_000) {
            let tracks = [sim(3), sim(2), sim(3)];
            let (d, _) = allocate(budget, &tracks);
            let used: u64 = d
                .iter()
                .zip(&tracks)
                .map(|(d, t)| match d {
                    Decision::Layer(r) => t
                        .layers
                        .iter()
                        .find(|(x, _)| x == r)
                        .map(|l| l.1)
                        .unwrap_or(0),
                    _ => 0,
                })
                .sum();
            assert!(used <= budget, "budget {budget} used {used}");
        }
    }

    #[test]
    fn next_step_is_the_cheapest_upgrade_of_a_held_track() {
        let tracks = [sim(3), sim(2)];
        // Both at their wanted layer: nothing is held back.
        let d = [Decision::Layer(3), Decision::Layer(2)];
        assert_eq!(next_step_bps(&tracks, &d), None);
        // Both on low: the cheaper step is either track to medium (+350 k).
        let d = [Decision::Layer(1), Decision::Layer(1)];
        assert_eq!(next_step_bps(&tracks, &d), Some(300_000 + 350_000));
        // A paused track's next step is its lowest layer; a subscriber pause is not held.
        let d = [Decision::PausedByCongestion, Decision::PausedBySubscriber];
        assert_eq!(next_step_bps(&tracks, &d), Some(150_000));
    }

    #[test]
    fn recovery_waits_for_a_clean_hold_and_backs_off() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Recovery::default();
        // Held on a lossy link: never.
        for ms in (0..10_000).step_by(500) {
            assert!(!r.on_round(at(ms), true, 0.2));
        }
        // Clean from 10 s: the first restart after RECOVERY_HOLD, then 4 s, 8 s, 16 s apart.
        let mut restarts = Vec::new();
        for ms in (10_000..60_000).step_by(500) {
            if r.on_round(at(ms), true, 0.0) {
                restarts.push(ms);
            }
        }
        assert_eq!(restarts, vec![13_000, 17_000, 25_000, 41_000]);
        // Not held any more: state cleared, the next drop waits the full hold again.
        assert!(!r.on_round(at(60_000), false, 0.0));
        assert!(!r.on_round(at(60_500), true, 0.0));
        assert!(r.on_round(at(63_500), true, 0.0));
    }

    /// An SVC stream's ranks cost the sum of the layers they carry; a layer that stopped
    /// is no longer offered.
    #[test]
    fn spatial_rates_are_cumulative_and_expire() {
        let t0 = Instant::now();
        let mut r = SpatialRates::default();
        assert!(!r.active(t0, Duration::from_secs(1)));
        // One second: 10 kB of S0, 20 kB of S1, 40 kB of S2.
        r.observe(t0, 0, 10_000);
        r.observe(t0, 1, 20_000);
        r.observe(t0, 2, 40_000);
        r.observe(t0, 7, 0); // beyond the tracked layers: counted with the top one
        r.roll(1.0);
        r.roll(1.0); // decays by half per window without traffic
        let idle = Duration::from_millis(1500);
        assert!(r.active(t0, idle));
        assert_eq!(
            r.live(t0, idle),
            vec![(1, 20_000), (2, 60_000), (3, 140_000)]
        );
        // S2 stops: 2 s later only S0 and S1 (seen again) are live.
        let t1 = t0 + Duration::from_secs(2);
        r.observe(t1, 0, 1);
        r.observe(t1, 1, 1);
        assert_eq!(
            r.live(t1, idle).iter().map(|l| l.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }
}
