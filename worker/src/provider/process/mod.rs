//! The process adapter (the embedded default): a "VM" is a volume directory plus a long-lived
//! sandbox (see [`sandbox`]) whose agent runs the VM's commands and file transfers.
//!
//! On disk, under `root`:
//! ```text
//! vms/<vm_id>/meta.json            VmMeta: state, template, times, restored_from, env, limits
//! vms/<vm_id>/volume/              the VM's disk (`/workspace` inside the sandbox)
//! snapshots/<snapshot_id>/meta.json
//! snapshots/<snapshot_id>/volume.tar.zst
//! sandbox-etc/                     the generated /etc files every sandbox sees
//! tmp/                             staging (snapshots, imports, deletes); emptied by `open`
//! lock                             flock held while open: one provider per root
//! ```
//! Crash safety: a VM exists once its `meta.json` exists (written last on create, by temp + rename),
//! so `open` removes VM directories without one; snapshots are built in `tmp/` and renamed into place;
//! destroy renames the VM directory into `tmp/` before deleting it; rename is one `rename(2)`, and the
//! directory name is the source of truth.
//!
//! Sandboxes: a running VM's sandbox is started when the VM is created (before it can join a
//! pool, so a claim never waits for one) or started again, and killed — with every process in
//! it — when the VM stops or is destroyed. On `oci` a stop freezes the container instead (see
//! `freeze.rs`) and start thaws it, so its processes and their memory go on where they were; a
//! thawed container whose agent does not answer (it was killed while frozen) fails its VM.
//! Sandboxes die with the worker (frozen ones are killed by the next `open`, which finds their
//! freezer cgroups); after a restart a running or stopped VM gets a new one on its next use.
//! Everything a command wrote to the volume stays; processes do not.
//!
//! Size: this file is the adapter's `VmProvider` and the sandbox life cycle it drives (start on
//! create or first use, limits, egress, OOM outcomes); the bookkeeping is in
//! `provider::registry`, each host mechanism in its own module beside it.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::agent::{AgentCallError, ExecLimits};
use super::agent::{exec_request, transfer_allowance};
use super::paths;
use super::registry::state_root::{
    StateRoot, blocking, hex, read_json, remove_dir_logged, sha256_file, to_json, write_json_atomic,
};
use super::registry::{self, Backend, Registered, Registry, SnapshotBackend, SnapshotMeta};
use super::{
    BOOTSTRAP_OUTPUT_BYTES, BOOTSTRAP_TIMEOUT, ExecOutcome, ExecSpec, OutputChunk, Program,
    ProviderError, SnapshotId, SnapshotInfo, VmId, VmProvider, VmSpec, VmState, VmView,
    bootstrap_failed, lifecycle, now_ms,
};
use crate::image::{ImageCache, ImageError, ImageInfo};

mod archive;
mod config;
mod disk;
mod freeze;
mod limits;
pub(crate) mod network;
pub mod sandbox;

pub use config::{LimitsMode, ProcessConfig};
use disk::Disks;
use limits::{Cgroups, LimitSpec};
pub use network::EgressConfig;
use network::{Egress, NetworkMode};
pub use sandbox::{Isolation, SandboxConfig, WORKSPACE};
use sandbox::{LaunchSpec, Launcher, Sandbox};

/// How long an agent may take to answer a file transfer or to come up for an exec.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent may answer after a command's own timeout.
const EXEC_GRACE: Duration = Duration::from_secs(5);
/// How often an `oci` sandbox is checked for having ended on its own.
const CONTAINER_POLL: Duration = Duration::from_millis(200);
/// How long the runtime of a container whose agent is gone after a thaw may take to exit.
const THAW_EXIT_PATIENCE: Duration = Duration::from_secs(5);

/// An image that cannot be used as a base: bad input (400) unless the host failed (500).
fn image_error(e: ImageError) -> ProviderError {
    match e {
        ImageError::Io { context, source } => ProviderError::io(context, source),
        other => ProviderError::InvalidArgument(other.to_string()),
    }
}

/// The process backend's part of the registry.
#[derive(Debug)]
pub(crate) struct Process;

impl Backend for Process {
    type Vm = ProcessVm;
    /// The running sandbox; `None` while stopped, and after a worker restart until first use.
    type Runtime = Option<Arc<Sandbox>>;
    type Snapshot = ProcessSnapshot;
}

type VmRecord = registry::VmRecord<Process>;
type VmSlot = registry::VmSlot<Process>;
type VmMeta = registry::VmMeta<ProcessVm>;

/// What a process VM's `meta.json` adds: the limits its sandbox gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProcessVm {
    vcpus: u32,
    memory_mib: u32,
    #[serde(default)]
    disk_mib: u32,
    #[serde(default)]
    max_processes: u32,
    #[serde(default)]
    network: NetworkMode,
    /// The container image (its id in the provider's image cache) whose root filesystem the
    /// sandbox runs on; `None`: the host's system directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    /// Where the image came from (the template's `base`): a worker whose cache lacks the image
    /// (a snapshot imported from another worker) unpacks it from there, if it is the same image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_source: Option<PathBuf>,
}

impl ProcessVm {
    fn of(spec: &VmSpec) -> Self {
        Self {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            max_processes: spec.max_processes,
            network: spec.network,
            image: None,
            image_source: None,
        }
    }

    fn limits(&self) -> LimitSpec {
        LimitSpec {
            memory_mib: self.memory_mib,
            max_processes: self.max_processes,
            vcpus: self.vcpus,
        }
    }
}

/// What a process snapshot's `meta.json` adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProcessSnapshot {
    /// SHA-256 (hex) of `volume.tar.zst`, checked before every restore: a snapshot changed on
    /// disk after it was taken is refused, never restored.
    #[serde(default)]
    sha256: Option<String>,
    /// The image the VM ran on (see [`ProcessVm::image`]); a restore runs on the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    /// See [`ProcessVm::image_source`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_source: Option<PathBuf>,
    /// The archive's size, from the file system (not recorded).
    #[serde(skip)]
    size_bytes: u64,
}

impl SnapshotBackend for ProcessSnapshot {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

fn volume(slot: &VmSlot) -> PathBuf {
    slot.dir.join("volume")
}

/// Ends the VM's sandbox and every process in it.
fn kill_sandbox(slot: &mut VmSlot) -> Option<std::thread::JoinHandle<()>> {
    slot.runtime.take()?.kill()
}

#[derive(Debug)]
struct Inner {
    /// The VMs and snapshots, and the locked state root they live under.
    registry: Arc<Registry<Process>>,
    config: ProcessConfig,
    launcher: Launcher,
    /// Per-sandbox cgroups (or the rlimit fallback).
    cgroups: Cgroups,
    /// Loop-mounted volumes with a size (disk quotas), where the host allows.
    disks: Disks,
    /// Root filesystems unpacked from container images (templates whose `base` is an image).
    images: ImageCache,
    /// Names this provider's freezer cgroups (pause, and stop on `oci`), apart from those of
    /// other providers on the host: see `freeze.rs`.
    freeze_scope: String,
}

/// The process adapter. Cheap to share behind an `Arc<dyn VmRuntime>`.
#[derive(Debug)]
pub struct ProcessProvider {
    inner: Arc<Inner>,
}

impl ProcessProvider {
    /// Opens (creating if needed) the state under `config.root` and reconciles it: every VM with a
    /// `meta.json` is indexed in its recorded state, half-created VMs and staging leftovers are
    /// removed. Blocking; call it at startup. `Unavailable` if bubblewrap is configured but missing
    /// or cannot create namespaces.
    pub fn open(config: ProcessConfig) -> Result<Self, ProviderError> {
        let state = StateRoot::open(&config.root, &[])?;
        let root = state.path().to_path_buf();
        // Sandboxes a killed worker left frozen (paused VMs, stopped `oci` VMs) wait for a thaw
        // that no one will send: killed now, before the runtime is asked to remove their
        // containers (a `delete --force` of a frozen container returns and leaves it frozen).
        let freeze_scope = cgroup_parent(&root)
            .trim_start_matches("hearth-")
            .to_owned();
        let stale = freeze::kill_stale(&freeze_scope);
        if stale > 0 {
            info!(
                count = stale,
                "killed the frozen sandboxes an earlier worker left"
            );
        }
        let launcher = Launcher::open(
            config.isolation,
            config.sandbox.clone(),
            config.agent.as_deref(),
            &root,
            config.oci.as_ref(),
        )?;
        let images = ImageCache::open(root.join("images")).map_err(image_error)?;
        let cgroups = match config.limits {
            LimitsMode::Auto => Cgroups::detect(&cgroup_parent(&root)),
            LimitsMode::Rlimit => Cgroups::rlimit("limits = \"rlimit\" in the configuration"),
            LimitsMode::Off => Cgroups::disabled(),
        };
        if let Some(reason) = cgroups.reason() {
            warn!(mechanism = %cgroups.mechanism(), reason, "per-session limits fall back");
        }
        // Sandboxes die with the worker: whatever cgroups are left under our parent are stale.
        cgroups.remove_stale(&HashSet::new());
        let disks = Disks::detect();
        if let Some(reason) = disks.reason() {
            warn!(reason, "disk quotas unavailable: disk_mib is not enforced");
        }
        if let Err(reason) = Egress::probe(&config.egress.slirp4netns) {
            warn!(
                reason,
                "egress networking unavailable: templates with network = \"egress\" fail"
            );
        }
        if config.isolation == Isolation::None {
            warn!(
                "isolation is off: commands run as host processes with the worker's privileges \
                 (--isolation none)"
            );
        }
        let inner = Inner {
            registry: Arc::new(Registry::new(state)),
            launcher,
            cgroups,
            disks,
            images,
            config,
            freeze_scope,
        };
        inner.reconcile()?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Opens the `oci` provider: this adapter with OCI containers (run by `oci.runtime`) for
    /// sandboxes; see [`crate::provider::oci`]. `Unavailable` if the runtime or init is missing
    /// or cannot run a container here.
    pub fn open_oci(
        mut config: ProcessConfig,
        oci: crate::provider::OciConfig,
    ) -> Result<Self, ProviderError> {
        config.isolation = Isolation::Sandbox;
        config.oci = Some(oci);
        Self::open(config)
    }

    /// The configuration this provider was opened with.
    pub fn config(&self) -> &ProcessConfig {
        &self.inner.config
    }

    /// The isolation in force.
    pub fn isolation(&self) -> Isolation {
        self.inner.launcher.isolation()
    }
}

impl Drop for Inner {
    /// The provider is going away (the worker stops): sandboxes die with their records, and the
    /// VMs' own disks are unmounted so no loop device stays attached; the next `open` mounts them
    /// again. (After a SIGKILL they stay mounted, and `open` adopts them as they are.)
    fn drop(&mut self) {
        let mut cleanups = Vec::new();
        let dirs: Vec<PathBuf> = self
            .registry
            .records()
            .iter()
            .map(|r| {
                let mut slot = r.slot.lock();
                cleanups.extend(kill_sandbox(&mut slot));
                slot.dir.clone()
            })
            .collect();
        // Containers are removed before the process exits (a graceful stop leaves none).
        for cleanup in cleanups {
            let _ = cleanup.join();
        }
        // Half-created and half-destroyed VMs in staging, too.
        let staging = std::fs::read_dir(self.registry.root().tmp_dir())
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for dir in dirs.into_iter().chain(staging) {
            if disk::is_mounted(&dir.join("volume"))
                && let Err(e) = self.disks.unmount(&dir)
            {
                warn!(path = %dir.display(), error = %e, "cannot unmount a volume at shutdown");
            }
        }
    }
}

/// The cgroup parent of one provider root: distinct per root, so providers on one host (tests,
/// several workers) never remove each other's cgroups.
fn cgroup_parent(root: &Path) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, root.as_os_str().as_encoded_bytes());
    format!("hearth-{}", hex(&digest.as_ref()[..4]))
}

impl Inner {
    /// Deletes a VM directory that is out of the index (a failed create, a destroyed VM, a
    /// leftover), unmounting its volume first if it has a disk of its own. Blocking.
    fn discard_vm_dir(&self, dir: &Path) {
        if disk::is_mounted(&dir.join("volume"))
            && let Err(e) = self.disks.unmount(dir)
        {
            warn!(path = %dir.display(), error = %e, "cannot unmount a discarded volume");
            return;
        }
        remove_dir_logged(dir);
    }

    /// Rebuilds the index from disk; see [`ProcessProvider::open`].
    fn reconcile(&self) -> Result<(), ProviderError> {
        let registry = &self.registry;
        registry.root().empty_tmp(|path| {
            info!(path = %path.display(), "removing staging leftover");
            self.discard_vm_dir(path);
        })?;
        for (vm_id, dir) in registry.vm_dirs()? {
            let meta_path = dir.join("meta.json");
            if !meta_path.exists() {
                info!(%vm_id, "removing half-created vm");
                self.discard_vm_dir(&dir);
                continue;
            }
            let meta: VmMeta = match read_json(&meta_path) {
                Ok(meta) => meta,
                Err(e) => {
                    warn!(%vm_id, error = %e, "ignoring vm with unreadable meta.json");
                    continue;
                }
            };
            if meta.state == VmState::Destroyed {
                info!(%vm_id, "removing vm recorded as destroyed");
                self.discard_vm_dir(&dir);
                continue;
            }
            if disk::has_image(&dir)
                && let Err(e) = self.disks.ensure_mounted(&dir)
            {
                warn!(%vm_id, error = %e, "ignoring vm whose disk cannot be mounted");
                continue;
            }
            if !dir.join("volume").is_dir() {
                warn!(%vm_id, "ignoring vm without a volume directory");
                continue;
            }
            debug!(%vm_id, state = %meta.state, "reconciled vm");
            registry.adopt(vm_id, dir, meta, None)?;
        }
        registry.load_snapshots(|dir, mut meta| {
            let archive = dir.join(archive::VOLUME_ENTRY);
            let size =
                std::fs::metadata(&archive).map_err(|e| format!("no volume archive: {e}"))?;
            meta.backend.size_bytes = size.len();
            Ok(meta)
        })
    }

    /// The record and the sandbox of a running VM (exec and file transfer), starting the sandbox
    /// if it is not running (first use after a worker restart, or its agent died); bumps the
    /// VM's activity.
    async fn running(
        self: &Arc<Self>,
        vm_id: &VmId,
    ) -> Result<(Arc<VmRecord>, Arc<Sandbox>), ProviderError> {
        let record = self.registry.record(vm_id)?;
        let live = |record: &VmRecord| -> Result<Option<Arc<Sandbox>>, ProviderError> {
            let sandbox = record.touch_running(vm_id)?;
            // A container that ended on its own is the VM's failure, never restarted quietly.
            if let Some(sandbox) = sandbox.as_ref().filter(|_| self.launcher.is_oci())
                && let Some(status) = sandbox.exit_status()
            {
                return Err(self.container_died(sandbox, status));
            }
            Ok(sandbox.filter(|s| !s.is_dead()))
        };
        if let Some(sandbox) = live(&record)? {
            return Ok((record, sandbox));
        }
        let owner = record.clone();
        let _launching = owner.launching.lock().await;
        if let Some(sandbox) = live(&record)? {
            return Ok((record, sandbox));
        }
        let (volume, limits, network, image) = {
            let slot = record.slot.lock();
            (
                volume(&slot),
                slot.meta.backend.limits(),
                slot.meta.backend.network,
                slot.meta.backend.image.clone(),
            )
        };
        let sandbox = self
            .launch(vm_id, &volume, limits, network, image.as_deref())
            .await?;
        {
            let mut slot = record.slot.lock();
            // Stopped or destroyed meanwhile: that wins, and the new sandbox dies with this scope.
            lifecycle::require_running(vm_id, slot.meta.state)?;
            if let Some(old) = slot.runtime.replace(sandbox.clone()) {
                old.kill();
            }
        }
        Ok((record, sandbox))
    }

    /// A VM's container ended on its own (`oci`): buries the VM as failed with the runtime's
    /// exit code, deletes its files, and returns the error its caller answers with.
    fn container_died(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
        status: std::process::ExitStatus,
    ) -> ProviderError {
        let reason = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("the container exited with code {code}"),
            (None, Some(signal)) => format!("the container runtime was killed by signal {signal}"),
            (None, None) => "the container ended".to_owned(),
        };
        self.fail_container(sandbox, reason)
    }

    /// Buries the VM whose sandbox is `sandbox` as failed for `reason`, kills the sandbox and
    /// deletes the VM's files; returns the error its caller answers with.
    fn fail_container(self: &Arc<Self>, sandbox: &Arc<Sandbox>, reason: String) -> ProviderError {
        let buried = self.registry.bury_failed(
            |slot| {
                slot.runtime
                    .as_ref()
                    .is_some_and(|r| Arc::ptr_eq(r, sandbox))
            },
            reason.clone(),
        );
        sandbox.kill();
        match buried {
            Some((vm_id, dir)) => {
                warn!(%vm_id, reason, "vm failed: its container ended");
                let inner = self.clone();
                tokio::task::spawn_blocking(move || inner.discard_vm_dir(&dir));
                ProviderError::InvalidState(format!("vm {vm_id} failed: {reason}"))
            }
            None => ProviderError::Unavailable(format!("a container ended: {reason}")),
        }
    }

    /// An `oci` container that is thawed (a stopped VM started) or about to be frozen must be
    /// alive: its agent answers a ping. A container killed while it was frozen dies the moment it
    /// thaws: then the VM failed, with the runtime's exit code, and is never reported running.
    async fn check_alive(
        self: &Arc<Self>,
        vm_id: &VmId,
        sandbox: &Arc<Sandbox>,
    ) -> Result<(), ProviderError> {
        let ping = sandbox
            .link
            .call(
                hearth_messages::agent::AgentRequest::Ping {},
                "a ping",
                Instant::now() + AGENT_TIMEOUT,
            )
            .await;
        let Err(e) = ping else {
            return Ok(());
        };
        // Its runtime exits right after the container's init: wait (bounded) for the exit code.
        let deadline = Instant::now() + THAW_EXIT_PATIENCE;
        let error = loop {
            if let Some(status) = sandbox.exit_status() {
                break self.container_died(sandbox, status);
            }
            if Instant::now() > deadline {
                let reason = format!("its container's agent does not answer ({e})");
                break self.fail_container(sandbox, reason);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The watcher may have buried it first: then its tombstone says why.
        Err(match self.registry.record(vm_id) {
            Err(buried) if error.kind() == super::ProviderErrorKind::Unavailable => buried,
            _ => error,
        })
    }

    /// Watches an `oci` sandbox until it is killed; if it ends on its own first, the VM failed.
    fn watch_container(self: &Arc<Self>, sandbox: &Arc<Sandbox>) {
        let (inner, sandbox) = (Arc::downgrade(self), Arc::downgrade(sandbox));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CONTAINER_POLL).await;
                let Some(live) = sandbox.upgrade() else {
                    return;
                };
                if live.is_killed() {
                    return;
                }
                if let Some(status) = live.exit_status() {
                    if let Some(inner) = inner.upgrade() {
                        inner.container_died(&live, status);
                    }
                    return;
                }
            }
        });
    }

    /// Starts a sandbox around `volume`, inside its cgroup, with its network, on the root
    /// filesystem of `image` (or the host's).
    async fn launch(
        self: &Arc<Self>,
        vm_id: &VmId,
        volume: &Path,
        limits: LimitSpec,
        network: NetworkMode,
        image: Option<&str>,
    ) -> Result<Arc<Sandbox>, ProviderError> {
        let rootfs = match image {
            None => None,
            Some(id) => Some(self.images.get(id).ok_or_else(|| {
                ProviderError::NotFound(format!(
                    "vm {vm_id} runs on image {id}, which is not in this worker's image cache"
                ))
            })?),
        };
        let cgroup = if limits == LimitSpec::default() {
            None
        } else {
            let name = uuid::Uuid::new_v4().simple().to_string();
            let cgroups = self.cgroups.clone();
            let cgroup = blocking(move || cgroups.create(&name, &limits)).await?;
            debug!(%vm_id, cgroup = cgroup.name(), mechanism = %cgroup.mechanism(), "sandbox limits");
            Some(cgroup)
        };
        let sandbox = self
            .launcher
            .launch(LaunchSpec {
                vm_id,
                volume,
                limits: cgroup,
                tmp_bytes: u64::from(limits.memory_mib) << 20,
                rootfs: rootfs.as_ref().map(|r| r.path.as_path()),
            })
            .await?;
        if self.launcher.is_oci() {
            self.watch_container(&sandbox);
        }
        if network == NetworkMode::Egress {
            let attached = match self.launcher.isolation() {
                Isolation::Sandbox => match network::sandbox_init_pid(sandbox.pid).await {
                    Some(pid) => Egress::attach(pid, &self.config.egress).await,
                    None => Err(ProviderError::Unavailable(format!(
                        "the sandbox of vm {vm_id} ended before its network was set up"
                    ))),
                },
                // Without isolation commands share the host's network anyway.
                Isolation::None => return Ok(sandbox),
            };
            match attached {
                Ok(egress) => {
                    debug!(
                        %vm_id,
                        slirp_pid = egress.slirp_pid(),
                        sandbox_pid = egress.target_pid(),
                        blocked = egress.blocked().routes.len(),
                        dns = egress.blocked().dns,
                        "egress attached"
                    );
                    sandbox.set_egress(egress);
                }
                Err(e) => {
                    sandbox.kill();
                    return Err(e);
                }
            }
        }
        Ok(sandbox)
    }

    fn isolation_report(&self) -> hearth_messages::IsolationReport {
        hearth_messages::IsolationReport {
            mode: self.launcher.mode().into(),
            limits: self.cgroups.mechanism().as_str().into(),
            disk: self.disks.mechanism().as_str().into(),
        }
    }

    /// The agent request running `spec` with the provider's shell and environment layers.
    fn exec_request(
        &self,
        spec: &ExecSpec,
        vm_env: &BTreeMap<String, String>,
    ) -> hearth_messages::ExecRequest {
        let mut req = exec_request(spec);
        if let Program::Shell(cmd) = &spec.program {
            let shell = self.config.shell.to_string_lossy().into_owned();
            req.argv = Some(vec![shell, "-c".into(), cmd.clone()]);
            req.cmd = None;
        }
        let mut env = self.config.env.clone();
        env.extend(vm_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        req.env = env;
        req
    }

    /// Runs `spec` in `sandbox`.
    async fn exec_in(
        &self,
        vm_id: &VmId,
        sandbox: &Sandbox,
        spec: &ExecSpec,
        vm_env: &BTreeMap<String, String>,
        chunks: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutcome, ProviderError> {
        let req = self.exec_request(spec, vm_env);
        let limits = ExecLimits {
            handshake: AGENT_TIMEOUT,
            grace: EXEC_GRACE,
        };
        let ooms = sandbox.oom_kills();
        let started = std::time::Instant::now();
        let result = sandbox
            .link
            .exec(req, spec.max_output_bytes, chunks, limits)
            .await;
        let oom_killed = sandbox.oom_kills() > ooms;
        match result {
            Ok(mut outcome) => {
                outcome.oom_killed = oom_killed;
                Ok(outcome)
            }
            // The OOM killer took the sandbox's agent (memory pinned by tmpfs files leaves it
            // nothing else to kill): the command died of the limit, as far as the caller is
            // concerned. The next command gets a fresh sandbox, with /tmp emptied.
            Err(AgentCallError::Closed) if oom_killed => Ok(ExecOutcome {
                exit_code: 128 + 9,
                signal: Some(9),
                stderr: b"killed: the VM's memory limit was exceeded\n".to_vec(),
                duration: started.elapsed(),
                oom_killed: true,
                ..ExecOutcome::default()
            }),
            Err(e) => Err(self.agent_error(vm_id, e)),
        }
    }

    /// Maps a failed agent call onto the provider's errors: a sandbox that ended under a
    /// command was stopped or destroyed, or died.
    fn agent_error(&self, vm_id: &VmId, e: AgentCallError) -> ProviderError {
        match e {
            AgentCallError::Closed => {
                let state = self
                    .registry
                    .record(vm_id)
                    .map(|r| r.slot.lock().meta.state);
                match state {
                    Ok(VmState::Running) => ProviderError::internal(
                        format!("vm {vm_id}"),
                        "the sandbox ended while the command ran",
                    ),
                    _ => ProviderError::InvalidState(format!(
                        "vm {vm_id} was stopped or destroyed while the command ran"
                    )),
                }
            }
            e => e.for_vm(vm_id),
        }
    }

    fn snapshot_dir(&self, snapshot_id: &SnapshotId) -> PathBuf {
        self.registry.root().snapshot_dir(snapshot_id)
    }

    /// Fills a new VM directory `dir`: the volume, seeded from a snapshot or a base. A base that
    /// is a container image is unpacked into the image cache instead (the volume starts empty);
    /// returns the image the VM runs on.
    fn populate_vm_dir(
        &self,
        dir: &Path,
        spec: &VmSpec,
        restore: Option<&SnapshotMeta<ProcessSnapshot>>,
    ) -> Result<Option<(ImageInfo, PathBuf)>, ProviderError> {
        let volume = dir.join("volume");
        let owner = self.launcher.owner().unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        });
        if spec.disk_mib > 0 && self.disks.mechanism() == disk::DiskMechanism::LoopExt4 {
            self.disks.create(dir, spec.disk_mib, owner)?;
        } else {
            std::fs::create_dir(&volume)
                .map_err(|e| ProviderError::io("cannot create volume directory", e))?;
        }
        let mut image = None;
        match (restore, &spec.base) {
            (Some(snapshot), _) => {
                if let Some(id) = &snapshot.backend.image {
                    let source = snapshot.backend.image_source.clone().unwrap_or_default();
                    let rootfs = match self.images.get(id) {
                        Some(rootfs) => Some(rootfs),
                        // Not unpacked here yet (an imported snapshot): from the same source.
                        None if crate::image::is_image(&source) => {
                            Some(self.images.unpack(&source).map_err(image_error)?)
                        }
                        None => None,
                    };
                    let rootfs = rootfs.filter(|r| r.info.id == *id).ok_or_else(|| {
                        ProviderError::NotFound(format!(
                            "snapshot {} runs on image {id}, which is not in this worker's \
                             image cache nor at {}",
                            snapshot.snapshot_id,
                            source.display()
                        ))
                    })?;
                    image = Some((rootfs.info, source));
                }
                let archive = self
                    .snapshot_dir(&snapshot.snapshot_id)
                    .join(archive::VOLUME_ENTRY);
                if let Some(expected) = &snapshot.backend.sha256 {
                    let actual = sha256_file(&archive).map_err(|e| {
                        ProviderError::io(
                            format!("cannot read snapshot {}", snapshot.snapshot_id),
                            e,
                        )
                    })?;
                    if &actual != expected {
                        return Err(ProviderError::InvalidArgument(format!(
                            "snapshot {} is corrupt: its archive changed on disk since it was \
                             taken (checksum mismatch)",
                            snapshot.snapshot_id
                        )));
                    }
                }
                archive::unpack_tar_zst(&archive, &volume).map_err(|e| {
                    ProviderError::io(
                        format!("cannot restore snapshot {}", snapshot.snapshot_id),
                        e,
                    )
                })?;
            }
            (None, Some(base)) if crate::image::is_image(base) => {
                let source = std::path::absolute(base).unwrap_or_else(|_| base.clone());
                image = Some((self.images.unpack(base).map_err(image_error)?.info, source));
            }
            (None, Some(base)) => archive::seed_from_base(base, &volume)?,
            (None, None) => {}
        }
        if let Some((uid, gid)) = self.launcher.owner() {
            archive::chown_tree(&volume, uid, gid)
                .map_err(|e| ProviderError::io("cannot hand the volume to the sandbox user", e))?;
        }
        Ok(image)
    }
}

#[async_trait]
impl VmProvider for ProcessProvider {
    fn name(&self) -> &'static str {
        if self.inner.launcher.is_oci() {
            "oci"
        } else {
            "process"
        }
    }

    fn isolation(&self) -> hearth_messages::IsolationReport {
        self.inner.isolation_report()
    }

    fn version(&self) -> Option<String> {
        Some(self.inner.launcher.version())
    }

    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        spec.validate()?;
        let inner = &self.inner;
        let (mut reservation, restore) = inner
            .registry
            .reserve_vm(vm_id, spec.restore_from.as_ref())?;
        {
            let inner = inner.clone();
            reservation.on_abort(move |dir| inner.discard_vm_dir(dir));
        }
        info!(%vm_id, restore_from = ?spec.restore_from, "creating vm");
        reservation.make_dir().await?;
        let dir = reservation.dir().to_path_buf();
        let image = {
            let (inner, dir, spec, restore) =
                (inner.clone(), dir.clone(), spec.clone(), restore.clone());
            blocking(move || inner.populate_vm_dir(&dir, &spec, restore.as_ref())).await?
        };

        // The sandbox starts now, so the VM is ready the moment it is listed (and pooled).
        let mut backend = ProcessVm::of(spec);
        backend.image = image.as_ref().map(|(i, _)| i.id.clone());
        backend.image_source = image.as_ref().map(|(_, source)| source.clone());
        let sandbox = inner
            .launch(
                vm_id,
                &dir.join("volume"),
                backend.limits(),
                spec.network,
                backend.image.as_deref(),
            )
            .await?;
        // An image's environment (its PATH, …) under the template's.
        let mut spec = spec.clone();
        if let (Some((image, _)), None) = (&image, &restore) {
            for (key, value) in image.env.iter().filter_map(|e| e.split_once('=')) {
                spec.env
                    .entry(key.to_owned())
                    .or_insert_with(|| value.to_owned());
            }
        }
        let spec = &spec;
        let meta = VmMeta::created(vm_id, spec, restore.as_ref(), backend);
        if let (None, Some(bootstrap)) = (&restore, &spec.bootstrap) {
            let exec_spec = ExecSpec::argv(bootstrap.clone())
                .with_timeout(BOOTSTRAP_TIMEOUT)
                .with_max_output_bytes(BOOTSTRAP_OUTPUT_BYTES);
            let outcome = inner
                .exec_in(vm_id, &sandbox, &exec_spec, &meta.env, None)
                .await?;
            if !outcome.success() {
                return Err(bootstrap_failed(vm_id, &outcome));
            }
        }
        let view = meta.view();
        reservation.commit(meta, Some(sandbox)).await?;
        Ok(view)
    }

    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let record = self.inner.registry.record(vm_id)?;
        let (view, thawed) = {
            let (record, vm_id) = (record.clone(), vm_id.clone());
            blocking(move || {
                let mut slot = record.slot.lock();
                lifecycle::check_start(&vm_id, slot.meta.state)?;
                let mut meta = slot.meta.clone();
                meta.mark_running();
                write_json_atomic(&slot.dir.join("meta.json"), &meta)?;
                slot.meta = meta;
                // A paused VM's (or a stopped `oci` VM's) processes go on where they were
                // (after a worker restart there are none: its sandbox starts afresh on the
                // volume).
                let thawed = slot.runtime.clone().filter(|s| s.is_frozen());
                if let Some(sandbox) = &thawed {
                    sandbox.thaw();
                }
                info!(%vm_id, thawed = thawed.is_some(), "started vm");
                Ok((slot.meta.view(), thawed))
            })
            .await?
        };
        if let Some(sandbox) = thawed.filter(|_| self.inner.launcher.is_oci()) {
            self.inner.check_alive(vm_id, &sandbox).await?;
        }
        // The sandbox now, so the first command after a resume does not wait for it.
        self.inner.running(vm_id).await?;
        Ok(view)
    }

    /// On `oci` the container is frozen, not killed (its processes and their memory are kept
    /// for [`start_vm`](VmProvider::start_vm)); the process provider kills its sandbox.
    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let record = self.inner.registry.record(vm_id)?;
        let (inner, vm_id) = (self.inner.clone(), vm_id.clone());
        let oci = inner.launcher.is_oci();
        // A container that ended on its own (or whose agent is gone) is the VM's failure, never
        // hidden by a stop.
        let sandbox = record.slot.lock().runtime.clone();
        if let Some(sandbox) = sandbox.filter(|s| oci && s.is_dead() && !s.is_frozen()) {
            inner.check_alive(&vm_id, &sandbox).await?;
        }
        blocking(move || {
            let mut slot = record.slot.lock();
            lifecycle::check_stop(&vm_id, slot.meta.state)?;
            let live = slot.runtime.as_ref().filter(|s| oci && !s.is_dead());
            let frozen = match live.map(|s| s.freeze(&inner.freeze_scope)) {
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    warn!(%vm_id, error = %e, "cannot freeze the container: stopping it by killing it");
                    false
                }
                None => false,
            };
            let mut meta = slot.meta.clone();
            meta.mark_stopped();
            if let Err(e) = write_json_atomic(&slot.dir.join("meta.json"), &meta) {
                if let Some(sandbox) = slot.runtime.as_ref().filter(|_| frozen) {
                    sandbox.thaw();
                }
                return Err(e);
            }
            slot.meta = meta;
            if !frozen {
                kill_sandbox(&mut slot);
            }
            info!(%vm_id, frozen, "stopped vm");
            Ok(slot.meta.view())
        })
        .await
    }

    async fn pause_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let record = self.inner.registry.record(vm_id)?;
        let (inner, vm_id) = (self.inner.clone(), vm_id.clone());
        blocking(move || {
            let mut slot = record.slot.lock();
            lifecycle::check_pause(&vm_id, slot.meta.state)?;
            // A stopped `oci` VM is frozen already, and stays so if the pause fails.
            let to_freeze = slot
                .runtime
                .as_ref()
                .filter(|s| !s.is_dead() && !s.is_frozen());
            if let Some(sandbox) = to_freeze {
                sandbox.freeze(&inner.freeze_scope)?;
            }
            let froze = to_freeze.is_some();
            let mut meta = slot.meta.clone();
            meta.mark_paused();
            if let Err(e) = write_json_atomic(&slot.dir.join("meta.json"), &meta) {
                if let Some(sandbox) = slot.runtime.as_ref().filter(|_| froze) {
                    sandbox.thaw();
                }
                return Err(e);
            }
            slot.meta = meta;
            info!(%vm_id, "paused vm (its processes frozen)");
            Ok(slot.meta.view())
        })
        .await
    }

    async fn snapshot_vm(
        &self,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotInfo, ProviderError> {
        let inner = self.inner.clone();
        let (staging, record) = inner.registry.reserve_snapshot_of(vm_id, snapshot_id)?;
        let (volume, meta) = {
            let slot = record.slot.lock();
            let backend = ProcessSnapshot {
                sha256: None,
                image: slot.meta.backend.image.clone(),
                image_source: slot.meta.backend.image_source.clone(),
                size_bytes: 0,
            };
            (
                volume(&slot),
                SnapshotMeta::of(snapshot_id, &slot.meta, backend),
            )
        };
        info!(%vm_id, %snapshot_id, "snapshotting vm");
        staging.make_dir().await?;
        let packed = staging.path().join(archive::VOLUME_ENTRY);
        let level = inner.config.snapshot_compression_level;
        let (image, image_source) = (
            meta.backend.image.clone(),
            meta.backend.image_source.clone(),
        );
        let backend = blocking(move || {
            let size_bytes = archive::pack_dir(&volume, &packed, level)
                .map_err(|e| ProviderError::io("cannot archive volume", e))?;
            let sha256 = sha256_file(&packed)
                .map_err(|e| ProviderError::io("cannot checksum the snapshot", e))?;
            Ok(ProcessSnapshot {
                sha256: Some(sha256),
                image,
                image_source,
                size_bytes,
            })
        })
        .await?;
        staging.publish(SnapshotMeta { backend, ..meta }).await
    }

    async fn destroy_vm(&self, vm_id: &VmId) -> Result<(), ProviderError> {
        let inner = self.inner.clone();
        let vm_id = vm_id.clone();
        blocking(move || {
            let root = inner.registry.root();
            let trash = inner.registry.destroy(&vm_id, |slot| {
                let trash = root
                    .trash(&slot.dir, "destroy")
                    .map_err(|e| ProviderError::io("cannot remove vm directory", e))?;
                kill_sandbox(slot);
                Ok(trash)
            })?;
            if let Some(trash) = trash {
                info!(%vm_id, "destroyed vm");
                inner.discard_vm_dir(&trash);
            }
            Ok(())
        })
        .await
    }

    async fn rename_vm(&self, old: &VmId, new: &VmId) -> Result<VmView, ProviderError> {
        // On the claim path: one rename(2) (microseconds), done inline. meta.json is not rewritten
        // here — the directory name is authoritative on reopen, and the next state change writes
        // the meta anyway — because a file write costs more than the rest of the hand-off.
        let registry = &self.inner.registry;
        let (record, reservation) = registry.reserve_rename(old, new)?;
        let view = registry.commit_rename(old, reservation, &record, |_| {})?;
        debug!(%old, %new, "renamed vm");
        Ok(view)
    }

    async fn exec(
        &self,
        vm_id: &VmId,
        spec: ExecSpec,
        chunks: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutcome, ProviderError> {
        // Bad input is rejected before the VM's state is looked at, as by every adapter.
        spec.validate()?;
        paths::relative_path("cwd", spec.cwd.as_deref().unwrap_or(""))?;
        let inner = &self.inner;
        let (record, sandbox) = inner.running(vm_id).await?;
        let vm_env = record.slot.lock().meta.env.clone();
        let outcome = inner
            .exec_in(vm_id, &sandbox, &spec, &vm_env, chunks)
            .await?;
        record.touch();
        debug!(%vm_id, exit_code = outcome.exit_code, timed_out = outcome.timed_out, "exec finished");
        Ok(outcome)
    }

    async fn put_file(
        &self,
        vm_id: &VmId,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ProviderError> {
        paths::file_path(path)?;
        let (record, sandbox) = self.inner.running(vm_id).await?;
        let deadline = Instant::now() + AGENT_TIMEOUT + transfer_allowance(data.len() as u64);
        let result = sandbox.link.put_file(path, data, mode, deadline).await;
        record.touch();
        result.map_err(|e| self.inner.agent_error(vm_id, e))
    }

    async fn get_file(
        &self,
        vm_id: &VmId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ProviderError> {
        paths::file_path(path)?;
        let (record, sandbox) = self.inner.running(vm_id).await?;
        let deadline = Instant::now() + AGENT_TIMEOUT + transfer_allowance(max_bytes);
        let result = sandbox.link.get_file(path, max_bytes, deadline).await;
        record.touch();
        result.map_err(|e| self.inner.agent_error(vm_id, e))
    }

    async fn backup_vm(&self, vm_id: &VmId, dest_dir: &Path) -> Result<PathBuf, ProviderError> {
        let record = self.inner.registry.record(vm_id)?;
        let volume = volume(&record.slot.lock());
        let level = self.inner.config.snapshot_compression_level;
        let dest_dir = dest_dir.to_path_buf();
        let name = format!("{vm_id}-{}.tar.zst", now_ms());
        blocking(move || {
            std::fs::create_dir_all(&dest_dir).map_err(|e| {
                ProviderError::io(format!("cannot create {}", dest_dir.display()), e)
            })?;
            let dest = dest_dir.join(&name);
            let partial = dest_dir.join(format!(".{name}.partial"));
            let packed = archive::pack_dir(&volume, &partial, level)
                .and_then(|_| std::fs::rename(&partial, &dest));
            if let Err(e) = packed {
                let _ = std::fs::remove_file(&partial);
                return Err(ProviderError::io("cannot write backup", e));
            }
            Ok(dest)
        })
        .await
    }

    async fn export_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        let meta = self.inner.registry.snapshot(snapshot_id)?;
        let meta = to_json(&meta)?;
        let volume = self
            .inner
            .snapshot_dir(snapshot_id)
            .join(archive::VOLUME_ENTRY);
        archive::write_export(&meta, &volume, out)
            .await
            .map_err(|e| ProviderError::io(format!("cannot export snapshot {snapshot_id}"), e))
    }

    async fn import_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<SnapshotInfo, ProviderError> {
        let staging = self.inner.registry.reserve_snapshot(snapshot_id)?;
        staging.make_dir().await?;
        let volume = staging.path().join(archive::VOLUME_ENTRY);
        let meta_bytes = archive::read_export(input, &volume).await?;
        let meta: SnapshotMeta<ProcessSnapshot> =
            serde_json::from_slice(&meta_bytes).map_err(ProviderError::corrupt_snapshot)?;
        if meta.format != registry::META_FORMAT {
            return Err(ProviderError::corrupt_snapshot(format!(
                "unsupported format {}",
                meta.format
            )));
        }
        let expected = meta.backend.sha256.clone();
        let (image, image_source) = (
            meta.backend.image.clone(),
            meta.backend.image_source.clone(),
        );
        let backend = blocking(move || {
            archive::verify_tar_zst(&volume).map_err(ProviderError::corrupt_snapshot)?;
            let size_bytes = std::fs::metadata(&volume)
                .map_err(|e| ProviderError::io("cannot inspect snapshot", e))?
                .len();
            let sha256 = sha256_file(&volume)
                .map_err(|e| ProviderError::io("cannot checksum the snapshot", e))?;
            if expected.is_some_and(|s| s != sha256) {
                return Err(ProviderError::corrupt_snapshot("checksum mismatch"));
            }
            Ok(ProcessSnapshot {
                sha256: Some(sha256),
                image,
                image_source,
                size_bytes,
            })
        })
        .await?;
        let info = staging.publish(SnapshotMeta { backend, ..meta }).await?;
        info!(%snapshot_id, size_bytes = info.size_bytes, "imported snapshot");
        Ok(info)
    }

    async fn delete_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), ProviderError> {
        self.inner.registry.delete_snapshot(snapshot_id).await
    }

    /// Background processes run in the VM's sandbox beside its commands (the sandbox's sweep
    /// after a foreground exec spares them) and die with it: on stop, destroy, or a worker
    /// restart.
    async fn process(
        &self,
        vm_id: &VmId,
        mut call: super::ProcessCall,
        wait: Duration,
    ) -> Result<super::ProcessAnswer, ProviderError> {
        let inner = &self.inner;
        if let super::ProcessCall::Start { request, .. } = &mut call {
            paths::relative_path("cwd", request.cwd.as_deref().unwrap_or(""))?;
        }
        let named = !matches!(
            call,
            super::ProcessCall::Start { .. } | super::ProcessCall::List {}
        );
        let (record, sandbox) = if named {
            // A sandbox that is gone took its processes with it: a new one would not know them.
            let record = inner.registry.record(vm_id)?;
            let live = record.touch_running(vm_id)?.filter(|s| !s.is_dead());
            match live {
                Some(sandbox) => (record, sandbox),
                None => return Err(ProviderError::InvalidState(super::agent::lost(vm_id))),
            }
        } else {
            inner.running(vm_id).await?
        };
        let start = if let super::ProcessCall::Start { request, .. } = &mut call {
            // The provider's shell and environment layers, as for an exec.
            if let Some(cmd) = request.cmd.take() {
                let shell = inner.config.shell.to_string_lossy().into_owned();
                request.argv = Some(vec![shell, "-c".into(), cmd]);
            }
            let mut env = inner.config.env.clone();
            env.extend(record.slot.lock().meta.env.clone());
            env.append(&mut request.env);
            request.env = env;
            true
        } else {
            false
        };
        let result = sandbox.link.process_call(vm_id, call, wait).await;
        if start {
            record.touch();
        }
        result.map_err(|e| inner.agent_error(vm_id, e))
    }
}

impl Registered for ProcessProvider {
    type Backend = Process;

    fn registry(&self) -> &Registry<Process> {
        &self.inner.registry
    }
}

#[cfg(test)]
mod tests;
