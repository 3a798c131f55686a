//! Raft log storage: the raft-rs [`Storage`] read side over a durable [`LogBackend`].
//!
//! # Contract
//!
//! raft-rs reads the log through [`Storage`] and expects the application to write it. This module
//! splits the two:
//!
//! * [`RaftStore`] keeps an in-memory mirror of everything the backend holds (hard state, conf
//!   state, the latest snapshot, and the log entries after it; the log is bounded by compaction)
//!   and answers raft-rs's reads from it. Reads never touch the disk and never fail except for
//!   the documented `Compacted`/`Unavailable` cases.
//! * Every change goes through [`RaftStore::write`], which applies a [`WriteBatch`] atomically to
//!   the mirror and *stages* it in the backend. Staged writes may be lost in a crash.
//! * [`RaftStore::sync`] makes every staged write durable (fsync). **The driver calls it before
//!   sending any message that depends on the staged data** (votes, append acknowledgements), which
//!   is what makes Raft's promises survive a crash.
//!
//! A backend must guarantee: (1) batches are atomic; (2) after `sync` returns, every batch staged
//! before it survives a crash; (3) a crash keeps a *prefix* of the staged batches (never a later
//! batch without an earlier one); (4) `load` returns exactly the state the surviving batches
//! describe, or an error — a damaged file is reported, never silently replaced by an empty log.
//!
//! Two backends exist: [`crate::membership::RedbBackend`] (files, `redb`) and [`MemBackend`]
//! (simulation; keeps staged batches apart from synced ones so a simulated crash can drop them).

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError as RaftStorageError};

use crate::membership::MembershipError;

/// Everything a backend persists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersistedState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Latest snapshot (metadata + state-machine image). Index 0 = none yet.
    pub snapshot: Snapshot,
    /// Entries after `snapshot.metadata.index`, contiguous.
    pub entries: Vec<Entry>,
}

impl PersistedState {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// Checks the invariants a loaded state must satisfy; a violation means a damaged store.
    pub fn validate(&self) -> Result<(), String> {
        let snap = self.snapshot_index();
        let mut expect = snap + 1;
        for e in &self.entries {
            if e.index != expect {
                return Err(format!(
                    "log gap: expected entry {expect}, found {}",
                    e.index
                ));
            }
            expect += 1;
        }
        let last = expect - 1;
        if self.hard_state.commit > last {
            return Err(format!(
                "commit index {} beyond last log index {last}",
                self.hard_state.commit
            ));
        }
        if self.hard_state.commit < snap {
            return Err(format!(
                "commit index {} below snapshot index {snap}",
                self.hard_state.commit
            ));
        }
        Ok(())
    }

    /// Applies a batch to this in-memory image (shared by the mirror and [`MemBackend`]).
    pub fn apply(&mut self, b: &WriteBatch) {
        if let Some(s) = &b.snapshot {
            let idx = s.get_metadata().index;
            // Keep entries beyond the snapshot only if they agree with it (own compaction).
            let term_at = self.entries.iter().find(|e| e.index == idx).map(|e| e.term);
            if b.keep_log_after_snapshot && term_at == Some(s.get_metadata().term) {
                self.entries.retain(|e| e.index > idx);
            } else {
                self.entries.clear();
            }
            self.snapshot = s.clone();
            if !b.keep_log_after_snapshot {
                self.conf_state = s.get_metadata().get_conf_state().clone();
                self.hard_state.commit = self.hard_state.commit.max(idx);
                self.hard_state.term = self.hard_state.term.max(s.get_metadata().term);
            }
        }
        if let Some(first) = b.entries.first() {
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend(b.entries.iter().cloned());
        }
        if let Some(hs) = &b.hard_state {
            self.hard_state = hs.clone();
        }
        if let Some(c) = b.commit {
            self.hard_state.commit = self.hard_state.commit.max(c);
        }
        if let Some(cs) = &b.conf_state {
            self.conf_state = cs.clone();
        }
    }
}

/// One atomic change to the persisted state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteBatch {
    /// A snapshot to install. With `keep_log_after_snapshot` it is our own compaction snapshot
    /// (entries after it are kept, conf/hard state untouched); otherwise one received from the
    /// leader (the log is replaced).
    pub snapshot: Option<Snapshot>,
    pub keep_log_after_snapshot: bool,
    /// New entries; any existing entry at or after the first one's index is overwritten.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// Commit index advanced after `advance` (monotonic).
    pub commit: Option<u64>,
    pub conf_state: Option<ConfState>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.commit.is_none()
            && self.conf_state.is_none()
    }
}

/// A durable home for the Raft log. See the module docs for the contract.
pub trait LogBackend {
    /// Reads the persisted state; `Err` if it is damaged (never "empty" for a damaged store).
    fn load(&mut self) -> Result<PersistedState, MembershipError>;
    /// Stages a batch atomically. It may be lost in a crash until [`LogBackend::sync`].
    fn stage(&mut self, batch: &WriteBatch) -> Result<(), MembershipError>;
    /// Makes every staged batch durable.
    fn sync(&mut self) -> Result<(), MembershipError>;
}

/// raft-rs storage over a backend. See the module docs.
pub struct RaftStore<B> {
    backend: B,
    mem: PersistedState,
    unsynced: bool,
}

impl<B: LogBackend> RaftStore<B> {
    /// Loads the backend's state and validates it.
    pub fn open(mut backend: B) -> Result<Self, MembershipError> {
        let mem = backend.load()?;
        mem.validate().map_err(MembershipError::Corrupt)?;
        Ok(Self {
            backend,
            mem,
            unsynced: false,
        })
    }

    /// Seeds a brand-new store with the initial voter set (every founding node must use the same
    /// list). Refuses to touch a store that already holds state.
    pub fn bootstrap(&mut self, voters: &[u64]) -> Result<(), MembershipError> {
        if self.is_initialized() {
            return Err(MembershipError::AlreadyInitialized);
        }
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        self.write(WriteBatch {
            conf_state: Some(cs),
            ..Default::default()
        })?;
        self.sync()
    }

    /// True once the store holds any Raft state (a conf state, a term or a log).
    pub fn is_initialized(&self) -> bool {
        self.mem.hard_state.term > 0
            || !self.mem.conf_state.voters.is_empty()
            || !self.mem.conf_state.learners.is_empty()
            || !self.mem.entries.is_empty()
            || self.mem.snapshot_index() > 0
    }

    /// Applies a batch to the mirror and stages it in the backend.
    pub fn write(&mut self, batch: WriteBatch) -> Result<(), MembershipError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.backend.stage(&batch)?;
        self.mem.apply(&batch);
        self.unsynced = true;
        Ok(())
    }

    /// Makes staged writes durable (no-op when nothing is staged).
    pub fn sync(&mut self) -> Result<(), MembershipError> {
        if self.unsynced {
            self.backend.sync()?;
            self.unsynced = false;
        }
        Ok(())
    }

    pub fn has_unsynced(&self) -> bool {
        self.unsynced
    }
    pub fn state(&self) -> &PersistedState {
        &self.mem
    }
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// Mutable access to the backend (simulators arm fault injection through it).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }
    pub fn into_backend(self) -> B {
        self.backend
    }
    /// Number of log entries held after the snapshot.
    pub fn log_len(&self) -> usize {
        self.mem.entries.len()
    }

    fn first(&self) -> u64 {
        self.mem.snapshot_index() + 1
    }
    fn last(&self) -> u64 {
        self.mem
            .entries
            .last()
            .map_or(self.mem.snapshot_index(), |e| e.index)
    }
}

fn store_err(e: RaftStorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl<B: LogBackend> Storage for RaftStore<B> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.mem.hard_state.clone(),
            self.mem.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(store_err(RaftStorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(store_err(RaftStorageError::Unavailable));
        }
        let off = self.first();
        let slice = &self.mem.entries[(low - off) as usize..(high - off) as usize];
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in slice {
            size += protobuf::Message::compute_size(e) as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.mem.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < self.first() {
            return Err(store_err(RaftStorageError::Compacted));
        }
        if idx > self.last() {
            return Err(store_err(RaftStorageError::Unavailable));
        }
        Ok(self.mem.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let s = &self.mem.snapshot;
        if s.get_metadata().index < request_index {
            return Err(store_err(RaftStorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(s.clone())
    }
}

/// Builds snapshot metadata.
pub fn snapshot_of(index: u64, term: u64, conf_state: ConfState, data: Vec<u8>) -> Snapshot {
    let mut s = Snapshot {
        data: data.into(),
        ..Default::default()
    };
    let mut m = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    m.set_conf_state(conf_state);
    s.set_metadata(m);
    s
}

/// In-memory backend for the simulator: synced state plus a queue of staged batches that a
/// simulated crash may drop (keeping a prefix, as a real disk would).
#[derive(Debug, Clone, Default)]
pub struct MemBackend {
    synced: PersistedState,
    staged: Vec<WriteBatch>,
    power_loss_armed: bool,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a crash: the first `keep` staged batches reach the disk, the rest are lost.
    pub fn crash(&mut self, keep: usize) {
        let keep = keep.min(self.staged.len());
        for b in self.staged.drain(..keep) {
            self.synced.apply(&b);
        }
        self.staged.clear();
    }

    /// Makes the next `sync` fail as if power was cut while writing: the simulator then crashes
    /// the node at exactly that point, between staging and syncing.
    pub fn arm_power_loss(&mut self) {
        self.power_loss_armed = true;
    }

    /// Number of batches staged but not yet synced.
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }
}

impl LogBackend for MemBackend {
    fn load(&mut self) -> Result<PersistedState, MembershipError> {
        let mut s = self.synced.clone();
        for b in &self.staged {
            s.apply(b);
        }
        Ok(s)
    }
    fn stage(&mut self, batch: &WriteBatch) -> Result<(), MembershipError> {
        self.staged.push(batch.clone());
        Ok(())
    }
    fn sync(&mut self) -> Result<(), MembershipError> {
        if std::mem::take(&mut self.power_loss_armed) {
            return Err(MembershipError::Io(
                "simulated power loss during sync".into(),
            ));
        }
        for b in self.staged.drain(..) {
            self.synced.apply(&b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn crash_loses_only_unsynced_batches() {
        let mut st = RaftStore::open(MemBackend::new()).unwrap();
        st.bootstrap(&[1, 2, 3]).unwrap();
        st.write(WriteBatch {
            entries: vec![ent(1, 1), ent(2, 1)],
            ..Default::default()
        })
        .unwrap();
        st.sync().unwrap();
        st.write(WriteBatch {
            entries: vec![ent(3, 1)],
            ..Default::default()
        })
        .unwrap();
        let mut b = st.into_backend();
        b.crash(0);
        let st = RaftStore::open(b).unwrap();
        assert_eq!(st.last_index().unwrap(), 2);
        assert_eq!(st.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn overwrite_truncates_and_compaction_keeps_tail() {
        let mut st = RaftStore::open(MemBackend::new()).unwrap();
        st.write(WriteBatch {
            entries: (1..=5).map(|i| ent(i, 1)).collect(),
            ..Default::default()
        })
        .unwrap();
        st.write(WriteBatch {
            entries: vec![ent(3, 2)],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(st.last_index().unwrap(), 3);
        assert_eq!(st.term(3).unwrap(), 2);
        let snap = snapshot_of(2, 1, ConfState::default(), vec![]);
        st.write(WriteBatch {
            snapshot: Some(snap),
            keep_log_after_snapshot: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(st.first_index().unwrap(), 3);
        assert_eq!(st.term(2).unwrap(), 1);
        assert!(st
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .is_err());
        assert_eq!(
            st.entries(3, 4, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn gap_is_reported_as_corruption() {
        let s = PersistedState {
            entries: vec![ent(1, 1), ent(3, 1)],
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }
}
