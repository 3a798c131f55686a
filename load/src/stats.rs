//! What the simulated subscribers see, and what the server costs.
//!
//! Two kinds of measurement meet here:
//!
//! * [`TrackRecv`] is the receive-side state of one subscribed track: it counts packets, tracks
//!   the highest extended sequence number (so sequence gaps become *loss*), and keeps the RFC 3550
//!   interarrival *jitter* estimate. It is owned by the one task that reads the track, so the
//!   per-packet path takes no lock; it publishes its totals through relaxed atomics in a
//!   [`TrackCounters`] that the reporter reads once per step.
//! * [`ProcSample`] reads `/proc/<pid>/stat` and `/proc/<pid>/status` of the server: CPU time
//!   (user + system, all threads) and resident memory. The difference of two samples divided by
//!   the packets the subscribers received in between is the headline number, *server CPU
//!   microseconds per forwarded packet*.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Totals of one subscribed track, written by its reader task, read by the reporter.
#[derive(Debug, Default)]
pub struct TrackCounters {
    /// Packets received (duplicates included, as a real receiver would count them).
    pub received: AtomicU64,
    /// Packets expected from the sequence numbers: highest extended sequence - first + 1.
    pub expected: AtomicU64,
    /// Current RFC 3550 jitter estimate, in microseconds.
    pub jitter_us: AtomicU64,
    /// Media time received, in microseconds: (highest extended RTP timestamp - first) / clock
    /// rate. Over a window it should advance as fast as the wall clock; a server that queues
    /// what it cannot send delivers media slower than real time, which sequence-gap loss
    /// cannot see (the gaps have not happened yet).
    pub media_us: AtomicU64,
}

/// All tracks of a run. The registry only grows while a run lasts (a track that ended keeps its
/// totals, so deltas between steps stay correct); it is bounded by the number of subscriptions
/// the scenario creates.
#[derive(Debug, Default)]
pub struct Registry {
    tracks: Mutex<Vec<Arc<TrackCounters>>>,
    /// Join times (connect → first media packet), in microseconds, of participants that joined
    /// since the last [`Registry::take_join_times`].
    joins: Mutex<Vec<u64>>,
    /// Participants that failed to join (signal or ICE error, or no media within the timeout).
    pub join_failures: AtomicU64,
    /// Participants that joined since the run started.
    pub joined: AtomicU64,
}

/// Sums over all tracks at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub received: u64,
    pub expected: u64,
    /// Mean jitter over tracks that received something, milliseconds.
    pub mean_jitter_ms: f64,
}

impl Registry {
    /// Registers a new track and returns its counters.
    pub fn track(&self) -> Arc<TrackCounters> {
        let c = Arc::new(TrackCounters::default());
        if let Ok(mut t) = self.tracks.lock() {
            t.push(c.clone());
        }
        c
    }

    /// Records how long one participant took to join.
    pub fn join_time(&self, d: Duration) {
        self.joined.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut j) = self.joins.lock() {
            j.push(d.as_micros() as u64);
        }
    }

    /// The join times recorded since the last call.
    pub fn take_join_times(&self) -> Vec<u64> {
        self.joins
            .lock()
            .map(|mut j| std::mem::take(&mut *j))
            .unwrap_or_default()
    }

    /// `(received, media_us)` of every track, in registration order (see [`Registry::per_track`]).
    pub fn media_times(&self) -> Vec<(u64, u64)> {
        self.snapshot(|c| &c.media_us)
    }

    /// `(received, expected)` of every track, in registration order (a track's index is
    /// stable for the whole run, so two snapshots can be subtracted).
    pub fn per_track(&self) -> Vec<(u64, u64)> {
        self.snapshot(|c| &c.expected)
    }

    /// `(received, field)` of every track, in registration order.
    fn snapshot(&self, field: impl Fn(&TrackCounters) -> &AtomicU64) -> Vec<(u64, u64)> {
        match self.tracks.lock() {
            Ok(t) => t
                .iter()
                .map(|c| {
                    (
                        c.received.load(Ordering::Relaxed),
                        field(c).load(Ordering::Relaxed),
                    )
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Sums the counters of every track.
    pub fn totals(&self) -> Totals {
        let tracks = match self.tracks.lock() {
            Ok(t) => t.clone(),
            Err(_) => return Totals::default(),
        };
        let mut t = Totals::default();
        let (mut jit, mut n) = (0u64, 0u64);
        for c in &tracks {
            let r = c.received.load(Ordering::Relaxed);
            t.received += r;
            t.expected += c.expected.load(Ordering::Relaxed);
            if r > 0 {
                jit += c.jitter_us.load(Ordering::Relaxed);
                n += 1;
            }
        }
        if n > 0 {
            t.mean_jitter_ms = jit as f64 / n as f64 / 1000.0;
        }
        t
    }
}

/// Receive-side state of one track (owned by its reader; see the module docs).
#[derive(Debug)]
pub struct TrackRecv {
    counters: Arc<TrackCounters>,
    clock_rate: f64,
    first_ext: Option<u64>,
    max_ext: u64,
    /// Last arrival and its RTP timestamp, for the jitter estimate.
    last: Option<(Instant, u32)>,
    jitter: f64,
    /// First and highest extended RTP timestamp (for [`TrackCounters::media_us`]).
    first_ts: Option<u64>,
    max_ts: u64,
}

impl TrackRecv {
    pub fn new(counters: Arc<TrackCounters>, clock_rate: u32) -> Self {
        Self {
            counters,
            clock_rate: clock_rate.max(1) as f64,
            first_ext: None,
            max_ext: 0,
            last: None,
            jitter: 0.0,
            first_ts: None,
            max_ts: 0,
        }
    }

    /// Accounts one received packet (`seq`, RTP `ts`) that arrived at `now`.
    pub fn on_packet(&mut self, now: Instant, seq: u16, ts: u32) {
        let ext = extend(&mut self.first_ext, &mut self.max_ext, seq as u64, 16);
        let ts_ext = extend(&mut self.first_ts, &mut self.max_ts, ts as u64, 32);
        // RFC 3550 §6.4.1: J += (|D(i-1,i)| - J) / 16, with D in RTP timestamp units.
        if let Some((t0, ts0)) = self.last {
            let arrival = now.saturating_duration_since(t0).as_secs_f64() * self.clock_rate;
            let sent = ts.wrapping_sub(ts0) as i32 as f64;
            let d = (arrival - sent).abs();
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last = Some((now, ts));
        let first = self.first_ext.unwrap_or(ext);
        let c = &self.counters;
        c.received.fetch_add(1, Ordering::Relaxed);
        c.expected
            .store(self.max_ext - first + 1, Ordering::Relaxed);
        c.jitter_us.store(
            (self.jitter / self.clock_rate * 1e6) as u64,
            Ordering::Relaxed,
        );
        let first_ts = self.first_ts.unwrap_or(ts_ext);
        c.media_us.store(
            ((self.max_ts - first_ts) as f64 / self.clock_rate * 1e6) as u64,
            Ordering::Relaxed,
        );
    }
}

/// Extends a wrapping `bits`-bit counter (RTP sequence number or timestamp) to 64 bits: the
/// extension closest to the highest value seen so far. Updates `first` and `max`; returns the
/// extended value.
fn extend(first: &mut Option<u64>, max: &mut u64, v: u64, bits: u32) -> u64 {
    let span = 1u64 << bits;
    let ext = match first {
        None => {
            // Start the extended space high enough that a few reordered values before the
            // first one do not underflow.
            let e = (1u64 << 40) + v;
            *first = Some(e);
            *max = e;
            e
        }
        Some(_) => {
            let base = *max & !(span - 1);
            let mut best = base + v;
            let mut best_d = u64::MAX;
            for b in [base.wrapping_sub(span), base, base + span] {
                let e = b + v;
                let d = e.abs_diff(*max);
                if d < best_d {
                    best_d = d;
                    best = e;
                }
            }
            best
        }
    };
    if ext > *max {
        *max = ext;
    }
    ext
}

/// CPU time and memory of one process, read from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// User + system CPU time of all threads, microseconds.
    pub cpu_us: u64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

impl ProcSample {
    /// Reads the process `pid`; `None` if it is gone or `/proc` is unreadable.
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may contain spaces; fields after the closing paren are fixed.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After ')' the first field is state (field 3), so utime (14) and stime (15) are 11, 12.
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Some(Self {
            cpu_us: (utime + stime) * 1_000_000 / hz,
            rss_kib,
        })
    }
}

/// `p`-th percentile (0..=100) of `v` (sorted in place); 0 for an empty slice.
pub fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counts_gaps_and_survives_wrap() {
        let reg = Registry::default();
        let c = reg.track();
        let mut r = TrackRecv::new(c.clone(), 90_000);
        let t = Instant::now();
        // 65530..=65535, 0..=5 with 2 missing: 12 expected, 10 received.
        for s in (65530u32..65536).chain(0..6) {
            let s = s as u16;
            if s == 65533 || s == 2 {
                continue;
            }
            r.on_packet(t, s, 0);
        }
        assert_eq!(c.received.load(Ordering::Relaxed), 10);
        assert_eq!(c.expected.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn media_time_follows_timestamps_across_the_wrap() {
        let reg = Registry::default();
        let c = reg.track();
        let mut r = TrackRecv::new(c.clone(), 90_000);
        let t = Instant::now();
        // 2 s of 30 fps video whose timestamps wrap at 2^32 halfway.
        let start = u32::MAX - 90_000 + 1;
        for i in 0..=60u32 {
            r.on_packet(t, i as u16, start.wrapping_add(3000 * i));
        }
        assert_eq!(c.media_us.load(Ordering::Relaxed), 2_000_000);
        // A late packet from before does not move it back.
        r.on_packet(t, 61, start);
        assert_eq!(c.media_us.load(Ordering::Relaxed), 2_000_000);
    }

    #[test]
    fn reordering_is_not_loss() {
        let reg = Registry::default();
        let c = reg.track();
        let mut r = TrackRecv::new(c.clone(), 90_000);
        let t = Instant::now();
        for s in [10u16, 12, 11, 13] {
            r.on_packet(t, s, 0);
        }
        assert_eq!(c.expected.load(Ordering::Relaxed), 4);
        assert_eq!(c.received.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn jitter_is_zero_for_perfect_pacing_and_grows_otherwise() {
        let reg = Registry::default();
        let c = reg.track();
        let mut r = TrackRecv::new(c.clone(), 1000);
        let t0 = Instant::now();
        for i in 0..50u32 {
            r.on_packet(t0 + Duration::from_millis(20 * i as u64), i as u16, 20 * i);
        }
        assert!(c.jitter_us.load(Ordering::Relaxed) < 100);
        for i in 50..100u32 {
            let wobble = if i % 2 == 0 { 10 } else { 0 };
            r.on_packet(
                t0 + Duration::from_millis(20 * i as u64 + wobble),
                i as u16,
                20 * i,
            );
        }
        assert!(c.jitter_us.load(Ordering::Relaxed) > 3000);
    }

    #[test]
    fn percentiles() {
        let mut v = vec![5, 1, 4, 2, 3];
        assert_eq!(percentile(&mut v, 50.0), 3);
        assert_eq!(percentile(&mut v, 100.0), 5);
        assert_eq!(percentile(&mut [], 95.0), 0);
    }

    #[test]
    fn reads_own_process() {
        let s = ProcSample::read(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0);
    }
}
