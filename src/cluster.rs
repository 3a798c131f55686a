//! `arbor cluster ...` and the cluster member inside `arbor node`.
//!
//! * [`ClusterCommand`] — operator CLI: `init` (cluster CA, node certificates and configs),
//!   `join` (certificate + config for a new node, and asks the leader to add it), `status`,
//!   `remove`.
//! * [`ClusterConfig`] + [`start`] — runs this process's Raft member (redb log, QUIC transport)
//!   and returns a [`ClusterHandle`].
//! * [`routes`] — the JSON admin API under `/cluster/` that the CLI and tests talk to.
//!
//! # Configuration (TOML)
//!
//! ```toml
//! node_id = 1                      # non-zero, never reused
//! cluster_id = "prod-eu"           # peers must present the same id
//! region = "eu-west"
//! quic_listen = "127.0.0.1:7001"   # QUIC endpoint for Raft (and later media relay)
//! http_addr = "127.0.0.1:8001"     # HTTP address (admin API), advertised to peers
//! data_dir = "/var/lib/arbor/1"    # holds raft.redb
//! ca_cert = "ca.pem"               # cluster CA certificate (relative to this file)
//! node_cert = "node-1.pem"
//! node_key = "node-1.key"
//! bootstrap = true                 # founding member: seeds the voter set = self + peers
//! fault_injection = false          # enables POST /cluster/fault (tests only)
//! capacity = 100
//! link_idle_timeout_ms = 1500      # a silent peer is declared dead after this (QUIC idle
//!                                  # timeout; keep-alives every quarter of it)
//!
//! [[peers]]                        # founding members (others are learned from the registry)
//! id = 2
//! quic_addr = "127.0.0.1:7002"
//!
//! [[region_rtt]]                   # optional: RTT between regions, for relay-tree planning
//! a = "eu-west"
//! b = "us-east"
//! rtt_ms = 80
//!
//! [raft]                           # optional tuning, defaults shown
//! tick_ms = 100
//! election_ticks = 10              # election timeout drawn from [10, 20) ticks
//! heartbeat_ticks = 2
//! lease_ms = 3000                  # origin lease; renewed every renew_every_ms
//! renew_every_ms = 1000
//! skew_margin_ms = 500             # max clock skew tolerated between members
//! node_heartbeat_ms = 500          # registry heartbeat (liveness for origin hand-over)
//! node_ttl_ms = 1800               # must stay under lease_ms - node_heartbeat_ms
//! proposal_timeout_ms = 5000
//! compact_after_entries = 10000
//! max_pending_proposals = 4096
//! request_queue = 1024
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use arbor_proto::membership::{NodeRecord, RoomConfig};
use arbor_topology::membership::{
    ClusterStatus, MembershipNode, NodeConfig, ProposeError, RaftStore, RedbBackend, StateConfig,
};
use arbor_topology::transport::service::{self, ServiceConfig, ServiceError, ServiceHandle};
use arbor_topology::transport::tls::{generate_ca, issue_node_cert, NodeTls, PemPair};
use arbor_topology::transport::{Transport, TransportConfig};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

/// A room as stored in the replicated directory.
pub use arbor_proto::membership::RoomRecord as RoomEntry;

/// Operator commands.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Create a cluster CA and certificates + configs for the founding nodes.
    Init {
        /// Output directory (must not already contain a CA).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "arbor")]
        cluster_id: String,
        /// Founding node: ID=QUIC_ADDR,HTTP_ADDR (repeat per node).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Parent of the nodes' data directories (default: OUT/data).
        #[arg(long)]
        data_root: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        region: String,
        /// Enable the fault-injection endpoint in the generated configs (tests only).
        #[arg(long)]
        fault_injection: bool,
    },
    /// Issue a certificate and config for a new node and ask the leader to add it.
    Join {
        /// Directory holding ca.pem and ca.key (from `init`).
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        quic: SocketAddr,
        #[arg(long)]
        http: SocketAddr,
        /// HTTP address of any current member.
        #[arg(long)]
        seed: SocketAddr,
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the node's config.
        #[arg(long)]
        out: PathBuf,
        /// Make it a voter (default: learner, i.e. a read-only edge member).
        #[arg(long)]
        voter: bool,
        #[arg(long, default_value = "default")]
        region: String,
        /// Enable the fault-injection endpoint in the generated config (tests only).
        #[arg(long)]
        fault_injection: bool,
    },
    /// Show leader, term, members and replication lag.
    Status {
        /// HTTP address of any member.
        #[arg(long, default_value = "127.0.0.1:7880")]
        http: SocketAddr,
        /// Print raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the cluster (Raft configuration and registry).
    Remove {
        node: u64,
        #[arg(long, default_value = "127.0.0.1:7880")]
        http: SocketAddr,
    },
}

/// A peer known at start-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerConfig {
    pub id: u64,
    pub quic_addr: SocketAddr,
}

/// Raft tuning (see module docs for defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub lease_ms: u64,
    pub renew_every_ms: u64,
    pub skew_margin_ms: u64,
    pub node_heartbeat_ms: u64,
    pub node_ttl_ms: u64,
    pub proposal_timeout_ms: u64,
    pub compact_after_entries: usize,
    pub max_pending_proposals: usize,
    pub request_queue: usize,
}

/// The server's origin-failover defaults (tighter than the membership core's own, which the
/// Raft simulator uses). An origin that dies is replaced after its lease runs out, and the
/// Raft leader only hands the room to a node whose registry heartbeat is fresh — so the node
/// TTL must be shorter than the lease minus one heartbeat interval, or the dead origin (whose
/// last heartbeat may be younger than its last renewal) would be re-granted its own room and
/// the failover would take a second lease period. 3000 / 1000 / 500 / 1800 ms: the room moves
/// about 3-3.5 s after the origin's last renewal.
pub const DEFAULT_LEASE_MS: u64 = 3_000;
/// See [`DEFAULT_LEASE_MS`] (must be under half the lease).
pub const DEFAULT_RENEW_EVERY_MS: u64 = 1_000;
/// See [`DEFAULT_LEASE_MS`].
pub const DEFAULT_NODE_HEARTBEAT_MS: u64 = 500;
/// See [`DEFAULT_LEASE_MS`] (three missed heartbeats and a margin).
pub const DEFAULT_NODE_TTL_MS: u64 = 1_800;

impl Default for RaftTuning {
    fn default() -> Self {
        let n = NodeConfig::new(1);
        Self {
            tick_ms: n.tick_ms,
            election_ticks: n.election_ticks,
            heartbeat_ticks: n.heartbeat_ticks,
            lease_ms: DEFAULT_LEASE_MS,
            renew_every_ms: DEFAULT_RENEW_EVERY_MS,
            skew_margin_ms: n.skew_margin_ms,
            node_heartbeat_ms: DEFAULT_NODE_HEARTBEAT_MS,
            node_ttl_ms: DEFAULT_NODE_TTL_MS,
            proposal_timeout_ms: n.proposal_timeout_ms,
            compact_after_entries: n.compact_after_entries,
            max_pending_proposals: n.max_pending_proposals,
            request_queue: 1_024,
        }
    }
}

/// Configuration of this process's cluster member (see module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub node_id: u64,
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub quic_listen: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    #[serde(default)]
    pub bootstrap: bool,
    #[serde(default)]
    pub fault_injection: bool,
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub raft: RaftTuning,
    /// Round-trip times between regions, for the relay-tree planner that picks each room
    /// link's parent (`src/fabric.rs`). Unlisted pairs of different regions count as
    /// [`crate::fabric::DEFAULT_CROSS_REGION_RTT_MS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub region_rtt: Vec<RegionRtt>,
    /// QUIC idle timeout of the node-to-node connections, in ms: how long a peer may stay
    /// silent before it is declared dead. Every room link and relayed track to that peer rides
    /// on the connection, so this is how fast a relay node's children notice its death and
    /// re-parent (the connection sends keep-alives every quarter of it, so a live but idle
    /// peer never times out). Lower detects faster but needs a network that never stalls
    /// this long.
    #[serde(default = "default_link_idle_timeout_ms")]
    pub link_idle_timeout_ms: u64,
}

/// One `[[region_rtt]]` entry: the measured round trip between two regions (symmetric).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRtt {
    pub a: String,
    pub b: String,
    pub rtt_ms: u32,
}

fn default_cluster_id() -> String {
    "arbor".into()
}
fn default_region() -> String {
    "default".into()
}
fn default_capacity() -> u32 {
    100
}
/// See [`ClusterConfig::link_idle_timeout_ms`].
pub const DEFAULT_LINK_IDLE_TIMEOUT_MS: u64 = 1_500;
fn default_link_idle_timeout_ms() -> u64 {
    DEFAULT_LINK_IDLE_TIMEOUT_MS
}

impl ClusterConfig {
    /// Reads a TOML config; relative paths are resolved against the file's directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: ClusterConfig = toml::from_str(&text)
            .with_context(|| format!("parsing cluster config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.ca_cert,
            &mut cfg.node_cert,
            &mut cfg.node_key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    fn node_config(&self) -> NodeConfig {
        let t = &self.raft;
        let mut n = NodeConfig::new(self.node_id);
        n.region = self.region.clone();
        n.quic_addr = self.quic_listen.to_string();
        n.http_addr = self.http_addr.to_string();
        n.capacity = self.capacity;
        n.tick_ms = t.tick_ms;
        n.election_ticks = t.election_ticks;
        n.heartbeat_ticks = t.heartbeat_ticks;
        n.state = StateConfig {
            lease_ms: t.lease_ms,
            ..StateConfig::default()
        };
        n.renew_every_ms = t.renew_every_ms;
        n.skew_margin_ms = t.skew_margin_ms;
        n.node_heartbeat_ms = t.node_heartbeat_ms;
        n.node_ttl_ms = t.node_ttl_ms;
        n.proposal_timeout_ms = t.proposal_timeout_ms;
        n.compact_after_entries = t.compact_after_entries;
        n.max_pending_proposals = t.max_pending_proposals;
        n
    }
}

/// Handle to this process's cluster member.
#[derive(Clone)]
pub struct ClusterHandle {
    inner: ServiceHandle,
    net: arbor_topology::transport::NetHandle,
    node_id: u64,
    cluster_id: String,
    fault_injection: bool,
}

/// Status as served by `GET /cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub cluster_id: String,
    pub node: u64,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    /// HTTP address of the leader, if known and registered.
    pub leader_http: Option<String>,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: Vec<MemberReport>,
    pub rooms: usize,
}

/// One member in [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    pub id: u64,
    pub region: String,
    pub quic_addr: String,
    pub http_addr: String,
    pub voter: bool,
    /// Entries behind the leader (only known when asking the leader).
    pub lag: Option<u64>,
    pub last_heartbeat_ms: u64,
}

fn report(cluster_id: &str, st: ClusterStatus, nodes: Vec<NodeRecord>) -> StatusReport {
    let by_id: BTreeMap<u64, NodeRecord> = nodes.into_iter().map(|n| (n.id, n)).collect();
    let mut ids: BTreeSet<u64> = st
        .voters
        .iter()
        .chain(st.learners.iter())
        .copied()
        .collect();
    ids.extend(by_id.keys());
    let lag: BTreeMap<u64, u64> = st.progress.iter().map(|p| (p.id, p.lag)).collect();
    let members = ids
        .into_iter()
        .map(|id| {
            let n = by_id.get(&id);
            MemberReport {
                id,
                region: n.map(|n| n.region.clone()).unwrap_or_default(),
                quic_addr: n.map(|n| n.quic_addr.clone()).unwrap_or_default(),
                http_addr: n.map(|n| n.http_addr.clone()).unwrap_or_default(),
                voter: st.voters.contains(&id),
                lag: lag.get(&id).copied(),
                last_heartbeat_ms: n.map_or(0, |n| n.last_heartbeat_ms),
            }
        })
        .collect();
    StatusReport {
        cluster_id: cluster_id.to_string(),
        node: st.node,
        role: st.role,
        term: st.term,
        leader: st.leader,
        leader_http: st
            .leader
            .and_then(|l| by_id.get(&l))
            .map(|n| n.http_addr.clone()),
        commit: st.commit,
        applied: st.applied,
        voters: st.voters,
        learners: st.learners,
        members,
        rooms: st.rooms,
    }
}

impl ClusterHandle {
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The node-pair QUIC connections (for the relay fabric).
    pub fn net(&self) -> arbor_topology::transport::NetHandle {
        self.net.clone()
    }

    /// Creates `name` with this node as origin (idempotent).
    #[allow(dead_code)] // the SFU server's room service calls this
    pub async fn create_room(&self, name: &str) -> Result<RoomEntry, ServiceError> {
        self.create_room_with(name, None).await.map(|(r, _)| r)
    }

    /// Creates `name` with the given config; `bool` = newly created.
    pub async fn create_room_with(
        &self,
        name: &str,
        config: Option<RoomConfig>,
    ) -> Result<(RoomEntry, bool), ServiceError> {
        self.inner.create_room(name, self.node_id, config).await
    }

    pub async fn list_rooms(&self) -> Result<Vec<RoomEntry>, ServiceError> {
        self.inner.rooms().await
    }

    pub async fn status(&self) -> Result<StatusReport, ServiceError> {
        let (st, nodes) = self.inner.status().await?;
        Ok(report(&self.cluster_id, st, nodes))
    }

    /// The underlying service (membership changes, raw proposals).
    #[allow(dead_code)] // for the SFU server (publications, leases)
    pub fn service(&self) -> &ServiceHandle {
        &self.inner
    }
}

/// Starts this process's cluster member: opens (or creates) `data_dir/raft.redb`, binds QUIC,
/// and spawns the Raft service. A damaged log file is an error naming the file — never reset.
pub async fn start(cfg: ClusterConfig) -> anyhow::Result<ClusterHandle> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let db_path = cfg.data_dir.join("raft.redb");
    let backend = RedbBackend::open(&db_path, true)?;
    let store = RaftStore::open(backend)?;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let tls = NodeTls {
        ca_cert_pem: read(&cfg.ca_cert)?,
        node: PemPair {
            cert_pem: read(&cfg.node_cert)?,
            key_pem: read(&cfg.node_key)?,
        },
    };
    let voters: Option<Vec<u64>> = cfg.bootstrap.then(|| {
        let mut v: Vec<u64> = cfg.peers.iter().map(|p| p.id).collect();
        v.push(cfg.node_id);
        v.sort_unstable();
        v.dedup();
        v
    });
    let seed = service::wall_ms() ^ cfg.node_id.rotate_left(32) ^ std::process::id() as u64;
    let node = MembershipNode::new(
        cfg.node_config(),
        store,
        voters.as_deref(),
        seed,
        service::wall_ms(),
    )?;
    if !(200..=60_000).contains(&cfg.link_idle_timeout_ms) {
        bail!(
            "link_idle_timeout_ms = {} is out of range (200..=60000)",
            cfg.link_idle_timeout_ms
        );
    }
    let mut tcfg = TransportConfig::new(cfg.node_id, cfg.cluster_id.clone(), cfg.quic_listen, tls);
    tcfg.idle_timeout_ms = cfg.link_idle_timeout_ms;
    let transport = Transport::bind(tcfg)?;
    let net = transport.net();
    let peers = cfg.peers.iter().map(|p| (p.id, p.quic_addr)).collect();
    let inner = service::spawn(
        node,
        transport,
        ServiceConfig {
            request_queue: cfg.raft.request_queue,
            peers,
        },
    );
    Ok(ClusterHandle {
        inner,
        net,
        node_id: cfg.node_id,
        cluster_id: cfg.cluster_id.clone(),
        fault_injection: cfg.fault_injection,
    })
}

// ----- admin API ------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
    /// Machine-readable kind: `no_quorum`, `timeout`, `rejected`, `not_leader`, ...
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    leader_http: Option<String>,
}

type ApiError = (StatusCode, Json<ErrorBody>);

fn api_error(e: ServiceError) -> ApiError {
    let (code, kind) = match &e {
        ServiceError::Propose(ProposeError::NoQuorum { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "no_quorum")
        }
        ServiceError::Propose(ProposeError::Timeout { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "timeout")
        }
        ServiceError::Propose(_) | ServiceError::Busy(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        ServiceError::Rejected(_) => (StatusCode::CONFLICT, "rejected"),
        ServiceError::Stopped(_) | ServiceError::Unexpected(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    };
    (
        code,
        Json(ErrorBody {
            error: e.to_string(),
            kind: kind.into(),
            leader_http: None,
        }),
    )
}

fn bad_request(msg: &str) -> ApiError {
    (
        StatusCode::BAD_REQUEST,
        Json(ErrorBody {
            error: msg.into(),
            kind: "bad_request".into(),
            leader_http: None,
        }),
    )
}

/// Body of `POST /cluster/rooms`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateRoomRequest {
    pub name: String,
    #[serde(default)]
    pub max_participants: u32,
    #[serde(default)]
    pub empty_timeout_s: u32,
    #[serde(default)]
    pub metadata: String,
}

/// Reply of `POST /cluster/rooms`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateRoomReply {
    pub room: RoomEntry,
    pub created: bool,
}

/// Body of `POST /cluster/members`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddMemberRequest {
    pub id: u64,
    pub quic_addr: SocketAddr,
    #[serde(default)]
    pub voter: bool,
}

/// Body of `POST /cluster/remove`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub node: u64,
}

/// Body of `POST /cluster/fault`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FaultRequest {
    /// Peers whose traffic is dropped in both directions (empty = heal).
    pub blocked: Vec<u64>,
}

/// The `/cluster/` admin API:
///
/// | method | path | body | reply |
/// |---|---|---|---|
/// | GET | `/cluster/status` | | [`StatusReport`] |
/// | GET | `/cluster/rooms` | | `[RoomEntry]` |
/// | POST | `/cluster/rooms` | [`CreateRoomRequest`] | [`CreateRoomReply`]; 503 `no_quorum` on a minority |
/// | POST | `/cluster/members` | [`AddMemberRequest`] | leader only (421 + `leader_http` otherwise) |
/// | POST | `/cluster/remove` | [`RemoveRequest`] | |
/// | POST | `/cluster/fault` | [`FaultRequest`] | only with `fault_injection = true` |
pub fn routes(handle: ClusterHandle) -> Router {
    Router::new()
        .route("/cluster/status", get(status_handler))
        .route(
            "/cluster/rooms",
            get(rooms_handler).post(create_room_handler),
        )
        .route("/cluster/members", post(add_member_handler))
        .route("/cluster/remove", post(remove_handler))
        .route("/cluster/fault", post(fault_handler))
        .with_state(handle)
}

async fn status_handler(State(h): State<ClusterHandle>) -> Result<Json<StatusReport>, ApiError> {
    h.status().await.map(Json).map_err(api_error)
}

async fn rooms_handler(State(h): State<ClusterHandle>) -> Result<Json<Vec<RoomEntry>>, ApiError> {
    h.list_rooms().await.map(Json).map_err(api_error)
}

async fn create_room_handler(
    State(h): State<ClusterHandle>,
    Json(req): Json<CreateRoomRequest>,
) -> Result<Json<CreateRoomReply>, ApiError> {
    if req.name.is_empty() || req.name.len() > 256 {
        return Err(bad_request("room name must be 1..=256 bytes"));
    }
    let config = RoomConfig {
        max_participants: req.max_participants,
        empty_timeout_s: req.empty_timeout_s,
        metadata: req.metadata,
    };
    let (room, created) = h
        .create_room_with(&req.name, Some(config))
        .await
        .map_err(api_error)?;
    Ok(Json(CreateRoomReply { room, created }))
}

async fn add_member_handler(
    State(h): State<ClusterHandle>,
    Json(req): Json<AddMemberRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let st = h.status().await.map_err(api_error)?;
    if st.leader != Some(h.node_id) {
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            Json(ErrorBody {
                error: format!(
                    "node {} is not the leader (leader: {:?})",
                    h.node_id, st.leader
                ),
                kind: "not_leader".into(),
                leader_http: st.leader_http,
            }),
        ));
    }
    h.inner
        .add_learner(req.id, req.quic_addr)
        .await
        .map_err(api_error)?;
    if req.voter {
        h.inner.add_voter(req.id).await.map_err(api_error)?;
    }
    Ok(Json(
        serde_json::json!({ "added": req.id, "voter": req.voter }),
    ))
}

async fn remove_handler(
    State(h): State<ClusterHandle>,
    Json(req): Json<RemoveRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    h.inner.remove_node(req.node).await.map_err(api_error)?;
    Ok(Json(serde_json::json!({ "removed": req.node })))
}

async fn fault_handler(
    State(h): State<ClusterHandle>,
    Json(req): Json<FaultRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !h.fault_injection {
        return Err((
            StatusCode::FORBIDDEN,
            Json(ErrorBody {
                error: "fault injection is disabled in this node's config".into(),
                kind: "forbidden".into(),
                leader_http: None,
            }),
        ));
    }
    let set = h
        .inner
        .set_blocked(req.blocked.into_iter().collect())
        .await
        .map_err(api_error)?;
    Ok(Json(serde_json::json!({ "blocked": set })))
}

/// Runs a cluster member with its admin API until Ctrl-C.
pub async fn run_node(config: &Path, http: Option<SocketAddr>) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(config)?;
    let listen = http.unwrap_or(cfg.http_addr);
    let handle = start(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding admin HTTP on {listen}"))?;
    tracing::info!(node = handle.node_id(), %listen, "cluster member running");
    axum::serve(listener, routes(handle))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

// ----- CLI ------------------------------------------------------------------------------

/// Minimal HTTP/1.1 JSON client for the admin API (loopback/LAN operator use).
async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_REPLY: u64 = 8 << 20;
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.take(MAX_REPLY).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP reply from {addr}"))?;
        let code: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("malformed HTTP status from {addr}"))?;
        let json = if body.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(body.trim())?
        };
        anyhow::Ok((code, json))
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .map_err(|_| anyhow!("{addr} did not answer within 30 s"))?
}

fn error_text(v: &serde_json::Value) -> String {
    v.get("error")
        .and_then(|e| e.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn parse_node_spec(s: &str) -> anyhow::Result<(u64, SocketAddr, SocketAddr)> {
    let (id, rest) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--node {s:?}: expected ID=QUIC_ADDR,HTTP_ADDR"))?;
    let (q, h) = rest
        .split_once(',')
        .ok_or_else(|| anyhow!("--node {s:?}: expected ID=QUIC_ADDR,HTTP_ADDR"))?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("--node {s:?}: bad id"))?;
    if id == 0 {
        bail!("--node {s:?}: node ids start at 1");
    }
    Ok((
        id,
        q.parse()
            .with_context(|| format!("--node {s:?}: bad QUIC address"))?,
        h.parse()
            .with_context(|| format!("--node {s:?}: bad HTTP address"))?,
    ))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {} (refusing to overwrite)", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Runs an operator command.
pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Init {
            out,
            cluster_id,
            nodes,
            data_root,
            region,
            fault_injection,
        } => {
            let specs = nodes
                .iter()
                .map(|s| parse_node_spec(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ids: BTreeSet<u64> = specs.iter().map(|s| s.0).collect();
            if ids.len() != specs.len() {
                bail!("duplicate node ids");
            }
            std::fs::create_dir_all(&out)?;
            let ca = generate_ca(&cluster_id)?;
            write_private(&out.join("ca.key"), &ca.key_pem)?;
            write_private(&out.join("ca.pem"), &ca.cert_pem)?;
            let data_root = data_root.unwrap_or_else(|| out.join("data"));
            for (id, quic, http) in &specs {
                let pair = issue_node_cert(&ca, *id)?;
                write_private(&out.join(format!("node-{id}.pem")), &pair.cert_pem)?;
                write_private(&out.join(format!("node-{id}.key")), &pair.key_pem)?;
                let cfg = ClusterConfig {
                    node_id: *id,
                    cluster_id: cluster_id.clone(),
                    region: region.clone(),
                    quic_listen: *quic,
                    http_addr: *http,
                    data_dir: data_root.join(format!("node-{id}")),
                    ca_cert: "ca.pem".into(),
                    node_cert: format!("node-{id}.pem").into(),
                    node_key: format!("node-{id}.key").into(),
                    bootstrap: true,
                    fault_injection,
                    capacity: default_capacity(),
                    peers: specs
                        .iter()
                        .filter(|s| s.0 != *id)
                        .map(|s| PeerConfig {
                            id: s.0,
                            quic_addr: s.1,
                        })
                        .collect(),
                    raft: RaftTuning::default(),
                    region_rtt: Vec::new(),
                    link_idle_timeout_ms: DEFAULT_LINK_IDLE_TIMEOUT_MS,
                };
                write_private(
                    &out.join(format!("node-{id}.toml")),
                    &toml::to_string_pretty(&cfg)?,
                )?;
            }
            println!(
                "cluster {cluster_id:?}: CA and {} node configs written to {}",
                specs.len(),
                out.display()
            );
            println!(
                "start each node with: arbor node --cluster-config {}/node-<ID>.toml",
                out.display()
            );
            Ok(())
        }
        ClusterCommand::Join {
            ca_dir,
            node_id,
            quic,
            http,
            seed,
            data_dir,
            out,
            voter,
            region,
            fault_injection,
        } => {
            if node_id == 0 {
                bail!("node ids start at 1");
            }
            let ca = PemPair {
                cert_pem: std::fs::read_to_string(ca_dir.join("ca.pem"))
                    .context("reading ca.pem")?,
                key_pem: std::fs::read_to_string(ca_dir.join("ca.key"))
                    .context("reading ca.key")?,
            };
            let (code, st) = http_json(seed, "GET", "/cluster/status", None).await?;
            if code != 200 {
                bail!("seed {seed}: {}", error_text(&st));
            }
            let st: StatusReport = serde_json::from_value(st)?;
            if st.members.iter().any(|m| m.id == node_id) {
                bail!("node id {node_id} is already a member");
            }
            let dir = out.parent().unwrap_or(Path::new(".")).to_path_buf();
            let pair = issue_node_cert(&ca, node_id)?;
            let cert = dir.join(format!("node-{node_id}.pem"));
            let key = dir.join(format!("node-{node_id}.key"));
            write_private(&cert, &pair.cert_pem)?;
            write_private(&key, &pair.key_pem)?;
            let peers = st
                .members
                .iter()
                .filter_map(|m| {
                    m.quic_addr.parse().ok().map(|a| PeerConfig {
                        id: m.id,
                        quic_addr: a,
                    })
                })
                .collect();
            let cfg = ClusterConfig {
                node_id,
                cluster_id: st.cluster_id.clone(),
                region,
                quic_listen: quic,
                http_addr: http,
                data_dir,
                ca_cert: std::fs::canonicalize(ca_dir.join("ca.pem"))?,
                node_cert: std::fs::canonicalize(&cert)?,
                node_key: std::fs::canonicalize(&key)?,
                bootstrap: false,
                fault_injection,
                capacity: default_capacity(),
                peers,
                raft: RaftTuning::default(),
                region_rtt: Vec::new(),
                link_idle_timeout_ms: DEFAULT_LINK_IDLE_TIMEOUT_MS,
            };
            write_private(&out, &toml::to_string_pretty(&cfg)?)?;
            println!("wrote {}", out.display());
            let body = serde_json::json!({ "id": node_id, "quic_addr": quic, "voter": voter });
            let mut target = seed;
            for _ in 0..2 {
                let (code, reply) =
                    http_json(target, "POST", "/cluster/members", Some(&body)).await?;
                if code == 200 {
                    println!(
                        "node {node_id} added as {}; start it with: arbor node --cluster-config {}",
                        if voter { "voter" } else { "learner" },
                        out.display()
                    );
                    return Ok(());
                }
                match reply
                    .get("leader_http")
                    .and_then(|l| l.as_str())
                    .and_then(|l| l.parse().ok())
                {
                    Some(l) if code == 421 => target = l,
                    _ => bail!("adding node {node_id} failed: {}", error_text(&reply)),
                }
            }
            bail!("could not reach the leader to add node {node_id}")
        }
        ClusterCommand::Status { http, json } => {
            let (code, v) = http_json(http, "GET", "/cluster/status", None).await?;
            if code != 200 {
                bail!("{http}: {}", error_text(&v));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut st: StatusReport = serde_json::from_value(v)?;
            // Lag is only known on the leader: ask it if we can.
            if st.leader != Some(st.node) {
                if let Some(l) = st
                    .leader_http
                    .as_ref()
                    .and_then(|l| l.parse::<SocketAddr>().ok())
                {
                    if let Ok((200, v)) = http_json(l, "GET", "/cluster/status", None).await {
                        if let Ok(ls) = serde_json::from_value::<StatusReport>(v) {
                            st.members = ls.members;
                        }
                    }
                }
            }
            match st.leader {
                Some(l) => println!(
                    "leader: node {l}   term: {}   commit: {}   rooms: {}",
                    st.term, st.commit, st.rooms
                ),
                None => println!(
                    "leader: NONE (node {} cannot see a leader; no quorum?)   term: {}",
                    st.node, st.term
                ),
            }
            println!(
                "{:<6} {:<8} {:<10} {:<22} {:<22} {:>6}",
                "id", "role", "region", "quic", "http", "lag"
            );
            for m in &st.members {
                let role = if Some(m.id) == st.leader {
                    "leader"
                } else if m.voter {
                    "voter"
                } else {
                    "learner"
                };
                let lag = m.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<6} {:<8} {:<10} {:<22} {:<22} {:>6}",
                    m.id, role, m.region, m.quic_addr, m.http_addr, lag
                );
            }
            Ok(())
        }
        ClusterCommand::Remove { node, http } => {
            let body = serde_json::json!({ "node": node });
            let (code, v) = http_json(http, "POST", "/cluster/remove", Some(&body)).await?;
            if code != 200 {
                bail!("removing node {node} failed: {}", error_text(&v));
            }
            println!("node {node} removed from the cluster");
            Ok(())
        }
    }
}
