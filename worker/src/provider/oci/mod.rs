//! The `oci` provider: a VM is an OCI container run by `crun` (or `runc`) directly, on a root
//! filesystem unpacked from a container image (or, without one, the host's system directories
//! read-only), with the VM's volume at `/workspace`.
//!
//! It is the process provider with containers for sandboxes: the VM bookkeeping (registry,
//! snapshots of the volume as `tar.zst`, rename as a Hearth-side id mapping, export/import,
//! backups, limits through Hearth's own cgroups) is the process provider's, and only how a
//! sandbox starts differs (see [`OciEngine`]). Inside the container, the first process is `tini`
//! (an init that reaps orphans) running the Hearth agent with `--sandbox`; exec and file transfer
//! are agent messages over the container's stdin, exactly as in the process provider's
//! bubblewrap sandbox, so the exec contract (timeouts, caps, streaming, process-group kills,
//! leftovers killed, files confined to the volume) is the same code, not a second implementation
//! around `crun exec` (which would also cost a runtime process and a `setns` per command).
//!
//! A container is named `hearth-<uid>` with a fresh uid per start, so renaming a VM never touches
//! its container. A container that exits on its own (the agent or init killed, the container
//! OOM-killed) buries its VM as failed with the runtime's exit code (`vm … failed: the container
//! exited with code N`), so the scheduler marks the session `lost`; the VM is never assumed
//! running.
//!
//! Stop freezes the container and start thaws it (the process provider's `freeze.rs`: a cgroup
//! v1 freezer of Hearth's, else `SIGSTOP`), so a stopped VM's processes and their memory (its
//! `/tmp` too) survive until it is started; start then pings the agent, and a container that was
//! killed while frozen (the kill lands at the thaw) fails its VM with the runtime's exit code.
//! Not `crun pause`: crun runs with `--cgroup-manager=disabled` (limits are Hearth's own cgroups,
//! which crun's cgroupfs manager would move the container out of), and crun 1.8.1 then refuses
//! ("cannot pause the container without a cgroup"); crun lists a frozen container as `running`.
//!
//! Containers die with the worker; at open, the frozen ones a killed worker left are killed (a
//! `crun delete --force` alone returns and leaves their processes frozen) and every `hearth-`
//! container left in the runtime's state directory is removed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::ProviderError;

pub(crate) mod bundle;
pub mod runtime;

use runtime::{Bind, Bundle, ContainerRuntime, Engine, EngineKind, RunSpec};

/// The uid and gid commands run as inside the container (as in the process sandbox).
pub const INNER_ID: u32 = 1000;
/// Where the agent, its loader and the init are mounted inside the container.
const HEARTH_DIR: &str = "/.hearth";
/// How long the start-up probe container may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// `[oci]` in the worker's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OciConfig {
    /// The runtime: `crun` or `runc` (driven directly, Hearth writes the bundle), or `podman`,
    /// `docker` or Apple's `container` (told the same spec as flags), chosen by the file name.
    pub runtime: PathBuf,
    /// Where VMs, snapshots, bundles and the image cache live; empty = `<data_dir>/oci`.
    pub root: PathBuf,
    /// A JSON file holding an OCI `linux.seccomp` object to use instead of the default deny-list.
    pub seccomp: Option<PathBuf>,
    /// A static init for the container's pid 1 (reaps orphans, forwards signals).
    pub init: PathBuf,
    /// util-linux `unshare`, used on hosts with hybrid cgroups (see the module docs).
    pub unshare: PathBuf,
}

impl Default for OciConfig {
    fn default() -> Self {
        Self {
            runtime: PathBuf::from("/usr/bin/crun"),
            root: PathBuf::new(),
            seccomp: None,
            init: PathBuf::from("/usr/bin/tini-static"),
            unshare: PathBuf::from("/usr/bin/unshare"),
        }
    }
}

/// What the process provider's launcher needs to start containers, resolved once at open.
#[derive(Debug)]
pub(crate) struct OciEngine {
    pub(crate) runtime: Arc<dyn ContainerRuntime>,
    init: PathBuf,
    /// The agent binary and, when it is dynamically linked, the host's loader and the libraries
    /// it needs (mounted read-only under `/.hearth/lib`, used by the agent alone).
    agent: PathBuf,
    loader: Option<PathBuf>,
    libs: Vec<PathBuf>,
    seccomp: serde_json::Value,
    /// The root filesystem of VMs without an image: mount points for the host's system dirs.
    host_rootfs: PathBuf,
    /// Host system directories (or the targets of symlinks like `/bin -> usr/bin`) bound into
    /// `host_rootfs`.
    host_binds: Vec<Bind>,
    /// `<root>/bundles/<uid>/config.json`.
    bundles: PathBuf,
    version: String,
}

/// How to install what the provider needs.
const INSTALL: &str = "install crun and tini (apt-get install crun tini), or set [oci] runtime \
                       and init";

impl OciEngine {
    /// Checks the runtime and init, prepares the host rootfs skeleton, removes containers left
    /// from an earlier run and starts a probe container. `Unavailable` says what is missing and
    /// how to install it.
    pub(crate) fn open(
        config: &OciConfig,
        root: &Path,
        agent: &Path,
        etc_dir: &Path,
        host_ids: (u32, u32),
    ) -> Result<Self, ProviderError> {
        if !config.runtime.is_file() {
            return Err(ProviderError::Unavailable(format!(
                "the oci provider needs its container runtime, not found at {}: {INSTALL}",
                config.runtime.display()
            )));
        }
        if !config.init.is_file() {
            return Err(ProviderError::Unavailable(format!(
                "the oci provider needs a static init for its containers, not found at {}: \
                 {INSTALL}",
                config.init.display()
            )));
        }
        let name = config
            .runtime
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let state_dir = root.join("runtime");
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| ProviderError::io("cannot create the runtime state directory", e))?;
        let runtime: Arc<dyn ContainerRuntime> = match name.as_str() {
            "crun" | "runc" => {
                let hybrid = hybrid_cgroups().then(|| config.unshare.clone());
                if hybrid.as_ref().is_some_and(|u| !u.is_file()) {
                    return Err(ProviderError::Unavailable(format!(
                        "this host has hybrid cgroups: the oci provider needs {} (util-linux)",
                        config.unshare.display()
                    )));
                }
                Arc::new(Bundle::new(config.runtime.clone(), state_dir, hybrid))
            }
            "podman" => Arc::new(Engine::new(EngineKind::Podman, config.runtime.clone())),
            "docker" => Arc::new(Engine::new(EngineKind::Docker, config.runtime.clone())),
            "container" => Arc::new(Engine::new(
                EngineKind::AppleContainer,
                config.runtime.clone(),
            )),
            other => {
                return Err(ProviderError::Unavailable(format!(
                    "[oci] runtime {} is not crun, runc, podman, docker or container",
                    if other.is_empty() { "(empty)" } else { other }
                )));
            }
        };
        let version = runtime.version().map_err(|e| {
            ProviderError::Unavailable(format!("the oci provider's runtime fails: {e}: {INSTALL}"))
        })?;
        let seccomp = match &config.seccomp {
            None => bundle::default_seccomp(),
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| {
                    ProviderError::Unavailable(format!(
                        "cannot read [oci] seccomp {}: {e}",
                        path.display()
                    ))
                })?;
                serde_json::from_slice(&text).map_err(|e| {
                    ProviderError::Unavailable(format!(
                        "[oci] seccomp {} is not JSON: {e}",
                        path.display()
                    ))
                })?
            }
        };
        let (loader, libs) = match agent_libraries(agent) {
            Some((loader, libs)) => (Some(loader), libs),
            None => (None, Vec::new()),
        };
        let host_rootfs = root.join("host-rootfs");
        let host_binds = build_host_rootfs(&host_rootfs, etc_dir)
            .map_err(|e| ProviderError::io("cannot prepare the host rootfs skeleton", e))?;
        let bundles = root.join("bundles");
        let _ = std::fs::remove_dir_all(&bundles);
        std::fs::create_dir_all(&bundles)
            .map_err(|e| ProviderError::io("cannot create the bundles directory", e))?;
        let engine = Self {
            runtime,
            init: config.init.clone(),
            agent: agent.to_path_buf(),
            loader,
            libs,
            seccomp,
            host_rootfs,
            host_binds,
            bundles,
            version,
        };
        match runtime::remove_orphans(engine.runtime.as_ref(), &|_| false) {
            Ok(removed) if !removed.is_empty() => {
                info!(
                    count = removed.len(),
                    "removed containers left by an earlier run"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot list or remove leftover containers"),
        }
        engine.probe(root, host_ids)?;
        Ok(engine)
    }

    /// `crun version 1.8.1` (the runtime's first line).
    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    /// Runs a throwaway container whose init prints its version: proves the runtime works here.
    fn probe(&self, root: &Path, host_ids: (u32, u32)) -> Result<(), ProviderError> {
        let dir = root
            .join("tmp")
            .join(format!("oci-probe-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ProviderError::io("cannot create a probe directory", e))?;
        let uid = format!("probe-{}", uuid::Uuid::new_v4().simple());
        let mut spec = self.spec(&uid, "hearth-probe", &dir, None, 0, host_ids, &[]);
        spec.args = vec![format!("{HEARTH_DIR}/init"), "--version".into()];
        let result = self.run_to_end(&spec);
        self.cleanup(&uid);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn run_to_end(&self, spec: &RunSpec) -> Result<(), ProviderError> {
        let argv = self
            .runtime
            .prepare(spec)
            .map_err(|e| ProviderError::io("cannot write the probe bundle", e))?;
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                ProviderError::Unavailable(format!(
                    "cannot run {}: {e}: {INSTALL}",
                    argv[0].to_string_lossy()
                ))
            })?;
        let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut stderr = String::new();
                    if let Some(mut pipe) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                    }
                    return Err(ProviderError::Unavailable(format!(
                        "{} cannot run a container here ({status}): {}",
                        self.runtime.name(),
                        stderr.trim()
                    )));
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ProviderError::Unavailable(format!(
                        "{} did not run a probe container within {PROBE_TIMEOUT:?}",
                        self.runtime.name()
                    )));
                }
            }
        }
    }

    /// The container of one sandbox: `rootfs` (an image's) or the host skeleton, the volume at
    /// `workspace`, the agent started by the init with `agent_args`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spec(
        &self,
        uid: &str,
        hostname: &str,
        volume: &Path,
        rootfs: Option<&Path>,
        tmp_bytes: u64,
        host_ids: (u32, u32),
        agent_args: &[&str],
    ) -> RunSpec {
        let mut binds = Vec::new();
        if rootfs.is_none() {
            binds.extend(self.host_binds.iter().cloned());
        }
        binds.push(Bind {
            host: volume.to_path_buf(),
            container: super::process::WORKSPACE.into(),
            writable: true,
        });
        let ro = |host: &Path, container: String| Bind {
            host: host.to_path_buf(),
            container,
            writable: false,
        };
        binds.push(ro(&self.init, format!("{HEARTH_DIR}/init")));
        binds.push(ro(&self.agent, format!("{HEARTH_DIR}/agent")));
        let mut args = vec![format!("{HEARTH_DIR}/init"), "--".into()];
        if let Some(loader) = &self.loader {
            binds.push(ro(
                loader,
                format!("{HEARTH_DIR}/lib/{}", file_name(loader)),
            ));
            for lib in &self.libs {
                binds.push(ro(lib, format!("{HEARTH_DIR}/lib/{}", file_name(lib))));
            }
            args.extend([
                format!("{HEARTH_DIR}/lib/{}", file_name(loader)),
                "--library-path".into(),
                format!("{HEARTH_DIR}/lib"),
            ]);
        }
        args.push(format!("{HEARTH_DIR}/agent"));
        args.extend(agent_args.iter().map(|a| (*a).to_owned()));
        RunSpec {
            uid: uid.to_owned(),
            rootfs: rootfs.unwrap_or(&self.host_rootfs).to_path_buf(),
            hostname: hostname.chars().take(64).collect(),
            args,
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                format!("HOME={}", super::process::WORKSPACE),
            ],
            cwd: super::process::WORKSPACE.into(),
            binds,
            tmpfs: vec![("/tmp".into(), tmp_bytes), (HEARTH_DIR.into(), 4 << 20)],
            host_uid: host_ids.0,
            host_gid: host_ids.1,
            seccomp: self.seccomp.clone(),
            bundle: self.bundles.join(uid),
        }
    }

    /// Kills and removes container `uid` and its bundle. Blocking (a few runtime calls).
    pub(crate) fn cleanup(&self, uid: &str) {
        if let Err(e) = self.runtime.kill(uid) {
            warn!(uid, error = %e, "cannot kill a container");
        }
        if let Err(e) = self.runtime.remove(uid) {
            warn!(uid, error = %e, "cannot remove a container");
        }
        let _ = std::fs::remove_dir_all(self.bundles.join(uid));
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether cgroup v2 is mounted beside v1 hierarchies with controllers of its own ("hybrid"),
/// which crun refuses unless it does not see the v2 mount.
fn hybrid_cgroups() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| !c.trim().is_empty())
}

/// The host's dynamic loader and the libraries `agent` needs (from `ldd`); `None` for a static
/// agent.
pub(crate) fn agent_libraries(agent: &Path) -> Option<(PathBuf, Vec<PathBuf>)> {
    let out = std::process::Command::new("ldd").arg(agent).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut loader, mut libs) = (None, Vec::new());
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let path = PathBuf::from(path);
        if line.contains("=>") {
            libs.push(path);
        } else {
            loader = Some(path);
        }
    }
    loader.map(|loader| (loader, libs))
}

/// Builds the skeleton root filesystem of image-less VMs and returns the binds that fill it: the
/// host's system directories read-only (symlinks like `/bin -> usr/bin` recreated as symlinks)
/// and the process sandbox's generated `/etc` plus the harmless host files it shows.
fn build_host_rootfs(dir: &Path, etc_dir: &Path) -> std::io::Result<Vec<Bind>> {
    use super::process::sandbox::{ETC_SHARED, SYSTEM_DIRS};
    let _ = std::fs::remove_dir_all(dir);
    for mount_point in crate::image::MOUNT_POINTS {
        std::fs::create_dir_all(dir.join(mount_point))?;
    }
    let mut binds = Vec::new();
    for sys in SYSTEM_DIRS {
        let host = Path::new(sys);
        let inside = dir.join(sys.trim_start_matches('/'));
        match std::fs::symlink_metadata(host) {
            Ok(m) if m.file_type().is_symlink() => {
                std::os::unix::fs::symlink(std::fs::read_link(host)?, &inside)?;
            }
            Ok(m) if m.is_dir() => {
                std::fs::create_dir_all(&inside)?;
                binds.push(Bind {
                    host: host.to_path_buf(),
                    container: sys.to_owned(),
                    writable: false,
                });
            }
            _ => {}
        }
    }
    // /etc: the generated files copied in, the shared host files bound over empty mount points.
    let etc = dir.join("etc");
    for entry in std::fs::read_dir(etc_dir)? {
        let entry = entry?;
        std::fs::copy(entry.path(), etc.join(entry.file_name()))?;
    }
    for name in ETC_SHARED {
        let host = Path::new("/etc").join(name);
        let Ok(meta) = std::fs::metadata(&host) else {
            continue;
        };
        let inside = etc.join(name);
        if meta.is_dir() {
            std::fs::create_dir_all(&inside)?;
        } else {
            std::fs::write(&inside, b"")?;
        }
        binds.push(Bind {
            host,
            container: format!("/etc/{name}"),
            writable: false,
        });
    }
    Ok(binds)
}
