//! The production shell around [`MembershipNode`]: one tokio task that owns the node, feeds it
//! wall-clock ticks, peer messages from the QUIC [`Transport`] and requests from
//! [`ServiceHandle`]s, runs the Ready cycle, and routes the outputs.
//!
//! The task is the only place with clocks and sockets; the node inside is the same sans-IO core
//! the simulator drives. Requests wait on a bounded channel; replies come back on oneshots.
//! A storage failure stops the service (Raft must never continue on a store that failed a
//! write); every waiting and later request then gets [`ServiceError::Stopped`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbor_proto::membership::{
    command::Kind, CreateRoom, NodeRecord, RaftEnvelope, RemoveNode, RoomConfig, RoomRecord,
};
use tokio::sync::{mpsc, oneshot};

use crate::membership::{
    decode_raft_message, encode_raft_message, Applied, ClusterStatus, LogBackend, MembershipNode,
    Outcome, Output, ProposeError, Rejection,
};
use crate::transport::Transport;

/// Errors surfaced to callers of the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("rejected by the cluster: {0}")]
    Rejected(Rejection),
    #[error("membership service stopped: {0}")]
    Stopped(String),
    #[error("too many requests queued (limit {0})")]
    Busy(usize),
    #[error("unexpected result: {0}")]
    Unexpected(String),
}

type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

enum Request {
    Propose(Kind, Reply<Applied>),
    Conf(ConfOp, u64, Reply<Applied>),
    Status(Reply<(ClusterStatus, Vec<NodeRecord>)>),
    Rooms(Reply<Vec<RoomRecord>>),
    Block(BTreeSet<u64>, Reply<BTreeSet<u64>>),
    AddPeer(u64, std::net::SocketAddr, Reply<()>),
}

#[derive(Debug, Clone, Copy)]
enum ConfOp {
    AddLearner,
    AddVoter,
    Remove,
}

/// Cloneable handle to a running membership service.
#[derive(Clone)]
pub struct ServiceHandle {
    tx: mpsc::Sender<Request>,
    limit: usize,
}

/// Milliseconds since the Unix epoch: the clock leases are stamped with (members' clocks are
/// assumed synchronised within the configured skew margin, e.g. by NTP).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ServiceHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, ServiceError> {
        let (tx, rx) = oneshot::channel();
        self.tx.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ServiceError::Busy(self.limit),
            mpsc::error::TrySendError::Closed(_) => {
                ServiceError::Stopped("service task ended".into())
            }
        })?;
        rx.await
            .map_err(|_| ServiceError::Stopped("service task ended".into()))?
    }

    /// Proposes a command and waits until it is applied on this node.
    pub async fn propose(&self, kind: Kind) -> Result<Applied, ServiceError> {
        self.call(|r| Request::Propose(kind, r)).await
    }

    /// Creates a room originated by `origin` (idempotent: an existing room is returned with
    /// `created = false`).
    pub async fn create_room(
        &self,
        name: &str,
        origin: u64,
        config: Option<RoomConfig>,
    ) -> Result<(RoomRecord, bool), ServiceError> {
        let kind = Kind::CreateRoom(CreateRoom {
            name: name.to_string(),
            origin_node: origin,
            config,
        });
        match self.propose(kind).await? {
            Applied::Command(Outcome::Room { room, created }) => Ok((room, created)),
            Applied::Command(Outcome::Rejected(r)) => Err(ServiceError::Rejected(r)),
            other => Err(ServiceError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn rooms(&self) -> Result<Vec<RoomRecord>, ServiceError> {
        self.call(Request::Rooms).await
    }

    pub async fn status(&self) -> Result<(ClusterStatus, Vec<NodeRecord>), ServiceError> {
        self.call(Request::Status).await
    }

    /// Adds `id` (reachable at `addr`) as a learner.
    pub async fn add_learner(
        &self,
        id: u64,
        addr: std::net::SocketAddr,
    ) -> Result<Applied, ServiceError> {
        self.call(|r| Request::AddPeer(id, addr, r)).await?;
        self.call(|r| Request::Conf(ConfOp::AddLearner, id, r))
            .await
    }

    /// Promotes `id` to voter (joint consensus).
    pub async fn add_voter(&self, id: u64) -> Result<Applied, ServiceError> {
        self.call(|r| Request::Conf(ConfOp::AddVoter, id, r)).await
    }

    /// Removes `id` from the Raft configuration, then from the node registry.
    pub async fn remove_node(&self, id: u64) -> Result<Applied, ServiceError> {
        let a = self.call(|r| Request::Conf(ConfOp::Remove, id, r)).await?;
        self.propose(Kind::RemoveNode(RemoveNode { node: id }))
            .await?;
        Ok(a)
    }

    /// Fault injection: drop all traffic to/from these peers. Returns the new set.
    pub async fn set_blocked(&self, peers: BTreeSet<u64>) -> Result<BTreeSet<u64>, ServiceError> {
        self.call(|r| Request::Block(peers, r)).await
    }
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Requests queued before callers get [`ServiceError::Busy`].
    pub request_queue: usize,
    /// Initial peer addresses (more are learned from the replicated node registry).
    pub peers: BTreeMap<u64, std::net::SocketAddr>,
}

/// Starts the service task. `node` must be freshly built; `transport` bound.
pub fn spawn<B: LogBackend + Send + 'static>(
    node: MembershipNode<B>,
    transport: Transport,
    cfg: ServiceConfig,
) -> ServiceHandle {
    let (tx, rx) = mpsc::channel(cfg.request_queue);
    for (id, addr) in &cfg.peers {
        transport.set_peer(*id, *addr);
    }
    tokio::spawn(run(node, transport, rx));
    ServiceHandle {
        tx,
        limit: cfg.request_queue,
    }
}

async fn run<B: LogBackend>(
    mut node: MembershipNode<B>,
    mut transport: Transport,
    mut rx: mpsc::Receiver<Request>,
) {
    let tick = Duration::from_millis((node.config().tick_ms / 2).max(5));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut waiters: BTreeMap<u64, Reply<Applied>> = BTreeMap::new();
    let mut last_peer_sync = 0u64;
    let fatal: String = loop {
        tokio::select! {
            _ = interval.tick() => node.tick(wall_ms()),
            env = transport.recv() => {
                let Some(env) = env else { break "transport closed".into() };
                match decode_raft_message(&env.message) {
                    Ok(m) => {
                        if let Err(e) = node.step(wall_ms(), m) {
                            break format!("raft step failed: {e}");
                        }
                    }
                    Err(e) => tracing::warn!(from = env.from, "dropping undecodable raft message: {e}"),
                }
            }
            req = rx.recv() => {
                let Some(req) = req else { break "all handles dropped".into() };
                let now = wall_ms();
                match req {
                    Request::Propose(kind, reply) => match node.propose(now, kind) {
                        Ok(id) => { waiters.insert(id, reply); }
                        Err(e) => { let _ = reply.send(Err(e.into())); }
                    },
                    Request::Conf(op, id, reply) => {
                        let r = match op {
                            ConfOp::AddLearner => node.propose_add_learner(now, id),
                            ConfOp::AddVoter => node.propose_add_voter(now, id),
                            ConfOp::Remove => node.propose_remove_node(now, id),
                        };
                        match r {
                            Ok(rid) => { waiters.insert(rid, reply); }
                            Err(e) => { let _ = reply.send(Err(e.into())); }
                        }
                    }
                    Request::Status(reply) => {
                        let nodes = node.state().nodes().values().cloned().collect();
                        let _ = reply.send(Ok((node.status(), nodes)));
                    }
                    Request::Rooms(reply) => {
                        let _ = reply.send(Ok(node.state().rooms().values().cloned().collect()));
                    }
                    Request::Block(peers, reply) => {
                        transport.set_blocked(peers);
                        let _ = reply.send(Ok(transport.blocked()));
                    }
                    Request::AddPeer(id, addr, reply) => {
                        transport.set_peer(id, addr);
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        }
        if let Err(e) = node.process_ready() {
            break format!("storage/raft failure: {e}");
        }
        while let Some(out) = node.poll_output() {
            match out {
                Output::Send(m) => match encode_raft_message(&m) {
                    Ok(bytes) => transport.send(RaftEnvelope {
                        from: m.from,
                        to: m.to,
                        message: bytes,
                    }),
                    Err(e) => tracing::warn!("cannot encode raft message: {e}"),
                },
                Output::Completed(c) => {
                    if let Some(w) = waiters.remove(&c.request_id) {
                        let _ = w.send(c.result.map_err(ServiceError::from));
                    }
                }
            }
        }
        // Learn peer addresses from the replicated registry.
        let now = wall_ms();
        if now >= last_peer_sync + 1_000 {
            last_peer_sync = now;
            let known = transport.peers();
            for n in node.state().nodes().values() {
                if let Ok(addr) = n.quic_addr.parse() {
                    if n.id != node.id() && known.get(&n.id) != Some(&addr) {
                        transport.set_peer(n.id, addr);
                    }
                }
            }
        }
    };
    tracing::error!(node = node.id(), "membership service stopping: {fatal}");
    for (_, w) in waiters {
        let _ = w.send(Err(ServiceError::Stopped(fatal.clone())));
    }
    rx.close();
    while let Some(req) = rx.recv().await {
        let err = ServiceError::Stopped(fatal.clone());
        match req {
            Request::Propose(_, r) | Request::Conf(_, _, r) => drop(r.send(Err(err))),
            Request::Status(r) => drop(r.send(Err(err))),
            Request::Rooms(r) => drop(r.send(Err(err))),
            Request::Block(_, r) => drop(r.send(Err(err))),
            Request::AddPeer(_, _, r) => drop(r.send(Err(err))),
        }
    }
}
