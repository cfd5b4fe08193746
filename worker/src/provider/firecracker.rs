//! The firecracker adapter: every VM is a Firecracker microVM (v1.16 API over its Unix socket) with
//! the Hearth guest agent inside, reached over vsock. Same contract as the `qemu` adapter; the
//! differences are the VMM's:
//!
//! - **create** copies the root filesystem image into the VM's run directory and configures
//!   `machine-config`, `boot-source`, `drives/rootfs` (a path *relative to Firecracker's working
//!   directory*, so a snapshot records `rootfs.ext4` and every clone opens its own copy), `vsock`
//!   (guest CID 3, `v.sock`), optionally a network interface with MMDS, then `InstanceStart`;
//! - **stop/start** are `PATCH /vm {Paused|Resumed}` (+ a clock sync on start);
//! - **snapshot** pauses, `PUT /snapshot/create` (Full: `vmstate` + `mem`), copies the root disk
//!   while paused (disk and memory must match), resumes;
//! - **restore** starts a fresh Firecracker in a new run directory holding a copy of the
//!   snapshot's disk, `PUT /snapshot/load` (left paused, with `vsock_override` and
//!   `network_overrides` for the new VM), resumes, resets the identity and re-pushes MMDS (its
//!   contents do not survive a snapshot);
//! - **agent**: Firecracker exposes the guest's vsock as `v.sock`; the host connects and sends
//!   `CONNECT 1024\n` (the agent listens on vsock port 1024, `--channel auto` finds it).
//!
//! **Restarts**: unlike qemu VMs, Firecracker VMs are *not* adopted by a restarted worker: `open`
//! kills every Firecracker process it finds under its root and reports their VMs gone (snapshots
//! are kept). Backups go through the agent as with qemu. **Not implemented**: the jailer, per-VM tap devices (MMDS needs one configured tap,
//! so it suits one VM per tap), and checksums of `mem` on restore (sizes are checked; exports are
//! checksummed end to end).
//!
//! On disk, under `root`: `vms/<vm_id>/meta.json`, `run/<instance>/{api.sock, v.sock, rootfs.ext4,
//! firecracker.log, firecracker.pid}`, `snapshots/<id>/{meta.json, vmstate, mem, rootfs.ext4}`,
//! `tmp/`, `lock`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use hearth_messages::ExecRequest;
use hearth_messages::agent::{AgentReply, AgentRequest, VSOCK_PORT};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::agent::{AgentCallError, AgentLink, Connector, ExecLimits};
use super::paths;
use super::registry::state_root::{
    StateRoot, blocking, read_json, remove_dir_logged, rename_noreplace, sha256_file, to_json,
    write_json_atomic,
};
use super::snapshot_archive as archive;
use super::vmm::{self, Failures, exec_request, new_identity, transfer_allowance, unexpected};
use super::{
    ExecOutcome, ExecSpec, OutputChunk, ProviderError, SnapshotId, SnapshotInfo, TemplateName,
    Tombstones, VmId, VmProvider, VmQuery, VmSpec, VmState, VmView, lifecycle, now_ms, tail_lossy,
};

mod api;

use api::ApiRequest;

const META_FORMAT: u32 = 1;
/// The snapshot files, in export order.
const SNAPSHOT_FILES: [&str; 3] = ["vmstate", "mem", "rootfs.ext4"];
const ROOTFS: &str = "rootfs.ext4";
const API_SOCKET: &str = "api.sock";
const VSOCK_SOCKET: &str = "v.sock";
const GUEST_CID: u32 = 3;
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
const BOOTSTRAP_OUTPUT_BYTES: usize = 64 * 1024;

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
    /// The `firecracker` binary (`FIRECRACKER_BIN`).
    pub firecracker: PathBuf,
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
            firecracker: PathBuf::from("firecracker"),
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
        firecracker: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        rootfs: impl Into<PathBuf>,
    ) -> Self {
        Self {
            root: root.into(),
            firecracker: firecracker.into(),
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

    fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }

    fn api_timeout(&self) -> Duration {
        Duration::from_millis(self.api_timeout_ms)
    }
}

/// What must match between a snapshot and its restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FcMachine {
    vcpus: u32,
    memory_mib: u32,
    kernel: PathBuf,
    kernel_sha256: String,
    firecracker_version: String,
}

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
    env: BTreeMap<String, String>,
    machine: FcMachine,
    instance: String,
    #[serde(default)]
    identity_pending: bool,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileDigest {
    sha256: String,
    bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    format: u32,
    snapshot_id: SnapshotId,
    source_vm: Option<VmId>,
    template: Option<TemplateName>,
    created_ms: u64,
    env: BTreeMap<String, String>,
    machine: FcMachine,
    /// Every file of [`SNAPSHOT_FILES`].
    files: BTreeMap<String, FileDigest>,
}

impl SnapshotMeta {
    fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: self.snapshot_id.clone(),
            source_vm: self.source_vm.clone(),
            template: self.template.clone(),
            created_ms: self.created_ms,
            size_bytes: self.files.values().map(|f| f.bytes).sum(),
        }
    }
}

/// One Firecracker process.
#[derive(Debug)]
struct Machine {
    instance: String,
    run: PathBuf,
    pid: i32,
    agent: AgentLink,
    ending: AtomicBool,
    dead: CancellationToken,
    exit: Mutex<Option<String>>,
    owner: Weak<Inner>,
}

impl Machine {
    async fn api(&self, request: ApiRequest, timeout: Duration) -> Result<(), ProviderError> {
        api::send(&self.run.join(API_SOCKET), &request, timeout)
            .await
            .map(drop)
            .map_err(|e| {
                if self.dead.is_cancelled() {
                    ProviderError::InvalidState(format!("vm failed: {}", self.exit_reason()))
                } else {
                    match e {
                        api::ApiError::Timeout { .. } => ProviderError::Timeout(e.to_string()),
                        e => ProviderError::internal("firecracker api", e),
                    }
                }
            })
    }

    fn exit_reason(&self) -> String {
        self.exit
            .lock()
            .clone()
            .unwrap_or_else(|| "firecracker exited".to_owned())
    }

    async fn kill(&self) {
        self.ending.store(true, Ordering::SeqCst);
        if !self.dead.is_cancelled() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.dead.cancelled()).await;
    }

    fn kill_now(&self) {
        self.ending.store(true, Ordering::SeqCst);
        if !self.dead.is_cancelled() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn agent_error(vm_id: &VmId, machine: &Machine, e: AgentCallError) -> ProviderError {
    vmm::agent_error(vm_id, e, &machine.dead, &|| machine.exit_reason()).await
}

#[derive(Debug)]
struct VmRecord {
    slot: Mutex<VmSlot>,
}

#[derive(Debug)]
struct VmSlot {
    dir: PathBuf,
    meta: VmMeta,
    machine: Arc<Machine>,
}

#[derive(Debug, Default)]
struct Index {
    vms: BTreeMap<VmId, Arc<VmRecord>>,
    creating: HashSet<VmId>,
    tombstones: Tombstones,
    failures: Failures,
    snapshots: BTreeMap<SnapshotId, SnapshotMeta>,
    snapshotting: HashSet<SnapshotId>,
}

impl Index {
    fn record(&self, vm_id: &VmId) -> Result<Arc<VmRecord>, ProviderError> {
        if let Some(record) = self.vms.get(vm_id) {
            return Ok(record.clone());
        }
        if self.tombstones.get(vm_id).is_some() {
            return Err(match self.failures.reasons.get(vm_id) {
                Some(reason) => ProviderError::InvalidState(format!("vm {vm_id} failed: {reason}")),
                None => ProviderError::vm_destroyed(vm_id),
            });
        }
        Err(ProviderError::vm_not_found(vm_id))
    }

    fn vm_taken(&self, vm_id: &VmId) -> bool {
        self.vms.contains_key(vm_id) || self.creating.contains(vm_id)
    }

    fn snapshot_taken(&self, snapshot_id: &SnapshotId) -> bool {
        self.snapshots.contains_key(snapshot_id) || self.snapshotting.contains(snapshot_id)
    }

    fn bury(&mut self, vm_id: &VmId, mut view: VmView, failure: Option<String>) {
        self.vms.remove(vm_id);
        view.last_activity_ms = now_ms();
        self.tombstones.insert(view);
        match failure {
            Some(reason) => self.failures.insert(vm_id.clone(), reason),
            None => self.failures.remove(vm_id),
        }
    }
}

#[derive(Debug)]
struct Inner {
    root: StateRoot,
    config: FirecrackerConfig,
    version: String,
    /// `run/`: one directory per VMM process.
    run_dir: PathBuf,
    index: Mutex<Index>,
}

/// The firecracker adapter.
#[derive(Debug)]
pub struct FirecrackerProvider {
    inner: Arc<Inner>,
}

impl Drop for FirecrackerProvider {
    fn drop(&mut self) {
        if !self.inner.config.kill_on_drop {
            return;
        }
        let records: Vec<Arc<VmRecord>> = self.inner.index.lock().vms.values().cloned().collect();
        for record in records {
            let slot = record.slot.lock();
            slot.machine.kill_now();
            remove_dir_logged(&slot.machine.run);
            remove_dir_logged(&slot.dir);
        }
    }
}

/// Kills a half-started Firecracker and removes its run directory unless disarmed.
struct LaunchGuard(Option<Arc<Machine>>);

impl Drop for LaunchGuard {
    fn drop(&mut self) {
        if let Some(machine) = self.0.take() {
            machine.kill_now();
            let run = machine.run.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move {
                        machine.kill().await;
                        let _ = tokio::task::spawn_blocking(move || remove_dir_logged(&run)).await;
                    });
                }
                Err(_) => remove_dir_logged(&run),
            }
        }
    }
}

struct IdReservation(Arc<Inner>, Option<VmId>);

impl Drop for IdReservation {
    fn drop(&mut self) {
        if let Some(vm_id) = self.1.take() {
            self.0.index.lock().creating.remove(&vm_id);
        }
    }
}

struct SnapshotGuard(Arc<Inner>, SnapshotId, PathBuf);

impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        self.0.index.lock().snapshotting.remove(&self.1);
        let staging = std::mem::take(&mut self.2);
        if !staging.as_os_str().is_empty() {
            remove_dir_logged(&staging);
        }
    }
}

fn firecracker_version(bin: &Path) -> Result<String, ProviderError> {
    let output = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| ProviderError::Unavailable(format!("cannot run {}: {e}", bin.display())))?;
    if !output.status.success() {
        return Err(ProviderError::Unavailable(format!(
            "{} --version fails: {}",
            bin.display(),
            tail_lossy(&output.stderr, 300)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

impl FirecrackerProvider {
    /// Opens the state under `config.root`: kills Firecracker processes left by a previous run
    /// (their VMs are reported gone), keeps snapshots. `Unavailable` without a runnable
    /// Firecracker or `/dev/kvm`.
    pub fn open(config: FirecrackerConfig) -> Result<Self, ProviderError> {
        let version = firecracker_version(&config.firecracker)?;
        if !Path::new("/dev/kvm").exists() {
            return Err(ProviderError::Unavailable(
                "firecracker needs /dev/kvm".into(),
            ));
        }
        let root = StateRoot::open(&config.root, &["run"])?;
        let inner = Inner {
            run_dir: root.dir("run"),
            root,
            config,
            version,
            index: Mutex::new(Index::default()),
        };
        inner.reconcile()?;
        info!(version = %inner.version, "firecracker provider opened");
        Ok(Self {
            inner: Arc::new(inner),
        })
    }
}

impl Inner {
    fn reconcile(&self) -> Result<(), ProviderError> {
        self.root.empty_tmp(remove_dir_logged)?;
        for entry in StateRoot::list(self.root.vms_dir())? {
            warn!(vm = %entry.file_name().to_string_lossy(), "vm lost: firecracker vms do not survive a worker restart");
            remove_dir_logged(&entry.path());
        }
        for entry in StateRoot::list(&self.run_dir)? {
            let run = entry.path();
            let instance = entry.file_name().to_string_lossy().into_owned();
            let pid: Option<i32> = std::fs::read_to_string(run.join("firecracker.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if let Some(pid) = pid.filter(|&pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&instance))
            }) {
                info!(pid, "killing a firecracker process left by a previous run");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            remove_dir_logged(&run);
        }
        let mut index = self.index.lock();
        for entry in StateRoot::list(self.root.snapshots_dir())? {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| SnapshotId::new(n).ok())
            else {
                continue;
            };
            match read_json::<SnapshotMeta>(&entry.path().join("meta.json")) {
                Ok(meta) => {
                    index.snapshots.insert(
                        id.clone(),
                        SnapshotMeta {
                            snapshot_id: id,
                            ..meta
                        },
                    );
                }
                Err(e) => warn!(snapshot_id = %id, error = %e, "ignoring unreadable snapshot"),
            }
        }
        Ok(())
    }

    fn snapshot_dir(&self, id: &SnapshotId) -> PathBuf {
        self.root.snapshot_dir(id)
    }

    fn record(&self, vm_id: &VmId) -> Result<Arc<VmRecord>, ProviderError> {
        self.index.lock().record(vm_id)
    }

    fn running(&self, vm_id: &VmId) -> Result<(Arc<VmRecord>, Arc<Machine>), ProviderError> {
        let record = self.record(vm_id)?;
        let machine = {
            let mut slot = record.slot.lock();
            lifecycle::require_running(vm_id, slot.meta.state)?;
            slot.meta.last_activity_ms = now_ms();
            slot.machine.clone()
        };
        Ok((record, machine))
    }

    fn agent_deadline(&self) -> Instant {
        Instant::now() + self.config.agent_timeout()
    }

    fn exec_limits(&self) -> ExecLimits {
        ExecLimits {
            handshake: self.config.agent_timeout(),
            grace: Duration::from_millis(self.config.exec_grace_ms),
        }
    }

    /// The VMM process died on its own.
    fn machine_died(self: &Arc<Self>, machine: &Arc<Machine>) {
        let reason = machine.exit_reason();
        let found = {
            let mut index = self.index.lock();
            let found = index.vms.iter().find_map(|(id, record)| {
                let slot = record.slot.lock();
                Arc::ptr_eq(&slot.machine, machine)
                    .then(|| (id.clone(), slot.meta.view(), slot.dir.clone()))
            });
            if let Some((vm_id, view, _)) = &found {
                index.bury(vm_id, view.clone(), Some(reason.clone()));
            }
            found
        };
        if let Some((vm_id, _, dir)) = found {
            warn!(%vm_id, reason, "vm failed: its firecracker process is gone");
            remove_dir_logged(&dir);
        }
        remove_dir_logged(&machine.run);
    }

    /// Starts a Firecracker process in a new run directory holding `rootfs` (copied), and waits for
    /// its API socket.
    async fn launch(self: &Arc<Self>, rootfs: &Path) -> Result<LaunchGuard, ProviderError> {
        let instance = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let run = self.run_dir.join(&instance);
        let log = {
            let (run, rootfs) = (run.clone(), rootfs.to_path_buf());
            blocking(move || {
                std::fs::create_dir(&run)
                    .map_err(|e| ProviderError::io("cannot create the run directory", e))?;
                std::fs::copy(&rootfs, run.join(ROOTFS))
                    .map_err(|e| ProviderError::io("cannot copy the root filesystem", e))?;
                std::fs::File::create(run.join("firecracker.log"))
                    .map_err(|e| ProviderError::io("cannot create the log", e))
            })
            .await?
        };
        let log_err = log
            .try_clone()
            .map_err(|e| ProviderError::io("cannot open the log", e))?;
        let spawned = tokio::process::Command::new(&self.config.firecracker)
            .args(["--api-sock", API_SOCKET, "--id", &instance])
            .current_dir(&run)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                remove_dir_logged(&run);
                return Err(ProviderError::Unavailable(format!(
                    "cannot start {}: {e}",
                    self.config.firecracker.display()
                )));
            }
        };
        let pid = child.id().map_or(0, |p| p as i32);
        let _ = std::fs::write(run.join("firecracker.pid"), pid.to_string());
        let machine = Arc::new(Machine {
            agent: AgentLink::new(
                Connector::FirecrackerVsock {
                    uds: run.join(VSOCK_SOCKET),
                    port: self.config.vsock_port,
                },
                None,
            ),
            instance,
            run,
            pid,
            ending: AtomicBool::new(false),
            dead: CancellationToken::new(),
            exit: Mutex::new(None),
            owner: Arc::downgrade(self),
        });
        {
            let machine = machine.clone();
            tokio::spawn(async move {
                let reason = match child.wait().await {
                    Ok(status) => match std::os::unix::process::ExitStatusExt::signal(&status) {
                        Some(signal) => format!("firecracker was killed by signal {signal}"),
                        None => format!("firecracker exited with {status}"),
                    },
                    Err(e) => format!("firecracker could not be waited for: {e}"),
                };
                machine.exit.lock().get_or_insert(reason);
                machine.dead.cancel();
                if !machine.ending.load(Ordering::SeqCst)
                    && let Some(inner) = machine.owner.upgrade()
                {
                    inner.machine_died(&machine);
                }
            });
        }
        let guard = LaunchGuard(Some(machine.clone()));
        let deadline = Instant::now() + self.config.api_timeout();
        while !machine.run.join(API_SOCKET).exists() {
            if machine.dead.is_cancelled() || Instant::now() >= deadline {
                return Err(ProviderError::Unavailable(format!(
                    "firecracker did not start: {}",
                    std::fs::read(machine.run.join("firecracker.log"))
                        .map(|b| tail_lossy(&b, 600))
                        .unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(guard)
    }

    async fn reset_identity(
        &self,
        vm_id: &VmId,
        machine: &Machine,
        env: &BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<(), ProviderError> {
        let mut full_env = self.config.env.clone();
        full_env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let identity = new_identity(vm_id, full_env)?;
        let mmds = json!({"hearth": {
            "vm_id": vm_id.as_str(),
            "hostname": identity.hostname,
            "session_id": identity.session_id,
        }});
        match machine
            .agent
            .call(
                AgentRequest::ResetIdentity(identity),
                "an identity reset",
                deadline,
            )
            .await
        {
            Ok(AgentReply::IdentitySet { .. }) => {}
            Ok(other) => return Err(unexpected(vm_id, &other)),
            Err(e) => return Err(agent_error(vm_id, machine, e).await),
        }
        if self.config.mmds.is_some() {
            machine
                .api(ApiRequest::mmds_put(mmds), self.config.api_timeout())
                .await?;
        }
        Ok(())
    }

    async fn sync_clock(&self, vm_id: &VmId, machine: &Machine) {
        let request = AgentRequest::SetClock { now_ms: now_ms() };
        if let Err(e) = machine
            .agent
            .call(request, "a clock sync", self.agent_deadline())
            .await
        {
            warn!(%vm_id, error = %e, "cannot set the guest clock");
        }
    }

    async fn create(
        self: &Arc<Self>,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        spec.validate()?;
        let snapshot = {
            let mut index = self.index.lock();
            let snapshot = match &spec.restore_from {
                Some(id) => Some(
                    index
                        .snapshots
                        .get(id)
                        .cloned()
                        .ok_or_else(|| ProviderError::snapshot_not_found(id))?,
                ),
                None => None,
            };
            if index.vm_taken(vm_id) {
                return Err(ProviderError::vm_exists(vm_id));
            }
            index.creating.insert(vm_id.clone());
            snapshot
        };
        let mut reservation = IdReservation(self.clone(), Some(vm_id.clone()));
        let mut env = snapshot.as_ref().map(|s| s.env.clone()).unwrap_or_default();
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let api_timeout = self.config.api_timeout();
        let (guard, machine_spec) = match &snapshot {
            Some(snapshot) => {
                if snapshot.machine.firecracker_version != self.version {
                    return Err(ProviderError::Unavailable(format!(
                        "snapshot {} was taken with {}; this worker runs {}",
                        snapshot.snapshot_id, snapshot.machine.firecracker_version, self.version
                    )));
                }
                let dir = self.snapshot_dir(&snapshot.snapshot_id);
                for (name, digest) in &snapshot.files {
                    let size = std::fs::metadata(dir.join(name)).map(|m| m.len()).ok();
                    if size != Some(digest.bytes) {
                        return Err(ProviderError::InvalidArgument(format!(
                            "snapshot {} cannot be restored: its {name} is missing or the wrong size",
                            snapshot.snapshot_id
                        )));
                    }
                }
                let guard = self.launch(&dir.join(ROOTFS)).await?;
                let machine = guard.0.clone().expect("armed");
                let overrides: Vec<(String, String)> = self
                    .config
                    .mmds
                    .iter()
                    .map(|m| (m.iface_id.clone(), m.host_dev_name.clone()))
                    .collect();
                let load = ApiRequest::snapshot_load(
                    &dir.join("vmstate"),
                    &dir.join("mem"),
                    VSOCK_SOCKET,
                    &overrides,
                );
                let snapshot_timeout = Duration::from_millis(self.config.snapshot_timeout_ms);
                machine.api(load, snapshot_timeout).await.map_err(|e| {
                    ProviderError::InvalidArgument(format!(
                        "snapshot {} cannot be restored: {e}",
                        snapshot.snapshot_id
                    ))
                })?;
                machine
                    .api(ApiRequest::vm_state(false), api_timeout)
                    .await?;
                self.reset_identity(vm_id, &machine, &env, self.agent_deadline())
                    .await?;
                (guard, snapshot.machine.clone())
            }
            None => {
                let kernel_sha256 = {
                    let kernel = self.config.kernel.clone();
                    blocking(move || {
                        sha256_file(&kernel)
                            .map_err(|e| ProviderError::io("cannot read the kernel", e))
                    })
                    .await?
                };
                let machine_spec = FcMachine {
                    vcpus: spec.vcpus.clamp(1, 32),
                    memory_mib: spec.memory_mib.max(128),
                    kernel: self.config.kernel.clone(),
                    kernel_sha256,
                    firecracker_version: self.version.clone(),
                };
                let guard = self.launch(&self.config.rootfs).await?;
                let machine = guard.0.clone().expect("armed");
                let mut requests = vec![
                    ApiRequest::machine_config(machine_spec.vcpus, machine_spec.memory_mib),
                    ApiRequest::boot_source(
                        &self.config.kernel,
                        &self.config.boot_args,
                        self.config.initrd.as_deref(),
                    ),
                    ApiRequest::root_drive(ROOTFS),
                    ApiRequest::vsock(GUEST_CID, VSOCK_SOCKET),
                ];
                if let Some(mmds) = &self.config.mmds {
                    requests.push(ApiRequest::network_interface(
                        &mmds.iface_id,
                        &mmds.host_dev_name,
                    ));
                    requests.push(ApiRequest::mmds_config(&mmds.iface_id));
                }
                requests.push(ApiRequest::instance_start());
                for request in requests {
                    machine.api(request, api_timeout).await?;
                }
                let deadline = Instant::now() + Duration::from_millis(self.config.boot_timeout_ms);
                self.reset_identity(vm_id, &machine, &env, deadline).await?;
                if let Some(argv) = &spec.bootstrap {
                    let mut req = ExecRequest::argv(argv.iter().cloned());
                    req.timeout_ms = Some(BOOTSTRAP_TIMEOUT.as_millis() as u64);
                    req.max_output_bytes = Some(BOOTSTRAP_OUTPUT_BYTES as u64);
                    let outcome = machine
                        .agent
                        .exec(req, BOOTSTRAP_OUTPUT_BYTES, None, self.exec_limits())
                        .await;
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(e) => return Err(agent_error(vm_id, &machine, e).await),
                    };
                    if !outcome.success() {
                        return Err(ProviderError::CommandFailed(format!(
                            "bootstrap of vm {vm_id} exited with code {}: {}",
                            outcome.exit_code,
                            tail_lossy(&outcome.stderr, 2000)
                        )));
                    }
                }
                (guard, machine_spec)
            }
        };
        let machine = guard.0.clone().expect("armed");
        let now = now_ms();
        let meta = VmMeta {
            format: META_FORMAT,
            vm_id: vm_id.clone(),
            state: VmState::Running,
            template: spec
                .template
                .clone()
                .or_else(|| snapshot.as_ref().and_then(|s| s.template.clone())),
            created_ms: now,
            last_activity_ms: now,
            stopped_ms: None,
            restored_from: spec.restore_from.clone(),
            env,
            machine: machine_spec,
            instance: machine.instance.clone(),
            identity_pending: false,
        };
        let dir = self.root.vm_dir(vm_id);
        {
            let (dir, meta) = (dir.clone(), meta.clone());
            blocking(move || {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir(&dir)
                    .map_err(|e| ProviderError::io("cannot create the vm directory", e))?;
                write_json_atomic(&dir.join("meta.json"), &meta)
            })
            .await?;
        }
        let mut guard = guard;
        guard.0 = None;
        let view = meta.view();
        {
            let mut index = self.index.lock();
            reservation.1 = None;
            index.creating.remove(vm_id);
            index.tombstones.remove(vm_id);
            index.failures.remove(vm_id);
            index.vms.insert(
                vm_id.clone(),
                Arc::new(VmRecord {
                    slot: Mutex::new(VmSlot {
                        dir,
                        meta,
                        machine: machine.clone(),
                    }),
                }),
            );
        }
        if machine.dead.is_cancelled() {
            self.machine_died(&machine);
        }
        info!(%vm_id, restore_from = ?spec.restore_from, "created vm");
        Ok(view)
    }

    /// Persists a slot's metadata.
    async fn save(&self, record: &VmRecord) -> Result<(), ProviderError> {
        let (meta, dir) = {
            let slot = record.slot.lock();
            (slot.meta.clone(), slot.dir.clone())
        };
        blocking(move || write_json_atomic(&dir.join("meta.json"), &meta)).await
    }
}

#[async_trait]
impl VmProvider for FirecrackerProvider {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn isolation(&self) -> hearth_messages::IsolationReport {
        super::vm_isolation()
    }

    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        self.inner.create(vm_id, spec).await
    }

    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let inner = &self.inner;
        let record = inner.record(vm_id)?;
        let (machine, pending, env) = {
            let slot = record.slot.lock();
            lifecycle::check_start(vm_id, slot.meta.state)?;
            (
                slot.machine.clone(),
                slot.meta.identity_pending,
                slot.meta.env.clone(),
            )
        };
        machine
            .api(ApiRequest::vm_state(false), inner.config.api_timeout())
            .await?;
        if pending {
            inner
                .reset_identity(vm_id, &machine, &env, inner.agent_deadline())
                .await?;
        } else {
            inner.sync_clock(vm_id, &machine).await;
        }
        {
            let mut slot = record.slot.lock();
            slot.meta.state = VmState::Running;
            slot.meta.stopped_ms = None;
            slot.meta.identity_pending = false;
            slot.meta.last_activity_ms = now_ms();
        }
        inner.save(&record).await?;
        Ok(record.slot.lock().meta.view())
    }

    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let inner = &self.inner;
        let record = inner.record(vm_id)?;
        let machine = {
            let slot = record.slot.lock();
            lifecycle::check_stop(vm_id, slot.meta.state)?;
            slot.machine.clone()
        };
        machine
            .api(ApiRequest::vm_state(true), inner.config.api_timeout())
            .await?;
        {
            let mut slot = record.slot.lock();
            let now = now_ms();
            slot.meta.state = VmState::Stopped;
            slot.meta.stopped_ms = Some(now);
            slot.meta.last_activity_ms = now;
        }
        inner.save(&record).await?;
        Ok(record.slot.lock().meta.view())
    }

    async fn snapshot_vm(
        &self,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotInfo, ProviderError> {
        let inner = self.inner.clone();
        let (machine, was_running, meta) = {
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
                machine: slot.meta.machine.clone(),
                files: BTreeMap::new(),
            };
            (
                slot.machine.clone(),
                slot.meta.state == VmState::Running,
                meta,
            )
        };
        let staging = inner.root.staging("snapshot");
        let mut guard = SnapshotGuard(inner.clone(), snapshot_id.clone(), staging.clone());
        std::fs::create_dir(&staging)
            .map_err(|e| ProviderError::io("cannot create staging directory", e))?;
        let api_timeout = inner.config.api_timeout();
        if was_running {
            machine.api(ApiRequest::vm_state(true), api_timeout).await?;
        }
        let saved = async {
            let create =
                ApiRequest::snapshot_create(&staging.join("vmstate"), &staging.join("mem"));
            machine
                .api(
                    create,
                    Duration::from_millis(inner.config.snapshot_timeout_ms),
                )
                .await?;
            // The disk, copied while the guest is paused, so that it matches the memory.
            let (from, to) = (machine.run.join(ROOTFS), staging.join(ROOTFS));
            blocking(move || {
                std::fs::copy(&from, &to)
                    .map(drop)
                    .map_err(|e| ProviderError::io("cannot copy the root disk", e))
            })
            .await
        }
        .await;
        if was_running {
            match machine.api(ApiRequest::vm_state(false), api_timeout).await {
                Ok(()) => inner.sync_clock(vm_id, &machine).await,
                Err(e) => warn!(%vm_id, error = %e, "cannot resume the vm after its snapshot"),
            }
        }
        saved?;
        let meta = {
            let inner = inner.clone();
            let staging = staging.clone();
            blocking(move || {
                let mut files = BTreeMap::new();
                for name in SNAPSHOT_FILES {
                    let path = staging.join(name);
                    let bytes = std::fs::metadata(&path)
                        .map_err(|e| ProviderError::io(format!("cannot inspect {name}"), e))?
                        .len();
                    let sha256 = sha256_file(&path)
                        .map_err(|e| ProviderError::io(format!("cannot read {name}"), e))?;
                    files.insert(name.to_owned(), FileDigest { sha256, bytes });
                }
                let meta = SnapshotMeta { files, ..meta };
                write_json_atomic(&staging.join("meta.json"), &meta)?;
                rename_noreplace(&staging, &inner.snapshot_dir(&meta.snapshot_id))
                    .map_err(|e| ProviderError::io("cannot publish snapshot", e))?;
                Ok(meta)
            })
            .await?
        };
        guard.2 = PathBuf::new();
        let info = meta.info();
        inner
            .index
            .lock()
            .snapshots
            .insert(snapshot_id.clone(), meta);
        drop(guard);
        Ok(info)
    }

    async fn destroy_vm(&self, vm_id: &VmId) -> Result<(), ProviderError> {
        let (machine, dir) = {
            let mut index = self.inner.index.lock();
            let Some(record) = index.vms.get(vm_id).cloned() else {
                if index.tombstones.get(vm_id).is_some() {
                    return Ok(());
                }
                return Err(ProviderError::vm_not_found(vm_id));
            };
            let mut slot = record.slot.lock();
            slot.meta.state = VmState::Destroyed;
            slot.machine.ending.store(true, Ordering::SeqCst);
            let view = slot.meta.view();
            let found = (slot.machine.clone(), slot.dir.clone());
            drop(slot);
            index.bury(vm_id, view, None);
            found
        };
        machine.kill().await;
        let run = machine.run.clone();
        blocking(move || {
            remove_dir_logged(&dir);
            remove_dir_logged(&run);
            Ok(())
        })
        .await?;
        info!(%vm_id, "destroyed vm");
        Ok(())
    }

    async fn rename_vm(&self, old: &VmId, new: &VmId) -> Result<VmView, ProviderError> {
        let inner = self.inner.clone();
        let record = {
            let mut index = inner.index.lock();
            let record = index.record(old)?;
            if index.vm_taken(new) {
                return Err(ProviderError::vm_exists(new));
            }
            index.creating.insert(new.clone());
            record
        };
        let _reservation = IdReservation(inner.clone(), Some(new.clone()));
        let (machine, running, env) = {
            let slot = record.slot.lock();
            (
                slot.machine.clone(),
                slot.meta.state == VmState::Running,
                slot.meta.env.clone(),
            )
        };
        if running {
            inner
                .reset_identity(new, &machine, &env, inner.agent_deadline())
                .await?;
        }
        {
            let mut index = inner.index.lock();
            let mut slot = record.slot.lock();
            if slot.meta.state == VmState::Destroyed || !index.vms.contains_key(old) {
                return Err(ProviderError::vm_destroyed(old));
            }
            let new_dir = inner.root.vm_dir(new);
            rename_noreplace(&slot.dir, &new_dir)
                .map_err(|e| ProviderError::io(format!("cannot rename vm {old} to {new}"), e))?;
            slot.dir = new_dir;
            slot.meta.vm_id = new.clone();
            slot.meta.last_activity_ms = now_ms();
            slot.meta.identity_pending = !running;
            index.vms.remove(old);
            index.creating.remove(new);
            index.tombstones.remove(new);
            index.failures.remove(new);
            index.vms.insert(new.clone(), record.clone());
        }
        if let Err(e) = inner.save(&record).await {
            warn!(vm_id = %new, error = %e, "cannot rewrite meta.json after rename");
        }
        Ok(record.slot.lock().meta.view())
    }

    async fn exec(
        &self,
        vm_id: &VmId,
        spec: ExecSpec,
        chunks: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutcome, ProviderError> {
        spec.validate()?;
        paths::relative_path("cwd", spec.cwd.as_deref().unwrap_or(""))?;
        let (record, machine) = self.inner.running(vm_id)?;
        let result = machine
            .agent
            .exec(
                exec_request(&spec),
                spec.max_output_bytes,
                chunks,
                self.inner.exec_limits(),
            )
            .await;
        record.slot.lock().meta.last_activity_ms = now_ms();
        match result {
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(agent_error(vm_id, &machine, e).await),
        }
    }

    async fn put_file(
        &self,
        vm_id: &VmId,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ProviderError> {
        paths::file_path(path)?;
        let (record, machine) = self.inner.running(vm_id)?;
        let deadline = self.inner.agent_deadline() + transfer_allowance(data.len() as u64);
        let result = machine.agent.put_file(path, data, mode, deadline).await;
        record.slot.lock().meta.last_activity_ms = now_ms();
        match result {
            Ok(size) => Ok(size),
            Err(e) => Err(agent_error(vm_id, &machine, e).await),
        }
    }

    async fn get_file(
        &self,
        vm_id: &VmId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ProviderError> {
        paths::file_path(path)?;
        let (record, machine) = self.inner.running(vm_id)?;
        let deadline = self.inner.agent_deadline() + transfer_allowance(max_bytes);
        let result = machine.agent.get_file(path, max_bytes, deadline).await;
        record.slot.lock().meta.last_activity_ms = now_ms();
        match result {
            Ok(data) => Ok(data),
            Err(e) => Err(agent_error(vm_id, &machine, e).await),
        }
    }

    async fn backup_vm(&self, vm_id: &VmId, dest_dir: &Path) -> Result<PathBuf, ProviderError> {
        let inner = &self.inner;
        let record = inner.record(vm_id)?;
        let (machine, stopped) = {
            let slot = record.slot.lock();
            (slot.machine.clone(), slot.meta.state == VmState::Stopped)
        };
        let api_timeout = inner.config.api_timeout();
        if stopped {
            // The agent archives the volume, so a stopped VM runs for the length of the backup.
            machine
                .api(ApiRequest::vm_state(false), api_timeout)
                .await?;
        }
        let level = inner.config.snapshot_compression_level;
        let result =
            vmm::backup_via_agent(vm_id, &machine.agent, inner.exec_limits(), dest_dir, level)
                .await;
        if stopped && let Err(e) = machine.api(ApiRequest::vm_state(true), api_timeout).await {
            warn!(%vm_id, error = %e, "cannot pause the vm again after its backup");
        }
        match result {
            Err(vmm::BackupError::Agent(e)) => Err(agent_error(vm_id, &machine, e).await),
            Err(vmm::BackupError::Provider(e)) => Err(e),
            Ok(path) => Ok(path),
        }
    }

    async fn export_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        let inner = &self.inner;
        let meta = inner
            .index
            .lock()
            .snapshots
            .get(snapshot_id)
            .cloned()
            .ok_or_else(|| ProviderError::snapshot_not_found(snapshot_id))?;
        let meta_bytes = to_json(&meta)?;
        let dir = inner.snapshot_dir(snapshot_id);
        let staging = inner.root.staging("export");
        let level = inner.config.snapshot_compression_level;
        {
            let (dir, staging) = (dir.clone(), staging.clone());
            blocking(move || {
                std::fs::create_dir(&staging)
                    .map_err(|e| ProviderError::io("cannot create staging directory", e))?;
                for name in SNAPSHOT_FILES {
                    archive::compress(&dir.join(name), &staging.join(format!("{name}.zst")), level)
                        .map_err(|e| ProviderError::io(format!("cannot compress {name}"), e))?;
                }
                Ok(())
            })
            .await?;
        }
        let names: Vec<(String, PathBuf)> = SNAPSHOT_FILES
            .iter()
            .map(|n| (format!("{n}.zst"), staging.join(format!("{n}.zst"))))
            .collect();
        let entries: Vec<(&str, &Path)> = names
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_path()))
            .collect();
        let written = archive::write_export(&meta_bytes, &entries, out).await;
        remove_dir_logged(&staging);
        written.map_err(|e| ProviderError::io(format!("cannot export snapshot {snapshot_id}"), e))
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
        let mut guard = SnapshotGuard(inner.clone(), snapshot_id.clone(), staging.clone());
        tokio::fs::create_dir(&staging)
            .await
            .map_err(|e| ProviderError::io("cannot create staging directory", e))?;
        let names: Vec<String> = SNAPSHOT_FILES.iter().map(|n| format!("{n}.zst")).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let meta_bytes = archive::read_export(input, &name_refs, &staging).await?;
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
        let meta = {
            let inner = inner.clone();
            let staging = staging.clone();
            blocking(move || {
                for name in SNAPSHOT_FILES {
                    let zst = staging.join(format!("{name}.zst"));
                    let (sha256, bytes) = archive::decompress(&zst, &staging.join(name))
                        .map_err(ProviderError::corrupt_snapshot)?;
                    if meta.files.get(name) != Some(&FileDigest { sha256, bytes }) {
                        return Err(ProviderError::corrupt_snapshot(format!(
                            "{name} does not match its checksum"
                        )));
                    }
                    let _ = std::fs::remove_file(&zst);
                }
                write_json_atomic(&staging.join("meta.json"), &meta)?;
                rename_noreplace(&staging, &inner.snapshot_dir(&meta.snapshot_id))
                    .map_err(|e| ProviderError::io("cannot publish snapshot", e))?;
                Ok(meta)
            })
            .await?
        };
        guard.2 = PathBuf::new();
        let info = meta.info();
        inner
            .index
            .lock()
            .snapshots
            .insert(snapshot_id.clone(), meta);
        drop(guard);
        Ok(info)
    }

    async fn delete_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), ProviderError> {
        let inner = self.inner.clone();
        let snapshot_id = snapshot_id.clone();
        blocking(move || {
            let trash = inner.root.staging("delete");
            {
                let mut index = inner.index.lock();
                if !index.snapshots.contains_key(&snapshot_id) {
                    return Err(ProviderError::snapshot_not_found(&snapshot_id));
                }
                std::fs::rename(inner.snapshot_dir(&snapshot_id), &trash)
                    .map_err(|e| ProviderError::io("cannot remove snapshot", e))?;
                index.snapshots.remove(&snapshot_id);
            }
            remove_dir_logged(&trash);
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl VmQuery for FirecrackerProvider {
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
                .filter(|s| s.source_vm.as_ref() == Some(vm_id))
                .map(|s| s.snapshot_id.clone())
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
            .map(SnapshotMeta::info))
    }

    async fn list_all_snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError> {
        Ok(self
            .inner
            .index
            .lock()
            .snapshots
            .values()
            .map(SnapshotMeta::info)
            .collect())
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
    fn from_env_says_what_is_missing() {
        // These tests never set the variables; on a host that does, there is nothing to check.
        if std::env::var_os("FIRECRACKER_BIN").is_none() {
            let err = FirecrackerConfig::from_env("/tmp/x").unwrap_err();
            assert!(err.contains("FIRECRACKER_BIN"), "{err}");
        }
    }

    #[test]
    fn snapshot_size_is_the_sum_of_its_files() {
        let meta = SnapshotMeta {
            format: META_FORMAT,
            snapshot_id: SnapshotId::new("s").unwrap(),
            source_vm: None,
            template: None,
            created_ms: 1,
            env: BTreeMap::new(),
            machine: FcMachine {
                vcpus: 1,
                memory_mib: 128,
                kernel: "/k".into(),
                kernel_sha256: String::new(),
                firecracker_version: "Firecracker v1.16.0".into(),
            },
            files: SNAPSHOT_FILES
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        FileDigest {
                            sha256: String::new(),
                            bytes: 10,
                        },
                    )
                })
                .collect(),
        };
        assert_eq!(meta.info().size_bytes, 30);
    }
}
