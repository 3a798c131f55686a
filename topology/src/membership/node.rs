//! The sans-IO Raft driver: one cluster member's view of the replicated state.
//!
//! # Driving loop
//!
//! The shell (a tokio task in production, the simulator in tests) owns a [`MembershipNode`] and
//! calls, in any interleaving:
//!
//! * [`MembershipNode::tick`] with the current time: advances raft-rs's logical clock by one tick
//!   per `tick_ms` elapsed and runs the node's own timers (registration and heartbeats, origin
//!   lease renewal, the leader's reassignment of orphaned rooms, proposal deadlines);
//! * [`MembershipNode::step`] with each Raft message received from a peer;
//! * [`MembershipNode::propose`] / `propose_*_node` for client commands and membership changes;
//!
//! and after each of those, [`MembershipNode::process_ready`], which performs raft-rs's `Ready`
//! cycle in the order its contract requires:
//!
//! 1. queue `messages()` (the leader's appends, which may leave before its own disk write);
//! 2. install a received snapshot, if any (storage + state machine);
//! 3. apply committed entries to the state machine, completing our own pending proposals;
//! 4. stage new entries and the hard state, **sync** (fsync), and only then queue
//!    `persisted_messages()` (votes and append acknowledgements promise durability);
//! 5. `advance`, then handle the `LightReady` (commit index, more messages and entries);
//! 6. compact the log into a snapshot when it grows past `compact_after_entries`.
//!
//! Outputs are drained with [`MembershipNode::poll_output`]. The driver never blocks, sleeps,
//! reads a clock or touches a socket; all randomness (election timeouts) comes from a seeded
//! generator, so a simulation replays exactly.

use std::collections::{BTreeMap, VecDeque};

use arbor_proto::membership::{
    command::Kind, AcquireLease, Command, Heartbeat, LeaseRef, NodeRecord, RenewLeases,
};
use prost::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    EntryType, Message,
};
use raft::{Config, RawNode, StateRole, Storage};
use serde::Serialize;

use crate::membership::rng::SplitMix64;
use crate::membership::state::{InjectedDefect, MembershipState, Outcome, StateConfig};
use crate::membership::storage::{snapshot_of, LogBackend, RaftStore, WriteBatch};
use crate::membership::MembershipError;

/// Configuration of one member. Time values are milliseconds.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Raft id (non-zero, never reused).
    pub id: u64,
    pub region: String,
    pub quic_addr: String,
    pub http_addr: String,
    pub capacity: u32,
    /// Length of one logical Raft tick.
    pub tick_ms: u64,
    /// Election timeout in ticks; the effective timeout is drawn from `[e, 2e)` per election.
    pub election_ticks: usize,
    /// Leader heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// State-machine tunables (must match on all members).
    pub state: StateConfig,
    /// How often an origin renews each of its leases (well under `state.lease_ms`).
    pub renew_every_ms: u64,
    /// The holder stops trusting its lease this long before the expiry recorded in the state
    /// machine: the allowance for clock skew between members.
    pub skew_margin_ms: u64,
    /// Interval between this node's heartbeat commands.
    pub node_heartbeat_ms: u64,
    /// Rooms per batched renewal entry.
    pub max_renew_batch: usize,
    /// A node whose last committed heartbeat is older than this is considered down when the
    /// leader picks a new origin for an orphaned room.
    pub node_ttl_ms: u64,
    /// How often the leader scans for rooms whose lease expired.
    pub reassign_every_ms: u64,
    /// Bound on reassignment proposals per scan.
    pub max_reassign_per_scan: usize,
    /// A proposal not applied within this time fails with [`ProposeError::Timeout`].
    pub proposal_timeout_ms: u64,
    /// Bound on proposals awaiting commit.
    pub max_pending_proposals: usize,
    /// Compact the log into a snapshot once it holds more entries than this.
    pub compact_after_entries: usize,
    /// raft-rs: bytes per append message.
    pub max_size_per_msg: u64,
    /// raft-rs: in-flight append messages per follower.
    pub max_inflight_msgs: usize,
    /// Bound on queued outputs; past it the oldest outgoing Raft messages are dropped (Raft
    /// tolerates loss; the shell should drain faster).
    pub max_queued_outputs: usize,
    /// Checker self-test only: deliberately break the node.
    pub defect: Option<InjectedDefect>,
}

impl NodeConfig {
    /// Defaults suited to a LAN/WAN cluster with 100 ms ticks.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            region: "default".into(),
            quic_addr: String::new(),
            http_addr: String::new(),
            capacity: 100,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            state: StateConfig::default(),
            renew_every_ms: 1_500,
            max_renew_batch: 1_024,
            skew_margin_ms: 500,
            node_heartbeat_ms: 2_000,
            node_ttl_ms: 6_000,
            reassign_every_ms: 500,
            max_reassign_per_scan: 64,
            proposal_timeout_ms: 5_000,
            max_pending_proposals: 4_096,
            compact_after_entries: 10_000,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_queued_outputs: 65_536,
            defect: None,
        }
    }

    fn validate(&self) -> Result<(), MembershipError> {
        let bad = |m: &str| Err(MembershipError::Config(m.to_string()));
        if self.id == 0 {
            return bad("node id must be non-zero");
        }
        if self.tick_ms == 0 || self.election_ticks < 2 || self.heartbeat_ticks == 0 {
            return bad("tick_ms, election_ticks (>= 2) and heartbeat_ticks must be positive");
        }
        if self.heartbeat_ticks >= self.election_ticks {
            return bad("heartbeat_ticks must be smaller than election_ticks");
        }
        if self.renew_every_ms.saturating_mul(2) >= self.state.lease_ms {
            return bad("renew_every_ms must be under half of lease_ms");
        }
        if self.skew_margin_ms >= self.state.lease_ms {
            return bad("skew_margin_ms must be smaller than lease_ms");
        }
        Ok(())
    }
}

/// Why a proposal could not be made or did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// The node cannot currently reach a majority: no leader, or the leader has been silent
    /// longer than an election timeout. The minority side of a partition gets this at once.
    #[error("no quorum: node {node} cannot reach a majority of the cluster ({detail}); the minority side of a partition cannot change cluster state")]
    NoQuorum { node: u64, detail: String },
    /// Proposed but not applied in time (leader change or partition while in flight). The
    /// command may still commit later; room creation is idempotent so retrying is safe.
    #[error(
        "not committed within {after_ms} ms (leader lost or partitioned while in flight); retry"
    )]
    Timeout { after_ms: u64 },
    #[error("too many proposals in flight (limit {limit})")]
    QueueFull { limit: usize },
    #[error("raft refused the proposal: {0}")]
    Raft(String),
}

/// What a completed proposal produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Command(Outcome),
    ConfChange(ConfState),
}

/// A proposal of ours that finished (applied, or failed).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub request_id: u64,
    pub result: Result<Applied, ProposeError>,
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this Raft message to peer `msg.to`.
    Send(Message),
    /// One of our proposals finished.
    Completed(Completion),
}

/// Replication progress of one peer as seen by the leader.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: u64,
    pub matched: u64,
    pub lag: u64,
    pub learner: bool,
}

/// Status for operators (`arbor cluster status`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClusterStatus {
    pub node: u64,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub first_index: u64,
    pub voters: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    pub learners: Vec<u64>,
    /// Only known on the leader.
    pub progress: Vec<PeerProgress>,
    pub rooms: usize,
    pub nodes: usize,
}

struct Pending {
    deadline_ms: u64,
    /// Encoded command and the leader it went to; re-proposed if the leader changes before it
    /// is applied (conf changes are not re-proposed).
    resend: Option<(Vec<u8>, u64)>,
}

/// One cluster member. See the module docs for the driving loop.
pub struct MembershipNode<B: LogBackend> {
    cfg: NodeConfig,
    raw: RawNode<RaftStore<B>>,
    sm: MembershipState,
    applied: u64,
    rng: SplitMix64,
    rand_key: (u64, u8, u64, usize),
    next_tick_ms: Option<u64>,
    now_ms: u64,
    next_request: u64,
    pending: BTreeMap<u64, Pending>,
    outputs: VecDeque<Output>,
    leader_contact_ms: u64,
    last_heartbeat_sent_ms: Option<u64>,
    last_renew_ms: u64,
    last_reassign_ms: u64,
    reassign_inflight: BTreeMap<String, u64>,
    dropped_outputs: u64,
    /// Peers we sent a snapshot to, and when.
    snapshots_sent: BTreeMap<u64, u64>,
}

fn role_code(r: StateRole) -> u8 {
    match r {
        StateRole::Follower => 0,
        StateRole::Candidate => 1,
        StateRole::Leader => 2,
        StateRole::PreCandidate => 3,
    }
}

impl<B: LogBackend> MembershipNode<B> {
    /// Starts a member on `store`. If the store is empty and `bootstrap_voters` is given, it is
    /// seeded with that founding voter set (all founders must pass the same list); an empty store
    /// without it waits to be added by the leader (joining node). `seed` drives election jitter.
    pub fn new(
        cfg: NodeConfig,
        mut store: RaftStore<B>,
        bootstrap_voters: Option<&[u64]>,
        seed: u64,
        now_ms: u64,
    ) -> Result<Self, MembershipError> {
        cfg.validate()?;
        if !store.is_initialized() {
            if let Some(v) = bootstrap_voters {
                if !v.contains(&cfg.id) {
                    return Err(MembershipError::Config(format!(
                        "founding voters {v:?} do not include this node ({})",
                        cfg.id
                    )));
                }
                store.bootstrap(v)?;
            }
        }
        let snap = store.state().snapshot.clone();
        let sm = MembershipState::from_image(&snap.data)?;
        let applied = snap.get_metadata().index;
        let raft_cfg = Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            min_election_tick: cfg.election_ticks,
            max_election_tick: cfg.election_ticks * 2,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            applied,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, store, &logger)?;
        let mut me = Self {
            cfg,
            raw,
            sm,
            applied,
            rng: SplitMix64::new(seed),
            rand_key: (u64::MAX, 0, 0, 0),
            next_tick_ms: None,
            now_ms,
            next_request: 1,
            pending: BTreeMap::new(),
            outputs: VecDeque::new(),
            leader_contact_ms: now_ms,
            last_heartbeat_sent_ms: None,
            last_renew_ms: 0,
            last_reassign_ms: now_ms,
            reassign_inflight: BTreeMap::new(),
            dropped_outputs: 0,
            snapshots_sent: BTreeMap::new(),
        };
        me.rerandomize();
        Ok(me)
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }
    /// The replicated state as applied on this node.
    pub fn state(&self) -> &MembershipState {
        &self.sm
    }
    pub fn applied_index(&self) -> u64 {
        self.applied
    }
    /// Highest log index known to be committed.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }
    /// Current leader as known here (None if unknown).
    pub fn leader(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            0 => None,
            l => Some(l),
        }
    }
    pub fn store(&self) -> &RaftStore<B> {
        self.raw.store()
    }
    /// Mutable access to the storage, for simulators' fault injection. Writing through it
    /// behind raft-rs's back breaks the node.
    pub fn store_mut(&mut self) -> &mut RaftStore<B> {
        self.raw.mut_store()
    }
    /// Outgoing messages dropped because the output queue was full.
    pub fn dropped_outputs(&self) -> u64 {
        self.dropped_outputs
    }

    /// Rooms this node believes it originates right now, with their fencing tokens: it is the
    /// origin in its applied state and the lease, minus the skew margin, has not run out.
    pub fn held_leases(&self, now_ms: u64) -> Vec<(String, u64)> {
        self.sm
            .rooms()
            .values()
            .filter(|r| {
                r.origin_node == self.cfg.id
                    && now_ms.saturating_add(self.cfg.skew_margin_ms) < r.lease_expires_ms
            })
            .map(|r| (r.name.clone(), r.fencing_token))
            .collect()
    }

    /// Drains one output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    // ----- inputs -------------------------------------------------------------------------

    /// Advances time: logical Raft ticks and the node's own timers.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        let next = *self.next_tick_ms.get_or_insert(now + self.cfg.tick_ms);
        if now >= next {
            // Bound the catch-up after a long pause: a few election timeouts' worth of ticks.
            let due = ((now - next) / self.cfg.tick_ms + 1).min(4 * self.cfg.election_ticks as u64);
            for _ in 0..due {
                self.raw.tick();
                self.rerandomize();
            }
            self.next_tick_ms = Some(now - (now - next) % self.cfg.tick_ms + self.cfg.tick_ms);
        }
        self.expire_proposals(now);
        self.retry_snapshots(now);
        self.run_timers(now);
    }

    /// Feeds a Raft message from a peer.
    pub fn step(&mut self, now_ms: u64, msg: Message) -> Result<(), MembershipError> {
        self.now_ms = self.now_ms.max(now_ms);
        let from = msg.from;
        let res = self.raw.step(msg);
        self.rerandomize();
        if from != 0 && from == self.raw.raft.leader_id {
            self.leader_contact_ms = self.now_ms;
        }
        match res {
            Ok(()) => Ok(()),
            // Messages from unknown/removed peers or stale terms are routine, not failures.
            // A forwarded proposal reaching a node that is no longer leader is dropped; the
            // proposer's deadline reports it.
            Err(raft::Error::StepPeerNotFound)
            | Err(raft::Error::StepLocalMsg)
            | Err(raft::Error::ProposalDropped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that this node can currently reach a quorum (fast failure for the minority side).
    pub fn check_quorum_view(&self, now_ms: u64) -> Result<(), ProposeError> {
        let node = self.cfg.id;
        match self.raw.raft.leader_id {
            0 => Err(ProposeError::NoQuorum {
                node,
                detail: "no leader known".into(),
            }),
            l if l == node => Ok(()),
            l => {
                let silent = now_ms.saturating_sub(self.leader_contact_ms);
                let limit = self.cfg.tick_ms * self.cfg.election_ticks as u64;
                if silent > limit {
                    Err(ProposeError::NoQuorum {
                        node,
                        detail: format!("leader {l} silent for {silent} ms (limit {limit} ms)"),
                    })
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Proposes a state-machine command; returns its request id. The result arrives later as
    /// [`Output::Completed`] once the command is applied here (or fails/times out).
    pub fn propose(&mut self, now_ms: u64, kind: Kind) -> Result<u64, ProposeError> {
        self.now_ms = self.now_ms.max(now_ms);
        self.check_quorum_view(self.now_ms)?;
        if self.pending.len() >= self.cfg.max_pending_proposals {
            return Err(ProposeError::QueueFull {
                limit: self.cfg.max_pending_proposals,
            });
        }
        let request_id = self.next_request;
        let cmd = Command {
            proposer: self.cfg.id,
            request_id,
            now_ms: self.now_ms,
            kind: Some(kind),
        };
        let data = cmd.encode_to_vec();
        self.raw
            .propose(vec![], data.clone())
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        self.next_request += 1;
        self.pending.insert(
            request_id,
            Pending {
                deadline_ms: self.now_ms + self.cfg.proposal_timeout_ms,
                resend: Some((data, self.raw.raft.leader_id)),
            },
        );
        Ok(request_id)
    }

    /// Adds `node` as a learner (receives the log, does not vote): read-only edge nodes, and the
    /// first step of adding a voter.
    pub fn propose_add_learner(&mut self, now_ms: u64, node: u64) -> Result<u64, ProposeError> {
        self.propose_conf(now_ms, node, ConfChangeType::AddLearnerNode)
    }
    /// Makes `node` a voter (joint consensus).
    pub fn propose_add_voter(&mut self, now_ms: u64, node: u64) -> Result<u64, ProposeError> {
        self.propose_conf(now_ms, node, ConfChangeType::AddNode)
    }
    /// Removes `node` from the configuration (joint consensus).
    pub fn propose_remove_node(&mut self, now_ms: u64, node: u64) -> Result<u64, ProposeError> {
        self.propose_conf(now_ms, node, ConfChangeType::RemoveNode)
    }

    fn propose_conf(
        &mut self,
        now_ms: u64,
        node: u64,
        ty: ConfChangeType,
    ) -> Result<u64, ProposeError> {
        self.now_ms = self.now_ms.max(now_ms);
        self.check_quorum_view(self.now_ms)?;
        if node == 0 {
            return Err(ProposeError::Raft("node id 0".into()));
        }
        if self.pending.len() >= self.cfg.max_pending_proposals {
            return Err(ProposeError::QueueFull {
                limit: self.cfg.max_pending_proposals,
            });
        }
        let request_id = self.next_request;
        let mut single = ConfChangeSingle {
            node_id: node,
            ..Default::default()
        };
        single.set_change_type(ty);
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        // Implicit: enter the joint configuration C_old,new, and let raft-rs leave it
        // automatically once that entry is committed.
        cc.set_transition(ConfChangeTransition::Implicit);
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.cfg.id.to_le_bytes());
        ctx.extend_from_slice(&request_id.to_le_bytes());
        self.raw
            .propose_conf_change(ctx, cc)
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        self.next_request += 1;
        self.pending.insert(
            request_id,
            Pending {
                deadline_ms: self.now_ms + self.cfg.proposal_timeout_ms,
                resend: None,
            },
        );
        Ok(request_id)
    }

    // ----- the Ready cycle ----------------------------------------------------------------

    /// Runs the raft-rs Ready cycle (see module docs). Call after every input.
    pub fn process_ready(&mut self) -> Result<(), MembershipError> {
        // A bounded number of rounds: each round makes progress or there is no ready.
        for _ in 0..16 {
            if !self.raw.has_ready() {
                break;
            }
            self.ready_round()?;
        }
        self.maybe_compact()
    }

    fn ready_round(&mut self) -> Result<(), MembershipError> {
        let mut rd = self.raw.ready();
        let early = rd.take_messages();
        self.queue_messages(early);

        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let sm = MembershipState::from_image(&snap.data)?;
            self.raw.mut_store().write(WriteBatch {
                snapshot: Some(snap.clone()),
                ..Default::default()
            })?;
            self.sm = sm;
            self.applied = snap.get_metadata().index;
        }

        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;

        let mut batch = WriteBatch {
            entries: rd.take_entries(),
            ..Default::default()
        };
        if let Some(hs) = rd.hs() {
            batch.hard_state = Some(hs.clone());
        }
        self.raw.mut_store().write(batch)?;
        let persisted = rd.take_persisted_messages();
        if self.cfg.defect == Some(InjectedDefect::SendBeforePersist) {
            // Deliberately wrong: the messages leave before the data they vouch for is durable.
            // The sync is deferred to the next round, so a crash in between loses the data.
            self.queue_messages(persisted);
        } else {
            self.raw.mut_store().sync()?;
            self.queue_messages(persisted);
        }

        let mut light = self.raw.advance(rd);
        if let Some(c) = light.commit_index() {
            self.raw.mut_store().write(WriteBatch {
                commit: Some(c),
                ..Default::default()
            })?;
        }
        let msgs = light.take_messages();
        self.queue_messages(msgs);
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        Ok(())
    }

    fn queue_messages(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.snapshots_sent.insert(m.to, self.now_ms);
            }
            if self.outputs.len() >= self.cfg.max_queued_outputs {
                self.dropped_outputs += 1;
                continue;
            }
            self.outputs.push_back(Output::Send(m));
        }
    }

    fn complete(&mut self, request_id: u64, result: Result<Applied, ProposeError>) {
        if self.pending.remove(&request_id).is_some() {
            self.outputs
                .push_back(Output::Completed(Completion { request_id, result }));
        }
    }

    fn apply_entries(&mut self, entries: Vec<raft::prelude::Entry>) -> Result<(), MembershipError> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        continue; // the leader's no-op at the start of its term
                    }
                    let cmd = match Command::decode(&e.data[..]) {
                        Ok(c) => c,
                        // A committed entry we cannot decode is the same on every replica;
                        // skipping it keeps them identical. It can only come from a newer or
                        // broken proposer.
                        Err(_) => continue,
                    };
                    let outcome =
                        self.sm
                            .apply(&self.cfg.state, self.cfg.defect, e.index, e.term, &cmd);
                    if let Outcome::Lease(g) = &outcome {
                        self.reassign_inflight.remove(&g.room);
                    }
                    if cmd.proposer == self.cfg.id {
                        self.complete(cmd.request_id, Ok(Applied::Command(outcome)));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let decode_err =
                        |err: protobuf::ProtobufError| MembershipError::Decode(err.to_string());
                    let (applied, ctx) = if e.get_entry_type() == EntryType::EntryConfChange {
                        let cc = <ConfChange as protobuf::Message>::parse_from_bytes(&e.data)
                            .map_err(decode_err)?;
                        (self.raw.apply_conf_change(&cc), e.context.to_vec())
                    } else {
                        let cc = <ConfChangeV2 as protobuf::Message>::parse_from_bytes(&e.data)
                            .map_err(decode_err)?;
                        (self.raw.apply_conf_change(&cc), e.context.to_vec())
                    };
                    let result = match applied {
                        Ok(cs) => {
                            self.raw.mut_store().write(WriteBatch {
                                conf_state: Some(cs.clone()),
                                ..Default::default()
                            })?;
                            Ok(Applied::ConfChange(cs))
                        }
                        Err(err) => Err(ProposeError::Raft(err.to_string())),
                    };
                    if ctx.len() == 16 {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&ctx[..8]);
                        let proposer = u64::from_le_bytes(a);
                        a.copy_from_slice(&ctx[8..]);
                        if proposer == self.cfg.id {
                            self.complete(u64::from_le_bytes(a), result);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), MembershipError> {
        if self.raw.store().log_len() <= self.cfg.compact_after_entries {
            return Ok(());
        }
        if self.raw.store().has_unsynced() {
            if self.cfg.defect == Some(InjectedDefect::SendBeforePersist) {
                return Ok(()); // keep the defect's unsynced window open
            }
            // The snapshot must not cover entries that are not durable yet.
            self.raw.mut_store().sync()?;
        }
        let store = self.raw.store();
        let idx = self.applied.min(store.last_index()?);
        let snap_idx = store.state().snapshot.get_metadata().index;
        if idx <= snap_idx {
            return Ok(());
        }
        let term = store.term(idx)?;
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let snap = snapshot_of(idx, term, cs, self.sm.to_image());
        self.raw.mut_store().write(WriteBatch {
            snapshot: Some(snap),
            keep_log_after_snapshot: true,
            ..Default::default()
        })?;
        self.raw.mut_store().sync()
    }

    // ----- timers -------------------------------------------------------------------------

    /// raft-rs draws election timeouts from the thread RNG, which would break replay. Whenever
    /// raft has (re)set the timeout — visible as a change of term, role, leader or timeout — we
    /// overwrite it with one drawn from our seeded generator.
    fn rerandomize(&mut self) {
        self.resend_on_leader_change();
        let r = &self.raw.raft;
        let key = (
            r.term,
            role_code(r.state),
            r.leader_id,
            r.randomized_election_timeout(),
        );
        if key != self.rand_key {
            let e = self.cfg.election_ticks;
            let t = e + self.rng.below(e as u64) as usize;
            self.raw.raft.set_randomized_election_timeout(t);
            self.rand_key = (key.0, key.1, key.2, t);
        }
    }

    /// raft-rs keeps a follower in "snapshot" state until the application reports how the
    /// snapshot transfer went; if the snapshot or the follower's answer was lost, replication to
    /// it would stall forever. A snapshot unanswered for two election timeouts is reported as
    /// failed, which makes the leader probe and resend.
    fn retry_snapshots(&mut self, now: u64) {
        let limit = 2 * self.cfg.tick_ms * self.cfg.election_ticks as u64;
        let due: Vec<u64> = self
            .snapshots_sent
            .iter()
            .filter(|(_, t)| now >= **t + limit)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.snapshots_sent.remove(&id);
            self.raw.report_snapshot(id, raft::SnapshotStatus::Failure);
        }
    }

    /// Tells raft-rs that the transport finished (`ok`) or failed to deliver a snapshot to `to`.
    pub fn report_snapshot(&mut self, to: u64, ok: bool) {
        self.snapshots_sent.remove(&to);
        let st = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, st);
    }

    /// Tells raft-rs that `to` could not be reached (it stops pipelining appends to it).
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    /// A proposal forwarded to a leader that then died is silently lost. When a new leader
    /// appears, proposals still pending are proposed again (same bytes, same request id), so a
    /// client sees one election's delay instead of a timeout. Applying a command twice is
    /// harmless: creation is idempotent per (proposer, request id), renewals and publications
    /// are idempotent, and a duplicated acquire only bumps the fencing token.
    fn resend_on_leader_change(&mut self) {
        let leader = self.raw.raft.leader_id;
        if leader == 0 {
            return;
        }
        let mut again = Vec::new();
        for p in self.pending.values_mut() {
            if let Some((data, to)) = &mut p.resend {
                if *to != leader {
                    *to = leader;
                    again.push(data.clone());
                }
            }
        }
        for data in again {
            // Dropped again only if leadership changes once more, which resends again.
            let _ = self.raw.propose(vec![], data);
        }
    }

    fn expire_proposals(&mut self, now: u64) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        let after_ms = self.cfg.proposal_timeout_ms;
        for id in expired {
            self.complete(id, Err(ProposeError::Timeout { after_ms }));
        }
    }

    /// Internal proposals (heartbeats, renewals, reassignments) are fire-and-forget: their
    /// completions are consumed here, not surfaced... they are surfaced like any other, with
    /// request ids the shell never asked for, and the shell ignores unknown ids.
    fn run_timers(&mut self, now: u64) {
        if self.check_quorum_view(now).is_err() {
            return;
        }
        let id = self.cfg.id;
        if self.sm.is_removed(id) {
            return;
        }
        // Registration and heartbeat.
        let due = self
            .last_heartbeat_sent_ms
            .is_none_or(|t| now >= t + self.cfg.node_heartbeat_ms);
        if due {
            let me = NodeRecord {
                id,
                region: self.cfg.region.clone(),
                quic_addr: self.cfg.quic_addr.clone(),
                http_addr: self.cfg.http_addr.clone(),
                capacity: self.cfg.capacity,
                ..Default::default()
            };
            let kind = match self.sm.nodes().get(&id) {
                Some(n)
                    if n.region == me.region
                        && n.quic_addr == me.quic_addr
                        && n.http_addr == me.http_addr
                        && n.capacity == me.capacity =>
                {
                    Kind::Heartbeat(Heartbeat { node: id })
                }
                _ => Kind::RegisterNode(me),
            };
            if self.propose(now, kind).is_ok() {
                self.last_heartbeat_sent_ms = Some(now);
            }
        }
        // Renew the leases we hold (or held: renewing an expired-but-not-taken lease is fine,
        // the fencing token decides), all in a few batched entries.
        if now >= self.last_renew_ms + self.cfg.renew_every_ms {
            let mine: Vec<LeaseRef> = self
                .sm
                .rooms()
                .values()
                .filter(|r| r.origin_node == id)
                .map(|r| LeaseRef {
                    room: r.name.clone(),
                    fencing_token: r.fencing_token,
                })
                .collect();
            let mut all_sent = true;
            for chunk in mine.chunks(self.cfg.max_renew_batch.max(1)) {
                let kind = Kind::RenewLeases(RenewLeases {
                    node: id,
                    leases: chunk.to_vec(),
                });
                if self.propose(now, kind).is_err() {
                    all_sent = false;
                    break;
                }
            }
            if all_sent {
                self.last_renew_ms = now;
            }
        }
        // The leader hands orphaned rooms (lease expired) to a live node.
        if self.is_leader() && now >= self.last_reassign_ms + self.cfg.reassign_every_ms {
            self.last_reassign_ms = now;
            self.reassign_orphans(now);
        }
    }

    fn reassign_orphans(&mut self, now: u64) {
        self.reassign_inflight.retain(|_, deadline| *deadline > now);
        let ttl = self.cfg.node_ttl_ms;
        let live: Vec<u64> = self
            .sm
            .nodes()
            .values()
            .filter(|n| now <= n.last_heartbeat_ms.saturating_add(ttl))
            .map(|n| n.id)
            .collect();
        if live.is_empty() {
            return;
        }
        let mut load: BTreeMap<u64, usize> = live.iter().map(|n| (*n, 0)).collect();
        for r in self.sm.rooms().values() {
            if let Some(c) = load.get_mut(&r.origin_node) {
                *c += 1;
            }
        }
        let orphans: Vec<(String, u64)> = self
            .sm
            .rooms()
            .values()
            .filter(|r| r.lease_expires_ms <= now && !self.reassign_inflight.contains_key(&r.name))
            .take(self.cfg.max_reassign_per_scan)
            .map(|r| (r.name.clone(), r.origin_node))
            .collect();
        for (room, old) in orphans {
            // Keep the old origin if it is alive (it merely missed a renewal); otherwise the
            // least-loaded live node.
            let target = if load.contains_key(&old) {
                old
            } else {
                let Some((&n, _)) = load.iter().min_by_key(|(n, c)| (**c, **n)) else {
                    return;
                };
                n
            };
            let kind = Kind::AcquireLease(AcquireLease {
                room: room.clone(),
                node: target,
            });
            if self.propose(now, kind).is_err() {
                return;
            }
            if let Some(c) = load.get_mut(&target) {
                *c += 1;
            }
            self.reassign_inflight
                .insert(room, now + self.cfg.proposal_timeout_ms);
        }
    }

    // ----- status -------------------------------------------------------------------------

    pub fn status(&self) -> ClusterStatus {
        let r = &self.raw.raft;
        let store = self.raw.store();
        let last = store.last_index().unwrap_or(0);
        let mut conf = r.prs().conf().to_conf_state();
        conf.voters.sort_unstable();
        conf.voters_outgoing.sort_unstable();
        conf.learners.sort_unstable();
        let mut progress = Vec::new();
        if r.state == StateRole::Leader {
            for (id, p) in r.prs().iter() {
                progress.push(PeerProgress {
                    id: *id,
                    matched: p.matched,
                    lag: r.raft_log.last_index().saturating_sub(p.matched),
                    learner: conf.learners.contains(id),
                });
            }
            progress.sort_by_key(|p| p.id);
        }
        ClusterStatus {
            node: self.cfg.id,
            role: format!("{:?}", r.state),
            term: r.term,
            leader: self.leader(),
            commit: r.raft_log.committed,
            applied: self.applied,
            last_index: last,
            first_index: store.first_index().unwrap_or(0),
            voters: conf.voters.clone(),
            voters_outgoing: conf.voters_outgoing.clone(),
            learners: conf.learners.clone(),
            progress,
            rooms: self.sm.rooms().len(),
            nodes: self.sm.nodes().len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::storage::MemBackend;

    /// A lossless in-memory network of nodes, stepped in lock-step.
    struct Net {
        nodes: BTreeMap<u64, MembershipNode<MemBackend>>,
        now: u64,
        done: Vec<(u64, Completion)>,
    }

    impl Net {
        fn new(voters: &[u64], extra: &[u64]) -> Self {
            let mut nodes = BTreeMap::new();
            for id in voters.iter().chain(extra) {
                let store = RaftStore::open(MemBackend::new()).unwrap();
                let boot = voters.contains(id).then_some(voters);
                let mut cfg = NodeConfig::new(*id);
                cfg.tick_ms = 10;
                nodes.insert(*id, MembershipNode::new(cfg, store, boot, *id, 0).unwrap());
            }
            Self {
                nodes,
                now: 0,
                done: Vec::new(),
            }
        }

        fn run(&mut self, ms: u64) {
            for _ in 0..ms / 5 {
                self.now += 5;
                let mut msgs = Vec::new();
                for (id, n) in self.nodes.iter_mut() {
                    n.tick(self.now);
                    n.process_ready().unwrap();
                    while let Some(o) = n.poll_output() {
                        match o {
                            Output::Send(m) => msgs.push(m),
                            Output::Completed(c) => self.done.push((*id, c)),
                        }
                    }
                }
                for m in msgs {
                    if let Some(n) = self.nodes.get_mut(&m.to) {
                        n.step(self.now, m).unwrap();
                    }
                }
            }
        }

        fn leader(&self) -> u64 {
            self.nodes
                .values()
                .find(|n| n.is_leader())
                .map(|n| n.id())
                .expect("a leader")
        }
    }

    #[test]
    fn learner_then_voter_through_joint_consensus() {
        let mut net = Net::new(&[1, 2, 3], &[4]);
        net.run(2_000);
        let l = net.leader();
        let now = net.now;
        let rid = net
            .nodes
            .get_mut(&l)
            .unwrap()
            .propose_add_learner(now, 4)
            .unwrap();
        net.run(1_000);
        let done = net
            .done
            .iter()
            .find(|(id, c)| *id == l && c.request_id == rid);

        assert!(
            matches!(
                done,
                Some((
                    _,
                    Completion {
                        result: Ok(Applied::ConfChange(_)),
                        ..
                    }
                ))
            ),
            "{done:?}"
        );
        assert!(net.nodes[&l].status().learners.contains(&4));
        let now = net.now;
        let rid = net
            .nodes
            .get_mut(&l)
            .unwrap()
            .propose_add_voter(now, 4)
            .unwrap();
        net.run(1_000);
        assert!(net
            .done
            .iter()
            .any(|(id, c)| *id == l && c.request_id == rid && c.result.is_ok()));
        let st = net.nodes[&l].status();
        assert_eq!(st.voters, vec![1, 2, 3, 4]);
        assert!(
            st.voters_outgoing.is_empty(),
            "joint configuration left automatically"
        );
        // Node 4 replicated the directory.
        assert_eq!(net.nodes[&4].state().nodes().len(), 4);
    }

    #[test]
    fn log_is_compacted_under_steady_load() {
        let mut net = Net::new(&[1, 2, 3], &[]);
        for n in net.nodes.values_mut() {
            n.cfg.compact_after_entries = 50;
        }
        net.run(1_000);
        for i in 0..300 {
            let l = net.leader();
            let now = net.now;
            let name = format!("room-{i}");
            let kind = Kind::CreateRoom(arbor_proto::membership::CreateRoom {
                name,
                origin_node: l,
                config: None,
            });
            net.nodes.get_mut(&l).unwrap().propose(now, kind).unwrap();
            net.run(10);
        }
        net.run(500);
        for n in net.nodes.values() {
            assert_eq!(n.state().rooms().len(), 300);
            assert!(
                n.store().log_len() <= 100,
                "node {} holds {} entries",
                n.id(),
                n.store().log_len()
            );
            assert!(
                n.store().first_index().unwrap() > 1,
                "node {} never compacted",
                n.id()
            );
        }
    }
}
