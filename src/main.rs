mod cluster;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Arbor: a self-hosted SFU speaking the LiveKit protocol.
#[derive(Parser)]
#[command(name = "arbor", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster administration (CA, membership, status).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Run a cluster member (Raft membership + admin API).
    Node {
        /// Cluster member config (TOML, see src/cluster.rs docs).
        #[arg(long)]
        cluster_config: PathBuf,
        /// Admin HTTP listen address (default: `http_addr` from the config).
        #[arg(long)]
        http: Option<SocketAddr>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Some(Cmd::Cluster(c)) => cluster::run(c).await,
        Some(Cmd::Node {
            cluster_config,
            http,
        }) => cluster::run_node(&cluster_config, http).await,
        None => {
            println!("arbor {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
