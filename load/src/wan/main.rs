//! `arbor-wan`: a userspace WAN emulator for network namespaces (this kernel has no `netem`).
//!
//! ```text
//! arbor-wan --tun wan0 --site a=10.210.1.0/24 --site b=10.210.2.0/24 --seed 1 --max-seconds 600
//! ```
//!
//! It runs inside a *router* namespace that joins several *site* namespaces (one veth each) and
//! whose policy routing sends every packet arriving from a site into the TUN device `--tun`
//! (`ip rule add iif <site veth> lookup 100`, table 100: `default dev wan0`). This program reads
//! each IP packet from the TUN, looks up the (source site, destination site) pair by address,
//! drops it with the pair's seeded loss probability or holds it for the pair's delay, then writes
//! it back into the same TUN. The kernel sees it arrive *on* the TUN; the policy rules only match
//! the site veths, so the main table routes it out to the destination site. No loop, no
//! `netem`, no qdisc. `tests/e2e/wan.py` builds the namespaces and drives this binary.
//!
//! ```text
//!   site a ── veth ──┐                router namespace                 ┌── veth ── site b
//!   10.210.1.2       │ iif r1 → table 100 → wan0 ⇄ arbor-wan (delay/loss)│       10.210.2.2
//!                    └─────────── main table routes what wan0 returns ──┘
//! ```
//!
//! The decisions live in [`sched::Scheduler`] (sans-IO: packets and instants in, due packets
//! out). This file is the thin shell: one thread, `ppoll` on the TUN and stdin with a
//! nanosecond timeout until the next due packet (never a busy loop; timer slack set to 1 µs so
//! the kernel does not batch our wake-ups 50 µs late), optional `SCHED_FIFO` priority so that
//! wake-ups stay punctual on a machine busy compiling.
//!
//! Control: one command per line on stdin, replies on stdout (see [`control`]). It prints
//! `ready` once attached. It stops by itself: at end of stdin, when its parent dies
//! (`PR_SET_PDEATHSIG`), on `quit`, or after `--max-seconds`.

mod control;
mod sched;
mod tun;

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

use crate::control::{Command, Line, LineBuffer};
use crate::sched::{Limits, Scheduler, Site, Snapshot};
use crate::tun::Tun;

/// Errors of `arbor-wan`.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("site: {0}")]
    Site(String),
    #[error("link: {0}")]
    Link(String),
    #[error("command: {0}")]
    Command(String),
    #[error("tun: {0}")]
    Tun(String),
}

/// Largest packet read from the TUN (an IPv4 packet is at most 64 KiB).
const MAX_PACKET: usize = 65_536;

/// Packets read per wake-up before releasing what is due, so that a flood of arrivals cannot
/// delay departures by more than this many reads.
const MAX_READS_PER_WAKE: usize = 64;

/// Write errors reported on stderr (all are counted).
const MAX_REPORTED_WRITE_ERRORS: u64 = 10;

#[derive(Parser, Debug)]
#[command(
    name = "arbor-wan",
    about = "Userspace WAN emulator: per site-pair delay and loss through a TUN device"
)]
struct Args {
    /// TUN device to attach to (created if missing; normally created persistent beforehand).
    #[arg(long, default_value = "wan0")]
    tun: String,
    /// A site, `name=a.b.c.d/len` (repeat for each site).
    #[arg(long = "site", required = true)]
    sites: Vec<String>,
    /// Seed of the loss decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// Bound on held packets.
    #[arg(long, default_value_t = Limits::default().max_queued_packets)]
    max_queued_packets: usize,
    /// Bound on held bytes.
    #[arg(long, default_value_t = Limits::default().max_queued_bytes)]
    max_queued_bytes: usize,
    /// Run with this `SCHED_FIFO` priority (1..=99) for punctual wake-ups; falls back to normal
    /// scheduling, with a warning, if not permitted.
    #[arg(long)]
    rt_priority: Option<i32>,
}

/// The `stats` reply: the scheduler's snapshot plus the shell's own counters.
#[derive(Serialize)]
struct StatsReply<'a> {
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    write_errors: u64,
    uptime_s: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: plain prctl calls with integer arguments. SIGKILL when the parent dies: a test
    // killed hard must not leave an emulator behind. 1 µs timer slack: see the module doc.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong);
    }
    if let Some(priority) = args.rt_priority {
        let param = libc::sched_param {
            sched_priority: priority.clamp(1, 99),
        };
        // SAFETY: `param` is a valid sched_param for the calling thread (pid 0).
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
            eprintln!(
                "arbor-wan: SCHED_FIFO not permitted ({}), normal scheduling",
                io::Error::last_os_error()
            );
        }
    }
    let sites = args
        .sites
        .iter()
        .map(|s| Site::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let limits = Limits {
        max_queued_packets: args.max_queued_packets,
        max_queued_bytes: args.max_queued_bytes,
    };
    let scheduler = Scheduler::new(sites, args.seed, limits)?;
    let tun = Tun::attach(&args.tun)?;
    set_nonblocking(libc::STDIN_FILENO).context("stdin")?;
    reply("ready")?;
    run(scheduler, &tun, Duration::from_secs(args.max_seconds))
}

fn set_nonblocking(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we were given; only the O_NONBLOCK flag changes.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn reply(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The event loop: release what is due, sleep until the next due packet or an event, read.
fn run(mut sched: Scheduler, tun: &Tun, max_run: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut packet = vec![0u8; MAX_PACKET];
    let mut stdin_buf = [0u8; 4096];
    let mut lines = LineBuffer::default();
    let mut write_errors = 0u64;
    loop {
        let now = start.elapsed();
        while let Some(p) = sched.pop_due(now) {
            if let Err(e) = tun.send(&p) {
                write_errors += 1;
                if write_errors <= MAX_REPORTED_WRITE_ERRORS {
                    eprintln!("arbor-wan: writing a {}-byte packet: {e}", p.len());
                }
            }
        }
        if now >= max_run {
            eprintln!("arbor-wan: --max-seconds reached, exiting");
            return Ok(());
        }
        let wake = sched.next_due().map_or(max_run, |d| d.min(max_run));
        let timeout = wake.saturating_sub(start.elapsed());
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let mut fds = [
            libc::pollfd {
                fd: tun.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds, `ts` a valid timespec, no signal mask.
        let ready = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("ppoll");
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            anyhow::bail!("the TUN device failed (revents {:#x})", fds[0].revents);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            for _ in 0..MAX_READS_PER_WAKE {
                match tun.recv(&mut packet).context("reading the TUN device")? {
                    Some(n) => {
                        sched.submit(start.elapsed(), packet[..n].to_vec());
                    }
                    None => break,
                }
            }
        }
        if fds[1].revents != 0 {
            // SAFETY: `stdin_buf` is valid for writes of its length.
            let n = unsafe {
                libc::read(
                    libc::STDIN_FILENO,
                    stdin_buf.as_mut_ptr().cast(),
                    stdin_buf.len(),
                )
            };
            if n == 0 {
                return Ok(()); // end of input: the fixture is gone or done
            }
            if n < 0 {
                let err = io::Error::last_os_error();
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(err).context("reading stdin");
            }
            for line in lines.push(&stdin_buf[..n as usize]) {
                let text = match line {
                    Line::TooLong => {
                        reply(&format!(
                            "error: command longer than {} bytes",
                            control::MAX_LINE
                        ))?;
                        continue;
                    }
                    Line::Text(t) => t,
                };
                match control::parse(&text) {
                    Ok(Command::Link { src, dst, link }) => {
                        match sched.set_link(&src, &dst, link) {
                            Ok(()) => reply("ok")?,
                            Err(e) => reply(&format!("error: {e}"))?,
                        }
                    }
                    Ok(Command::Stats) => {
                        let snapshot = sched.snapshot();
                        let stats = StatsReply {
                            snapshot: &snapshot,
                            write_errors,
                            uptime_s: start.elapsed().as_secs_f64(),
                        };
                        reply(&serde_json::to_string(&stats).context("serialising stats")?)?;
                    }
                    Ok(Command::Quit) => {
                        reply("ok")?;
                        return Ok(());
                    }
                    Err(e) => reply(&format!("error: {e}"))?,
                }
            }
        }
    }
}
