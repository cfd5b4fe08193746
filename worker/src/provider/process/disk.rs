//! Disk quotas for process-adapter volumes: each VM's volume is an ext4 filesystem in a sparse
//! image file, loop-mounted on the volume directory, so a sandbox that fills its disk gets `ENOSPC`
//! instead of filling the host.
//!
//! Layout, inside a VM's directory `dir`:
//! ```text
//! dir/disk.img    sparse image (only written blocks use host space); ext4, no journal, 0 reserved
//! dir/volume/     its mount point (-o loop,nosuid,nodev,noatime); the root is owned by the sandbox uid
//! ```
//! The loop device is created by `mount -o loop` with autoclear, so unmounting (even lazily) frees
//! it once the last user is gone. Renaming `dir` while mounted is fine: the mount follows the
//! directory. After a worker restart, [`Disks::ensure_mounted`] remounts what is not mounted.
//!
//! No journal: a host crash can leave the filesystem unclean; `ensure_mounted` runs `e2fsck -p`
//! (when installed) before mounting, which repairs what it safely can. Every function here blocks
//! (it runs `mkfs.ext4`, `mount`, `umount`): callers on an async runtime use `spawn_blocking`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::provider::{ProviderError, tail_lossy};

/// The image file inside a VM directory.
pub(crate) const IMAGE: &str = "disk.img";
/// The mount point inside a VM directory (the VM's volume).
pub(crate) const VOLUME: &str = "volume";
/// Where the tools are looked for (the worker may run with a minimal PATH).
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];
/// Bytes of a failing tool's stderr kept in the error message.
const STDERR_TAIL: usize = 2048;
/// Mount options of every volume: no setuid binaries or device nodes from a sandbox-written fs.
const MOUNT_OPTIONS: &str = "loop,nosuid,nodev,noatime";

/// How volume sizes are enforced on this host; reported in heartbeats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DiskMechanism {
    /// An ext4 image per volume, loop-mounted.
    LoopExt4,
    /// Volumes are plain directories; `disk_mib` is not enforced.
    None,
}

impl DiskMechanism {
    /// Lowercase name for logs, metrics labels and heartbeats.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DiskMechanism::LoopExt4 => "loop_ext4",
            DiskMechanism::None => "none",
        }
    }
}

impl std::fmt::Display for DiskMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tools `LoopExt4` needs, found once by [`Disks::detect`].
#[derive(Debug, Clone)]
struct Tools {
    mkfs: PathBuf,
    mount: PathBuf,
    umount: PathBuf,
    /// Optional: checks an unclean filesystem before a remount.
    e2fsck: Option<PathBuf>,
}

/// The host's way of enforcing volume sizes.
#[derive(Debug, Clone)]
pub(crate) struct Disks {
    tools: Option<Tools>,
    /// Why quotas are unavailable; `None` with `LoopExt4`.
    reason: Option<String>,
}

impl Disks {
    /// `LoopExt4` when running as root with `/dev/loop-control`, `mkfs.ext4`, `mount` and `umount`;
    /// otherwise `None`, with the reason. Never fails.
    pub(crate) fn detect() -> Disks {
        if !nix::unistd::geteuid().is_root() {
            return Disks::disabled("loop mounts need root");
        }
        if !Path::new("/dev/loop-control").exists() {
            return Disks::disabled("/dev/loop-control does not exist");
        }
        let found = |name: &str| {
            TOOL_DIRS
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        };
        let (Some(mkfs), Some(mount), Some(umount)) =
            (found("mkfs.ext4"), found("mount"), found("umount"))
        else {
            return Disks::disabled(format!(
                "mkfs.ext4, mount or umount not found in {}",
                TOOL_DIRS.join(":")
            ));
        };
        Disks {
            tools: Some(Tools {
                mkfs,
                mount,
                umount,
                e2fsck: found("e2fsck"),
            }),
            reason: None,
        }
    }

    /// No quotas (config override, or what `detect` found missing).
    pub(crate) fn disabled(reason: impl Into<String>) -> Disks {
        Disks {
            tools: None,
            reason: Some(reason.into()),
        }
    }

    pub(crate) fn mechanism(&self) -> DiskMechanism {
        if self.tools.is_some() {
            DiskMechanism::LoopExt4
        } else {
            DiskMechanism::None
        }
    }

    /// Why quotas are unavailable, for a log line at startup.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    fn tools(&self) -> Result<&Tools, ProviderError> {
        self.tools.as_ref().ok_or_else(|| {
            ProviderError::Unavailable(format!(
                "disk quotas unavailable: {}",
                self.reason.as_deref().unwrap_or("unknown")
            ))
        })
    }

    /// Makes `dir/disk.img` (sparse, `size_mib`), formats it with its root owned by `owner`
    /// (uid, gid) and mounts it on `dir/volume` (created if missing; must be empty). `dir` is
    /// created if missing. On failure, whatever this call made is removed again.
    pub(crate) fn create(
        &self,
        dir: &Path,
        size_mib: u32,
        owner: (u32, u32),
    ) -> Result<(), ProviderError> {
        let tools = self.tools()?;
        if size_mib == 0 {
            return Err(ProviderError::InvalidArgument(
                "disk size must be at least 1 MiB".into(),
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| ProviderError::io(format!("cannot create {}", dir.display()), e))?;
        let image = dir.join(IMAGE);
        let volume = dir.join(VOLUME);
        let mut undo = Undo::default();
        let file = File::create_new(&image).map_err(|e| {
            let context = format!("cannot create {}", image.display());
            match e.kind() {
                io::ErrorKind::AlreadyExists => ProviderError::AlreadyExists(context),
                _ => ProviderError::io(context, e),
            }
        })?;
        undo.image = Some(image.clone());
        file.set_len(u64::from(size_mib) << 20)
            .map_err(|e| ProviderError::io(format!("cannot size {}", image.display()), e))?;
        drop(file);

        match std::fs::create_dir(&volume) {
            Ok(()) => undo.volume = Some(volume.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let mut entries = std::fs::read_dir(&volume).map_err(|e| {
                    ProviderError::io(format!("cannot read {}", volume.display()), e)
                })?;
                if entries.next().is_some() {
                    return Err(ProviderError::InvalidState(format!(
                        "{} is not empty: refusing to mount a disk over it",
                        volume.display()
                    )));
                }
            }
            Err(e) => {
                return Err(ProviderError::io(
                    format!("cannot create {}", volume.display()),
                    e,
                ));
            }
        }

        // Fast and small: no journal (a sandbox scratch disk; e2fsck on remount), no resize inode
        // (never grown online), inode tables initialised lazily, no discard pass over a sparse
        // file, no blocks reserved for root (the sandbox gets all of `size_mib`).
        let root_owner = format!(
            "root_owner={}:{},lazy_itable_init=1,nodiscard",
            owner.0, owner.1
        );
        run(
            &tools.mkfs,
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-O".as_ref(),
                "^has_journal,^resize_inode".as_ref(),
                "-E".as_ref(),
                root_owner.as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                image.as_os_str(),
            ],
        )?;
        mount(tools, &image, &volume)?;
        undo.mounted = Some((tools.umount.clone(), volume.clone()));
        // mkfs makes a root-only lost+found that would trip a sandbox user's `find`, `du` or
        // `cp -r` with EACCES; e2fsck recreates it if it ever needs one.
        let lost = volume.join("lost+found");
        std::fs::remove_dir(&lost)
            .map_err(|e| ProviderError::io(format!("cannot remove {}", lost.display()), e))?;
        undo.disarm();
        debug!(dir = %dir.display(), size_mib, "volume disk created");
        Ok(())
    }

    /// After a restart: mounts `dir/disk.img` on `dir/volume` unless it is mounted already (checked
    /// first, with `e2fsck -p` when available). Returns whether it mounted now. `NotFound` without
    /// an image.
    pub(crate) fn ensure_mounted(&self, dir: &Path) -> Result<bool, ProviderError> {
        let tools = self.tools()?;
        let image = dir.join(IMAGE);
        let volume = dir.join(VOLUME);
        if !image.is_file() {
            return Err(ProviderError::NotFound(format!(
                "no disk image at {}",
                image.display()
            )));
        }
        if is_mounted(&volume) {
            return Ok(false);
        }
        if let Some(e2fsck) = &tools.e2fsck {
            // 0: clean, 1: fixed, 2: fixed, reboot advised (not for a loop image); 4+: not fixed.
            let out = output(e2fsck, &["-p".as_ref(), image.as_os_str()])?;
            match out.status.code() {
                Some(0..=2) => {}
                _ => return Err(tool_failed(e2fsck, &out)),
            }
        }
        match std::fs::create_dir(&volume) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(ProviderError::io(
                    format!("cannot create {}", volume.display()),
                    e,
                ));
            }
            _ => {}
        }
        mount(tools, &image, &volume)?;
        Ok(true)
    }

    /// Unmounts `dir/volume` (no-op if not mounted). If the volume is busy (a process still has a
    /// file open or its cwd there), it is detached lazily: gone from the tree at once, the
    /// filesystem and its loop device released when the last user lets go.
    pub(crate) fn unmount(&self, dir: &Path) -> Result<(), ProviderError> {
        let tools = self.tools()?;
        let volume = dir.join(VOLUME);
        if !is_mounted(&volume) {
            return Ok(());
        }
        let out = output(&tools.umount, &[volume.as_os_str()])?;
        if out.status.success() {
            return Ok(());
        }
        warn!(
            volume = %volume.display(),
            error = %tail_lossy(&out.stderr, STDERR_TAIL),
            "umount failed; detaching lazily"
        );
        run(&tools.umount, &["-l".as_ref(), volume.as_os_str()])
    }
}

/// Whether `dir` holds a disk image (the VM was created with a quota).
pub(crate) fn has_image(dir: &Path) -> bool {
    dir.join(IMAGE).is_file()
}

/// Whether something is mounted exactly at `volume` (per `/proc/self/mountinfo`).
pub(crate) fn is_mounted(volume: &Path) -> bool {
    let Ok(target) = std::fs::canonicalize(volume) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|point| Path::new(&unescape_mountinfo(point)) == target)
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) if bytes[i] == b'\\' => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount(tools: &Tools, image: &Path, volume: &Path) -> Result<(), ProviderError> {
    run(
        &tools.mount,
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            MOUNT_OPTIONS.as_ref(),
            image.as_os_str(),
            volume.as_os_str(),
        ],
    )
}

/// Runs `tool` with `args` under the C locale, keeping its output.
fn output(tool: &Path, args: &[&std::ffi::OsStr]) -> Result<Output, ProviderError> {
    Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| ProviderError::io(format!("cannot run {}", tool.display()), e))
}

/// Runs `tool`; a non-zero exit is `CommandFailed` with the tail of its stderr.
fn run(tool: &Path, args: &[&std::ffi::OsStr]) -> Result<(), ProviderError> {
    let out = output(tool, args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(tool_failed(tool, &out))
    }
}

fn tool_failed(tool: &Path, out: &Output) -> ProviderError {
    let name = tool
        .file_name()
        .unwrap_or(tool.as_os_str())
        .to_string_lossy();
    ProviderError::CommandFailed(format!(
        "{name} failed ({}): {}",
        out.status,
        tail_lossy(&out.stderr, STDERR_TAIL)
    ))
}

/// What a failed [`Disks::create`] has to take back, in reverse order, unless disarmed.
#[derive(Debug, Default)]
struct Undo {
    image: Option<PathBuf>,
    volume: Option<PathBuf>,
    /// (umount binary, mount point)
    mounted: Option<(PathBuf, PathBuf)>,
}

impl Undo {
    /// Keeps everything (assigning `Undo::default()` instead would run this very `Drop`).
    fn disarm(&mut self) {
        self.image = None;
        self.volume = None;
        self.mounted = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some((umount, point)) = self.mounted.take()
            && let Err(e) = run(&umount, &["-l".as_ref(), point.as_os_str()])
        {
            warn!(volume = %point.display(), error = %e, "cannot undo mount");
        }
        if let Some(volume) = self.volume.take()
            && let Err(e) = std::fs::remove_dir(&volume)
        {
            warn!(volume = %volume.display(), error = %e, "cannot undo volume directory");
        }
        if let Some(image) = self.image.take()
            && let Err(e) = std::fs::remove_file(&image)
        {
            warn!(image = %image.display(), error = %e, "cannot undo disk image");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration, Instant};

    /// A test uid that is not root, so ext4 has no reason to let it past the quota.
    const OWNER: (u32, u32) = (1000, 1000);

    fn disks_or_skip() -> Option<Disks> {
        let disks = Disks::detect();
        if disks.mechanism() == DiskMechanism::LoopExt4 {
            Some(disks)
        } else {
            eprintln!("skipping: {}", disks.reason().unwrap_or("no loop ext4"));
            None
        }
    }

    /// A VM directory in a tempdir the non-root owner can reach; unmounts on drop whatever
    /// happened in the test.
    struct VmDir {
        tmp: tempfile::TempDir,
        dir: PathBuf,
        disks: Disks,
    }

    impl VmDir {
        fn new(disks: &Disks) -> VmDir {
            let tmp = tempfile::tempdir().unwrap();
            // 0700 by default: the non-root owner could not reach its own volume.
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            VmDir {
                dir: tmp.path().join("vm-a"),
                tmp,
                disks: disks.clone(),
            }
        }
    }

    impl Drop for VmDir {
        fn drop(&mut self) {
            for entry in std::fs::read_dir(self.tmp.path()).unwrap().flatten() {
                let _ = self.disks.unmount(&entry.path());
            }
        }
    }

    /// The loop devices backed by `image` (`losetup -j`), empty when none.
    fn loop_devices(image: &Path) -> String {
        let out = Command::new("losetup")
            .arg("-j")
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        f()
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
        assert!(is_mounted(Path::new("/proc")));
        assert!(!is_mounted(Path::new("/proc/self")));
    }

    #[test]
    fn disabled_disks_refuse_clearly() {
        let disks = Disks::disabled("test");
        assert_eq!(disks.mechanism(), DiskMechanism::None);
        let err = disks
            .create(Path::new("/nonexistent"), 16, OWNER)
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
        assert_eq!(
            serde_json::to_string(&DiskMechanism::LoopExt4).unwrap(),
            "\"loop_ext4\""
        );
    }

    /// The quota holds against the sandbox's uid, the root belongs to the owner, and the image
    /// stays sparse.
    #[test]
    fn quota_is_enforced_for_the_owner() {
        let Some(disks) = disks_or_skip() else { return };
        let vm = VmDir::new(&disks);
        let started = Instant::now();
        disks.create(&vm.dir, 16, OWNER).unwrap();
        eprintln!("create+mount 16 MiB: {:?}", started.elapsed());
        let volume = vm.dir.join(VOLUME);
        assert!(is_mounted(&volume));
        let meta = std::fs::metadata(&volume).unwrap();
        assert_eq!((meta.uid(), meta.gid()), OWNER);
        assert_eq!(
            std::fs::read_dir(&volume).unwrap().count(),
            0,
            "volume not empty"
        );
        assert!(std::fs::metadata(vm.dir.join(IMAGE)).unwrap().blocks() * 512 < 2 << 20);

        let out = Command::new("setpriv")
            .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
            .args(["dd", "if=/dev/zero", "bs=1M", "count=32"])
            .arg(format!("of={}", volume.join("fill").display()))
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(!out.status.success(), "32 MiB fit in a 16 MiB disk");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("No space left on device"), "{stderr}");
        let fill = std::fs::metadata(volume.join("fill")).unwrap();
        assert_eq!(fill.uid(), OWNER.0);
        assert!(fill.len() > 12 << 20, "only {} bytes written", fill.len());
        // With no reserved blocks root is as full as anyone.
        let root_write = std::fs::write(volume.join("root"), vec![0u8; 1 << 20]);
        assert_eq!(
            root_write.unwrap_err().raw_os_error(),
            Some(nix::errno::Errno::ENOSPC as i32)
        );
        // Creating over an existing image is refused and leaves the mounted disk alone.
        let again = disks.create(&vm.dir, 16, OWNER).unwrap_err();
        assert!(matches!(again, ProviderError::AlreadyExists(_)), "{again}");
        assert!(is_mounted(&volume));
    }

    /// The warm-pool hand-off renames the VM directory under a live mount.
    #[test]
    fn rename_unmount_and_remount_keep_data() {
        let Some(disks) = disks_or_skip() else { return };
        let vm = VmDir::new(&disks);
        disks.create(&vm.dir, 16, OWNER).unwrap();
        std::fs::write(vm.dir.join(VOLUME).join("hello"), "world").unwrap();

        let renamed = vm.tmp.path().join("vm-b");
        std::fs::rename(&vm.dir, &renamed).unwrap();
        let volume = renamed.join(VOLUME);
        assert!(is_mounted(&volume), "the mount did not follow the rename");
        assert!(!is_mounted(&vm.dir.join(VOLUME)));
        assert_eq!(
            std::fs::read_to_string(volume.join("hello")).unwrap(),
            "world"
        );
        std::fs::write(volume.join("after"), "rename").unwrap();
        let image = renamed.join(IMAGE);
        assert!(!loop_devices(&image).is_empty());

        disks.unmount(&renamed).unwrap();
        assert!(!is_mounted(&volume));
        assert!(!volume.join("hello").exists());
        assert!(
            wait_until(|| loop_devices(&image).is_empty()),
            "loop device left behind"
        );
        disks.unmount(&renamed).unwrap(); // idempotent

        assert!(disks.ensure_mounted(&renamed).unwrap());
        assert!(!disks.ensure_mounted(&renamed).unwrap(), "mounted twice");
        assert_eq!(
            std::fs::read_to_string(volume.join("hello")).unwrap(),
            "world"
        );
        assert_eq!(
            std::fs::read_to_string(volume.join("after")).unwrap(),
            "rename"
        );
        disks.unmount(&renamed).unwrap();
        assert!(
            wait_until(|| loop_devices(&image).is_empty()),
            "loop device left behind"
        );

        let err = disks
            .ensure_mounted(&vm.tmp.path().join("nope"))
            .unwrap_err();
        assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
    }

    /// A file held open in the volume makes umount busy: the volume is detached lazily and the loop
    /// device goes away once the file is closed.
    #[test]
    fn busy_volume_is_detached_lazily() {
        let Some(disks) = disks_or_skip() else { return };
        let vm = VmDir::new(&disks);
        disks.create(&vm.dir, 16, OWNER).unwrap();
        let volume = vm.dir.join(VOLUME);
        let image = vm.dir.join(IMAGE);
        let mut held = File::create(volume.join("held")).unwrap();
        disks.unmount(&vm.dir).unwrap();
        assert!(!is_mounted(&volume));
        held.write_all(b"still writable").unwrap();
        assert!(
            !loop_devices(&image).is_empty(),
            "freed while a file was open"
        );
        drop(held);
        assert!(
            wait_until(|| loop_devices(&image).is_empty()),
            "loop device left behind"
        );
        // The lazy unmount completed cleanly: the data is there on remount.
        assert!(disks.ensure_mounted(&vm.dir).unwrap());
        let mut text = String::new();
        File::open(volume.join("held"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "still writable");
    }

    /// A failed create takes back what it made, and a failing tool's stderr reaches the error.
    #[test]
    fn failed_create_leaves_nothing() {
        let Some(disks) = disks_or_skip() else { return };
        let vm = VmDir::new(&disks);
        std::fs::create_dir(&vm.dir).unwrap();
        // A non-empty volume directory is refused: mounting over it would hide its files.
        std::fs::create_dir(vm.dir.join(VOLUME)).unwrap();
        std::fs::write(vm.dir.join(VOLUME).join("x"), "x").unwrap();
        let err = disks.create(&vm.dir, 16, OWNER).unwrap_err();
        assert!(matches!(err, ProviderError::InvalidState(_)), "{err}");
        assert!(!vm.dir.join(IMAGE).exists(), "image left behind");
        assert!(!is_mounted(&vm.dir.join(VOLUME)));
        // A volume path that is a file fails after the image was made: the image goes again.
        std::fs::remove_dir_all(vm.dir.join(VOLUME)).unwrap();
        std::fs::write(vm.dir.join(VOLUME), "not a directory").unwrap();
        let err = disks.create(&vm.dir, 16, OWNER).unwrap_err();
        assert!(matches!(err, ProviderError::Io { .. }), "{err}");
        assert!(
            !vm.dir.join(IMAGE).exists(),
            "image left behind after {err}"
        );

        let err = run(
            Path::new("/bin/sh"),
            &["-c".as_ref(), "echo boom >&2; exit 3".as_ref()],
        )
        .unwrap_err();
        assert!(matches!(err, ProviderError::CommandFailed(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("sh failed (exit status: 3)") && text.ends_with("boom"),
            "{text}"
        );
    }

    /// Create + mount must be cheap enough to do per VM on the warm-pool path.
    #[test]
    fn create_and_mount_take_tens_of_ms() {
        let Some(disks) = disks_or_skip() else { return };
        let vm = VmDir::new(&disks);
        let mut times = Vec::new();
        for i in 0..5 {
            let dir = vm.tmp.path().join(format!("t{i}"));
            let started = Instant::now();
            disks.create(&dir, 1024, OWNER).unwrap();
            times.push(started.elapsed());
        }
        times.sort();
        eprintln!("create+mount 1 GiB x5: {times:?}");
        let median = times[2];
        assert!(
            median < Duration::from_millis(300),
            "median create+mount {median:?}"
        );
    }
}
