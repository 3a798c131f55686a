//! Placement of rooms on media shards (engine threads), and the routing rules that follow
//! from it. Pure functions, no I/O.
//!
//! A node runs `n` media shards (`rtc.shards`), each an engine thread with its own UDP socket.
//! Every room lives on exactly one shard, so all its peers are on one thread and forwarding
//! needs no lock. The shard is chosen from a 16-bit **room tag**, a stable hash of the room
//! name (FNV-1a, the same on every node and every version):
//!
//! * commands: the control plane holds a [`MediaHandle`](super::MediaHandle) bound to the
//!   room's shard ([`shard_of_tag`]);
//! * relay datagrams: every track key (which is also the track's relay flow id on links from
//!   this node) carries its room's tag in its top 16 bits ([`tag_key`]), so the node that
//!   receives a datagram finds the room's shard from the flow id alone ([`shard_of_datagram`])
//!   — whatever the sending node's shard count, since both hash the same room name;
//! * ICE-TCP: one listener for the node; each shard's ICE ufrags start with the shard's
//!   number ([`ufrag_prefix`]), and the listener hands a new connection to the shard that its
//!   first STUN request's USERNAME names ([`shard_of_ufrag`]).

/// Most media shards a node may run (`rtc.shards`).
pub const MAX_SHARDS: usize = 64;

/// Bits of a track key below the room tag.
const TAG_SHIFT: u32 = 48;
/// The counter part of a track key.
const COUNTER_MASK: u64 = (1 << TAG_SHIFT) - 1;

/// The 16-bit tag of a room name: FNV-1a (64-bit) folded to 16 bits. Stable across nodes,
/// platforms and releases (a cluster relies on every node computing the same tag).
pub fn room_tag(room: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48)) as u16
}

/// The shard (`0..shards`) of a room tag. `shards` of 0 counts as 1.
pub fn shard_of_tag(tag: u16, shards: usize) -> usize {
    usize::from(tag) % shards.max(1)
}

/// The shard of a room name.
pub fn shard_of_room(room: &str, shards: usize) -> usize {
    shard_of_tag(room_tag(room), shards)
}

/// A track key (relay flow id) for a room with tag `tag`: the tag in the top 16 bits, the
/// node-wide counter below.
pub fn tag_key(tag: u16, counter: u64) -> u64 {
    (u64::from(tag) << TAG_SHIFT) | (counter & COUNTER_MASK)
}

/// The room tag a track key (relay flow id) carries.
pub fn tag_of_key(key: u64) -> u16 {
    (key >> TAG_SHIFT) as u16
}

/// The shard a relay datagram belongs to: every datagram kind starts with `kind u8 | flow
/// u64` (see [`super::relay`]). A datagram too short to name a flow goes to shard 0, whose
/// engine counts it as garbage.
pub fn shard_of_datagram(d: &[u8], shards: usize) -> usize {
    match d.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        Some(b) => shard_of_tag(tag_of_key(u64::from_be_bytes(b)), shards),
        None => 0,
    }
}

/// The prefix of every local ICE ufrag of shard `shard`: two lowercase hex digits (ICE
/// characters, RFC 8445 §5.3).
pub fn ufrag_prefix(shard: usize) -> String {
    format!("{:02x}", shard % 256)
}

/// The shard a local ICE ufrag belongs to, if it carries a valid prefix for `shards` shards.
pub fn shard_of_ufrag(ufrag: &str, shards: usize) -> Option<usize> {
    let p = ufrag.get(..2)?;
    let s = usize::from_str_radix(p, 16).ok()?;
    (s < shards
        && p.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_tag_is_stable() {
        // Fixed values: every node of a cluster, of any version, must agree.
        assert_eq!(room_tag(""), 0xf011);
        assert_eq!(room_tag("room-a"), 0xaea5);
        assert_eq!(room_tag("room-b"), 0x9acc);
        assert_eq!(room_tag("a"), room_tag("a"));
        assert_ne!(room_tag("room-a"), room_tag("room-b"));
    }

    #[test]
    fn placement_spreads_rooms_and_stays_in_range() {
        for n in [1, 2, 3, 7, MAX_SHARDS] {
            let mut count = vec![0usize; n];
            for i in 0..10_000 {
                let s = shard_of_room(&format!("room-{i}"), n);
                assert!(s < n);
                count[s] += 1;
            }
            let fair = 10_000 / n;
            for c in count {
                assert!(
                    c > fair / 2 && c < fair * 2,
                    "{n} shards: {c} rooms vs {fair} fair"
                );
            }
        }
        assert_eq!(shard_of_room("anything", 0), 0);
        assert_eq!(shard_of_room("anything", 1), 0);
    }

    #[test]
    fn track_keys_route_to_their_rooms_shard_on_any_node() {
        for room in ["a", "conference-17", "żółw", "x".repeat(300).as_str()] {
            let tag = room_tag(room);
            let key = tag_key(tag, 123_456);
            assert_eq!(tag_of_key(key), tag);
            assert_eq!(key & COUNTER_MASK, 123_456);
            // Whatever the shard count of the node that receives the flow's datagrams.
            for n in 1..=8 {
                let mut d = vec![5u8];
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&[0; 20]);
                assert_eq!(shard_of_datagram(&d, n), shard_of_room(room, n));
            }
        }
        // A counter past 48 bits does not spill into the tag.
        assert_eq!(tag_of_key(tag_key(7, u64::MAX)), 7);
    }

    #[test]
    fn short_datagrams_go_to_shard_zero() {
        assert_eq!(shard_of_datagram(&[], 4), 0);
        assert_eq!(shard_of_datagram(&[5, 1, 2, 3], 4), 0);
    }

    #[test]
    fn ufrag_prefix_round_trips_and_rejects_others() {
        for n in [1, 2, 16, MAX_SHARDS] {
            for s in 0..n {
                let u = format!("{}Xy9q", ufrag_prefix(s));
                assert_eq!(shard_of_ufrag(&u, n), Some(s));
            }
        }
        assert_eq!(shard_of_ufrag("05abc", 4), None, "shard out of range");
        assert_eq!(shard_of_ufrag("zzabc", 4), None);
        assert_eq!(shard_of_ufrag("0Aabc", 16), None, "uppercase is not ours");
        assert_eq!(shard_of_ufrag("0", 4), None);
        assert_eq!(shard_of_ufrag("", 4), None);
        assert_eq!(shard_of_ufrag("é1", 4), None);
    }
}
