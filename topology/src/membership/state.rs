//! The replicated state machine: node registry, room directory, origin leases, publications.
//!
//! Every replica applies the same committed commands in the same order and therefore reaches the
//! same state. To keep that true the state machine is a pure function of its input: it never reads
//! a clock (time comes from the command's `now_ms`, stamped by the proposer), never draws random
//! numbers (room sids derive from the log position), and iterates only ordered maps.
//!
//! # Origin leases and fencing tokens
//!
//! Each room has exactly one *origin* node holding a time-bounded lease. A lease is described by
//! `(origin_node, fencing_token, lease_expires_ms)`:
//!
//! * `AcquireLease` by node N is granted only if the room's lease has expired at the command's
//!   timestamp (or N already holds it). Granting hands out a fresh token from a cluster-wide,
//!   strictly increasing counter and bumps the room's generation when the origin changes.
//! * `RenewLease`, `ReleaseLease`, `PublishTrack`, `UnpublishTrack` carry the token the node was
//!   given; any token other than the room's current one is rejected (`StaleToken`). A node that was
//!   partitioned away and lost its lease can therefore never write on the room's behalf again, even
//!   if its messages arrive late.
//!
//! The holder itself only treats the lease as valid until `stamp + lease_ms - skew_margin`, where
//! `stamp` is the timestamp of the command that granted/renewed it, so its belief always ends
//! before the state machine would let anybody else acquire the lease.
//!
//! This rests on one invariant: **a room's `lease_expires_ms` never decreases along the log.**
//! A node judges its lease from its own applied state, which may lag behind the log; a lagging
//! view therefore sees an expiry no later than the real one, and any later acquisition by
//! another node is stamped at or after the real one. (The simulator found the counter-example
//! when a same-holder re-acquisition with an older timestamp moved the expiry backwards.)

use std::collections::{BTreeMap, BTreeSet};

use arbor_proto::membership::{
    command::Kind, Command, NodeRecord, PublicationRecord, RoomConfig, RoomRecord, StateImage,
};
use prost::Message as _;

use crate::membership::MembershipError;

/// Why a command was rejected. Rejections are deterministic outcomes (every replica rejects the
/// same command), not failures of the replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("room {0:?} does not exist")]
    NoSuchRoom(String),
    #[error("node {0} is not a registered cluster member")]
    UnknownNode(u64),
    #[error("node {0} was removed from the cluster")]
    NodeRemoved(u64),
    #[error("room {room:?} is originated by node {holder} under an unexpired lease (until {expires_ms} ms)")]
    LeaseHeld {
        room: String,
        holder: u64,
        expires_ms: u64,
    },
    #[error("fencing token {given} is stale for room {room:?} (current {current})")]
    StaleToken {
        room: String,
        given: u64,
        current: u64,
    },
    #[error("lease on room {room:?} expired at {expired_ms} ms")]
    LeaseExpired { room: String, expired_ms: u64 },
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("track {0:?} is not published")]
    NoSuchTrack(String),
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    NodeRegistered(u64),
    HeartbeatRecorded(u64),
    /// `created` is false when the room already existed (create is idempotent, like LiveKit's).
    Room {
        room: RoomRecord,
        created: bool,
    },
    /// Lease granted or renewed: `(room, holder, token, stamp_ms, expires_ms)`.
    Lease(LeaseGrant),
    LeaseReleased {
        room: String,
        token: u64,
    },
    /// A batch renewal: how many leases were extended, and the rooms whose token was stale.
    LeasesRenewed {
        node: u64,
        renewed: usize,
        stale: Vec<String>,
    },
    Published(PublicationRecord),
    Unpublished(String),
    NodeRemoved(u64),
    Rejected(Rejection),
}

/// A granted or renewed origin lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    pub room: String,
    pub holder: u64,
    pub token: u64,
    /// Timestamp of the granting command (the holder's validity is measured from here).
    pub stamp_ms: u64,
    pub expires_ms: u64,
}

/// Deliberately broken behaviours, used only to prove that the simulation checker catches bugs.
/// Production code never sets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedDefect {
    /// `AcquireLease` ignores an unexpired lease held by another node (no fencing).
    SkipLeaseFencing,
    /// The driver sends messages that depend on new log entries/votes before syncing them.
    SendBeforePersist,
}

/// Tunables of the state machine. Must be identical on all replicas (they shape the outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// Duration of an origin lease.
    pub lease_ms: u64,
    /// Upper bound on rooms in the directory (bounds memory and snapshot size).
    pub max_rooms: usize,
    /// Upper bound on publications.
    pub max_publications: usize,
    /// Upper bound on nodes.
    pub max_nodes: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            lease_ms: 6_000,
            max_rooms: 100_000,
            max_publications: 1_000_000,
            max_nodes: 1_000,
        }
    }
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembershipState {
    nodes: BTreeMap<u64, NodeRecord>,
    removed: BTreeSet<u64>,
    rooms: BTreeMap<String, RoomRecord>,
    publications: BTreeMap<String, PublicationRecord>,
    next_token: u64,
    cluster_time_ms: u64,
}

impl MembershipState {
    pub fn new() -> Self {
        Self {
            next_token: 1,
            ..Default::default()
        }
    }

    pub fn nodes(&self) -> &BTreeMap<u64, NodeRecord> {
        &self.nodes
    }
    pub fn rooms(&self) -> &BTreeMap<String, RoomRecord> {
        &self.rooms
    }
    pub fn room(&self, name: &str) -> Option<&RoomRecord> {
        self.rooms.get(name)
    }
    pub fn publications(&self) -> &BTreeMap<String, PublicationRecord> {
        &self.publications
    }
    pub fn is_removed(&self, node: u64) -> bool {
        self.removed.contains(&node)
    }
    /// Largest command timestamp applied so far.
    pub fn cluster_time_ms(&self) -> u64 {
        self.cluster_time_ms
    }

    /// Applies one committed command. `index`/`term` are its log position (used to derive sids).
    pub fn apply(
        &mut self,
        cfg: &StateConfig,
        defect: Option<InjectedDefect>,
        index: u64,
        term: u64,
        cmd: &Command,
    ) -> Outcome {
        let now = cmd.now_ms;
        self.cluster_time_ms = self.cluster_time_ms.max(now);
        let Some(kind) = &cmd.kind else {
            return Outcome::Rejected(Rejection::Invalid("command without kind".into()));
        };
        match self.apply_kind(cfg, defect, index, term, cmd, now, kind) {
            Ok(o) => o,
            Err(r) => Outcome::Rejected(r),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_kind(
        &mut self,
        cfg: &StateConfig,
        defect: Option<InjectedDefect>,
        index: u64,
        term: u64,
        cmd: &Command,
        now: u64,
        kind: &Kind,
    ) -> Result<Outcome, Rejection> {
        match kind {
            Kind::RegisterNode(n) => {
                if n.id == 0 {
                    return Err(Rejection::Invalid("node id 0".into()));
                }
                if self.removed.contains(&n.id) {
                    return Err(Rejection::NodeRemoved(n.id));
                }
                if !self.nodes.contains_key(&n.id) && self.nodes.len() >= cfg.max_nodes {
                    return Err(Rejection::Invalid(format!(
                        "node limit {} reached",
                        cfg.max_nodes
                    )));
                }
                let registered_ms = self.nodes.get(&n.id).map_or(now, |o| o.registered_ms);
                let mut rec = n.clone();
                rec.last_heartbeat_ms = now;
                rec.registered_ms = registered_ms;
                self.nodes.insert(n.id, rec);
                Ok(Outcome::NodeRegistered(n.id))
            }
            Kind::Heartbeat(h) => {
                let node = self.live_node_mut(h.node)?;
                node.last_heartbeat_ms = node.last_heartbeat_ms.max(now);
                Ok(Outcome::HeartbeatRecorded(h.node))
            }
            Kind::CreateRoom(c) => {
                if c.name.is_empty() || c.name.len() > 256 {
                    return Err(Rejection::Invalid("room name must be 1..=256 bytes".into()));
                }
                if let Some(existing) = self.rooms.get(&c.name) {
                    let same_request = existing.created_by_node == cmd.proposer
                        && existing.created_by_request == cmd.request_id;
                    return Ok(Outcome::Room {
                        room: existing.clone(),
                        created: same_request,
                    });
                }
                self.live_node_mut(c.origin_node)?;
                if self.rooms.len() >= cfg.max_rooms {
                    return Err(Rejection::Invalid(format!(
                        "room limit {} reached",
                        cfg.max_rooms
                    )));
                }
                let token = self.take_token();
                let room = RoomRecord {
                    name: c.name.clone(),
                    sid: room_sid(index, term),
                    origin_node: c.origin_node,
                    generation: 1,
                    fencing_token: token,
                    lease_expires_ms: now.saturating_add(cfg.lease_ms),
                    created_ms: now,
                    config: Some(c.config.clone().unwrap_or_else(RoomConfig::default)),
                    created_by_node: cmd.proposer,
                    created_by_request: cmd.request_id,
                };
                self.rooms.insert(c.name.clone(), room.clone());
                Ok(Outcome::Room {
                    room,
                    created: true,
                })
            }
            Kind::AcquireLease(a) => {
                self.live_node_mut(a.node)?;
                let lease_ms = cfg.lease_ms;
                let room = self
                    .rooms
                    .get(&a.room)
                    .ok_or_else(|| Rejection::NoSuchRoom(a.room.clone()))?;
                let fenced = defect != Some(InjectedDefect::SkipLeaseFencing);
                if fenced && room.origin_node != a.node && now < room.lease_expires_ms {
                    return Err(Rejection::LeaseHeld {
                        room: a.room.clone(),
                        holder: room.origin_node,
                        expires_ms: room.lease_expires_ms,
                    });
                }
                let token = self.take_token();
                let room = self
                    .rooms
                    .get_mut(&a.room)
                    .ok_or_else(|| Rejection::NoSuchRoom(a.room.clone()))?;
                if room.origin_node != a.node {
                    room.generation += 1;
                    room.origin_node = a.node;
                    // Publications belong to the old origin's session; publishers reconnect.
                    let name = a.room.clone();
                    self.publications.retain(|_, p| p.room != name);
                }
                // The same origin re-acquiring (it missed renewals but is alive) keeps its
                // publications; they move to the new token so only it can touch them.
                let name = a.room.clone();
                for p in self.publications.values_mut().filter(|p| p.room == name) {
                    p.fencing_token = token;
                }
                let room = self
                    .rooms
                    .get_mut(&a.room)
                    .ok_or_else(|| Rejection::NoSuchRoom(a.room.clone()))?;
                room.fencing_token = token;
                // Never move an expiry backwards (see the module docs: a lagging replica of the
                // old holder must never see a later expiry than the one the state machine uses).
                room.lease_expires_ms = room.lease_expires_ms.max(now.saturating_add(lease_ms));
                Ok(Outcome::Lease(LeaseGrant {
                    room: a.room.clone(),
                    holder: a.node,
                    token,
                    stamp_ms: now,
                    expires_ms: room.lease_expires_ms,
                }))
            }
            Kind::RenewLease(r) => {
                let room = self.fenced_room_mut(&r.room, r.node, r.fencing_token)?;
                room.lease_expires_ms = room.lease_expires_ms.max(now.saturating_add(cfg.lease_ms));
                Ok(Outcome::Lease(LeaseGrant {
                    room: r.room.clone(),
                    holder: r.node,
                    token: r.fencing_token,
                    stamp_ms: now,
                    expires_ms: room.lease_expires_ms,
                }))
            }
            Kind::RenewLeases(b) => {
                let mut renewed = 0;
                let mut stale = Vec::new();
                for l in &b.leases {
                    match self.fenced_room_mut(&l.room, b.node, l.fencing_token) {
                        Ok(room) => {
                            room.lease_expires_ms =
                                room.lease_expires_ms.max(now.saturating_add(cfg.lease_ms));
                            renewed += 1;
                        }
                        Err(_) => stale.push(l.room.clone()),
                    }
                }
                Ok(Outcome::LeasesRenewed {
                    node: b.node,
                    renewed,
                    stale,
                })
            }
            Kind::ReleaseLease(r) => {
                // Release does not shorten the lease: the holder stops renewing and the room is
                // handed over once the recorded expiry passes. Shortening it would let another
                // node acquire while a lagging replica of the old holder still believes in it.
                self.fenced_room_mut(&r.room, r.node, r.fencing_token)?;
                Ok(Outcome::LeaseReleased {
                    room: r.room.clone(),
                    token: r.fencing_token,
                })
            }
            Kind::PublishTrack(p) => {
                if p.track_sid.is_empty() {
                    return Err(Rejection::Invalid("empty track sid".into()));
                }
                let room = self.fenced_room_mut(&p.room, p.node, p.fencing_token)?;
                if now >= room.lease_expires_ms {
                    return Err(Rejection::LeaseExpired {
                        room: p.room.clone(),
                        expired_ms: room.lease_expires_ms,
                    });
                }
                if !self.publications.contains_key(&p.track_sid)
                    && self.publications.len() >= cfg.max_publications
                {
                    return Err(Rejection::Invalid(format!(
                        "publication limit {} reached",
                        cfg.max_publications
                    )));
                }
                let rec = PublicationRecord {
                    track_sid: p.track_sid.clone(),
                    room: p.room.clone(),
                    origin_node: p.node,
                    fencing_token: p.fencing_token,
                };
                self.publications.insert(p.track_sid.clone(), rec.clone());
                Ok(Outcome::Published(rec))
            }
            Kind::UnpublishTrack(u) => {
                let room_name = self
                    .publications
                    .get(&u.track_sid)
                    .map(|p| p.room.clone())
                    .ok_or_else(|| Rejection::NoSuchTrack(u.track_sid.clone()))?;
                self.fenced_room_mut(&room_name, u.node, u.fencing_token)?;
                self.publications.remove(&u.track_sid);
                Ok(Outcome::Unpublished(u.track_sid.clone()))
            }
            Kind::RemoveNode(r) => {
                // The node's leases are left to expire normally: removal is an operator's claim
                // that the node is gone, and a claim is not proof. Fencing does the rest.
                self.nodes.remove(&r.node);
                self.removed.insert(r.node);
                Ok(Outcome::NodeRemoved(r.node))
            }
        }
    }

    fn take_token(&mut self) -> u64 {
        let t = self.next_token.max(1);
        self.next_token = t + 1;
        t
    }

    fn live_node_mut(&mut self, id: u64) -> Result<&mut NodeRecord, Rejection> {
        if self.removed.contains(&id) {
            return Err(Rejection::NodeRemoved(id));
        }
        self.nodes.get_mut(&id).ok_or(Rejection::UnknownNode(id))
    }

    fn fenced_room_mut(
        &mut self,
        name: &str,
        node: u64,
        token: u64,
    ) -> Result<&mut RoomRecord, Rejection> {
        let room = self
            .rooms
            .get_mut(name)
            .ok_or_else(|| Rejection::NoSuchRoom(name.to_string()))?;
        if room.origin_node != node || room.fencing_token != token {
            return Err(Rejection::StaleToken {
                room: name.to_string(),
                given: token,
                current: room.fencing_token,
            });
        }
        Ok(room)
    }

    /// Encodes the whole state (Raft snapshot data).
    pub fn to_image(&self) -> Vec<u8> {
        StateImage {
            nodes: self.nodes.values().cloned().collect(),
            rooms: self.rooms.values().cloned().collect(),
            publications: self.publications.values().cloned().collect(),
            next_fencing_token: self.next_token,
            cluster_time_ms: self.cluster_time_ms,
            removed_nodes: self.removed.iter().copied().collect(),
        }
        .encode_to_vec()
    }

    /// Decodes a state image. An empty image is the initial state.
    pub fn from_image(bytes: &[u8]) -> Result<Self, MembershipError> {
        if bytes.is_empty() {
            return Ok(Self::new());
        }
        let img = StateImage::decode(bytes)
            .map_err(|e| MembershipError::Decode(format!("state snapshot: {e}")))?;
        Ok(Self {
            nodes: img.nodes.into_iter().map(|n| (n.id, n)).collect(),
            removed: img.removed_nodes.into_iter().collect(),
            rooms: img.rooms.into_iter().map(|r| (r.name.clone(), r)).collect(),
            publications: img
                .publications
                .into_iter()
                .map(|p| (p.track_sid.clone(), p))
                .collect(),
            next_token: img.next_fencing_token.max(1),
            cluster_time_ms: img.cluster_time_ms,
        })
    }
}

/// Deterministic room sid from the log position of the creating entry (same on every replica).
pub fn room_sid(index: u64, term: u64) -> String {
    // splitmix64 of (term, index) rendered in base 36, prefixed like LiveKit's sids.
    let mut x = index ^ term.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut s = Vec::with_capacity(13);
    for _ in 0..12 {
        s.push(DIGITS[(x % 36) as usize]);
        x /= 36;
    }
    format!("RM_{}", String::from_utf8_lossy(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_proto::membership::{AcquireLease, CreateRoom, PublishTrack, RenewLease};

    fn cmd(proposer: u64, request_id: u64, now_ms: u64, kind: Kind) -> Command {
        Command {
            proposer,
            request_id,
            now_ms,
            kind: Some(kind),
        }
    }
    fn reg(id: u64) -> Kind {
        Kind::RegisterNode(NodeRecord {
            id,
            region: "r".into(),
            ..Default::default()
        })
    }

    fn setup() -> (MembershipState, StateConfig) {
        let cfg = StateConfig {
            lease_ms: 1000,
            ..Default::default()
        };
        let mut s = MembershipState::new();
        for id in 1..=3 {
            s.apply(&cfg, None, id, 1, &cmd(id, 1, 0, reg(id)));
        }
        let o = s.apply(
            &cfg,
            None,
            10,
            1,
            &cmd(
                1,
                2,
                100,
                Kind::CreateRoom(CreateRoom {
                    name: "a".into(),
                    origin_node: 1,
                    config: None,
                }),
            ),
        );
        assert!(matches!(o, Outcome::Room { created: true, .. }));
        (s, cfg)
    }

    #[test]
    fn second_node_cannot_acquire_unexpired_lease() {
        let (mut s, cfg) = setup();
        let o = s.apply(
            &cfg,
            None,
            11,
            1,
            &cmd(
                2,
                1,
                500,
                Kind::AcquireLease(AcquireLease {
                    room: "a".into(),
                    node: 2,
                }),
            ),
        );
        assert!(
            matches!(o, Outcome::Rejected(Rejection::LeaseHeld { holder: 1, .. })),
            "{o:?}"
        );
        // After expiry (100 + 1000) it is granted with a larger token and a new generation.
        let o = s.apply(
            &cfg,
            None,
            12,
            1,
            &cmd(
                2,
                2,
                1100,
                Kind::AcquireLease(AcquireLease {
                    room: "a".into(),
                    node: 2,
                }),
            ),
        );
        let Outcome::Lease(g) = o else {
            panic!("{o:?}")
        };
        assert_eq!(g.holder, 2);
        assert!(g.token > 1);
        assert_eq!(s.room("a").unwrap().generation, 2);
    }

    #[test]
    fn stale_token_is_fenced() {
        let (mut s, cfg) = setup();
        let old = s.room("a").unwrap().fencing_token;
        s.apply(
            &cfg,
            None,
            11,
            1,
            &cmd(
                2,
                1,
                5000,
                Kind::AcquireLease(AcquireLease {
                    room: "a".into(),
                    node: 2,
                }),
            ),
        );
        let o = s.apply(
            &cfg,
            None,
            12,
            1,
            &cmd(
                1,
                3,
                5001,
                Kind::RenewLease(RenewLease {
                    room: "a".into(),
                    node: 1,
                    fencing_token: old,
                }),
            ),
        );
        assert!(
            matches!(o, Outcome::Rejected(Rejection::StaleToken { .. })),
            "{o:?}"
        );
        let o = s.apply(
            &cfg,
            None,
            13,
            1,
            &cmd(
                1,
                4,
                5002,
                Kind::PublishTrack(PublishTrack {
                    room: "a".into(),
                    track_sid: "TR_1".into(),
                    node: 1,
                    fencing_token: old,
                }),
            ),
        );
        assert!(
            matches!(o, Outcome::Rejected(Rejection::StaleToken { .. })),
            "{o:?}"
        );
    }

    #[test]
    fn batch_renewal_extends_current_and_reports_stale() {
        let (mut s, cfg) = setup();
        let c = |n: &str| {
            Kind::CreateRoom(CreateRoom {
                name: n.into(),
                origin_node: 1,
                config: None,
            })
        };
        s.apply(&cfg, None, 11, 1, &cmd(1, 3, 100, c("b")));
        let ta = s.room("a").unwrap().fencing_token;
        let tb = s.room("b").unwrap().fencing_token;
        let batch = Kind::RenewLeases(arbor_proto::membership::RenewLeases {
            node: 1,
            leases: vec![
                arbor_proto::membership::LeaseRef {
                    room: "a".into(),
                    fencing_token: ta,
                },
                arbor_proto::membership::LeaseRef {
                    room: "b".into(),
                    fencing_token: tb + 100,
                },
            ],
        });
        let o = s.apply(&cfg, None, 12, 1, &cmd(1, 4, 900, batch));
        assert_eq!(
            o,
            Outcome::LeasesRenewed {
                node: 1,
                renewed: 1,
                stale: vec!["b".into()]
            }
        );
        assert_eq!(s.room("a").unwrap().lease_expires_ms, 1900);
        assert_eq!(s.room("b").unwrap().lease_expires_ms, 1100);
    }

    #[test]
    fn defect_skips_fencing() {
        let (mut s, cfg) = setup();
        let o = s.apply(
            &cfg,
            Some(InjectedDefect::SkipLeaseFencing),
            11,
            1,
            &cmd(
                2,
                1,
                500,
                Kind::AcquireLease(AcquireLease {
                    room: "a".into(),
                    node: 2,
                }),
            ),
        );
        assert!(matches!(o, Outcome::Lease(_)));
    }

    #[test]
    fn create_is_idempotent_and_image_round_trips() {
        let (mut s, cfg) = setup();
        let again = s.apply(
            &cfg,
            None,
            11,
            1,
            &cmd(
                1,
                2,
                200,
                Kind::CreateRoom(CreateRoom {
                    name: "a".into(),
                    origin_node: 1,
                    config: None,
                }),
            ),
        );
        assert!(
            matches!(again, Outcome::Room { created: true, .. }),
            "a retry of the same request"
        );
        let other = s.apply(
            &cfg,
            None,
            12,
            1,
            &cmd(
                2,
                9,
                200,
                Kind::CreateRoom(CreateRoom {
                    name: "a".into(),
                    origin_node: 2,
                    config: None,
                }),
            ),
        );
        assert!(matches!(other, Outcome::Room { created: false, .. }));
        let img = s.to_image();
        assert_eq!(MembershipState::from_image(&img).unwrap(), s);
        assert!(MembershipState::from_image(&[0xff, 0x01]).is_err());
    }
}
