//! Path confinement: every caller-supplied path (exec `cwd`, file transfer) must name something inside
//! the VM's volume. This is the lexical check every adapter makes before a request reaches a VM; the
//! filesystem checks (symlinks that resolve outside the volume) happen where the volume is, in the
//! agent (`guest-agent/src/files.rs`), inside the sandbox or the guest.
//!
//! Lexically, a path must be relative and free of `..` components (rejected outright rather than
//! normalised, because `link/..` means different things to the kernel and to a string normaliser).

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
}
