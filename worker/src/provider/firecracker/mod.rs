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
//!
//! Size: this file is the adapter's create, snapshot, restore and export sequences (Firecracker
//! API calls around the shared guest operations of `provider::guest`) and its reconcile; the
//! bookkeeping is in `provider::registry`, the configuration in `config.rs`, the API in
//! `api.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::agent::{AgentLink, Connector};
use super::guest::{
    self, AgentTiming, GuestHost, GuestMachine, GuestVm, LaunchGuard, VmmProcess, is_ours,
    log_tail, signal_kill,
};
use super::registry::state_root::{
    StateRoot, blocking, in_background, remove_dir_logged, sha256_file, to_json,
};
use super::registry::{self, Backend, Registered, Registry, SnapshotBackend, SnapshotMeta};
use super::snapshot_archive as archive;
use super::{
    ExecOutcome, ExecSpec, OutputChunk, ProviderError, SnapshotId, SnapshotInfo, VmId, VmProvider,
    VmSpec, VmState, VmView,
};

mod api;
mod config;

pub use config::{FirecrackerConfig, FirecrackerMmds};

use api::ApiRequest;

/// The snapshot files, in export order.
const SNAPSHOT_FILES: [&str; 3] = ["vmstate", "mem", "rootfs.ext4"];
const ROOTFS: &str = "rootfs.ext4";
const API_SOCKET: &str = "api.sock";
const VSOCK_SOCKET: &str = "v.sock";
const GUEST_CID: u32 = 3;
/// Most vCPUs of a Firecracker VM.
const MAX_VCPUS: u32 = 32;

/// What must match between a snapshot and its restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FcMachine {
    vcpus: u32,
    memory_mib: u32,
    kernel: PathBuf,
    kernel_sha256: String,
    firecracker_version: String,
}

/// The firecracker backend's part of the registry.
#[derive(Debug)]
pub(crate) struct Firecracker;

impl Backend for Firecracker {
    type Vm = GuestVm<FcMachine>;
    type Runtime = Arc<Machine>;
    type Snapshot = FcSnapshot;
}

type VmMeta = registry::VmMeta<GuestVm<FcMachine>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileDigest {
    sha256: String,
    bytes: u64,
}

/// What a firecracker snapshot's `meta.json` adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FcSnapshot {
    machine: FcMachine,
    /// Every file of [`SNAPSHOT_FILES`].
    files: BTreeMap<String, FileDigest>,
}

impl SnapshotBackend for FcSnapshot {
    fn size_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

/// One Firecracker process.
#[derive(Debug)]
pub(crate) struct Machine {
    vmm: VmmProcess,
    run: PathBuf,
    agent: AgentLink,
    owner: Weak<Inner>,
}

impl GuestMachine for Machine {
    fn agent(&self) -> &AgentLink {
        &self.agent
    }

    fn vmm(&self) -> &VmmProcess {
        &self.vmm
    }

    fn run_dir(&self) -> &Path {
        &self.run
    }
}

impl Machine {
    async fn api(&self, request: ApiRequest, timeout: Duration) -> Result<(), ProviderError> {
        api::send(&self.run.join(API_SOCKET), &request, timeout)
            .await
            .map(drop)
            .map_err(|e| {
                if self.vmm.dead.is_cancelled() {
                    ProviderError::InvalidState(format!("vm failed: {}", self.vmm.exit_reason()))
                } else {
                    match e {
                        api::ApiError::Timeout { .. } => ProviderError::Timeout(e.to_string()),
                        e => ProviderError::internal("firecracker api", e),
                    }
                }
            })
    }
}

#[derive(Debug)]
struct Inner {
    /// The VMs and snapshots, and the locked state root they live under.
    registry: Arc<Registry<Firecracker>>,
    config: FirecrackerConfig,
    version: String,
    /// `run/`: one directory per VMM process.
    run_dir: PathBuf,
    /// How long the guest's agent may take.
    timing: AgentTiming,
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
        for record in self.inner.registry.records() {
            let slot = record.slot.lock();
            slot.runtime.vmm.kill_now();
            remove_dir_logged(&slot.runtime.run);
            remove_dir_logged(&slot.dir);
        }
    }
}

impl FirecrackerProvider {
    /// Opens the state under `config.root`: kills Firecracker processes left by a previous run
    /// (their VMs are reported gone), keeps snapshots. `Unavailable` without a runnable
    /// Firecracker or `/dev/kvm`.
    pub fn open(config: FirecrackerConfig) -> Result<Self, ProviderError> {
        config.check(Path::new("/dev/kvm"), Path::new("/sys/module"))?;
        let version = super::probe_version(&config.binary)?;
        let root = StateRoot::open(&config.root, &["run"])?;
        let inner = Inner {
            run_dir: root.dir("run"),
            registry: Arc::new(Registry::new(root)),
            timing: AgentTiming::new(config.agent_timeout_ms, config.exec_grace_ms),
            config,
            version,
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
        let registry = &self.registry;
        registry.root().empty_tmp(remove_dir_logged)?;
        for entry in StateRoot::list(registry.root().vms_dir())? {
            warn!(vm = %entry.file_name().to_string_lossy(), "vm lost: firecracker vms do not survive a worker restart");
            remove_dir_logged(&entry.path());
        }
        for entry in StateRoot::list(&self.run_dir)? {
            let run = entry.path();
            let instance = entry.file_name().to_string_lossy().into_owned();
            let pid: Option<i32> = std::fs::read_to_string(run.join("firecracker.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if let Some(pid) = pid.filter(|&pid| is_ours(pid, &instance)) {
                info!(pid, "killing a firecracker process left by a previous run");
                signal_kill(pid);
            }
            remove_dir_logged(&run);
        }
        registry.load_snapshots(|dir, meta| {
            for (name, digest) in &meta.backend.files {
                match std::fs::metadata(dir.join(name)) {
                    Ok(m) if m.len() == digest.bytes => {}
                    _ => return Err(format!("its {name} is missing or the wrong size")),
                }
            }
            Ok(meta)
        })
    }

    fn snapshot_dir(&self, id: &SnapshotId) -> PathBuf {
        self.registry.root().snapshot_dir(id)
    }

    /// The VMM process died on its own.
    fn machine_died(self: &Arc<Self>, machine: &Arc<Machine>) {
        let reason = machine.vmm.exit_reason();
        let buried = self
            .registry
            .bury_failed(|slot| Arc::ptr_eq(&slot.runtime, machine), reason.clone());
        if let Some((vm_id, _)) = &buried {
            warn!(%vm_id, reason, "vm failed: its firecracker process is gone");
        }
        let dir = buried.map(|(_, dir)| dir);
        let run = machine.run.clone();
        in_background(move || {
            if let Some(dir) = dir {
                remove_dir_logged(&dir);
            }
            remove_dir_logged(&run);
        });
    }

    /// Starts a Firecracker process in a new run directory holding `rootfs` (copied), and waits for
    /// its API socket.
    async fn launch(
        self: &Arc<Self>,
        rootfs: &Path,
    ) -> Result<LaunchGuard<Machine>, ProviderError> {
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
        let mut command = tokio::process::Command::new(&self.config.binary);
        command
            .args(["--api-sock", API_SOCKET, "--id", &instance])
            .current_dir(&run);
        let vmm = match VmmProcess::spawn("firecracker", command, log, instance) {
            Ok(vmm) => vmm,
            Err(e) => {
                let dir = run.clone();
                in_background(move || remove_dir_logged(&dir));
                return Err(e);
            }
        };
        let pid = vmm.pid;
        {
            let pidfile = run.join("firecracker.pid");
            blocking(move || {
                std::fs::write(&pidfile, pid.to_string())
                    .map_err(|e| ProviderError::io("cannot write the pid file", e))
            })
            .await?;
        }
        let machine = Arc::new(Machine {
            agent: AgentLink::new(
                Connector::FirecrackerVsock {
                    uds: run.join(VSOCK_SOCKET),
                    port: self.config.vsock_port,
                },
                None,
            ),
            vmm,
            run,
            owner: Arc::downgrade(self),
        });
        let guard = LaunchGuard::new(machine.clone());
        {
            // Firecracker has no control connection to watch: its exit is its death.
            let machine = machine.clone();
            tokio::spawn(async move {
                machine.vmm.reaped.cancelled().await;
                machine.vmm.dead.cancel();
                if !machine.vmm.is_ending()
                    && let Some(inner) = machine.owner.upgrade()
                {
                    inner.machine_died(&machine);
                }
            });
        }
        let deadline = Instant::now() + self.config.api_timeout();
        while !machine.run.join(API_SOCKET).exists() {
            if machine.vmm.dead.is_cancelled() || Instant::now() >= deadline {
                return Err(ProviderError::Unavailable(format!(
                    "firecracker did not start: {}",
                    log_tail(&machine.run.join("firecracker.log"))
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(guard)
    }

    async fn create(
        self: &Arc<Self>,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        spec.validate()?;
        let (reservation, snapshot) = self
            .registry
            .reserve_vm(vm_id, spec.restore_from.as_ref())?;
        info!(%vm_id, restore_from = ?spec.restore_from, "creating vm");
        let env = registry::meta::inherited_env(spec, snapshot.as_ref());
        let api_timeout = self.config.api_timeout();
        let (guard, machine_spec) = match &snapshot {
            Some(snapshot) => {
                let machine_spec = &snapshot.backend.machine;
                if machine_spec.firecracker_version != self.version {
                    return Err(ProviderError::Unavailable(format!(
                        "snapshot {} was taken with {}; this worker runs {}",
                        snapshot.snapshot_id, machine_spec.firecracker_version, self.version
                    )));
                }
                let dir = self.snapshot_dir(&snapshot.snapshot_id);
                {
                    let (dir, files) = (dir.clone(), snapshot.backend.files.clone());
                    let snapshot_id = snapshot.snapshot_id.clone();
                    blocking(move || {
                        for (name, digest) in &files {
                            let size = std::fs::metadata(dir.join(name)).map(|m| m.len()).ok();
                            if size != Some(digest.bytes) {
                                return Err(ProviderError::InvalidArgument(format!(
                                    "snapshot {snapshot_id} cannot be restored: its {name} is missing or the wrong size"
                                )));
                            }
                        }
                        Ok(())
                    })
                    .await?;
                }
                let guard = self.launch(&dir.join(ROOTFS)).await?;
                let machine = guard.machine();
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
                self.reset_identity(vm_id, &machine, &env, self.timing.deadline())
                    .await?;
                (guard, machine_spec.clone())
            }
            None => {
                guest::check_machine_size(spec, MAX_VCPUS)?;
                let kernel_sha256 = {
                    let kernel = self.config.kernel.clone();
                    blocking(move || {
                        sha256_file(&kernel)
                            .map_err(|e| ProviderError::io("cannot read the kernel", e))
                    })
                    .await?
                };
                let machine_spec = FcMachine {
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    kernel: self.config.kernel.clone(),
                    kernel_sha256,
                    firecracker_version: self.version.clone(),
                };
                let guard = self.launch(&self.config.rootfs).await?;
                let machine = guard.machine();
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
                    guest::bootstrap(vm_id, &*machine, argv, self.timing.limits()).await?;
                }
                (guard, machine_spec)
            }
        };
        let machine = guard.machine();
        let backend = GuestVm {
            machine: machine_spec,
            instance: machine.vmm.instance.clone(),
            identity_pending: false,
            paused: None,
        };
        let meta = VmMeta::created(vm_id, spec, snapshot.as_ref(), backend);
        let view = meta.view();
        // Writing meta.json is the commit point.
        reservation.commit(meta, machine.clone()).await?;
        guard.disarm();
        if machine.vmm.dead.is_cancelled() {
            self.machine_died(&machine);
        }
        info!(%vm_id, restore_from = ?spec.restore_from, "created vm");
        Ok(view)
    }
}

#[async_trait]
impl GuestHost for Inner {
    type Spec = FcMachine;
    type Machine = Machine;
    type Backend = Firecracker;

    fn registry(&self) -> &Arc<Registry<Firecracker>> {
        &self.registry
    }

    fn timing(&self) -> AgentTiming {
        self.timing
    }

    fn compression_level(&self) -> i32 {
        self.config.snapshot_compression_level
    }

    async fn pause(&self, _vm_id: &VmId, machine: &Arc<Machine>) -> Result<(), ProviderError> {
        machine
            .api(ApiRequest::vm_state(true), self.config.api_timeout())
            .await
    }

    async fn resume(&self, _vm_id: &VmId, machine: &Arc<Machine>) -> Result<(), ProviderError> {
        machine
            .api(ApiRequest::vm_state(false), self.config.api_timeout())
            .await
    }

    /// Pushes a new identity into the guest (the provider's env under the VM's) and, with MMDS
    /// configured, the VM's name into MMDS (its contents do not survive a snapshot).
    async fn reset_identity(
        &self,
        vm_id: &VmId,
        machine: &Machine,
        env: &BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<(), ProviderError> {
        let mut full_env = self.config.env.clone();
        full_env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let identity = guest::reset_identity(vm_id, machine, full_env, deadline).await?;
        if self.config.mmds.is_some() {
            let mmds = json!({"hearth": {
                "vm_id": vm_id.as_str(),
                "hostname": identity.hostname,
                "session_id": identity.session_id,
            }});
            machine
                .api(ApiRequest::mmds_put(mmds), self.config.api_timeout())
                .await?;
        }
        Ok(())
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

    fn version(&self) -> Option<String> {
        Some(self.inner.version.clone())
    }

    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        self.inner.create(vm_id, spec).await
    }

    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        guest::start(&*self.inner, vm_id).await
    }

    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        guest::stop(&*self.inner, vm_id).await
    }

    async fn snapshot_vm(
        &self,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotInfo, ProviderError> {
        let inner = self.inner.clone();
        let (staging, record) = inner.registry.reserve_snapshot_of(vm_id, snapshot_id)?;
        let (machine, was_running, meta) = {
            let slot = record.slot.lock();
            let backend = FcSnapshot {
                machine: slot.meta.backend.machine.clone(),
                files: BTreeMap::new(),
            };
            (
                slot.runtime.clone(),
                slot.meta.state == VmState::Running,
                SnapshotMeta::of(snapshot_id, &slot.meta, backend),
            )
        };
        staging.make_dir().await?;
        let api_timeout = inner.config.api_timeout();
        if was_running {
            machine.api(ApiRequest::vm_state(true), api_timeout).await?;
        }
        let saved = async {
            let create = ApiRequest::snapshot_create(
                &staging.path().join("vmstate"),
                &staging.path().join("mem"),
            );
            machine
                .api(
                    create,
                    Duration::from_millis(inner.config.snapshot_timeout_ms),
                )
                .await?;
            // The disk, copied while the guest is paused, so that it matches the memory.
            let (from, to) = (machine.run.join(ROOTFS), staging.path().join(ROOTFS));
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
                Ok(()) => guest::sync_clock(vm_id, &*machine, inner.timing.deadline()).await,
                Err(e) => warn!(%vm_id, error = %e, "cannot resume the vm after its snapshot"),
            }
        }
        saved?;
        let files = {
            let staging = staging.path().to_path_buf();
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
                Ok(files)
            })
            .await?
        };
        let backend = FcSnapshot {
            files,
            ..meta.backend
        };
        staging.publish(SnapshotMeta { backend, ..meta }).await
    }

    async fn destroy_vm(&self, vm_id: &VmId) -> Result<(), ProviderError> {
        guest::destroy(&*self.inner, vm_id).await
    }

    async fn rename_vm(&self, old: &VmId, new: &VmId) -> Result<VmView, ProviderError> {
        guest::rename(&*self.inner, old, new).await
    }

    async fn exec(
        &self,
        vm_id: &VmId,
        spec: ExecSpec,
        chunks: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutcome, ProviderError> {
        let inner = &self.inner;
        guest::exec(&inner.registry, inner.timing, vm_id, spec, chunks).await
    }

    async fn put_file(
        &self,
        vm_id: &VmId,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<u64, ProviderError> {
        let inner = &self.inner;
        guest::put_file(&inner.registry, inner.timing, vm_id, path, data, mode).await
    }

    async fn get_file(
        &self,
        vm_id: &VmId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ProviderError> {
        let inner = &self.inner;
        guest::get_file(&inner.registry, inner.timing, vm_id, path, max_bytes).await
    }

    async fn backup_vm(&self, vm_id: &VmId, dest_dir: &Path) -> Result<PathBuf, ProviderError> {
        guest::backup_vm(&*self.inner, vm_id, dest_dir).await
    }

    async fn export_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        let inner = &self.inner;
        let meta = inner.registry.snapshot(snapshot_id)?;
        let meta_bytes = to_json(&meta)?;
        let dir = inner.snapshot_dir(snapshot_id);
        let staging = inner.registry.root().staging("export");
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
        in_background(move || remove_dir_logged(&staging));
        written.map_err(|e| ProviderError::io(format!("cannot export snapshot {snapshot_id}"), e))
    }

    async fn import_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<SnapshotInfo, ProviderError> {
        let staging = self.inner.registry.reserve_snapshot(snapshot_id)?;
        staging.make_dir().await?;
        let names: Vec<String> = SNAPSHOT_FILES.iter().map(|n| format!("{n}.zst")).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let meta_bytes = archive::read_export(input, &name_refs, staging.path()).await?;
        let meta: SnapshotMeta<FcSnapshot> =
            serde_json::from_slice(&meta_bytes).map_err(ProviderError::corrupt_snapshot)?;
        if meta.format != registry::META_FORMAT {
            return Err(ProviderError::corrupt_snapshot(format!(
                "unsupported format {}",
                meta.format
            )));
        }
        {
            let (path, files) = (staging.path().to_path_buf(), meta.backend.files.clone());
            blocking(move || {
                for name in SNAPSHOT_FILES {
                    let zst = path.join(format!("{name}.zst"));
                    let (sha256, bytes) = archive::decompress(&zst, &path.join(name))
                        .map_err(ProviderError::corrupt_snapshot)?;
                    if files.get(name) != Some(&FileDigest { sha256, bytes }) {
                        return Err(ProviderError::corrupt_snapshot(format!(
                            "{name} does not match its checksum"
                        )));
                    }
                    let _ = std::fs::remove_file(&zst);
                }
                Ok(())
            })
            .await?;
        }
        staging.publish(meta).await
    }

    async fn delete_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), ProviderError> {
        self.inner.registry.delete_snapshot(snapshot_id).await
    }

    async fn process(
        &self,
        vm_id: &VmId,
        call: crate::provider::ProcessCall,
        wait: Duration,
    ) -> Result<crate::provider::ProcessAnswer, ProviderError> {
        guest::process(&self.inner.registry, vm_id, call, wait).await
    }
}

impl Registered for FirecrackerProvider {
    type Backend = Firecracker;

    fn registry(&self) -> &Registry<Firecracker> {
        &self.inner.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_size_is_the_sum_of_its_files() {
        let meta = FcSnapshot {
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
        assert_eq!(meta.size_bytes(), 30);
    }
}
