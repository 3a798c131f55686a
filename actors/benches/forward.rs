//! The engine's forward path, end to end: one publisher and N subscribers, each a real str0m
//! client connected to the [`Engine`] over an in-memory wire (ICE, DTLS-SRTP, SDP through the
//! engine's commands, exactly as in production). Run with
//! `cargo bench -p arbor-actors --bench forward`; results are in `docs/performance.md`.
//!
//! What one iteration is: the publisher sends one 1000-byte audio frame (one RTP packet; audio
//! because the allocator may pause video on this zero-delay wire, see the harness) and 20 ms of
//! simulated time pass. **Timed**: every call into the engine — the publisher's datagram (SRTP decrypt,
//! forward to N subscribers, their packetisation and SRTP encrypt), the subscribers' RTCP
//! (receiver reports, TWCC feedback, NACKs) and the engine's timers. **Not timed**: the
//! clients (they decrypt what they receive and answer, outside the measurement).
//!
//! The wire discards nothing, so criterion's time per iteration divided by N is the engine's
//! cost per forwarded packet. The bench uses only the engine's public API (commands, datagrams,
//! timeouts), so it measures whatever forwarding mode the engine uses.

mod harness;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use harness::Room;

fn bench_forward(c: &mut Criterion) {
    arbor_actors::media::init_crypto();
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    for n in [1usize, 10, 50, 200] {
        let mut room = Room::new(n);
        // Every subscriber must be receiving, or the figure would be per nothing.
        let before = room.received();
        room.step(true);
        room.step(true);
        let after = room.received();
        assert!(
            before.iter().zip(&after).all(|(a, b)| b > a),
            "a subscriber received nothing: the harness did not connect ({before:?} -> {after:?})"
        );
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("packet_to_n", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += room.step(true);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
