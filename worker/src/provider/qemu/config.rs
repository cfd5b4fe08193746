//! The qemu provider's configuration (`[qemu]` in the worker's TOML, `--qemu-*` flags).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::machine::Accel;

/// Configuration of the qemu adapter; deserialisable from the worker's TOML (`[qemu]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// Where VMs, snapshots, sockets and staging live (one filesystem, at most 72 bytes, no `,`
    /// or `'`). Empty: `<worker data_dir>/qemu`.
    pub root: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest image directory (`vmlinuz`, `initrd.img`), as built by `deploy/images/build.sh`.
    pub image: PathBuf,
    /// Accelerator; `auto` picks KVM only where hardware KVM works.
    pub accel: Accel,
    /// `-cpu` model; default `max` under TCG and `host` under KVM.
    pub cpu: Option<String>,
    /// The host TSC rate for `tsc_early_khz=` under TCG; default read from `/proc/cpuinfo`.
    pub tsc_khz: Option<u32>,
    /// Appended to the guest kernel command line.
    pub extra_cmdline: String,
    /// Keep each VM's serial console in `run/<instance>/console.log` (boot failures quote it).
    /// The worker writes it from a socket chardev, capped at `console_log_max_bytes` with one
    /// rotation (`console.log.1`), so a guest can fill at most twice that per VM.
    pub console_log: bool,
    /// Largest `console.log` before it is rotated (at least 4096).
    pub console_log_max_bytes: u64,
    /// Cold boot until the agent answers.
    pub boot_timeout_ms: u64,
    /// Every other agent exchange (restore handshake, identity, files, clock) and QMP command.
    pub agent_timeout_ms: u64,
    /// How long past an exec's own timeout the agent may take to answer.
    pub exec_grace_ms: u64,
    /// Saving or loading a snapshot's state.
    pub migrate_timeout_ms: u64,
    /// Check a snapshot's SHA-256 on every restore (in parallel with loading it).
    pub verify_snapshots: bool,
    /// zstd level of exported snapshots.
    pub snapshot_compression_level: i32,
    /// Added to the environment of every command in every VM (under the VM's and the request's).
    pub env: BTreeMap<String, String>,
    /// Kill every VM and delete its files when the provider is dropped (tests). Off in production:
    /// VMs outlive a worker restart and are adopted by the next `open`.
    pub kill_on_drop: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::new(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            image: PathBuf::from("/var/lib/hearth/images/current"),
            accel: Accel::Auto,
            cpu: None,
            tsc_khz: None,
            extra_cmdline: String::new(),
            console_log: true,
            console_log_max_bytes: 8 << 20,
            boot_timeout_ms: 60_000,
            agent_timeout_ms: 10_000,
            exec_grace_ms: 10_000,
            migrate_timeout_ms: 120_000,
            verify_snapshots: true,
            snapshot_compression_level: 3,
            env: BTreeMap::new(),
            kill_on_drop: false,
        }
    }
}

impl QemuConfig {
    /// Defaults with `root` and `image` set.
    pub fn new(root: impl Into<PathBuf>, image: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            image: image.into(),
            ..Self::default()
        }
    }

    pub(crate) fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_deserialises_with_defaults_and_rejects_typos() {
        let config: QemuConfig =
            serde_json::from_str(r#"{"image": "/img", "accel": "tcg"}"#).unwrap();
        assert_eq!(config.image, PathBuf::from("/img"));
        assert_eq!(config.accel, Accel::Tcg);
        assert_eq!(config.qemu, PathBuf::from("qemu-system-x86_64"));
        assert!(config.verify_snapshots);
        assert!(!config.kill_on_drop);
        assert!(serde_json::from_str::<QemuConfig>(r#"{"imagee": "/x"}"#).is_err());
    }
}
