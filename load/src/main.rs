//! `arbor-load`: simulated participants that load a LiveKit-protocol server (or the plain relay
//! baseline) and measure what it costs.
//!
//! ```text
//! arbor-load run --target arbor --scenario livestream --steps 25,50,100 --server-pid <pid> ...
//! arbor-load relay --bind 10.200.0.1:9100         # the plain SRTP relay baseline (server side)
//! arbor-load relay --batch ...                     # the same with recvmmsg/sendmmsg/GSO
//! arbor-load report --csv results.csv --svg plot.svg   # table + headline ratios + plot
//! ```
//!
//! Scenarios:
//! * `livestream`: one publisher (VP8 + Opus), subscribers added in steps (`--steps`).
//! * `conference`: rooms of 8 (everyone publishes and subscribes to everyone else), one room
//!   added per step until loss exceeds `--max-loss` or `--steps` rooms are reached.
//! * `churn`: one publisher and `--steps` subscribers that each live `--lifetime` seconds and
//!   are replaced continuously; reports join times under churn.
//! * `watch`: no publisher; `--steps` (one value) subscribers join the existing room `--room`
//!   (exact name) on `--url` and watch whatever is published there: cheap viewers for
//!   multi-node tests. After the window it prints one `TRACK` line per subscribed track
//!   (packets received and expected in the window, loss) and a `WATCH` summary line.
//!
//! Each step waits for the new participants to join, lets things settle, then measures for
//! `--step-secs`: server CPU (from `/proc/<server-pid>`), forwarded packets/s (what the
//! subscribers received), CPU µs per forwarded packet, server RSS per subscription, loss,
//! jitter, join time p50/p95. Loops are bounded: every scenario ends by itself.

mod clip;
mod janus;
mod lk;
mod relay;
mod report;
mod stats;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use crate::clip::Clip;
use crate::report::Row;
use crate::stats::{percentile, ProcSample, Registry};

/// Errors of the load tool.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("media clip: {0}")]
    Clip(String),
    #[error("signalling: {0}")]
    Signal(String),
    #[error("webrtc: {0}")]
    WebRtc(String),
    #[error("join: {0}")]
    Join(String),
    #[error("relay: {0}")]
    Relay(String),
    #[error("janus: {0}")]
    Janus(String),
    #[error("{0}")]
    Io(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "arbor-load",
    version,
    about = "Load generator and benchmark for Arbor"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Livestream,
    Conference,
    Churn,
    Watch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    /// A LiveKit-protocol server (Arbor) over `/rtc`.
    Arbor,
    /// The plain relay (`arbor-load relay`).
    Relay,
    /// Janus' VideoRoom over its WebSocket API.
    Janus,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a scenario against a server and report per step.
    Run(Box<RunArgs>),
    /// Serve the plain SRTP relay baseline until killed.
    Relay {
        #[arg(long, default_value = "10.200.0.1:9100")]
        bind: SocketAddr,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Batched I/O like Arbor's media thread: recvmmsg, one sendmmsg per received batch,
        /// UDP GSO where the kernel has it (the same code, `arbor_actors::media::batch_io`).
        #[arg(long)]
        batch: bool,
    },
    /// Print the table and headline ratios of a CSV; optionally plot it.
    Report {
        #[arg(long)]
        csv: PathBuf,
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "arbor")]
    target: TargetKind,
    #[arg(long, value_enum, default_value = "livestream")]
    scenario: Scenario,
    /// Signal URL (arbor) or WebSocket API URL (janus).
    #[arg(long, default_value = "ws://127.0.0.1:7880")]
    url: String,
    #[arg(long, default_value = "devkey")]
    api_key: String,
    #[arg(long, default_value = "secret")]
    api_secret: String,
    /// Relay address (target relay).
    #[arg(long, default_value = "10.200.0.1:9100")]
    relay: SocketAddr,
    /// Local address for media sockets (inside the namespace; never loopback).
    #[arg(long, default_value = "10.200.0.2")]
    bind_ip: IpAddr,
    /// Server process to measure (CPU, RSS). Without it only client-side numbers are reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Steps: subscribers (livestream, churn) or the number of rooms to reach (conference: one
    /// value, the maximum).
    #[arg(long, value_delimiter = ',', default_value = "25,50,100")]
    steps: Vec<usize>,
    /// Measurement window per step, seconds.
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Settling time after a step's participants joined, seconds.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,
    /// Participants started per second.
    #[arg(long, default_value_t = 40)]
    join_rate: u32,
    /// Conference: stop adding rooms once loss exceeds this percentage.
    #[arg(long, default_value_t = 2.0)]
    max_loss: f64,
    /// Churn: lifetime of each subscriber, seconds.
    #[arg(long, default_value_t = 10)]
    lifetime: u64,
    /// Enable webrtc-rs interceptors (NACK, RTCP reports, TWCC) in the simulated clients.
    #[arg(long)]
    interceptors: bool,
    /// Directory with clip.ivf and clip.ogg.
    #[arg(long)]
    media: Option<PathBuf>,
    /// Append rows to this CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Room name prefix (unique per run by default).
    #[arg(long)]
    room: Option<String>,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Janus VideoRoom base room id (target janus).
    #[arg(long, default_value_t = 5_000_000)]
    janus_room: u64,
    /// Fail (exit 1) unless every step delivered media with loss below this percentage.
    #[arg(long)]
    require_loss_below: Option<f64>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Name of the target in the CSV and the table (default: the target kind), e.g.
    /// `relay-batch` for the plain relay run with `--batch`.
    #[arg(long)]
    label: Option<String>,
}

fn main() -> anyhow::Result<()> {
    // RUST_LOG (e.g. `RUST_LOG=webrtc=debug,rtc=debug`) shows the WebRTC stack's own logs.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Relay { bind, seed, batch } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if batch {
                rt.block_on(relay::serve_batched(bind, seed))?;
            } else {
                rt.block_on(relay::serve(bind, seed))?;
            }
            Ok(())
        }
        Cmd::Report { csv, svg } => {
            let rows = report::read_csv(&csv)?;
            print!("{}", summary(&rows));
            if let Some(svg) = svg {
                report::plot(&svg, &rows)?;
                println!("plot: {}", svg.display());
            }
            Ok(())
        }
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads.max(1))
                .enable_all()
                .build()?;
            let rows = rt.block_on(run((*args).clone()))?;
            if let Some(limit) = args.require_loss_below {
                let bad: Vec<_> = rows
                    .iter()
                    .filter(|r| r.fwd_pps <= 0.0 || r.loss_pct >= limit)
                    .collect();
                if rows.is_empty() || !bad.is_empty() {
                    anyhow::bail!(
                        "{} of {} steps delivered no media or lost >= {limit}%",
                        bad.len(),
                        rows.len()
                    );
                }
            }
            rt.shutdown_timeout(Duration::from_secs(2));
            Ok(())
        }
    }
}

/// Table of all rows plus the headline ratios.
fn summary(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&report::table_header());
    s.push('\n');
    for r in rows {
        s.push_str(&report::table_row(r));
        s.push('\n');
    }
    // Headline: livestream CPU per packet at the largest step every target reached.
    let live: Vec<&Row> = rows.iter().filter(|r| r.scenario == "livestream").collect();
    let at = |t: &str, step: usize| {
        live.iter()
            .find(|r| r.target == t && r.step == step)
            .map(|r| r.cpu_us_per_pkt)
    };
    let steps: Vec<usize> = live
        .iter()
        .filter(|r| r.target == "arbor")
        .map(|r| r.step)
        .collect();
    for other in ["relay", "relay-batch", "janus"] {
        if let Some(step) = steps
            .iter()
            .copied()
            .filter(|&st| at(other, st).is_some())
            .max()
        {
            if let (Some(a), Some(o)) = (at("arbor", step), at(other, step)) {
                if o > 0.0 {
                    s.push_str(&format!(
                        "livestream @ {step} subscribers: arbor {a:.2} us/pkt / {other} {o:.2} us/pkt = {:.2}x\n",
                        a / o
                    ));
                }
            }
        }
    }
    // Conference: participants held before loss exceeded 2% — counting media the server
    // delivered late (queued, slower than real time) as lost too.
    for t in ["arbor", "janus"] {
        let held = rows
            .iter()
            .filter(|r| {
                r.target == t
                    && r.scenario == "conference"
                    && r.loss_pct <= 2.0
                    && r.realtime_pct >= 98.0
            })
            .map(|r| r.participants)
            .max();
        if let Some(p) = held {
            s.push_str(&format!(
                "conference: {t} held {p} participants with loss <= 2% and media delivered in real time (>= 98%)\n"
            ));
        }
    }
    s
}

/// Participants of a run and how to start and stop them.
struct Swarm {
    args: RunArgs,
    lk: lk::Target,
    clip: Clip,
    reg: Arc<Registry>,
    running: VecDeque<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    errors: Arc<AtomicU64>,
    next_id: u32,
    pb: ProgressBar,
    run_tag: String,
}

/// Prints a line above the progress bar (or to stderr when the bar is hidden).
fn say(pb: &ProgressBar, line: &str) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// Errors printed per run (the rest are only counted).
const MAX_PRINTED_ERRORS: u64 = 8;

impl Swarm {
    /// Starts one participant. `expect_media`: see [`lk::Spec::expect_media`].
    fn spawn(&mut self, room: &str, publish: bool, subscribe: bool, expect_media: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = watch::channel(false);
        let reg = self.reg.clone();
        let errors = self.errors.clone();
        let pb = self.pb.clone();
        let clip = self.clip.clone();
        let identity = format!("load-{}-{id}", self.run_tag);
        let fut: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), LoadError>> + Send>,
        > = match self.args.target {
            TargetKind::Arbor => Box::pin(lk::run(
                self.lk.clone(),
                lk::Spec {
                    room: room.to_string(),
                    identity,
                    publish,
                    subscribe,
                    expect_media,
                },
                clip,
                reg,
                rx,
            )),
            TargetKind::Relay => {
                if publish {
                    Box::pin(relay::publish(
                        self.args.relay,
                        self.args.bind_ip,
                        1,
                        clip,
                        rx,
                    ))
                } else {
                    Box::pin(relay::subscribe(
                        self.args.relay,
                        self.args.bind_ip,
                        1,
                        id + 1,
                        reg,
                        rx,
                    ))
                }
            }
            TargetKind::Janus => Box::pin(janus::run(
                janus::Target {
                    url: self.args.url.clone(),
                    room: self.args.janus_room,
                    bind_ip: self.args.bind_ip,
                    interceptors: self.args.interceptors,
                },
                janus::Spec {
                    room_key: room.to_string(),
                    display: identity,
                    publish,
                    subscribe,
                    expect_media,
                },
                clip,
                reg,
                rx,
            )),
        };
        let h = tokio::spawn(async move {
            if let Err(e) = fut.await {
                let n = errors.fetch_add(1, Ordering::Relaxed);
                if n < MAX_PRINTED_ERRORS {
                    say(&pb, &format!("participant {id}: {e}"));
                }
            }
        });
        self.running.push_back((tx, h));
    }

    /// Stops the oldest running participant after `skip` (which are kept).
    fn stop_one_after(&mut self, skip: usize) {
        if self.running.len() > skip {
            if let Some((tx, _h)) = self.running.remove(skip) {
                let _ = tx.send(true);
            }
        }
    }

    async fn stop_all(&mut self) {
        let all: Vec<_> = self.running.drain(..).collect();
        for (tx, _) in &all {
            let _ = tx.send(true);
        }
        for (_, h) in all {
            let _ = tokio::time::timeout(Duration::from_secs(3), h).await;
        }
    }

    /// Waits until `n` participants in total have joined (or failed), bounded by the join
    /// timeout plus the time to start them.
    async fn wait_joined(&self, n: u64, extra: Duration) {
        let deadline = Instant::now() + lk::JOIN_TIMEOUT + extra;
        while Instant::now() < deadline {
            let done = self.reg.joined.load(Ordering::Relaxed)
                + self.reg.join_failures.load(Ordering::Relaxed);
            if done >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn spawn_gap(&self) -> Duration {
        Duration::from_micros(1_000_000 / self.args.join_rate.max(1) as u64)
    }
}

/// Counters at the start of a measurement window.
struct Window {
    srv: Option<ProcSample>,
    me: Option<ProcSample>,
    totals: stats::Totals,
    /// `(received, media_us)` per track at the start.
    media: Vec<(u64, u64)>,
    start: Instant,
}

fn begin(sw: &Swarm, step: usize, secs: u64, clear_joins: bool) -> Window {
    sw.pb.set_length(secs * 10);
    sw.pb.set_position(0);
    sw.pb.set_message(format!(
        "{:?} {:?} step {step}: measuring",
        sw.args.target, sw.args.scenario
    ));
    if clear_joins {
        sw.reg.take_join_times();
    }
    Window {
        srv: sw.args.server_pid.and_then(ProcSample::read),
        me: ProcSample::read(std::process::id()),
        totals: sw.reg.totals(),
        media: sw.reg.media_times(),
        start: Instant::now(),
    }
}

/// Ends a window and computes its row.
fn end(
    sw: &Swarm,
    w: Window,
    step: usize,
    participants: usize,
    subscriptions: usize,
    baseline_rss_kib: u64,
) -> Row {
    let t1 = sw.reg.totals();
    let srv1 = sw.args.server_pid.and_then(ProcSample::read);
    let me1 = ProcSample::read(std::process::id());
    let wall = w.start.elapsed().as_secs_f64().max(1e-3);
    let pkts = t1.received.saturating_sub(w.totals.received);
    let expected = t1.expected.saturating_sub(w.totals.expected);
    // Real-time delivery: media time each receiving track advanced by, per wall time.
    let (mut media_us, mut active) = (0u64, 0u64);
    for (i, (r1, m1)) in sw.reg.media_times().into_iter().enumerate() {
        let (r0, m0) = w.media.get(i).copied().unwrap_or((0, 0));
        if r1 > r0 && r0 > 0 {
            media_us += m1.saturating_sub(m0);
            active += 1;
        }
    }
    let mut joins = sw.reg.take_join_times();
    let mut row = Row {
        target: sw
            .args
            .label
            .clone()
            .unwrap_or_else(|| format!("{:?}", sw.args.target).to_lowercase()),
        scenario: format!("{:?}", sw.args.scenario).to_lowercase(),
        step,
        participants,
        subscriptions,
        fwd_pps: pkts as f64 / wall,
        loss_pct: if expected > 0 {
            expected.saturating_sub(pkts) as f64 * 100.0 / expected as f64
        } else {
            0.0
        },
        jitter_ms: t1.mean_jitter_ms,
        join_p50_ms: percentile(&mut joins, 50.0) as f64 / 1000.0,
        join_p95_ms: percentile(&mut joins, 95.0) as f64 / 1000.0,
        join_failures: sw.reg.join_failures.load(Ordering::Relaxed),
        realtime_pct: if active > 0 {
            media_us as f64 / active as f64 / (wall * 1e6) * 100.0
        } else {
            0.0
        },
        ..Row::default()
    };
    if let (Some(a), Some(b)) = (w.srv, srv1) {
        let cpu = b.cpu_us.saturating_sub(a.cpu_us) as f64;
        row.server_cpu_pct = cpu / (wall * 1e6) * 100.0;
        row.cpu_us_per_pkt = if pkts > 0 { cpu / pkts as f64 } else { 0.0 };
        row.server_rss_mib = b.rss_kib as f64 / 1024.0;
        if subscriptions > 0 {
            row.rss_kib_per_sub =
                b.rss_kib.saturating_sub(baseline_rss_kib) as f64 / subscriptions as f64;
        }
    }
    if let (Some(a), Some(b)) = (w.me, me1) {
        row.client_cpu_pct = b.cpu_us.saturating_sub(a.cpu_us) as f64 / (wall * 1e6) * 100.0;
    }
    row
}

/// Measures `secs` seconds; with `churn = Some((keep, every))`, stops the oldest participant
/// after the first `keep` and starts a new subscriber every `every` meanwhile.
async fn measure(
    sw: &mut Swarm,
    room: &str,
    step: usize,
    participants: usize,
    subscriptions: usize,
    baseline_rss_kib: u64,
    churn: Option<(usize, Duration)>,
) -> Row {
    let secs = sw.args.step_secs;
    let w = begin(sw, step, secs, churn.is_some());
    let start = w.start;
    let mut next_churn = start;
    for i in 0..secs * 10 {
        let tick = start + Duration::from_millis(100 * (i + 1));
        if let Some((keep, every)) = churn {
            while next_churn < tick {
                tokio::time::sleep_until(next_churn.into()).await;
                sw.stop_one_after(keep);
                sw.spawn(room, false, true, true);
                next_churn += every;
            }
        }
        tokio::time::sleep_until(tick.into()).await;
        sw.pb.set_position(i + 1);
    }
    end(sw, w, step, participants, subscriptions, baseline_rss_kib)
}

async fn run(args: RunArgs) -> Result<Vec<Row>, LoadError> {
    let media = args
        .media
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("media"));
    let clip = Clip::load(&media)?;
    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(1);
        pb.set_style(
            ProgressStyle::with_template("{bar:30} {pos:>4}/{len:4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    };
    let run_tag = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 100_000)
            .unwrap_or(0)
    );
    let mut sw = Swarm {
        lk: lk::Target {
            ws_url: args.url.clone(),
            api_key: args.api_key.clone(),
            api_secret: args.api_secret.clone(),
            bind_ip: args.bind_ip,
            interceptors: args.interceptors,
        },
        args: args.clone(),
        clip,
        reg: Arc::new(Registry::default()),
        running: VecDeque::new(),
        errors: Arc::new(AtomicU64::new(0)),
        next_id: 0,
        pb: pb.clone(),
        run_tag: run_tag.clone(),
    };
    let baseline = args
        .server_pid
        .and_then(ProcSample::read)
        .map(|s| s.rss_kib)
        .unwrap_or(0);
    let room = args
        .room
        .clone()
        .unwrap_or_else(|| format!("load-{run_tag}"));
    say(&pb, &report::table_header());
    let mut rows = Vec::new();
    let gap = sw.spawn_gap();
    match args.scenario {
        Scenario::Livestream | Scenario::Churn => {
            sw.spawn(&room, true, false, false);
            sw.wait_joined(1, Duration::ZERO).await;
            let mut subs = 0usize;
            for &n in &args.steps {
                sw.pb.set_message(format!("starting {n} subscribers"));
                sw.reg.take_join_times();
                while subs < n {
                    sw.spawn(&room, false, true, true);
                    subs += 1;
                    tokio::time::sleep(gap).await;
                }
                sw.wait_joined(1 + subs as u64, gap * subs as u32).await;
                tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
                let churn = (args.scenario == Scenario::Churn).then(|| {
                    // One replacement every lifetime/n seconds keeps n subscribers alive, each
                    // living about `lifetime` seconds.
                    (
                        1,
                        Duration::from_secs_f64(args.lifetime as f64 / n.max(1) as f64),
                    )
                });
                let row = measure(&mut sw, &room, n, n + 1, n * 2, baseline, churn).await;
                say(&pb, &report::table_row(&row));
                rows.push(row);
            }
        }
        Scenario::Watch => {
            let n = args.steps.first().copied().unwrap_or(1).max(1);
            sw.pb.set_message(format!("starting {n} watchers"));
            let before = sw.reg.per_track().len();
            for _ in 0..n {
                sw.spawn(&room, false, true, true);
                tokio::time::sleep(gap).await;
            }
            sw.wait_joined(n as u64, gap * n as u32).await;
            tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            let start = sw.reg.per_track();
            let row = measure(&mut sw, &room, n, n, n * 2, baseline, None).await;
            say(&pb, &report::table_row(&row));
            let end = sw.reg.per_track();
            let mut sum = (0u64, 0u64);
            let mut min_received = u64::MAX;
            for (i, (r1, e1)) in end.iter().enumerate().skip(before) {
                let (r0, e0) = start.get(i).copied().unwrap_or((0, 0));
                let (r, e) = (r1.saturating_sub(r0), e1.saturating_sub(e0));
                sum = (sum.0 + r, sum.1 + e);
                min_received = min_received.min(r);
                let loss = if e > 0 {
                    100.0 * e.saturating_sub(r) as f64 / e as f64
                } else {
                    0.0
                };
                say(
                    &pb,
                    &format!("TRACK {i} received={r} expected={e} loss_pct={loss:.2}"),
                );
            }
            let tracks = end.len().saturating_sub(before);
            let loss = if sum.1 > 0 {
                100.0 * sum.1.saturating_sub(sum.0) as f64 / sum.1 as f64
            } else {
                0.0
            };
            say(
                &pb,
                &format!(
                    "WATCH subscribers={n} joined={} join_failures={} tracks={tracks} received={} \
                     expected={} loss_pct={loss:.2} min_track_received={}",
                    sw.reg.joined.load(Ordering::Relaxed),
                    sw.reg.join_failures.load(Ordering::Relaxed),
                    sum.0,
                    sum.1,
                    if tracks == 0 { 0 } else { min_received },
                ),
            );
            rows.push(row);
        }
        Scenario::Conference => {
            let max_rooms = args.steps.iter().copied().max().unwrap_or(1).max(1);
            const ROOM_SIZE: usize = 8;
            for r in 1..=max_rooms {
                let name = format!("{room}-{r}");
                sw.pb.set_message(format!("starting room {r}"));
                sw.reg.take_join_times();
                for i in 0..ROOM_SIZE {
                    sw.spawn(&name, true, true, i > 0);
                    tokio::time::sleep(gap).await;
                }
                sw.wait_joined((r * ROOM_SIZE) as u64, gap * ROOM_SIZE as u32)
                    .await;
                tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
                let parts = r * ROOM_SIZE;
                let subs = parts * (ROOM_SIZE - 1) * 2;
                let row = measure(&mut sw, &name, r, parts, subs, baseline, None).await;
                say(&pb, &report::table_row(&row));
                let failed = row.loss_pct > args.max_loss || row.fwd_pps <= 0.0;
                rows.push(row);
                if failed {
                    say(&pb, &format!("conference: quality failed at {r} rooms"));
                    break;
                }
            }
        }
    }
    pb.finish_and_clear();
    sw.stop_all().await;
    if let Some(csv) = &args.csv {
        report::append_csv(csv, &rows)?;
    }
    let errs = sw.errors.load(Ordering::Relaxed);
    if errs > 0 {
        eprintln!("{errs} participant(s) ended with an error");
    }
    Ok(rows)
}
