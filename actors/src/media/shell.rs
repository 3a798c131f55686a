//! The I/O shell around the media [`Engine`]s: one thread per media shard (`rtc.shards`),
//! each with its own engine, its own UDP socket (`udp_port + shard`, advertised in that
//! shard's ICE candidates), its command queue in and per-peer event queues out; one ICE-TCP
//! listener (RFC 4571 framing) for the node, which hands every connection to its shard.
//!
//! Rooms are placed on shards by [`shard`](super::shard) (a stable hash of the room name), so
//! every peer of a room is on one thread and forwarding takes no lock. [`MediaPlane`] is the
//! node's set of shards; [`MediaPlane::for_room`] gives the control plane a [`MediaHandle`]
//! bound to a room's shard.
//!
//! The shell owns no media logic. It reads the clock, reads sockets, and hands everything to
//! the engine; the engine's outputs come back through [`ShellOut`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::net::{Protocol, TcpType};
use str0m::Candidate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use super::batch_io::{self, FlushStats, RxBatch, TxBatch};
use super::engine::{stun_local_ufrag, Engine, EngineConfig, EngineLimits, Output};
use super::shard::{self, MAX_SHARDS};
use super::{Command, PeerEvent, PeerId, PeerRole, TrackKey};
use crate::error::MediaError;
use crate::metrics::{METRICS, SHARD_METRICS};

/// Largest datagram we read. WebRTC keeps packets under the path MTU; 2 KiB is ample.
const MAX_DATAGRAM: usize = batch_io::MAX_DATAGRAM;
/// Datagrams read per wake-up (one `recvmmsg`) before the loop looks at commands and timers
/// again.
const RECV_BATCH: usize = 64;
/// Datagrams queued for sending in one loop iteration before an early flush. A publisher
/// packet fans out to every subscriber, so one step can produce hundreds.
const SEND_BATCH: usize = 1024;
/// Outgoing frames queued per ICE-TCP connection before frames are dropped.
const TCP_WRITE_QUEUE: usize = 512;
/// Relay datagrams read from QUIC connections and queued for one shard's engine (all nodes)
/// before new ones are dropped (the hop's NACKs then repair them).
const RELAY_IN_QUEUE: usize = 8192;
/// ICE-TCP connections accepted and waiting to be taken over by their shard.
const TCP_HANDOFF_QUEUE: usize = 256;
/// How often a shard publishes its thread's CPU time (`arbor_media_shard_cpu_seconds_total`).
const CPU_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How long a new ICE-TCP connection may take to send its first frame (the STUN request
/// that names its shard).
const TCP_FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how the media plane listens.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    /// Local address for shard 0's UDP socket (e.g. `0.0.0.0:7882`); shard `i` binds port
    /// `port + i`.
    pub udp_bind: SocketAddr,
    /// Local address for the ICE-TCP listener, if enabled (e.g. `0.0.0.0:7881`).
    pub tcp_bind: Option<SocketAddr>,
    /// The address advertised in ICE candidates.
    pub node_ip: IpAddr,
    /// Maximum number of peer connections (two per participant), all shards together.
    pub max_peers: usize,
    /// Number of media shards (engine threads), 1..=[`MAX_SHARDS`].
    pub shards: usize,
    /// Capacity of each shard's control command queue.
    pub command_queue: usize,
    /// Data-path limits of the engine (retransmission history, lookup budget).
    pub limits: EngineLimits,
    /// Send with `sendmmsg` and UDP GSO (`rtc.batch_io`; off: one `sendto` per datagram and
    /// one `recvfrom` per datagram read, for comparison).
    pub batch_io: bool,
    /// Forward in str0m's RTP mode (see [`EngineConfig::rtp_mode`]).
    pub rtp_mode: bool,
}

/// The node's media plane: one command queue per shard. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MediaPlane {
    shards: Arc<[mpsc::Sender<Command>]>,
}

/// The control plane's handle to one room's media shard. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MediaHandle {
    tx: mpsc::Sender<Command>,
    tag: u16,
    shard: usize,
}

/// What one shard thread needs besides its engine.
struct ShardIo {
    shard: usize,
    udp: std::net::UdpSocket,
    /// The shard's UDP address as advertised (the `destination` of received datagrams).
    advertised: SocketAddr,
    /// The node's ICE-TCP listener (shard 0 runs it) and every shard's hand-off queue.
    tcp_listener: Option<(std::net::TcpListener, Vec<mpsc::Sender<TcpHandoff>>)>,
    tcp_local: Option<SocketAddr>,
    tcp_in: mpsc::Receiver<TcpHandoff>,
    /// Every shard's relay queue (shard 0 reads the QUIC connections and routes by flow).
    relay_route: Vec<mpsc::Sender<(u64, bytes::Bytes)>>,
    relay_rx: mpsc::Receiver<(u64, bytes::Bytes)>,
    cmd_rx: mpsc::Receiver<Command>,
}

/// A new ICE-TCP connection for a shard, with the first frame already read from it.
type TcpHandoff = (std::net::TcpStream, SocketAddr, Vec<u8>);

impl MediaPlane {
    /// Bind the sockets and start one media thread per shard.
    pub fn start(settings: MediaSettings) -> Result<MediaPlane, MediaError> {
        let n = settings.shards.clamp(1, MAX_SHARDS);
        let mut udps = Vec::with_capacity(n);
        for i in 0..n {
            let port = u16::try_from(usize::from(settings.udp_bind.port()) + i)
                .map_err(|_| MediaError::Io(std::io::Error::other("UDP port range past 65535")))?;
            // Port 0 (tests): every shard takes an ephemeral port of its own.
            let port = if settings.udp_bind.port() == 0 {
                0
            } else {
                port
            };
            let udp = std::net::UdpSocket::bind(SocketAddr::new(settings.udp_bind.ip(), port))?;
            udp.set_nonblocking(true)?;
            udps.push(udp);
        }
        let tcp = match settings.tcp_bind {
            Some(a) => {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let tcp_local = match &tcp {
            Some(l) => Some(SocketAddr::new(settings.node_ip, l.local_addr()?.port())),
            None => None,
        };
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let wall_anchor = (Instant::now(), wall);
        let node_peers = Arc::new(AtomicUsize::new(0));
        let (mut cmd_txs, mut tcp_txs, mut relay_txs) = (Vec::new(), Vec::new(), Vec::new());
        let mut rxs = Vec::new();
        for _ in 0..n {
            let (ctx, crx) = mpsc::channel(settings.command_queue.max(16));
            let (ttx, trx) = mpsc::channel(TCP_HANDOFF_QUEUE);
            let (rtx, rrx) = mpsc::channel(RELAY_IN_QUEUE);
            cmd_txs.push(ctx);
            tcp_txs.push(ttx);
            relay_txs.push(rtx);
            rxs.push((crx, trx, rrx));
        }
        let mut tcp = tcp.map(|l| (l, tcp_txs));
        SHARD_METRICS.set_shards(n);
        for (i, (udp, (cmd_rx, tcp_in, relay_rx))) in udps.into_iter().zip(rxs).enumerate() {
            let udp_local = SocketAddr::new(settings.node_ip, udp.local_addr()?.port());
            let mut candidates = vec![Candidate::host(udp_local, "udp")
                .map_err(|e| MediaError::Sdp(format!("bad node ip {}: {e}", settings.node_ip)))?];
            if let Some(a) = tcp_local {
                if let Ok(c) = Candidate::builder()
                    .tcp()
                    .host(a)
                    .tcptype(TcpType::Passive)
                    .build()
                {
                    candidates.push(c);
                }
            }
            let config = EngineConfig {
                candidates,
                udp_local,
                max_peers: settings.max_peers,
                wall_anchor,
                rtp_mode: settings.rtp_mode,
            };
            let io = ShardIo {
                shard: i,
                udp,
                advertised: udp_local,
                tcp_listener: if i == 0 { tcp.take() } else { None },
                tcp_local,
                tcp_in,
                relay_route: relay_txs.clone(),
                relay_rx,
                cmd_rx,
            };
            let (limits, batch) = (settings.limits, settings.batch_io);
            let engine = Engine::new(config)
                .with_limits(limits)
                .with_shard(i, node_peers.clone());
            std::thread::Builder::new()
                .name(if n == 1 {
                    "arbor-media".into()
                } else {
                    format!("arbor-media-{i}")
                })
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, shard = i, "media runtime failed to start");
                            return;
                        }
                    };
                    rt.block_on(run(engine, batch, io));
                })?;
        }
        Ok(MediaPlane {
            shards: cmd_txs.into(),
        })
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The handle of the shard that runs room `room`.
    pub fn for_room(&self, room: &str) -> MediaHandle {
        let tag = shard::room_tag(room);
        let i = shard::shard_of_tag(tag, self.shards.len());
        MediaHandle {
            tx: self.shards[i].clone(),
            tag,
            shard: i,
        }
    }

    /// Hand the QUIC connection to relay node `node` (new or replaced) to every shard: each
    /// sends its rooms' relay datagrams on it; shard 0 reads it and routes each datagram to
    /// its room's shard by flow id.
    pub fn relay_connection(&self, node: u64, conn: &quinn::Connection) -> Result<(), MediaError> {
        for tx in self.shards.iter() {
            send(
                tx,
                Command::RelayConnection {
                    node,
                    conn: conn.clone(),
                },
            )?;
        }
        Ok(())
    }
}

fn send(tx: &mpsc::Sender<Command>, cmd: Command) -> Result<(), MediaError> {
    tx.try_send(cmd).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => MediaError::Overloaded,
        mpsc::error::TrySendError::Closed(_) => MediaError::EngineGone,
    })
}

impl MediaHandle {
    /// The tag of this handle's room ([`shard::room_tag`]): new track keys carry it.
    pub fn room_tag(&self) -> u16 {
        self.tag
    }

    /// The shard this handle's room runs on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Queue a command without waiting. Fails when the engine is gone or overloaded.
    pub fn send(&self, cmd: Command) -> Result<(), MediaError> {
        send(&self.tx, cmd)
    }

    /// Create a peer connection; its events arrive on `events`.
    pub async fn add_peer(
        &self,
        peer: PeerId,
        role: PeerRole,
        events: mpsc::Sender<PeerEvent>,
    ) -> Result<(), MediaError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::AddPeer {
            peer,
            role,
            events,
            reply,
        })?;
        rx.await.map_err(|_| MediaError::EngineGone)?
    }

    /// Apply a publisher offer; returns the answer SDP.
    pub async fn publisher_offer(
        &self,
        peer: PeerId,
        sdp: String,
        bind: Vec<(String, TrackKey)>,
        unbind: Vec<TrackKey>,
    ) -> Result<String, MediaError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PublisherOffer {
            peer,
            sdp,
            bind,
            unbind,
            reply,
        })?;
        rx.await.map_err(|_| MediaError::EngineGone)?
    }

    /// Apply a subscriber answer.
    pub async fn subscriber_answer(&self, peer: PeerId, sdp: String) -> Result<(), MediaError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SubscriberAnswer { peer, sdp, reply })?;
        rx.await.map_err(|_| MediaError::EngineGone)?
    }
}

/// Engine outputs, carried to sockets and event queues.
///
/// UDP datagrams are not sent here: they are queued in the loop's [`TxBatch`] and sent
/// together when the loop iteration ends ([`flush`]), or earlier if the batch fills.
struct ShellOut<'a> {
    udp: &'a UdpSocket,
    tx: &'a mut TxBatch,
    tcp_conns: &'a HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    sinks: &'a mut HashMap<PeerId, mpsc::Sender<PeerEvent>>,
    relays: &'a HashMap<u64, quinn::Connection>,
}

/// Send what `tx` holds and count it.
fn flush(udp: &UdpSocket, tx: &mut TxBatch) {
    if tx.is_empty() {
        return;
    }
    let FlushStats {
        sent,
        bytes,
        dropped,
        syscalls,
        gso_messages,
    } = tx.flush(udp);
    METRICS.add_sent_batch(sent, bytes, syscalls, gso_messages);
    for _ in 0..dropped {
        METRICS.inc_dropped_packets();
    }
}

impl Output for ShellOut<'_> {
    fn transmit(
        &mut self,
        proto: Protocol,
        _source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) {
        match proto {
            Protocol::Udp => {
                if self.tx.is_full() {
                    flush(self.udp, self.tx);
                }
                if !self.tx.push(destination, contents) {
                    METRICS.inc_dropped_packets();
                }
            }
            Protocol::Tcp => {
                let Some(tx) = self.tcp_conns.get(&destination) else {
                    METRICS.inc_dropped_packets();
                    return;
                };
                let Ok(len) = u16::try_from(contents.len()) else {
                    METRICS.inc_dropped_packets();
                    return;
                };
                let mut framed = Vec::with_capacity(contents.len() + 2);
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(contents);
                if tx.try_send(framed).is_err() {
                    METRICS.inc_dropped_packets();
                } else {
                    METRICS.add_sent(contents.len());
                }
            }
            _ => METRICS.inc_dropped_packets(),
        }
    }

    fn event(&mut self, peer: PeerId, event: PeerEvent) {
        let closed = matches!(event, PeerEvent::Closed);
        if let Some(tx) = self.sinks.get(&peer) {
            match tx.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(PeerEvent::Data { .. })) => {
                    METRICS.inc_dropped_data();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The owner already ended (normal at session end).
                    tracing::debug!(%peer, "peer event after its session ended; dropped");
                }
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    tracing::warn!(%peer, event = ?ev, "peer event queue full; event lost");
                }
            }
        }
        if closed {
            self.sinks.remove(&peer);
        }
    }

    fn relay(&mut self, node: u64, datagram: &[u8]) {
        use super::relay::RELAY_METRICS;
        let sent = self.relays.get(&node).is_some_and(|c| {
            c.send_datagram(bytes::Bytes::copy_from_slice(datagram))
                .is_ok()
        });
        if !sent {
            RELAY_METRICS
                .datagrams_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn relay_max(&self, node: u64) -> usize {
        self.relays
            .get(&node)
            .and_then(|c| c.max_datagram_size())
            .unwrap_or(0)
    }
}

/// Reads one relay connection's datagrams until it closes, into the queue of the shard that
/// runs each datagram's room (from the flow id, [`shard::shard_of_datagram`]).
async fn read_relay(
    node: u64,
    conn: quinn::Connection,
    route: Vec<mpsc::Sender<(u64, bytes::Bytes)>>,
) {
    while let Ok(d) = conn.read_datagram().await {
        let i = shard::shard_of_datagram(&d, route.len());
        if route
            .get(i)
            .is_none_or(|tx| tx.try_send((node, d)).is_err())
        {
            super::relay::RELAY_METRICS
                .datagrams_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

enum TcpIn {
    Frame(SocketAddr, Vec<u8>),
    Open(SocketAddr, mpsc::Sender<Vec<u8>>),
    Closed(SocketAddr),
}

/// One media shard's loop: wait for a command, datagrams, relay datagrams, ICE-TCP frames or
/// the engine's next deadline; hand them to the engine; then send everything the engine
/// produced in this iteration with one flush of the [`TxBatch`].
async fn run(mut engine: Engine, batch: bool, io: ShardIo) {
    let ShardIo {
        shard,
        udp,
        advertised: engine_udp_local,
        tcp_listener,
        tcp_local,
        mut tcp_in,
        relay_route,
        mut relay_rx,
        cmd_rx: mut rx,
    } = io;
    let udp = match UdpSocket::from_std(udp) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, shard, "media UDP socket unusable");
            return;
        }
    };
    let udp_local = udp.local_addr().ok();
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<TcpIn>(4096);
    if let Some((l, handoff)) = tcp_listener {
        match TcpListener::from_std(l) {
            Ok(l) => {
                tokio::spawn(accept_tcp(l, handoff));
            }
            Err(e) => tracing::error!(error = %e, "ICE-TCP listener unusable"),
        }
    }
    let stats = SHARD_METRICS.shard(shard);
    let mut next_cpu_sample = Instant::now();
    let mut sinks: HashMap<PeerId, mpsc::Sender<PeerEvent>> = HashMap::new();
    let mut tcp_conns: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    // Batched I/O: with `batch` off, one datagram per send and per read (the old behaviour,
    // kept for comparison).
    let gso = batch && batch_io::gso_supported(&udp);
    let mut txb = TxBatch::new(if batch { SEND_BATCH } else { 1 }, gso);
    let mut rxb = RxBatch::new(if batch { RECV_BATCH } else { 1 });
    let mut relays: HashMap<u64, quinn::Connection> = HashMap::new();
    let mut relay_tasks: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    tracing::info!(shard, udp = ?udp_local, advertised = %engine_udp_local, tcp = ?tcp_local, batch, gso, "media engine running");

    loop {
        let deadline = engine.poll_timeout(Instant::now());
        tokio::select! {
            biased;
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let mut next = Some(cmd);
                let mut n = 0;
                while let Some(cmd) = next.take() {
                    if let Command::AddPeer { peer, events, .. } = &cmd {
                        sinks.insert(*peer, events.clone());
                    }
                    if let Command::RelayConnection { node, conn } = &cmd {
                        let same = relays.get(node).is_some_and(|c| c.stable_id() == conn.stable_id());
                        if !same {
                            relays.insert(*node, conn.clone());
                            // Shard 0 reads every connection for all shards.
                            if shard == 0 {
                                if let Some(t) = relay_tasks.insert(*node, tokio::spawn(read_relay(*node, conn.clone(), relay_route.clone()))) {
                                    t.abort();
                                }
                            }
                        }
                    }
                    let mut out = ShellOut { udp: &udp, tx: &mut txb, tcp_conns: &tcp_conns, sinks: &mut sinks, relays: &relays };
                    engine.handle_command(Instant::now(), cmd, &mut out);
                    n += 1;
                    if n < RECV_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                stats.set_peers(engine.peer_count());
            }
            r = udp.readable() => {
                if r.is_ok() {
                    // One recvmmsg; WouldBlock clears tokio's readiness for the next wait.
                    match udp.try_io(tokio::io::Interest::READABLE, || rxb.recv(&udp)) {
                        Ok(n) => {
                            let now = Instant::now();
                            let mut out = ShellOut { udp: &udp, tx: &mut txb, tcp_conns: &tcp_conns, sinks: &mut sinks, relays: &relays };
                            for i in 0..n {
                                if let Some((d, source)) = rxb.get(i) {
                                    engine.handle_datagram(now, Protocol::Udp, source, engine_udp_local, d, &mut out);
                                }
                            }
                            stats.add_datagrams(n);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            // ICMP errors (port unreachable) surface here on Linux; harmless.
                            tracing::trace!(error = %e, "udp recv error");
                        }
                    }
                }
            }
            d = relay_rx.recv() => {
                let mut next = d;
                let mut n = 0;
                while let Some((node, d)) = next.take() {
                    let mut out = ShellOut { udp: &udp, tx: &mut txb, tcp_conns: &tcp_conns, sinks: &mut sinks, relays: &relays };
                    engine.handle_relay_datagram(Instant::now(), node, &d, &mut out);
                    n += 1;
                    if n < RECV_BATCH {
                        next = relay_rx.try_recv().ok();
                    }
                }
            }
            h = tcp_in.recv() => {
                // A new ICE-TCP connection for this shard, from the node's listener.
                if let Some((stream, addr, first)) = h {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => {
                            tokio::spawn(tcp_conn(stream, addr, first, tcp_tx.clone()));
                        }
                        Err(e) => tracing::debug!(error = %e, %addr, "ICE-TCP hand-off failed"),
                    }
                }
            }
            t = tcp_rx.recv() => {
                match t {
                    Some(TcpIn::Frame(source, data)) => {
                        if let Some(local) = tcp_local {
                            let mut out = ShellOut { udp: &udp, tx: &mut txb, tcp_conns: &tcp_conns, sinks: &mut sinks, relays: &relays };
                            engine.handle_datagram(Instant::now(), Protocol::Tcp, source, local, &data, &mut out);
                        }
                    }
                    Some(TcpIn::Open(addr, tx)) => { tcp_conns.insert(addr, tx); }
                    Some(TcpIn::Closed(addr)) => { tcp_conns.remove(&addr); }
                    None => {}
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        let now = Instant::now();
        if engine.poll_timeout(now) <= now {
            let mut out = ShellOut {
                udp: &udp,
                tx: &mut txb,
                tcp_conns: &tcp_conns,
                sinks: &mut sinks,
                relays: &relays,
            };
            engine.handle_timeout(now, &mut out);
            stats.set_peers(engine.peer_count());
        }
        flush(&udp, &mut txb);
        if now >= next_cpu_sample {
            next_cpu_sample = now + CPU_SAMPLE_EVERY;
            if let Some(cpu) = thread_cpu_time() {
                stats.set_cpu(cpu);
            }
        }
    }
    tracing::info!(shard, "media engine stopped");
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (r == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The node's ICE-TCP listener: reads each new connection's first frame (the client's STUN
/// binding request, whose USERNAME starts with our ufrag, and so with the shard's number) and
/// hands the connection to that shard. A first frame that names no shard of this node closes
/// the connection (with one shard everything goes to shard 0, as before sharding).
async fn accept_tcp(listener: TcpListener, handoff: Vec<mpsc::Sender<TcpHandoff>>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handoff_tcp(stream, addr, handoff.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "ICE-TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Read one RFC 4571 frame (16-bit big-endian length, then the packet).
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.ok()?;
    let n = u16::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_DATAGRAM {
        return None;
    }
    let mut data = vec![0u8; n];
    r.read_exact(&mut data).await.ok()?;
    Some(data)
}

async fn handoff_tcp(
    mut stream: TcpStream,
    addr: SocketAddr,
    handoff: Vec<mpsc::Sender<TcpHandoff>>,
) {
    let first = match tokio::time::timeout(TCP_FIRST_FRAME_TIMEOUT, read_frame(&mut stream)).await {
        Ok(Some(f)) => f,
        _ => {
            tracing::debug!(%addr, "ICE-TCP connection sent no valid first frame; closing");
            return;
        }
    };
    let i = if handoff.len() == 1 {
        Some(0)
    } else {
        stun_local_ufrag(&first).and_then(|u| shard::shard_of_ufrag(u, handoff.len()))
    };
    let Some(i) = i else {
        tracing::debug!(%addr, "ICE-TCP first frame names no shard of this node; closing");
        return;
    };
    let Ok(stream) = stream.into_std() else {
        return;
    };
    if handoff[i].try_send((stream, addr, first)).is_err() {
        tracing::warn!(%addr, shard = i, "ICE-TCP hand-off queue full; connection closed");
    }
}
/// One ICE-TCP connection: RFC 4571 frames (16-bit big-endian length, then the packet).
async fn tcp_conn(stream: TcpStream, addr: SocketAddr, first: Vec<u8>, tx: mpsc::Sender<TcpIn>) {
    let (mut r, mut w) = stream.into_split();
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
    if tx.send(TcpIn::Open(addr, wtx)).await.is_err() {
        return;
    }
    if tx.send(TcpIn::Frame(addr, first)).await.is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(frame) = wrx.recv().await {
            if w.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    // Until the peer closes or sends a bad frame length.
    while let Some(data) = read_frame(&mut r).await {
        if tx.send(TcpIn::Frame(addr, data)).await.is_err() {
            break;
        }
    }
    writer.abort();
    let _ = tx.send(TcpIn::Closed(addr)).await;
}

#[cfg(test)]
mod tests {
    //! The shell's routing with real threads and sockets on loopback: room commands reach the
    //! room's shard (its peers advertise that shard's UDP port and ufrag prefix), and the one
    //! ICE-TCP listener hands each connection to the shard its first STUN request names.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A STUN binding request in RFC 4571 framing (ICE-TCP).
    fn stun_frame(username: &str) -> Vec<u8> {
        let d = crate::media::engine::lookup_tests::stun_request(username.as_bytes());
        let mut f = (d.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(&d);
        f
    }

    #[tokio::test]
    async fn ice_tcp_connections_are_handed_to_the_shard_their_ufrag_names() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let (mut txs, mut rxs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (tx, rx) = mpsc::channel::<TcpHandoff>(4);
            txs.push(tx);
            rxs.push(rx);
        }
        tokio::spawn(accept_tcp(TcpListener::from_std(l).unwrap(), txs));
        for (shard, ufrag) in [(2usize, "02Abc"), (0, "00xyz"), (1, "01q")] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let frame = stun_frame(&format!("{ufrag}:client"));
            c.write_all(&frame).await.unwrap();
            let (s, from, first) = tokio::time::timeout(Duration::from_secs(5), rxs[shard].recv())
                .await
                .expect("handed over in time")
                .unwrap();
            assert_eq!(first, frame[2..]);
            assert_eq!(from, c.local_addr().unwrap());
            // The stream itself moved: what the client sends next is readable there.
            c.write_all(b"more").await.unwrap();
            let mut s = TcpStream::from_std(s).unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"more");
            for (i, rx) in rxs.iter_mut().enumerate() {
                assert!(i == shard || rx.try_recv().is_err(), "also on shard {i}");
            }
        }
        // A ufrag naming no shard of this node, and a frame that is not STUN: closed.
        for frame in [stun_frame("07abc:client"), vec![0, 3, 1, 2, 3]] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&frame).await.unwrap();
            let mut buf = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .expect("closed in time")
                .unwrap_or(0);
            assert_eq!(n, 0, "the connection is closed");
            for rx in &mut rxs {
                assert!(rx.try_recv().is_err());
            }
        }
    }

    fn sdp_value<'a>(sdp: &'a str, prefix: &str) -> Vec<&'a str> {
        sdp.lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .collect()
    }

    #[tokio::test]
    async fn room_commands_run_on_the_rooms_shard() {
        crate::media::init_crypto();
        let plane = MediaPlane::start(MediaSettings {
            udp_bind: "127.0.0.1:0".parse().unwrap(),
            tcp_bind: None,
            node_ip: "127.0.0.1".parse().unwrap(),
            max_peers: 16,
            shards: 2,
            command_queue: 64,
            limits: EngineLimits::default(),
            batch_io: true,
            rtp_mode: true,
        })
        .unwrap();
        assert_eq!(plane.shards(), 2);
        // "room-b" and "room-a" hash to shards 0 and 1 (see `shard::tests`).
        let mut ports = Vec::new();
        for (room, want) in [("room-b", 0usize), ("room-a", 1)] {
            let h = plane.for_room(room);
            assert_eq!(h.shard(), want);
            assert_eq!(h.room_tag(), shard::room_tag(room));
            let (events, mut rx) = mpsc::channel(16);
            let peer = PeerId(100 + want as u64);
            h.add_peer(peer, PeerRole::Subscriber, events)
                .await
                .unwrap();
            let sdp = loop {
                match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                    Ok(Some(PeerEvent::Offer { sdp, .. })) => break sdp,
                    Ok(Some(_)) => continue,
                    other => panic!("no offer: {other:?}"),
                }
            };
            let ufrag = sdp_value(&sdp, "a=ice-ufrag:")[0];
            assert_eq!(shard::shard_of_ufrag(ufrag, 2), Some(want), "{ufrag}");
            let cand = sdp_value(&sdp, "a=candidate:")[0].to_string();
            ports.push(cand);
            h.send(Command::RemovePeer { peer }).unwrap();
        }
        // Each shard advertises its own UDP socket.
        let port = |c: &str| c.split_whitespace().nth(5).unwrap().to_string();
        assert_ne!(port(&ports[0]), port(&ports[1]), "{ports:?}");
    }
}
