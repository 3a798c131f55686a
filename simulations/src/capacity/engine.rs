//! The discrete-event loop.
//!
//! # Event loop
//!
//! Simulated time is an integer count of microseconds. Pending events sit in a binary heap
//! keyed by `(time, sequence number)`; the sequence number is taken from a counter when the
//! event is scheduled, so events at the same instant run in scheduling order and the run is
//! a pure function of the scenario and the seed.
//!
//! Events:
//!
//! * `Arrival(a)` — the next viewer of audience entry `a` arrives. Arrival times are drawn
//!   lazily and in order (sequential order statistics of uniforms mapped through the
//!   arrival curve's inverse CDF), so the heap holds one arrival per audience entry instead
//!   of one per viewer. The handler schedules the entry's next arrival.
//! * `Leave(v)` — viewer `v` leaves (only for audiences with a finite mean stay).
//! * `NodeOnline(n)` — a booted node joins the planner's pool; waiting viewers are placed.
//! * `Autoscale` — every `autoscale.check_interval_s`: boot nodes where demand exceeds the
//!   target utilisation, retire nodes idle for `idle_retire_s`.
//! * `Failure(i)` — the i-th failure: nodes are cordoned, then removed one by one through
//!   the planner's `remove_node`, and the resulting diffs are turned into "viewers affected"
//!   and "recovery time" samples.
//! * `RegionRecover(r)` — a failed region may host nodes again.
//! * `Sample` — every `sample_interval_s`: one time-series row per region (nodes, viewers,
//!   egress, latency percentiles) and per track (tree size and depth); egress and node time
//!   are integrated over the interval that ends here.
//!
//! All viewer placement and tree decisions are made by `arbor_topology::planner::Planner`,
//! the code the relay fabric runs. The loop only adds time (boot delays, detection timeouts,
//! round trips) and bookkeeping.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use arbor_topology::nodes::{NodeId, NodeSpec, RegionId};
use arbor_topology::planner::{Action, Diff, Planner, PlannerError, TrackId, TrackSpec, ViewerId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::{FailureKind, Model, US_PER_S};
use super::report::{
    FailureSummary, Histogram, LinkRow, LinkSummary, PeakPlan, RegionSummary, Report, SeriesRow,
    TrackLine, TreeRow,
};
use super::SimError;

/// Latency histograms have 1 ms bins up to this value (larger samples land in the last bin).
pub const LATENCY_HIST_MAX_MS: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Failure(u32),
    RegionRecover(u16),
    NodeOnline(u32),
    Arrival(u32),
    Leave(u32),
    Autoscale,
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VState {
    Pending,
    Placed,
    Gone,
}

#[derive(Clone, Debug)]
struct ViewerRec {
    home: RegionId,
    last_mile_ms: u16,
    state: VState,
    node: Option<NodeId>,
    arrived_us: u64,
    /// Waiting to be re-placed after failure `.0`, which happened at `.1`.
    recovering: Option<(u32, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NState {
    Booting,
    Online,
}

#[derive(Clone, Debug)]
struct SimNode {
    region: RegionId,
    state: NState,
    idle_since: Option<u64>,
}

struct ArrivalState {
    remaining: u64,
    /// Last drawn order statistic of the uniform sample, in [0, 1].
    last_u: f64,
    rng: ChaCha8Rng,
}

#[derive(Default)]
struct FailureAcc {
    nodes_lost: u32,
    direct: u64,
    downstream: u64,
    unplaced: u64,
    /// Unplaced viewers placed later (their samples are in `samples`).
    late: u64,
    origin_moved: bool,
    /// (recovery ms, viewers).
    samples: Vec<(f64, u64)>,
}

/// The simulator state. Build with [`Engine::new`], drive with [`Engine::run`].
pub struct Engine<'m> {
    m: &'m Model,
    planner: Planner,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    viewers: Vec<ViewerRec>,
    arrivals: Vec<ArrivalState>,
    rng: ChaCha8Rng,
    nodes: BTreeMap<NodeId, SimNode>,
    next_node: u32,
    region_down: Vec<bool>,
    pending: Vec<VecDeque<u32>>,
    pending_count: Vec<u64>,
    home_present: Vec<u64>,
    hosted: Vec<u64>,
    home_away: Vec<u64>,
    rejected: Vec<u64>,
    /// Arrivals per home region since the last autoscaler run.
    recent_arrivals: Vec<u64>,
    /// Viewers moved home by `rehome`, per home region.
    rehomed: Vec<u64>,
    /// Per node, per home region: histogram of viewers' last-mile one-way delay (1 ms bins).
    last_mile: BTreeMap<NodeId, Vec<Vec<u32>>>,
    join_ms: Vec<Vec<f32>>,
    // Accumulated metrics.
    series: Vec<SeriesRow>,
    tree_rows: Vec<TreeRow>,
    lat_total: Vec<Histogram>,
    node_hours: Vec<f64>,
    egress_gb: Vec<f64>,
    peak_nodes: Vec<u32>,
    peak_hosted: Vec<u64>,
    links: BTreeMap<(u16, u16), (f64, f64)>,
    link_rows: Vec<LinkRow>,
    failures: Vec<FailureAcc>,
    peak_plan: Option<PeakPlan>,
    peak_total: u64,
    video_tracks: Vec<TrackId>,
    check_invariants: bool,
    /// Members re-parented by the optimize pass.
    optimized: u64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl<'m> Engine<'m> {
    /// Sets up the fleet at t = 0, the tracks and the first events.
    pub fn new(m: &'m Model, seed: u64) -> Result<Self, SimError> {
        let planner = Planner::new(m.planner, m.rtt.clone()).map_err(SimError::Planner)?;
        let nr = m.regions.len();
        let mut e = Engine {
            m,
            planner,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            viewers: Vec::new(),
            arrivals: Vec::new(),
            rng: stream(seed, 0),
            nodes: BTreeMap::new(),
            next_node: 0,
            region_down: vec![false; nr],
            pending: vec![VecDeque::new(); nr],
            pending_count: vec![0; nr],
            home_present: vec![0; nr],
            hosted: vec![0; nr],
            home_away: vec![0; nr],
            rejected: vec![0; nr],
            recent_arrivals: vec![0; nr],
            rehomed: vec![0; nr],
            last_mile: BTreeMap::new(),
            join_ms: vec![Vec::new(); nr],
            series: Vec::new(),
            tree_rows: Vec::new(),
            lat_total: (0..nr)
                .map(|_| Histogram::new(LATENCY_HIST_MAX_MS))
                .collect(),
            node_hours: vec![0.0; nr],
            egress_gb: vec![0.0; nr],
            peak_nodes: vec![0; nr],
            peak_hosted: vec![0; nr],
            links: BTreeMap::new(),
            link_rows: Vec::new(),
            failures: (0..m.failures.len())
                .map(|_| FailureAcc::default())
                .collect(),
            peak_plan: None,
            peak_total: 0,
            video_tracks: Vec::new(),
            check_invariants: false,
            optimized: 0,
        };
        for (i, r) in m.regions.iter().enumerate() {
            for _ in 0..r.initial_nodes {
                let id = e.new_node(RegionId(i as u16), NState::Online);
                e.planner
                    .add_node(e.spec(id, RegionId(i as u16)))
                    .map_err(SimError::Planner)?;
            }
        }
        // Each publisher: video track 2k, audio track 2k+1, origin = lowest-id node of its
        // region at t = 0 (validation guarantees one exists).
        for (k, region) in m.publishers.iter().enumerate() {
            let origin = e
                .nodes
                .iter()
                .find(|(_, n)| n.region == *region)
                .map(|(id, _)| *id)
                .ok_or_else(|| SimError::Scenario("publisher region has no node".into()))?;
            let video = TrackId(2 * k as u32);
            e.planner
                .add_track(TrackSpec {
                    id: video,
                    origin,
                    relay_load: m.video_relay,
                    viewer_load: m.video_viewer,
                })
                .map_err(SimError::Planner)?;
            e.planner
                .add_track(TrackSpec {
                    id: TrackId(2 * k as u32 + 1),
                    origin,
                    relay_load: m.audio,
                    viewer_load: m.audio,
                })
                .map_err(SimError::Planner)?;
            e.video_tracks.push(video);
        }
        for (i, a) in m.audience.iter().enumerate() {
            e.arrivals.push(ArrivalState {
                remaining: a.viewers,
                last_u: 0.0,
                rng: stream(seed, 1_000 + i as u64),
            });
            e.schedule_next_arrival(i as u32);
        }
        for (i, f) in m.failures.iter().enumerate() {
            e.push(f.at_us, Ev::Failure(i as u32));
            if let Some(t) = f.recover_at_us {
                e.push(t, Ev::RegionRecover(f.region.0));
            }
        }
        e.push(0, Ev::Autoscale);
        e.push(m.sample_us, Ev::Sample);
        Ok(e)
    }

    /// Also check every planner invariant at every sample (slow; for tests).
    pub fn with_invariant_checks(mut self) -> Self {
        self.check_invariants = true;
        self
    }

    /// Runs to the end of the event. `progress` is called with the simulated time (µs)
    /// after every sample.
    pub fn run(mut self, mut progress: impl FnMut(u64)) -> Result<Report, SimError> {
        while let Some(Reverse((t, _, ev))) = self.heap.pop() {
            if t > self.m.duration_us {
                break;
            }
            self.now = t;
            match ev {
                Ev::Arrival(a) => self.on_arrival(a)?,
                Ev::Leave(v) => self.on_leave(v)?,
                Ev::NodeOnline(n) => self.on_node_online(NodeId(n))?,
                Ev::Autoscale => self.on_autoscale()?,
                Ev::Failure(i) => self.on_failure(i)?,
                Ev::RegionRecover(r) => {
                    if let Some(d) = self.region_down.get_mut(usize::from(r)) {
                        *d = false;
                    }
                }
                Ev::Sample => {
                    if self.check_invariants {
                        self.planner
                            .check_invariants()
                            .map_err(SimError::Internal)?;
                    }
                    self.on_sample();
                    progress(self.now);
                }
            }
        }
        Ok(self.finish())
    }

    // ------------------------------------------------------------------ plumbing

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    fn new_node(&mut self, region: RegionId, state: NState) -> NodeId {
        let id = NodeId(self.next_node);
        self.next_node += 1;
        self.nodes.insert(
            id,
            SimNode {
                region,
                state,
                idle_since: None,
            },
        );
        id
    }

    fn spec(&self, id: NodeId, region: RegionId) -> NodeSpec {
        let r = &self.m.regions[region.index()];
        NodeSpec {
            id,
            region,
            capacity: self.m.node_types[r.node_type].capacity,
            egress_micro_usd_per_gb: (r.egress_usd_per_gb * 1e6) as u64,
        }
    }

    fn rtt_ms(&self, a: RegionId, b: RegionId) -> f64 {
        f64::from(self.m.rtt.rtt_us(a, b)) / 1000.0
    }

    fn one_way_ms(&self, a: RegionId, b: RegionId) -> f64 {
        f64::from(self.m.rtt.one_way_us(a, b)) / 1000.0
    }

    fn node_region(&self, n: NodeId) -> Option<RegionId> {
        self.nodes.get(&n).map(|s| s.region)
    }

    fn schedule_next_arrival(&mut self, a: u32) {
        let Some(st) = self.arrivals.get_mut(a as usize) else {
            return;
        };
        if st.remaining == 0 {
            return;
        }
        // Next order statistic: the minimum of `remaining` uniforms on [last_u, 1].
        let u: f64 = st.rng.random();
        let k = st.remaining as f64;
        st.last_u = 1.0 - (1.0 - st.last_u) * (1.0 - u).powf(1.0 / k);
        st.remaining -= 1;
        let t_s = self.m.audience[a as usize].curve.inverse(st.last_u);
        let t = ((t_s * US_PER_S) as u64).max(self.now);
        self.push(t, Ev::Arrival(a));
    }

    /// Applies a diff to the simulator's mirror of viewer placement.
    fn mirror(&mut self, diff: &Diff) {
        for a in &diff.actions {
            match *a {
                Action::AttachViewer { viewer, node } => self.mirror_place(viewer, node),
                Action::MoveViewer { viewer, from, to } => {
                    self.mirror_unplace(viewer, from);
                    self.mirror_place(viewer, to);
                }
                Action::DetachViewer { viewer, node } => self.mirror_unplace(viewer, node),
                Action::Link { .. } | Action::Unlink { .. } => {}
            }
        }
    }

    fn mirror_place(&mut self, viewer: ViewerId, node: NodeId) {
        let Some(region) = self.node_region(node) else {
            return;
        };
        let nr = self.m.regions.len();
        let bins = self.m.file.latency.last_mile_max_ms as usize + 1;
        let Some(v) = self.viewers.get_mut(viewer.0 as usize) else {
            return;
        };
        v.node = Some(node);
        v.state = VState::Placed;
        let (home, lm) = (v.home, usize::from(v.last_mile_ms));
        let hist = self
            .last_mile
            .entry(node)
            .or_insert_with(|| vec![Vec::new(); nr]);
        let h = &mut hist[home.index()];
        if h.is_empty() {
            h.resize(bins, 0);
        }
        h[lm.min(bins - 1)] += 1;
        self.hosted[region.index()] += 1;
        if region != home {
            self.home_away[home.index()] += 1;
        }
    }

    fn mirror_unplace(&mut self, viewer: ViewerId, node: NodeId) {
        let Some(v) = self.viewers.get_mut(viewer.0 as usize) else {
            return;
        };
        v.node = None;
        let (home, lm) = (v.home, usize::from(v.last_mile_ms));
        if let Some(h) = self
            .last_mile
            .get_mut(&node)
            .and_then(|x| x.get_mut(home.index()))
        {
            let last = h.len().saturating_sub(1);
            if let Some(c) = h.get_mut(lm.min(last)) {
                *c = c.saturating_sub(1);
            }
        }
        if let Some(region) = self.nodes.get(&node).map(|s| s.region) {
            self.hosted[region.index()] = self.hosted[region.index()].saturating_sub(1);
            if region != home {
                self.home_away[home.index()] = self.home_away[home.index()].saturating_sub(1);
            }
        }
    }

    /// Round trip viewer ↔ edge, ms.
    fn viewer_rtt_ms(&self, v: &ViewerRec, node: NodeId) -> f64 {
        let edge = self.node_region(node).unwrap_or(v.home);
        2.0 * (f64::from(v.last_mile_ms) + self.one_way_ms(edge, v.home))
    }

    /// Time to set up the new links of a diff that lead to `node` (max over tracks).
    fn setup_ms(&self, diff: &Diff, node: NodeId) -> f64 {
        let rt = self.m.file.join.relay_setup_round_trips;
        diff.actions
            .iter()
            .filter_map(|a| match *a {
                Action::Link { parent, child, .. } if child == node => {
                    let (p, c) = (self.node_region(parent)?, self.node_region(child)?);
                    Some(rt * self.rtt_ms(p, c))
                }
                _ => None,
            })
            .fold(0.0, f64::max)
    }

    fn keyframe_ms(&mut self) -> f64 {
        if self.m.file.join.cache_keyframes {
            0.0
        } else {
            self.rng.random::<f64>() * self.m.file.join.keyframe_interval_ms
        }
    }

    /// Tries to place viewer `v`; records its join (or recovery) time. False = no capacity.
    fn try_place(&mut self, v: u32) -> Result<bool, SimError> {
        let Some(rec) = self.viewers.get(v as usize).cloned() else {
            return Ok(false);
        };
        match self.planner.join(ViewerId(u64::from(v)), rec.home) {
            Ok(diff) => {
                self.mirror(&diff);
                let node = self
                    .planner
                    .viewer_node(ViewerId(u64::from(v)))
                    .ok_or_else(|| SimError::Internal("joined viewer has no node".into()))?;
                let connect = self.m.file.join.signalling_round_trips
                    * self.viewer_rtt_ms(&rec, node)
                    + self.setup_ms(&diff, node)
                    + self.keyframe_ms();
                if let Some((fi, since)) = rec.recovering {
                    let detect = self.m.file.detection.node_timeout_ms;
                    let waited = ms(self.now.saturating_sub(since)).max(detect);
                    if let Some(f) = self.failures.get_mut(fi as usize) {
                        f.samples.push((waited + connect, 1));
                        f.late += 1;
                    }
                } else {
                    let waited = ms(self.now.saturating_sub(rec.arrived_us));
                    self.join_ms[rec.home.index()].push((waited + connect) as f32);
                }
                if let Some(r) = self.viewers.get_mut(v as usize) {
                    r.recovering = None;
                }
                Ok(true)
            }
            Err(PlannerError::NoCapacity(_)) => Ok(false),
            Err(e) => Err(SimError::Planner(e)),
        }
    }

    fn enqueue(&mut self, v: u32) {
        let Some(rec) = self.viewers.get_mut(v as usize) else {
            return;
        };
        rec.state = VState::Pending;
        rec.node = None;
        self.pending[rec.home.index()].push_back(v);
        self.pending_count[rec.home.index()] += 1;
    }

    /// Places waiting viewers, oldest first per region, until one does not fit.
    fn drain_pending(&mut self) -> Result<(), SimError> {
        for r in 0..self.pending.len() {
            while let Some(&v) = self.pending[r].front() {
                if self.viewers[v as usize].state != VState::Pending {
                    self.pending[r].pop_front();
                    continue;
                }
                if !self.try_place(v)? {
                    // Placement searches every region nearest-first, so if this viewer fits
                    // nowhere, neither does any other.
                    return Ok(());
                }
                self.pending[r].pop_front();
                self.pending_count[r] = self.pending_count[r].saturating_sub(1);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ handlers

    fn on_arrival(&mut self, a: u32) -> Result<(), SimError> {
        self.schedule_next_arrival(a);
        let aud = &self.m.audience[a as usize];
        let home = aud.region;
        let lat = &self.m.file.latency;
        let u: f64 = self.rng.random();
        let lm = (lat.last_mile_min_ms
            - (1.0 - u).ln() * (lat.last_mile_mean_ms - lat.last_mile_min_ms))
            .min(lat.last_mile_max_ms)
            .round() as u16;
        let stay = aud.mean_stay_us.map(|mean| {
            let u: f64 = self.rng.random();
            (-(1.0 - u).ln() * mean) as u64
        });
        self.recent_arrivals[home.index()] += 1;
        let v = self.viewers.len() as u32;
        self.viewers.push(ViewerRec {
            home,
            last_mile_ms: lm,
            state: VState::Pending,
            node: None,
            arrived_us: self.now,
            recovering: None,
        });
        if let Some(stay) = stay {
            let t = self.now.saturating_add(stay.max(1));
            if t <= self.m.duration_us {
                self.push(t, Ev::Leave(v));
            }
        }
        let any_pending = self.pending_count.iter().any(|c| *c > 0);
        if !any_pending && self.try_place(v)? {
            self.home_present[home.index()] += 1;
            return Ok(());
        }
        let total_pending: u64 = self.pending_count.iter().sum();
        if total_pending >= self.m.file.join.max_pending {
            self.viewers[v as usize].state = VState::Gone;
            self.rejected[home.index()] += 1;
            return Ok(());
        }
        self.home_present[home.index()] += 1;
        self.enqueue(v);
        if any_pending {
            self.drain_pending()?;
        }
        Ok(())
    }

    fn on_leave(&mut self, v: u32) -> Result<(), SimError> {
        let Some(rec) = self.viewers.get(v as usize).cloned() else {
            return Ok(());
        };
        match rec.state {
            VState::Placed => {
                let diff = self
                    .planner
                    .leave(ViewerId(u64::from(v)))
                    .map_err(SimError::Planner)?;
                self.mirror(&diff);
            }
            VState::Pending => {
                self.pending_count[rec.home.index()] =
                    self.pending_count[rec.home.index()].saturating_sub(1);
            }
            VState::Gone => return Ok(()),
        }
        self.viewers[v as usize].state = VState::Gone;
        self.home_present[rec.home.index()] = self.home_present[rec.home.index()].saturating_sub(1);
        if self.pending_count.iter().any(|c| *c > 0) {
            self.drain_pending()?;
        }
        Ok(())
    }

    fn on_node_online(&mut self, id: NodeId) -> Result<(), SimError> {
        let Some(region) = self.nodes.get(&id).map(|n| n.region) else {
            return Ok(()); // lost while booting (region outage)
        };
        self.planner
            .add_node(self.spec(id, region))
            .map_err(SimError::Planner)?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.state = NState::Online;
        }
        self.drain_pending()
    }

    fn on_autoscale(&mut self) -> Result<(), SimError> {
        let next = self.now + self.m.autoscale_us;
        self.push(next, Ev::Autoscale);
        let a = &self.m.file.autoscale;
        if !a.enabled {
            return Ok(());
        }
        let target = a.target_utilization_percent / 100.0;
        let idle_us = (a.idle_retire_s * US_PER_S) as u64;
        let origins: Vec<NodeId> = self.planner.trees().map(|t| t.origin()).collect();
        for ri in 0..self.m.regions.len() {
            let r = RegionId(ri as u16);
            if self.region_down[ri] {
                continue;
            }
            let per_node = self.m.viewers_per_node(r).max(1) as f64;
            let reg = &self.m.regions[ri];
            let mut demand = (self.hosted[ri] + self.pending_count[ri] + self.home_away[ri]) as f64;
            if a.forecast {
                // Viewers expected to arrive before a node booted now is serving.
                let rate =
                    self.recent_arrivals[ri] as f64 / (self.m.autoscale_us as f64 / US_PER_S);
                let horizon = (self.m.node_types[reg.node_type].boot_us + self.m.autoscale_us)
                    as f64
                    / US_PER_S;
                demand += rate * horizon;
            }
            let desired = ((demand / (per_node * target)).ceil() as u32)
                .max(reg.min_nodes)
                .min(reg.max_nodes);
            let (mut online, mut booting) = (0u32, 0u32);
            for n in self.nodes.values().filter(|n| n.region == r) {
                match n.state {
                    NState::Online => online += 1,
                    NState::Booting => booting += 1,
                }
            }
            if desired > online + booting {
                let boot = self.m.node_types[reg.node_type].boot_us;
                for _ in 0..(desired - online - booting) {
                    let id = self.new_node(r, NState::Booting);
                    self.push(self.now + boot, Ev::NodeOnline(id.0));
                }
            }
            // Retire idle nodes above the desired count (highest id first).
            let ids: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.region == r && n.state == NState::Online)
                .map(|(id, _)| *id)
                .collect();
            let mut excess = online.saturating_sub(desired);
            for id in ids.into_iter().rev() {
                let idle = self.planner.node(id).is_some_and(|s| s.viewers == 0)
                    && !origins.contains(&id)
                    && self.planner.trees().all(|t| !t.contains(id));
                let now = self.now;
                let Some(n) = self.nodes.get_mut(&id) else {
                    continue;
                };
                if !idle {
                    n.idle_since = None;
                    continue;
                }
                let since = *n.idle_since.get_or_insert(now);
                if excess > 0 && now.saturating_sub(since) >= idle_us {
                    let removal = self.planner.remove_node(id).map_err(SimError::Planner)?;
                    self.mirror(&removal.diff);
                    self.nodes.remove(&id);
                    self.last_mile.remove(&id);
                    excess -= 1;
                }
            }
        }
        self.recent_arrivals.iter_mut().for_each(|c| *c = 0);
        // Bring spilled viewers home where capacity appeared (make-before-break moves).
        let diff = self.planner.rehome(a.rehome_per_check as usize);
        for act in &diff.actions {
            if let Action::MoveViewer { viewer, .. } = act {
                if let Some(rec) = self.viewers.get(viewer.0 as usize) {
                    self.rehomed[rec.home.index()] += 1;
                }
            }
        }
        self.mirror(&diff);
        // Pull trees back towards the greedy optimum (make-before-break re-links; viewers
        // see no gap, so only the count is recorded).
        if a.optimize_per_check > 0 {
            let gain_us = (a.optimize_min_gain_ms * 1000.0) as u64;
            let diff = self
                .planner
                .optimize(a.optimize_per_check as usize, gain_us);
            self.optimized += diff
                .actions
                .iter()
                .filter(|x| matches!(x, Action::Link { .. }))
                .count() as u64;
        }
        Ok(())
    }

    fn on_failure(&mut self, i: u32) -> Result<(), SimError> {
        let f = self.m.failures[i as usize].clone();
        let region_nodes: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.region == f.region && n.state == NState::Online)
            .map(|(id, _)| *id)
            .collect();
        let victims: Vec<NodeId> = match f.kind {
            FailureKind::Region => {
                self.region_down[f.region.index()] = true;
                // Nodes still booting there are lost too.
                let booting: Vec<NodeId> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.region == f.region && n.state == NState::Booting)
                    .map(|(id, _)| *id)
                    .collect();
                for b in booting {
                    self.nodes.remove(&b);
                }
                region_nodes
            }
            FailureKind::Node | FailureKind::Drain => {
                let origin = if f.pick_origin {
                    self.planner
                        .trees()
                        .map(|t| t.origin())
                        .find(|o| region_nodes.contains(o))
                } else {
                    None
                };
                let pick = origin.or_else(|| {
                    region_nodes.iter().copied().max_by_key(|id| {
                        let v = self.planner.node(*id).map(|s| s.viewers).unwrap_or(0);
                        (v, Reverse(*id))
                    })
                });
                pick.into_iter().collect()
            }
        };
        for n in &victims {
            self.planner.cordon(*n).map_err(SimError::Planner)?;
        }
        let detect = match f.kind {
            FailureKind::Drain => 0.0,
            _ => self.m.file.detection.node_timeout_ms,
        };
        let graceful = f.kind == FailureKind::Drain;
        let setup_rt = self.m.file.join.relay_setup_round_trips;
        let signalling = self.m.file.join.signalling_round_trips;
        let kf_extra = if self.m.file.join.cache_keyframes {
            0.0
        } else {
            self.m.file.join.keyframe_interval_ms / 2.0
        };
        let pub_reconnect = signalling * 2.0 * self.m.file.latency.publisher_uplink_ms;

        let mut node_rec: BTreeMap<NodeId, f64> = BTreeMap::new();
        let mut moved: BTreeMap<ViewerId, (NodeId, f64)> = BTreeMap::new();
        let mut acc = FailureAcc {
            nodes_lost: victims.len() as u32,
            ..FailureAcc::default()
        };
        for n in victims {
            let removal = self.planner.remove_node(n).map_err(SimError::Planner)?;
            self.mirror(&removal.diff);
            self.last_mile.remove(&n);
            self.nodes.remove(&n);
            if !removal.new_origins.is_empty() {
                acc.origin_moved = true;
            }
            for a in &removal.diff.actions {
                match *a {
                    Action::MoveViewer { viewer, to, .. } => {
                        let Some(rec) = self.viewers.get(viewer.0 as usize).cloned() else {
                            continue;
                        };
                        let t = detect
                            + signalling * self.viewer_rtt_ms(&rec, to)
                            + self.setup_ms(&removal.diff, to)
                            + kf_extra;
                        moved.insert(viewer, (to, t));
                    }
                    Action::Link {
                        track,
                        parent,
                        child,
                    } => {
                        if removal.new_origins.iter().any(|(t, _)| *t == track) {
                            continue; // handled below, whole tree
                        }
                        let (Some(pr), Some(cr)) =
                            (self.node_region(parent), self.node_region(child))
                        else {
                            continue;
                        };
                        let t = detect + setup_rt * self.rtt_ms(pr, cr) + kf_extra;
                        if let Some(tree) = self.planner.tree(track) {
                            for x in tree.subtree(child) {
                                let e = node_rec.entry(x).or_insert(0.0);
                                *e = e.max(t);
                            }
                        }
                    }
                    _ => {}
                }
            }
            for (track, _) in &removal.new_origins {
                let Some(tree) = self.planner.tree(*track) else {
                    continue;
                };
                for (x, _) in tree.members() {
                    let path = tree.path(x);
                    let mut setup = 0.0;
                    for w in path.windows(2) {
                        if let (Some(a), Some(b)) = (self.node_region(w[0]), self.node_region(w[1]))
                        {
                            setup += setup_rt * self.rtt_ms(a, b);
                        }
                    }
                    let t = detect + pub_reconnect + setup + 2.0 * kf_extra;
                    let e = node_rec.entry(x).or_insert(0.0);
                    *e = e.max(t);
                }
            }
            for (v, _) in removal.unplaced {
                acc.unplaced += 1;
                acc.direct += 1;
                moved.remove(&ViewerId(v.0));
                if let Some(rec) = self.viewers.get_mut(v.0 as usize) {
                    rec.recovering = Some((i, f.at_us));
                }
                self.enqueue(v.0 as u32);
            }
        }
        // Viewers that moved, then viewers that stayed on a node whose path was repaired.
        let mut moved_in: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (to, t) in moved.values() {
            acc.direct += 1;
            *moved_in.entry(*to).or_insert(0) += 1;
            acc.samples.push((if graceful { 0.0 } else { *t }, 1));
        }
        for (node, t) in node_rec {
            let on = u64::from(self.planner.node(node).map(|s| s.viewers).unwrap_or(0));
            let stayed = on.saturating_sub(moved_in.get(&node).copied().unwrap_or(0));
            if stayed > 0 {
                acc.downstream += stayed;
                acc.samples.push((if graceful { 0.0 } else { t }, stayed));
            }
        }
        self.failures[i as usize] = acc;
        self.drain_pending()
    }

    fn on_sample(&mut self) {
        let next = self.now + self.m.sample_us;
        self.push(next, Ev::Sample);
        let dt_s = self.m.sample_us as f64 / US_PER_S;
        let nr = self.m.regions.len();
        let t_s = self.now as f64 / US_PER_S;

        // Nodes and egress per region.
        let mut online = vec![0u32; nr];
        let mut booting = vec![0u32; nr];
        for n in self.nodes.values() {
            match n.state {
                NState::Online => online[n.region.index()] += 1,
                NState::Booting => booting[n.region.index()] += 1,
            }
        }
        let mut egress_kbps = vec![0u64; nr];
        for id in self.planner.node_ids() {
            if let Some(s) = self.planner.node(id) {
                egress_kbps[s.region.index()] += s.load.kbps;
            }
        }
        // Links and trees.
        let mut link_kbps: BTreeMap<(u16, u16), u64> = BTreeMap::new();
        for tree in self.planner.trees() {
            let relay = tree.spec().relay_load.kbps;
            let mut cross = 0u32;
            let mut worst = 0u64;
            for (n, m) in tree.members() {
                worst = worst.max(m.path_us);
                if let Some(p) = m.parent {
                    let (Some(pr), Some(cr)) = (self.node_region(p), self.node_region(n)) else {
                        continue;
                    };
                    if pr != cr {
                        cross += 1;
                        *link_kbps.entry((pr.0, cr.0)).or_insert(0) += relay;
                    }
                }
            }
            self.tree_rows.push(TreeRow {
                t_s,
                track: tree.spec().id.0,
                members: tree.len() as u32,
                max_depth: tree.max_depth(),
                cross_region_links: cross,
                worst_path_ms: ms(worst),
            });
        }
        for (k, kbps) in &link_kbps {
            let e = self.links.entry(*k).or_insert((0.0, 0.0));
            let mbps = *kbps as f64 / 1000.0;
            self.link_rows.push(LinkRow {
                t_s,
                from: k.0,
                to: k.1,
                mbps,
            });
            e.0 = e.0.max(mbps);
            e.1 += mbps * dt_s / 8.0 / 1000.0;
        }

        // Latency: one sample per (viewer, video track).
        let lat = &self.m.file.latency;
        let fixed = lat.capture_encode_ms
            + lat.publisher_uplink_ms
            + lat.jitter_buffer_ms
            + lat.decode_render_ms;
        let mut tick_hist: Vec<Histogram> = (0..nr)
            .map(|_| Histogram::new(LATENCY_HIST_MAX_MS))
            .collect();
        for track in &self.video_tracks {
            let Some(tree) = self.planner.tree(*track) else {
                continue;
            };
            // NACK allowance: one round trip of the worst lossy hop on the path.
            let mut nack: BTreeMap<NodeId, f64> = BTreeMap::new();
            for n in tree.subtree(tree.origin()) {
                let extra = match tree.parent(n) {
                    Some(p) => {
                        let up = nack.get(&p).copied().unwrap_or(0.0);
                        match (self.node_region(p), self.node_region(n)) {
                            (Some(a), Some(b)) if self.m.rtt.loss_ppm(a, b) > 0 => {
                                up.max(self.rtt_ms(a, b))
                            }
                            _ => up,
                        }
                    }
                    None => 0.0,
                };
                nack.insert(n, extra);
            }
            for (node, per_home) in &self.last_mile {
                let (Some(path_us), Some(nreg)) = (tree.path_us(*node), self.node_region(*node))
                else {
                    continue;
                };
                let base = fixed + ms(path_us) + nack.get(node).copied().unwrap_or(0.0);
                for (h, bins) in per_home.iter().enumerate() {
                    let b = base + self.one_way_ms(nreg, RegionId(h as u16));
                    for (lm, &c) in bins.iter().enumerate() {
                        if c > 0 {
                            tick_hist[h].add((b + lm as f64).round() as usize, u64::from(c));
                        }
                    }
                }
            }
        }

        let total_hosted: u64 = self.hosted.iter().sum();
        for ri in 0..nr {
            let mbps = egress_kbps[ri] as f64 / 1000.0;
            self.egress_gb[ri] += mbps * dt_s / 8.0 / 1000.0;
            self.node_hours[ri] += f64::from(online[ri] + booting[ri]) * dt_s / 3600.0;
            self.peak_nodes[ri] = self.peak_nodes[ri].max(online[ri] + booting[ri]);
            self.peak_hosted[ri] = self.peak_hosted[ri].max(self.hosted[ri]);
            let h = &tick_hist[ri];
            self.series.push(SeriesRow {
                t_s,
                region: ri,
                nodes_online: online[ri],
                nodes_booting: booting[ri],
                viewers_hosted: self.hosted[ri],
                viewers_home: self.home_present[ri],
                pending: self.pending_count[ri],
                egress_mbps: mbps,
                lat_p50_ms: h.percentile(0.50),
                lat_p95_ms: h.percentile(0.95),
                lat_p99_ms: h.percentile(0.99),
            });
            self.lat_total[ri].merge(h);
        }
        if total_hosted > self.peak_total || self.peak_plan.is_none() {
            self.peak_total = total_hosted;
            self.peak_plan = Some(self.snapshot_plan(t_s));
        }
    }

    fn snapshot_plan(&self, t_s: f64) -> PeakPlan {
        let mut tracks = Vec::new();
        for tree in self.planner.trees() {
            let mut per_region = vec![0u32; self.m.regions.len()];
            let mut trunks: BTreeMap<(u16, u16), u32> = BTreeMap::new();
            let mut worst = vec![0u64; self.m.regions.len()];
            for (n, m) in tree.members() {
                let Some(r) = self.node_region(n) else {
                    continue;
                };
                per_region[r.index()] += 1;
                worst[r.index()] = worst[r.index()].max(m.path_us);
                if let Some(pr) = m.parent.and_then(|p| self.node_region(p)) {
                    if pr != r {
                        *trunks.entry((pr.0, r.0)).or_insert(0) += 1;
                    }
                }
            }
            let origin_region = self.node_region(tree.origin()).map(|r| r.0).unwrap_or(0);
            tracks.push(TrackLine {
                track: tree.spec().id.0,
                video: self.video_tracks.contains(&tree.spec().id),
                origin: tree.origin().0,
                origin_region,
                members_per_region: per_region,
                trunks: trunks.into_iter().collect(),
                max_depth: tree.max_depth(),
                worst_path_ms_per_region: worst.into_iter().map(ms).collect(),
            });
        }
        PeakPlan {
            t_s,
            viewers: self.peak_total,
            tracks,
        }
    }

    fn finish(mut self) -> Report {
        let nr = self.m.regions.len();
        let mut regions = Vec::new();
        for ri in 0..nr {
            let r = &self.m.regions[ri];
            let joins = &mut self.join_ms[ri];
            joins.sort_by(f32::total_cmp);
            let q = |p: f64| -> f64 {
                if joins.is_empty() {
                    return 0.0;
                }
                let idx = ((p * joins.len() as f64).ceil() as usize).clamp(1, joins.len()) - 1;
                f64::from(joins[idx])
            };
            let join_cdf: Vec<f64> = (1..=100).map(|p| q(f64::from(p) / 100.0)).collect();
            let egress_cost = self.egress_gb[ri] * r.egress_usd_per_gb;
            let compute_cost = self.node_hours[ri] * self.m.node_types[r.node_type].hourly_usd;
            regions.push(RegionSummary {
                name: r.name.clone(),
                node_type: self.m.node_types[r.node_type].name.clone(),
                viewers_per_node: self.m.viewers_per_node(RegionId(ri as u16)),
                peak_nodes: self.peak_nodes[ri],
                node_hours: self.node_hours[ri],
                peak_hosted: self.peak_hosted[ri],
                egress_gb: self.egress_gb[ri],
                egress_cost,
                compute_cost,
                lat_p50_ms: self.lat_total[ri].percentile(0.50),
                lat_p95_ms: self.lat_total[ri].percentile(0.95),
                lat_p99_ms: self.lat_total[ri].percentile(0.99),
                joins: joins.len() as u64,
                join_p50_ms: q(0.50),
                join_p95_ms: q(0.95),
                join_p99_ms: q(0.99),
                rejected: self.rejected[ri],
                rehomed: self.rehomed[ri],
                join_cdf,
            });
        }
        let links = self
            .links
            .iter()
            .map(|((a, b), (peak, gb))| LinkSummary {
                from: self.m.regions[usize::from(*a)].name.clone(),
                to: self.m.regions[usize::from(*b)].name.clone(),
                peak_mbps: *peak,
                gb: *gb,
            })
            .collect();
        let failures = self
            .failures
            .iter_mut()
            .enumerate()
            .map(|(i, acc)| {
                let f = &self.m.failures[i];
                acc.samples.sort_by(|a, b| a.0.total_cmp(&b.0));
                let total: u64 = acc.samples.iter().map(|s| s.1).sum();
                let q = |p: f64| -> f64 {
                    let want = (p * total as f64).ceil().max(1.0) as u64;
                    let mut cum = 0;
                    for (v, w) in &acc.samples {
                        cum += w;
                        if cum >= want {
                            return *v;
                        }
                    }
                    0.0
                };
                FailureSummary {
                    at_s: f.at_us as f64 / US_PER_S,
                    kind: match f.kind {
                        FailureKind::Node => "node",
                        FailureKind::Drain => "drain",
                        FailureKind::Region => "region",
                    }
                    .to_string(),
                    region: self.m.regions[f.region.index()].name.clone(),
                    nodes_lost: acc.nodes_lost,
                    origin_moved: acc.origin_moved,
                    viewers_direct: acc.direct,
                    viewers_downstream: acc.downstream,
                    unplaced: acc.unplaced,
                    never_recovered: acc.unplaced.saturating_sub(acc.late),
                    recovered: total,
                    recovery_p50_ms: q(0.50),
                    recovery_p95_ms: q(0.95),
                    recovery_max_ms: acc.samples.last().map(|s| s.0).unwrap_or(0.0),
                }
            })
            .collect();
        Report {
            name: self.m.name.clone(),
            duration_s: self.m.duration_us as f64 / US_PER_S,
            region_names: self.m.regions.iter().map(|r| r.name.clone()).collect(),
            per_viewer_kbps: self.m.per_viewer().kbps,
            per_viewer_pps: self.m.per_viewer().pps,
            series: self.series,
            trees: self.tree_rows,
            regions,
            links,
            link_series: self.link_rows,
            failures,
            peak_plan: self.peak_plan,
            viewers_total: self.viewers.len() as u64,
            tree_moves: self.optimized,
        }
    }
}

/// An independent, seeded random stream.
fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}
