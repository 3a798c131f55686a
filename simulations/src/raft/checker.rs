//! Safety and liveness checks over the simulated cluster.

use std::collections::{BTreeMap, BTreeSet};

use arbor_topology::membership::{MemBackend, MembershipNode};

/// A property the cluster violated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("two leaders in term {term}: nodes {a} and {b}")]
    TwoLeaders { term: u64, a: u64, b: u64 },
    #[error("committed entry {index} differs on node {node}: {detail}")]
    CommittedDiverged {
        node: u64,
        index: u64,
        detail: String,
    },
    #[error("committed index went missing: {0}")]
    CommittedLost(String),
    #[error("room {room:?} has two origins at once: nodes {a} (token {ta}) and {b} (token {tb})")]
    TwoOrigins {
        room: String,
        a: u64,
        ta: u64,
        b: u64,
        tb: u64,
    },
    #[error("room {room:?} lease expiry moved backwards on node {node}: {from} -> {to}")]
    LeaseExpiryRegressed {
        node: u64,
        room: String,
        from: u64,
        to: u64,
    },
    #[error(
        "publication {track} on node {node} carries token {token}, room {room:?} is at {current}"
    )]
    StalePublication {
        node: u64,
        track: String,
        room: String,
        token: u64,
        current: u64,
    },
    #[error("liveness: {0}")]
    Liveness(String),
    /// raft-rs's own assertions fired (e.g. a follower lost entries it had acknowledged).
    #[error("node {0} panicked inside raft: {1}")]
    Panicked(u64, String),
    #[error("node {0} storage/driver error: {1}")]
    Storage(u64, String),
}

/// (node id, node, the node's local clock).
pub type View<'a> = (u64, &'a MembershipNode<MemBackend>, u64);

/// Accumulates the run's history and checks each step against it.
#[derive(Debug, Default)]
pub struct Checker {
    leaders: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, (u64, u64)>,
    checked_upto: BTreeMap<u64, u64>,
    acknowledged: BTreeSet<String>,
    last_holder: BTreeMap<String, (u64, u64)>,
    steps: u64,
    committed_at_heal: u64,
    /// Per node: the lease expiry last seen for each room (must never decrease).
    expiries: BTreeMap<u64, BTreeMap<String, u64>>,
    /// Times a room's believed origin changed to a different node.
    pub origin_changes: u64,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Checker {
    pub fn node_crashed(&mut self, id: u64) {
        self.checked_upto.remove(&id);
    }
    pub fn node_restarted(&mut self, id: u64) {
        self.checked_upto.remove(&id);
        self.expiries.remove(&id);
    }
    /// Records the highest committed index at the moment the network heals; after the settle
    /// phase every node must have committed at least that far.
    pub fn mark_heal(&mut self) {
        self.committed_at_heal = self.committed.keys().next_back().copied().unwrap_or(0);
    }
    pub fn room_acknowledged(&mut self, name: String) {
        self.acknowledged.insert(name);
    }

    /// Safety checks, run after every simulation step.
    pub fn check_step(&mut self, _now: u64, views: &[View<'_>]) -> Result<(), Violation> {
        self.steps += 1;
        // One leader per term.
        for (id, node, _) in views {
            if node.is_leader() {
                let term = node.term();
                match self.leaders.get(&term) {
                    Some(l) if l != id => {
                        return Err(Violation::TwoLeaders {
                            term,
                            a: *l,
                            b: *id,
                        })
                    }
                    Some(_) => {}
                    None => {
                        self.leaders.insert(term, *id);
                    }
                }
            }
        }
        // Committed entries never change: every node's committed prefix agrees.
        for (id, node, _) in views {
            let st = node.store().state();
            let commit = node.commit_index();
            let from = self.checked_upto.get(id).copied().unwrap_or(0);
            if commit <= from {
                continue;
            }
            for e in st
                .entries
                .iter()
                .filter(|e| e.index > from && e.index <= commit)
            {
                let sig = (e.term, fnv(&e.data));
                match self.committed.get(&e.index) {
                    Some(prev) if *prev != sig => {
                        return Err(Violation::CommittedDiverged {
                            node: *id,
                            index: e.index,
                            detail: format!(
                                "seen (term {}, hash {:x}), now (term {}, hash {:x})",
                                prev.0, prev.1, sig.0, sig.1
                            ),
                        })
                    }
                    Some(_) => {}
                    None => {
                        self.committed.insert(e.index, sig);
                    }
                }
            }
            self.checked_upto.insert(*id, commit);
        }
        // A room's lease expiry never decreases along the log, hence never in a node's view.
        for (id, node, _) in views {
            let seen = self.expiries.entry(*id).or_default();
            for (name, room) in node.state().rooms() {
                let prev = seen.insert(name.clone(), room.lease_expires_ms);
                if let Some(p) = prev.filter(|p| *p > room.lease_expires_ms) {
                    return Err(Violation::LeaseExpiryRegressed {
                        node: *id,
                        room: name.clone(),
                        from: p,
                        to: room.lease_expires_ms,
                    });
                }
            }
        }
        // No room with two origins at once.
        let mut holders: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (id, node, local) in views {
            for (room, token) in node.held_leases(*local) {
                if let Some((a, ta)) = holders.get(&room) {
                    return Err(Violation::TwoOrigins {
                        room,
                        a: *a,
                        ta: *ta,
                        b: *id,
                        tb: token,
                    });
                }
                holders.insert(room, (*id, token));
            }
        }
        for (room, (holder, token)) in holders {
            match self.last_holder.get(&room) {
                Some((h, _)) if *h != holder => self.origin_changes += 1,
                _ => {}
            }
            self.last_holder.insert(room, (holder, token));
        }
        // Publications are only ever accepted under the room's current token.
        if self.steps.is_multiple_of(200) {
            for (id, node, _) in views {
                check_publications(*id, node)?;
            }
        }
        Ok(())
    }

    /// Liveness checks, run once after the network healed and every node restarted.
    pub fn check_end(
        &mut self,
        views: &[View<'_>],
        expected_voters: &BTreeSet<u64>,
        check_voters: bool,
    ) -> Result<(), Violation> {
        let leaders: Vec<u64> = views
            .iter()
            .filter(|(_, n, _)| n.is_leader())
            .map(|(id, _, _)| *id)
            .collect();
        let [leader] = leaders[..] else {
            return Err(Violation::Liveness(format!(
                "expected exactly one leader, found {leaders:?}"
            )));
        };
        for (id, node, _) in views {
            if node.leader() != Some(leader) {
                return Err(Violation::Liveness(format!(
                    "node {id} follows {:?}, leader is {leader}",
                    node.leader()
                )));
            }
            check_publications(*id, node)?;
        }
        let max_committed = self.committed_at_heal;
        for (id, node, _) in views {
            if node.commit_index() < max_committed {
                let all: Vec<String> = views
                    .iter()
                    .map(|(_, n, _)| format!("{:?}", n.status()))
                    .collect();
                return Err(Violation::CommittedLost(format!(
                    "node {id} commit {} < {max_committed} committed before the heal; statuses: {}",
                    node.commit_index(),
                    all.join("; ")
                )));
            }
        }
        let lnode = views
            .iter()
            .find(|(id, _, _)| *id == leader)
            .map(|(_, n, _)| *n);
        let Some(lnode) = lnode else {
            return Err(Violation::Liveness("leader vanished".into()));
        };
        if check_voters {
            let st = lnode.status();
            let voters: BTreeSet<u64> = st.voters.iter().copied().collect();
            if &voters != expected_voters || !st.voters_outgoing.is_empty() {
                return Err(Violation::Liveness(format!(
                    "voters {:?} (outgoing {:?}), expected {expected_voters:?}",
                    st.voters, st.voters_outgoing
                )));
            }
        }
        let rooms = lnode.state().rooms();
        for name in &self.acknowledged {
            if !rooms.contains_key(name) {
                return Err(Violation::CommittedLost(format!(
                    "acknowledged room {name:?} missing on the leader"
                )));
            }
        }
        for (id, node, _) in views {
            let theirs: Vec<(&String, &String)> = node
                .state()
                .rooms()
                .iter()
                .map(|(k, r)| (k, &r.sid))
                .collect();
            let ours: Vec<(&String, &String)> = rooms.iter().map(|(k, r)| (k, &r.sid)).collect();
            if theirs != ours {
                return Err(Violation::Liveness(format!(
                    "node {id} room directory differs from the leader's"
                )));
            }
        }
        // Every room owned by a live node that holds its lease.
        for (name, room) in rooms {
            let holder = views.iter().find(|(id, _, _)| *id == room.origin_node);
            let Some((hid, hnode, local)) = holder else {
                return Err(Violation::Liveness(format!(
                    "room {name:?} originated by unknown node {}",
                    room.origin_node
                )));
            };
            if !hnode
                .held_leases(*local)
                .iter()
                .any(|(r, t)| r == name && *t == room.fencing_token)
            {
                return Err(Violation::Liveness(format!(
                    "room {name:?}: origin node {hid} does not hold a valid lease"
                )));
            }
        }
        Ok(())
    }
}

fn check_publications(id: u64, node: &MembershipNode<MemBackend>) -> Result<(), Violation> {
    let st = node.state();
    for p in st.publications().values() {
        let current = st.room(&p.room).map_or(0, |r| r.fencing_token);
        if p.fencing_token != current {
            return Err(Violation::StalePublication {
                node: id,
                track: p.track_sid.clone(),
                room: p.room.clone(),
                token: p.fencing_token,
                current,
            });
        }
    }
    Ok(())
}
