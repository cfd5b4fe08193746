//! The worker's own durable state: which VMs are sessions (their data plane is served). Providers
//! keep the VMs themselves; this file says which of them executors may reach, so a restarted worker
//! serves exactly the sessions it served before and never exposes a pooled VM.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hearth_messages::VmId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default)]
    sessions: BTreeSet<VmId>,
}

/// The session set, written through to a JSON file (temp file + rename, so a crash never leaves a
/// torn file).
#[derive(Debug)]
pub(crate) struct SessionSet {
    path: PathBuf,
    sessions: parking_lot::Mutex<BTreeSet<VmId>>,
}

impl SessionSet {
    /// Loads the set from `path` (missing = empty; unreadable = empty, with a warning).
    pub(crate) fn load(path: &Path) -> Self {
        let sessions = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(file) => file.sessions,
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "worker state unreadable; starting empty");
                    BTreeSet::new()
                }
            },
            Err(_) => BTreeSet::new(),
        };
        Self {
            path: path.to_owned(),
            sessions: parking_lot::Mutex::new(sessions),
        }
    }

    /// The ids in the set.
    pub(crate) fn ids(&self) -> Vec<VmId> {
        self.sessions.lock().iter().cloned().collect()
    }

    /// Whether `vm_id` is a session.
    pub(crate) fn contains(&self, vm_id: &VmId) -> bool {
        self.sessions.lock().contains(vm_id)
    }

    /// Applies a change and writes the file.
    pub(crate) fn update(&self, f: impl FnOnce(&mut BTreeSet<VmId>)) -> std::io::Result<()> {
        let mut sessions = self.sessions.lock();
        f(&mut sessions);
        let file = StateFile {
            sessions: sessions.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let set = SessionSet::load(&path);
        set.update(|s| {
            s.insert(VmId::new("a").unwrap());
        })
        .unwrap();
        let again = SessionSet::load(&path);
        assert!(again.contains(&VmId::new("a").unwrap()));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(SessionSet::load(&path).ids().is_empty());
    }
}
