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
}
