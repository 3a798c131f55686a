//! [`LogBackend`] on a `redb` file.
//!
//! Layout: table `meta` (string → bytes) holds `format` (a magic string naming this layout),
//! `hard_state`, `conf_state` and `snapshot`, each encoded with raft-rs's protobuf codec; table
//! `log` (u64 → bytes) holds entries keyed by index.
//!
//! [`LogBackend::stage`] commits a redb transaction with [`Durability::None`] (atomic, not yet
//! on disk) and [`LogBackend::sync`] commits an empty transaction with
//! [`Durability::Immediate`], which fsyncs it and every earlier non-durable commit. redb keeps
//! the non-durable commits in order, so a crash leaves a prefix of the staged batches — exactly
//! the [`LogBackend`] contract.
//!
//! Opening never resets a file: a file that fails redb's integrity check, lacks our format marker,
//! or holds entries that cannot be decoded or do not form a contiguous log is reported as
//! [`MembershipError::Corrupt`] naming the path, and the operator decides what to do.

use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::membership::storage::{LogBackend, PersistedState, WriteBatch};
use crate::membership::MembershipError;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const FORMAT: &[u8] = b"arbor-raft-log/1";

/// redb-backed Raft log. One file per node.
pub struct RedbBackend {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbBackend {
    /// Opens `path`, creating it only if `create` is true and no file exists there. An existing
    /// file is never recreated: if it cannot be read it is reported as corrupt.
    pub fn open(path: &Path, create: bool) -> Result<Self, MembershipError> {
        let exists = path.exists();
        if !exists && !create {
            return Err(MembershipError::Io(format!(
                "raft log {} does not exist (run `arbor cluster init` or `join` first)",
                path.display()
            )));
        }
        if exists {
            let meta = std::fs::metadata(path)
                .map_err(|e| MembershipError::Io(format!("{}: {e}", path.display())))?;
            if meta.len() == 0 {
                return Err(corrupt(path, "file is empty (truncated)"));
            }
        }
        let mut builder = Database::builder();
        builder.set_cache_size(16 * 1024 * 1024);
        builder.set_check_integrity_on_open(true);
        // redb asserts some "cannot happen" file invariants with debug assertions; a damaged file
        // must become an error, never a panic, so contain it here.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if exists {
                builder.open(path)
            } else {
                builder.create(path)
            }
        }));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                return Err(match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => MembershipError::Io(format!(
                        "{} is already open by another process",
                        path.display()
                    )),
                    other => corrupt(path, &other.to_string()),
                })
            }
            Err(_) => return Err(corrupt(path, "redb panicked while opening the file")),
        };
        let mut me = Self {
            db,
            path: path.to_path_buf(),
        };
        if exists {
            me.check_format()?;
        } else {
            me.init_format()?;
        }
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> MembershipError {
        MembershipError::Io(format!("{}: {e}", self.path.display()))
    }

    fn init_format(&mut self) -> Result<(), MembershipError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("format", FORMAT).map_err(|e| self.err(e))?;
            txn.open_table(LOG).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn check_format(&self) -> Result<(), MembershipError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| corrupt(&self.path, &e.to_string()))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| corrupt(&self.path, &format!("missing table `meta`: {e}")))?;
        let fmt = meta
            .get("format")
            .map_err(|e| corrupt(&self.path, &e.to_string()))?;
        match fmt {
            Some(v) if v.value() == FORMAT => Ok(()),
            Some(v) => Err(corrupt(
                &self.path,
                &format!(
                    "unknown format marker {:?}",
                    String::from_utf8_lossy(v.value())
                ),
            )),
            None => Err(corrupt(&self.path, "format marker missing")),
        }
    }
}

fn corrupt(path: &Path, detail: &str) -> MembershipError {
    MembershipError::Corrupt(format!(
        "raft log file {}: {detail} (the file was left untouched: restore it from a backup, or \
         remove this node with `arbor cluster remove`, delete its data and re-add it with \
         `arbor cluster join`)",
        path.display()
    ))
}

fn decode<M: protobuf::Message>(
    path: &Path,
    what: &str,
    bytes: &[u8],
) -> Result<M, MembershipError> {
    M::parse_from_bytes(bytes).map_err(|e| corrupt(path, &format!("cannot decode {what}: {e}")))
}

fn encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, MembershipError> {
    m.write_to_bytes()
        .map_err(|e| MembershipError::Io(format!("encode: {e}")))
}

impl LogBackend for RedbBackend {
    fn load(&mut self) -> Result<PersistedState, MembershipError> {
        let path = self.path.clone();
        let c = |e: &dyn std::fmt::Display| corrupt(&path, &e.to_string());
        let txn = self.db.begin_read().map_err(|e| c(&e))?;
        let meta = txn.open_table(META).map_err(|e| c(&e))?;
        let log = txn.open_table(LOG).map_err(|e| c(&e))?;
        let mut st = PersistedState::default();
        if let Some(v) = meta.get("hard_state").map_err(|e| c(&e))? {
            st.hard_state = decode::<HardState>(&path, "hard state", v.value())?;
        }
        if let Some(v) = meta.get("conf_state").map_err(|e| c(&e))? {
            st.conf_state = decode::<ConfState>(&path, "conf state", v.value())?;
        }
        if let Some(v) = meta.get("snapshot").map_err(|e| c(&e))? {
            st.snapshot = decode::<Snapshot>(&path, "snapshot", v.value())?;
        }
        for item in log.iter().map_err(|e| c(&e))? {
            let (k, v) = item.map_err(|e| c(&e))?;
            let e = decode::<Entry>(&path, "log entry", v.value())?;
            if e.index != k.value() {
                return Err(corrupt(
                    &path,
                    &format!("entry stored under key {} has index {}", k.value(), e.index),
                ));
            }
            st.entries.push(e);
        }
        st.validate().map_err(|d| corrupt(&path, &d))?;
        Ok(st)
    }

    fn stage(&mut self, b: &WriteBatch) -> Result<(), MembershipError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let mut log = txn.open_table(LOG).map_err(|e| self.err(e))?;
            // Mirror PersistedState::apply exactly, against the stored state.
            if let Some(s) = &b.snapshot {
                let idx = s.get_metadata().index;
                let term_at = match log.get(idx).map_err(|e| self.err(e))? {
                    Some(v) => Some(decode::<Entry>(&self.path, "log entry", v.value())?.term),
                    None => None,
                };
                if b.keep_log_after_snapshot && term_at == Some(s.get_metadata().term) {
                    log.retain_in(..=idx, |_, _| false)
                        .map_err(|e| self.err(e))?;
                } else {
                    log.retain(|_, _| false).map_err(|e| self.err(e))?;
                }
                meta.insert("snapshot", encode(s)?.as_slice())
                    .map_err(|e| self.err(e))?;
                if !b.keep_log_after_snapshot {
                    let cs = s.get_metadata().get_conf_state();
                    meta.insert("conf_state", encode(cs)?.as_slice())
                        .map_err(|e| self.err(e))?;
                    let mut hs = match meta.get("hard_state").map_err(|e| self.err(e))? {
                        Some(v) => decode::<HardState>(&self.path, "hard state", v.value())?,
                        None => HardState::default(),
                    };
                    hs.commit = hs.commit.max(idx);
                    hs.term = hs.term.max(s.get_metadata().term);
                    meta.insert("hard_state", encode(&hs)?.as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            if let Some(first) = b.entries.first() {
                log.retain_in(first.index.., |_, _| false)
                    .map_err(|e| self.err(e))?;
                for e in &b.entries {
                    log.insert(e.index, encode(e)?.as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            if b.hard_state.is_some() || b.commit.is_some() {
                let mut hs = match &b.hard_state {
                    Some(hs) => hs.clone(),
                    None => match meta.get("hard_state").map_err(|e| self.err(e))? {
                        Some(v) => decode::<HardState>(&self.path, "hard state", v.value())?,
                        None => HardState::default(),
                    },
                };
                if let Some(c) = b.commit {
                    hs.commit = hs.commit.max(c);
                }
                meta.insert("hard_state", encode(&hs)?.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            if let Some(cs) = &b.conf_state {
                meta.insert("conf_state", encode(cs)?.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn sync(&mut self) -> Result<(), MembershipError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::storage::RaftStore;
    use raft::Storage;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 100].into(),
            ..Default::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("arbor-redb-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("raft.redb")
    }

    #[test]
    fn reopen_preserves_synced_state() {
        let p = tmp("reopen");
        {
            let mut st = RaftStore::open(RedbBackend::open(&p, true).unwrap()).unwrap();
            st.bootstrap(&[1, 2, 3]).unwrap();
            st.write(WriteBatch {
                entries: (1..=4).map(|i| ent(i, 1)).collect(),
                ..Default::default()
            })
            .unwrap();
            st.write(WriteBatch {
                hard_state: Some(HardState {
                    term: 1,
                    vote: 2,
                    commit: 3,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
            st.sync().unwrap();
        }
        let st = RaftStore::open(RedbBackend::open(&p, false).unwrap()).unwrap();
        assert_eq!(st.last_index().unwrap(), 4);
        let rs = st.initial_state().unwrap();
        assert_eq!(rs.hard_state.vote, 2);
        assert_eq!(rs.conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let p = tmp("trunc");
        {
            let mut st = RaftStore::open(RedbBackend::open(&p, true).unwrap()).unwrap();
            st.write(WriteBatch {
                entries: (1..=50).map(|i| ent(i, 1)).collect(),
                ..Default::default()
            })
            .unwrap();
            st.sync().unwrap();
        }
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        let err = RedbBackend::open(&p, true)
            .and_then(RaftStore::open)
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(matches!(err, MembershipError::Corrupt(_)), "{msg}");
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        // The file was not reset behind our back.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len / 3);
    }

    #[test]
    fn corrupted_file_is_a_clear_error() {
        let p = tmp("corrupt");
        {
            let mut st = RaftStore::open(RedbBackend::open(&p, true).unwrap()).unwrap();
            st.write(WriteBatch {
                entries: (1..=50).map(|i| ent(i, 1)).collect(),
                ..Default::default()
            })
            .unwrap();
            st.sync().unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        // Overwrite everything after the header region with garbage.
        for (i, b) in bytes.iter_mut().enumerate().skip(64) {
            *b = (i as u8).wrapping_mul(31) ^ 0x5a;
        }
        std::fs::write(&p, &bytes).unwrap();
        let err = RedbBackend::open(&p, true)
            .and_then(RaftStore::open)
            .err()
            .expect("must fail");
        assert!(matches!(err, MembershipError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("raft log file"), "{err}");
    }

    #[test]
    fn foreign_file_is_rejected() {
        let p = tmp("foreign");
        std::fs::write(&p, b"this is not a redb file at all, just some text").unwrap();
        let err = RedbBackend::open(&p, true).expect_err("must fail");
        assert!(matches!(err, MembershipError::Corrupt(_)), "{err}");
    }
}
