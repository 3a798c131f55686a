//! A validated scenario turned into the numbers the event loop uses: integer loads, region
//! ids, the RTT matrix restricted to the scenario's regions, and arrival samplers.

use arbor_topology::nodes::{Load, RegionId, RttMatrix};
use arbor_topology::planner::PlannerConfig;

use super::scenario::{RttFile, ScenarioFile};
use super::SimError;

/// The built-in world RTT matrix (see the sources in the file).
pub const WORLD_RTT: &str = include_str!("../../data/world-rtt.toml");

/// Microseconds per second.
pub const US_PER_S: f64 = 1_000_000.0;

/// One machine type with its capacity as a planner [`Load`].
#[derive(Clone, Debug)]
pub struct NodeType {
    /// Label.
    pub name: String,
    /// Egress budget.
    pub capacity: Load,
    /// USD per hour.
    pub hourly_usd: f64,
    /// Boot time, µs.
    pub boot_us: u64,
}

/// One region of the scenario.
#[derive(Clone, Debug)]
pub struct RegionModel {
    /// Name.
    pub name: String,
    /// Index into [`Model::node_types`].
    pub node_type: usize,
    /// USD per GB of egress.
    pub egress_usd_per_gb: f64,
    /// Nodes at t = 0.
    pub initial_nodes: u32,
    /// Autoscaler floor.
    pub min_nodes: u32,
    /// Autoscaler ceiling.
    pub max_nodes: u32,
}

/// A piecewise-linear arrival-rate curve, normalised to a CDF over arrival time.
#[derive(Clone, Debug)]
pub struct Curve {
    pts: Vec<(f64, f64)>,
    cum: Vec<f64>,
}

impl Curve {
    /// Builds the cumulative areas. Caller guarantees ascending times and a positive area.
    pub fn new(points: &[[f64; 2]]) -> Self {
        let pts: Vec<(f64, f64)> = points.iter().map(|p| (p[0], p[1])).collect();
        let mut cum = vec![0.0];
        for w in pts.windows(2) {
            let ((t0, r0), (t1, r1)) = (w[0], w[1]);
            let last = cum.last().copied().unwrap_or(0.0);
            cum.push(last + (t1 - t0) * (r0 + r1) / 2.0);
        }
        Curve { pts, cum }
    }

    /// Time (s) at which the fraction `u` ∈ [0, 1] of arrivals has happened.
    pub fn inverse(&self, u: f64) -> f64 {
        let total = self.cum.last().copied().unwrap_or(0.0);
        let target = u.clamp(0.0, 1.0) * total;
        for i in 0..self.pts.len().saturating_sub(1) {
            let (c0, c1) = (self.cum[i], self.cum[i + 1]);
            if target <= c1 && c1 > c0 {
                let ((t0, r0), (t1, r1)) = (self.pts[i], self.pts[i + 1]);
                let a = target - c0;
                let dt = t1 - t0;
                let k = (r1 - r0) / dt;
                // Area from t0 to t0+τ is r0·τ + k·τ²/2; solve for τ.
                let tau = if k.abs() < 1e-12 {
                    a / r0
                } else {
                    (-r0 + (r0 * r0 + 2.0 * k * a).max(0.0).sqrt()) / k
                };
                return t0 + tau.clamp(0.0, dt);
            }
        }
        self.pts.last().map(|p| p.0).unwrap_or(0.0)
    }
}

/// One audience entry.
#[derive(Clone, Debug)]
pub struct Audience {
    /// Home region.
    pub region: RegionId,
    /// Total arrivals.
    pub viewers: u64,
    /// Arrival-time distribution.
    pub curve: Curve,
    /// Mean stay, µs (`None` = until the end).
    pub mean_stay_us: Option<f64>,
}

/// Failure kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// One node crashes.
    Node,
    /// One node is drained (planned, make-before-break).
    Drain,
    /// A whole region goes dark.
    Region,
}

/// One failure event.
#[derive(Clone, Debug)]
pub struct Failure {
    /// When, µs.
    pub at_us: u64,
    /// What.
    pub kind: FailureKind,
    /// Where.
    pub region: RegionId,
    /// For node/drain: pick the origin rather than the busiest node.
    pub pick_origin: bool,
    /// For region: when the region may host nodes again, µs.
    pub recover_at_us: Option<u64>,
}

/// Everything the event loop needs.
#[derive(Clone, Debug)]
pub struct Model {
    /// Scenario name.
    pub name: String,
    /// Event length, µs.
    pub duration_us: u64,
    /// Sample period, µs.
    pub sample_us: u64,
    /// Autoscaler period, µs.
    pub autoscale_us: u64,
    /// RTT matrix over the scenario's regions (index = region order in the scenario).
    pub rtt: RttMatrix,
    /// Planner knobs.
    pub planner: PlannerConfig,
    /// Machine types.
    pub node_types: Vec<NodeType>,
    /// Regions.
    pub regions: Vec<RegionModel>,
    /// Publisher regions, one entry per publisher.
    pub publishers: Vec<RegionId>,
    /// Video track: relay load (all layers) and per-viewer load (layer mix).
    pub video_relay: Load,
    /// Per-viewer video load.
    pub video_viewer: Load,
    /// Audio load (relay = viewer).
    pub audio: Load,
    /// Audience entries.
    pub audience: Vec<Audience>,
    /// Failures, in time order.
    pub failures: Vec<Failure>,
    /// The parsed file (for the latency/join/autoscale constants).
    pub file: ScenarioFile,
}

fn pps_for(kbps: u64, packet_bytes: u64) -> u64 {
    // kbit/s → bytes/s → packets/s, rounded up.
    (kbps * 1000 / 8).div_ceil(packet_bytes)
}

fn ms_to_us(ms: f64) -> u32 {
    (ms * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
}

fn loss_ppm(percent: f64) -> u32 {
    (percent * 10_000.0).round().clamp(0.0, 999_999.0) as u32
}

impl Model {
    /// Resolves a parsed scenario. `rtt_text` is the content of the RTT file it names
    /// (the caller reads files; this function does no I/O).
    pub fn build(file: ScenarioFile, rtt_text: &str) -> Result<Self, SimError> {
        let world = RttFile::parse(rtt_text)?;
        let names: Vec<String> = file.regions.iter().map(|r| r.name.clone()).collect();
        for n in &names {
            if !world.regions.contains(n) {
                return Err(SimError::Scenario(format!(
                    "region {n:?} is not in the RTT file (known: {})",
                    world.regions.join(", ")
                )));
            }
        }
        let net = &file.network;
        let mut pairs = Vec::new();
        // Pairs from the file restricted to the scenario's regions, then overrides.
        for p in world.rtt.iter().chain(net.rtt.iter()) {
            if !names.contains(&p.a) || !names.contains(&p.b) {
                if net.rtt.iter().any(|q| std::ptr::eq(q, p)) {
                    return Err(SimError::Scenario(format!(
                        "network.rtt override {:?}-{:?} names a region outside the scenario",
                        p.a, p.b
                    )));
                }
                continue;
            }
            if !(p.ms.is_finite() && p.ms >= 0.0 && p.ms <= 10_000.0) {
                return Err(SimError::Scenario(format!(
                    "RTT {}-{} out of range",
                    p.a, p.b
                )));
            }
            let default_loss = if p.a == p.b {
                net.intra_region_loss_percent
            } else {
                net.inter_region_loss_percent
            };
            let loss = p.loss_percent.unwrap_or(default_loss);
            if !(0.0..100.0).contains(&loss) {
                return Err(SimError::Scenario(format!(
                    "loss {}-{} out of range",
                    p.a, p.b
                )));
            }
            pairs.push((p.a.clone(), p.b.clone(), ms_to_us(p.ms), loss_ppm(loss)));
        }
        let rtt = RttMatrix::from_pairs(
            names.clone(),
            &pairs,
            (
                ms_to_us(world.intra_ms),
                loss_ppm(net.intra_region_loss_percent),
            ),
        )
        .map_err(|e| SimError::Scenario(format!("RTT matrix: {e}")))?;
        let region_id = |name: &str| {
            rtt.region(name)
                .ok_or_else(|| SimError::Scenario(format!("unknown region {name:?}")))
        };

        let pl = &file.planner;
        let planner = PlannerConfig {
            max_fanout: pl.max_fanout,
            max_depth: pl.max_depth,
            hop_processing_us: ms_to_us(pl.hop_processing_ms),
            cross_region_penalty_us: ms_to_us(pl.cross_region_penalty_ms),
            viewer_share_percent: pl.viewer_share_percent,
        };

        let node_types: Vec<NodeType> = file
            .node_types
            .iter()
            .map(|t| NodeType {
                name: t.name.clone(),
                capacity: Load::new(t.egress_mbps.saturating_mul(1000), t.forward_pps),
                hourly_usd: t.hourly_usd,
                boot_us: (t.boot_s * US_PER_S) as u64,
            })
            .collect();
        let mut regions = Vec::new();
        for r in &file.regions {
            let node_type = node_types
                .iter()
                .position(|t| t.name == r.node_type)
                .ok_or_else(|| SimError::Scenario(format!("unknown node type {}", r.node_type)))?;
            regions.push(RegionModel {
                name: r.name.clone(),
                node_type,
                egress_usd_per_gb: r.egress_usd_per_gb,
                initial_nodes: r.initial_nodes,
                min_nodes: r.min_nodes,
                max_nodes: r.max_nodes,
            });
        }
        let mut publishers = Vec::new();
        for p in &file.publishers {
            let r = region_id(&p.region)?;
            for _ in 0..p.count {
                publishers.push(r);
            }
        }

        let m = &file.media;
        let relay_kbps: u64 = m.layers.iter().map(|l| l.kbps).sum();
        let relay_pps: u64 = m
            .layers
            .iter()
            .map(|l| pps_for(l.kbps, m.video_packet_bytes))
            .sum();
        let mix_kbps: f64 = m
            .layers
            .iter()
            .map(|l| l.kbps as f64 * l.viewer_percent / 100.0)
            .sum();
        let mix_kbps = mix_kbps.ceil() as u64;
        let video_relay = Load::new(relay_kbps, relay_pps);
        let video_viewer = Load::new(mix_kbps, pps_for(mix_kbps, m.video_packet_bytes));
        let audio = Load::new(m.audio_kbps, m.audio_pps);

        let mut audience = Vec::new();
        for a in &file.audience {
            audience.push(Audience {
                region: region_id(&a.region)?,
                viewers: a.viewers,
                curve: Curve::new(&a.curve),
                mean_stay_us: a.mean_stay_s.map(|s| s * US_PER_S),
            });
        }
        let mut failures = Vec::new();
        for f in &file.failures {
            let at_us = (f.at_s * US_PER_S) as u64;
            failures.push(Failure {
                at_us,
                kind: match f.kind.as_str() {
                    "drain" => FailureKind::Drain,
                    "region" => FailureKind::Region,
                    _ => FailureKind::Node,
                },
                region: region_id(&f.region)?,
                pick_origin: f.pick == "origin",
                recover_at_us: f.recover_after_s.map(|s| at_us + (s * US_PER_S) as u64),
            });
        }
        failures.sort_by_key(|f| f.at_us);
        Ok(Model {
            name: file.name.clone(),
            duration_us: (file.duration_s * US_PER_S) as u64,
            sample_us: (file.sample_interval_s * US_PER_S) as u64,
            autoscale_us: (file.autoscale.check_interval_s * US_PER_S) as u64,
            rtt,
            planner,
            node_types,
            regions,
            publishers,
            video_relay,
            video_viewer,
            audio,
            audience,
            failures,
            file,
        })
    }

    /// Per-viewer edge load (all publishers' video at the layer mix plus their audio).
    pub fn per_viewer(&self) -> Load {
        self.video_viewer
            .saturating_add(self.audio)
            .times(self.publishers.len() as u64)
    }

    /// Viewers one empty node of `region`'s type can serve.
    pub fn viewers_per_node(&self, region: RegionId) -> u64 {
        let Some(r) = self.regions.get(region.index()) else {
            return 0;
        };
        let cap = self.node_types[r.node_type].capacity;
        cap.percent(self.planner.viewer_share_percent)
            .how_many(self.per_viewer())
    }
}

/// Largest audience the simulator accepts (memory is about 110 bytes per viewer).
pub const MAX_VIEWERS: u64 = 20_000_000;

/// Multiplies every audience's viewer count by `factor` (rounded). Used for the 1M-viewer
/// variant of a scenario and for quick scaled-down checks. Refuses a non-positive factor or
/// a result above [`MAX_VIEWERS`].
pub fn scale_audience(model: &mut Model, factor: f64) -> Result<(), SimError> {
    if !(factor.is_finite() && factor > 0.0) {
        return Err(SimError::Scenario(format!(
            "scale factor {factor} must be positive"
        )));
    }
    let total: f64 = model
        .audience
        .iter()
        .map(|a| a.viewers as f64 * factor)
        .sum();
    if total > MAX_VIEWERS as f64 {
        return Err(SimError::Scenario(format!(
            "scaled audience of {total:.0} viewers exceeds the simulator bound of {MAX_VIEWERS}"
        )));
    }
    for a in &mut model.audience {
        a.viewers = (a.viewers as f64 * factor).round() as u64;
    }
    for a in &mut model.file.audience {
        a.viewers = (a.viewers as f64 * factor).round() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_curve_inverts_linearly() {
        let c = Curve::new(&[[0.0, 1.0], [120.0, 1.0]]);
        assert!((c.inverse(0.5) - 60.0).abs() < 1e-9);
        assert!((c.inverse(1.0) - 120.0).abs() < 1e-9);
    }

    #[test]
    fn ramp_curve_inverts_quadratically() {
        // Rate rises linearly 0 → 1 over 100 s: half the arrivals by t = 100/√2.
        let c = Curve::new(&[[0.0, 0.0], [100.0, 1.0]]);
        assert!((c.inverse(0.5) - 100.0 / 2f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn world_matrix_parses_and_matches_sources() {
        let w = RttFile::parse(WORLD_RTT).expect("world matrix");
        assert_eq!(w.regions.len(), 8);
        // Every unordered pair exactly once.
        assert_eq!(w.rtt.len(), 8 * 7 / 2);
        let find = |a: &str, b: &str| {
            w.rtt
                .iter()
                .find(|p| (p.a == a && p.b == b) || (p.a == b && p.b == a))
                .map(|p| p.ms)
        };
        assert_eq!(find("us-east-1", "eu-west-1"), Some(80.5));
        assert_eq!(find("eu-west-1", "eu-central-1"), Some(19.6));
    }
}
