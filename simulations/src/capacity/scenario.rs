//! The scenario file: what an operator describes about an event.
//!
//! A scenario is a TOML document. Every section except `[[regions]]`, `[[node_types]]`,
//! `[[publishers]]` and `[[audience]]` is optional and has documented defaults. The full
//! reference with an annotated example lives in `docs/capacity-planning.md`; the structs
//! below are the authoritative schema (unknown keys are rejected, so a typo is an error
//! rather than a silently ignored setting).
//!
//! ```toml
//! name = "tiny"
//! duration_s = 600
//!
//! [[node_types]]
//! name = "c6in.4xlarge"
//! egress_mbps = 10000
//! forward_pps = 640000
//! hourly_usd = 0.91
//! boot_s = 90
//!
//! [[regions]]
//! name = "us-east-1"
//! node_type = "c6in.4xlarge"
//! egress_usd_per_gb = 0.05
//! initial_nodes = 1
//!
//! [[publishers]]
//! region = "us-east-1"
//!
//! [[audience]]
//! region = "us-east-1"
//! viewers = 1000
//! curve = [[0, 1], [60, 1]]
//! ```

use std::collections::BTreeSet;

use serde::Deserialize;

use super::SimError;

/// Root of a scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Short name, printed in reports.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Simulated length of the event, seconds.
    pub duration_s: f64,
    /// Seed used when `--seed` is not given.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Interval between metric samples (time series rows, latency snapshots), seconds.
    #[serde(default = "default_sample")]
    pub sample_interval_s: f64,
    /// RTT matrix and loss assumptions.
    #[serde(default)]
    pub network: NetworkSection,
    /// Planner knobs (see `arbor_topology::planner::PlannerConfig`).
    #[serde(default)]
    pub planner: PlannerSection,
    /// Components of glass-to-glass latency outside the relay tree.
    #[serde(default)]
    pub latency: LatencySection,
    /// Join-time model.
    #[serde(default)]
    pub join: JoinSection,
    /// Failure detection.
    #[serde(default)]
    pub detection: DetectionSection,
    /// Autoscaler.
    #[serde(default)]
    pub autoscale: AutoscaleSection,
    /// Bitrate ladder and audio.
    #[serde(default)]
    pub media: MediaSection,
    /// Machine types.
    pub node_types: Vec<NodeTypeSection>,
    /// Regions the event may use.
    pub regions: Vec<RegionSection>,
    /// Publishers (speakers).
    pub publishers: Vec<PublisherSection>,
    /// Viewer arrivals per region.
    pub audience: Vec<AudienceSection>,
    /// Failure and drain events.
    #[serde(default)]
    pub failures: Vec<FailureSection>,
}

fn default_seed() -> u64 {
    1
}
fn default_sample() -> f64 {
    10.0
}

/// `[network]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// `"world"` for the built-in matrix (`simulations/data/world-rtt.toml`), or a path to a
    /// file of the same format, relative to the scenario file.
    pub rtt_file: String,
    /// Assumed loss on every inter-region pair not overridden, percent.
    pub inter_region_loss_percent: f64,
    /// Assumed loss inside a region, percent.
    pub intra_region_loss_percent: f64,
    /// Per-pair overrides.
    pub rtt: Vec<RttPair>,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            rtt_file: "world".into(),
            inter_region_loss_percent: 0.0,
            intra_region_loss_percent: 0.0,
            rtt: Vec::new(),
        }
    }
}

/// One symmetric RTT entry, in an RTT file or a `[[network.rtt]]` override.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RttPair {
    /// One region.
    pub a: String,
    /// The other region (may equal `a` for the intra-region figure).
    pub b: String,
    /// Round trip, ms.
    pub ms: f64,
    /// Loss, percent (defaults to the `[network]` assumption).
    pub loss_percent: Option<f64>,
}

/// The RTT data file format.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RttFile {
    /// Default intra-region RTT, ms.
    pub intra_ms: f64,
    /// Region names.
    pub regions: Vec<String>,
    /// Pairs.
    pub rtt: Vec<RttPair>,
}

/// `[planner]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerSection {
    /// Children per node per track.
    pub max_fanout: u32,
    /// Relay hops below the origin.
    pub max_depth: u32,
    /// Per-hop processing delay, ms.
    pub hop_processing_ms: f64,
    /// Parent-choice penalty for cross-region hops, ms.
    pub cross_region_penalty_ms: f64,
    /// Share of node capacity for viewer streams, percent.
    pub viewer_share_percent: u8,
}

impl Default for PlannerSection {
    fn default() -> Self {
        PlannerSection {
            max_fanout: 16,
            max_depth: 4,
            hop_processing_ms: 1.0,
            cross_region_penalty_ms: 5.0,
            viewer_share_percent: 90,
        }
    }
}

/// `[latency]`: glass-to-glass is the sum of capture_encode, publisher_uplink, the tree
/// path, edge→viewer (region one-way plus last mile), the jitter buffer (plus one NACK round
/// trip of the worst lossy hop on the path) and decode_render.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatencySection {
    /// Camera capture plus encoder delay, ms.
    pub capture_encode_ms: f64,
    /// Publisher → origin one-way, ms.
    pub publisher_uplink_ms: f64,
    /// Receiver jitter buffer, ms.
    pub jitter_buffer_ms: f64,
    /// Decode plus render, ms.
    pub decode_render_ms: f64,
    /// Viewer last mile (access network) one-way: `min + Exp(mean - min)`, capped at `max`.
    pub last_mile_min_ms: f64,
    /// Mean of the last-mile one-way delay, ms.
    pub last_mile_mean_ms: f64,
    /// Cap of the last-mile one-way delay, ms (at most 1000).
    pub last_mile_max_ms: f64,
}

impl Default for LatencySection {
    fn default() -> Self {
        LatencySection {
            capture_encode_ms: 40.0,
            publisher_uplink_ms: 20.0,
            jitter_buffer_ms: 40.0,
            decode_render_ms: 30.0,
            last_mile_min_ms: 5.0,
            last_mile_mean_ms: 20.0,
            last_mile_max_ms: 250.0,
        }
    }
}

/// `[join]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinSection {
    /// Viewer↔edge round trips to connect (WebSocket, ICE, DTLS).
    pub signalling_round_trips: f64,
    /// Round trips of a hop to set up a new relay link (QUIC handshake + subscribe).
    pub relay_setup_round_trips: f64,
    /// Keyframe interval of the publishers, ms.
    pub keyframe_interval_ms: f64,
    /// Edges and relays keep the last keyframe, so a join never waits for the next one.
    pub cache_keyframes: bool,
    /// Bound on viewers waiting for capacity (beyond it arrivals are rejected).
    pub max_pending: u64,
}

impl Default for JoinSection {
    fn default() -> Self {
        JoinSection {
            signalling_round_trips: 4.0,
            relay_setup_round_trips: 1.0,
            keyframe_interval_ms: 2000.0,
            cache_keyframes: true,
            max_pending: 1_000_000,
        }
    }
}

/// `[detection]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectionSection {
    /// Time for the fabric and clients to declare a node dead, ms.
    pub node_timeout_ms: f64,
}

impl Default for DetectionSection {
    fn default() -> Self {
        DetectionSection {
            node_timeout_ms: 3000.0,
        }
    }
}

/// `[autoscale]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleSection {
    /// Fleet sized so demand uses this share of viewer capacity, percent.
    pub target_utilization_percent: f64,
    /// Autoscaler period, seconds.
    pub check_interval_s: f64,
    /// A node idle (no viewers, no tree) this long may be retired, seconds.
    pub idle_retire_s: f64,
    /// Disable to keep the initial fleet only.
    pub enabled: bool,
    /// Add the arrival rate seen over the last period times (boot time + period) to the
    /// demand, so nodes are booting before they are needed.
    pub forecast: bool,
    /// At most this many spilled viewers are moved home (make-before-break) per period.
    pub rehome_per_check: u32,
    /// At most this many tree members are re-parented per period by the planner's
    /// `optimize` pass (make-before-break; 0 disables it).
    pub optimize_per_check: u32,
    /// Minimum gain in modelled delay (ms) for `optimize` to move a member.
    pub optimize_min_gain_ms: f64,
}

impl Default for AutoscaleSection {
    fn default() -> Self {
        AutoscaleSection {
            target_utilization_percent: 70.0,
            check_interval_s: 10.0,
            idle_retire_s: 300.0,
            enabled: true,
            forecast: true,
            rehome_per_check: 5_000,
            optimize_per_check: 16,
            optimize_min_gain_ms: 2.0,
        }
    }
}

/// `[media]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSection {
    /// Audio bitrate, kbit/s.
    pub audio_kbps: u64,
    /// Audio packets per second (20 ms Opus frames = 50).
    pub audio_pps: u64,
    /// Average video packet size, bytes (for packets/s).
    pub video_packet_bytes: u64,
    /// Simulcast layers, highest first.
    pub layers: Vec<LayerSection>,
}

impl Default for MediaSection {
    fn default() -> Self {
        MediaSection {
            audio_kbps: 32,
            audio_pps: 50,
            video_packet_bytes: 1100,
            layers: vec![
                LayerSection {
                    name: "720p".into(),
                    kbps: 2500,
                    viewer_percent: 70.0,
                },
                LayerSection {
                    name: "360p".into(),
                    kbps: 800,
                    viewer_percent: 20.0,
                },
                LayerSection {
                    name: "180p".into(),
                    kbps: 200,
                    viewer_percent: 10.0,
                },
            ],
        }
    }
}

/// One simulcast layer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSection {
    /// Label.
    pub name: String,
    /// Bitrate, kbit/s.
    pub kbps: u64,
    /// Share of viewers receiving this layer, percent (all layers sum to 100).
    pub viewer_percent: f64,
}

/// `[[node_types]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTypeSection {
    /// Label, referenced by regions.
    pub name: String,
    /// Usable egress, Mbit/s.
    pub egress_mbps: u64,
    /// Forwarding capacity, packets/s.
    pub forward_pps: u64,
    /// On-demand price, USD per hour.
    pub hourly_usd: f64,
    /// Time from "start a node" to "serving", seconds.
    pub boot_s: f64,
}

/// `[[regions]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSection {
    /// Name in the RTT matrix.
    pub name: String,
    /// Machine type.
    pub node_type: String,
    /// Egress price, USD per GB.
    pub egress_usd_per_gb: f64,
    /// Nodes running at t = 0.
    #[serde(default)]
    pub initial_nodes: u32,
    /// Autoscaler floor.
    #[serde(default)]
    pub min_nodes: u32,
    /// Autoscaler ceiling.
    #[serde(default = "default_max_nodes")]
    pub max_nodes: u32,
}

fn default_max_nodes() -> u32 {
    10_000
}

/// `[[publishers]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherSection {
    /// Region the speaker connects from (origin = lowest-id node there at t = 0).
    pub region: String,
    /// Number of speakers in that region, each with one video and one audio track.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// `[[audience]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudienceSection {
    /// Home region of these viewers.
    pub region: String,
    /// How many arrive over the event.
    pub viewers: u64,
    /// Arrival-rate shape as `[time_s, relative_rate]` points, linear in between and zero
    /// outside. `[[0, 1], [120, 1]]` = uniform over two minutes.
    pub curve: Vec<[f64; 2]>,
    /// Mean viewing time, seconds (exponential). Absent = stay until the end.
    pub mean_stay_s: Option<f64>,
}

/// `[[failures]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureSection {
    /// When, seconds from the start.
    pub at_s: f64,
    /// `"node"` (crash), `"drain"` (planned, make-before-break) or `"region"` (outage).
    pub kind: String,
    /// Region concerned.
    pub region: String,
    /// For `node`/`drain`: `"busiest"` (most viewers) or `"origin"` (a publisher's node).
    #[serde(default = "busiest")]
    pub pick: String,
    /// For `region`: the region may host nodes again after this many seconds.
    pub recover_after_s: Option<f64>,
}

fn busiest() -> String {
    "busiest".into()
}

/// True when `v` is a finite number `>= min` (false for NaN).
fn at_least(v: f64, min: f64) -> bool {
    v.is_finite() && v >= min
}

impl ScenarioFile {
    /// Parses and validates a scenario.
    pub fn parse(text: &str) -> Result<Self, SimError> {
        let s: ScenarioFile =
            toml::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Scenario(m));
        if !(self.duration_s > 0.0 && self.duration_s <= 30.0 * 86_400.0) {
            return bad(format!(
                "duration_s must be in (0, 30 days], got {}",
                self.duration_s
            ));
        }
        if !(self.sample_interval_s >= 1.0 && self.sample_interval_s <= self.duration_s) {
            return bad("sample_interval_s must be in [1, duration_s]".into());
        }
        if !at_least(self.autoscale.check_interval_s, 1.0) {
            return bad("autoscale.check_interval_s must be at least 1".into());
        }
        if !(self.autoscale.target_utilization_percent > 0.0
            && self.autoscale.target_utilization_percent <= 100.0)
        {
            return bad("autoscale.target_utilization_percent must be in (0, 100]".into());
        }
        let l = &self.latency;
        if !(l.last_mile_min_ms >= 0.0
            && l.last_mile_mean_ms >= l.last_mile_min_ms
            && l.last_mile_max_ms >= l.last_mile_mean_ms
            && l.last_mile_max_ms <= 1000.0)
        {
            return bad("latency: need 0 <= last_mile_min <= mean <= max <= 1000".into());
        }
        for (name, v) in [
            ("capture_encode_ms", l.capture_encode_ms),
            ("publisher_uplink_ms", l.publisher_uplink_ms),
            ("jitter_buffer_ms", l.jitter_buffer_ms),
            ("decode_render_ms", l.decode_render_ms),
            (
                "join.signalling_round_trips",
                self.join.signalling_round_trips,
            ),
            (
                "join.relay_setup_round_trips",
                self.join.relay_setup_round_trips,
            ),
            ("join.keyframe_interval_ms", self.join.keyframe_interval_ms),
            ("detection.node_timeout_ms", self.detection.node_timeout_ms),
            ("planner.hop_processing_ms", self.planner.hop_processing_ms),
            (
                "planner.cross_region_penalty_ms",
                self.planner.cross_region_penalty_ms,
            ),
            ("autoscale.idle_retire_s", self.autoscale.idle_retire_s),
            (
                "autoscale.optimize_min_gain_ms",
                self.autoscale.optimize_min_gain_ms,
            ),
            (
                "network.inter_region_loss_percent",
                self.network.inter_region_loss_percent,
            ),
            (
                "network.intra_region_loss_percent",
                self.network.intra_region_loss_percent,
            ),
        ] {
            if !(v.is_finite() && (0.0..=60_000.0).contains(&v)) {
                return bad(format!("{name} must be in [0, 60000], got {v}"));
            }
        }
        if self.network.inter_region_loss_percent >= 100.0
            || self.network.intra_region_loss_percent >= 100.0
        {
            return bad("loss must be below 100 %".into());
        }
        let m = &self.media;
        if m.layers.is_empty() {
            return bad("media.layers must list at least one layer".into());
        }
        let share: f64 = m.layers.iter().map(|x| x.viewer_percent).sum();
        if !share.is_finite()
            || (share - 100.0).abs() > 0.01
            || m.layers.iter().any(|x| !at_least(x.viewer_percent, 0.0))
        {
            return bad(format!(
                "media.layers viewer_percent must sum to 100, got {share}"
            ));
        }
        if m.video_packet_bytes == 0 {
            return bad("media.video_packet_bytes must be positive".into());
        }
        let mut types = BTreeSet::new();
        for t in &self.node_types {
            if !types.insert(t.name.as_str()) {
                return bad(format!("duplicate node type {:?}", t.name));
            }
            if t.egress_mbps == 0 || t.forward_pps == 0 {
                return bad(format!("node type {:?} needs positive capacity", t.name));
            }
            if !(t.boot_s >= 0.0 && t.hourly_usd >= 0.0) {
                return bad(format!("node type {:?}: negative boot_s or price", t.name));
            }
        }
        let mut regions = BTreeSet::new();
        for r in &self.regions {
            if !regions.insert(r.name.as_str()) {
                return bad(format!("duplicate region {:?}", r.name));
            }
            if !types.contains(r.node_type.as_str()) {
                return bad(format!(
                    "region {:?}: unknown node type {:?}",
                    r.name, r.node_type
                ));
            }
            if !at_least(r.egress_usd_per_gb, 0.0) || r.min_nodes > r.max_nodes {
                return bad(format!("region {:?}: bad price or node bounds", r.name));
            }
            if r.initial_nodes > r.max_nodes {
                return bad(format!(
                    "region {:?}: initial_nodes above max_nodes",
                    r.name
                ));
            }
        }
        if self.regions.is_empty() {
            return bad("at least one [[regions]] entry is required".into());
        }
        if self.publishers.is_empty() {
            return bad("at least one [[publishers]] entry is required".into());
        }
        for p in &self.publishers {
            let Some(r) = self.regions.iter().find(|r| r.name == p.region) else {
                return bad(format!(
                    "publisher region {:?} is not in [[regions]]",
                    p.region
                ));
            };
            if r.initial_nodes == 0 {
                return bad(format!(
                    "publisher region {:?} needs initial_nodes >= 1 (the origin)",
                    p.region
                ));
            }
            if p.count == 0 || p.count > 1000 {
                return bad("publishers.count must be in 1..=1000".into());
            }
        }
        let mut total: u64 = 0;
        for a in &self.audience {
            if !regions.contains(a.region.as_str()) {
                return bad(format!(
                    "audience region {:?} is not in [[regions]]",
                    a.region
                ));
            }
            total = total.saturating_add(a.viewers);
            if a.curve.len() < 2 {
                return bad(format!("audience {:?}: curve needs two points", a.region));
            }
            let mut area = 0.0;
            for w in a.curve.windows(2) {
                let ([t0, r0], [t1, r1]) = (w[0], w[1]);
                if !(t1 >= t0 && r0 >= 0.0 && r1 >= 0.0 && t0 >= 0.0) {
                    return bad(format!(
                        "audience {:?}: curve times must ascend and rates be >= 0",
                        a.region
                    ));
                }
                area += (t1 - t0) * (r0 + r1) / 2.0;
            }
            if !at_least(area, f64::MIN_POSITIVE) && a.viewers > 0 {
                return bad(format!("audience {:?}: curve has zero area", a.region));
            }
            if let Some(s) = a.mean_stay_s {
                if !at_least(s, f64::MIN_POSITIVE) {
                    return bad("audience.mean_stay_s must be positive".into());
                }
            }
        }
        if total > 20_000_000 {
            return bad(format!(
                "{total} viewers exceeds the simulator bound of 20M"
            ));
        }
        for f in &self.failures {
            if !matches!(f.kind.as_str(), "node" | "drain" | "region") {
                return bad(format!(
                    "failure kind {:?}: use node, drain or region",
                    f.kind
                ));
            }
            if !matches!(f.pick.as_str(), "busiest" | "origin") {
                return bad(format!("failure pick {:?}: use busiest or origin", f.pick));
            }
            if !regions.contains(f.region.as_str()) {
                return bad(format!(
                    "failure region {:?} is not in [[regions]]",
                    f.region
                ));
            }
            if !(f.at_s >= 0.0 && f.at_s <= self.duration_s) {
                return bad("failure at_s must be within the event".into());
            }
            if let Some(r) = f.recover_after_s {
                if !at_least(r, 0.0) || f.kind != "region" {
                    return bad("recover_after_s must be >= 0 and only on region failures".into());
                }
            }
        }
        Ok(())
    }
}

impl RttFile {
    /// Parses an RTT data file.
    pub fn parse(text: &str) -> Result<Self, SimError> {
        let f: RttFile =
            toml::from_str(text).map_err(|e| SimError::Scenario(format!("RTT file: {e}")))?;
        if !(at_least(f.intra_ms, 0.0) && f.intra_ms <= 10_000.0) {
            return Err(SimError::Scenario(
                "RTT file: intra_ms must be in [0, 10000]".into(),
            ));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
duration_s = 60
[[node_types]]
name = "small"
egress_mbps = 1000
forward_pps = 100000
hourly_usd = 0.1
boot_s = 30
[[regions]]
name = "us-east-1"
node_type = "small"
egress_usd_per_gb = 0.05
initial_nodes = 1
[[publishers]]
region = "us-east-1"
[[audience]]
region = "us-east-1"
viewers = 10
curve = [[0, 1], [10, 1]]
"#;

    fn err(text: &str) -> String {
        match ScenarioFile::parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_scenario_parses_with_defaults() {
        let s = ScenarioFile::parse(MINIMAL).expect("valid");
        assert_eq!(s.planner.max_fanout, 16);
        assert_eq!(s.network.rtt_file, "world");
        assert_eq!(s.media.layers.len(), 3);
    }

    #[test]
    fn bad_scenarios_are_clear_errors() {
        assert!(
            err(&MINIMAL.replace("duration_s = 60", "duration_s = 60\ntypo = 1")).contains("typo")
        );
        assert!(err(&MINIMAL.replace("duration_s = 60", "duration_s = nan")).contains("duration_s"));
        assert!(
            err(&MINIMAL.replace("node_type = \"small\"", "node_type = \"big\""))
                .contains("unknown node type")
        );
        assert!(err(&MINIMAL.replace("initial_nodes = 1", "initial_nodes = 0")).contains("origin"));
        assert!(err(&MINIMAL.replace("[[0, 1], [10, 1]]", "[[10, 1], [0, 1]]")).contains("ascend"));
        assert!(
            err(&MINIMAL.replace("egress_usd_per_gb = 0.05", "egress_usd_per_gb = nan"))
                .contains("price")
        );
        let nan_layer = format!(
            "{MINIMAL}\n[media]\nlayers = [{{ name = \"a\", kbps = 100, viewer_percent = nan }}]\n"
        );
        assert!(err(&nan_layer).contains("viewer_percent"));
        let bad_failure = format!(
            "{MINIMAL}\n[[failures]]\nat_s = 5\nkind = \"meteor\"\nregion = \"us-east-1\"\n"
        );
        assert!(err(&bad_failure).contains("meteor"));
    }
}
