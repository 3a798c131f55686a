//! `arbor`: a self-hosted SFU that speaks the LiveKit protocol.
//!
//! This binary is the edge: CLI, configuration, the HTTP/WebSocket front, and the wiring of
//! the control plane (actix actors on the system arbiter) to the media plane (its shard threads).

mod auth;
mod cluster;
mod config;
mod fabric;
mod http;
mod signal;
mod twirp;
mod webhook;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use arbor_actors::manager::RoomManager;
use arbor_actors::media::engine::EngineLimits;
use arbor_actors::media::{MediaPlane, MediaSettings};

use crate::config::Config;

/// Arbor: an SFU for LiveKit clients.
#[derive(Debug, Parser)]
#[command(name = "arbor", version, about)]
struct Cli {
    /// Development mode: no config needed; API key `devkey`, secret `secret`,
    /// HTTP on 127.0.0.1:7880, media on UDP 7882 and ICE-TCP 7881.
    #[arg(long)]
    dev: bool,
    /// YAML configuration file (see deploy/config-sample.yaml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// HTTP/WebSocket port.
    #[arg(long)]
    port: Option<u16>,
    /// UDP media port (of shard 0; shard i uses this + i).
    #[arg(long)]
    udp_port: Option<u16>,
    /// ICE-TCP port (0 disables).
    #[arg(long)]
    tcp_port: Option<u16>,
    /// Address advertised in ICE candidates.
    #[arg(long, value_name = "IP")]
    node_ip: Option<IpAddr>,
    /// Seconds a room stays open with nobody in it (sets room.empty_timeout and
    /// room.departure_timeout).
    #[arg(long, value_name = "SECS")]
    empty_timeout: Option<u64>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Cluster administration (CA, membership, status). See docs/membership.md.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Run a cluster member (Raft membership + admin API).
    Node {
        /// Cluster member config (TOML; keys documented in src/cluster.rs and docs/membership.md).
        #[arg(long)]
        cluster_config: PathBuf,
        /// Admin HTTP listen address (default: `http_addr` from the config).
        #[arg(long)]
        http: Option<SocketAddr>,
    },
}

/// `arbor cluster ...` and `arbor node ...`: the Raft membership tools.
fn run_cluster_command(cmd: Cmd) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            Cmd::Cluster(c) => cluster::run(c).await,
            Cmd::Node {
                cluster_config,
                http,
            } => cluster::run_node(&cluster_config, http).await,
        }
    })
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    // Defaults < file (or dev defaults) < ARBOR_* environment < command-line flags.
    if cli.config.is_none() && !cli.dev && !Config::env_has_config(std::env::vars()) {
        bail!("no configuration: run `arbor --dev` for development, `arbor --config FILE`, or set ARBOR_* variables (see deploy/config-sample.yaml)");
    }
    let mut cfg = Config::load(cli.config.as_deref(), cli.dev, std::env::vars())?;
    if let Some(b) = cli.bind {
        cfg.bind_addresses = vec![b];
    }
    if let Some(p) = cli.port {
        cfg.port = p;
    }
    if let Some(p) = cli.udp_port {
        cfg.rtc.udp_port = p;
    }
    if let Some(p) = cli.tcp_port {
        cfg.rtc.tcp_port = p;
    }
    if let Some(ip) = cli.node_ip {
        cfg.rtc.node_ip = Some(ip);
    }
    if let Some(t) = cli.empty_timeout {
        cfg.room.empty_timeout = t;
        cfg.room.departure_timeout = t;
    }
    cfg.load_key_file()?;
    cfg.validate()?;
    Ok(cfg)
}

/// Whether `ip` is assigned to one of this machine's interfaces.
fn is_local_address(ip: IpAddr) -> bool {
    if_addrs::get_if_addrs()
        .map(|ifs| ifs.iter().any(|i| i.ip() == ip))
        .unwrap_or(false)
}

/// The first non-loopback IPv4 address of an interface that is up, else 127.0.0.1.
fn default_node_ip() -> IpAddr {
    if let Ok(ifs) = if_addrs::get_if_addrs() {
        for i in ifs {
            if !i.is_loopback() {
                if let IpAddr::V4(v4) = i.ip() {
                    return IpAddr::V4(v4);
                }
            }
        }
    }
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// Errors (a bad configuration above all) are printed as one readable line, exit status 1.
fn main() {
    if let Err(e) = run() {
        eprintln!("arbor: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some(cmd) = cli.cmd.take() {
        return run_cluster_command(cmd);
    }
    let cfg = load_config(&cli)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},str0m=warn", cfg.logging.level))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let seed = cfg.seed.unwrap_or_else(rand::random);
    arbor_actors::ids::seed(seed);
    arbor_actors::media::init_crypto();

    let node_ip = cfg.rtc.node_ip.unwrap_or_else(default_node_ip);
    // Bind the media sockets to the advertised address when it is one of ours: replies then
    // always leave from the address the peer's ICE checks went to (with 0.0.0.0 the kernel may
    // pick another source address, which strict ICE stacks drop). Behind NAT (the advertised
    // address is not local) bind everything.
    let media_bind = cfg.rtc.bind.unwrap_or_else(|| {
        if is_local_address(node_ip) {
            node_ip
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    });
    let shards = cfg.media_shards();
    let media = MediaPlane::start(MediaSettings {
        udp_bind: SocketAddr::new(media_bind, cfg.rtc.udp_port),
        tcp_bind: (cfg.rtc.tcp_port != 0).then(|| SocketAddr::new(media_bind, cfg.rtc.tcp_port)),
        node_ip,
        max_peers: cfg.limit.max_peers,
        shards,
        command_queue: 8192,
        limits: EngineLimits {
            rtx_history: std::time::Duration::from_millis(cfg.rtc.rtx_history_ms),
            rtx_packets_video: cfg.rtc.rtx_packets_video,
            rtx_packets_audio: cfg.rtc.rtx_packets_audio,
            fallback_scans_per_sec: cfg.rtc.unknown_source_scans_per_sec,
        },
        batch_io: cfg.rtc.batch_io,
        rtp_mode: cfg.rtc.rtp_mode,
    })
    .with_context(|| {
        format!(
            "starting {shards} media shard(s) on UDP {}-{} / TCP {}",
            cfg.rtc.udp_port,
            usize::from(cfg.rtc.udp_port) + shards - 1,
            cfg.rtc.tcp_port
        )
    })?;

    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(|| arbor_actors::ids::new_sid("ND_"));
    tracing::info!(%node_ip, node_id, seed, udp = cfg.rtc.udp_port, tcp = cfg.rtc.tcp_port, shards, "arbor starting");

    // Control plane: actix actors on the system arbiter; HTTP on a multi-threaded runtime.
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    system.block_on(async move {
        let events = if cfg.webhook.urls.is_empty() {
            arbor_actors::events::EventSink::default()
        } else {
            let (api_key, api_secret) = cfg.webhook_key()?;
            webhook::start(webhook::WebhookSettings {
                urls: cfg.webhook.urls.clone(),
                api_key,
                api_secret,
                queue_size: cfg.webhook.queue_size,
                max_attempts: cfg.webhook.max_attempts,
                request_timeout: std::time::Duration::from_millis(cfg.webhook.request_timeout_ms),
                retry_backoff: std::time::Duration::from_millis(cfg.webhook.retry_backoff_ms),
            })
        };
        let settings = Arc::new(cfg.room_settings(node_id.clone(), events));
        // Multi-node: this process is also a cluster member, and rooms join the relay fabric.
        let cluster = match &cfg.cluster.config {
            Some(path) => {
                let ccfg = cluster::ClusterConfig::load(path)?;
                let admin = ccfg.http_addr;
                // The admin API (`/cluster/*`: add and remove members) has no authentication of
                // its own: it gets its own listener, meant for a private address, never the
                // client-facing SFU port.
                let clash = admin.port() == cfg.port
                    && cfg.bind_addresses.iter().any(|ip| {
                        *ip == admin.ip() || ip.is_unspecified() || admin.ip().is_unspecified()
                    });
                if clash {
                    bail!(
                        "cluster config {}: http_addr {admin} is the SFU's own HTTP address; the cluster admin API is unauthenticated and needs an address (or port) of its own, on a private interface",
                        path.display()
                    );
                }
                let region_rtt = ccfg.region_rtt.clone();
                let handle = cluster::start(ccfg).await?;
                tracing::info!(node = handle.node_id(), config = %path.display(), "cluster member running; rooms join the relay fabric");
                Some((handle, admin, region_rtt))
            }
            None => None,
        };
        let mut rm = RoomManager::new(settings.clone(), media.clone());
        let directory = cluster.as_ref().map(|(c, _, region_rtt)| {
            fabric::ClusterDirectory::new(c.clone(), c.net(), region_rtt.clone())
        });
        if let Some(d) = &directory {
            rm = rm.with_fabric(d.clone());
        }
        let manager = actix::Actor::start(rm);
        if let Some((c, _, _)) = &cluster {
            fabric::start(c.net(), manager.clone(), media.clone());
        }
        let state = http::AppState {
            auth: auth::Auth::new(cfg.keys.clone()),
            manager,
            media,
            settings,
            arbiter: actix::Arbiter::current(),
            max_message_bytes: cfg.limit.max_signal_message_bytes,
            ws_buffer_bytes: cfg.limit.signal_buffer_bytes,
            signal_rate: cfg.limit.signal_rate,
            signal_burst: cfg.limit.signal_burst,
        };
        let app = http::router(state);
        let mut servers = Vec::new();
        if let Some((c, admin, _)) = &cluster {
            // The admin API on the cluster config's `http_addr` (advertised to peers).
            let listener = tokio::net::TcpListener::bind(*admin)
                .await
                .with_context(|| format!("binding the cluster admin API on {admin} (http_addr)"))?;
            tracing::info!(%admin, "cluster admin API listening");
            let mut admin_app = cluster::routes(c.clone());
            if let Some(d) = &directory {
                admin_app = admin_app.merge(fabric::routes(d.clone()));
            }
            servers.push(tokio::spawn(async move { axum::serve(listener, admin_app).await }));
        }
        for ip in &cfg.bind_addresses {
            let addr = SocketAddr::new(*ip, cfg.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HTTP on {addr} (`port` / `bind_addresses`)"))?;
            tracing::info!(%addr, "listening for HTTP / WebSocket");
            let app = app.clone();
            servers.push(tokio::spawn(
                async move { axum::serve(listener, app).await },
            ));
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
            r = futures_util::future::select_all(servers) => {
                if let (Ok(Err(e)), _, _) = r {
                    return Err(anyhow::anyhow!("HTTP server failed: {e}"));
                }
            }
        }
        Ok(())
    })
}
