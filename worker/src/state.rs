//! The worker's own durable state: which VMs are sessions (their data plane is served). Providers
//! keep the VMs themselves; this says which of them executors may reach, so a restarted worker
//! serves exactly the sessions it served before and never exposes a pooled VM.
//!
//! Each session also remembers its tenant (the NATS account that owns it, from the claim's job):
//! the data plane serves a session to its tenant and the operator only, also after a restart.
//!
//! An append-only journal, `<data_dir>/sessions.journal`: one `+<id>[ <tenant>]` or `-<id>` line
//! per change,
//! written with a single `write(2)` on an open file (this is on the claim path, and creating a file
//! costs ~0.2 ms on ext4). Like every other worker write it is not fsynced: it survives the worker
//! being killed, not the host losing power. Loading replays it (a torn last line is ignored) and
//! compacts it (temp file + rename); a line without its newline is torn and ignored, so a cut-off
//! tenant name can never be read as another tenant.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hearth_messages::{TenantId, VmId};

/// The session set: in memory, written through to the journal.
#[derive(Debug)]
pub(crate) struct SessionSet {
    inner: parking_lot::Mutex<Journal>,
}

#[derive(Debug)]
struct Journal {
    sessions: BTreeMap<VmId, Option<TenantId>>,
    file: File,
}

impl SessionSet {
    /// Loads and compacts the journal at `path`.
    pub(crate) fn load(path: &Path) -> io::Result<Self> {
        let mut sessions = BTreeMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                // Only whole lines: the last segment after the final newline is torn or empty.
                let mut lines: Vec<&str> = text.split('\n').collect();
                lines.pop();
                for line in lines {
                    let (add, rest) = match line.split_at_checked(1) {
                        Some(("+", rest)) => (true, rest),
                        Some(("-", rest)) => (false, rest),
                        _ => continue,
                    };
                    let (id, tenant) = match rest.split_once(' ') {
                        Some((id, tenant)) => match TenantId::new(tenant) {
                            Ok(t) => (id, Some(t)),
                            Err(_) => continue,
                        },
                        None => (rest, None),
                    };
                    let Ok(id) = VmId::new(id) else { continue };
                    if add {
                        sessions.insert(id, tenant);
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
        for (id, tenant) in &sessions {
            compact.push_str(&line('+', id, tenant.as_ref()));
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
        self.inner.lock().sessions.keys().cloned().collect()
    }

    /// Whether `vm_id` is a session.
    pub(crate) fn contains(&self, vm_id: &VmId) -> bool {
        self.inner.lock().sessions.contains_key(vm_id)
    }

    /// The owner of session `vm_id`: `None` if it is not a session, `Some(None)` for the
    /// operator's.
    pub(crate) fn owner(&self, vm_id: &VmId) -> Option<Option<TenantId>> {
        self.inner.lock().sessions.get(vm_id).cloned()
    }

    /// Marks `vm_id` as a session of `tenant` (idempotent).
    pub(crate) fn insert(&self, vm_id: &VmId, tenant: Option<&TenantId>) -> io::Result<()> {
        let mut j = self.inner.lock();
        if j.sessions.get(vm_id).map(Option::as_ref) != Some(tenant) {
            j.file.write_all(line('+', vm_id, tenant).as_bytes())?;
            j.sessions.insert(vm_id.clone(), tenant.cloned());
        }
        Ok(())
    }

    /// Unmarks `vm_id` (idempotent).
    pub(crate) fn remove(&self, vm_id: &VmId) -> io::Result<()> {
        let mut j = self.inner.lock();
        if j.sessions.remove(vm_id).is_some() {
            j.file.write_all(line('-', vm_id, None).as_bytes())?;
        }
        Ok(())
    }
}

/// One journal line.
fn line(op: char, vm_id: &VmId, tenant: Option<&TenantId>) -> String {
    match tenant {
        Some(t) => format!("{op}{vm_id} {t}\n"),
        None => format!("{op}{vm_id}\n"),
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
        let t = TenantId::new("tenant-a").unwrap();
        set.insert(&a, Some(&t)).unwrap();
        set.insert(&b, None).unwrap();
        set.remove(&b).unwrap();
        set.remove(&b).unwrap();
        drop(set);
        // A crash mid-write leaves a partial line, here one whose tenant name is cut off.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"+c tenan").unwrap();
        let again = SessionSet::load(&path).unwrap();
        assert_eq!(again.ids(), vec![a.clone()]);
        assert_eq!(again.owner(&a), Some(Some(t)));
        assert_eq!(again.owner(&VmId::new("c").unwrap()), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "+a tenant-a\n");
        // Re-owned (a session id claimed again by the operator): the new owner is written.
        again.insert(&a, None).unwrap();
        drop(again);
        let third = SessionSet::load(&path).unwrap();
        assert_eq!(third.owner(&a), Some(None));
    }
}
