//! The I/O shell around the media [`Engine`]: one thread, one UDP socket for every peer, an
//! ICE-TCP listener (RFC 4571 framing), the command queue in and per-peer event queues out.
//!
//! The shell owns no media logic. It reads the clock, reads sockets, and hands everything to
//! the engine; the engine's outputs come back through [`ShellOut`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use str0m::net::{Protocol, TcpType};
use str0m::Candidate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use super::batch_io::{self, FlushStats, RxBatch, TxBatch};
use super::engine::{Engine, EngineConfig, EngineLimits, Output};
use super::{Command, PeerEvent, PeerId, PeerRole, TrackKey};
use crate::error::MediaError;
use crate::metrics::METRICS;

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
/// Relay datagrams read from QUIC connections and queued for the engine (all nodes) before
/// new ones are dropped (the hop's NACKs then repair them).
const RELAY_IN_QUEUE: usize = 8192;

/// Where and how the media plane listens.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    /// Local address for the UDP socket (e.g. `0.0.0.0:7882`).
    pub udp_bind: SocketAddr,
    /// Local address for the ICE-TCP listener, if enabled (e.g. `0.0.0.0:7881`).
    pub tcp_bind: Option<SocketAddr>,
    /// The address advertised in ICE candidates.
    pub node_ip: IpAddr,
    /// Maximum number of peer connections (two per participant).
    pub max_peers: usize,
    /// Capacity of the control command queue.
    pub command_queue: usize,
    /// Data-path limits of the engine (retransmission history, lookup budget).
    pub limits: EngineLimits,
    /// Send with `sendmmsg` and UDP GSO (`rtc.batch_io`; off: one `sendto` per datagram and
    /// one `recvfrom` per datagram read, for comparison).
    pub batch_io: bool,
    /// Forward in str0m's RTP mode (see [`EngineConfig::rtp_mode`]).
    pub rtp_mode: bool,
}

/// The control plane's handle to the media plane. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MediaHandle {
    tx: mpsc::Sender<Command>,
}

impl MediaHandle {
    /// Bind the sockets and start the media thread.
    pub fn start(settings: MediaSettings) -> Result<MediaHandle, MediaError> {
        let udp = std::net::UdpSocket::bind(settings.udp_bind)?;
        udp.set_nonblocking(true)?;
        let udp_port = udp.local_addr()?.port();
        let tcp = match settings.tcp_bind {
            Some(a) => {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let udp_local = SocketAddr::new(settings.node_ip, udp_port);
        let mut candidates = vec![Candidate::host(udp_local, "udp")
            .map_err(|e| MediaError::Sdp(format!("bad node ip {}: {e}", settings.node_ip)))?];
        let mut tcp_local = None;
        if let Some(l) = &tcp {
            let a = SocketAddr::new(settings.node_ip, l.local_addr()?.port());
            tcp_local = Some(a);
            if let Ok(c) = Candidate::builder()
                .tcp()
                .host(a)
                .tcptype(TcpType::Passive)
                .build()
            {
                candidates.push(c);
            }
        }
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let config = EngineConfig {
            candidates,
            udp_local,
            max_peers: settings.max_peers,
            wall_anchor: (Instant::now(), wall),
            rtp_mode: settings.rtp_mode,
        };
        let (limits, batch) = (settings.limits, settings.batch_io);
        let (tx, rx) = mpsc::channel(settings.command_queue.max(16));
        std::thread::Builder::new()
            .name("arbor-media".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "media runtime failed to start");
                        return;
                    }
                };
                rt.block_on(run(config, limits, batch, udp, tcp, tcp_local, rx));
            })?;
        Ok(MediaHandle { tx })
    }

    /// Queue a command without waiting. Fails when the engine is gone or overloaded.
    pub fn send(&self, cmd: Command) -> Result<(), MediaError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MediaError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => MediaError::EngineGone,
        })
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

/// Reads one relay connection's datagrams into the engine's queue until it closes.
async fn read_relay(node: u64, conn: quinn::Connection, tx: mpsc::Sender<(u64, bytes::Bytes)>) {
    while let Ok(d) = conn.read_datagram().await {
        if tx.try_send((node, d)).is_err() {
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

/// The media thread's loop: wait for a command, datagrams, relay datagrams, ICE-TCP frames or
/// the engine's next deadline; hand them to the engine; then send everything the engine
/// produced in this iteration with one flush of the [`TxBatch`].
#[allow(clippy::too_many_arguments)]
async fn run(
    config: EngineConfig,
    limits: EngineLimits,
    batch: bool,
    udp: std::net::UdpSocket,
    tcp: Option<std::net::TcpListener>,
    tcp_local: Option<SocketAddr>,
    mut rx: mpsc::Receiver<Command>,
) {
    let udp_local = config.udp_local;
    let udp = match UdpSocket::from_std(udp) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "media UDP socket unusable");
            return;
        }
    };
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<TcpIn>(4096);
    if let Some(l) = tcp {
        match TcpListener::from_std(l) {
            Ok(l) => {
                tokio::spawn(accept_tcp(l, tcp_tx.clone()));
            }
            Err(e) => tracing::error!(error = %e, "ICE-TCP listener unusable"),
        }
    }
    let mut engine = Engine::new(config).with_limits(limits);
    let mut sinks: HashMap<PeerId, mpsc::Sender<PeerEvent>> = HashMap::new();
    let mut tcp_conns: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    // Batched I/O: with `batch` off, one datagram per send and per read (the old behaviour,
    // kept for comparison).
    let gso = batch && batch_io::gso_supported(&udp);
    let mut txb = TxBatch::new(if batch { SEND_BATCH } else { 1 }, gso);
    let mut rxb = RxBatch::new(if batch { RECV_BATCH } else { 1 });
    let mut relays: HashMap<u64, quinn::Connection> = HashMap::new();
    let mut relay_tasks: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    let (relay_tx, mut relay_rx) = mpsc::channel::<(u64, bytes::Bytes)>(RELAY_IN_QUEUE);
    tracing::info!(udp = %udp_local, tcp = ?tcp_local, batch, gso, "media engine running");

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
                            if let Some(t) = relay_tasks.insert(*node, tokio::spawn(read_relay(*node, conn.clone(), relay_tx.clone()))) {
                                t.abort();
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
                                    engine.handle_datagram(now, Protocol::Udp, source, udp_local, d, &mut out);
                                }
                            }
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
        }
        flush(&udp, &mut txb);
    }
    tracing::info!("media engine stopped");
}

async fn accept_tcp(listener: TcpListener, tx: mpsc::Sender<TcpIn>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(tcp_conn(stream, addr, tx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "ICE-TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One ICE-TCP connection: RFC 4571 frames (16-bit big-endian length, then the packet).
async fn tcp_conn(stream: TcpStream, addr: SocketAddr, tx: mpsc::Sender<TcpIn>) {
    let (mut r, mut w) = stream.into_split();
    let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
    if tx.send(TcpIn::Open(addr, wtx)).await.is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(frame) = wrx.recv().await {
            if w.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut len = [0u8; 2];
    loop {
        if r.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = u16::from_be_bytes(len) as usize;
        if n == 0 || n > MAX_DATAGRAM {
            tracing::debug!(%addr, len = n, "bad ICE-TCP frame length; closing");
            break;
        }
        let mut data = vec![0u8; n];
        if r.read_exact(&mut data).await.is_err() {
            break;
        }
        if tx.send(TcpIn::Frame(addr, data)).await.is_err() {
            break;
        }
    }
    writer.abort();
    let _ = tx.send(TcpIn::Closed(addr)).await;
}
