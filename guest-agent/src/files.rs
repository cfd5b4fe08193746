//! Paths confined to the work directory, and file put/get. Same rules as the process provider's
//! volume (`worker/src/provider/paths.rs`): a path is relative and free of `..` components
//! (rejected, not normalised); symlinks are followed only while they stay inside the work
//! directory; a write replaces a symlink at the final component rather than following it.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use hearth_messages::agent::{AgentError, AgentErrorKind};

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError::new(AgentErrorKind::InvalidArgument, message)
}

fn io_err(context: impl std::fmt::Display, e: io::Error) -> AgentError {
    AgentError::new(AgentErrorKind::Io, format!("{context}: {e}"))
}

fn shown(rel: &Path) -> String {
    format!("{:?}", rel.display().to_string())
}

/// Checks `path` lexically; returns it without `.` components (empty for the work directory).
pub fn relative_path(what: &str, path: &str) -> Result<PathBuf, AgentError> {
    if path.contains('\0') {
        return Err(invalid(format!("{what} must not contain NUL bytes")));
    }
    let mut out = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "{what} {path:?} must be relative to the volume"
                )));
            }
            Component::ParentDir => {
                return Err(invalid(format!("{what} {path:?} must not contain '..'")));
            }
        }
    }
    Ok(out)
}

/// Like [`relative_path`], but it must name a file, not the work directory itself.
pub fn file_path(path: &str) -> Result<PathBuf, AgentError> {
    let rel = relative_path("path", path)?;
    if rel.as_os_str().is_empty() {
        return Err(invalid(format!(
            "path {path:?} must name a file inside the volume"
        )));
    }
    Ok(rel)
}

/// Resolves `rel` to an existing directory inside `root` (canonical).
pub fn resolve_dir(root: &Path, rel: &Path) -> Result<PathBuf, AgentError> {
    let resolved = match root.join(rel).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "cwd {} does not exist in the volume",
                shown(rel)
            )));
        }
        Err(e) => return Err(io_err("cannot resolve cwd", e)),
    };
    if !resolved.starts_with(root) {
        return Err(invalid(format!(
            "cwd {} resolves outside the volume",
            shown(rel)
        )));
    }
    if !resolved.is_dir() {
        return Err(invalid(format!("cwd {} is not a directory", shown(rel))));
    }
    Ok(resolved)
}

fn resolve_existing(root: &Path, rel: &Path) -> Result<PathBuf, AgentError> {
    let resolved = match root.join(rel).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AgentError::new(
                AgentErrorKind::NotFound,
                format!("file {} not found", shown(rel)),
            ));
        }
        Err(e) => return Err(io_err("cannot resolve path", e)),
    };
    if !resolved.starts_with(root) {
        return Err(invalid(format!(
            "path {} resolves outside the volume",
            shown(rel)
        )));
    }
    Ok(resolved)
}

/// Creates the missing parents of `rel` inside `root` one by one (never through a symlink leaving
/// it) and returns `(parent_dir, file_name)`.
fn prepare_write(root: &Path, rel: &Path) -> Result<(PathBuf, std::ffi::OsString), AgentError> {
    let file_name = rel
        .file_name()
        .ok_or_else(|| invalid("path must name a file"))?
        .to_os_string();
    let not_a_directory = || {
        invalid(format!(
            "a parent of path {} is not a directory",
            shown(rel)
        ))
    };
    let mut dir = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            let next = dir.join(part);
            match std::fs::symlink_metadata(&next) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&next).map_err(|e| io_err("cannot create directory", e))?;
                    dir = next;
                }
                Err(e) => return Err(io_err("cannot inspect path", e)),
                Ok(meta) if meta.is_dir() => dir = next,
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = next.canonicalize().map_err(|_| {
                        invalid(format!(
                            "path {} goes through a dangling symlink",
                            shown(rel)
                        ))
                    })?;
                    if !target.starts_with(root) {
                        return Err(invalid(format!(
                            "path {} resolves outside the volume",
                            shown(rel)
                        )));
                    }
                    if !target.is_dir() {
                        return Err(not_a_directory());
                    }
                    dir = target;
                }
                Ok(_) => return Err(not_a_directory()),
            }
        }
    }
    match std::fs::symlink_metadata(dir.join(&file_name)) {
        Ok(meta) if meta.is_dir() => Err(invalid(format!("path {} is a directory", shown(rel)))),
        _ => Ok((dir, file_name)),
    }
}

/// Writes `data` to `path` under `root` atomically (temp file + rename). `mode` is masked to
/// `0o777`; without it a replaced file keeps its mode and a new one gets the default.
pub fn put(root: &Path, path: &str, data: &[u8], mode: Option<u32>) -> Result<u64, AgentError> {
    let rel = file_path(path)?;
    let root = canonical_root(root)?;
    let (dir, name) = prepare_write(&root, &rel)?;
    let target = dir.join(&name);
    let keep_mode = std::fs::symlink_metadata(&target)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.permissions().mode());
    let tmp = dir.join(format!(
        ".hearth-put-{}-{}",
        std::process::id(),
        unique_suffix()
    ));
    let written = (|| {
        std::fs::write(&tmp, data)?;
        if let Some(mode) = mode.map(|m| m & 0o777).or(keep_mode) {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        }
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(format!("cannot write {}", shown(&rel)), e));
    }
    Ok(data.len() as u64)
}

/// Reads the regular file at `path` under `root`, refusing one larger than `max_bytes`.
pub fn get(root: &Path, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
    let rel = file_path(path)?;
    let root = canonical_root(root)?;
    let resolved = resolve_existing(&root, &rel)?;
    let meta =
        std::fs::metadata(&resolved).map_err(|e| io_err(format!("cannot inspect {path:?}"), e))?;
    if meta.is_dir() {
        return Err(invalid(format!("path {path:?} is a directory")));
    }
    if !meta.is_file() {
        return Err(invalid(format!("path {path:?} is not a regular file")));
    }
    if meta.len() > max_bytes {
        return Err(invalid(format!(
            "file {path:?} is {} bytes, more than the limit of {max_bytes}",
            meta.len()
        )));
    }
    let file =
        std::fs::File::open(&resolved).map_err(|e| io_err(format!("cannot open {path:?}"), e))?;
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_err(format!("cannot read {path:?}"), e))?;
    if data.len() as u64 > max_bytes {
        return Err(invalid(format!(
            "file {path:?} is more than the limit of {max_bytes} bytes"
        )));
    }
    Ok(data)
}

fn canonical_root(root: &Path) -> Result<PathBuf, AgentError> {
    root.canonicalize()
        .map_err(|e| io_err("cannot resolve the work directory", e))
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind<T: std::fmt::Debug>(r: Result<T, AgentError>) -> AgentErrorKind {
        r.unwrap_err().kind
    }

    #[test]
    fn paths_are_confined() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../x",
            "..",
            "",
            ".",
            "out/passwd",
        ] {
            assert_eq!(
                kind(get(root, bad, 100)),
                AgentErrorKind::InvalidArgument,
                "{bad:?}"
            );
        }
        assert_eq!(
            kind(put(root, "out/new/x", b"x", None)),
            AgentErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(resolve_dir(&root.canonicalize().unwrap(), Path::new("out"))),
            AgentErrorKind::InvalidArgument
        );
    }

    #[test]
    fn put_and_get_follow_the_volume_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert_eq!(put(root, "./deep/er/f", b"0123456789", None).unwrap(), 10);
        assert_eq!(get(root, "deep/./er/f", 10).unwrap(), b"0123456789");
        let err = get(root, "deep/er/f", 5).unwrap_err();
        assert_eq!(err.kind, AgentErrorKind::InvalidArgument);
        assert!(err.message.contains("10"), "{err}");
        assert_eq!(kind(get(root, "missing", 5)), AgentErrorKind::NotFound);
        assert_eq!(kind(get(root, "deep", 5)), AgentErrorKind::InvalidArgument);
        assert_eq!(
            kind(put(root, "deep", b"x", None)),
            AgentErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(put(root, "deep/er/f/below", b"x", None)),
            AgentErrorKind::InvalidArgument
        );
        put(root, "m", b"", Some(0o600)).unwrap();
        put(root, "m", b"again", None).unwrap();
        let mode = std::fs::metadata(root.join("m"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "a replaced file keeps its mode");
    }
}
