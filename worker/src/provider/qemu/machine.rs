//! The QEMU machine: accelerator choice, the guest image, and the command line.
//!
//! A [`MachineSpec`] is everything that must be identical between the VM a snapshot was taken of
//! and a VM restored from it (QEMU refuses or misbehaves otherwise): accelerator, CPU model,
//! vCPUs, memory, kernel, initrd and kernel command line. It is recorded with every VM and every
//! snapshot; restores use the snapshot's, never the request's sizing.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::provider::ProviderError;

/// How VMs are accelerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware KVM when the host has it (`kvm_intel`/`kvm_amd` loaded, not the PVM software
    /// hypervisor), else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator: slow, but runs anywhere.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Picks the accelerator for `wanted` and says why. `sys_module` is `/sys/module` (a parameter
/// for tests).
pub(crate) fn choose_accel(wanted: Accel, sys_module: &Path, dev_kvm: &Path) -> (Accel, String) {
    match wanted {
        Accel::Kvm => (Accel::Kvm, "configured".into()),
        Accel::Tcg => (Accel::Tcg, "configured".into()),
        Accel::Auto => {
            if sys_module.join("kvm_pvm").exists() {
                (
                    Accel::Tcg,
                    "kvm_pvm is loaded: /dev/kvm is a software hypervisor that cannot run stock guests"
                        .into(),
                )
            } else if !dev_kvm.exists() {
                (Accel::Tcg, format!("{} does not exist", dev_kvm.display()))
            } else if let Some(module) = ["kvm_intel", "kvm_amd"]
                .into_iter()
                .find(|m| sys_module.join(m).exists())
            {
                (Accel::Kvm, format!("{module} is loaded"))
            } else {
                (Accel::Tcg, "neither kvm_intel nor kvm_amd is loaded".into())
            }
        }
    }
}

/// The host's TSC rate in kHz from `/proc/cpuinfo` (`cpu MHz`), for `tsc_early_khz=` under TCG:
/// without it a guest on a busy host can fail to calibrate its TSC and hang at boot.
pub(crate) fn host_tsc_khz() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u32)
}

/// What a VM is, as far as QEMU's snapshot compatibility goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MachineSpec {
    pub accel: Accel,
    pub cpu: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub cmdline: String,
}

/// Per-process paths of one QEMU instance.
#[derive(Debug, Clone)]
pub(crate) struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub(crate) fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub(crate) fn agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub(crate) fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub(crate) fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The serial console's socket chardev; the worker copies it into [`Self::console`].
    pub(crate) fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

/// The QEMU command line (without the binary) for `spec`; `incoming` waits for a migration
/// stream (`-incoming defer`) and stays paused (`-S`) until `cont`; `console` serves the serial
/// console on `run/console.sock` (copied into a capped `run/console.log` by the worker, see
/// `console.rs`; else it goes nowhere).
pub(crate) fn argv(
    spec: &MachineSpec,
    run: &RunPaths,
    incoming: bool,
    console: bool,
) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&dyn AsRef<std::ffi::OsStr>]| {
        argv.extend(parts.iter().map(|p| p.as_ref().to_os_string()));
    };
    let path_opt = |prefix: &str, path: &Path, suffix: &str| {
        let mut s = OsString::from(prefix);
        s.push(path.as_os_str());
        s.push(suffix);
        s
    };
    push(&[&"-name", &"hearth-vm"]);
    push(&[&"-machine", &"microvm"]);
    push(&[&"-accel", &spec.accel.as_str()]);
    push(&[&"-cpu", &spec.cpu]);
    push(&[&"-m", &format!("{}M", spec.memory_mib)]);
    push(&[&"-smp", &spec.vcpus.to_string()]);
    push(&[
        &"-nodefaults",
        &"-no-user-config",
        &"-display",
        &"none",
        &"-no-reboot",
    ]);
    push(&[&"-kernel", &spec.kernel, &"-initrd", &spec.initrd]);
    push(&[&"-append", &spec.cmdline]);
    if console {
        // QEMU drops what the guest prints while nobody is connected; it never blocks the guest.
        push(&[
            &"-chardev",
            &path_opt(
                "socket,id=console,path=",
                &run.console_socket(),
                ",server=on,wait=off",
            ),
        ]);
        push(&[&"-serial", &"chardev:console"]);
    } else {
        push(&[&"-serial", &"null"]);
    }
    push(&[
        &"-qmp",
        &path_opt("unix:", &run.qmp(), ",server=on,wait=off"),
    ]);
    push(&[&"-device", &"virtio-serial-device"]);
    push(&[
        &"-chardev",
        &path_opt("socket,id=agent,path=", &run.agent(), ",server=on,wait=off"),
    ]);
    push(&[
        &"-device",
        &format!(
            "virtserialport,chardev=agent,name={}",
            hearth_messages::agent::VIRTIO_PORT_NAME
        ),
    ]);
    push(&[&"-pidfile", &run.pidfile()]);
    if incoming {
        push(&[&"-S", &"-incoming", &"defer"]);
    }
    argv
}

/// SHA-256 of files, remembered by (path, size, mtime) so an unchanged image is hashed once.
#[derive(Debug, Default)]
pub(crate) struct DigestCache {
    known: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

impl DigestCache {
    /// The hex SHA-256 of `path`. Blocking.
    pub(crate) fn digest(&self, path: &Path) -> Result<String, ProviderError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ProviderError::io(format!("cannot read {}", path.display()), e))?;
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some((size, time, digest)) = self.known.lock().get(path)
            && *size == meta.len()
            && *time == mtime
        {
            return Ok(digest.clone());
        }
        let digest = sha256_file(path)
            .map_err(|e| ProviderError::io(format!("cannot read {}", path.display()), e))?;
        self.known
            .lock()
            .insert(path.to_path_buf(), (meta.len(), mtime, digest.clone()));
        Ok(digest)
    }
}

use crate::provider::registry::state_root::sha256_file;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_detection_prefers_tcg_under_pvm_and_kvm_with_hardware() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("module");
        let kvm = tmp.path().join("kvm");
        std::fs::create_dir_all(sys.join("kvm_intel")).unwrap();
        assert_eq!(
            choose_accel(Accel::Auto, &sys, &kvm).0,
            Accel::Tcg,
            "no /dev/kvm"
        );
        std::fs::write(&kvm, b"").unwrap();
        assert_eq!(choose_accel(Accel::Auto, &sys, &kvm).0, Accel::Kvm);
        std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
        let (accel, why) = choose_accel(Accel::Auto, &sys, &kvm);
        assert_eq!(accel, Accel::Tcg);
        assert!(why.contains("kvm_pvm"), "{why}");
        assert_eq!(
            choose_accel(Accel::Kvm, &sys, &kvm).0,
            Accel::Kvm,
            "override"
        );
    }

    #[test]
    fn argv_names_the_sockets_and_waits_for_incoming_state() {
        let spec = MachineSpec {
            accel: Accel::Tcg,
            cpu: "max".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            kernel_sha256: String::new(),
            initrd_sha256: String::new(),
            cmdline: "console=ttyS0 quiet".into(),
        };
        let run = RunPaths {
            dir: "/r/run/abc".into(),
        };
        let joined = |incoming| {
            argv(&spec, &run, incoming, true)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let cold = joined(false);
        assert!(
            cold.contains("-machine microvm -accel tcg -cpu max -m 256M -smp 2"),
            "{cold}"
        );
        assert!(
            cold.contains("-qmp unix:/r/run/abc/qmp.sock,server=on,wait=off"),
            "{cold}"
        );
        assert!(
            cold.contains("socket,id=agent,path=/r/run/abc/agent.sock"),
            "{cold}"
        );
        assert!(
            cold.contains(
                "-chardev socket,id=console,path=/r/run/abc/console.sock,server=on,wait=off \
                 -serial chardev:console"
            ),
            "the console is a socket the worker reads with a cap, never a file QEMU grows: {cold}"
        );
        assert!(!cold.contains("file:"), "{cold}");
        assert!(!cold.contains("-incoming"));
        assert!(joined(true).ends_with("-S -incoming defer"));
    }

    #[test]
    fn digests_are_cached_until_the_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let cache = DigestCache::default();
        assert_eq!(
            cache.digest(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(&f, b"abcd").unwrap();
        assert_ne!(
            cache.digest(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
