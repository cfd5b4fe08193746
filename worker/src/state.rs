//! The worker's own durable state: which VMs are sessions (their data plane is served). Providers
//! keep the VMs themselves; this says which of them executors may reach, so a restarted worker
//! serves exactly the sessions it served before and never exposes a pooled VM.
//!
//! One empty marker file per session under `<data_dir>/sessions/`: adding or removing a session
//! costs one file operation whatever the number of sessions (this is on the claim path), and a crash
//! leaves either the marker or not, never a torn file.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use hearth_messages::VmId;

/// The session set: in memory, written through to marker files.
#[derive(Debug)]
pub(crate) struct SessionSet {
    dir: PathBuf,
    sessions: parking_lot::Mutex<BTreeSet<VmId>>,
}

impl SessionSet {
    /// Loads the set from `dir`, creating it if needed. Entries that are not valid ids are
    /// ignored with a warning.
    pub(crate) fn load(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut sessions = BTreeSet::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            match name.to_str().map(VmId::new) {
                Some(Ok(id)) => {
                    sessions.insert(id);
                }
                _ => tracing::warn!(?name, "ignoring a stray file among the session markers"),
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            sessions: parking_lot::Mutex::new(sessions),
        })
    }

    /// The ids in the set.
    pub(crate) fn ids(&self) -> Vec<VmId> {
        self.sessions.lock().iter().cloned().collect()
    }

    /// Whether `vm_id` is a session.
    pub(crate) fn contains(&self, vm_id: &VmId) -> bool {
        self.sessions.lock().contains(vm_id)
    }

    /// Marks `vm_id` as a session (idempotent).
    pub(crate) fn insert(&self, vm_id: &VmId) -> io::Result<()> {
        std::fs::write(self.dir.join(vm_id.as_str()), b"")?;
        self.sessions.lock().insert(vm_id.clone());
        Ok(())
    }

    /// Unmarks `vm_id` (idempotent).
    pub(crate) fn remove(&self, vm_id: &VmId) -> io::Result<()> {
        self.sessions.lock().remove(vm_id);
        match std::fs::remove_file(self.dir.join(vm_id.as_str())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_ignores_strays() {
        let dir = tempfile::tempdir().unwrap();
        let set = SessionSet::load(dir.path()).unwrap();
        let (a, b) = (VmId::new("a").unwrap(), VmId::new("b").unwrap());
        set.insert(&a).unwrap();
        set.insert(&b).unwrap();
        set.remove(&b).unwrap();
        set.remove(&b).unwrap();
        std::fs::write(dir.path().join("not.an.id"), b"").unwrap();
        let again = SessionSet::load(dir.path()).unwrap();
        assert_eq!(again.ids(), vec![a]);
    }
}
