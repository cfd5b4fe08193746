//! The firecracker provider's configuration (`[firecracker]` in the worker's TOML, or
//! `--firecracker-*` flags) and the check that says, at start, everything a host or a
//! configuration lacks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_messages::agent::VSOCK_PORT;
use serde::{Deserialize, Serialize};

use crate::provider::ProviderError;

/// A network interface with MMDS (one host tap device: suits one VM at a time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerMmds {
    /// The guest interface id, e.g. `eth0`.
    pub iface_id: String,
    /// The host tap device.
    pub host_dev_name: String,
}

/// Configuration of the firecracker adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// Where VMs, snapshots, sockets and staging live (one filesystem).
    pub root: PathBuf,
    /// The `firecracker` binary (`--firecracker-bin`; `FIRECRACKER_BIN` for the tests).
    #[serde(alias = "firecracker")]
    pub binary: PathBuf,
    /// The `jailer` binary. Running Firecracker under its jailer is not implemented yet: a
    /// configured jailer is refused at start rather than silently not used.
    pub jailer: Option<PathBuf>,
    /// An uncompressed guest kernel (`vmlinux`) with virtio-mmio and vsock (`FIRECRACKER_KERNEL`).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// The root filesystem image copied into every cold-booted VM (`FIRECRACKER_ROOTFS`); its
    /// init must run `hearth-guest-agent` (default channel `auto` finds vsock).
    pub rootfs: PathBuf,
    pub boot_args: String,
    /// The vsock port the agent listens on.
    pub vsock_port: u32,
    pub mmds: Option<FirecrackerMmds>,
    pub boot_timeout_ms: u64,
    pub agent_timeout_ms: u64,
    pub exec_grace_ms: u64,
    /// Each API call.
    pub api_timeout_ms: u64,
    /// Creating or loading a snapshot.
    pub snapshot_timeout_ms: u64,
    pub snapshot_compression_level: i32,
    pub env: BTreeMap<String, String>,
    /// Kill every VM when the provider is dropped (tests).
    pub kill_on_drop: bool,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::new(),
            binary: PathBuf::from("firecracker"),
            jailer: None,
            kernel: PathBuf::new(),
            initrd: None,
            rootfs: PathBuf::new(),
            boot_args: "console=ttyS0 reboot=k panic=1 pci=off".into(),
            vsock_port: VSOCK_PORT,
            mmds: None,
            boot_timeout_ms: 30_000,
            agent_timeout_ms: 5_000,
            exec_grace_ms: 5_000,
            api_timeout_ms: 5_000,
            snapshot_timeout_ms: 120_000,
            snapshot_compression_level: 3,
            env: BTreeMap::new(),
            kill_on_drop: false,
        }
    }
}

impl FirecrackerConfig {
    /// Defaults with the paths set.
    pub fn new(
        root: impl Into<PathBuf>,
        binary: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        rootfs: impl Into<PathBuf>,
    ) -> Self {
        Self {
            root: root.into(),
            binary: binary.into(),
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            ..Self::default()
        }
    }

    /// From `FIRECRACKER_BIN`, `FIRECRACKER_KERNEL` and `FIRECRACKER_ROOTFS`, or why not (missing
    /// variables, files, or `/dev/kvm`).
    pub fn from_env(root: impl Into<PathBuf>) -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} is not set"))
        };
        let (bin, kernel, rootfs) = (
            var("FIRECRACKER_BIN")?,
            var("FIRECRACKER_KERNEL")?,
            var("FIRECRACKER_ROOTFS")?,
        );
        for path in [&bin, &kernel, &rootfs] {
            if !path.is_file() {
                return Err(format!("{} does not exist", path.display()));
            }
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("/dev/kvm does not exist".into());
        }
        Ok(Self::new(root, bin, kernel, rootfs))
    }

    /// Everything this host or configuration lacks for the provider to start, said at once
    /// (`Unavailable`: the worker exits 64 with it): the binary, the kernel and root filesystem
    /// files, hardware KVM (`kvm` exists and `sys_module` shows no software-only `kvm_pvm`
    /// without `kvm_intel`/`kvm_amd`); a configured jailer (not supported yet).
    pub fn check(&self, kvm: &Path, sys_module: &Path) -> Result<(), ProviderError> {
        let mut missing = Vec::new();
        let runnable = if self.binary.components().count() > 1 {
            self.binary.is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|d| d.join(&self.binary).is_file())
            })
        };
        if !runnable {
            missing.push(format!(
                "no firecracker binary {} (set [firecracker] binary or --firecracker-bin)",
                self.binary.display()
            ));
        }
        for (what, path, flag) in [
            ("kernel", &self.kernel, "--firecracker-kernel"),
            ("rootfs", &self.rootfs, "--firecracker-rootfs"),
        ] {
            if path.as_os_str().is_empty() {
                missing.push(format!("no {what} (set [firecracker] {what} or {flag})"));
            } else if !path.is_file() {
                missing.push(format!("no {what} at {}", path.display()));
            }
        }
        let hardware = ["kvm_intel", "kvm_amd"]
            .iter()
            .any(|m| sys_module.join(m).exists());
        if !kvm.exists() {
            missing.push(format!(
                "no {} (firecracker needs hardware KVM)",
                kvm.display()
            ));
        } else if sys_module.join("kvm_pvm").exists() && !hardware {
            missing.push(format!(
                "no hardware KVM ({} is the PVM software hypervisor)",
                kvm.display()
            ));
        }
        if let Some(jailer) = &self.jailer {
            missing.push(format!(
                "jailer {} is configured, but running under the jailer is not implemented yet \
                 (remove [firecracker] jailer)",
                jailer.display()
            ));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::Unavailable(format!(
                "firecracker cannot start: {}",
                missing.join("; ")
            )))
        }
    }

    pub(crate) fn api_timeout(&self) -> Duration {
        Duration::from_millis(self.api_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_typos() {
        let config: FirecrackerConfig = serde_json::from_str(
            r#"{"firecracker": "/fc", "kernel": "/k", "rootfs": "/r",
                "mmds": {"iface_id": "eth0", "host_dev_name": "tap0"}}"#,
        )
        .unwrap();
        assert_eq!(config.vsock_port, 1024);
        assert!(config.boot_args.contains("pci=off"));
        assert_eq!(config.mmds.unwrap().host_dev_name, "tap0");
        assert!(serde_json::from_str::<FirecrackerConfig>(r#"{"kernal": "/k"}"#).is_err());
    }

    #[test]
    fn check_says_everything_that_is_missing_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = FirecrackerConfig {
            binary: dir.path().join("no-firecracker"),
            jailer: Some("/usr/bin/jailer".into()),
            ..FirecrackerConfig::default()
        };
        let sys_module = dir.path().join("module");
        let err = config
            .check(&dir.path().join("kvm"), &sys_module)
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
        let text = err.to_string();
        for needle in [
            "no-firecracker",
            "no kernel",
            "no rootfs",
            "hardware KVM",
            "jailer",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let (kernel, rootfs, kvm) = (
            dir.path().join("k"),
            dir.path().join("r"),
            dir.path().join("kvm"),
        );
        for f in [&kernel, &rootfs, &kvm] {
            std::fs::write(f, b"").unwrap();
        }
        let fake_bin = dir.path().join("firecracker");
        std::fs::write(&fake_bin, b"").unwrap();
        let config = FirecrackerConfig::new(dir.path().join("root"), fake_bin, kernel, rootfs);
        config.check(&kvm, &sys_module).unwrap();
        std::fs::create_dir_all(sys_module.join("kvm_pvm")).unwrap();
        let err = config.check(&kvm, &sys_module).unwrap_err();
        assert!(err.to_string().contains("PVM"), "{err}");
    }

    #[test]
    fn from_env_says_what_is_missing() {
        // These tests never set the variables; on a host that does, there is nothing to check.
        if std::env::var_os("FIRECRACKER_BIN").is_none() {
            let err = FirecrackerConfig::from_env("/tmp/x").unwrap_err();
            assert!(err.contains("FIRECRACKER_BIN"), "{err}");
        }
    }
}
