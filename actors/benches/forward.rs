//! The engine's forward path, end to end: one publisher and N subscribers, each a real str0m
//! client connected to the [`Engine`] over an in-memory wire (ICE, DTLS-SRTP, SDP through the
//! engine's commands, exactly as in production). Run with
//! `cargo bench -p arbor-actors --bench forward`; results are in `docs/performance.md`.
//!
//! What one iteration is: the publisher sends one video frame that fits one RTP packet
//! (1000 bytes of VP8, a keyframe so every subscriber takes it at once) and 20 ms of simulated
//! time pass. **Timed**: every call into the engine — the publisher's datagram (SRTP decrypt,
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
        room.wire.sent = 0;
        room.step(true);
        assert!(
            room.wire.sent >= n,
            "only {} datagrams for {n} subscribers: the harness did not connect",
            room.wire.sent
        );
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("video_packet_to_n", n), |b| {
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
