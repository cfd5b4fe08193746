//! A provider's state root: the directory it owns, locked while it is open, and the crash-safe
//! file operations every backend builds its state from.
//!
//! ```text
//! <root>/lock                 flock held while open: one provider per root
//! <root>/vms/<vm_id>/         one directory per VM; its meta.json is written last (the commit point)
//! <root>/snapshots/<id>/      one directory per snapshot, renamed into place complete
//! <root>/tmp/                 staging and trash; emptied by the provider on open
//! <root>/<extra>/             what a backend adds (qemu and firecracker: `run/`)
//! ```
//!
//! Everything here blocks: call it from [`blocking`] (or at open, before the provider serves).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::provider::{ProviderError, SnapshotId, VmId};

/// An open, locked state root and its layout.
#[derive(Debug)]
pub(crate) struct StateRoot {
    /// Held for the provider's lifetime: a second provider on this root would delete our staging.
    _lock: Flock<File>,
    /// Canonical (symlinks resolved), so paths derived from it are stable.
    path: PathBuf,
    vms: PathBuf,
    snapshots: PathBuf,
    tmp: PathBuf,
}

impl StateRoot {
    /// Creates the layout under `root` (with `extra` directories), resolves it and takes its lock.
    /// `Unavailable` if another provider holds it.
    pub(crate) fn open(root: &Path, extra: &[&str]) -> Result<Self, ProviderError> {
        for dir in ["vms", "snapshots", "tmp"].iter().chain(extra) {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| ProviderError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let path = root
            .canonicalize()
            .map_err(|e| ProviderError::io(format!("cannot resolve {}", root.display()), e))?;
        let lock_path = path.join("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ProviderError::io(format!("cannot open {}", lock_path.display()), e))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                ProviderError::Unavailable(format!(
                    "{} is in use by another provider: {errno}",
                    path.display()
                ))
            })?;
        Ok(Self {
            _lock: lock,
            vms: path.join("vms"),
            snapshots: path.join("snapshots"),
            tmp: path.join("tmp"),
            path,
        })
    }

    /// The root itself (canonical).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A directory of the root's top level (`run`, say).
    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub(crate) fn vms_dir(&self) -> &Path {
        &self.vms
    }

    pub(crate) fn snapshots_dir(&self) -> &Path {
        &self.snapshots
    }

    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub(crate) fn vm_dir(&self, vm_id: &VmId) -> PathBuf {
        self.vms.join(vm_id.as_str())
    }

    pub(crate) fn snapshot_dir(&self, snapshot_id: &SnapshotId) -> PathBuf {
        self.snapshots.join(snapshot_id.as_str())
    }

    /// A fresh, unused path under `tmp/` (nothing is created).
    pub(crate) fn staging(&self, prefix: &str) -> PathBuf {
        self.tmp.join(unique_name(prefix))
    }

    /// Moves `path` into `tmp/` (one `rename(2)`, so a crash cannot resurrect it) and returns
    /// where it went; the caller deletes it at leisure. `open` empties `tmp/` in any case.
    pub(crate) fn trash(&self, path: &Path, prefix: &str) -> io::Result<PathBuf> {
        let trash = self.staging(prefix);
        std::fs::rename(path, &trash)?;
        Ok(trash)
    }

    /// The entries of one of the root's directories.
    pub(crate) fn list(
        dir: &Path,
    ) -> Result<impl Iterator<Item = std::fs::DirEntry>, ProviderError> {
        std::fs::read_dir(dir)
            .map(|entries| entries.flatten())
            .map_err(|e| ProviderError::io(format!("cannot list {}", dir.display()), e))
    }

    /// Empties `tmp/` (staging and trash a crash left), handing each directory to `discard`.
    pub(crate) fn empty_tmp(&self, discard: impl Fn(&Path)) -> Result<(), ProviderError> {
        for entry in Self::list(&self.tmp)? {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                discard(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }
}

/// Runs blocking work (file system, checksums) on the blocking pool, off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ProviderError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ProviderError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProviderError::internal("a blocking task failed", e))?
}

/// Runs `f` on the blocking pool without waiting for it (cleanup in `Drop`); inline outside a
/// runtime.
pub(crate) fn in_background(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(f);
        }
        Err(_) => f(),
    }
}

/// Writes `value` as JSON to `path` atomically (a temp file beside it, then `rename(2)`).
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), ProviderError> {
    let bytes = to_json(value)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ProviderError::io(format!("cannot write {}", path.display()), e))
}

/// `value` as pretty JSON (metadata files, the metadata entry of export streams).
pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec_pretty(value)
        .map_err(|e| ProviderError::internal("cannot encode metadata", e))
}

/// Reads a JSON file; a file that does not parse is `InvalidData`.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing an existing target.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // Filesystems without RENAME_NOREPLACE: check, then rename (the caller holds the index).
        Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            std::fs::rename(from, to)
        }
        Err(errno) => Err(io::Error::from(errno)),
    }
}

/// Removes a directory tree; a failure (other than its absence) is logged, not returned.
pub(crate) fn remove_dir_logged(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove directory");
    }
}

/// `<prefix>-<random>`: a name nothing else uses.
pub(crate) fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Hex SHA-256 of a file, streamed.
pub(crate) fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_locked_and_laid_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = StateRoot::open(dir.path(), &["run"]).unwrap();
        for sub in ["vms", "snapshots", "tmp", "run"] {
            assert!(root.path().join(sub).is_dir(), "{sub}");
        }
        let err = StateRoot::open(dir.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(root);
        StateRoot::open(dir.path(), &[]).unwrap();
    }

    #[test]
    fn json_is_written_atomically_and_renames_never_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        write_json_atomic(&path, &serde_json::json!({"a": 1})).unwrap();
        let back: serde_json::Value = read_json(&path).unwrap();
        assert_eq!(back["a"], 1);
        assert!(!dir.path().join("meta.json.tmp").exists());
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn trash_moves_into_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let root = StateRoot::open(dir.path(), &[]).unwrap();
        let vm = root.vm_dir(&VmId::new("a").unwrap());
        std::fs::create_dir(&vm).unwrap();
        let trash = root.trash(&vm, "destroy").unwrap();
        assert!(!vm.exists());
        assert!(trash.starts_with(root.tmp_dir()));
        root.empty_tmp(remove_dir_logged).unwrap();
        assert!(!trash.exists());
    }

    #[test]
    fn digests_are_hex_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
