//! Node-to-node QUIC transport (quinn + rustls, mutual TLS from the cluster CA).
//!
//! One QUIC connection per node *pair*: the node with the lower id dials, the higher id accepts,
//! and both send on it (each side opens its own unidirectional stream). The same connection is
//! meant to carry the media relay later, on further streams. Every stream starts with a
//! [`Hello`] frame; frames are length-delimited prost [`PeerFrame`]s (`u32` big-endian length).
//!
//! This is a thin I/O shell: it moves opaque envelopes. Raft's tolerance of loss is relied on —
//! outbound queues are bounded and drop when full, and a broken connection is redialled with
//! capped backoff.
//!
//! For fault-injection tests, [`Transport::set_blocked`] makes the transport drop everything to
//! and from the given peers (a partition without network namespaces).

pub mod service;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_proto::membership::{peer_frame, Hello, PeerFrame, RaftEnvelope};
use arbor_proto::relay::{
    check_link_len, decode_link_body, encode_link_frame, link_frame, LinkHello,
};
use prost::Message as _;
use tokio::sync::{mpsc, Notify};

use self::tls::{cert_names_node, node_server_name, NodeTls};

/// Errors of the transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind QUIC endpoint on {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("protocol error from peer: {0}")]
    Protocol(String),
}

/// Transport settings (all limits named here).
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub node_id: u64,
    /// Peers must present the same cluster id in their `Hello`.
    pub cluster_id: String,
    pub listen: SocketAddr,
    pub tls: NodeTls,
    /// Largest frame accepted or sent (snapshots travel as one frame).
    pub max_frame_bytes: usize,
    /// Outbound frames queued per peer before new ones are dropped.
    pub peer_queue: usize,
    /// Inbound envelopes queued for the driver before new ones are dropped.
    pub inbound_queue: usize,
    /// Cap of the exponential redial backoff.
    pub redial_max_ms: u64,
    /// QUIC idle timeout (a dead peer is noticed after this). Keep-alives go out every
    /// quarter of it, so a live peer never times out for lack of traffic.
    pub idle_timeout_ms: u64,
}

impl TransportConfig {
    pub fn new(node_id: u64, cluster_id: String, listen: SocketAddr, tls: NodeTls) -> Self {
        Self {
            node_id,
            cluster_id,
            listen,
            tls,
            max_frame_bytes: 64 << 20,
            peer_queue: 4_096,
            inbound_queue: 16_384,
            redial_max_ms: 2_000,
            idle_timeout_ms: 5_000,
        }
    }
}

struct Peer {
    addr: SocketAddr,
    tx: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    cfg: TransportConfig,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    peers: Mutex<BTreeMap<u64, Peer>>,
    conns: Mutex<BTreeMap<u64, quinn::Connection>>,
    conn_changed: Notify,
    blocked: Mutex<BTreeSet<u64>>,
    inbound: mpsc::Sender<RaftEnvelope>,
    dropped: std::sync::atomic::AtomicU64,
    /// Where accepted room-link streams go (set by [`Transport::net`] users).
    links: Mutex<Option<mpsc::Sender<InboundLink>>>,
}

/// A room-link stream a peer opened to us (see `arbor_proto::relay`): its verified sender, its
/// hello, and the stream halves.
pub struct InboundLink {
    pub peer: u64,
    pub hello: LinkHello,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// A cloneable handle to the node-pair QUIC connections for the relay fabric: media datagrams
/// and room-link streams share the connections Raft keeps up.
#[derive(Clone)]
pub struct NetHandle {
    shared: Arc<Shared>,
}

impl NetHandle {
    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.shared.cfg.node_id
    }

    /// The live connection to `peer`, if any.
    pub fn connection(&self, peer: u64) -> Option<quinn::Connection> {
        if lock(&self.shared.blocked).contains(&peer) {
            return None;
        }
        lock(&self.shared.conns)
            .get(&peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Every live connection, by peer id.
    pub fn connections(&self) -> Vec<(u64, quinn::Connection)> {
        let blocked = lock(&self.shared.blocked).clone();
        lock(&self.shared.conns)
            .iter()
            .filter(|(id, c)| c.close_reason().is_none() && !blocked.contains(id))
            .map(|(id, c)| (*id, c.clone()))
            .collect()
    }

    /// Opens a room link to `peer`: waits up to `wait` for the connection, opens a
    /// bidirectional stream and writes the hello.
    pub async fn open_link(
        &self,
        peer: u64,
        room: &str,
        wait: Duration,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        let deadline = tokio::time::Instant::now() + wait;
        let conn = loop {
            if let Some(c) = self.connection(peer) {
                break c;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TransportError::Protocol(format!(
                    "no connection to node {peer}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        let hello = encode_link_frame(link_frame::Kind::Hello(LinkHello {
            room: room.to_string(),
            node_id: self.shared.cfg.node_id,
            cluster_id: self.shared.cfg.cluster_id.clone(),
        }))
        .map_err(|e| TransportError::Protocol(e.to_string()))?;
        send.write_all(&hello)
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        Ok((send, recv))
    }

    /// Starts delivering room links peers open to us (replaces any previous receiver).
    pub fn accept_links(&self, capacity: usize) -> mpsc::Receiver<InboundLink> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        *lock(&self.shared.links) = Some(tx);
        rx
    }
}

/// Reads one length-delimited room-link frame (`None` at a clean end of stream).
pub async fn read_link_frame(
    recv: &mut quinn::RecvStream,
) -> Result<Option<link_frame::Kind>, TransportError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(TransportError::Protocol(e.to_string())),
    }
    let len = check_link_len(len).map_err(|e| TransportError::Protocol(e.to_string()))?;
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| TransportError::Protocol(e.to_string()))?;
    decode_link_body(&buf)
        .map(Some)
        .map_err(|e| TransportError::Protocol(e.to_string()))
}

/// A node's QUIC endpoint for cluster traffic.
pub struct Transport {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<RaftEnvelope>,
    accept_task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections cannot leave the maps
    // inconsistent (single insert/remove), so recover from poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode_frame(frame: &PeerFrame) -> Vec<u8> {
    let body = frame.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

async fn read_frame(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<PeerFrame>, TransportError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(TransportError::Protocol(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(TransportError::FrameTooLarge { len, limit });
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| TransportError::Protocol(e.to_string()))?;
    PeerFrame::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| TransportError::Protocol(e.to_string()))
}

impl Transport {
    /// Binds the endpoint and starts accepting peers.
    pub fn bind(cfg: TransportConfig) -> Result<Self, TransportError> {
        let server_tls = cfg.tls.server_config()?;
        let client_tls = cfg.tls.client_config()?;
        let qs = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms))
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        transport.max_idle_timeout(Some(idle));
        transport.keep_alive_interval(Some(Duration::from_millis(
            (cfg.idle_timeout_ms / 4).max(1),
        )));
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(qs));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(qc));
        client.transport_config(transport);
        let endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|e| TransportError::Bind {
                addr: cfg.listen,
                detail: e.to_string(),
            })?;
        let (tx, rx) = mpsc::channel(cfg.inbound_queue);
        let shared = Arc::new(Shared {
            cfg,
            endpoint,
            client,
            peers: Mutex::new(BTreeMap::new()),
            conns: Mutex::new(BTreeMap::new()),
            conn_changed: Notify::new(),
            blocked: Mutex::new(BTreeSet::new()),
            inbound: tx,
            dropped: std::sync::atomic::AtomicU64::new(0),
            links: Mutex::new(None),
        });
        let s = shared.clone();
        let accept_task = tokio::spawn(async move { accept_loop(s).await });
        Ok(Self {
            shared,
            inbound: rx,
            accept_task,
        })
    }

    /// A handle for the relay fabric (connections, room links).
    pub fn net(&self) -> NetHandle {
        NetHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.endpoint.local_addr().ok()
    }

    /// Adds or updates a peer's address (starts its sender task).
    pub fn set_peer(&self, id: u64, addr: SocketAddr) {
        if id == self.shared.cfg.node_id {
            return;
        }
        let mut peers = lock(&self.shared.peers);
        if let Some(p) = peers.get(&id) {
            if p.addr == addr {
                return;
            }
            p.task.abort();
        }
        let (tx, rx) = mpsc::channel(self.shared.cfg.peer_queue);
        let s = self.shared.clone();
        let task = tokio::spawn(async move { sender_loop(s, id, addr, rx).await });
        peers.insert(id, Peer { addr, tx, task });
    }

    /// Forgets a peer (e.g. removed from the cluster).
    pub fn remove_peer(&self, id: u64) {
        if let Some(p) = lock(&self.shared.peers).remove(&id) {
            p.task.abort();
        }
        if let Some(c) = lock(&self.shared.conns).remove(&id) {
            c.close(0u32.into(), b"removed");
        }
    }

    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        lock(&self.shared.peers)
            .iter()
            .map(|(id, p)| (*id, p.addr))
            .collect()
    }

    /// Queues an envelope for `env.to`. Never blocks; drops (and counts) when the peer is
    /// unknown, blocked, or its queue is full.
    pub fn send(&self, env: RaftEnvelope) {
        let to = env.to;
        if lock(&self.shared.blocked).contains(&to) {
            return;
        }
        let frame = encode_frame(&PeerFrame {
            kind: Some(peer_frame::Kind::Raft(env)),
        });
        if frame.len() > self.shared.cfg.max_frame_bytes {
            self.shared
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let peers = lock(&self.shared.peers);
        match peers.get(&to) {
            Some(p) if p.tx.try_send(frame).is_ok() => {}
            _ => {
                self.shared
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Next envelope received from a peer.
    pub async fn recv(&mut self) -> Option<RaftEnvelope> {
        self.inbound.recv().await
    }

    /// Fault injection: drop all traffic to and from these peers.
    pub fn set_blocked(&self, peers: BTreeSet<u64>) {
        *lock(&self.shared.blocked) = peers;
    }
    pub fn blocked(&self) -> BTreeSet<u64> {
        lock(&self.shared.blocked).clone()
    }
    /// Envelopes dropped on send (unknown/full/too large).
    pub fn dropped(&self) -> u64 {
        self.shared
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.accept_task.abort();
        for p in lock(&self.shared.peers).values() {
            p.task.abort();
        }
        self.shared.endpoint.close(0u32.into(), b"shutdown");
    }
}

async fn accept_loop(s: Arc<Shared>) {
    while let Some(incoming) = s.endpoint.accept().await {
        let s = s.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("cluster handshake failed: {e}");
                    return;
                }
            };
            // The first stream's Hello tells us who dialled; the certificate must agree.
            let cert = conn
                .peer_identity()
                .and_then(|any| {
                    any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|v| v.first().cloned());
            let Some(cert) = cert else {
                conn.close(1u32.into(), b"no client certificate");
                return;
            };
            read_connection(s, conn, None, Some(cert)).await;
        });
    }
}

/// Reads every unidirectional stream the peer opens on `conn`. `expect` is the peer id when we
/// dialled; `client_cert` is set when we accepted (then the Hello's id is checked against it and
/// the connection is registered as the one to that peer).
async fn read_connection(
    s: Arc<Shared>,
    conn: quinn::Connection,
    expect: Option<u64>,
    client_cert: Option<rustls::pki_types::CertificateDer<'static>>,
) {
    tokio::spawn(accept_links(
        s.clone(),
        conn.clone(),
        expect,
        client_cert.clone(),
    ));
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(r) => r,
            Err(_) => return,
        };
        let s = s.clone();
        let conn2 = conn.clone();
        let cert = client_cert.clone();
        tokio::spawn(async move {
            let limit = s.cfg.max_frame_bytes;
            let hello = match read_frame(&mut recv, limit).await {
                Ok(Some(PeerFrame {
                    kind: Some(peer_frame::Kind::Hello(h)),
                })) => h,
                _ => {
                    conn2.close(2u32.into(), b"expected hello");
                    return;
                }
            };
            if hello.cluster_id != s.cfg.cluster_id
                || expect.is_some_and(|e| e != hello.node_id)
                || cert
                    .as_ref()
                    .is_some_and(|c| !cert_names_node(c, hello.node_id))
            {
                tracing::warn!(
                    peer = hello.node_id,
                    "rejecting peer: wrong cluster id or certificate"
                );
                conn2.close(3u32.into(), b"identity mismatch");
                return;
            }
            let from = hello.node_id;
            if cert.is_some() {
                lock(&s.conns).insert(from, conn2.clone());
                s.conn_changed.notify_waiters();
            }
            loop {
                match read_frame(&mut recv, limit).await {
                    Ok(Some(PeerFrame {
                        kind: Some(peer_frame::Kind::Raft(env)),
                    })) => {
                        if env.from != from || lock(&s.blocked).contains(&from) {
                            continue;
                        }
                        let _ = s.inbound.try_send(env);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        });
    }
}

/// Accepts the room-link streams a peer opens on `conn`, checks each one's hello against the
/// connection's identity, and hands it to the fabric (dropped if nobody listens or the queue is
/// full: the opener sees the stream reset and retries).
async fn accept_links(
    s: Arc<Shared>,
    conn: quinn::Connection,
    expect: Option<u64>,
    client_cert: Option<rustls::pki_types::CertificateDer<'static>>,
) {
    loop {
        let Ok((send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let s = s.clone();
        let cert = client_cert.clone();
        tokio::spawn(async move {
            let hello = match tokio::time::timeout(
                Duration::from_secs(5),
                read_link_frame(&mut recv),
            )
            .await
            {
                Ok(Ok(Some(link_frame::Kind::Hello(h)))) => h,
                _ => {
                    tracing::debug!("room link without a hello; dropped");
                    return;
                }
            };
            let peer = hello.node_id;
            if hello.cluster_id != s.cfg.cluster_id
                || expect.is_some_and(|e| e != peer)
                || cert.as_ref().is_some_and(|c| !cert_names_node(c, peer))
                || (expect.is_none() && cert.is_none())
                || lock(&s.blocked).contains(&peer)
            {
                tracing::warn!(peer, "rejecting room link: identity mismatch");
                return;
            }
            let tx = lock(&s.links).clone();
            if let Some(tx) = tx {
                let _ = tx.try_send(InboundLink {
                    peer,
                    hello,
                    send,
                    recv,
                });
            }
        });
    }
}

async fn connection_to(
    s: &Arc<Shared>,
    peer: u64,
    addr: SocketAddr,
    backoff: &mut u64,
) -> Option<quinn::Connection> {
    if let Some(c) = lock(&s.conns).get(&peer) {
        if c.close_reason().is_none() {
            return Some(c.clone());
        }
    }
    if s.cfg.node_id < peer {
        let attempt = match s
            .endpoint
            .connect_with(s.client.clone(), addr, &node_server_name(peer))
        {
            Ok(connecting) => tokio::time::timeout(Duration::from_secs(3), connecting)
                .await
                .ok()
                .and_then(|r| r.ok()),
            Err(_) => None,
        };
        match attempt {
            Some(c) => {
                lock(&s.conns).insert(peer, c.clone());
                let s2 = s.clone();
                let c2 = c.clone();
                tokio::spawn(async move { read_connection(s2, c2, Some(peer), None).await });
                *backoff = 50;
                Some(c)
            }
            None => {
                tokio::time::sleep(Duration::from_millis(*backoff)).await;
                *backoff = (*backoff * 2).min(s.cfg.redial_max_ms);
                None
            }
        }
    } else {
        // The lower id dials us; wait for it.
        let _ = tokio::time::timeout(Duration::from_millis(200), s.conn_changed.notified()).await;
        None
    }
}

async fn sender_loop(s: Arc<Shared>, peer: u64, addr: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut backoff = 50;
    let hello = encode_frame(&PeerFrame {
        kind: Some(peer_frame::Kind::Hello(Hello {
            cluster_id: s.cfg.cluster_id.clone(),
            node_id: s.cfg.node_id,
        })),
    });
    loop {
        let Some(conn) = connection_to(&s, peer, addr, &mut backoff).await else {
            // While disconnected, discard what is queued: Raft will resend what still matters.
            while rx.try_recv().is_ok() {}
            continue;
        };
        let Ok(mut send) = conn.open_uni().await else {
            remove_if_same(&s, peer, &conn);
            continue;
        };
        if send.write_all(&hello).await.is_err() {
            remove_if_same(&s, peer, &conn);
            continue;
        }
        loop {
            // Watch the connection as well as the queue: when the peer dies (idle timeout),
            // the dialling side must redial at once even if it has nothing to send (two
            // followers exchange no Raft traffic, but the relay fabric needs their connection).
            let frame = tokio::select! {
                f = rx.recv() => f,
                _ = conn.closed() => {
                    remove_if_same(&s, peer, &conn);
                    break;
                }
            };
            let Some(frame) = frame else { return };
            if send.write_all(&frame).await.is_err() {
                remove_if_same(&s, peer, &conn);
                break;
            }
        }
    }
}

fn remove_if_same(s: &Arc<Shared>, peer: u64, conn: &quinn::Connection) {
    let mut conns = lock(&s.conns);
    if conns
        .get(&peer)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        conns.remove(&peer);
    }
}
