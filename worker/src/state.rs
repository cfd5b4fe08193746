//! The worker's own durable state: which VMs are sessions (their data plane is served). Providers
//! keep the VMs themselves; this says which of them executors may reach, so a restarted worker
//! serves exactly the sessions it served before and never exposes a pooled VM.
//!
//! An append-only journal, `<data_dir>/sessions.journal`: one `+<id>` or `-<id>` line per change,
//! written with a single `write(2)` on an open file (this is on the claim path, and creating a file
//! costs ~0.2 ms on ext4). Like every other worker write it is not fsynced: it survives the worker
//! being killed, not the host losing power. Loading replays it (a torn last line is ignored) and
//! compacts it (temp file + rename).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hearth_messages::VmId;

/// The session set: in memory, written through to the journal.
#[derive(Debug)]
pub(crate) struct SessionSet {
    inner: parking_lot::Mutex<Journal>,
}

#[derive(Debug)]
struct Journal {
    sessions: BTreeSet<VmId>,
    file: File,
}

impl SessionSet {
    /// Loads and compacts the journal at `path`.
    pub(crate) fn load(path: &Path) -> io::Result<Self> {
        let mut sessions = BTreeSet::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for line in text.lines() {
                    let (add, id) = match line.split_at_checked(1) {
                        Some(("+", id)) => (true, id),
                        Some(("-", id)) => (false, id),
                        _ => continue,
                    };
                    let Ok(id) = VmId::new(id) else { continue };
                    if add {
                        sessions.insert(id);
                    } else {
                        sessions.remove(&id);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tmp: PathBuf = path.with_extension("journal.tmp");
        let mut compact = String::new();
        for id in &sessions {
            compact.push('+');
            compact.push_str(id.as_str());
            compact.push('\n');
        }
        std::fs::write(&tmp, compact)?;
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            inner: parking_lot::Mutex::new(Journal { sessions, file }),
        })
    }

    /// The ids in the set.
    pub(crate) fn ids(&self) -> Vec<VmId> {
        self.inner.lock().sessions.iter().cloned().collect()
    }

    /// Whether `vm_id` is a session.
    pub(crate) fn contains(&self, vm_id: &VmId) -> bool {
        self.inner.lock().sessions.contains(vm_id)
    }

    /// Marks `vm_id` as a session (idempotent).
    pub(crate) fn insert(&self, vm_id: &VmId) -> io::Result<()> {
        let mut j = self.inner.lock();
        if !j.sessions.contains(vm_id) {
            j.file.write_all(format!("+{vm_id}\n").as_bytes())?;
            j.sessions.insert(vm_id.clone());
        }
        Ok(())
    }

    /// Unmarks `vm_id` (idempotent).
    pub(crate) fn remove(&self, vm_id: &VmId) -> io::Result<()> {
        let mut j = self.inner.lock();
        if j.sessions.remove(vm_id) {
            j.file.write_all(format!("-{vm_id}\n").as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_compacts_and_ignores_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.journal");
        let set = SessionSet::load(&path).unwrap();
        let (a, b) = (VmId::new("a").unwrap(), VmId::new("b").unwrap());
        set.insert(&a).unwrap();
        set.insert(&b).unwrap();
        set.remove(&b).unwrap();
        set.remove(&b).unwrap();
        drop(set);
        // A crash mid-write leaves a partial line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"+c.d").unwrap();
        let again = SessionSet::load(&path).unwrap();
        assert_eq!(again.ids(), vec![a]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "+a\n");
    }
}
