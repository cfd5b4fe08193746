//! Shared by the qemu test suites: finds QEMU and the guest image, or says why the suite skips.
//!
//! The image is `HEARTH_QEMU_IMAGE`, else `.tools/images/current` (built by
//! `deploy/images/build.sh`, which `scripts/setup-qemu.sh` runs); QEMU is `HEARTH_QEMU_BIN`, else
//! `qemu-system-x86_64` on `PATH`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use hearth_worker::provider::{QemuConfig, QemuProvider};

/// QEMU binary and image directory, or the reason the qemu tests skip.
pub fn environment() -> Result<(PathBuf, PathBuf), String> {
    static FOUND: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let qemu = std::env::var_os("HEARTH_QEMU_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
            let runs = std::process::Command::new(&qemu)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !runs {
                return Err(format!(
                    "{} is not installed (apt-get install qemu-system-x86, or run scripts/setup-qemu.sh)",
                    qemu.display()
                ));
            }
            let image = std::env::var_os("HEARTH_QEMU_IMAGE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/images/current")
                });
            if !image.join("vmlinuz").is_file() || !image.join("initrd.img").is_file() {
                return Err(format!(
                    "no guest image at {} (build it with deploy/images/build.sh)",
                    image.display()
                ));
            }
            Ok((qemu, image.canonicalize().unwrap_or(image)))
        })
        .clone()
}

/// A test configuration under `root`: kills its VMs when dropped, fails fast.
pub fn config(root: impl Into<PathBuf>) -> Option<QemuConfig> {
    match environment() {
        Ok((qemu, image)) => Some(QemuConfig {
            qemu,
            kill_on_drop: true,
            ..QemuConfig::new(root, image)
        }),
        Err(reason) => {
            eprintln!("skipping qemu test: {reason}");
            None
        }
    }
}

/// A provider under a fresh temporary directory (kept alive by the returned guard).
pub fn provider() -> Option<(QemuProvider, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path().join("qemu"))?;
    Some((QemuProvider::open(config).unwrap(), dir))
}

/// Pids of running qemu processes whose command line mentions `needle`.
pub fn qemu_pids_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline);
        if text.contains("qemu-system") && text.contains(needle) {
            // A zombie keeps its cmdline empty; a live process is what counts.
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if !state.contains(") Z") {
                pids.push(pid);
            }
        }
    }
    pids
}
