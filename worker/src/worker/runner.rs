//! The job runner without NATS: everything a lifecycle job needs (the provider, per-VM locks,
//! job slots, the job-id cache, capacity admission, the session markers) in [`RunnerCore`], and
//! what it asks of the service around it — VM events, serving a session's data plane, the
//! fleet's snapshot store — behind [`JobHost`]. The worker's NATS service is one host; tests
//! (the scheduler's logic tests) drive a [`JobRunner`] in-process with a host of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

use async_trait::async_trait;
use dashmap::DashMap;
use hearth_messages::{
    InventoryDigest, JobReply, JobRequest, SnapshotId, TenantId, TerminationReason, VmEvent, VmId,
    VmInfo, WireError, now_ms,
};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{JOB_CACHE, WorkerError};
use crate::config::WorkerConfig;
use crate::inventory::Inventory;
use crate::jobs::JobCache;
use crate::locks::VmLocks;
use crate::provider::{ProviderError, VmRuntime, VmState, VmView};
use crate::state::SessionSet;

/// What a job runner asks of the service around it.
#[async_trait]
pub trait JobHost: Send + Sync + 'static {
    /// A VM changed state (created, started, stopped, renamed, destroyed).
    async fn vm_event(&self, event: VmEvent);
    /// `vm_id` became a session: serve its data plane.
    async fn serve_session(&self, vm_id: &VmId) -> Result<(), WireError>;
    /// `vm_id` is no longer a session (destroyed, evicted, renamed away): stop serving it.
    fn stop_serving(&self, vm_id: &VmId);
    /// Uploads the provider's snapshot to the fleet's store.
    async fn upload_snapshot(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<(), WireError>;
    /// Imports the fleet store's snapshot into the provider; its size in bytes. 404 if the
    /// store does not have it.
    async fn download_snapshot(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<u64, WireError>;
    /// Removes the snapshot from the fleet's store (missing is success).
    async fn unpublish_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError>;
    /// Whether the fleet's store holds the snapshot.
    async fn is_published(&self, snapshot_id: &SnapshotId) -> bool;
    /// Uploads the paused VM `vm_id` to the fleet's store as `key`; its size. Nothing is left
    /// under `key` when it fails.
    async fn upload_paused(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<u64, WireError>;
    /// Imports the paused VM stored as `key` into the provider as `vm_id`, verified; 400 if the
    /// object is missing or damaged.
    async fn download_paused(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<VmView, WireError>;
}

/// Runs lifecycle jobs against a provider, with the worker's semantics (capacity and eviction,
/// health check, snapshot fetch on restore, backup before destroy, job-id dedupe, lease fencing),
/// and no NATS. Cheap to clone.
#[derive(Clone)]
pub struct JobRunner {
    pub(super) core: Arc<RunnerCore>,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner")
            .field("worker_id", &self.core.config.worker_id)
            .finish_non_exhaustive()
    }
}

impl JobRunner {
    /// A runner over `provider`, keeping its session markers under `config.data_dir`.
    pub fn new(
        config: WorkerConfig,
        provider: Arc<dyn VmRuntime>,
        host: Arc<dyn JobHost>,
    ) -> Result<Self, WorkerError> {
        Ok(Self {
            core: Arc::new(RunnerCore::new(config, provider, host)?),
        })
    }

    /// Runs one job (a repeated `job_id` gets the first outcome).
    pub async fn run(&self, job: JobRequest) -> Result<JobReply, WireError> {
        self.core.run(job).await
    }

    /// Every VM that is not destroyed, as heartbeats report them.
    pub async fn vm_infos(&self) -> Result<Vec<VmInfo>, ProviderError> {
        self.core.vm_infos().await
    }

    /// A heartbeat's inventory digest: takes `vms` (as the heartbeat reports them) as the next
    /// generation, which `list_vms_page` jobs then page.
    pub fn observe_inventory(&self, vms: Vec<VmInfo>) -> InventoryDigest {
        self.core.inventory.observe(vms)
    }

    /// Jobs running now.
    pub fn jobs_in_flight(&self) -> u32 {
        self.core
            .jobs_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The job runner's state (see [`JobRunner`]); the NATS worker reaches it through `Inner`.
pub(crate) struct RunnerCore {
    pub(super) config: WorkerConfig,
    pub(super) provider: Arc<dyn VmRuntime>,
    pub(super) host: Arc<dyn JobHost>,
    pub(super) locks: VmLocks,
    pub(super) jobs: JobCache,
    pub(super) job_slots: Semaphore,
    /// Admission to capacity: counting VMs and evicting happen under it.
    pub(super) admission: Mutex<()>,
    /// Creates admitted but not finished; they count against `max_vms`.
    pub(super) reserved: AtomicU32,
    /// VMs chosen for eviction and not yet destroyed; each one's slot is already counted in
    /// `reserved` for the create that chose it.
    pub(super) evicting: DashMap<VmId, ()>,
    pub(super) snapshot_fetch: DashMap<SnapshotId, Arc<Mutex<()>>>,
    pub(super) sessions: SessionSet,
    /// Per VM, cancelled when its session ends (destroy, stop): running and queued execs and file
    /// transfers on it give up at once, and the command is killed in the VM.
    pub(super) endings: DashMap<VmId, CancellationToken>,
    pub(super) jobs_in_flight: AtomicU32,
    pub(super) draining: AtomicBool,
    /// The newest scheduler lease revision a job carried; older ones are a deposed leader's.
    pub(super) newest_lease: AtomicU64,
    /// The inventory as heartbeats describe it (digests, deltas, pages).
    pub(super) inventory: Inventory,
}

impl RunnerCore {
    fn new(
        config: WorkerConfig,
        provider: Arc<dyn VmRuntime>,
        host: Arc<dyn JobHost>,
    ) -> Result<Self, WorkerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| WorkerError::Io {
            context: format!("creating {}", config.data_dir.display()),
            source,
        })?;
        let sessions =
            SessionSet::load(&config.data_dir.join("sessions.journal")).map_err(|source| {
                WorkerError::Io {
                    context: "loading the session journal".into(),
                    source,
                }
            })?;
        Ok(Self {
            job_slots: Semaphore::new(config.job_concurrency),
            config,
            provider,
            host,
            locks: VmLocks::default(),
            jobs: JobCache::new(JOB_CACHE),
            admission: Mutex::new(()),
            reserved: AtomicU32::new(0),
            evicting: DashMap::new(),
            snapshot_fetch: DashMap::new(),
            sessions,
            endings: DashMap::new(),
            jobs_in_flight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            newest_lease: AtomicU64::new(0),
            inventory: Inventory::default(),
        })
    }

    /// Serves `vm_id` as a session of `tenant` (the operator's when `None`).
    pub(super) async fn make_session(
        &self,
        vm_id: &VmId,
        tenant: Option<&TenantId>,
    ) -> Result<(), WireError> {
        self.sessions
            .insert(vm_id, tenant)
            .map_err(|e| WireError::internal(format!("writing the session marker: {e}")))?;
        self.host.serve_session(vm_id).await
    }

    /// Stops serving a session's data plane at once; the id is gone (destroyed, evicted,
    /// renamed), so is its work, and its entry.
    pub(super) fn unserve(&self, vm_id: &VmId) {
        if self.sessions.contains(vm_id)
            && let Err(err) = self.sessions.remove(vm_id)
        {
            warn!(%vm_id, %err, "removing the session marker");
        }
        self.host.stop_serving(vm_id);
        self.end_work(vm_id);
    }

    /// The token that ends work on `vm_id` (see `endings`).
    pub(super) fn ending(&self, vm_id: &VmId) -> CancellationToken {
        self.endings.entry(vm_id.clone()).or_default().clone()
    }

    /// Ends every exec and file transfer running on or waiting for `vm_id`.
    pub(super) fn end_work(&self, vm_id: &VmId) {
        if let Some((_, token)) = self.endings.remove(vm_id) {
            token.cancel();
        }
    }

    /// Starts a stopped or paused VM (resume on touch, `start_vm` jobs); a resume from pause is
    /// timed. The caller holds the VM's lock.
    pub(super) async fn start_vm(&self, vm_id: &VmId) -> Result<VmView, ProviderError> {
        let paused = matches!(
            self.provider.get_vm(vm_id).await?,
            Some(v) if v.state == VmState::Paused
        );
        let started = std::time::Instant::now();
        let result = self.provider.start_vm(vm_id).await;
        if paused {
            let label = if result.is_ok() { "ok" } else { "error" };
            metrics::histogram!(crate::metrics::RESUME_DURATION, "result" => label)
                .record(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                warn!(%vm_id, error = %e, "resuming a paused vm failed");
            }
        }
        result
    }

    /// Tells the host a VM changed state.
    pub(super) async fn vm_event(
        &self,
        vm_id: &VmId,
        state: VmState,
        renamed_from: Option<VmId>,
        reason: Option<TerminationReason>,
    ) {
        let event = VmEvent {
            worker_id: self.config.worker_id.clone(),
            vm_id: vm_id.clone(),
            state: state.into(),
            renamed_from,
            reason,
            at_ms: now_ms(),
        };
        self.host.vm_event(event).await;
    }

    pub(super) fn vm_info(&self, view: VmView) -> VmInfo {
        VmInfo {
            session: self.sessions.contains(&view.vm_id),
            // Held by a command, file transfer or job (in a job's own reply: by that job).
            busy: self.locks.is_busy(&view.vm_id),
            vm_id: view.vm_id,
            state: view.state.into(),
            template: view.template,
            created_ms: view.created_ms,
            last_activity_ms: view.last_activity_ms,
            restored_from: view.restored_from,
            notes: Vec::new(),
        }
    }

    pub(super) async fn vm_infos(&self) -> Result<Vec<VmInfo>, ProviderError> {
        Ok(self
            .provider
            .list_vms()
            .await?
            .into_iter()
            .filter(|v| v.state != VmState::Destroyed)
            .map(|v| self.vm_info(v))
            .collect())
    }
}

/// The fleet's snapshot store kept in memory: snapshot id → exported bytes. Clone it to share
/// one store between runners (a fleet of workers in one process).
pub type MemoryStore = Arc<parking_lot::Mutex<std::collections::HashMap<SnapshotId, Vec<u8>>>>;

/// A [`JobHost`] for running jobs in-process (tests, embedding): snapshots in a [`MemoryStore`],
/// VM events and served sessions recorded, no data plane.
#[derive(Debug, Default)]
pub struct MemoryHost {
    /// The snapshot store (share it between hosts to share snapshots).
    pub store: MemoryStore,
    /// Every VM event, in order.
    pub events: parking_lot::Mutex<Vec<VmEvent>>,
    /// The sessions being served.
    pub served: parking_lot::Mutex<Vec<VmId>>,
    /// Uploaded paused VMs, by object name (share it between hosts as `store`).
    pub paused: MemoryObjects,
}

/// Objects by name (uploaded paused VMs), shared by [`MemoryHost`]s.
pub type MemoryObjects = Arc<parking_lot::Mutex<std::collections::HashMap<String, Vec<u8>>>>;

impl MemoryHost {
    /// A host over `store`.
    pub fn with_store(store: MemoryStore) -> Self {
        Self {
            store,
            ..Self::default()
        }
    }
}

#[async_trait]
impl JobHost for MemoryHost {
    async fn vm_event(&self, event: VmEvent) {
        self.events.lock().push(event);
    }

    async fn serve_session(&self, vm_id: &VmId) -> Result<(), WireError> {
        self.served.lock().push(vm_id.clone());
        Ok(())
    }

    fn stop_serving(&self, vm_id: &VmId) {
        self.served.lock().retain(|v| v != vm_id);
    }

    async fn upload_snapshot(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<(), WireError> {
        let mut bytes = Vec::new();
        provider
            .export_snapshot(snapshot_id, &mut bytes)
            .await
            .map_err(|e| super::wire_error(&e))?;
        self.store.lock().insert(snapshot_id.clone(), bytes);
        Ok(())
    }

    async fn download_snapshot(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<u64, WireError> {
        let bytes = self.store.lock().get(snapshot_id).cloned();
        let bytes = bytes
            .ok_or_else(|| WireError::not_found(format!("snapshot {snapshot_id} not found")))?;
        let info = provider
            .import_snapshot(snapshot_id, &mut bytes.as_slice())
            .await
            .map_err(|e| super::wire_error(&e))?;
        Ok(info.size_bytes)
    }

    async fn unpublish_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError> {
        self.store.lock().remove(snapshot_id);
        Ok(())
    }

    async fn is_published(&self, snapshot_id: &SnapshotId) -> bool {
        self.store.lock().contains_key(snapshot_id)
    }

    async fn upload_paused(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<u64, WireError> {
        let mut bytes = Vec::new();
        provider
            .export_paused(vm_id, &mut bytes)
            .await
            .map_err(|e| super::wire_error(&e))?;
        let n = bytes.len() as u64;
        self.paused.lock().insert(key.to_owned(), bytes);
        Ok(n)
    }

    async fn download_paused(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<VmView, WireError> {
        let bytes = self.paused.lock().get(key).cloned().ok_or_else(|| {
            WireError::bad_request(format!("the paused state {key} is not in the store"))
        })?;
        provider
            .import_paused(vm_id, &mut bytes.as_slice())
            .await
            .map_err(|e| super::wire_error(&e))
    }
}
