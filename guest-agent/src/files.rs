//! Paths confined to the work directory, and file put/get. Same rules as the process provider's
//! volume (`worker/src/provider/paths.rs`): a path is relative and free of `..` components
//! (rejected, not normalised); symlinks are followed only while they stay inside the work
//! directory; a write replaces a symlink at the final component rather than following it.
//!
//! Commands run beside these requests and may swap things in under a path at any moment, so:
//!
//! - `get` opens with `O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC` and checks the opened descriptor
//!   (`fstat`): anything but a regular file (a FIFO, a device, a socket, a directory) is refused
//!   without ever blocking, and a symlink swapped in at the last component is refused;
//! - `put` opens the parent directory (`O_NOFOLLOW`), creates a fresh temp file in it relative to
//!   that descriptor (`O_CREAT | O_EXCL | O_NOFOLLOW`), and renames it over the target, so it never
//!   writes through a symlink, whether planted at the target or at the temp name;
//! - both check where the opened descriptor really is (`/proc/self/fd`) and refuse one outside the
//!   work directory (a directory swapped for a symlink between the checks and the open).
//!
//! A write that runs out of space (`ENOSPC`, `EDQUOT`) is [`AgentErrorKind::NoSpace`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use hearth_messages::agent::{AgentError, AgentErrorKind};
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::libc;
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError::new(AgentErrorKind::InvalidArgument, message)
}

/// An I/O failure; out of space (`ENOSPC`) or quota (`EDQUOT`) is [`AgentErrorKind::NoSpace`].
fn io_err(context: impl std::fmt::Display, e: io::Error) -> AgentError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => AgentErrorKind::NoSpace,
        _ => AgentErrorKind::Io,
    };
    AgentError::new(kind, format!("{context}: {e}"))
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

/// Refuses a descriptor that is not inside `root` after all (a component of its path was swapped
/// for a symlink after it was checked). Without `/proc` there is nothing to compare: the checks
/// before the open stand alone.
fn check_inside(root: &Path, file: &File, rel: &Path) -> Result<(), AgentError> {
    match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(real) if !real.starts_with(root) => Err(invalid(format!(
            "path {} resolves outside the volume",
            shown(rel)
        ))),
        _ => Ok(()),
    }
}

/// Opens the directory `dir` (which must not itself be a symlink) for `*at` calls.
fn open_dir(root: &Path, dir: &Path, rel: &Path) -> Result<File, AgentError> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => invalid(format!(
                "a parent of path {} changed while being written",
                shown(rel)
            )),
            _ => io_err(format!("cannot open the directory of {}", shown(rel)), e),
        })?;
    check_inside(root, &file, rel)?;
    Ok(file)
}

/// Writes `data` to `path` under `root` atomically (temp file + rename). `mode` is masked to
/// `0o777`; without it a replaced file keeps its mode and a new one gets the default. Never writes
/// through a symlink: one at the target is replaced.
pub fn put(root: &Path, path: &str, data: &[u8], mode: Option<u32>) -> Result<u64, AgentError> {
    let rel = file_path(path)?;
    let root = canonical_root(root)?;
    let (dir, name) = prepare_write(&root, &rel)?;
    let dir = open_dir(&root, &dir, &rel)?;
    let keep_mode = match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            return Err(invalid(format!("path {} is a directory", shown(&rel))));
        }
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG => {
            Some(st.st_mode & 0o7777)
        }
        _ => None,
    };
    let tmp = format!(
        ".hearth-put-{}-{}-{}",
        std::process::id(),
        unique_suffix(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let mut created = false;
    let written = (|| -> io::Result<()> {
        // O_EXCL: a fresh file, never an existing one or the target of a symlink planted there.
        let fd = openat(
            &dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )?;
        created = true;
        let mut file = File::from(fd);
        file.write_all(data)?;
        if let Some(mode) = mode.map(|m| m & 0o777).or(keep_mode) {
            fchmod(&file, Mode::from_bits_truncate(mode))?;
        }
        drop(file);
        renameat(&dir, tmp.as_str(), &dir, name.as_os_str())?;
        Ok(())
    })();
    if let Err(e) = written {
        if created {
            let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        return Err(match e.raw_os_error() {
            Some(libc::EISDIR) => invalid(format!("path {} is a directory", shown(&rel))),
            _ => io_err(format!("cannot write {}", shown(&rel)), e),
        });
    }
    Ok(data.len() as u64)
}

/// Reads the regular file at `path` under `root`, refusing one larger than `max_bytes`, and
/// anything but a regular file, without blocking.
pub fn get(root: &Path, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
    let rel = file_path(path)?;
    let root = canonical_root(root)?;
    let resolved = resolve_existing(&root, &rel)?;
    // O_NONBLOCK: opening a FIFO (or a device) swapped in since the checks does not wait for a
    // writer; it is refused below. O_NOFOLLOW: neither is a symlink swapped in at the last
    // component followed. (std adds O_CLOEXEC.)
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&resolved)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                invalid(format!("path {path:?} became a symlink while being read"))
            }
            Some(libc::ENOENT) => AgentError::new(
                AgentErrorKind::NotFound,
                format!("file {} not found", shown(&rel)),
            ),
            _ => io_err(format!("cannot open {path:?}"), e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| io_err(format!("cannot inspect {path:?}"), e))?;
    if meta.is_dir() {
        return Err(invalid(format!("path {path:?} is a directory")));
    }
    if !meta.is_file() {
        return Err(invalid(format!(
            "path {path:?} is not a regular file (a FIFO, socket or device)"
        )));
    }
    check_inside(&root, &file, &rel)?;
    if meta.len() > max_bytes {
        return Err(invalid(format!(
            "file {path:?} is {} bytes, more than the limit of {max_bytes}",
            meta.len()
        )));
    }
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
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

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

    #[test]
    fn get_refuses_fifos_and_devices_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let started = Instant::now();
        let err = get(root, "fifo", 100).unwrap_err();
        assert_eq!(err.kind, AgentErrorKind::InvalidArgument);
        assert!(err.message.contains("not a regular file"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A device node (root can make one; skip the check where it cannot).
        let dev = root.join("null");
        if nix::sys::stat::mknod(
            &dev,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        )
        .is_ok()
        {
            assert_eq!(
                kind(get(root, "null", 100)),
                AgentErrorKind::InvalidArgument
            );
        }
    }

    #[test]
    fn put_never_writes_through_a_planted_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        put(&root, "link", b"new", None).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(
            !std::fs::symlink_metadata(root.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(root.join("link")).unwrap(), b"new");
        // A symlinked directory inside the root is still followed; one leaving it is refused.
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink("real", root.join("alias")).unwrap();
        put(&root, "alias/f", b"x", None).unwrap();
        assert_eq!(std::fs::read(root.join("real/f")).unwrap(), b"x");
        std::os::unix::fs::symlink(tmp.path(), root.join("up")).unwrap();
        assert_eq!(
            kind(put(&root, "up/outside", b"x", None)),
            AgentErrorKind::InvalidArgument
        );
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".hearth-put")),
            "{names:?}"
        );
    }

    /// Unmounts a test tmpfs, also when the test fails.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn a_full_disk_is_no_space() {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("small");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=1m",
                "hearth-test",
                mnt.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return;
        }
        let _unmount = Unmount(mnt.clone());
        let err = put(&mnt, "big", &vec![7u8; 2 << 20], None).unwrap_err();
        assert_eq!(err.kind, AgentErrorKind::NoSpace, "{err}");
        // The partial temp file is gone: the space is back.
        put(&mnt, "small", b"fits", None).unwrap();
        assert_eq!(get(&mnt, "small", 10).unwrap(), b"fits");
    }
}
