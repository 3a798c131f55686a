//! Heap memory per subscriber connection, measured with a counting allocator: an engine with
//! one publisher and N connected subscribers (the `forward` bench's harness), after 3 s of
//! simulated media (one 1000-byte video packet every 20 ms, so each subscriber's
//! retransmission history is as full as it gets at this rate). Prints live heap bytes per
//! subscriber for Arbor's limits (`rtc.rtx_*`) and for str0m's defaults (3 s of history).
//!
//! `cargo bench -p arbor-actors --bench memory` (not a criterion bench: it prints one table).
//! Heap bytes are what the program asked for, not RSS: the allocator's own overhead and
//! fragmentation come on top (see `docs/performance.md`).

mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

use std::net::SocketAddr;
use std::time::Instant;

use arbor_actors::media::engine::{Engine, EngineConfig, EngineLimits};
use arbor_actors::media::{Command, PeerId, PeerRole};
use harness::Room;
use str0m::media::MediaKind;
use str0m::Candidate;

/// Counts live heap bytes on top of the system allocator.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap bytes the engine holds with `n` subscribers after `secs` of media (the clients,
/// which live in the same process, are dropped before counting).
fn engine_bytes(n: usize, limits: EngineLimits, secs: u64) -> isize {
    let before = LIVE.load(Relaxed);
    let mut room = Room::with_limits(n, limits, MediaKind::Video);
    for _ in 0..(secs * 50) {
        room.step(true);
    }
    drop(room.take_clients());
    let held = LIVE.load(Relaxed) - before;
    drop(room);
    held
}

/// Live heap bytes of an engine holding `n` idle peers of `role` (added, never connected):
/// what a participant's unused peer connection costs.
fn idle_peer_bytes(n: usize, role: PeerRole) -> isize {
    let before = LIVE.load(Relaxed);
    let now = Instant::now();
    let server: SocketAddr = SocketAddr::from(([10, 0, 0, 1], 7882));
    let mut engine = Engine::new(EngineConfig {
        candidates: vec![Candidate::host(server, "udp").expect("candidate")],
        udp_local: server,
        max_peers: n + 1,
        wall_anchor: (now, 0),
        rtp_mode: true,
    });
    let mut sink = harness::Wire::default();
    let mut queues = Vec::new();
    for i in 0..n {
        let (events, rx) = tokio::sync::mpsc::channel(1024);
        queues.push(rx);
        let (reply, _r) = tokio::sync::oneshot::channel();
        engine.handle_command(
            now,
            Command::AddPeer {
                peer: PeerId(i as u64 + 1),
                role,
                events,
                reply,
            },
            &mut sink,
        );
    }
    drop(sink);
    let held = LIVE.load(Relaxed) - before;
    drop(engine);
    held
}

fn main() {
    arbor_actors::media::init_crypto();
    let str0m_defaults = EngineLimits {
        rtx_history: Duration::from_secs(3),
        rtx_packets_video: 1000,
        rtx_packets_audio: 50,
        ..EngineLimits::default()
    };
    println!("engine heap per subscriber (1 video track, 50 packets/s of 1000 B, after 3 s):");
    for (name, limits) in [
        (
            "arbor limits (rtc.rtx_history_ms = 1000)",
            EngineLimits::default(),
        ),
        ("str0m defaults (3 s history)", str0m_defaults),
    ] {
        let base = engine_bytes(0, limits, 3);
        let n = 100;
        let total = engine_bytes(n, limits, 3);
        println!(
            "  {name:44} {:8.1} KiB per subscriber ({n} subscribers)",
            (total - base) as f64 / n as f64 / 1024.0
        );
    }
    for role in [PeerRole::Publisher, PeerRole::Subscriber] {
        let n = 100;
        println!(
            "idle {role:?} peer (added, not connected): {:8.1} KiB",
            idle_peer_bytes(n, role) as f64 / n as f64 / 1024.0
        );
    }
}
