//! Results of a run: the table printed on stdout and the CSV files.
//!
//! Every number is formatted with a fixed number of decimals and every collection is
//! ordered, so the same seed gives byte-identical files.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use super::SimError;

/// Fixed-width histogram of non-negative integers (1 unit per bin, last bin = overflow).
#[derive(Clone, Debug)]
pub struct Histogram {
    bins: Vec<u64>,
    total: u64,
}

impl Histogram {
    /// Bins `0..=max`.
    pub fn new(max: usize) -> Self {
        Histogram {
            bins: vec![0; max + 1],
            total: 0,
        }
    }

    /// Adds `count` samples of `value` (clamped to the last bin).
    pub fn add(&mut self, value: usize, count: u64) {
        let i = value.min(self.bins.len() - 1);
        self.bins[i] += count;
        self.total += count;
    }

    /// Adds another histogram of the same size.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
        self.total += other.total;
    }

    /// Nearest-rank percentile (`q` in (0, 1]); 0 when empty.
    pub fn percentile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let want = ((q * self.total as f64).ceil() as u64).max(1);
        let mut cum = 0;
        for (i, c) in self.bins.iter().enumerate() {
            cum += c;
            if cum >= want {
                return i as f64;
            }
        }
        (self.bins.len() - 1) as f64
    }

    /// Number of samples.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// One time-series row (one region at one sample time).
#[derive(Clone, Debug)]
pub struct SeriesRow {
    /// Sample time, s.
    pub t_s: f64,
    /// Region index.
    pub region: usize,
    /// Nodes serving.
    pub nodes_online: u32,
    /// Nodes booting (billed, not serving).
    pub nodes_booting: u32,
    /// Viewers served by nodes in this region.
    pub viewers_hosted: u64,
    /// Viewers whose home is this region (served anywhere or waiting).
    pub viewers_home: u64,
    /// Viewers from this region waiting for capacity.
    pub pending: u64,
    /// Egress of this region's nodes, Mbit/s.
    pub egress_mbps: f64,
    /// Glass-to-glass latency of this region's viewers, ms.
    pub lat_p50_ms: f64,
    /// p95.
    pub lat_p95_ms: f64,
    /// p99.
    pub lat_p99_ms: f64,
}

/// One tree at one sample time.
#[derive(Clone, Debug)]
pub struct TreeRow {
    /// Sample time, s.
    pub t_s: f64,
    /// Track id.
    pub track: u32,
    /// Nodes carrying it.
    pub members: u32,
    /// Deepest member.
    pub max_depth: u32,
    /// Hops whose ends are in different regions.
    pub cross_region_links: u32,
    /// Largest modelled origin→member delay, ms.
    pub worst_path_ms: f64,
}

/// Per-region totals.
#[derive(Clone, Debug)]
pub struct RegionSummary {
    /// Name.
    pub name: String,
    /// Machine type.
    pub node_type: String,
    /// Viewers one node can serve.
    pub viewers_per_node: u64,
    /// Most nodes (online + booting) at a sample.
    pub peak_nodes: u32,
    /// Node-hours billed.
    pub node_hours: f64,
    /// Most viewers served at a sample.
    pub peak_hosted: u64,
    /// Egress, GB (10^9 bytes).
    pub egress_gb: f64,
    /// Egress cost, USD.
    pub egress_cost: f64,
    /// Compute cost, USD.
    pub compute_cost: f64,
    /// Glass-to-glass over the whole event (viewer-samples), ms.
    pub lat_p50_ms: f64,
    /// p95.
    pub lat_p95_ms: f64,
    /// p99.
    pub lat_p99_ms: f64,
    /// Viewers who joined.
    pub joins: u64,
    /// Join time p50, ms.
    pub join_p50_ms: f64,
    /// p95.
    pub join_p95_ms: f64,
    /// p99.
    pub join_p99_ms: f64,
    /// Arrivals turned away (pending queue full).
    pub rejected: u64,
    /// Spilled viewers moved back to their nearest region (make-before-break).
    pub rehomed: u64,
    /// Join time at percentiles 1..=100, ms (empty region: zeros).
    pub join_cdf: Vec<f64>,
}

/// One inter-region link at one sample time.
#[derive(Clone, Debug)]
pub struct LinkRow {
    /// Sample time, s.
    pub t_s: f64,
    /// Upstream region index.
    pub from: u16,
    /// Downstream region index.
    pub to: u16,
    /// Relay traffic, Mbit/s.
    pub mbps: f64,
}

/// One directed inter-region relay link.
#[derive(Clone, Debug)]
pub struct LinkSummary {
    /// Upstream region.
    pub from: String,
    /// Downstream region.
    pub to: String,
    /// Highest sampled rate, Mbit/s.
    pub peak_mbps: f64,
    /// Volume, GB.
    pub gb: f64,
}

/// What one failure did.
#[derive(Clone, Debug)]
pub struct FailureSummary {
    /// When, s.
    pub at_s: f64,
    /// node, drain or region.
    pub kind: String,
    /// Region.
    pub region: String,
    /// Nodes removed.
    pub nodes_lost: u32,
    /// A publisher had to move to a new origin.
    pub origin_moved: bool,
    /// Viewers whose edge was removed.
    pub viewers_direct: u64,
    /// Viewers whose edge survived but lost its upstream path.
    pub viewers_downstream: u64,
    /// Viewers that fitted nowhere at once and waited for capacity.
    pub unplaced: u64,
    /// Of those, how many left or were still waiting at the end.
    pub never_recovered: u64,
    /// Viewers with a recovery time sample.
    pub recovered: u64,
    /// Recovery time (media gap) p50, ms.
    pub recovery_p50_ms: f64,
    /// p95.
    pub recovery_p95_ms: f64,
    /// Max.
    pub recovery_max_ms: f64,
}

/// One track's tree at the audience peak.
#[derive(Clone, Debug)]
pub struct TrackLine {
    /// Track id.
    pub track: u32,
    /// Video (true) or audio.
    pub video: bool,
    /// Origin node id.
    pub origin: u32,
    /// Origin region index.
    pub origin_region: u16,
    /// Members per region index.
    pub members_per_region: Vec<u32>,
    /// Cross-region hops: (from region, to region) → count.
    pub trunks: Vec<((u16, u16), u32)>,
    /// Deepest member.
    pub max_depth: u32,
    /// Worst modelled origin→member delay per region, ms.
    pub worst_path_ms_per_region: Vec<f64>,
}

/// The relay plan at the sample with the most viewers.
#[derive(Clone, Debug)]
pub struct PeakPlan {
    /// Sample time, s.
    pub t_s: f64,
    /// Viewers served then.
    pub viewers: u64,
    /// Per track.
    pub tracks: Vec<TrackLine>,
}

/// Everything a run produces.
#[derive(Clone, Debug)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Event length, s.
    pub duration_s: f64,
    /// Region names by index.
    pub region_names: Vec<String>,
    /// Edge load of one viewer, kbit/s.
    pub per_viewer_kbps: u64,
    /// Edge load of one viewer, packets/s.
    pub per_viewer_pps: u64,
    /// Time series.
    pub series: Vec<SeriesRow>,
    /// Tree series.
    pub trees: Vec<TreeRow>,
    /// Per-region totals.
    pub regions: Vec<RegionSummary>,
    /// Inter-region links.
    pub links: Vec<LinkSummary>,
    /// Inter-region link traffic per sample (links with traffic only).
    pub link_series: Vec<LinkRow>,
    /// Failures.
    pub failures: Vec<FailureSummary>,
    /// Plan at the peak.
    pub peak_plan: Option<PeakPlan>,
    /// Arrivals.
    pub viewers_total: u64,
    /// Tree members re-parented by the periodic optimize pass.
    pub tree_moves: u64,
}

impl Report {
    /// The human-readable report.
    pub fn table(&self, seed: u64) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "arbor-sim: {}  (seed {seed}, {:.0} s simulated, {} viewers arrived; one viewer costs {} kbit/s, {} pkt/s at its edge)",
            self.name, self.duration_s, self.viewers_total, self.per_viewer_kbps, self.per_viewer_pps
        );
        if let Some(p) = &self.peak_plan {
            let _ = writeln!(
                o,
                "\nRelay plan at the audience peak (t = {:.0} s, {} viewers served)",
                p.t_s, p.viewers
            );
            for t in p.tracks.iter().filter(|t| t.video) {
                let _ = writeln!(
                    o,
                    "  track {} (video): origin n{} in {}, depth {}",
                    t.track,
                    t.origin,
                    self.rname(t.origin_region),
                    t.max_depth
                );
                let members: Vec<String> = t
                    .members_per_region
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .map(|(r, c)| format!("{} {}", self.region_names[r], c))
                    .collect();
                let _ = writeln!(o, "    nodes in tree:  {}", members.join(", "));
                let trunks: Vec<String> = t
                    .trunks
                    .iter()
                    .map(|((a, b), c)| format!("{}->{} x{}", self.rname(*a), self.rname(*b), c))
                    .collect();
                let _ = writeln!(
                    o,
                    "    cross-region:   {}",
                    if trunks.is_empty() {
                        "none".to_string()
                    } else {
                        trunks.join(", ")
                    }
                );
                let worst: Vec<String> = t
                    .worst_path_ms_per_region
                    .iter()
                    .enumerate()
                    .filter(|(r, _)| t.members_per_region[*r] > 0)
                    .map(|(r, ms)| format!("{} {:.1}", self.region_names[r], ms))
                    .collect();
                let _ = writeln!(o, "    worst origin->node ms: {}", worst.join(", "));
            }
        }
        let _ = writeln!(o, "\nRegions");
        let _ = writeln!(
            o,
            "  {:<15} {:>7} {:>6} {:>8} {:>8} {:>10} {:>10} {:>10} {:>18} {:>20} {:>8} {:>8}",
            "region",
            "v/node",
            "nodes",
            "node-h",
            "viewers",
            "egress GB",
            "egress $",
            "compute $",
            "g2g p50/p95/p99 ms",
            "join p50/p95/p99 ms",
            "rejected",
            "rehomed"
        );
        let mut tot = (0u32, 0.0, 0u64, 0.0, 0.0, 0.0, 0u64, 0u64);
        for r in &self.regions {
            let _ = writeln!(
                o,
                "  {:<15} {:>7} {:>6} {:>8.1} {:>8} {:>10.1} {:>10.2} {:>10.2} {:>18} {:>20} {:>8} {:>8}",
                r.name,
                r.viewers_per_node,
                r.peak_nodes,
                r.node_hours,
                r.peak_hosted,
                r.egress_gb,
                r.egress_cost,
                r.compute_cost,
                format!("{:.0}/{:.0}/{:.0}", r.lat_p50_ms, r.lat_p95_ms, r.lat_p99_ms),
                format!("{:.0}/{:.0}/{:.0}", r.join_p50_ms, r.join_p95_ms, r.join_p99_ms),
                r.rejected,
                r.rehomed
            );
            tot.0 += r.peak_nodes;
            tot.1 += r.node_hours;
            tot.2 += r.peak_hosted;
            tot.3 += r.egress_gb;
            tot.4 += r.egress_cost;
            tot.5 += r.compute_cost;
            tot.6 += r.rejected;
            tot.7 += r.rehomed;
        }
        let _ = writeln!(
            o,
            "  {:<15} {:>7} {:>6} {:>8.1} {:>8} {:>10.1} {:>10.2} {:>10.2} {:>18} {:>20} {:>8} {:>8}",
            "total", "", tot.0, tot.1, tot.2, tot.3, tot.4, tot.5, "", "", tot.6, tot.7
        );
        let _ = writeln!(
            o,
            "  (nodes and viewers columns are per-region peaks; their totals are sums of peaks)"
        );
        let _ = writeln!(o, "  total cost: ${:.2}", tot.4 + tot.5);
        let _ = writeln!(
            o,
            "  tree members re-parented by the optimize pass: {}",
            self.tree_moves
        );
        let _ = writeln!(o, "\nInter-region relay links");
        if self.links.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for l in &self.links {
            let _ = writeln!(
                o,
                "  {:<15} -> {:<15} peak {:>9.1} Mbit/s  {:>9.2} GB",
                l.from, l.to, l.peak_mbps, l.gb
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(o, "\nFailures");
            for f in &self.failures {
                let _ = writeln!(
                    o,
                    "  t={:.0}s {} {}: {} node(s) lost{}; viewers moved {}, re-parented {}, waited for capacity {} (never recovered {}); media gap p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
                    f.at_s,
                    f.kind,
                    f.region,
                    f.nodes_lost,
                    if f.origin_moved { ", publisher moved to a new origin" } else { "" },
                    f.viewers_direct,
                    f.viewers_downstream,
                    f.unplaced,
                    f.never_recovered,
                    f.recovery_p50_ms,
                    f.recovery_p95_ms,
                    f.recovery_max_ms
                );
            }
        }
        o
    }

    fn rname(&self, r: u16) -> &str {
        self.region_names
            .get(usize::from(r))
            .map(String::as_str)
            .unwrap_or("?")
    }

    /// Writes the CSV files into `dir` (created if missing); returns their paths.
    pub fn write_csv(&self, dir: &Path) -> Result<Vec<PathBuf>, SimError> {
        fs::create_dir_all(dir).map_err(|e| SimError::Io(dir.display().to_string(), e))?;
        let mut files = Vec::new();
        let mut put = |name: &str, body: String| -> Result<(), SimError> {
            let p = dir.join(name);
            fs::write(&p, body).map_err(|e| SimError::Io(p.display().to_string(), e))?;
            files.push(p);
            Ok(())
        };

        let mut s = String::from(
            "t_s,region,nodes_online,nodes_booting,viewers_hosted,viewers_home,pending,egress_mbps,g2g_p50_ms,g2g_p95_ms,g2g_p99_ms\n",
        );
        for r in &self.series {
            let _ = writeln!(
                s,
                "{:.0},{},{},{},{},{},{},{:.3},{:.0},{:.0},{:.0}",
                r.t_s,
                self.region_names[r.region],
                r.nodes_online,
                r.nodes_booting,
                r.viewers_hosted,
                r.viewers_home,
                r.pending,
                r.egress_mbps,
                r.lat_p50_ms,
                r.lat_p95_ms,
                r.lat_p99_ms
            );
        }
        put("timeseries.csv", s)?;

        let mut s = String::from("t_s,track,members,max_depth,cross_region_links,worst_path_ms\n");
        for r in &self.trees {
            let _ = writeln!(
                s,
                "{:.0},{},{},{},{},{:.3}",
                r.t_s, r.track, r.members, r.max_depth, r.cross_region_links, r.worst_path_ms
            );
        }
        put("trees.csv", s)?;

        let mut s = String::from(
            "region,node_type,viewers_per_node,peak_nodes,node_hours,peak_viewers,egress_gb,egress_usd,compute_usd,g2g_p50_ms,g2g_p95_ms,g2g_p99_ms,joins,join_p50_ms,join_p95_ms,join_p99_ms,rejected,rehomed\n",
        );
        for r in &self.regions {
            let _ = writeln!(
                s,
                "{},{},{},{},{:.3},{},{:.3},{:.2},{:.2},{:.0},{:.0},{:.0},{},{:.1},{:.1},{:.1},{},{}",
                r.name,
                r.node_type,
                r.viewers_per_node,
                r.peak_nodes,
                r.node_hours,
                r.peak_hosted,
                r.egress_gb,
                r.egress_cost,
                r.compute_cost,
                r.lat_p50_ms,
                r.lat_p95_ms,
                r.lat_p99_ms,
                r.joins,
                r.join_p50_ms,
                r.join_p95_ms,
                r.join_p99_ms,
                r.rejected,
                r.rehomed
            );
        }
        put("regions.csv", s)?;

        let mut s = String::from("from,to,peak_mbps,gb\n");
        for l in &self.links {
            let _ = writeln!(s, "{},{},{:.3},{:.3}", l.from, l.to, l.peak_mbps, l.gb);
        }
        put("links.csv", s)?;

        let mut s = String::from("t_s,from,to,mbps\n");
        for l in &self.link_series {
            let _ = writeln!(
                s,
                "{:.0},{},{},{:.3}",
                l.t_s,
                self.rname(l.from),
                self.rname(l.to),
                l.mbps
            );
        }
        put("links_timeseries.csv", s)?;

        let mut s = String::from("percentile");
        for r in &self.regions {
            let _ = write!(s, ",{}", r.name);
        }
        s.push('\n');
        for p in 0..100 {
            let _ = write!(s, "{}", p + 1);
            for r in &self.regions {
                let _ = write!(s, ",{:.1}", r.join_cdf.get(p).copied().unwrap_or(0.0));
            }
            s.push('\n');
        }
        put("join_times.csv", s)?;

        let mut s = String::from(
            "at_s,kind,region,nodes_lost,origin_moved,viewers_direct,viewers_downstream,unplaced,never_recovered,recovered,recovery_p50_ms,recovery_p95_ms,recovery_max_ms\n",
        );
        for f in &self.failures {
            let _ = writeln!(
                s,
                "{:.0},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1}",
                f.at_s,
                f.kind,
                f.region,
                f.nodes_lost,
                f.origin_moved,
                f.viewers_direct,
                f.viewers_downstream,
                f.unplaced,
                f.never_recovered,
                f.recovered,
                f.recovery_p50_ms,
                f.recovery_p95_ms,
                f.recovery_max_ms
            );
        }
        put("failures.csv", s)?;

        let mut s = String::from("track,video,origin,origin_region,region,nodes,worst_path_ms\n");
        if let Some(p) = &self.peak_plan {
            for t in &p.tracks {
                for (r, c) in t.members_per_region.iter().enumerate() {
                    if *c > 0 {
                        let _ = writeln!(
                            s,
                            "{},{},n{},{},{},{},{:.3}",
                            t.track,
                            t.video,
                            t.origin,
                            self.rname(t.origin_region),
                            self.region_names[r],
                            c,
                            t.worst_path_ms_per_region[r]
                        );
                    }
                }
            }
        }
        put("plan.csv", s)?;
        Ok(files)
    }
}
