//! The qemu adapter: every VM is a real Linux guest in its own QEMU process (`-M microvm`), driven
//! over QMP, with the Hearth guest agent inside reached over a virtio-serial port.
//!
//! - **create** cold-boots the guest image (a Debian kernel and a busybox initramfs whose init
//!   service is the agent, built by `deploy/images/build.sh`), waits for the agent, pushes the VM's
//!   identity and runs `bootstrap`;
//! - **snapshot** pauses the VM (QMP `stop`), migrates device and memory state to a file
//!   (`migrate exec:cat > FILE`, QEMU 7.2 has no `file:` URI) and resumes it;
//! - **restore** (`restore_from`) starts a new QEMU with `-S -incoming defer`, loads the state with
//!   `migrate-incoming`, checks the state's SHA-256, `cont`s, and resets the identity (host name =
//!   VM id, fresh machine id, host entropy into the kernel RNG, clock) before the VM is reported;
//! - **stop/start** are QMP `stop`/`cont` (the guest's memory stays; the clock is re-set on start);
//! - **rename** resets the identity in the guest and moves the index entry: memory is untouched;
//! - **destroy** kills QEMU and removes every file of the VM;
//! - **exec/files** go through the agent, every call under a deadline (a hung agent is `Timeout`,
//!   504, never a hang).
//!
//! On disk, under `root`:
//! ```text
//! vms/<vm_id>/meta.json        VmMeta: state, template, times, env, machine spec, QEMU instance
//! run/<instance>/              one QEMU process: qmp.sock, agent.sock, qemu.pid, console.log, qemu.log
//! snapshots/<id>/meta.json     SnapshotMeta: machine spec, QEMU version, state SHA-256 and size
//! snapshots/<id>/state         the raw migration stream
//! tmp/                         staging; emptied by `open`
//! lock                         flock held while open: one provider per root
//! ```
//! Sockets live under `run/<instance>` (short, and untouched by a rename) so the Unix socket path
//! limit holds for any VM id.
//!
//! **Restarts.** QEMU processes are not tied to the worker: they run in their own process group and
//! survive a worker crash or restart. `open` adopts every VM whose QEMU is still alive (pid file,
//! checked against `/proc/<pid>/cmdline`), reconnects QMP and the agent, and brings its run state
//! back in line with `meta.json`; a VM whose QEMU is gone is reported gone (its files removed), and
//! QEMU processes no VM owns are killed. So sessions survive a worker restart, and nothing is left
//! behind by one. [`QemuConfig::kill_on_drop`] (tests) kills every VM when the provider is dropped.
//!
//! **Failure.** A QEMU process that exits on its own (killed, crashed, guest panic) is noticed when
//! its QMP connection ends: the VM is removed and tombstoned with the reason, so an exec answers
//! 409 `vm … failed: …` and the VM disappears from heartbeats (the scheduler marks its session
//! `lost`, `vm_failed`).
//!
//! Known limits: a snapshot restores only on the same QEMU version, accelerator, CPU model, memory
//! size and guest image (checked, with a clear error); a process in the guest that seeded a
//! userspace PRNG before the snapshot keeps its state in every clone (the kernel RNG is reseeded);
//! backups go through the agent (`tar` in the guest) and are limited to 64 MiB.
//!
//! Size: this file is the adapter's create, snapshot, restore and export sequences (QMP
//! `stop`/`migrate`/`cont` around the shared guest operations of `provider::guest`) and its
//! reconcile; the bookkeeping is in `provider::registry`, start/stop/rename/backup in
//! `provider::guest::ops`, the process in `vm.rs`, state streams in `migration.rs`, the command
//! line in `machine.rs`. Split further, one sequence would be read across files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::guest::{
    self, AgentTiming, GuestHost, GuestVm, LaunchGuard, VmmProcess, is_ours, log_tail, signal_kill,
};
use super::registry::state_root::{
    StateRoot, blocking, in_background, read_json, remove_dir_logged, sha256_file, to_json,
};
use super::registry::{self, Backend, Registered, Registry, SnapshotBackend, SnapshotMeta};
use super::snapshot_archive as archive;
use super::{
    ExecOutcome, ExecSpec, OutputChunk, ProviderError, SnapshotId, SnapshotInfo, VmId, VmProvider,
    VmSpec, VmState, VmView,
};

mod config;
mod console;
mod hibernate;
mod machine;
mod migration;
mod qmp;
mod vm;

pub use config::QemuConfig;
pub use machine::Accel;
use machine::{DigestCache, MachineSpec, RunPaths};
use qmp::QmpError;
use vm::{Machine, read_pid};

/// The compressed state's name in an export stream.
const STATE_ENTRY: &str = "state.zst";
/// File names of a guest image directory.
pub const IMAGE_KERNEL: &str = "vmlinuz";
pub const IMAGE_INITRD: &str = "initrd.img";
/// How long a new or adopted VM's console socket may take to appear before its log is given up.
const CONSOLE_PATIENCE: Duration = Duration::from_secs(30);
/// Longest `root` path: socket paths (`<root>/run/<16>/agent.sock`) must fit `sun_path` (108).
const MAX_ROOT_LEN: usize = 72;
/// Most vCPUs of a VM (`-M microvm`).
const MAX_VCPUS: u32 = 64;

/// The qemu backend's part of the registry.
#[derive(Debug)]
pub(crate) struct Qemu;

impl Backend for Qemu {
    type Vm = GuestVm<MachineSpec>;
    type Runtime = Arc<Machine>;
    type Snapshot = QemuSnapshot;
}

type VmMeta = registry::VmMeta<GuestVm<MachineSpec>>;

/// What a qemu snapshot's `meta.json` adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QemuSnapshot {
    machine: MachineSpec,
    /// `qemu --version`: state only loads into the same build.
    qemu_version: String,
    state_sha256: String,
    state_bytes: u64,
}

impl SnapshotBackend for QemuSnapshot {
    fn size_bytes(&self) -> u64 {
        self.state_bytes
    }
}

#[derive(Debug)]
struct Inner {
    /// The VMs and snapshots, and the locked state root they live under.
    registry: Arc<Registry<Qemu>>,
    config: QemuConfig,
    accel: Accel,
    cpu: String,
    tsc_khz: Option<u32>,
    qemu_version: String,
    /// `run/`: one directory per VMM process.
    run_dir: PathBuf,
    digests: Arc<DigestCache>,
    /// How long the guest's agent may take.
    timing: AgentTiming,
}

/// The qemu adapter. Cheap to share behind an `Arc<dyn VmRuntime>`.
#[derive(Debug)]
pub struct QemuProvider {
    inner: Arc<Inner>,
}

impl Drop for QemuProvider {
    fn drop(&mut self) {
        for record in self.inner.registry.records() {
            let slot = record.slot.lock();
            if self.inner.config.kill_on_drop {
                slot.runtime.vmm.kill_now();
                remove_dir_logged(&slot.runtime.run.dir);
                remove_dir_logged(&slot.dir);
            } else {
                slot.runtime.detach();
            }
        }
    }
}

fn qmp_error(vm_id: &VmId, machine: &Machine, what: &str, e: QmpError) -> ProviderError {
    let vmm = &machine.vmm;
    if vmm.dead.is_cancelled() || matches!(e, QmpError::Closed) {
        return ProviderError::InvalidState(format!("vm {vm_id} failed: {}", vmm.exit_reason()));
    }
    match e {
        QmpError::Timeout(..) => ProviderError::Timeout(format!("vm {vm_id}: {what}: {e}")),
        e => ProviderError::internal(format!("vm {vm_id}: {what}"), e),
    }
}

impl QemuProvider {
    /// Opens (creating if needed) the state under `config.root` and reconciles it with the QEMU
    /// processes that are still running (see the module docs). Blocking, but must be called inside
    /// a tokio runtime: adopted VMs are reconnected by a background task. `Unavailable` if QEMU
    /// cannot run or the root is unusable.
    pub fn open(config: QemuConfig) -> Result<Self, ProviderError> {
        let qemu_version = super::probe_version(&config.qemu)?;
        let (accel, why) = machine::choose_accel(
            config.accel,
            Path::new("/sys/module"),
            Path::new("/dev/kvm"),
        );
        info!(accel = accel.as_str(), reason = %why, qemu = %qemu_version, "qemu provider accelerator");
        let cpu = config.cpu.clone().unwrap_or_else(|| {
            match accel {
                Accel::Kvm => "host",
                _ => "max",
            }
            .to_owned()
        });
        let tsc_khz = match accel {
            Accel::Kvm => None,
            _ => config.tsc_khz.or_else(machine::host_tsc_khz),
        };
        let root = StateRoot::open(&config.root, &["run"])?;
        let root_text = root.path().to_string_lossy();
        if root_text.len() > MAX_ROOT_LEN || root_text.contains([',', '\'', '\n']) {
            return Err(ProviderError::Unavailable(format!(
                "qemu root {root_text:?} must be at most {MAX_ROOT_LEN} bytes without ',' or '\\''"
            )));
        }
        let image = config.image.join(IMAGE_KERNEL);
        if !image.is_file() {
            warn!(image = %config.image.display(), "guest image not found: cold boots will fail until it is built (deploy/images/build.sh)");
        }
        let inner = Arc::new(Inner {
            run_dir: root.dir("run"),
            registry: Arc::new(Registry::new(root)),
            accel,
            cpu,
            tsc_khz,
            qemu_version,
            digests: Arc::new(DigestCache::default()),
            timing: AgentTiming::new(config.agent_timeout_ms, config.exec_grace_ms),
            config,
        });
        let adopted = Inner::reconcile(&inner)?;
        if !adopted.is_empty() {
            let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                ProviderError::Unavailable(
                    "the qemu provider must be opened inside a tokio runtime".into(),
                )
            })?;
            handle.spawn(Inner::adopt(inner.clone(), adopted));
        }
        Ok(Self { inner })
    }

    /// The configuration this provider was opened with.
    pub fn config(&self) -> &QemuConfig {
        &self.inner.config
    }

    /// The accelerator in use (after `auto` was resolved).
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }

    /// Process id of a VM's QEMU (for tests and diagnostics).
    pub fn qemu_pid(&self, vm_id: &VmId) -> Option<i32> {
        let record = self.inner.registry.record(vm_id).ok()?;
        let pid = record.runtime().vmm.pid;
        Some(pid)
    }

    /// Where a VM's QEMU keeps its sockets, pid file and logs (for tests and diagnostics).
    pub fn run_dir(&self, vm_id: &VmId) -> Option<PathBuf> {
        let record = self.inner.registry.record(vm_id).ok()?;
        let dir = record.runtime().run.dir.clone();
        Some(dir)
    }

    /// The path of a snapshot's raw state file (for tests and diagnostics).
    pub fn snapshot_state_path(&self, snapshot_id: &SnapshotId) -> PathBuf {
        self.inner.snapshot_dir(snapshot_id).join("state")
    }
}

impl Inner {
    fn snapshot_dir(&self, snapshot_id: &SnapshotId) -> PathBuf {
        self.registry.root().snapshot_dir(snapshot_id)
    }

    /// Rebuilds the index from disk and the live QEMU processes; returns the machines to adopt.
    fn reconcile(this: &Arc<Self>) -> Result<Vec<Arc<Machine>>, ProviderError> {
        let registry = &this.registry;
        registry.root().empty_tmp(remove_dir_logged)?;
        let mut adopted = Vec::new();
        let mut owned_runs = HashSet::new();
        for (vm_id, dir) in registry.vm_dirs()? {
            let meta: VmMeta = match read_json(&dir.join("meta.json")) {
                Ok(meta) => meta,
                Err(e) => {
                    info!(%vm_id, error = %e, "removing vm without readable metadata");
                    remove_dir_logged(&dir);
                    continue;
                }
            };
            if meta.state == VmState::Paused {
                // No QEMU: its state is on disk (a QEMU left running by a crash after the
                // pause committed is killed below, as no VM owns it).
                if !dir.join(guest::PAUSED_STATE).is_file() {
                    warn!(%vm_id, "paused vm lost while the provider was down: its state file is gone");
                    remove_dir_logged(&dir);
                    continue;
                }
                let machine = this.paused_machine(meta.backend.instance.clone());
                info!(%vm_id, "adopting paused vm");
                registry.adopt(vm_id, dir, meta, machine)?;
                continue;
            }
            let run = RunPaths {
                dir: this.run_dir.join(&meta.backend.instance),
            };
            let pid = read_pid(&run).filter(|&pid| is_ours(pid, &meta.backend.instance));
            let Some(pid) = pid.filter(|_| meta.state != VmState::Destroyed) else {
                warn!(%vm_id, "vm lost while the provider was down: its qemu is not running");
                remove_dir_logged(&dir);
                continue;
            };
            let instance = meta.backend.instance.clone();
            owned_runs.insert(instance.clone());
            let vmm = VmmProcess::adopted("qemu", instance, pid);
            let machine = Machine::new(vmm, run, Arc::downgrade(this));
            adopted.push(machine.clone());
            info!(%vm_id, pid, state = %meta.state, "adopting running vm");
            registry.adopt(vm_id, dir, meta, machine)?;
        }
        // QEMU processes (and run directories) no VM owns: half-created VMs, leftovers.
        for entry in StateRoot::list(&this.run_dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owned_runs.contains(&name) {
                continue;
            }
            let run = RunPaths { dir: entry.path() };
            if let Some(pid) = read_pid(&run).filter(|&pid| is_ours(pid, &name)) {
                info!(pid, "killing a qemu process no vm owns");
                signal_kill(pid);
            }
            remove_dir_logged(&run.dir);
        }
        registry.load_snapshots(|dir, meta| match std::fs::metadata(dir.join("state")) {
            Ok(m) if m.len() == meta.backend.state_bytes => Ok(meta),
            _ => Err("its state file is missing or the wrong size".to_owned()),
        })?;
        Ok(adopted)
    }

    /// Reconnects adopted VMs and puts their run state in line with their metadata; a VM whose
    /// QEMU does not answer is killed and reported failed.
    async fn adopt(this: Arc<Self>, machines: Vec<Arc<Machine>>) {
        for machine in machines {
            machine.start_console(&this.config);
            let deadline = Instant::now() + this.config.agent_timeout();
            let status = match machine.qmp(deadline).await {
                Ok(qmp) => qmp
                    .execute("query-status", json!({}), this.config.agent_timeout())
                    .await
                    .map(|s| s["status"].as_str().unwrap_or_default().to_owned()),
                Err(e) => Err(e),
            };
            let Some((vm_id, want)) = this.vm_of(&machine) else {
                continue;
            };
            match status {
                Ok(status) => {
                    let running = status == "running";
                    let fix = match (want, running) {
                        (VmState::Running, false) => Some("cont"),
                        (VmState::Stopped, true) => Some("stop"),
                        _ => None,
                    };
                    if let Some(command) = fix
                        && let Some(qmp) = machine.qmp.get()
                    {
                        info!(%vm_id, status, command, "adopted vm: bringing its run state in line");
                        let _ = qmp
                            .execute(command, json!({}), this.config.agent_timeout())
                            .await;
                    }
                    debug!(%vm_id, status, "adopted vm reconnected");
                }
                Err(e) => {
                    warn!(%vm_id, error = %e, "adopted vm does not answer on qmp: killing it");
                    machine
                        .vmm
                        .give_up(format!("qemu did not answer after a restart: {e}"));
                    machine.vmm.kill_now();
                    this.machine_died(&machine);
                }
            }
        }
    }

    /// The id and recorded state of the VM running on `machine`, if it is still indexed.
    fn vm_of(&self, machine: &Arc<Machine>) -> Option<(VmId, VmState)> {
        let (vm_id, record) = self
            .registry
            .find(|slot| Arc::ptr_eq(&slot.runtime, machine))?;
        let state = record.slot.lock().meta.state;
        Some((vm_id, state))
    }

    /// A VM's QEMU went away on its own: remove the VM, remember why, delete its files.
    fn machine_died(self: &Arc<Self>, machine: &Arc<Machine>) {
        let reason = machine.vmm.exit_reason();
        let buried = self
            .registry
            .bury_failed(|slot| Arc::ptr_eq(&slot.runtime, machine), reason.clone());
        let run_dir = machine.run.dir.clone();
        match &buried {
            Some((vm_id, _)) => warn!(%vm_id, reason, "vm failed: its qemu process is gone"),
            None => {
                debug!(instance = %machine.vmm.instance, "qemu exited for a vm no longer indexed")
            }
        }
        let dir = buried.map(|(_, dir)| dir);
        in_background(move || {
            if let Some(dir) = dir {
                remove_dir_logged(&dir);
            }
            remove_dir_logged(&run_dir);
        });
    }

    /// The kernel command line of new VMs.
    fn cmdline(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 quiet panic=-1 reboot=t");
        if let Some(khz) = self.tsc_khz {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if !self.config.extra_cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.config.extra_cmdline.trim());
        }
        cmdline
    }

    /// The kernel and initrd of a cold boot: `base` (an image directory) or the configured image.
    fn image_for(&self, base: Option<&Path>) -> Result<(PathBuf, PathBuf), ProviderError> {
        let dir = base.unwrap_or(&self.config.image);
        let kernel = dir.join(IMAGE_KERNEL);
        let initrd = dir.join(IMAGE_INITRD);
        if !kernel.is_file() || !initrd.is_file() {
            let message = format!(
                "guest image {} must hold {IMAGE_KERNEL} and {IMAGE_INITRD} (build one with deploy/images/build.sh)",
                dir.display()
            );
            return Err(match base {
                Some(_) => ProviderError::InvalidArgument(message),
                None => ProviderError::Unavailable(message),
            });
        }
        Ok((kernel, initrd))
    }

    /// Starts a QEMU process for `spec` and connects QMP. `incoming` leaves it paused, waiting for
    /// a migration stream.
    async fn launch(
        self: &Arc<Self>,
        spec: &MachineSpec,
        incoming: bool,
        deadline: Instant,
    ) -> Result<LaunchGuard<Machine>, ProviderError> {
        let instance = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let run = RunPaths {
            dir: self.run_dir.join(&instance),
        };
        let log = {
            let run = run.clone();
            blocking(move || {
                std::fs::create_dir(&run.dir)
                    .map_err(|e| ProviderError::io("cannot create the run directory", e))?;
                std::fs::File::create(run.log())
                    .map_err(|e| ProviderError::io("cannot create the qemu log", e))
            })
            .await?
        };
        let argv = machine::argv(spec, &run, incoming, self.config.console_log);
        let mut command = tokio::process::Command::new(&self.config.qemu);
        command.args(&argv);
        // A process group of its own: it outlives a worker restart (adopted by the next open).
        let vmm = match VmmProcess::spawn("qemu", command, log, instance) {
            Ok(vmm) => vmm,
            Err(e) => {
                let dir = run.dir.clone();
                in_background(move || remove_dir_logged(&dir));
                return Err(e);
            }
        };
        let machine = Machine::new(vmm, run, Arc::downgrade(self));
        machine.start_console(&self.config);
        let guard = LaunchGuard::new(machine.clone());
        let reaped = &machine.vmm.reaped;
        let qmp = tokio::select! {
            qmp = machine.qmp(deadline) => qmp.map(drop),
            // QEMU refused the command line: say why instead of waiting for the deadline.
            _ = reaped.cancelled() => Err(QmpError::Closed),
        };
        if let Err(e) = qmp {
            // Let the log be flushed by a process that just exited.
            let _ = tokio::time::timeout(Duration::from_millis(200), reaped.cancelled()).await;
            return Err(ProviderError::Unavailable(format!(
                "qemu did not start ({e}): {}",
                log_tail(&machine.run.log())
            )));
        }
        Ok(guard)
    }

    /// Creates a VM: cold boot or restore, identity, bootstrap; the VM is indexed on success and
    /// nothing is left on failure.
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
        let machine_spec = match &snapshot {
            Some(snapshot) => self.restore_spec(snapshot).await?,
            None => self.boot_spec(spec).await?,
        };
        let guard = match &snapshot {
            Some(snapshot) => {
                let guard = self
                    .launch(&machine_spec, true, self.timing.deadline())
                    .await?;
                let machine = guard.machine();
                self.load_state(vm_id, &machine, snapshot).await?;
                let qmp = machine
                    .qmp(self.timing.deadline())
                    .await
                    .map_err(|e| qmp_error(vm_id, &machine, "connecting", e))?;
                qmp.execute("cont", json!({}), self.config.agent_timeout())
                    .await
                    .map_err(|e| qmp_error(vm_id, &machine, "cont", e))?;
                self.reset_identity(vm_id, &machine, &env, self.timing.deadline())
                    .await?;
                guard
            }
            None => {
                let deadline = Instant::now() + Duration::from_millis(self.config.boot_timeout_ms);
                let guard = self.launch(&machine_spec, false, deadline).await?;
                let machine = guard.machine();
                self.reset_identity(vm_id, &machine, &env, deadline)
                    .await
                    .map_err(|e| match e {
                        ProviderError::Timeout(m) => ProviderError::Timeout(format!(
                            "{m} (cold boot; console: {})",
                            log_tail(&machine.run.console())
                        )),
                        e => e,
                    })?;
                if let Some(argv) = &spec.bootstrap {
                    guest::bootstrap(vm_id, &*machine, argv, self.timing.limits()).await?;
                }
                guard
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
            // Died between the last check and indexing: the watcher found nothing to bury.
            self.machine_died(&machine);
        }
        Ok(view)
    }

    async fn boot_spec(&self, spec: &VmSpec) -> Result<MachineSpec, ProviderError> {
        guest::check_machine_size(spec, MAX_VCPUS)?;
        let (kernel, initrd) = self.image_for(spec.base.as_deref())?;
        let (kernel_sha256, initrd_sha256) = {
            let (kernel, initrd) = (kernel.clone(), initrd.clone());
            let inner = self.digest_handle();
            blocking(move || Ok((inner.digest(&kernel)?, inner.digest(&initrd)?))).await?
        };
        Ok(MachineSpec {
            accel: self.accel,
            cpu: self.cpu.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel,
            initrd,
            kernel_sha256,
            initrd_sha256,
            cmdline: self.cmdline(),
        })
    }

    /// The machine a snapshot must be restored into, with its image files located and checked.
    async fn restore_spec(
        &self,
        snapshot: &SnapshotMeta<QemuSnapshot>,
    ) -> Result<MachineSpec, ProviderError> {
        self.machine_here(
            &snapshot.backend.machine,
            &snapshot.backend.qemu_version,
            &format!("snapshot {}", snapshot.snapshot_id),
        )
        .await
    }

    /// `recorded` (saved by `qemu_version`) as this worker can load it, with its image files
    /// located and checked; `Unavailable` when the state cannot load here.
    async fn machine_here(
        &self,
        recorded: &MachineSpec,
        qemu_version: &str,
        what: &str,
    ) -> Result<MachineSpec, ProviderError> {
        if qemu_version != self.qemu_version {
            return Err(ProviderError::Unavailable(format!(
                "{what} was taken with {qemu_version:?}; this worker runs {:?}",
                self.qemu_version
            )));
        }
        if recorded.accel != self.accel {
            return Err(ProviderError::Unavailable(format!(
                "{what} was taken under {}; this worker uses {}",
                recorded.accel.as_str(),
                self.accel.as_str()
            )));
        }
        let mut spec = recorded.clone();
        let inner = self.digest_handle();
        let recorded = spec.clone();
        let (kernel, initrd) = blocking(move || {
            Ok((
                inner.find_image_file(&recorded.kernel, &recorded.kernel_sha256, IMAGE_KERNEL)?,
                inner.find_image_file(&recorded.initrd, &recorded.initrd_sha256, IMAGE_INITRD)?,
            ))
        })
        .await?;
        spec.kernel = kernel;
        spec.initrd = initrd;
        Ok(spec)
    }

    /// A shareable handle for blocking work that needs the digest cache and configuration.
    fn digest_handle(&self) -> Arc<ImageFinder> {
        Arc::new(ImageFinder {
            image: self.config.image.clone(),
            digests: self.digests.clone(),
        })
    }
}

/// Digest lookups off the async threads.
#[derive(Debug)]
struct ImageFinder {
    image: PathBuf,
    digests: Arc<DigestCache>,
}

impl ImageFinder {
    fn digest(&self, path: &Path) -> Result<String, ProviderError> {
        self.digests.digest(path)
    }

    fn find_image_file(
        &self,
        recorded: &Path,
        sha256: &str,
        name: &str,
    ) -> Result<PathBuf, ProviderError> {
        for candidate in [recorded.to_path_buf(), self.image.join(name)] {
            if candidate.is_file() && self.digests.digest(&candidate)? == sha256 {
                return Ok(candidate);
            }
        }
        Err(ProviderError::Unavailable(format!(
            "the guest {name} this snapshot was taken with (sha256 {sha256}) is neither at {} nor in {}",
            recorded.display(),
            self.image.display()
        )))
    }
}

#[async_trait]
impl GuestHost for Inner {
    type Spec = MachineSpec;
    type Machine = Machine;
    type Backend = Qemu;

    fn registry(&self) -> &Arc<Registry<Qemu>> {
        &self.registry
    }

    fn timing(&self) -> AgentTiming {
        self.timing
    }

    fn compression_level(&self) -> i32 {
        self.config.snapshot_compression_level
    }

    async fn pause(&self, vm_id: &VmId, machine: &Arc<Machine>) -> Result<(), ProviderError> {
        self.qmp_command(vm_id, machine, "stop").await
    }

    async fn resume(&self, vm_id: &VmId, machine: &Arc<Machine>) -> Result<(), ProviderError> {
        self.qmp_command(vm_id, machine, "cont").await
    }

    /// Pushes a new identity into the guest (the provider's env under the VM's).
    async fn reset_identity(
        &self,
        vm_id: &VmId,
        machine: &Machine,
        env: &BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<(), ProviderError> {
        let mut full_env = self.config.env.clone();
        full_env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        guest::reset_identity(vm_id, machine, full_env, deadline)
            .await
            .map(drop)
    }
}

impl Inner {
    /// Runs a QMP command without arguments (`stop`, `cont`), connecting first if need be.
    async fn qmp_command(
        &self,
        vm_id: &VmId,
        machine: &Arc<Machine>,
        command: &'static str,
    ) -> Result<(), ProviderError> {
        let qmp = machine
            .qmp(self.timing.deadline())
            .await
            .map_err(|e| qmp_error(vm_id, machine, "connecting", e))?;
        qmp.execute(command, json!({}), self.config.agent_timeout())
            .await
            .map_err(|e| qmp_error(vm_id, machine, command, e))?;
        Ok(())
    }
}

#[async_trait]
impl VmProvider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn isolation(&self) -> hearth_messages::IsolationReport {
        super::vm_isolation()
    }

    fn version(&self) -> Option<String> {
        Some(self.inner.qemu_version.clone())
    }

    async fn create_vm_with_spec(
        &self,
        vm_id: &VmId,
        spec: &VmSpec,
    ) -> Result<VmView, ProviderError> {
        self.inner.create(vm_id, spec).await
    }

    async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        if self.inner.registry.record(vm_id)?.view().state == VmState::Paused {
            return self.inner.wake(vm_id).await;
        }
        guest::start(&*self.inner, vm_id).await
    }

    async fn stop_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        guest::stop(&*self.inner, vm_id).await
    }

    async fn pause_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        self.inner.hibernate(vm_id).await
    }

    fn paused_bytes(&self) -> u64 {
        self.inner.paused_bytes()
    }

    async fn snapshot_vm(
        &self,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotInfo, ProviderError> {
        let inner = self.inner.clone();
        if inner.registry.record(vm_id)?.view().state == VmState::Paused {
            return Err(ProviderError::InvalidState(format!(
                "vm {vm_id} is paused: resume it before a snapshot"
            )));
        }
        let (staging, record) = inner.registry.reserve_snapshot_of(vm_id, snapshot_id)?;
        let (machine, was_running, meta) = {
            let slot = record.slot.lock();
            let backend = QemuSnapshot {
                machine: slot.meta.backend.machine.clone(),
                qemu_version: inner.qemu_version.clone(),
                state_sha256: String::new(),
                state_bytes: 0,
            };
            (
                slot.runtime.clone(),
                slot.meta.state == VmState::Running,
                SnapshotMeta::of(snapshot_id, &slot.meta, backend),
            )
        };
        staging.make_dir().await?;
        info!(%vm_id, %snapshot_id, "snapshotting vm");
        let timeout = Duration::from_millis(inner.config.migrate_timeout_ms);
        let qmp = machine
            .qmp(inner.timing.deadline())
            .await
            .map_err(|e| qmp_error(vm_id, &machine, "connecting", e))?;
        if was_running {
            qmp.execute("stop", json!({}), inner.config.agent_timeout())
                .await
                .map_err(|e| qmp_error(vm_id, &machine, "stop", e))?;
        }
        let state = staging.path().join("state");
        let uri = format!("exec:cat > '{}'", state.display());
        let saved = async {
            qmp.execute("migrate", json!({ "uri": uri }), timeout)
                .await
                .map_err(|e| qmp_error(vm_id, &machine, "migrate", e))?;
            inner
                .wait_migration(vm_id, &machine, qmp, timeout)
                .await
                .map_err(|e| match e {
                    ProviderError::CommandFailed(desc) => {
                        ProviderError::internal(format!("vm {vm_id}: saving its state"), desc)
                    }
                    e => e,
                })
        }
        .await;
        if was_running {
            // Resume whatever happened: a failed snapshot must not leave the VM paused.
            let resumed = qmp
                .execute("cont", json!({}), inner.config.agent_timeout())
                .await;
            if let Err(e) = resumed {
                warn!(%vm_id, error = %e, "cannot resume the vm after its snapshot");
            } else {
                guest::sync_clock(vm_id, &*machine, inner.timing.deadline()).await;
            }
        }
        saved?;
        let backend = blocking(move || {
            let state_bytes = std::fs::metadata(&state)
                .map_err(|e| ProviderError::io("cannot inspect the saved state", e))?
                .len();
            let state_sha256 = sha256_file(&state)
                .map_err(|e| ProviderError::io("cannot read the saved state", e))?;
            Ok(QemuSnapshot {
                state_sha256,
                state_bytes,
                ..meta.backend
            })
        })
        .await?;
        let info = staging.publish(SnapshotMeta { backend, ..meta }).await?;
        info!(%vm_id, %snapshot_id, bytes = info.size_bytes, "snapshot taken");
        Ok(info)
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
        if self.inner.registry.record(vm_id)?.view().state != VmState::Paused {
            return guest::backup_vm(&*self.inner, vm_id, dest_dir).await;
        }
        // The agent archives the volume: a paused VM runs for the length of its backup.
        self.inner.wake(vm_id).await?;
        let result = guest::backup_vm(&*self.inner, vm_id, dest_dir).await;
        if let Err(e) = self.inner.hibernate(vm_id).await {
            warn!(%vm_id, error = %e, "cannot pause the vm again after its backup");
        }
        result
    }

    async fn export_paused(
        &self,
        vm_id: &VmId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        self.inner.export_paused(vm_id, out).await
    }

    async fn import_paused(
        &self,
        vm_id: &VmId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<VmView, ProviderError> {
        self.inner.import_paused(vm_id, input).await
    }

    async fn export_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<u64, ProviderError> {
        let inner = &self.inner;
        let meta = inner.registry.snapshot(snapshot_id)?;
        let meta_bytes = to_json(&meta)?;
        let state = inner.snapshot_dir(snapshot_id).join("state");
        let zst = inner.registry.root().staging("export");
        let level = inner.config.snapshot_compression_level;
        {
            let zst = zst.clone();
            blocking(move || {
                archive::compress(&state, &zst, level)
                    .map_err(|e| ProviderError::io("cannot compress snapshot state", e))
            })
            .await?;
        }
        let written = archive::write_export(&meta_bytes, &[(STATE_ENTRY, &zst)], out).await;
        let _ = tokio::fs::remove_file(&zst).await;
        written.map_err(|e| ProviderError::io(format!("cannot export snapshot {snapshot_id}"), e))
    }

    async fn import_snapshot(
        &self,
        snapshot_id: &SnapshotId,
        input: &mut (dyn AsyncRead + Unpin + Send),
    ) -> Result<SnapshotInfo, ProviderError> {
        let staging = self.inner.registry.reserve_snapshot(snapshot_id)?;
        staging.make_dir().await?;
        let zst = staging.path().join(STATE_ENTRY);
        let meta_bytes = archive::read_export(input, &[STATE_ENTRY], staging.path()).await?;
        let meta: SnapshotMeta<QemuSnapshot> =
            serde_json::from_slice(&meta_bytes).map_err(ProviderError::corrupt_snapshot)?;
        if meta.format != registry::META_FORMAT {
            return Err(ProviderError::corrupt_snapshot(format!(
                "unsupported format {}",
                meta.format
            )));
        }
        {
            let state = staging.path().join("state");
            let (expected_sha256, expected_bytes) =
                (meta.backend.state_sha256.clone(), meta.backend.state_bytes);
            blocking(move || {
                let (sha256, size) =
                    archive::decompress(&zst, &state).map_err(ProviderError::corrupt_snapshot)?;
                if sha256 != expected_sha256 || size != expected_bytes {
                    return Err(ProviderError::corrupt_snapshot(
                        "the state does not match its checksum",
                    ));
                }
                let _ = std::fs::remove_file(&zst);
                Ok(())
            })
            .await?;
        }
        let info = staging.publish(meta).await?;
        info!(%snapshot_id, size_bytes = info.size_bytes, "imported snapshot");
        Ok(info)
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

impl Registered for QemuProvider {
    type Backend = Qemu;

    fn registry(&self) -> &Registry<Qemu> {
        &self.inner.registry
    }
}
