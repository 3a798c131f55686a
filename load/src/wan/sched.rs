//! The scheduler: `arbor-wan`'s sans-IO core.
//!
//! A [`Scheduler`] knows the sites (a name and an IPv4 prefix each) and, for every *directed*
//! pair of sites, a [`Link`]: a one-way delay and a loss probability. It never reads a clock or
//! touches a device. The I/O shell (`main.rs`) feeds it raw IP packets together with the time
//! they arrived (`submit(now, packet)`), asks when the earliest held packet is due
//! (`next_due()`), sleeps until then, and collects what is due (`pop_due(now)`). Time is a
//! [`Duration`] since an arbitrary origin chosen by the caller (the shell uses the moment it
//! started), so tests drive it with made-up instants and get exactly the same answers every run.
//!
//! What happens to a submitted packet:
//!
//! 1. It is classified by its IPv4 source and destination address. A packet that is not IPv4 is
//!    dropped (counted in `not_ipv4`); an IPv4 packet whose source or destination is in no site
//!    (or both in the same site) passes with no delay (counted in `unmatched`).
//! 2. The pair's random stream decides whether it is lost (probability `loss`). Each directed pair
//!    has its own generator, seeded from the scheduler's seed and the pair, so the losses of one
//!    pair depend only on the seed and on how many packets that pair carried before — not on the
//!    traffic of other pairs, nor on timing. Same seed, same packets: same losses.
//! 3. Otherwise it is held until `due = max(now + delay, due of the pair's previous packet)`.
//!    The `max` keeps each pair first-in first-out even while its delay is being lowered (a real
//!    path does not reorder because its queue got shorter), and a sequence number breaks ties, so
//!    packets due at the same instant leave in arrival order.
//! 4. Everything held is bounded by [`Limits`]: a packet that would exceed the number of held
//!    packets or held bytes is dropped and counted in `overflow`, like a full router queue.
//!
//! A link change ([`Scheduler::set_link`]) applies to packets submitted afterwards; packets
//! already held keep the due time they got.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::WanError;

/// The longest one-way delay a link may have. Anything longer is a typo, not a network.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The most sites one scheduler handles (the fixture numbers them into one octet).
pub const MAX_SITES: usize = 250;

/// Longest site name (names travel in control commands and stats).
pub const MAX_SITE_NAME: usize = 32;

/// Bounds on what the scheduler holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Held packets, over all pairs.
    pub max_queued_packets: usize,
    /// Held bytes (IP packet lengths), over all pairs.
    pub max_queued_bytes: usize,
}

impl Default for Limits {
    /// 65 536 packets / 64 MiB: one second of 500 Mbit/s of full-size packets, far beyond what a
    /// test pushes through, small enough that a runaway sender cannot exhaust memory.
    fn default() -> Self {
        Limits {
            max_queued_packets: 65_536,
            max_queued_bytes: 64 << 20,
        }
    }
}

/// A site: a name and the IPv4 prefix its addresses are in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    network: u32,
    mask: u32,
    prefix_len: u8,
}

impl Site {
    /// A site named `name` owning `network/prefix_len` (host bits must be zero).
    pub fn new(name: &str, network: Ipv4Addr, prefix_len: u8) -> Result<Site, WanError> {
        if name.is_empty()
            || name.len() > MAX_SITE_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(WanError::Site(format!(
                "bad site name {name:?}: 1..={MAX_SITE_NAME} characters of [A-Za-z0-9_.-]"
            )));
        }
        if prefix_len > 32 {
            return Err(WanError::Site(format!(
                "bad prefix length /{prefix_len} for site {name}"
            )));
        }
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        };
        let network = u32::from(network);
        if network & !mask != 0 {
            return Err(WanError::Site(format!(
                "{}/{prefix_len} of site {name} has host bits set",
                Ipv4Addr::from(network)
            )));
        }
        Ok(Site {
            name: name.to_string(),
            network,
            mask,
            prefix_len,
        })
    }

    /// Parses `name=a.b.c.d/len`, the command-line form.
    pub fn parse(spec: &str) -> Result<Site, WanError> {
        let bad = || WanError::Site(format!("bad site {spec:?}: expected name=a.b.c.d/len"));
        let (name, net) = spec.split_once('=').ok_or_else(bad)?;
        let (addr, len) = net.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        Site::new(name, addr, len)
    }

    fn contains(&self, addr: u32) -> bool {
        addr & self.mask == self.network
    }

    fn overlaps(&self, other: &Site) -> bool {
        let mask = self.mask & other.mask;
        self.network & mask == other.network & mask
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={}/{}",
            self.name,
            Ipv4Addr::from(self.network),
            self.prefix_len
        )
    }
}

/// One direction of the path between two sites.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// How long each packet is held.
    pub delay: Duration,
    /// Probability in `0.0..=1.0` that a packet is dropped.
    pub loss: f64,
}

impl Link {
    /// A perfect link: no delay, no loss (every pair starts like this).
    pub const PERFECT: Link = Link {
        delay: Duration::ZERO,
        loss: 0.0,
    };

    /// A link with `delay` and `loss`, checked: `loss` must be a number in `0..=1`, `delay` at
    /// most [`MAX_DELAY`].
    pub fn new(delay: Duration, loss: f64) -> Result<Link, WanError> {
        if !(0.0..=1.0).contains(&loss) {
            return Err(WanError::Link(format!(
                "loss {loss} is not a fraction in 0..=1"
            )));
        }
        if delay > MAX_DELAY {
            return Err(WanError::Link(format!(
                "delay {delay:?} exceeds {MAX_DELAY:?}"
            )));
        }
        Ok(Link { delay, loss })
    }
}

/// Counters of one directed pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PairCounters {
    /// Packets released (written back to the network).
    pub forwarded: u64,
    /// Packets dropped by the link's loss.
    pub dropped: u64,
    /// Packets dropped because the scheduler's [`Limits`] were reached.
    pub overflow: u64,
    /// Packets held right now.
    pub queued: u64,
}

/// What [`Scheduler::submit`] did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Held for a pair, to be released at `due`.
    Held { due: Duration },
    /// IPv4 but not between two different sites: released at once.
    Unmatched,
    /// Dropped by the pair's loss.
    Lost,
    /// Dropped because the scheduler is full.
    Overflow,
    /// Not an IPv4 packet: dropped.
    NotIpv4,
}

/// How late packets were released compared with their due time, as measured by the caller's
/// clock at `pop_due` (so it includes the shell's wake-up latency, which is what it is for).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Lateness {
    /// Packets measured.
    pub count: u64,
    /// Sum of lateness, nanoseconds.
    pub total_ns: u64,
    /// Worst lateness, nanoseconds.
    pub max_ns: u64,
    /// Packets released within 100 µs, 250 µs, 500 µs, 1 ms, 2 ms, 5 ms of their due time, and
    /// later than that.
    pub buckets: [u64; 7],
}

/// Upper bounds (µs) of [`Lateness::buckets`], all but the last.
pub const LATENESS_BUCKETS_US: [u64; 6] = [100, 250, 500, 1_000, 2_000, 5_000];

impl Lateness {
    fn record(&mut self, late: Duration) {
        let ns = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
        self.count += 1;
        self.total_ns = self.total_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
        let us = ns / 1_000;
        let i = LATENESS_BUCKETS_US
            .iter()
            .position(|&b| us < b)
            .unwrap_or(LATENESS_BUCKETS_US.len());
        self.buckets[i] += 1;
    }
}

/// Everything counted, for the `stats` command.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    /// One entry per directed pair of different sites.
    pub pairs: Vec<PairSnapshot>,
    /// IPv4 packets not between two sites, passed undelayed.
    pub unmatched: u64,
    /// Non-IPv4 packets dropped.
    pub not_ipv4: u64,
    /// Packets held right now, over all pairs.
    pub queued_packets: usize,
    /// Bytes held right now.
    pub queued_bytes: usize,
    /// How late held packets left.
    pub lateness: Lateness,
}

/// One directed pair in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairSnapshot {
    pub src: String,
    pub dst: String,
    /// The link's current delay, milliseconds.
    pub delay_ms: f64,
    /// The link's current loss fraction.
    pub loss: f64,
    #[serde(flatten)]
    pub counters: PairCounters,
}

/// A packet waiting for its due time.
struct Held {
    due: Duration,
    seq: u64,
    /// Index of the directed pair, or `None` for an unmatched packet.
    pair: Option<usize>,
    packet: Vec<u8>,
}

// Ordered by (due, seq) reversed, so that `BinaryHeap` (a max-heap) pops the earliest first.
impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Held {}

/// Per directed pair: its link, its random stream, its counters, its last due time.
struct Pair {
    link: Link,
    rng: StdRng,
    counters: PairCounters,
    last_due: Duration,
}

/// Decides, for every packet between two sites, whether it is lost and when it leaves. See the
/// module documentation.
pub struct Scheduler {
    sites: Vec<Site>,
    /// `sites.len()²` entries, `src * n + dst` (the diagonal is unused).
    pairs: Vec<Pair>,
    heap: BinaryHeap<Held>,
    queued_bytes: usize,
    limits: Limits,
    seq: u64,
    unmatched: u64,
    not_ipv4: u64,
    lateness: Lateness,
}

/// SplitMix64's finaliser: spreads (seed, pair) into well-mixed generator seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Scheduler {
    /// A scheduler for `sites` (1..=[`MAX_SITES`], unique names, non-overlapping prefixes),
    /// every link perfect, loss decisions seeded by `seed`.
    pub fn new(sites: Vec<Site>, seed: u64, limits: Limits) -> Result<Scheduler, WanError> {
        if sites.is_empty() || sites.len() > MAX_SITES {
            return Err(WanError::Site(format!(
                "{} sites: need 1..={MAX_SITES}",
                sites.len()
            )));
        }
        for (i, a) in sites.iter().enumerate() {
            for b in &sites[..i] {
                if a.name == b.name {
                    return Err(WanError::Site(format!("site name {} used twice", a.name)));
                }
                if a.overlaps(b) {
                    return Err(WanError::Site(format!("sites {a} and {b} overlap")));
                }
            }
        }
        let n = sites.len();
        let pairs = (0..n * n)
            .map(|i| Pair {
                link: Link::PERFECT,
                rng: StdRng::seed_from_u64(mix(seed ^ mix(i as u64))),
                counters: PairCounters::default(),
                last_due: Duration::ZERO,
            })
            .collect();
        Ok(Scheduler {
            sites,
            pairs,
            heap: BinaryHeap::new(),
            queued_bytes: 0,
            limits,
            seq: 0,
            unmatched: 0,
            not_ipv4: 0,
            lateness: Lateness::default(),
        })
    }

    fn site_index(&self, name: &str) -> Result<usize, WanError> {
        self.sites
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| WanError::Link(format!("no site named {name:?}")))
    }

    fn site_of(&self, addr: u32) -> Option<usize> {
        self.sites.iter().position(|s| s.contains(addr))
    }

    /// Sets the link from site `src` to site `dst` (one direction). Applies to packets
    /// submitted from now on.
    pub fn set_link(&mut self, src: &str, dst: &str, link: Link) -> Result<(), WanError> {
        let (s, d) = (self.site_index(src)?, self.site_index(dst)?);
        if s == d {
            return Err(WanError::Link(format!(
                "{src} -> {dst}: a site does not link to itself"
            )));
        }
        let n = self.sites.len();
        self.pairs[s * n + d].link = link;
        Ok(())
    }

    /// Takes a raw IP packet that arrived at `now` (see the module documentation).
    pub fn submit(&mut self, now: Duration, packet: Vec<u8>) -> Outcome {
        // An IPv4 header is at least 20 bytes; version in the high nibble of byte 0, source
        // address at 12..16, destination at 16..20.
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            self.not_ipv4 += 1;
            return Outcome::NotIpv4;
        }
        let addr = |at: usize| {
            u32::from_be_bytes([packet[at], packet[at + 1], packet[at + 2], packet[at + 3]])
        };
        let (src, dst) = (self.site_of(addr(12)), self.site_of(addr(16)));
        let pair = match (src, dst) {
            (Some(s), Some(d)) if s != d => Some(s * self.sites.len() + d),
            _ => None,
        };
        let (due, outcome) = match pair {
            // Released in the same pass of the shell's loop, so it needs no bound of its own.
            None => {
                self.unmatched += 1;
                (now, Outcome::Unmatched)
            }
            Some(p) => {
                let full = self.heap.len() >= self.limits.max_queued_packets
                    || self.queued_bytes.saturating_add(packet.len())
                        > self.limits.max_queued_bytes;
                let pair = &mut self.pairs[p];
                // Draw for every packet, even on a loss-free link, so that the stream's position
                // depends only on the packet count and a later loss setting is reproducible.
                let draw: f64 = pair.rng.random();
                if draw < pair.link.loss {
                    pair.counters.dropped += 1;
                    return Outcome::Lost;
                }
                if full {
                    pair.counters.overflow += 1;
                    return Outcome::Overflow;
                }
                let due = (now + pair.link.delay).max(pair.last_due);
                pair.last_due = due;
                pair.counters.queued += 1;
                (due, Outcome::Held { due })
            }
        };
        self.seq += 1;
        self.queued_bytes += packet.len();
        self.heap.push(Held {
            due,
            seq: self.seq,
            pair,
            packet,
        });
        outcome
    }

    /// When the earliest held packet is due, if any: the shell sleeps until then.
    pub fn next_due(&self) -> Option<Duration> {
        self.heap.peek().map(|h| h.due)
    }

    /// The earliest held packet if it is due at `now`, counting it as forwarded and recording how
    /// late it leaves. Call repeatedly until `None`.
    pub fn pop_due(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.heap.peek()?.due > now {
            return None;
        }
        let held = self.heap.pop()?;
        self.queued_bytes -= held.packet.len();
        if let Some(p) = held.pair {
            let c = &mut self.pairs[p].counters;
            c.queued -= 1;
            c.forwarded += 1;
            self.lateness.record(now - held.due);
        }
        Some(held.packet)
    }

    /// Every counter, and every link's current setting.
    pub fn snapshot(&self) -> Snapshot {
        let n = self.sites.len();
        let mut pairs = Vec::with_capacity(n * n.saturating_sub(1));
        for (s, src) in self.sites.iter().enumerate() {
            for (d, dst) in self.sites.iter().enumerate() {
                if s != d {
                    let p = &self.pairs[s * n + d];
                    pairs.push(PairSnapshot {
                        src: src.name.clone(),
                        dst: dst.name.clone(),
                        delay_ms: p.link.delay.as_secs_f64() * 1e3,
                        loss: p.link.loss,
                        counters: p.counters,
                    });
                }
            }
        }
        Snapshot {
            pairs,
            unmatched: self.unmatched,
            not_ipv4: self.not_ipv4,
            queued_packets: self.heap.len(),
            queued_bytes: self.queued_bytes,
            lateness: self.lateness,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A minimal IPv4 packet from `src` to `dst` whose byte 20 carries `tag` (to follow it).
    fn pkt(src: [u8; 4], dst: [u8; 4], tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 21];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20] = tag;
        p
    }

    const A: [u8; 4] = [10, 210, 1, 2];
    const B: [u8; 4] = [10, 210, 2, 2];
    const C: [u8; 4] = [10, 210, 3, 2];

    fn three(seed: u64) -> Scheduler {
        let sites = ["a=10.210.1.0/24", "b=10.210.2.0/24", "c=10.210.3.0/24"]
            .iter()
            .map(|s| Site::parse(s).unwrap())
            .collect();
        Scheduler::new(sites, seed, Limits::default()).unwrap()
    }

    fn drain(s: &mut Scheduler, now: Duration) -> Vec<u8> {
        std::iter::from_fn(|| s.pop_due(now))
            .map(|p| p[20])
            .collect()
    }

    #[test]
    fn perfect_links_release_at_once() {
        let mut s = three(1);
        assert_eq!(s.submit(ms(5), pkt(A, B, 1)), Outcome::Held { due: ms(5) });
        assert_eq!(s.next_due(), Some(ms(5)));
        assert_eq!(drain(&mut s, ms(5)), vec![1]);
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn delay_holds_packets_until_due_and_only_one_direction() {
        let mut s = three(1);
        s.set_link("a", "b", Link::new(ms(30), 0.0).unwrap())
            .unwrap();
        s.submit(ms(0), pkt(A, B, 1));
        s.submit(ms(1), pkt(B, A, 2)); // b -> a is still perfect
        assert_eq!(drain(&mut s, ms(1)), vec![2]);
        assert_eq!(s.next_due(), Some(ms(30)));
        assert!(drain(&mut s, ms(29)).is_empty());
        assert_eq!(drain(&mut s, ms(30)), vec![1]);
    }

    #[test]
    fn equal_delays_keep_arrival_order_and_pairs_interleave_by_due_time() {
        let mut s = three(1);
        s.set_link("a", "b", Link::new(ms(10), 0.0).unwrap())
            .unwrap();
        s.set_link("a", "c", Link::new(ms(3), 0.0).unwrap())
            .unwrap();
        for tag in 0..5 {
            s.submit(ms(2), pkt(A, B, tag)); // all due at 12 ms: arrival order must hold
        }
        s.submit(ms(4), pkt(A, C, 100)); // due at 7 ms: leaves first
        assert_eq!(drain(&mut s, ms(20)), vec![100, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn lowering_a_delay_never_reorders_a_pair() {
        let mut s = three(1);
        s.set_link("a", "b", Link::new(ms(50), 0.0).unwrap())
            .unwrap();
        s.submit(ms(0), pkt(A, B, 1)); // due 50
        s.set_link("a", "b", Link::new(ms(5), 0.0).unwrap())
            .unwrap();
        assert_eq!(s.submit(ms(1), pkt(A, B, 2)), Outcome::Held { due: ms(50) });
        assert_eq!(
            s.submit(ms(60), pkt(A, B, 3)),
            Outcome::Held { due: ms(65) }
        );
        assert_eq!(drain(&mut s, ms(100)), vec![1, 2, 3]);
    }

    #[test]
    fn loss_fraction_is_within_binomial_bounds_and_reproducible() {
        let run = |seed| {
            let mut s = three(seed);
            s.set_link("a", "b", Link::new(ms(0), 0.1).unwrap())
                .unwrap();
            (0..20_000)
                .map(|i| s.submit(ms(i), pkt(A, B, 0)) == Outcome::Lost)
                .collect::<Vec<_>>()
        };
        let lost = run(7);
        let n = lost.iter().filter(|&&l| l).count() as f64;
        // mean 2000, sd sqrt(20000 * 0.1 * 0.9) = 42.4; 6 sd either side.
        assert!((n - 2000.0).abs() < 6.0 * 42.5, "{n} lost of 20000 at 10%");
        assert_eq!(lost, run(7), "same seed, same losses");
        assert_ne!(lost, run(8), "another seed, other losses");
    }

    #[test]
    fn losses_of_a_pair_do_not_depend_on_other_pairs_traffic() {
        let run = |noise: bool| {
            let mut s = three(3);
            s.set_link("a", "b", Link::new(ms(0), 0.5).unwrap())
                .unwrap();
            let mut out = Vec::new();
            for i in 0..200 {
                if noise {
                    s.submit(ms(i), pkt(C, A, 0));
                }
                out.push(s.submit(ms(i), pkt(A, B, 0)));
            }
            out
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn full_and_zero_loss_are_exact() {
        let mut s = three(1);
        s.set_link("a", "b", Link::new(ms(0), 1.0).unwrap())
            .unwrap();
        for i in 0..1000 {
            assert_eq!(s.submit(ms(i), pkt(A, B, 0)), Outcome::Lost);
            assert!(matches!(
                s.submit(ms(i), pkt(B, A, 0)),
                Outcome::Held { .. }
            ));
        }
        drain(&mut s, ms(1000));
        let snap = s.snapshot();
        let ab = snap
            .pairs
            .iter()
            .find(|p| p.src == "a" && p.dst == "b")
            .unwrap();
        let ba = snap
            .pairs
            .iter()
            .find(|p| p.src == "b" && p.dst == "a")
            .unwrap();
        assert_eq!((ab.counters.forwarded, ab.counters.dropped), (0, 1000));
        assert_eq!((ba.counters.forwarded, ba.counters.dropped), (1000, 0));
    }

    #[test]
    fn non_ipv4_is_dropped_and_non_site_traffic_passes() {
        let mut s = three(1);
        s.set_link("a", "b", Link::new(ms(10), 0.0).unwrap())
            .unwrap();
        let mut v6 = pkt(A, B, 9);
        v6[0] = 0x60;
        assert_eq!(s.submit(ms(0), v6), Outcome::NotIpv4);
        assert_eq!(
            s.submit(ms(0), vec![0x45; 10]),
            Outcome::NotIpv4,
            "truncated header"
        );
        assert_eq!(
            s.submit(ms(0), pkt(A, [10, 9, 9, 9], 4)),
            Outcome::Unmatched
        );
        assert_eq!(
            s.submit(ms(0), pkt(A, [10, 210, 1, 7], 5)),
            Outcome::Unmatched,
            "same site"
        );
        assert_eq!(drain(&mut s, ms(0)), vec![4, 5]);
        let snap = s.snapshot();
        assert_eq!((snap.not_ipv4, snap.unmatched), (2, 2));
        assert!(snap
            .pairs
            .iter()
            .all(|p| p.counters == PairCounters::default()));
    }

    #[test]
    fn limits_bound_what_is_held() {
        let sites = vec![
            Site::parse("a=10.210.1.0/24").unwrap(),
            Site::parse("b=10.210.2.0/24").unwrap(),
        ];
        let limits = Limits {
            max_queued_packets: 3,
            max_queued_bytes: 1 << 20,
        };
        let mut s = Scheduler::new(sites, 1, limits).unwrap();
        s.set_link("a", "b", Link::new(ms(10), 0.0).unwrap())
            .unwrap();
        for i in 0..5 {
            s.submit(ms(0), pkt(A, B, i));
        }
        let snap = s.snapshot();
        assert_eq!(
            (snap.queued_packets, snap.pairs[0].counters.overflow),
            (3, 2)
        );
        assert_eq!(drain(&mut s, ms(10)), vec![0, 1, 2]);
        // Bytes bound too: two 21-byte packets fit in 50 bytes, the third does not.
        let sites = vec![
            Site::parse("a=10.210.1.0/24").unwrap(),
            Site::parse("b=10.210.2.0/24").unwrap(),
        ];
        let mut s = Scheduler::new(
            sites,
            1,
            Limits {
                max_queued_packets: 100,
                max_queued_bytes: 50,
            },
        )
        .unwrap();
        s.set_link("a", "b", Link::new(ms(10), 0.0).unwrap())
            .unwrap();
        let outcomes: Vec<_> = (0..3).map(|i| s.submit(ms(0), pkt(A, B, i))).collect();
        assert_eq!(outcomes[2], Outcome::Overflow);
        assert_eq!(s.snapshot().queued_bytes, 42);
    }

    #[test]
    fn lateness_is_measured_against_due_time() {
        let mut s = three(1);
        s.set_link("a", "b", Link::new(ms(10), 0.0).unwrap())
            .unwrap();
        s.submit(ms(0), pkt(A, B, 1));
        s.submit(ms(0), pkt(A, B, 2));
        assert_eq!(
            s.pop_due(Duration::from_micros(10_050)).map(|p| p[20]),
            Some(1)
        );
        assert_eq!(
            s.pop_due(Duration::from_micros(13_000)).map(|p| p[20]),
            Some(2)
        );
        let l = s.snapshot().lateness;
        assert_eq!((l.count, l.max_ns, l.total_ns), (2, 3_000_000, 3_050_000));
        assert_eq!(l.buckets, [1, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn bad_configuration_is_an_error_not_a_panic() {
        assert!(Site::parse("a").is_err());
        assert!(Site::parse("a=10.0.0.1/24").is_err(), "host bits");
        assert!(Site::parse("a=10.0.0.0/33").is_err());
        assert!(Site::parse("a b=10.0.0.0/24").is_err());
        assert!(Site::parse("=10.0.0.0/24").is_err());
        let a = Site::parse("a=10.0.0.0/16").unwrap();
        let b = Site::parse("b=10.0.1.0/24").unwrap();
        assert!(
            Scheduler::new(vec![a.clone(), b], 1, Limits::default()).is_err(),
            "overlap"
        );
        assert!(
            Scheduler::new(vec![a.clone(), a], 1, Limits::default()).is_err(),
            "duplicate"
        );
        assert!(Scheduler::new(vec![], 1, Limits::default()).is_err());
        assert!(Link::new(ms(0), 1.5).is_err());
        assert!(Link::new(ms(0), f64::NAN).is_err());
        assert!(Link::new(ms(0), -0.1).is_err());
        assert!(Link::new(Duration::from_secs(61), 0.0).is_err());
        let mut s = three(1);
        assert!(s.set_link("a", "a", Link::PERFECT).is_err());
        assert!(s.set_link("a", "zz", Link::PERFECT).is_err());
    }
}
