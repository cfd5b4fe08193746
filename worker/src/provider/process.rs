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
//! it — when the VM stops or is destroyed. Sandboxes die with the worker; after a restart a
//! running VM gets a new one on its next use. Everything a command wrote to the volume stays;
//! processes do not.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::agent::{AgentCallError, ExecLimits};
use super::paths;
use super::registry::state_root::{
    StateRoot, blocking, hex, in_background, read_json, remove_dir_logged, rename_noreplace,
    sha256_file, to_json, write_json_atomic,
};
use super::vmm::{exec_request, transfer_allowance};
use super::{
    ExecOutcome, ExecSpec, OutputChunk, Program, ProviderError, SnapshotId, SnapshotInfo,
    TemplateName, Tombstones, VmId, VmProvider, VmQuery, VmSpec, VmState, VmView, lifecycle,
    now_ms, tail_lossy,
};

mod archive;
mod disk;
mod limits;
pub(crate) mod network;
pub mod sandbox;

use disk::Disks;
use limits::{Cgroups, LimitSpec};
pub use network::EgressConfig;
use network::{Egress, NetworkMode};
pub use sandbox::{Isolation, SandboxConfig, WORKSPACE};
use sandbox::{LaunchSpec, Launcher, Sandbox};

/// How long a bootstrap command may run.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
/// Output kept from a bootstrap command for the error message.
const BOOTSTRAP_OUTPUT_BYTES: usize = 64 * 1024;
/// Version of the `meta.json` formats written here.
const META_FORMAT: u32 = 1;

/// How long an agent may take to answer a file transfer or to come up for an exec.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent may answer after a command's own timeout.
const EXEC_GRACE: Duration = Duration::from_secs(5);

/// Configuration of the process adapter; deserialisable from the worker's TOML with defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Where VMs, snapshots and staging live. Must be one filesystem (renames are atomic).
    pub root: PathBuf,
    /// The shell that runs `cmd` requests as `<shell> -c <cmd>`.
    pub shell: PathBuf,
    /// Added to every command's environment (under the VM's and the request's own env).
    pub env: BTreeMap<String, String>,
    /// `sandbox` (the default) or `none` (commands run as host processes: an explicit choice).
    pub isolation: Isolation,
    /// The sandbox's tools and host identity.
    pub sandbox: SandboxConfig,
    /// How sandboxes of `network = "egress"` templates reach out.
    pub egress: EgressConfig,
    /// How per-VM limits are enforced: `auto` (cgroups v2 or v1 where writable, else rlimits),
    /// `rlimit`, or `off` (for hosts where something else confines the worker).
    pub limits: LimitsMode,
    /// The `hearth-guest-agent` binary; found next to the worker's executable or on `PATH` when
    /// unset.
    pub agent: Option<PathBuf>,
    /// zstd level for snapshots and backups.
    pub snapshot_compression_level: i32,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/hearth/process"),
            shell: PathBuf::from("/bin/sh"),
            env: BTreeMap::new(),
            isolation: Isolation::Sandbox,
            sandbox: SandboxConfig::default(),
            egress: EgressConfig::default(),
            limits: LimitsMode::Auto,
            agent: None,
            snapshot_compression_level: 3,
        }
    }
}

impl ProcessConfig {
    /// Defaults with `root` set.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ..Self::default()
        }
    }
}

/// How per-VM limits are enforced (`limits` in the process provider's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitsMode {
    /// cgroups v2, else v1, where the worker can write them; else rlimits.
    #[default]
    Auto,
    /// Only rlimits (address space).
    Rlimit,
    /// None: something outside Hearth confines the worker and its sandboxes.
    Off,
}

/// A VM's `meta.json`. The directory name, not `vm_id`, is authoritative on reopen.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmMeta {
    format: u32,
    vm_id: VmId,
    state: VmState,
    template: Option<TemplateName>,
    created_ms: u64,
    last_activity_ms: u64,
    stopped_ms: Option<u64>,
    restored_from: Option<SnapshotId>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    vcpus: u32,
    memory_mib: u32,
    #[serde(default)]
    disk_mib: u32,
    #[serde(default)]
    max_processes: u32,
    #[serde(default)]
    network: NetworkMode,
}

impl VmMeta {
    fn limits(&self) -> LimitSpec {
        LimitSpec {
            memory_mib: self.memory_mib,
            max_processes: self.max_processes,
            vcpus: self.vcpus,
        }
    }
}

impl VmMeta {
    fn view(&self) -> VmView {
        VmView {
            vm_id: self.vm_id.clone(),
            state: self.state,
            template: self.template.clone(),
            created_ms: self.created_ms,
            last_activity_ms: self.last_activity_ms,
            stopped_ms: self.stopped_ms,
            restored_from: self.restored_from.clone(),
        }
    }
}

/// A snapshot's `meta.json`, also the metadata entry of an export stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    format: u32,
    snapshot_id: SnapshotId,
    source_vm: Option<VmId>,
    template: Option<TemplateName>,
    created_ms: u64,
    /// The source VM's env, inherited by VMs restored from the snapshot.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// SHA-256 (hex) of `volume.tar.zst`, checked before every restore: a snapshot changed on
    /// disk after it was taken is refused, never restored.
    #[serde(default)]
    sha256: Option<String>,
}

/// One live VM. Lock order: the provider's index, then a record.
#[derive(Debug)]
struct VmRecord {
    slot: Mutex<VmSlot>,
    /// Held while a sandbox is being started, so two callers never start two.
    launching: tokio::sync::Mutex<()>,
}

impl VmRecord {
    fn new(dir: PathBuf, meta: VmMeta, sandbox: Option<Arc<Sandbox>>) -> Arc<Self> {
        Arc::new(VmRecord {
            slot: Mutex::new(VmSlot { dir, meta, sandbox }),
            launching: tokio::sync::Mutex::new(()),
        })
    }
}

#[derive(Debug)]
struct VmSlot {
    dir: PathBuf,
    meta: VmMeta,
    /// The running sandbox; `None` while stopped, and after a worker restart until first use.
    sandbox: Option<Arc<Sandbox>>,
}

impl VmSlot {
    fn volume(&self) -> PathBuf {
        self.dir.join("volume")
    }

    /// Ends the sandbox and every process in it.
    fn kill_sandbox(&mut self) {
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.kill();
        }
    }
}

#[derive(Debug, Default)]
struct Index {
    vms: BTreeMap<VmId, Arc<VmRecord>>,
    /// Ids being created: taken, but not visible yet.
    creating: HashSet<VmId>,
    tombstones: Tombstones,
    snapshots: BTreeMap<SnapshotId, SnapshotMetaEntry>,
    /// Snapshot ids being written or imported.
    snapshotting: HashSet<SnapshotId>,
}

#[derive(Debug, Clone)]
struct SnapshotMetaEntry {
    meta: SnapshotMeta,
    size_bytes: u64,
}

impl SnapshotMetaEntry {
    fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: self.meta.snapshot_id.clone(),
            source_vm: self.meta.source_vm.clone(),
            template: self.meta.template.clone(),
            created_ms: self.meta.created_ms,
            size_bytes: self.size_bytes,
        }
    }
}

impl Index {
    /// The live record of `vm_id`; `InvalidState` for a tombstone, `NotFound` otherwise.
    fn record(&self, vm_id: &VmId) -> Result<Arc<VmRecord>, ProviderError> {
        if let Some(record) = self.vms.get(vm_id) {
            return Ok(record.clone());
        }
        if self.tombstones.get(vm_id).is_some() {
            return Err(ProviderError::vm_destroyed(vm_id));
        }
        Err(ProviderError::vm_not_found(vm_id))
    }

    fn vm_taken(&self, vm_id: &VmId) -> bool {
        self.vms.contains_key(vm_id) || self.creating.contains(vm_id)
    }

    fn snapshot_taken(&self, snapshot_id: &SnapshotId) -> bool {
        self.snapshots.contains_key(snapshot_id) || self.snapshotting.contains(snapshot_id)
    }
}

#[derive(Debug)]
struct Inner {
    /// The locked state root (reconcile deletes staging files: one provider per root).
    root: StateRoot,
    config: ProcessConfig,
    launcher: Launcher,
    /// Per-sandbox cgroups (or the rlimit fallback).
    cgroups: Cgroups,
    /// Loop-mounted volumes with a size (disk quotas), where the host allows.
    disks: Disks,
    index: Mutex<Index>,
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
        let launcher = Launcher::open(
            config.isolation,
            config.sandbox.clone(),
            config.agent.as_deref(),
            &root,
        )?;
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
            root: state,
            launcher,
            cgroups,
            disks,
            config,
            index: Mutex::new(Index::default()),
        };
        inner.reconcile()?;
        Ok(Self {
            inner: Arc::new(inner),
        })
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

/// Removes a half-created VM directory and releases its id unless disarmed; covers errors and a
/// create future dropped half way.
struct CreateGuard {
    inner: Arc<Inner>,
    vm_id: VmId,
    dir: PathBuf,
    armed: bool,
    /// Set once this create made `dir`; a directory it did not make is never removed.
    owns_dir: bool,
}

impl Drop for CreateGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if !self.owns_dir {
            self.inner.index.lock().creating.remove(&self.vm_id);
            return;
        }
        // Move the directory out of vms/ first (instant), so a crash cannot resurrect it.
        let doomed = self
            .inner
            .root
            .trash(&self.dir, "create")
            .unwrap_or_else(|_| self.dir.clone());
        self.inner.index.lock().creating.remove(&self.vm_id);
        let inner = self.inner.clone();
        in_background(move || inner.discard_vm_dir(&doomed));
    }
}

/// Releases a reserved snapshot id and removes its staging directory unless disarmed.
struct SnapshotGuard {
    inner: Arc<Inner>,
    snapshot_id: SnapshotId,
    staging: PathBuf,
}

impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        self.inner
            .index
            .lock()
            .snapshotting
            .remove(&self.snapshot_id);
        let staging = std::mem::take(&mut self.staging);
        if staging.as_os_str().is_empty() {
            return;
        }
        in_background(move || remove_dir_logged(&staging));
    }
}

impl Drop for Inner {
    /// The provider is going away (the worker stops): sandboxes die with their records, and the
    /// VMs' own disks are unmounted so no loop device stays attached; the next `open` mounts them
    /// again. (After a SIGKILL they stay mounted, and `open` adopts them as they are.)
    fn drop(&mut self) {
        let dirs: Vec<PathBuf> = self
            .index
            .get_mut()
            .vms
            .values()
            .map(|r| {
                let mut slot = r.slot.lock();
                slot.kill_sandbox();
                slot.dir.clone()
            })
            .collect();
        // Half-created and half-destroyed VMs in staging, too.
        let staging = std::fs::read_dir(self.root.tmp_dir())
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
        self.root.empty_tmp(|path| {
            info!(path = %path.display(), "removing staging leftover");
            self.discard_vm_dir(path);
        })?;

        let mut index = self.index.lock();
        for entry in StateRoot::list(self.root.vms_dir())? {
            let dir = entry.path();
            let Some(vm_id) = entry.file_name().to_str().and_then(|n| VmId::new(n).ok()) else {
                warn!(path = %dir.display(), "ignoring entry that is not a vm id");
                continue;
            };
            let _ = std::fs::remove_file(dir.join("meta.json.tmp"));
            let meta_path = dir.join("meta.json");
            if !meta_path.exists() {
                info!(%vm_id, "removing half-created vm");
                self.discard_vm_dir(&dir);
                continue;
            }
            let mut meta: VmMeta = match read_json(&meta_path) {
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
            if meta.vm_id != vm_id {
                // Crashed between the directory rename and the meta rewrite: the name wins.
                meta.vm_id = vm_id.clone();
                write_json_atomic(&meta_path, &meta)?;
            }
            debug!(%vm_id, state = %meta.state, "reconciled vm");
            index.vms.insert(vm_id, VmRecord::new(dir, meta, None));
        }

        for entry in StateRoot::list(self.root.snapshots_dir())? {
            let dir = entry.path();
            let Some(snapshot_id) = entry
                .file_name()
                .to_str()
                .and_then(|n| SnapshotId::new(n).ok())
            else {
                warn!(path = %dir.display(), "ignoring entry that is not a snapshot id");
                continue;
            };
            let meta: SnapshotMeta = match read_json(&dir.join(archive::META_ENTRY)) {
                Ok(meta) => meta,
                Err(e) => {
                    warn!(%snapshot_id, error = %e, "ignoring snapshot with unreadable meta.json");
                    continue;
                }
            };
            let size_bytes = match std::fs::metadata(dir.join(archive::VOLUME_ENTRY)) {
                Ok(m) => m.len(),
                Err(e) => {
                    warn!(%snapshot_id, error = %e, "ignoring snapshot without a volume archive");
                    continue;
                }
            };
            let meta = SnapshotMeta {
                snapshot_id: snapshot_id.clone(),
                ..meta
            };
            index
                .snapshots
                .insert(snapshot_id, SnapshotMetaEntry { meta, size_bytes });
        }
        info!(
            vms = index.vms.len(),
            snapshots = index.snapshots.len(),
            "process provider reconciled"
        );
        Ok(())
    }

    fn record(&self, vm_id: &VmId) -> Result<Arc<VmRecord>, ProviderError> {
        self.index.lock().record(vm_id)
    }

    /// The record and the sandbox of a running VM (exec and file transfer), starting the sandbox
    /// if it is not running (first use after a worker restart, or its agent died); bumps the
    /// VM's activity.
    async fn running(&self, vm_id: &VmId) -> Result<(Arc<VmRecord>, Arc<Sandbox>), ProviderError> {
        let record = self.record(vm_id)?;
        let live = |record: &VmRecord| -> Result<Option<Arc<Sandbox>>, ProviderError> {
            let mut slot = record.slot.lock();
            lifecycle::require_running(vm_id, slot.meta.state)?;
            slot.meta.last_activity_ms = now_ms();
            Ok(slot.sandbox.clone().filter(|s| !s.is_dead()))
        };
        if let Some(sandbox) = live(&record)? {
            return Ok((record, sandbox));
        }
        let owner = record.clone();
        let _launching = owner.launching.lock().await;
        if let Some(sandbox) = live(&record)? {
            return Ok((record, sandbox));
        }
        let (volume, limits, network) = {
            let slot = record.slot.lock();
            (slot.volume(), slot.meta.limits(), slot.meta.network)
        };
        let sandbox = self.launch(vm_id, &volume, limits, network).await?;
        {
            let mut slot = record.slot.lock();
            // Stopped or destroyed meanwhile: that wins, and the new sandbox dies with this scope.
            lifecycle::require_running(vm_id, slot.meta.state)?;
            if let Some(old) = slot.sandbox.replace(sandbox.clone()) {
                old.kill();
            }
        }
        Ok((record, sandbox))
    }

    /// Starts a sandbox around `volume`, inside its cgroup, with its network.
    async fn launch(
        &self,
        vm_id: &VmId,
        volume: &Path,
        limits: LimitSpec,
        network: NetworkMode,
    ) -> Result<Arc<Sandbox>, ProviderError> {
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
            })
            .await?;
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
            mode: self.launcher.isolation().as_str().into(),
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
                let state = self.record(vm_id).map(|r| r.slot.lock().meta.state);
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
        self.root.snapshot_dir(snapshot_id)
    }

    /// Fills a new VM directory `dir`: the volume, seeded from a snapshot or a base.
    fn populate_vm_dir(
        &self,
        dir: &Path,
        spec: &VmSpec,
        restore: Option<&SnapshotMetaEntry>,
    ) -> Result<(), ProviderError> {
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
        match (restore, &spec.base) {
            (Some(snapshot), _) => {
                let archive = self
                    .snapshot_dir(&snapshot.meta.snapshot_id)
                    .join(archive::VOLUME_ENTRY);
                if let Some(expected) = &snapshot.meta.sha256 {
                    let actual = sha256_file(&archive).map_err(|e| {
                        ProviderError::io(
                            format!("cannot read snapshot {}", snapshot.meta.snapshot_id),
                            e,
                        )
                    })?;
                    if &actual != expected {
                        return Err(ProviderError::InvalidArgument(format!(
                            "snapshot {} is corrupt: its archive changed on disk since it was \
                             taken (checksum mismatch)",
                            snapshot.meta.snapshot_id
                        )));
                    }
                }
                archive::unpack_tar_zst(&archive, &volume).map_err(|e| {
                    ProviderError::io(
                        format!("cannot restore snapshot {}", snapshot.meta.snapshot_id),
                        e,
                    )
                })?;
            }
            (None, Some(base)) => archive::seed_from_base(base, &volume)?,
            (None, None) => {}
        }
        if let Some((uid, gid)) = self.launcher.owner() {
            archive::chown_tree(&volume, uid, gid)
                .map_err(|e| ProviderError::io("cannot hand the volume to the sandbox user", e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl VmProvider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    fn isolation(&self) -> hearth_messages::IsolationReport {
        self.inner.isolation_report()
    }

    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        spec.validate()?;
        let inner = &self.inner;
        let restore = {
            let mut index = inner.index.lock();
            let restore = match &spec.restore_from {
                Some(snapshot_id) => Some(
                    index
                        .snapshots
                        .get(snapshot_id)
                        .cloned()
                        .ok_or_else(|| ProviderError::snapshot_not_found(snapshot_id))?,
                ),
                None => None,
            };
            if index.vm_taken(vm_id) {
                return Err(ProviderError::vm_exists(vm_id));
            }
            index.creating.insert(vm_id.clone());
            restore
        };
        let dir = inner.root.vm_dir(vm_id);
        let mut guard = CreateGuard {
            inner: inner.clone(),
            vm_id: vm_id.clone(),
            dir: dir.clone(),
            armed: true,
            owns_dir: false,
        };
        info!(%vm_id, restore_from = ?spec.restore_from, "creating vm");

        let mut env = restore
            .as_ref()
            .map(|s| s.meta.env.clone())
            .unwrap_or_default();
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        {
            let new_dir = dir.clone();
            blocking(move || {
                std::fs::create_dir(&new_dir).map_err(|e| {
                    ProviderError::io(format!("cannot create {}", new_dir.display()), e)
                })
            })
            .await?;
            guard.owns_dir = true;
            let inner = inner.clone();
            let dir = dir.clone();
            let spec = spec.clone();
            let restore = restore.clone();
            blocking(move || inner.populate_vm_dir(&dir, &spec, restore.as_ref())).await?;
        }

        // The sandbox starts now, so the VM is ready the moment it is listed (and pooled).
        let limits = LimitSpec {
            memory_mib: spec.memory_mib,
            max_processes: spec.max_processes,
            vcpus: spec.vcpus,
        };
        let sandbox = inner
            .launch(vm_id, &dir.join("volume"), limits, spec.network)
            .await?;
        if let (None, Some(bootstrap)) = (&restore, &spec.bootstrap) {
            let exec_spec = ExecSpec::argv(bootstrap.clone())
                .with_timeout(BOOTSTRAP_TIMEOUT)
                .with_max_output_bytes(BOOTSTRAP_OUTPUT_BYTES);
            let outcome = inner
                .exec_in(vm_id, &sandbox, &exec_spec, &env, None)
                .await?;
            if !outcome.success() {
                let how = if outcome.timed_out {
                    format!("timed out after {}s", BOOTSTRAP_TIMEOUT.as_secs())
                } else {
                    format!("exited with code {}", outcome.exit_code)
                };
                let tail = if outcome.stderr.is_empty() {
                    tail_lossy(&outcome.stdout, 2000)
                } else {
                    tail_lossy(&outcome.stderr, 2000)
                };
                return Err(ProviderError::CommandFailed(format!(
                    "bootstrap of vm {vm_id} {how}: {tail}"
                )));
            }
        }

        let now = now_ms();
        let meta = VmMeta {
            format: META_FORMAT,
            vm_id: vm_id.clone(),
            state: VmState::Running,
            template: spec
                .template
                .clone()
                .or_else(|| restore.as_ref().and_then(|s| s.meta.template.clone())),
            created_ms: now,
            last_activity_ms: now,
            stopped_ms: None,
            restored_from: spec.restore_from.clone(),
            env,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            max_processes: spec.max_processes,
            network: spec.network,
        };
        {
            // Writing meta.json is the commit point.
            let meta = meta.clone();
            let path = dir.join("meta.json");
            blocking(move || write_json_atomic(&path, &meta)).await?;
        }
        let view = meta.view();
        {
            let mut index = inner.index.lock();
            guard.armed = false;
            index.creating.remove(vm_id);
            index.tombstones.remove(vm_id);
            index
                .vms
                .insert(vm_id.clone(), VmRecord::new(dir, meta, Some(sandbox)));
        }
        Ok(view)
    }

    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let inner = self.inner.clone();
        let vm_id = vm_id.clone();
        let id = vm_id.clone();
        let view = blocking(move || {
            let vm_id = id;
            let record = inner.record(&vm_id)?;
            let mut slot = record.slot.lock();
            lifecycle::check_start(&vm_id, slot.meta.state)?;
            let mut meta = slot.meta.clone();
            meta.state = VmState::Running;
            meta.stopped_ms = None;
            meta.last_activity_ms = now_ms();
            write_json_atomic(&slot.dir.join("meta.json"), &meta)?;
            slot.meta = meta;
            info!(%vm_id, "started vm");
            Ok(slot.meta.view())
        })
        .await?;
        // The sandbox now, so the first command after a resume does not wait for it.
        self.inner.running(&vm_id).await?;
        Ok(view)
    }

    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let inner = self.inner.clone();
        let vm_id = vm_id.clone();
        blocking(move || {
            let record = inner.record(&vm_id)?;
            let mut slot = record.slot.lock();
            lifecycle::check_stop(&vm_id, slot.meta.state)?;
            let now = now_ms();
            let mut meta = slot.meta.clone();
            meta.state = VmState::Stopped;
            meta.stopped_ms = Some(now);
            meta.last_activity_ms = now;
            write_json_atomic(&slot.dir.join("meta.json"), &meta)?;
            slot.meta = meta;
            slot.kill_sandbox();
            info!(%vm_id, "stopped vm");
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
        let (volume, meta) = {
            let mut index = inner.index.lock();
            let record = index.record(vm_id)?;
            if index.snapshot_taken(snapshot_id) {
                return Err(ProviderError::snapshot_exists(snapshot_id));
            }
            index.snapshotting.insert(snapshot_id.clone());
            let slot = record.slot.lock();
            let meta = SnapshotMeta {
                format: META_FORMAT,
                snapshot_id: snapshot_id.clone(),
                source_vm: Some(vm_id.clone()),
                template: slot.meta.template.clone(),
                created_ms: now_ms(),
                env: slot.meta.env.clone(),
                sha256: None,
            };
            (slot.volume(), meta)
        };
        let staging = inner.root.staging("snapshot");
        let mut guard = SnapshotGuard {
            inner: inner.clone(),
            snapshot_id: snapshot_id.clone(),
            staging: staging.clone(),
        };
        info!(%vm_id, %snapshot_id, "snapshotting vm");
        let entry = {
            let inner = inner.clone();
            blocking(move || {
                std::fs::create_dir(&staging)
                    .map_err(|e| ProviderError::io("cannot create staging directory", e))?;
                let level = inner.config.snapshot_compression_level;
                let packed = staging.join(archive::VOLUME_ENTRY);
                let size_bytes = archive::pack_dir(&volume, &packed, level)
                    .map_err(|e| ProviderError::io("cannot archive volume", e))?;
                let meta = SnapshotMeta {
                    sha256: Some(
                        sha256_file(&packed)
                            .map_err(|e| ProviderError::io("cannot checksum the snapshot", e))?,
                    ),
                    ..meta
                };
                write_json_atomic(&staging.join(archive::META_ENTRY), &meta)?;
                let dest = inner.snapshot_dir(&meta.snapshot_id);
                rename_noreplace(&staging, &dest)
                    .map_err(|e| ProviderError::io("cannot publish snapshot", e))?;
                Ok(SnapshotMetaEntry { meta, size_bytes })
            })
            .await?
        };
        guard.staging = PathBuf::new();
        let info = entry.info();
        inner
            .index
            .lock()
            .snapshots
            .insert(snapshot_id.clone(), entry);
        drop(guard);
        Ok(info)
    }

    async fn destroy_vm(&self, vm_id: &VmId) -> Result<(), ProviderError> {
        let inner = self.inner.clone();
        let vm_id = vm_id.clone();
        blocking(move || {
            let trash;
            {
                let mut index = inner.index.lock();
                let Some(record) = index.vms.get(&vm_id).cloned() else {
                    if index.tombstones.get(&vm_id).is_some() {
                        return Ok(());
                    }
                    return Err(ProviderError::vm_not_found(&vm_id));
                };
                let mut slot = record.slot.lock();
                trash = inner
                    .root
                    .trash(&slot.dir, "destroy")
                    .map_err(|e| ProviderError::io("cannot remove vm directory", e))?;
                // Marked under the slot lock, so a sandbox starting right now is not kept.
                slot.meta.state = VmState::Destroyed;
                slot.kill_sandbox();
                let mut view = slot.meta.view();
                view.last_activity_ms = now_ms();
                drop(slot);
                index.vms.remove(&vm_id);
                index.tombstones.insert(view);
            }
            info!(%vm_id, "destroyed vm");
            inner.discard_vm_dir(&trash);
            Ok(())
        })
        .await
    }

    async fn rename_vm(&self, old: &VmId, new: &VmId) -> Result<VmView, ProviderError> {
        // On the claim path: one rename(2) (microseconds), done inline. meta.json is not rewritten
        // here — the directory name is authoritative on reopen, and the next state change writes
        // the meta anyway — because a file write costs more than the rest of the hand-off.
        let inner = &self.inner;
        let (old, new) = (old.clone(), new.clone());
        {
            let mut index = inner.index.lock();
            let record = index.record(&old)?;
            if index.vm_taken(&new) {
                return Err(ProviderError::vm_exists(&new));
            }
            let mut slot = record.slot.lock();
            let new_dir = inner.root.vm_dir(&new);
            rename_noreplace(&slot.dir, &new_dir)
                .map_err(|e| ProviderError::io(format!("cannot rename vm {old} to {new}"), e))?;
            slot.dir = new_dir;
            slot.meta.vm_id = new.clone();
            slot.meta.last_activity_ms = now_ms();
            index.vms.remove(&old);
            index.tombstones.remove(&new);
            index.vms.insert(new.clone(), record.clone());
            drop(index);
            debug!(%old, %new, "renamed vm");
            Ok(slot.meta.view())
        }
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
        record.slot.lock().meta.last_activity_ms = now_ms();
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
        record.slot.lock().meta.last_activity_ms = now_ms();
        match result {
            Ok(size) => Ok(size),
            Err(e) => Err(self.inner.agent_error(vm_id, e)),
        }
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
        record.slot.lock().meta.last_activity_ms = now_ms();
        match result {
            Ok(data) => Ok(data),
            Err(e) => Err(self.inner.agent_error(vm_id, e)),
        }
    }

    async fn backup_vm(&self, vm_id: &VmId, dest_dir: &Path) -> Result<PathBuf, ProviderError> {
        let record = self.inner.record(vm_id)?;
        let volume = record.slot.lock().volume();
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
        let entry = self
            .inner
            .index
            .lock()
            .snapshots
            .get(snapshot_id)
            .cloned()
            .ok_or_else(|| ProviderError::snapshot_not_found(snapshot_id))?;
        let meta = to_json(&entry.meta)?;
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
        let inner = self.inner.clone();
        {
            let mut index = inner.index.lock();
            if index.snapshot_taken(snapshot_id) {
                return Err(ProviderError::snapshot_exists(snapshot_id));
            }
            index.snapshotting.insert(snapshot_id.clone());
        }
        let staging = inner.root.staging("import");
        let mut guard = SnapshotGuard {
            inner: inner.clone(),
            snapshot_id: snapshot_id.clone(),
            staging: staging.clone(),
        };
        tokio::fs::create_dir(&staging)
            .await
            .map_err(|e| ProviderError::io("cannot create staging directory", e))?;
        let volume = staging.join(archive::VOLUME_ENTRY);
        let meta_bytes = archive::read_export(input, &volume).await?;
        let meta: SnapshotMeta =
            serde_json::from_slice(&meta_bytes).map_err(ProviderError::corrupt_snapshot)?;
        if meta.format != META_FORMAT {
            return Err(ProviderError::corrupt_snapshot(format!(
                "unsupported format {}",
                meta.format
            )));
        }
        let meta = SnapshotMeta {
            snapshot_id: snapshot_id.clone(),
            ..meta
        };
        let entry = {
            let inner = inner.clone();
            blocking(move || {
                archive::verify_tar_zst(&volume).map_err(ProviderError::corrupt_snapshot)?;
                let size_bytes = std::fs::metadata(&volume)
                    .map_err(|e| ProviderError::io("cannot inspect snapshot", e))?
                    .len();
                let sha256 = sha256_file(&volume)
                    .map_err(|e| ProviderError::io("cannot checksum the snapshot", e))?;
                if meta.sha256.as_ref().is_some_and(|s| *s != sha256) {
                    return Err(ProviderError::corrupt_snapshot("checksum mismatch"));
                }
                let meta = SnapshotMeta {
                    sha256: Some(sha256),
                    ..meta
                };
                write_json_atomic(&staging.join(archive::META_ENTRY), &meta)?;
                rename_noreplace(&staging, &inner.snapshot_dir(&meta.snapshot_id))
                    .map_err(|e| ProviderError::io("cannot publish snapshot", e))?;
                Ok(SnapshotMetaEntry { meta, size_bytes })
            })
            .await?
        };
        guard.staging = PathBuf::new();
        let info = entry.info();
        inner
            .index
            .lock()
            .snapshots
            .insert(snapshot_id.clone(), entry);
        drop(guard);
        info!(%snapshot_id, size_bytes = info.size_bytes, "imported snapshot");
        Ok(info)
    }

    async fn delete_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), ProviderError> {
        let inner = self.inner.clone();
        let snapshot_id = snapshot_id.clone();
        blocking(move || {
            let trash;
            {
                let mut index = inner.index.lock();
                if !index.snapshots.contains_key(&snapshot_id) {
                    return Err(ProviderError::snapshot_not_found(&snapshot_id));
                }
                trash = inner
                    .root
                    .trash(&inner.snapshot_dir(&snapshot_id), "delete")
                    .map_err(|e| ProviderError::io("cannot remove snapshot", e))?;
                index.snapshots.remove(&snapshot_id);
            }
            info!(%snapshot_id, "deleted snapshot");
            remove_dir_logged(&trash);
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl VmQuery for ProcessProvider {
    async fn list_vms(&self) -> Result<Vec<VmView>, ProviderError> {
        let index = self.inner.index.lock();
        let mut views: Vec<VmView> = index
            .vms
            .values()
            .map(|r| r.slot.lock().meta.view())
            .chain(index.tombstones.views().cloned())
            .collect();
        views.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(views)
    }

    async fn count_vms(&self) -> Result<usize, ProviderError> {
        Ok(self.inner.index.lock().vms.len())
    }

    async fn get_vm(&self, vm_id: &VmId) -> Result<Option<VmView>, ProviderError> {
        let index = self.inner.index.lock();
        Ok(match index.vms.get(vm_id) {
            Some(record) => Some(record.slot.lock().meta.view()),
            None => index.tombstones.get(vm_id).cloned(),
        })
    }

    async fn list_snapshots(&self, vm_id: &VmId) -> Result<Option<Vec<SnapshotId>>, ProviderError> {
        let index = self.inner.index.lock();
        if !index.vms.contains_key(vm_id) && index.tombstones.get(vm_id).is_none() {
            return Ok(None);
        }
        Ok(Some(
            index
                .snapshots
                .values()
                .filter(|s| s.meta.source_vm.as_ref() == Some(vm_id))
                .map(|s| s.meta.snapshot_id.clone())
                .collect(),
        ))
    }

    async fn get_snapshot(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<Option<SnapshotInfo>, ProviderError> {
        Ok(self
            .inner
            .index
            .lock()
            .snapshots
            .get(snapshot_id)
            .map(SnapshotMetaEntry::info))
    }

    async fn list_all_snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError> {
        Ok(self
            .inner
            .index
            .lock()
            .snapshots
            .values()
            .map(SnapshotMetaEntry::info)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_deserialises_with_defaults_and_rejects_typos() {
        let config: ProcessConfig = serde_json::from_str(r#"{"root": "/srv/hearth"}"#).unwrap();
        assert_eq!(config.root, PathBuf::from("/srv/hearth"));
        assert_eq!(config.shell, PathBuf::from("/bin/sh"));
        assert_eq!(
            config.isolation,
            Isolation::Sandbox,
            "isolation is the default"
        );
        assert_eq!(config.snapshot_compression_level, 3);

        let config: ProcessConfig = serde_json::from_str(
            r#"{"isolation": "none", "sandbox": {"bwrap": "/opt/bwrap", "uid": 7}}"#,
        )
        .unwrap();
        assert_eq!(config.isolation, Isolation::None);
        assert_eq!(config.sandbox.bwrap, PathBuf::from("/opt/bwrap"));
        assert_eq!(config.sandbox.uid, 7);
        assert!(serde_json::from_str::<ProcessConfig>(r#"{"rooot": "/x"}"#).is_err());
        assert!(serde_json::from_str::<ProcessConfig>(r#"{"isolation": "bwrap"}"#).is_err());
    }

    #[test]
    fn a_root_is_opened_by_one_provider_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ProcessProvider::open(ProcessConfig::new(tmp.path())).unwrap();
        let err = ProcessProvider::open(ProcessConfig::new(tmp.path())).unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
        drop(first);
        ProcessProvider::open(ProcessConfig::new(tmp.path())).unwrap();
    }

    #[test]
    fn a_missing_sandbox_tool_is_unavailable_and_says_how_to_fix_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = ProcessConfig::new(tmp.path());
        config.sandbox.bwrap = tmp.path().join("no-bwrap");
        let err = ProcessProvider::open(config).unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
        assert!(
            err.to_string().contains("apt-get install bubblewrap"),
            "{err}"
        );
        assert!(err.to_string().contains("--isolation none"), "{err}");

        let mut config = ProcessConfig::new(tmp.path());
        config.agent = Some(tmp.path().join("no-agent"));
        let err = ProcessProvider::open(config).unwrap_err();
        assert!(err.to_string().contains("hearth-guest-agent"), "{err}");
    }
}
