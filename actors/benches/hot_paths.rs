//! Micro-benchmarks of the pure pieces on Arbor's hot paths (issue 5: benchmarks live apart
//! from the tests). Run with `cargo bench -p arbor-actors --bench hot_paths`; results and how
//! to read them are in `docs/performance.md`.
//!
//! * `alloc/*`: one bandwidth-allocator round for one subscriber (runs on every estimate
//!   change and every layer change, per subscriber).
//! * `meter/*`: the speaker meter, per audio packet (`observe`) and per window (`take`).
//! * `signal/*`: decoding a client's signal frame, protobuf and protojson.
//!
//! Inputs are built once, outside the timed loop, from fixed values: the runs are repeatable.

use std::hint::black_box;

use arbor_actors::codec::{decode_signal_binary, decode_signal_text, stamp_data_packet};
use arbor_actors::media::alloc::{allocate, AllocTrack};
use arbor_actors::media::audio::{LevelConfig, LevelMeter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livekit_protocol as lk;
use prost::Message as _;

/// `n` simulcast tracks with three layers each, mixed priorities and wanted qualities.
fn tracks(n: usize) -> Vec<AllocTrack> {
    (0..n)
        .map(|i| AllocTrack {
            priority: (i % 3) as u8,
            max_rank: 1 + (i % 3) as u8,
            layers: vec![(1, 150_000), (2, 500_000), (3, 1_700_000)],
        })
        .collect()
}

fn bench_alloc(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc");
    for n in [1usize, 4, 16, 64] {
        let t = tracks(n);
        // A budget that fits roughly half of what is wanted, so both passes do real work.
        let budget = 600_000 * n as u64;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("round", n), &t, |b, t| {
            b.iter(|| allocate(black_box(budget), black_box(t)))
        });
    }
    g.finish();
}

fn bench_meter(c: &mut Criterion) {
    let cfg = LevelConfig::default();
    let mut g = c.benchmark_group("meter");
    // One 500 ms window of 20 ms Opus packets: 25 observations, then `take`.
    let levels: Vec<Option<i8>> = (0..25).map(|i| Some(20 + (i * 7 % 60) as i8)).collect();
    g.throughput(Throughput::Elements(levels.len() as u64));
    g.bench_function("window_25_packets", |b| {
        let mut m = LevelMeter::default();
        b.iter(|| {
            for l in &levels {
                m.observe(black_box(*l), &cfg);
            }
            m.take(&cfg)
        })
    });
    g.finish();
}

/// A typical steady-state client message: a track-settings update.
fn settings_request() -> lk::SignalRequest {
    lk::SignalRequest {
        message: Some(lk::signal_request::Message::TrackSetting(
            lk::UpdateTrackSettings {
                track_sids: vec!["TR_VCabcdefghijk".into(), "TR_AMabcdefghijk".into()],
                disabled: false,
                quality: lk::VideoQuality::High as i32,
                width: 1280,
                height: 720,
                ..Default::default()
            },
        )),
    }
}

fn bench_signal(c: &mut Criterion) {
    let mut g = c.benchmark_group("signal");
    let req = settings_request();
    let bin = req.encode_to_vec();
    let json = serde_json::to_string(&req).expect("SignalRequest serializes");
    // Time the success path, not an error path.
    assert_eq!(decode_signal_binary(&bin).as_ref(), Ok(&req));
    assert_eq!(decode_signal_text(&json).as_ref(), Ok(&req));
    g.bench_function("decode_protobuf", |b| {
        b.iter(|| decode_signal_binary(black_box(&bin)))
    });
    g.bench_function("decode_json", |b| {
        b.iter(|| decode_signal_text(black_box(&json)))
    });
    let data = lk::DataPacket {
        destination_identities: vec!["bob".into()],
        value: Some(lk::data_packet::Value::User(lk::UserPacket {
            payload: vec![7; 512],
            topic: Some("chat".into()),
            ..Default::default()
        })),
        ..Default::default()
    }
    .encode_to_vec();
    assert!(stamp_data_packet(&data, 64 * 1024, "alice", "PA_alice", false).is_ok());
    g.bench_function("stamp_data_packet_512B", |b| {
        b.iter(|| stamp_data_packet(black_box(&data), 64 * 1024, "alice", "PA_alice", false))
    });
    g.finish();
}

criterion_group!(benches, bench_alloc, bench_meter, bench_signal);
criterion_main!(benches);
