//! The `forward` bench's workload as a plain program with a fixed amount of work, for
//! profilers: `perf record`, or Valgrind's callgrind, whose instruction counts do not depend
//! on what else the machine is doing (the criterion benches' times do), so two builds can be
//! compared on a busy machine:
//!
//! ```text
//! cargo bench -p arbor-actors --bench forward_profile --no-run
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*forward_profile::measured*' \
//!     target/release/deps/forward_profile-<hash> [subscribers] [frames]
//! callgrind_annotate --inclusive=yes callgrind.out.<pid> | head -60
//! ```
//!
//! Only the engine's calls are in the timed part of a step, but callgrind counts the whole
//! `measured` function: clients included. `Engine::handle_datagram` and
//! `Engine::handle_timeout` (inclusive) are the engine's share; divide by the forwarded
//! packets printed at the end.

mod harness;

use std::time::Duration;

use harness::Room;

#[inline(never)]
fn measured(room: &mut Room, frames: usize) -> Duration {
    let mut engine = Duration::ZERO;
    for _ in 0..frames {
        engine += room.step(true);
    }
    engine
}

fn main() {
    arbor_actors::media::init_crypto();
    // `cargo bench` passes `--bench`; only plain numbers are ours.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = nums.first().copied().unwrap_or(50).clamp(1, 1000);
    let frames = nums.get(1).copied().unwrap_or(200).clamp(1, 100_000);
    let mut room = Room::new(n);
    for _ in 0..10 {
        room.step(true); // warm-up: every subscriber receiving, pacer and estimators settled
    }
    let before: usize = room.received().iter().sum();
    let engine = measured(&mut room, frames);
    let forwarded = room.received().iter().sum::<usize>() - before;
    assert!(forwarded > 0, "no subscriber received anything");
    println!(
        "subscribers {n}, frames {frames}: {forwarded} packets forwarded, engine {:.2} µs per packet",
        engine.as_secs_f64() * 1e6 / forwarded as f64
    );
}
