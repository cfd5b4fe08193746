//! Retention of the backup directory: after every backup the worker deletes the oldest backups
//! until the count, age and byte limits of [`BackupRetention`] hold. The backup just written is
//! never deleted (a limit smaller than one backup still keeps the newest), and only files the
//! providers write (`<vm_id>-<unix_ms>.tar.zst`) are considered: nothing else in the directory is
//! touched.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::BackupRetention;

/// One backup found in the directory.
#[derive(Debug)]
struct Found {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

/// Whether `name` is a backup a provider wrote: `<vm_id>-<unix_ms>.tar.zst`.
fn is_backup_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".tar.zst") else {
        return false;
    };
    match stem.rsplit_once('-') {
        Some((vm, ms)) => {
            !vm.is_empty() && !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Deletes backups in `dir`, oldest first, until `retention` holds; `newest` (the backup just
/// written) is kept whatever the limits. Returns the deleted paths. Blocking.
pub(crate) fn prune(
    dir: &Path,
    retention: &BackupRetention,
    newest: &Path,
    now: SystemTime,
) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_backup_name(name) {
            continue;
        }
        // Not following links: only regular files the worker wrote count.
        let meta = match entry.metadata() {
            Ok(meta) if meta.file_type().is_file() => meta,
            _ => continue,
        };
        found.push(Found {
            path: entry.path(),
            bytes: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    // Newest first; the one just written leads whatever its time stamp says.
    found.sort_by(|a, b| {
        (b.path == newest)
            .cmp(&(a.path == newest))
            .then(b.modified.cmp(&a.modified))
            .then(b.path.cmp(&a.path))
    });
    let mut kept_count = 0usize;
    let mut kept_bytes = 0u64;
    let mut deleted = Vec::new();
    for (i, backup) in found.into_iter().enumerate() {
        let always = i == 0 && backup.path == newest;
        let too_many = retention.keep > 0 && kept_count >= retention.keep;
        let too_big = retention.max_bytes > 0
            && kept_bytes.saturating_add(backup.bytes) > retention.max_bytes;
        let too_old = retention.max_age.is_some_and(|max| {
            now.duration_since(backup.modified)
                .is_ok_and(|age| age > max)
        });
        if always || !(too_many || too_big || too_old) {
            kept_count += 1;
            kept_bytes = kept_bytes.saturating_add(backup.bytes);
            continue;
        }
        match std::fs::remove_file(&backup.path) {
            Ok(()) => deleted.push(backup.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Writes a backup of `bytes` bytes whose modification time is `age` ago.
    fn backup(dir: &Path, name: &str, bytes: usize, age: Duration, now: SystemTime) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(now - age).unwrap();
        path
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    const NONE: BackupRetention = BackupRetention {
        keep: 0,
        max_age: None,
        max_bytes: 0,
    };

    #[test]
    fn count_age_and_bytes_delete_the_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        backup(dir, "s-1-1000.tar.zst", 100, 5 * hour, now);
        backup(dir, "s-2-2000.tar.zst", 100, 4 * hour, now);
        backup(dir, "s2-3000.tar.zst", 100, 3 * hour, now);
        backup(dir, "s2-4000.tar.zst", 100, 2 * hour, now);
        let newest = backup(dir, "s3-5000.tar.zst", 100, hour, now);
        // Not backups: never touched, whatever their age.
        backup(dir, "notes.txt", 10, 100 * hour, now);
        backup(dir, ".s4-6000.tar.zst.partial", 10, 100 * hour, now);
        std::os::unix::fs::symlink("/etc/hostname", dir.join("evil-1.tar.zst")).unwrap();

        assert!(prune(dir, &NONE, &newest, now).unwrap().is_empty());

        let deleted = prune(dir, &BackupRetention { keep: 4, ..NONE }, &newest, now).unwrap();
        assert_eq!(deleted, vec![dir.join("s-1-1000.tar.zst")]);

        let age = BackupRetention {
            max_age: Some(Duration::from_secs(3 * 3600 + 60)),
            ..NONE
        };
        let deleted = prune(dir, &age, &newest, now).unwrap();
        assert_eq!(deleted, vec![dir.join("s-2-2000.tar.zst")]);

        let bytes = BackupRetention {
            max_bytes: 250,
            ..NONE
        };
        let deleted = prune(dir, &bytes, &newest, now).unwrap();
        assert_eq!(deleted, vec![dir.join("s2-3000.tar.zst")]);
        assert_eq!(
            names(dir),
            [
                ".s4-6000.tar.zst.partial",
                "evil-1.tar.zst",
                "notes.txt",
                "s2-4000.tar.zst",
                "s3-5000.tar.zst"
            ]
        );
    }

    #[test]
    fn the_backup_just_written_is_kept_even_past_every_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let now = SystemTime::now();
        let old = backup(dir, "a-1.tar.zst", 10, Duration::from_secs(10), now);
        // Written just now but with an older time stamp (a clock step): still the one kept.
        let newest = backup(dir, "b-2.tar.zst", 1000, Duration::from_secs(100), now);
        let strict = BackupRetention {
            keep: 1,
            max_age: Some(Duration::from_secs(1)),
            max_bytes: 1,
        };
        assert_eq!(prune(dir, &strict, &newest, now).unwrap(), vec![old]);
        assert_eq!(names(dir), ["b-2.tar.zst"]);
    }

    #[test]
    fn backup_names_are_recognised() {
        assert!(is_backup_name("sess-1-1700000000000.tar.zst"));
        assert!(!is_backup_name("sess.tar.zst"));
        assert!(!is_backup_name("-1.tar.zst"));
        assert!(!is_backup_name("sess-x1.tar.zst"));
        assert!(!is_backup_name(".sess-1.tar.zst.partial"));
    }
}
