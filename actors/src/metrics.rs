//! Process-wide counters, rendered in the Prometheus text exposition format.
//!
//! Counters are relaxed atomics: incrementing one costs a few nanoseconds and never blocks the
//! packet path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::media::shard::MAX_SHARDS;

/// Turns cumulative per-stream counts (str0m reports NACKs as running totals per stream in its
/// periodic stats) into increments of a process counter.
#[derive(Debug)]
pub struct Tally<K> {
    last: std::collections::HashMap<K, u64>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Tally {
            last: std::collections::HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Tally<K> {
    /// Record the running total of stream `key`; returns how much it grew since last time.
    pub fn delta(&mut self, key: K, total: u64) -> u64 {
        let prev = self.last.insert(key, total).unwrap_or(0);
        total.saturating_sub(prev)
    }
}

/// All counters and gauges of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub rooms: AtomicI64,
    pub participants: AtomicI64,
    pub tracks: AtomicI64,
    pub packets_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub packets_forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub packets_dropped: AtomicU64,
    pub data_dropped: AtomicU64,
    pub plis: AtomicU64,
    pub signal_errors: AtomicU64,
    /// Signal messages refused by the per-participant rate limit (`limit.signal_rate`).
    pub signal_rate_limited: AtomicU64,
    /// Twirp (server API) requests answered, and those answered with an error.
    pub api_requests: AtomicU64,
    pub api_errors: AtomicU64,
    /// Webhook events accepted into a destination queue / delivered / dropped (queue full or
    /// retries exhausted) / failed delivery attempts (each retry counts).
    pub webhook_queued: AtomicU64,
    pub webhook_delivered: AtomicU64,
    pub webhook_dropped: AtomicU64,
    pub webhook_failed_attempts: AtomicU64,
    /// Webhook events waiting for delivery, summed over destinations.
    pub webhook_pending: AtomicI64,
    /// NACKs sent to publishers (for lost incoming packets) and received from subscribers.
    pub nacks_sent: AtomicU64,
    pub nacks_received: AtomicU64,
    /// `sendmmsg`/`sendto` calls made by the media thread's UDP socket (datagrams per call =
    /// `datagrams_sent / udp_send_syscalls`).
    pub udp_send_syscalls: AtomicU64,
    /// Messages that carried several datagrams to one destination (UDP GSO).
    pub udp_gso_messages: AtomicU64,
    /// Timeout inputs given to peer connections (str0m timers: pacer, ICE, DTLS, SCTP, BWE).
    pub peer_timeouts: AtomicU64,
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics {
    rooms: AtomicI64::new(0),
    participants: AtomicI64::new(0),
    tracks: AtomicI64::new(0),
    packets_received: AtomicU64::new(0),
    bytes_received: AtomicU64::new(0),
    packets_forwarded: AtomicU64::new(0),
    bytes_forwarded: AtomicU64::new(0),
    datagrams_sent: AtomicU64::new(0),
    bytes_sent: AtomicU64::new(0),
    packets_dropped: AtomicU64::new(0),
    data_dropped: AtomicU64::new(0),
    plis: AtomicU64::new(0),
    signal_errors: AtomicU64::new(0),
    signal_rate_limited: AtomicU64::new(0),
    api_requests: AtomicU64::new(0),
    api_errors: AtomicU64::new(0),
    webhook_queued: AtomicU64::new(0),
    webhook_delivered: AtomicU64::new(0),
    webhook_dropped: AtomicU64::new(0),
    webhook_failed_attempts: AtomicU64::new(0),
    webhook_pending: AtomicI64::new(0),
    nacks_sent: AtomicU64::new(0),
    nacks_received: AtomicU64::new(0),
    udp_send_syscalls: AtomicU64::new(0),
    udp_gso_messages: AtomicU64::new(0),
    peer_timeouts: AtomicU64::new(0),
};

impl Metrics {
    pub fn add_received(&self, bytes: usize) {
        self.packets_received.fetch_add(1, Relaxed);
        self.bytes_received.fetch_add(bytes as u64, Relaxed);
    }
    pub fn add_forwarded(&self, bytes: usize) {
        self.packets_forwarded.fetch_add(1, Relaxed);
        self.bytes_forwarded.fetch_add(bytes as u64, Relaxed);
    }
    pub fn add_sent(&self, bytes: usize) {
        self.datagrams_sent.fetch_add(1, Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Relaxed);
    }
    /// One flush of the media thread's send batch: `datagrams` datagrams of `bytes` bytes in
    /// `syscalls` system calls, `gso` of them GSO messages.
    pub fn add_sent_batch(&self, datagrams: usize, bytes: usize, syscalls: usize, gso: usize) {
        self.datagrams_sent.fetch_add(datagrams as u64, Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Relaxed);
        self.udp_send_syscalls.fetch_add(syscalls as u64, Relaxed);
        self.udp_gso_messages.fetch_add(gso as u64, Relaxed);
    }
    pub fn inc_dropped_packets(&self) {
        self.packets_dropped.fetch_add(1, Relaxed);
    }
    pub fn inc_dropped_data(&self) {
        self.data_dropped.fetch_add(1, Relaxed);
    }
    pub fn inc_plis(&self) {
        self.plis.fetch_add(1, Relaxed);
    }
    pub fn inc_signal_errors(&self) {
        self.signal_errors.fetch_add(1, Relaxed);
    }

    /// Render every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(2048);
        let gauges: [(&str, &str, i64); 4] = [
            ("arbor_rooms", "Open rooms.", self.rooms.load(Relaxed)),
            (
                "arbor_participants",
                "Connected participants.",
                self.participants.load(Relaxed),
            ),
            (
                "arbor_tracks",
                "Published tracks.",
                self.tracks.load(Relaxed),
            ),
            (
                "arbor_webhook_queue_length",
                "Webhook events waiting for delivery (all destinations).",
                self.webhook_pending.load(Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let counters: [(&str, &str, u64); 22] = [
            (
                "arbor_peer_timeouts_total",
                "Timer inputs given to peer connections (pacer, ICE, DTLS, SCTP, BWE).",
                self.peer_timeouts.load(Relaxed),
            ),
            (
                "arbor_udp_send_syscalls_total",
                "System calls that sent media datagrams (sendmmsg or sendto).",
                self.udp_send_syscalls.load(Relaxed),
            ),
            (
                "arbor_udp_gso_messages_total",
                "Messages that carried several datagrams to one destination (UDP GSO).",
                self.udp_gso_messages.load(Relaxed),
            ),
            (
                "arbor_nacks_sent_total",
                "NACKs sent to publishers for lost packets.",
                self.nacks_sent.load(Relaxed),
            ),
            (
                "arbor_nacks_received_total",
                "NACKs received from subscribers.",
                self.nacks_received.load(Relaxed),
            ),
            (
                "arbor_media_frames_received_total",
                "Media frames received from publishers.",
                self.packets_received.load(Relaxed),
            ),
            (
                "arbor_media_bytes_received_total",
                "Media payload bytes received from publishers.",
                self.bytes_received.load(Relaxed),
            ),
            (
                "arbor_media_frames_forwarded_total",
                "Media frames written to subscribers.",
                self.packets_forwarded.load(Relaxed),
            ),
            (
                "arbor_media_bytes_forwarded_total",
                "Media payload bytes written to subscribers.",
                self.bytes_forwarded.load(Relaxed),
            ),
            (
                "arbor_datagrams_sent_total",
                "Datagrams/frames sent on media sockets.",
                self.datagrams_sent.load(Relaxed),
            ),
            (
                "arbor_bytes_sent_total",
                "Bytes sent on media sockets.",
                self.bytes_sent.load(Relaxed),
            ),
            (
                "arbor_packets_dropped_total",
                "Packets dropped (unroutable, socket full, write error).",
                self.packets_dropped.load(Relaxed),
            ),
            (
                "arbor_data_messages_dropped_total",
                "Data-channel messages dropped.",
                self.data_dropped.load(Relaxed),
            ),
            (
                "arbor_plis_total",
                "Keyframe requests sent to publishers.",
                self.plis.load(Relaxed),
            ),
            (
                "arbor_signal_errors_total",
                "Rejected signal messages.",
                self.signal_errors.load(Relaxed),
            ),
            (
                "arbor_signal_rate_limited_total",
                "Signal messages over limit.signal_rate (the sender is disconnected).",
                self.signal_rate_limited.load(Relaxed),
            ),
            (
                "arbor_api_requests_total",
                "Twirp server API requests.",
                self.api_requests.load(Relaxed),
            ),
            (
                "arbor_api_errors_total",
                "Twirp server API requests answered with an error.",
                self.api_errors.load(Relaxed),
            ),
            (
                "arbor_webhook_events_queued_total",
                "Webhook events accepted into a destination queue.",
                self.webhook_queued.load(Relaxed),
            ),
            (
                "arbor_webhook_events_delivered_total",
                "Webhook events delivered (2xx answer).",
                self.webhook_delivered.load(Relaxed),
            ),
            (
                "arbor_webhook_events_dropped_total",
                "Webhook events dropped (queue full or retries exhausted).",
                self.webhook_dropped.load(Relaxed),
            ),
            (
                "arbor_webhook_failed_attempts_total",
                "Webhook delivery attempts that failed (each retry counts).",
                self.webhook_failed_attempts.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        crate::media::relay::RELAY_METRICS.render(&mut s);
        SHARD_METRICS.render(&mut s);
        s
    }
}

/// Counters of one media shard, written only by its thread (one cache line each, so shards
/// never contend).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ShardStats {
    peers: AtomicU64,
    datagrams: AtomicU64,
    cpu_us: AtomicU64,
}

impl ShardStats {
    const fn new() -> Self {
        ShardStats {
            peers: AtomicU64::new(0),
            datagrams: AtomicU64::new(0),
            cpu_us: AtomicU64::new(0),
        }
    }
    /// The shard's current number of peer connections.
    pub fn set_peers(&self, n: usize) {
        self.peers.store(n as u64, Relaxed);
    }
    /// UDP datagrams read by the shard.
    pub fn add_datagrams(&self, n: usize) {
        self.datagrams.fetch_add(n as u64, Relaxed);
    }
    /// The CPU time the shard's thread has used so far.
    pub fn set_cpu(&self, d: Duration) {
        self.cpu_us.store(d.as_micros() as u64, Relaxed);
    }
}

/// Per-shard counters of the media plane, labelled `shard="i"` in `/metrics`.
#[derive(Debug)]
pub struct ShardMetrics {
    shards: AtomicUsize,
    stats: [ShardStats; MAX_SHARDS],
}

/// The media shards' counters.
pub static SHARD_METRICS: ShardMetrics = ShardMetrics {
    shards: AtomicUsize::new(0),
    stats: [const { ShardStats::new() }; MAX_SHARDS],
};

impl ShardMetrics {
    /// How many shards run (rendered: shards `0..n`).
    pub fn set_shards(&self, n: usize) {
        self.shards.store(n.min(MAX_SHARDS), Relaxed);
    }
    /// The counters of shard `i` (clamped into range).
    pub fn shard(&self, i: usize) -> &ShardStats {
        &self.stats[i.min(MAX_SHARDS - 1)]
    }
    fn render(&self, s: &mut String) {
        let n = self.shards.load(Relaxed);
        type Family = (
            &'static str,
            &'static str,
            &'static str,
            fn(&ShardStats) -> String,
        );
        let families: [Family; 3] = [
            (
                "arbor_media_shard_peers",
                "gauge",
                "Peer connections on each media shard.",
                |x| x.peers.load(Relaxed).to_string(),
            ),
            (
                "arbor_media_shard_datagrams_received_total",
                "counter",
                "UDP datagrams read by each media shard.",
                |x| x.datagrams.load(Relaxed).to_string(),
            ),
            (
                "arbor_media_shard_cpu_seconds_total",
                "counter",
                "CPU time used by each media shard's thread (sampled every 250 ms).",
                |x| format!("{:.6}", x.cpu_us.load(Relaxed) as f64 / 1e6),
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, x) in self.stats.iter().take(n).enumerate() {
                let _ = writeln!(s, "{name}{{shard=\"{i}\"}} {}", value(x));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_turns_totals_into_deltas() {
        let mut t = Tally::default();
        assert_eq!(t.delta(("a", true), 3), 3);
        assert_eq!(t.delta(("a", true), 5), 2);
        assert_eq!(t.delta(("b", true), 1), 1);
        assert_eq!(t.delta(("a", true), 5), 0);
        // A stream that restarts from zero never makes the counter go back.
        assert_eq!(t.delta(("a", true), 1), 0);
    }

    #[test]
    fn render_is_prometheus_text() {
        let text = METRICS.render();
        for name in [
            "arbor_rooms",
            "arbor_nacks_sent_total",
            "arbor_webhook_queue_length",
            "arbor_webhook_events_dropped_total",
            "arbor_signal_rate_limited_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))));
        }
    }

    #[test]
    fn shard_metrics_are_labelled_per_shard() {
        let m = ShardMetrics {
            shards: AtomicUsize::new(0),
            stats: [const { ShardStats::new() }; MAX_SHARDS],
        };
        m.set_shards(2);
        m.shard(0).set_peers(3);
        m.shard(1).add_datagrams(5);
        m.shard(1).set_cpu(Duration::from_millis(1500));
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("# TYPE arbor_media_shard_peers gauge"));
        assert!(s.contains("arbor_media_shard_peers{shard=\"0\"} 3\n"));
        assert!(s.contains("arbor_media_shard_peers{shard=\"1\"} 0\n"));
        assert!(s.contains("arbor_media_shard_datagrams_received_total{shard=\"1\"} 5\n"));
        assert!(s.contains("arbor_media_shard_cpu_seconds_total{shard=\"1\"} 1.500000\n"));
        assert!(!s.contains("shard=\"2\""));
    }
}
