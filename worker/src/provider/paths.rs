//! Path confinement: every caller-supplied path (exec `cwd`, file transfer) must name something inside
//! the VM's volume. The lexical check is shared by both adapters; the filesystem checks (symlinks that
//! resolve outside the volume) are the process adapter's.
//!
//! Lexically, a path must be relative and free of `..` components (rejected outright rather than
//! normalised, because `link/..` means different things to the kernel and to a string normaliser).

use std::io;
use std::path::{Component, Path, PathBuf};

use super::ProviderError;

/// Checks `path` lexically and returns it normalised (`.` components dropped). The result is empty
/// for the volume itself. `what` names the argument in error messages (`"cwd"`, `"path"`).
pub(crate) fn relative_path(what: &str, path: &str) -> Result<PathBuf, ProviderError> {
    if path.contains('\0') {
        return Err(ProviderError::InvalidArgument(format!(
            "{what} must not contain NUL bytes"
        )));
    }
    let mut out = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(ProviderError::InvalidArgument(format!(
                    "{what} {path:?} must be relative to the volume"
                )));
            }
            Component::ParentDir => {
                return Err(ProviderError::InvalidArgument(format!(
                    "{what} {path:?} must not contain '..'"
                )));
            }
        }
    }
    Ok(out)
}

/// Like [`relative_path`], but the path must name a file (not the volume itself).
pub(crate) fn file_path(path: &str) -> Result<PathBuf, ProviderError> {
    let rel = relative_path("path", path)?;
    if rel.as_os_str().is_empty() {
        return Err(ProviderError::InvalidArgument(format!(
            "path {path:?} must name a file inside the volume"
        )));
    }
    Ok(rel)
}

fn escapes(what: &str, path: &Path) -> ProviderError {
    ProviderError::InvalidArgument(format!(
        "{what} {:?} resolves outside the volume",
        path.display().to_string()
    ))
}

/// Resolves `rel` (already lexically checked) to an existing directory inside `volume`, following
/// symlinks only as far as they stay inside. `volume` must be canonical.
pub(crate) fn resolve_dir(volume: &Path, rel: &Path) -> Result<PathBuf, ProviderError> {
    let resolved = match volume.join(rel).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ProviderError::InvalidArgument(format!(
                "cwd {:?} does not exist in the volume",
                rel.display().to_string()
            )));
        }
        Err(e) => return Err(ProviderError::io("cannot resolve cwd", e)),
    };
    if !resolved.starts_with(volume) {
        return Err(escapes("cwd", rel));
    }
    if !resolved.is_dir() {
        return Err(ProviderError::InvalidArgument(format!(
            "cwd {:?} is not a directory",
            rel.display().to_string()
        )));
    }
    Ok(resolved)
}

/// Resolves `rel` to an existing regular file inside `volume` (canonical) for reading.
pub(crate) fn resolve_existing_file(volume: &Path, rel: &Path) -> Result<PathBuf, ProviderError> {
    let resolved = match volume.join(rel).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ProviderError::NotFound(format!(
                "file {:?} not found",
                rel.display().to_string()
            )));
        }
        Err(e) => return Err(ProviderError::io("cannot resolve path", e)),
    };
    if !resolved.starts_with(volume) {
        return Err(escapes("path", rel));
    }
    Ok(resolved)
}

/// Prepares a write to `rel` inside `volume` (canonical): creates missing parent directories one by
/// one (never through a symlink that leaves the volume) and returns `(parent_dir, file_name)`. The
/// final component is not resolved, so a symlink there is replaced, not followed.
pub(crate) fn prepare_write(
    volume: &Path,
    rel: &Path,
) -> Result<(PathBuf, std::ffi::OsString), ProviderError> {
    let file_name = rel
        .file_name()
        .ok_or_else(|| ProviderError::InvalidArgument("path must name a file".into()))?
        .to_os_string();
    let mut dir = volume.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            let next = dir.join(part);
            match std::fs::symlink_metadata(&next) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&next)
                        .map_err(|e| ProviderError::io("cannot create directory", e))?;
                    dir = next;
                }
                Err(e) => return Err(ProviderError::io("cannot inspect path", e)),
                Ok(meta) if meta.is_dir() => dir = next,
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = next.canonicalize().map_err(|_| {
                        ProviderError::InvalidArgument(format!(
                            "path {:?} goes through a dangling symlink",
                            rel.display().to_string()
                        ))
                    })?;
                    if !target.starts_with(volume) {
                        return Err(escapes("path", rel));
                    }
                    if !target.is_dir() {
                        return Err(not_a_directory(rel));
                    }
                    dir = target;
                }
                Ok(_) => return Err(not_a_directory(rel)),
            }
        }
    }
    match std::fs::symlink_metadata(dir.join(&file_name)) {
        Ok(meta) if meta.is_dir() => Err(ProviderError::InvalidArgument(format!(
            "path {:?} is a directory",
            rel.display().to_string()
        ))),
        _ => Ok((dir, file_name)),
    }
}

fn not_a_directory(rel: &Path) -> ProviderError {
    ProviderError::InvalidArgument(format!(
        "a parent of path {:?} is not a directory",
        rel.display().to_string()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderErrorKind;

    fn kind<T: std::fmt::Debug>(r: Result<T, ProviderError>) -> ProviderErrorKind {
        r.unwrap_err().kind()
    }

    #[test]
    fn lexical_check_rejects_absolute_and_parent_components() {
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\0b"] {
            assert_eq!(
                kind(relative_path("path", bad)),
                ProviderErrorKind::InvalidArgument,
                "{bad:?}"
            );
        }
        assert_eq!(relative_path("cwd", "").unwrap(), PathBuf::new());
        assert_eq!(
            relative_path("cwd", "./a/./b/").unwrap(),
            PathBuf::from("a/b")
        );
        assert_eq!(
            kind(file_path(".")),
            ProviderErrorKind::InvalidArgument,
            "the volume itself is not a file"
        );
    }

    #[test]
    fn filesystem_checks_follow_symlinks_only_inside_the_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir_all(volume.join("sub")).unwrap();
        std::fs::write(volume.join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", volume.join("out")).unwrap();
        std::os::unix::fs::symlink("sub", volume.join("in")).unwrap();
        let volume = volume.canonicalize().unwrap();

        assert!(resolve_dir(&volume, Path::new("in")).is_ok());
        assert_eq!(
            kind(resolve_dir(&volume, Path::new("out"))),
            ProviderErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(resolve_dir(&volume, Path::new("missing"))),
            ProviderErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(resolve_dir(&volume, Path::new("sub/f"))),
            ProviderErrorKind::InvalidArgument
        );
        assert!(resolve_existing_file(&volume, Path::new("in/f")).is_ok());
        assert_eq!(
            kind(resolve_existing_file(&volume, Path::new("out/passwd"))),
            ProviderErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(resolve_existing_file(&volume, Path::new("nope"))),
            ProviderErrorKind::NotFound
        );

        let (dir, name) = prepare_write(&volume, Path::new("new/deeper/file")).unwrap();
        assert_eq!(dir, volume.join("new/deeper"));
        assert_eq!(name, "file");
        assert!(dir.is_dir());
        assert_eq!(
            kind(prepare_write(&volume, Path::new("out/newdir/x"))),
            ProviderErrorKind::InvalidArgument
        );
        assert!(!Path::new("/etc/newdir").exists());
        assert_eq!(
            kind(prepare_write(&volume, Path::new("sub/f/x"))),
            ProviderErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(prepare_write(&volume, Path::new("sub"))),
            ProviderErrorKind::InvalidArgument
        );
        // A symlink at the final component is replaced, not followed: the target dir is the parent.
        let (dir, _) = prepare_write(&volume, Path::new("out")).unwrap();
        assert_eq!(dir, volume);
    }
}
