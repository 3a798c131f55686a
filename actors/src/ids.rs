//! Identifier generation: LiveKit-style sids (`RM_`, `PA_`, `TR_`) and data-plane keys.
//!
//! Sids come from one seeded generator so that a run can be replayed; the seed is chosen at
//! start-up (from config or the OS) and logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::media::{PeerId, TrackKey};

static RNG: Mutex<Option<StdRng>> = Mutex::new(None);
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Seed the sid generator. Call once at start-up; later calls re-seed.
pub fn seed(seed: u64) {
    if let Ok(mut g) = RNG.lock() {
        *g = Some(StdRng::seed_from_u64(seed));
    }
}

/// A new sid with the given prefix, e.g. `new_sid("PA_")` → `PA_x7Gq2...`.
pub fn new_sid(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 12);
    s.push_str(prefix);
    let mut g = match RNG.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let rng = g.get_or_insert_with(|| StdRng::seed_from_u64(0x5eed));
    for _ in 0..12 {
        let i = rng.random_range(0..ALPHABET.len());
        s.push(ALPHABET[i] as char);
    }
    s
}

/// A new data-plane peer id.
pub fn new_peer_id() -> PeerId {
    PeerId(NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

/// A new data-plane track key for a track of the room with tag `room_tag`
/// ([`crate::media::shard::room_tag`]): the key (also the track's relay flow id) carries the
/// tag, so relay datagrams find their room's media shard on every node.
pub fn new_track_key(room_tag: u16) -> TrackKey {
    TrackKey(crate::media::shard::tag_key(
        room_tag,
        NEXT_KEY.fetch_add(1, Ordering::Relaxed),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sids_have_prefix_and_differ() {
        let a = super::new_sid("PA_");
        let b = super::new_sid("PA_");
        assert!(a.starts_with("PA_") && a.len() == 15);
        assert_ne!(a, b);
    }
}
