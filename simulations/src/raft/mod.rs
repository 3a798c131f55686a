//! Deterministic simulation of the Raft membership core.
//!
//! The *real* [`MembershipNode`] (same code as production, over the in-memory [`MemBackend`])
//! runs on a seeded virtual clock and network:
//!
//! * messages are delayed (1–`max_delay_ms`), lost, and dropped across partitions;
//! * nodes crash and lose a random suffix of their staged-but-unsynced writes, then restart from
//!   what the "disk" kept; each node's clock is offset by a bounded skew;
//! * a workload creates rooms through random nodes, publishes tracks from origins, and makes
//!   adversarial lease takeover attempts; an operator adds a learner and promotes it to voter
//!   (joint consensus) in five-node runs.
//!
//! A [`Checker`] asserts after every step: one leader per term; committed entries never change
//! (every node's committed prefix agrees with every other's); no room has two nodes that both
//! believe they originate it; publications carry the room's current fencing token. After the
//! chaos phase the network heals and all nodes restart; the checker then asserts liveness: a
//! leader exists, every acknowledged room exists on every node, and every room is owned by a live
//! node that holds its lease.
//!
//! Everything is driven by one seed: a failure prints `ARBOR_SIM_SEED=<n>` and rerunning with
//! that seed replays the identical run (see [`SimReport::trace_hash`]).

mod checker;

use std::collections::{BTreeMap, BTreeSet};

use arbor_proto::membership::{command::Kind, AcquireLease, CreateRoom, PublishTrack, RoomConfig};
use arbor_topology::membership::{
    Applied, InjectedDefect, MemBackend, MembershipNode, NodeConfig, Outcome, Output, RaftMessage,
    RaftStore, SplitMix64, StateConfig,
};

pub use checker::{Checker, Violation};

/// Parameters of one simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Deliberately broken behaviour (checker self-test).
    pub defect: Option<InjectedDefect>,
    /// Length of the fault-injection phase (virtual ms).
    pub chaos_ms: u64,
    /// Length of the quiet phase after healing, before liveness is asserted.
    pub settle_ms: u64,
    /// Simulation step.
    pub step_ms: u64,
    pub max_delay_ms: u64,
    /// Upper bound on rooms the workload creates.
    pub max_rooms: usize,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            defect: None,
            chaos_ms: 30_000,
            settle_ms: 20_000,
            step_ms: 5,
            max_delay_ms: 25,
            max_rooms: 30,
        }
    }
}

/// Summary of a passing run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub nodes: usize,
    /// Hash over every event of the run; equal hashes = identical runs.
    pub trace_hash: u64,
    pub rooms_acknowledged: usize,
    pub max_term: u64,
    pub crashes: u32,
    pub partitions: u32,
    pub lost_unsynced_batches: u64,
    pub messages_delivered: u64,
    pub messages_dropped: u64,
    pub commit_index: u64,
    pub takeovers_rejected: u64,
    pub origin_changes: u64,
}

/// A checker violation, with everything needed to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFailure {
    pub seed: u64,
    pub at_ms: u64,
    pub violation: Violation,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simulation failed at t={} ms: {}\nreplay with: ARBOR_SIM_SEED={} cargo test -p arbor-simulations --test raft_sim",
            self.at_ms, self.violation, self.seed
        )
    }
}

impl std::error::Error for SimFailure {}

struct InFlight {
    from: u64,
    to: u64,
    msg: RaftMessage,
}

struct SimNode {
    node: Option<MembershipNode<MemBackend>>,
    /// The "disk" of a crashed node.
    disk: Option<MemBackend>,
    restart_at: u64,
    clock_offset: u64,
    incarnation: u64,
}

struct Sim {
    cfg: SimConfig,
    rng: SplitMix64,
    n: usize,
    founders: Vec<u64>,
    nodes: BTreeMap<u64, SimNode>,
    /// (deliver_at, seq) -> message
    wire: BTreeMap<(u64, u64), InFlight>,
    seq: u64,
    /// Partition: group id per node (same group = connected).
    group: BTreeMap<u64, u32>,
    loss: f64,
    now: u64,
    trace: u64,
    checker: Checker,
    /// request (node, id) -> room name, for acknowledgements.
    create_requests: BTreeMap<(u64, u64), String>,
    rooms_requested: usize,
    report: SimReport,
    /// Learner/voter changes still to perform: (node, promote?).
    conf_plan: Vec<(u64, bool)>,
}

/// Runs `f`, turning a panic inside raft-rs into a violation (raft asserts some invariants that a
/// broken driver can break, e.g. "commit index beyond last index" after a lost acknowledged entry).
fn guard<T>(id: u64, f: impl FnOnce() -> T) -> Result<T, Violation> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into());
        Violation::Panicked(id, msg)
    })
}

fn mix(h: u64, v: u64) -> u64 {
    let mut x = h ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

fn node_config(id: u64, defect: Option<InjectedDefect>) -> NodeConfig {
    let mut c = NodeConfig::new(id);
    c.region = format!("region-{}", id % 3);
    c.tick_ms = 50;
    c.election_ticks = 10;
    c.heartbeat_ticks = 2;
    c.state = StateConfig {
        lease_ms: 3_000,
        ..StateConfig::default()
    };
    c.renew_every_ms = 800;
    c.skew_margin_ms = 300;
    c.node_heartbeat_ms = 1_000;
    c.node_ttl_ms = 3_000;
    c.reassign_every_ms = 250;
    c.proposal_timeout_ms = 3_000;
    // Small, so that snapshots and log compaction happen during every run.
    c.compact_after_entries = 200;
    c.max_size_per_msg = 64 * 1024;
    c.defect = defect;
    c
}

/// Runs one seed. `Ok` means every check passed.
pub fn run(cfg: &SimConfig) -> Result<SimReport, SimFailure> {
    let mut rng = SplitMix64::new(cfg.seed);
    let n = if rng.chance(0.5) { 3 } else { 5 };
    // Five-node runs found the cluster with three voters and grow it through joint consensus.
    let founders: Vec<u64> = (1..=3).collect();
    let conf_plan = if n == 5 {
        vec![(4, false), (4, true), (5, false)]
    } else {
        vec![]
    };
    let mut sim = Sim {
        cfg: cfg.clone(),
        rng,
        n,
        founders,
        nodes: BTreeMap::new(),
        wire: BTreeMap::new(),
        seq: 0,
        group: BTreeMap::new(),
        loss: 0.01,
        now: 0,
        trace: cfg.seed,
        checker: Checker::default(),
        create_requests: BTreeMap::new(),
        rooms_requested: 0,
        report: SimReport {
            seed: cfg.seed,
            nodes: n,
            trace_hash: 0,
            rooms_acknowledged: 0,
            max_term: 0,
            crashes: 0,
            partitions: 0,
            lost_unsynced_batches: 0,
            messages_delivered: 0,
            messages_dropped: 0,
            commit_index: 0,
            takeovers_rejected: 0,
            origin_changes: 0,
        },
        conf_plan,
    };
    let fail = |at_ms, violation| SimFailure {
        seed: cfg.seed,
        at_ms,
        violation,
    };
    for id in 1..=n as u64 {
        // Skew below half the lease margin: the bound the lease design assumes.
        let clock_offset = sim.rng.below(150);
        sim.nodes.insert(
            id,
            SimNode {
                node: None,
                disk: Some(MemBackend::new()),
                restart_at: 0,
                clock_offset,
                incarnation: 0,
            },
        );
        sim.group.insert(id, 0);
        sim.start_node(id).map_err(|v| fail(0, v))?;
    }
    let end_chaos = cfg.chaos_ms;
    let end = cfg.chaos_ms + cfg.settle_ms;
    let mut next_fault = 2_000 + sim.rng.below(2_000);
    let mut healed = false;
    while sim.now < end {
        sim.now += cfg.step_ms;
        let now = sim.now;
        if now < end_chaos {
            if now >= next_fault {
                sim.inject_fault();
                next_fault = now + 500 + sim.rng.below(3_000);
            }
            sim.workload();
        } else if !healed {
            healed = true;
            sim.heal();
        } else if now < end - cfg.settle_ms / 2 {
            // Rooms created right at the end of the chaos must also become owned.
            sim.workload_create_only();
        }
        sim.operator();
        sim.restart_due().map_err(|v| fail(now, v))?;
        sim.deliver().map_err(|v| fail(now, v))?;
        sim.tick_all().map_err(|v| fail(now, v))?;
        sim.check_step().map_err(|v| fail(now, v))?;
    }
    sim.check_end().map_err(|v| fail(sim.now, v))?;
    sim.report.trace_hash = sim.trace;
    Ok(sim.report)
}

impl Sim {
    fn local_now(&self, id: u64) -> u64 {
        self.now + self.nodes.get(&id).map_or(0, |s| s.clock_offset)
    }

    fn voters_for_bootstrap(&self, id: u64) -> Option<Vec<u64>> {
        self.founders.contains(&id).then(|| self.founders.clone())
    }

    fn start_node(&mut self, id: u64) -> Result<(), Violation> {
        let local = self.local_now(id);
        let boot = self.voters_for_bootstrap(id);
        let defect = self.cfg.defect;
        let Some(sn) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let Some(disk) = sn.disk.take() else {
            return Ok(());
        };
        sn.incarnation += 1;
        let store = RaftStore::open(disk).map_err(|e| Violation::Storage(id, e.to_string()))?;
        let seed = mix(mix(self.cfg.seed, id), sn.incarnation);
        let node =
            MembershipNode::new(node_config(id, defect), store, boot.as_deref(), seed, local)
                .map_err(|e| Violation::Storage(id, e.to_string()))?;
        sn.node = Some(node);
        self.checker.node_restarted(id);
        self.trace = mix(self.trace, 0x5747 ^ id);
        Ok(())
    }

    fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, s)| s.node.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    fn inject_fault(&mut self) {
        let live = self.live();
        let down = self.n - live.len();
        match self.rng.below(10) {
            // Crash a node (keeping at most a minority down).
            0..=2 if down < (self.n - 1) / 2 && !live.is_empty() => {
                let id = live[self.rng.below(live.len() as u64) as usize];
                if self.rng.chance(0.5) {
                    self.crash(id);
                } else if let Some(node) = self.nodes.get_mut(&id).and_then(|s| s.node.as_mut()) {
                    // Power loss at the node's next fsync: staged writes are partly lost and
                    // nothing that waited for the sync is sent.
                    node.store_mut().backend_mut().arm_power_loss();
                }
            }
            // Partition into two random sides.
            3..=5 => {
                self.report.partitions += 1;
                for id in 1..=self.n as u64 {
                    let g = self.rng.below(2) as u32;
                    self.group.insert(id, g);
                }
                self.trace = mix(self.trace, 0xAA);
            }
            // Isolate one node (often the leader).
            6 => {
                let leader = live
                    .iter()
                    .copied()
                    .find(|id| self.nodes[id].node.as_ref().is_some_and(|n| n.is_leader()));
                let id = leader.unwrap_or(1 + self.rng.below(self.n as u64));
                for g in self.group.values_mut() {
                    *g = 0;
                }
                self.group.insert(id, 1);
                self.report.partitions += 1;
            }
            // Heal.
            7 | 8 => {
                for g in self.group.values_mut() {
                    *g = 0;
                }
            }
            // Change loss rate.
            _ => {
                self.loss = [0.0, 0.01, 0.05, 0.2][self.rng.below(4) as usize];
            }
        }
    }

    fn crash(&mut self, id: u64) {
        let keep_roll = self.rng.next_u64();
        let down_for = 300 + self.rng.below(4_000);
        let now = self.now;
        let Some(sn) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(node) = sn.node.take() else { return };
        let mut disk = node.store().backend().clone();
        drop(node);
        let staged = disk.staged_len() as u64;
        let keep = keep_roll % (staged + 1);
        self.report.lost_unsynced_batches += staged - keep;
        disk.crash(keep as usize);
        sn.disk = Some(disk);
        sn.restart_at = now + down_for;
        self.report.crashes += 1;
        self.checker.node_crashed(id);
        self.trace = mix(self.trace, 0xC0 ^ id);
    }

    fn heal(&mut self) {
        self.checker.mark_heal();
        for g in self.group.values_mut() {
            *g = 0;
        }
        self.loss = 0.0;
        let now = self.now;
        for sn in self.nodes.values_mut() {
            if sn.node.is_none() {
                sn.restart_at = now;
            }
        }
    }

    fn restart_due(&mut self) -> Result<(), Violation> {
        let due: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, s)| s.node.is_none() && s.restart_at <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.start_node(id)?;
        }
        Ok(())
    }

    fn random_live(&mut self) -> Option<u64> {
        let live = self.live();
        if live.is_empty() {
            return None;
        }
        Some(live[self.rng.below(live.len() as u64) as usize])
    }

    fn propose(&mut self, id: u64, kind: Kind) -> Option<u64> {
        let local = self.local_now(id);
        let node = self.nodes.get_mut(&id)?.node.as_mut()?;
        let r = node.propose(local, kind).ok();
        self.trace = mix(self.trace, r.unwrap_or(0) ^ (id << 48));
        r
    }

    fn workload_create_only(&mut self) {
        if self.rooms_requested < self.cfg.max_rooms && self.rng.chance(0.02) {
            self.create_room();
        }
    }

    fn create_room(&mut self) {
        let Some(id) = self.random_live() else { return };
        let name = format!("room-{}", self.rooms_requested);
        let kind = Kind::CreateRoom(CreateRoom {
            name: name.clone(),
            origin_node: id,
            config: Some(RoomConfig {
                max_participants: 100,
                ..Default::default()
            }),
        });
        if let Some(req) = self.propose(id, kind) {
            self.create_requests.insert((id, req), name);
            self.rooms_requested += 1;
        }
    }

    fn workload(&mut self) {
        // Room creation through a random node.
        if self.rooms_requested < self.cfg.max_rooms && self.rng.chance(0.01) {
            self.create_room();
        }
        // An origin publishes a track under its token.
        if self.rng.chance(0.02) {
            if let Some(id) = self.random_live() {
                let local = self.local_now(id);
                let held = self.nodes[&id]
                    .node
                    .as_ref()
                    .map(|n| n.held_leases(local))
                    .unwrap_or_default();
                if !held.is_empty() {
                    let (room, token) = held[self.rng.below(held.len() as u64) as usize].clone();
                    let track = format!("TR_{}_{}", id, self.rng.below(1_000_000));
                    self.propose(
                        id,
                        Kind::PublishTrack(PublishTrack {
                            room,
                            track_sid: track,
                            node: id,
                            fencing_token: token,
                        }),
                    );
                }
            }
        }
        // Adversarial takeover: a node that (wrongly) suspects the origin tries to take a room.
        if self.rng.chance(0.01) {
            if let Some(id) = self.random_live() {
                let rooms: Vec<String> = self.nodes[&id]
                    .node
                    .as_ref()
                    .map(|n| n.state().rooms().keys().cloned().collect())
                    .unwrap_or_default();
                if !rooms.is_empty() {
                    let room = rooms[self.rng.below(rooms.len() as u64) as usize].clone();
                    self.propose(id, Kind::AcquireLease(AcquireLease { room, node: id }));
                }
            }
        }
    }

    /// Grows five-node clusters: add node 4 as learner, promote it, add node 5 as learner.
    fn operator(&mut self) {
        if self.conf_plan.is_empty() || !self.now.is_multiple_of(500) || self.now < 3_000 {
            return;
        }
        let (target, promote) = self.conf_plan[0];
        let leader = self
            .live()
            .into_iter()
            .find(|id| self.nodes[id].node.as_ref().is_some_and(|n| n.is_leader()));
        let Some(l) = leader else { return };
        let local = self.local_now(l);
        let Some(node) = self.nodes.get_mut(&l).and_then(|s| s.node.as_mut()) else {
            return;
        };
        let st = node.status();
        let done = if promote {
            st.voters.contains(&target)
        } else {
            st.learners.contains(&target) || st.voters.contains(&target)
        };
        if done && st.voters_outgoing.is_empty() {
            self.conf_plan.remove(0);
            self.trace = mix(self.trace, 0xCC ^ target);
            return;
        }
        if !st.voters_outgoing.is_empty() {
            return; // still in a joint configuration
        }
        let _ = if promote {
            node.propose_add_voter(local, target)
        } else {
            node.propose_add_learner(local, target)
        };
    }

    fn deliver(&mut self) -> Result<(), Violation> {
        let now = self.now;
        while let Some(entry) = self.wire.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let m = entry.remove();
            let connected = self.group.get(&m.from) == self.group.get(&m.to);
            let local = self.local_now(m.to);
            let Some(node) = self.nodes.get_mut(&m.to).and_then(|s| s.node.as_mut()) else {
                self.report.messages_dropped += 1;
                continue;
            };
            if !connected {
                self.report.messages_dropped += 1;
                continue;
            }
            self.report.messages_delivered += 1;
            self.trace = mix(
                self.trace,
                (m.msg.get_msg_type() as u64) ^ (m.to << 8) ^ (m.msg.index << 16),
            );
            let to = m.to;
            guard(to, || node.step(local, m.msg))?
                .map_err(|e| Violation::Storage(to, e.to_string()))?;
        }
        Ok(())
    }

    fn tick_all(&mut self) -> Result<(), Violation> {
        let ids = self.live();
        for id in ids {
            let local = self.local_now(id);
            let mut outs = Vec::new();
            {
                let Some(node) = self.nodes.get_mut(&id).and_then(|s| s.node.as_mut()) else {
                    continue;
                };
                let res = guard(id, || {
                    node.tick(local);
                    node.process_ready()
                })?;
                while let Some(o) = node.poll_output() {
                    outs.push(o);
                }
                if let Err(e) = res {
                    if !e.to_string().contains("simulated power loss") {
                        return Err(Violation::Storage(id, e.to_string()));
                    }
                    // Messages queued before the failed sync were already on the wire.
                    for o in outs {
                        if let Output::Send(m) = o {
                            self.send(id, m);
                        }
                    }
                    self.crash(id);
                    continue;
                }
            }
            for o in outs {
                match o {
                    Output::Send(msg) => self.send(id, msg),
                    Output::Completed(c) => {
                        self.trace = mix(self.trace, c.request_id ^ (id << 40));
                        match &c.result {
                            Ok(Applied::Command(Outcome::Room { room, .. })) => {
                                if let Some(name) = self.create_requests.remove(&(id, c.request_id))
                                {
                                    if name == room.name {
                                        self.checker.room_acknowledged(name);
                                        self.report.rooms_acknowledged += 1;
                                    }
                                }
                            }
                            Ok(Applied::Command(Outcome::Rejected(_))) => {
                                self.report.takeovers_rejected += 1
                            }
                            _ => {
                                self.create_requests.remove(&(id, c.request_id));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, from: u64, msg: RaftMessage) {
        let to = msg.to;
        if self.rng.chance(self.loss) {
            self.report.messages_dropped += 1;
            return;
        }
        let at = self.now + 1 + self.rng.below(self.cfg.max_delay_ms);
        self.seq += 1;
        self.wire.insert((at, self.seq), InFlight { from, to, msg });
    }

    fn check_step(&mut self) -> Result<(), Violation> {
        let now = self.now;
        let mut views = Vec::new();
        for (id, sn) in &self.nodes {
            if let Some(node) = &sn.node {
                views.push((*id, node, now + sn.clock_offset));
            }
        }
        let res = self.checker.check_step(now, &views);
        for (_, node, _) in &views {
            self.report.max_term = self.report.max_term.max(node.term());
        }
        res
    }

    fn check_end(&mut self) -> Result<(), Violation> {
        let mut views = Vec::new();
        for (id, sn) in &self.nodes {
            if let Some(node) = &sn.node {
                views.push((*id, node, self.now + sn.clock_offset));
            }
        }
        if views.len() != self.n {
            return Err(Violation::Liveness(format!(
                "only {} of {} nodes running at the end",
                views.len(),
                self.n
            )));
        }
        let expected_voters: BTreeSet<u64> = if self.n == 5 && self.conf_plan.is_empty() {
            [1, 2, 3, 4].into()
        } else {
            self.founders.iter().copied().collect()
        };
        let r = self.checker.check_end(
            &views,
            &expected_voters,
            self.n == 5 && self.conf_plan.is_empty(),
        );
        self.report.commit_index = views
            .iter()
            .map(|(_, n, _)| n.status().commit)
            .max()
            .unwrap_or(0);
        self.report.origin_changes = self.checker.origin_changes;
        r
    }
}
