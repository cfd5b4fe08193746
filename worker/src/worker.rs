//! The worker process's core: the NATS micro service `hearth-worker` with its jobs endpoint and the
//! per-session data plane, heartbeats, VM events, capacity and eviction, snapshot transfer through
//! the fleet's object store, and graceful drain.
//!
//! Architecture invariant: every operation on a VM — lifecycle job, exec, files — runs under that
//! VM's lock from [`VmLocks`]; nothing else holds a lock across an `.await`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::service::{self, ServiceExt};
use dashmap::DashMap;
use futures::StreamExt;
use hearth_messages::data::{CHUNK_HEADER, DEFAULT_MAX_FILE_BYTES};
use hearth_messages::transport::{Reply, decode_message, encoding_of};
use hearth_messages::{
    Bucket, Caller, Encoding, ExecRequest, ExecResult, FileGetRequest, FileGetResult,
    FilePutRequest, FilePutResult, JobOp, JobOutput, JobReply, JobRequest, SessionId, SessionOp,
    SnapshotId, TenantId, TerminationReason, Versions, VmEvent, VmId, VmInfo, WireError,
    WorkerStatus, now_ms,
};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::WorkerConfig;
use crate::jobs::{JobCache, Outcome};
use crate::locks::VmLocks;
use crate::metrics as m;
use crate::provider::{
    ExecOutcome, ExecSpec, OutputStream, Program, ProviderError, VmRuntime, VmState, VmView,
};
use crate::state::SessionSet;

/// Name of the NATS micro service.
pub const SERVICE_NAME: &str = hearth_messages::subjects::WORKER_SERVICE;
/// How long a health exec after create/restore may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Room left in a reply for everything but output bytes.
const REPLY_OVERHEAD: usize = 4096;
/// Jobs remembered for deduplication.
const JOB_CACHE: usize = 8192;
/// Retry hint on 503 (at capacity).
const RETRY_AFTER_MS: u64 = 1000;
/// Retry hint on 429 (the VM's data-plane queue is full).
const QUEUE_RETRY_AFTER_MS: u64 = 500;
/// How often one create chooses a new eviction victim after the chosen one resumed.
const MAX_EVICTION_TRIES: usize = 8;

/// Errors that stop the worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The provider could not be opened.
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    /// NATS refused something at startup.
    #[error("nats: {0}")]
    Nats(String),
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

fn nats_err(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Nats(e.to_string())
}

/// Maps a provider error onto the wire.
pub fn wire_error(err: &ProviderError) -> WireError {
    let code = hearth_messages::ErrorCode::from_u16(err.status_code());
    let mut wire = WireError::new(code, err.to_string());
    if code == hearth_messages::ErrorCode::NoCapacity {
        wire.retry_after_ms = Some(RETRY_AFTER_MS);
    }
    wire
}

/// One served session: cancelling the token stops its data-plane endpoints.
#[derive(Debug)]
struct Served {
    cancel: CancellationToken,
}

/// The worker. Cheap to clone; all clones share one state.
#[derive(Clone, Debug)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    config: WorkerConfig,
    nats: async_nats::Client,
    provider: Arc<dyn VmRuntime>,
    service: service::Service,
    store: ObjectStore,
    locks: VmLocks,
    jobs: JobCache,
    job_slots: Semaphore,
    /// Admission to capacity: counting VMs and evicting happen under it.
    admission: Mutex<()>,
    /// Creates admitted but not finished; they count against `max_vms`.
    reserved: AtomicU32,
    /// VMs chosen for eviction and not yet destroyed; each one's slot is already counted in
    /// `reserved` for the create that chose it.
    evicting: DashMap<VmId, ()>,
    snapshot_fetch: DashMap<SnapshotId, Arc<Mutex<()>>>,
    sessions: SessionSet,
    served: DashMap<VmId, Served>,
    /// Per VM, cancelled when its session ends (destroy, stop): running and queued execs and file
    /// transfers on it give up at once, and the command is killed in the VM.
    endings: DashMap<VmId, CancellationToken>,
    started_ms: u64,
    seq: AtomicU64,
    jobs_in_flight: AtomicU32,
    execs_in_flight: AtomicU32,
    draining: AtomicBool,
    /// The newest scheduler lease revision a job carried; older ones are a deposed leader's.
    newest_lease: AtomicU64,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Stops heartbeats: only when the drain is over, so the scheduler sees `draining` until then.
    heartbeat_stop: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.config.worker_id)
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

/// Runs a worker until `shutdown` resolves, then drains: stops taking jobs and requests, lets
/// running ones finish within `drain_grace`, and returns. VMs stay for the next start to reconcile.
pub async fn run(
    config: WorkerConfig,
    nats: async_nats::Client,
    provider: Arc<dyn VmRuntime>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let worker = Worker::start(config, nats, provider).await?;
    shutdown.await;
    worker.drain().await;
    Ok(())
}

impl Worker {
    /// Starts serving: reconciles with what the provider holds, registers the service, subscribes
    /// jobs and the data plane of every session VM, and starts heartbeats.
    pub async fn start(
        config: WorkerConfig,
        nats: async_nats::Client,
        provider: Arc<dyn VmRuntime>,
    ) -> Result<Self, WorkerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| WorkerError::Io {
            context: format!("creating {}", config.data_dir.display()),
            source,
        })?;
        let store = open_snapshot_store(&nats, &config).await?;
        let service = nats
            .service_builder()
            .description("Hearth worker: VM lifecycle jobs and the session data plane")
            .metadata(std::collections::HashMap::from([
                ("worker_id".to_owned(), config.worker_id.to_string()),
                ("provider".to_owned(), provider.name().to_owned()),
            ]))
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(nats_err)?;
        let sessions =
            SessionSet::load(&config.data_dir.join("sessions.journal")).map_err(|source| {
                WorkerError::Io {
                    context: "loading the session journal".into(),
                    source,
                }
            })?;
        let inner = Arc::new(Inner {
            job_slots: Semaphore::new(config.job_concurrency),
            config,
            nats,
            provider,
            service,
            store,
            locks: VmLocks::default(),
            jobs: JobCache::new(JOB_CACHE),
            admission: Mutex::new(()),
            evicting: DashMap::new(),
            reserved: AtomicU32::new(0),
            snapshot_fetch: DashMap::new(),
            sessions,
            served: DashMap::new(),
            endings: DashMap::new(),
            started_ms: now_ms(),
            seq: AtomicU64::new(0),
            jobs_in_flight: AtomicU32::new(0),
            execs_in_flight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            newest_lease: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            heartbeat_stop: CancellationToken::new(),
        });
        let worker = Worker { inner };
        worker.reconcile_on_start().await?;
        worker.start_jobs_endpoint().await?;
        worker.start_heartbeats();
        metrics::gauge!(m::CAPACITY).set(worker.inner.config.max_vms as f64);
        info!(
            worker_id = %worker.inner.config.worker_id,
            provider = worker.inner.provider.name(),
            "worker started"
        );
        Ok(worker)
    }

    /// This worker's id.
    pub fn id(&self) -> &hearth_messages::WorkerId {
        &self.inner.config.worker_id
    }

    /// Stops taking work, waits up to `drain_grace` for running jobs and commands, then returns.
    pub async fn drain(&self) {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::SeqCst);
        info!("draining: no new jobs or requests");
        inner.stop.cancel();
        for entry in inner.served.iter() {
            entry.value().cancel.cancel();
        }
        // A heartbeat saying so at once, so the scheduler stops placing work here; the heartbeat
        // loop keeps saying it until the drain is over (silence would make the worker suspect).
        inner.publish_heartbeat().await;
        inner.tasks.close();
        if tokio::time::timeout(inner.config.drain_grace, inner.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                grace = ?inner.config.drain_grace,
                "drain grace elapsed with work still running"
            );
        }
        inner.heartbeat_stop.cancel();
        let _ = inner.nats.flush().await;
    }

    async fn reconcile_on_start(&self) -> Result<(), WorkerError> {
        let inner = &self.inner;
        let vms = inner.provider.list_vms().await?;
        let live: std::collections::BTreeSet<VmId> = vms
            .iter()
            .filter(|v| v.state != VmState::Destroyed)
            .map(|v| v.vm_id.clone())
            .collect();
        let stale: Vec<VmId> = inner
            .sessions
            .ids()
            .into_iter()
            .filter(|id| !live.contains(id))
            .collect();
        for id in &stale {
            inner
                .sessions
                .remove(id)
                .map_err(|source| WorkerError::Io {
                    context: "removing a stale session marker".into(),
                    source,
                })?;
        }
        for vm_id in inner.sessions.ids() {
            self.serve(vm_id).await.map_err(nats_err)?;
        }
        info!(
            vms = live.len(),
            sessions = inner.served.len(),
            "reconciled with the provider"
        );
        Ok(())
    }

    async fn start_jobs_endpoint(&self) -> Result<(), WorkerError> {
        let inner = &self.inner;
        let mut endpoint = inner
            .service
            .endpoint_builder()
            .name("jobs")
            .add(inner.config.subjects.worker_jobs(&inner.config.worker_id))
            .await
            .map_err(nats_err)?;
        let worker = self.clone();
        inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = worker.inner.stop.cancelled() => break,
                    request = endpoint.next() => {
                        let Some(request) = request else { break };
                        let w = worker.clone();
                        worker.inner.tasks.spawn(async move { w.handle_job(request).await });
                    }
                }
            }
            let _ = endpoint.stop().await;
        });
        Ok(())
    }

    /// Heartbeats until the drain ends (not on `tasks`: the drain waits for those, and heartbeats
    /// must go on while it does; `heartbeat_stop` owns this task).
    fn start_heartbeats(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(inner.config.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = inner.heartbeat_stop.cancelled() => break,
                    _ = tick.tick() => inner.publish_heartbeat().await,
                }
            }
        });
    }

    // ----- lifecycle jobs -------------------------------------------------------------------

    async fn handle_job(&self, request: service::Request) {
        // The job's span, parented from the scheduler's `traceparent` when it sent one.
        let span = info_span!(
            "job",
            otel.kind = "server",
            worker_id = %self.inner.config.worker_id,
            job_id = tracing::field::Empty,
            op = tracing::field::Empty,
            vm_id = tracing::field::Empty,
            session_id = tracing::field::Empty,
            template = tracing::field::Empty,
        );
        let remote = hearth_messages::trace::set_parent(&span, request.message.headers.as_ref());
        let reply =
            hearth_messages::trace::with_remote(remote, self.job_reply(&request).instrument(span))
                .await;
        respond(&request, reply).await;
    }

    async fn job_reply(&self, request: &service::Request) -> Reply {
        let (encoding, job) = decode_message::<JobRequest>(&request.message);
        match job {
            Err(err) => {
                metrics::counter!(m::BAD_REQUESTS_TOTAL, "endpoint" => "jobs").increment(1);
                Reply::error(encoding, &err)
            }
            Ok(job) => {
                let op_name = job.op.name();
                record_job(&job);
                if let Err(err) = self.fence(job.lease_revision) {
                    metrics::counter!(m::JOBS_TOTAL, "op" => op_name, "result" => err.code.to_string())
                        .increment(1);
                    return Reply::error(encoding, &err);
                }
                let started = Instant::now();
                let cell = self.inner.jobs.cell(&job.job_id);
                let outcome = cell
                    .get_or_init(|| self.run_job(job.op, job.tenant))
                    .await
                    .clone();
                let result = match &outcome {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => e.code.to_string(),
                };
                metrics::counter!(m::JOBS_TOTAL, "op" => op_name, "result" => result).increment(1);
                metrics::histogram!(m::JOB_DURATION, "op" => op_name)
                    .record(started.elapsed().as_secs_f64());
                match outcome {
                    Ok(output) => Reply::ok(
                        encoding,
                        &JobReply {
                            job_id: job.job_id,
                            output,
                        },
                    ),
                    Err(err) => Reply::error(encoding, &err),
                }
            }
        }
    }

    /// Refuses a job from a deposed scheduler: one whose lease revision is older than the newest
    /// seen. A job without a revision (0: tools, tests) is not fenced.
    fn fence(&self, revision: u64) -> Result<(), WireError> {
        if revision == 0 {
            return Ok(());
        }
        let newest = self
            .inner
            .newest_lease
            .fetch_max(revision, Ordering::SeqCst);
        if revision < newest {
            metrics::counter!(m::JOBS_FENCED_TOTAL).increment(1);
            warn!(revision, newest, "refusing a job from a deposed scheduler");
            return Err(WireError::conflict(format!(
                "job from a deposed scheduler: lease revision {revision} is older than {newest}"
            )));
        }
        Ok(())
    }

    /// Runs one job; `tenant` owns the session a `session: true` job makes.
    async fn run_job(&self, op: JobOp, tenant: Option<TenantId>) -> Outcome {
        let inner = &self.inner;
        if inner.draining.load(Ordering::SeqCst) {
            return Err(WireError::no_capacity("worker is draining", RETRY_AFTER_MS));
        }
        if matches!(op, JobOp::ListVms {}) {
            return Ok(JobOutput::Vms {
                vms: inner.vm_infos().await.map_err(|e| wire_error(&e))?,
            });
        }
        // Release, TTL, prune and idle stop end the VM's running work first, so its lock comes
        // at once.
        if let JobOp::DestroyVm { vm_id, .. } | JobOp::StopVm { vm_id } = &op {
            inner.end_work(vm_id);
        }
        // The VM's lock before a job slot: a job waiting for a busy VM holds no slot, so jobs on
        // other VMs (creates above all) never queue behind it.
        let guard = match op.vm_id() {
            Some(vm_id) => Some(inner.locks.lock(vm_id).await),
            None => None,
        };
        let _slot = inner
            .job_slots
            .acquire()
            .await
            .map_err(|_| WireError::no_capacity("worker is shutting down", RETRY_AFTER_MS))?;
        inner.jobs_in_flight.fetch_add(1, Ordering::Relaxed);
        let outcome = self.run_job_locked(op, guard, tenant.as_ref()).await;
        inner.jobs_in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Err(err) = &outcome {
            debug!(%err, "job failed");
        }
        outcome
    }

    /// Runs `op` holding `guard`, the lock of `op.vm_id()` (taken by [`Self::run_job`]).
    async fn run_job_locked(
        &self,
        op: JobOp,
        guard: Option<tokio::sync::OwnedMutexGuard<()>>,
        tenant: Option<&TenantId>,
    ) -> Outcome {
        let inner = &self.inner;
        let provider = &inner.provider;
        let werr = |e: ProviderError| wire_error(&e);
        match op {
            JobOp::CreateVm { vm_id, session } => {
                self.create(vm_id, hearth_messages::VmSpec::default(), session, tenant)
                    .await
            }
            JobOp::CreateVmWithSpec {
                vm_id,
                spec,
                session,
            } => self.create(vm_id, spec, session, tenant).await,
            JobOp::StartVm { vm_id } => {
                let view = provider.start_vm(&vm_id).await.map_err(werr)?;
                inner
                    .vm_event(&view.vm_id, VmState::Running, None, None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::StopVm { vm_id } => {
                let view = provider.stop_vm(&vm_id).await.map_err(werr)?;
                inner
                    .vm_event(&view.vm_id, VmState::Stopped, None, None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::SnapshotVm {
                vm_id,
                snapshot_id,
                publish,
            } => {
                let started = Instant::now();
                let info = provider
                    .snapshot_vm(&vm_id, &snapshot_id)
                    .await
                    .map_err(werr)?;
                if publish {
                    inner.publish_snapshot(&snapshot_id).await?;
                }
                metrics::histogram!(m::SNAPSHOT_DURATION).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::SNAPSHOT_BYTES_TOTAL).increment(info.size_bytes);
                Ok(JobOutput::Snapshot {
                    snapshot: hearth_messages::SnapshotInfo {
                        snapshot_id: info.snapshot_id,
                        source_vm: info.source_vm,
                        template: info.template,
                        created_ms: info.created_ms,
                        size_bytes: info.size_bytes,
                        published: publish,
                    },
                })
            }
            JobOp::DestroyVm {
                vm_id,
                backup,
                reason,
            } => {
                self.destroy_locked(&vm_id, backup, reason).await?;
                drop(guard);
                inner.locks.forget_if_idle(&vm_id);
                Ok(JobOutput::Done {})
            }
            JobOp::RenameVm {
                vm_id,
                new_vm_id,
                session,
            } => {
                let _new_guard = inner.locks.lock(&new_vm_id).await;
                let view = provider.rename_vm(&vm_id, &new_vm_id).await.map_err(werr)?;
                self.unserve(&vm_id);
                if session {
                    self.make_session(&new_vm_id, tenant).await?;
                }
                drop(guard);
                inner.locks.forget_if_idle(&vm_id);
                inner
                    .vm_event(&new_vm_id, view.state, Some(vm_id), None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::ListVms {} => unreachable_list(),
            JobOp::DeleteSnapshot {
                snapshot_id,
                unpublish,
            } => inner.delete_snapshot(&snapshot_id, unpublish).await,
        }
    }

    /// Creates (or restores) a VM within capacity, checks it answers, and serves it as a session
    /// if asked.
    /// (Called holding the VM's lock.)
    async fn create(
        &self,
        vm_id: VmId,
        spec: hearth_messages::VmSpec,
        session: bool,
        tenant: Option<&TenantId>,
    ) -> Outcome {
        let inner = &self.inner;
        if let Some(existing) = inner
            .provider
            .get_vm(&vm_id)
            .await
            .map_err(|e| wire_error(&e))?
            && existing.state != VmState::Destroyed
        {
            return Err(WireError::conflict(format!("vm {vm_id} already exists")));
        }
        let _reservation = self.admit(&vm_id).await?;
        let started = Instant::now();
        let restore = spec.restore_from.clone();
        if let Some(snapshot_id) = &restore {
            inner.ensure_snapshot(snapshot_id).await?;
        }
        let provider_spec = crate::provider::VmSpec {
            template: spec.template,
            vcpus: spec.vcpus.unwrap_or(1),
            memory_mib: spec
                .memory_mib
                .unwrap_or(crate::provider::DEFAULT_MEMORY_MIB),
            disk_mib: spec.disk_mib.unwrap_or(crate::provider::DEFAULT_DISK_MIB),
            max_processes: spec
                .max_processes
                .unwrap_or(crate::provider::DEFAULT_MAX_PROCESSES),
            network: match spec.network.as_deref() {
                None => crate::provider::NetworkMode::None,
                Some(text) => {
                    crate::provider::NetworkMode::parse(text).map_err(|e| wire_error(&e))?
                }
            },
            env: spec.env,
            base: spec.base.map(Into::into),
            bootstrap: spec.bootstrap,
            restore_from: spec.restore_from,
        };
        let view = inner
            .provider
            .create_vm_with_spec(&vm_id, &provider_spec)
            .await
            .map_err(|e| wire_error(&e))?;
        // Healthy before anyone may use it: a trivial command must succeed.
        let health = inner
            .provider
            .exec(
                &vm_id,
                ExecSpec::argv(["true"]).with_timeout(HEALTH_TIMEOUT),
                None,
            )
            .await;
        let healthy = matches!(&health, Ok(outcome) if outcome.success());
        if !healthy {
            let detail = match health {
                Ok(o) => format!(
                    "exit {} {}",
                    o.exit_code,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => e.to_string(),
            };
            let _ = inner.provider.destroy_vm(&vm_id).await;
            inner
                .vm_event(
                    &vm_id,
                    VmState::Destroyed,
                    None,
                    Some(TerminationReason::VmFailed),
                )
                .await;
            return Err(WireError::internal(format!(
                "vm {vm_id} failed its health check: {detail}"
            )));
        }
        if restore.is_some() {
            metrics::histogram!(m::RESTORE_DURATION).record(started.elapsed().as_secs_f64());
        }
        if session {
            self.make_session(&vm_id, tenant).await?;
        }
        inner.vm_event(&vm_id, VmState::Running, None, None).await;
        Ok(JobOutput::Vm {
            vm: inner.vm_info(view),
        })
    }

    /// Reserves a slot for a new VM, evicting the oldest stopped VM when full; 503 when nothing
    /// can be evicted.
    ///
    /// The admission mutex only covers counting and choosing: a chosen victim is reserved
    /// (`evicting`) and its slot handed to this create, then locked, re-checked, backed up and
    /// destroyed with admission released, so other creates never wait behind one VM's lock or
    /// backup. A victim that became busy (resumed by an exec) in between is spared and another
    /// one chosen.
    async fn admit(&self, creating: &VmId) -> Result<Reservation, WireError> {
        let inner = &self.inner;
        for _ in 0..MAX_EVICTION_TRIES {
            let (victim, chosen, reservation) = {
                let _admission = inner.admission.lock().await;
                let evicting = !inner.evicting.is_empty();
                let held = inner
                    .provider
                    .count_vms()
                    .await
                    .map_err(|e| wire_error(&e))? as u32;
                let reserved = inner.reserved.load(Ordering::SeqCst);
                if !evicting && held + reserved < inner.config.max_vms {
                    inner.reserved.fetch_add(1, Ordering::SeqCst);
                    return Ok(Reservation(self.inner.clone()));
                }
                // Full, or evictions in flight: only now is the whole inventory worth listing.
                // A victim being evicted no longer counts: its slot is promised to the create
                // that chose it (whose reservation counts), destroyed yet or not.
                let vms = inner
                    .provider
                    .list_vms()
                    .await
                    .map_err(|e| wire_error(&e))?;
                let held = vms
                    .iter()
                    .filter(|v| !inner.evicting.contains_key(&v.vm_id))
                    .count() as u32;
                if held + reserved < inner.config.max_vms {
                    inner.reserved.fetch_add(1, Ordering::SeqCst);
                    return Ok(Reservation(self.inner.clone()));
                }
                let victim = vms
                    .iter()
                    .filter(|v| {
                        v.state == VmState::Stopped
                            && &v.vm_id != creating
                            && !inner.evicting.contains_key(&v.vm_id)
                            && !inner.locks.is_busy(&v.vm_id)
                    })
                    .min_by_key(|v| v.stopped_ms.unwrap_or(v.last_activity_ms));
                let Some(victim) = victim else {
                    return Err(WireError::no_capacity(
                        format!(
                            "worker {} is at capacity ({} vms)",
                            inner.config.worker_id, inner.config.max_vms
                        ),
                        RETRY_AFTER_MS,
                    ));
                };
                inner.evicting.insert(victim.vm_id.clone(), ());
                inner.reserved.fetch_add(1, Ordering::SeqCst);
                let evicting = Evicting(self.inner.clone(), victim.vm_id.clone());
                (
                    evicting,
                    (victim.last_activity_ms, victim.stopped_ms),
                    Reservation(self.inner.clone()),
                )
            };
            let vm_id = victim.1.clone();
            let guard = inner.locks.lock(&vm_id).await;
            // Re-checked under its lock: an exec may have resumed it since it was chosen.
            let now = inner
                .provider
                .get_vm(&vm_id)
                .await
                .map_err(|e| wire_error(&e))?;
            match now {
                None => {
                    // Gone already (released meanwhile): its slot is free.
                    drop(guard);
                    inner.locks.forget_if_idle(&vm_id);
                    drop(victim);
                    return Ok(reservation);
                }
                Some(view)
                    if view.state == VmState::Stopped
                        && (view.last_activity_ms, view.stopped_ms) == chosen =>
                {
                    info!(%vm_id, "evicting the oldest stopped vm to make room");
                    let result = self
                        .destroy_locked(&vm_id, true, Some(TerminationReason::Evicted))
                        .await;
                    drop(guard);
                    inner.locks.forget_if_idle(&vm_id);
                    drop(victim);
                    result?;
                    metrics::counter!(m::EVICTIONS_TOTAL).increment(1);
                    return Ok(reservation);
                }
                Some(_) => {
                    info!(%vm_id, "the eviction victim became busy; choosing again");
                    drop(guard);
                    inner.locks.forget_if_idle(&vm_id);
                    // Dropping `victim` and `reservation` gives both back.
                }
            }
        }
        Err(WireError::no_capacity(
            format!(
                "worker {} is at capacity ({} vms) and its stopped vms keep resuming",
                inner.config.worker_id, inner.config.max_vms
            ),
            RETRY_AFTER_MS,
        ))
    }

    async fn destroy_locked(
        &self,
        vm_id: &VmId,
        backup: bool,
        reason: Option<TerminationReason>,
    ) -> Result<(), WireError> {
        let inner = &self.inner;
        if backup
            && let Some(dir) = &inner.config.backup_dir
            && let Some(view) = inner
                .provider
                .get_vm(vm_id)
                .await
                .map_err(|e| wire_error(&e))?
            && view.state != VmState::Destroyed
        {
            let path = inner
                .provider
                .backup_vm(vm_id, dir)
                .await
                .map_err(|e| wire_error(&e))?;
            info!(%vm_id, path = %path.display(), "volume backed up");
            inner.prune_backups(dir, path).await;
        }
        inner
            .provider
            .destroy_vm(vm_id)
            .await
            .map_err(|e| wire_error(&e))?;
        self.unserve(vm_id);
        inner
            .vm_event(vm_id, VmState::Destroyed, None, reason)
            .await;
        Ok(())
    }

    // ----- the session data plane -----------------------------------------------------------

    /// Serves `vm_id` as a session of `tenant` (the operator's when `None`).
    async fn make_session(&self, vm_id: &VmId, tenant: Option<&TenantId>) -> Result<(), WireError> {
        self.inner
            .sessions
            .insert(vm_id, tenant)
            .map_err(|e| WireError::internal(format!("writing the session marker: {e}")))?;
        self.serve(vm_id.clone()).await
    }

    /// Subscribes the session's exec and files subjects (as endpoints of the micro service, so
    /// `$SRV.STATS` counts them).
    async fn serve(&self, vm_id: VmId) -> Result<(), WireError> {
        let inner = &self.inner;
        if inner.served.contains_key(&vm_id) {
            return Ok(());
        }
        let sid = SessionId::from(vm_id.clone());
        let mut endpoints = Vec::with_capacity(3);
        for (op, name) in [
            (SessionOp::Exec, "exec"),
            (SessionOp::FilesPut, "files-put"),
            (SessionOp::FilesGet, "files-get"),
        ] {
            let endpoint = inner
                .service
                .endpoint_builder()
                .name(name)
                .add(inner.config.subjects.session(&sid, op))
                .await
                .map_err(|e| WireError::internal(format!("subscribing {op:?}: {e}")))?;
            endpoints.push(endpoint.map(move |r| (op, r)));
        }
        let cancel = inner.stop.child_token();
        let queue = Arc::new(DataQueue::default());
        let (max_held, max_bytes) = (
            inner.config.max_queued_per_vm,
            inner.config.max_queued_bytes_per_vm,
        );
        inner.served.insert(
            vm_id.clone(),
            Served {
                cancel: cancel.clone(),
            },
        );
        let worker = self.clone();
        inner.tasks.spawn(async move {
            let mut requests = futures::stream::select_all(endpoints);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = requests.next() => {
                        let Some((op, request)) = next else { break };
                        // Another tenant's request is answered exactly as for a VM that is not
                        // here, before it can take a place in this session's queue.
                        if let Err(err) = worker.check_owner(&vm_id, &request) {
                            let reply = Reply::error(
                                encoding_of(request.message.headers.as_ref()),
                                &err,
                            );
                            respond(&request, reply).await;
                            continue;
                        }
                        let bytes = request.message.payload.len() as u64;
                        let Some(permit) = queue.admit(bytes, max_held, max_bytes) else {
                            // Answered here, without a task: a flood costs no memory.
                            reject_queue_full(&vm_id, op, &request, max_held, max_bytes).await;
                            continue;
                        };
                        let (w, vm) = (worker.clone(), vm_id.clone());
                        worker.inner.tasks.spawn(async move {
                            w.handle_data(op, vm, request).await;
                            drop(permit);
                        });
                    }
                }
            }
            // Dropping the endpoints unsubscribes them.
            for endpoint in requests.into_iter() {
                let mut endpoint = endpoint.into_inner();
                let _ = endpoint.stop().await;
            }
        });
        Ok(())
    }

    /// Stops serving a session's data plane at once. No "ended" responder lingers: the session id
    /// may be claimed again (a retried claim) on this or another worker, and a stale responder in
    /// the same queue group would answer half of the new session's requests. An exec already
    /// queued behind a destroy still gets 409 from the VM's state.
    fn unserve(&self, vm_id: &VmId) {
        let inner = &self.inner;
        if inner.sessions.contains(vm_id)
            && let Err(err) = inner.sessions.remove(vm_id)
        {
            warn!(%vm_id, %err, "removing the session marker");
        }
        if let Some((_, served)) = inner.served.remove(vm_id) {
            served.cancel.cancel();
        }
        // The id is gone (destroyed, evicted, renamed): so is its work, and its entry.
        inner.end_work(vm_id);
    }

    /// Whether the request's caller (the tenant NATS stamped on it, or the operator) owns session
    /// `vm_id`; 404 otherwise, worded as for an unknown session.
    fn check_owner(&self, vm_id: &VmId, request: &service::Request) -> Result<(), WireError> {
        let caller = Caller::from_headers(request.message.headers.as_ref())?;
        match self.inner.sessions.owner(vm_id) {
            Some(owner) if caller.owns(owner.as_ref()) => Ok(()),
            _ => {
                metrics::counter!(m::FOREIGN_REQUESTS_TOTAL).increment(1);
                Err(WireError::not_found(format!("session {vm_id} not found")))
            }
        }
    }

    async fn handle_data(&self, op: SessionOp, vm_id: VmId, request: service::Request) {
        // The data-plane span, parented from the executor's `traceparent` when it sent one. A
        // session's VM id is its session id.
        let span = info_span!(
            "data",
            otel.name = op.suffix(),
            otel.kind = "server",
            session_id = %vm_id,
            vm_id = %vm_id,
            worker_id = %self.inner.config.worker_id,
            op = op.suffix(),
        );
        let remote = hearth_messages::trace::set_parent(&span, request.message.headers.as_ref());
        let reply = async {
            match op {
                SessionOp::Exec => self.exec(&vm_id, &request).await,
                SessionOp::FilesPut => self.files_put(&vm_id, &request).await,
                SessionOp::FilesGet => self.files_get(&vm_id, &request).await,
                _ => Reply::error(
                    Encoding::MsgPack,
                    &WireError::internal("unexpected subject"),
                ),
            }
        }
        .instrument(span);
        let reply = hearth_messages::trace::with_remote(remote, reply).await;
        respond(&request, reply).await;
    }

    /// Takes the VM's lock and makes sure the VM is running (resuming a stopped one).
    async fn lock_running(
        &self,
        vm_id: &VmId,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, WireError> {
        let inner = &self.inner;
        let waited = Instant::now();
        let guard = inner.locks.lock(vm_id).await;
        metrics::histogram!(m::EXEC_LOCK_WAIT).record(waited.elapsed().as_secs_f64());
        match inner
            .provider
            .get_vm(vm_id)
            .await
            .map_err(|e| wire_error(&e))?
        {
            None => Err(WireError::not_found(format!("session {vm_id} not found"))),
            Some(view) => match view.state {
                VmState::Running => Ok(guard),
                VmState::Destroyed => Err(WireError::conflict(format!(
                    "session {vm_id} has ended (its vm is destroyed)"
                ))),
                VmState::Stopped => {
                    inner
                        .provider
                        .start_vm(vm_id)
                        .await
                        .map_err(|e| wire_error(&e))?;
                    inner.vm_event(vm_id, VmState::Running, None, None).await;
                    Ok(guard)
                }
            },
        }
    }

    async fn exec(&self, vm_id: &VmId, request: &service::Request) -> Reply {
        let inner = &self.inner;
        let (encoding, req) = decode_message::<ExecRequest>(&request.message);
        let req = match req.and_then(|r| r.program().map(|_| ()).map(|()| r)) {
            Ok(req) => req,
            Err(err) => {
                metrics::counter!(m::BAD_REQUESTS_TOTAL, "endpoint" => "exec").increment(1);
                return Reply::error(encoding, &err);
            }
        };
        inner.execs_in_flight.fetch_add(1, Ordering::Relaxed);
        let reply = self.exec_inner(vm_id, request, encoding, req).await;
        inner.execs_in_flight.fetch_sub(1, Ordering::Relaxed);
        reply
    }

    async fn exec_inner(
        &self,
        vm_id: &VmId,
        request: &service::Request,
        encoding: Encoding,
        req: ExecRequest,
    ) -> Reply {
        let inner = &self.inner;
        let mut spec = exec_spec(&req);
        let streamed = req.stream && request.message.reply.is_some();
        if !streamed {
            // Never capture more than the reply can carry: each stream is capped at the whole
            // reply budget (so the budget's split between the streams, and the truncated flags,
            // are exactly what trimming a full capture would give), and the rest is dropped in
            // the VM instead of being buffered here. Wanting more means streaming.
            spec.max_output_bytes = spec.max_output_bytes.min(inner.max_reply_bytes());
        }
        let ending = inner.ending(vm_id);
        let guard = tokio::select! {
            guard = self.lock_running(vm_id) => match guard {
                Ok(guard) => guard,
                Err(err) => return Reply::error(encoding, &err),
            },
            () = ending.cancelled() => return Reply::error(encoding, &session_ended(vm_id)),
        };
        let outcome = match (req.stream, request.message.reply.clone()) {
            (true, Some(reply_to)) => {
                let (tx, rx) = mpsc::channel(64);
                let forward = tokio::spawn(forward_chunks(inner.nats.clone(), reply_to, rx));
                // Dropping the exec (the session ended) cancels the command in the VM.
                let outcome = tokio::select! {
                    outcome = inner.provider.exec(vm_id, spec, Some(tx)) => Some(outcome),
                    () = ending.cancelled() => None,
                };
                // Every chunk is published before the final result.
                let _ = forward.await;
                outcome
            }
            _ => tokio::select! {
                outcome = inner.provider.exec(vm_id, spec, None) => Some(outcome),
                () = ending.cancelled() => None,
            },
        };
        drop(guard);
        let Some(outcome) = outcome else {
            metrics::counter!(m::EXECS_TOTAL, "result" => "error").increment(1);
            return Reply::error(encoding, &session_ended(vm_id));
        };
        match outcome {
            Ok(outcome) => {
                let result = exec_result(outcome, inner.max_reply_bytes());
                let label = if result.timed_out {
                    "timeout"
                } else if result.exit_code == 0 {
                    "ok"
                } else {
                    "nonzero"
                };
                metrics::counter!(m::EXECS_TOTAL, "result" => label).increment(1);
                metrics::histogram!(m::EXEC_DURATION).record(result.duration_ms as f64 / 1000.0);
                if result.stdout_truncated || result.stderr_truncated {
                    metrics::counter!(m::EXEC_TRUNCATED_TOTAL).increment(1);
                }
                Reply::ok(encoding, &result)
            }
            Err(err) => {
                metrics::counter!(m::EXECS_TOTAL, "result" => "error").increment(1);
                Reply::error(encoding, &wire_error(&err))
            }
        }
    }

    async fn files_put(&self, vm_id: &VmId, request: &service::Request) -> Reply {
        let (encoding, req) = decode_message::<FilePutRequest>(&request.message);
        let req = match req.and_then(|r| r.validate().map(|()| r)) {
            Ok(req) => req,
            Err(err) => {
                metrics::counter!(m::BAD_REQUESTS_TOTAL, "endpoint" => "files-put").increment(1);
                return Reply::error(encoding, &err);
            }
        };
        let ending = self.inner.ending(vm_id);
        let result = async {
            let _guard = self.lock_running(vm_id).await?;
            self.inner
                .provider
                .put_file(vm_id, &req.path, req.data.as_bytes(), req.mode)
                .await
                .map(|size| FilePutResult { size })
                .map_err(|e| wire_error(&e))
        };
        let result = tokio::select! {
            result = result => result,
            () = ending.cancelled() => Err(session_ended(vm_id)),
        };
        files_metric("put", &result);
        Reply::from_result(encoding, &result)
    }

    async fn files_get(&self, vm_id: &VmId, request: &service::Request) -> Reply {
        let inner = &self.inner;
        let (encoding, req) = decode_message::<FileGetRequest>(&request.message);
        let req = match req.and_then(|r| r.validate().map(|()| r)) {
            Ok(req) => req,
            Err(err) => {
                metrics::counter!(m::BAD_REQUESTS_TOTAL, "endpoint" => "files-get").increment(1);
                return Reply::error(encoding, &err);
            }
        };
        let limit = req
            .max_bytes
            .unwrap_or(DEFAULT_MAX_FILE_BYTES)
            .min(inner.config.max_file_bytes)
            .min(inner.max_reply_bytes() as u64);
        let ending = inner.ending(vm_id);
        let result = async {
            let _guard = self.lock_running(vm_id).await?;
            inner
                .provider
                .get_file(vm_id, &req.path, limit)
                .await
                .map(|data| FileGetResult {
                    size: data.len() as u64,
                    data: data.into(),
                })
                .map_err(|e| wire_error(&e))
        };
        let result = tokio::select! {
            result = result => result,
            () = ending.cancelled() => Err(session_ended(vm_id)),
        };
        files_metric("get", &result);
        Reply::from_result(encoding, &result)
    }
}

/// The answer to an exec or file transfer whose session ended (released, expired, pruned,
/// stopped) while it ran or waited.
fn session_ended(vm_id: &VmId) -> WireError {
    WireError::conflict(format!(
        "session_ended: session {vm_id} ended while the request ran or waited; its command was killed"
    ))
}

fn unreachable_list() -> Outcome {
    Err(WireError::internal("list_vms is answered before locking"))
}

/// The exec and file requests one session's VM holds: running, or waiting for its lock. Admission
/// happens only in the session's serve loop; permits give their share back when dropped.
#[derive(Debug, Default)]
struct DataQueue {
    /// (requests, payload bytes) held.
    held: parking_lot::Mutex<(usize, u64)>,
}

/// One admitted request's share of its [`DataQueue`].
struct QueuePermit {
    queue: Arc<DataQueue>,
    bytes: u64,
}

impl DataQueue {
    /// Admits a request of `bytes` if the VM then holds at most `max_held` requests and
    /// `max_bytes` payload bytes. A VM holding nothing admits any one request (a single request
    /// is bounded by the server's max_payload).
    fn admit(self: &Arc<Self>, bytes: u64, max_held: usize, max_bytes: u64) -> Option<QueuePermit> {
        let mut held = self.held.lock();
        let (count, total) = *held;
        if count > 0 && (count >= max_held || total.saturating_add(bytes) > max_bytes) {
            return None;
        }
        *held = (count + 1, total.saturating_add(bytes));
        Some(QueuePermit {
            queue: self.clone(),
            bytes,
        })
    }

    #[cfg(test)]
    fn held(&self) -> (usize, u64) {
        *self.held.lock()
    }
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        let mut held = self.queue.held.lock();
        held.0 -= 1;
        held.1 -= self.bytes;
    }
}

/// Answers a request its VM's queue has no room for: 429 with a retry hint.
async fn reject_queue_full(
    vm_id: &VmId,
    op: SessionOp,
    request: &service::Request,
    max_held: usize,
    max_bytes: u64,
) {
    let endpoint = match op {
        SessionOp::Exec => "exec",
        SessionOp::FilesPut => "files-put",
        _ => "files-get",
    };
    metrics::counter!(m::QUEUE_REJECTIONS_TOTAL, "endpoint" => endpoint).increment(1);
    debug!(%vm_id, endpoint, "data-plane queue full: 429");
    let mut err = WireError::new(
        hearth_messages::ErrorCode::Quota,
        format!(
            "session {vm_id} has too much work queued (at most {max_held} requests and \
             {max_bytes} payload bytes at once); retry later"
        ),
    );
    err.retry_after_ms = Some(QUEUE_RETRY_AFTER_MS);
    let reply = Reply::error(encoding_of(request.message.headers.as_ref()), &err);
    respond(request, reply).await;
}

/// Releases a capacity reservation when dropped.
struct Reservation(Arc<Inner>);

/// A VM chosen for eviction, no longer a candidate for any other create; released when dropped.
struct Evicting(Arc<Inner>, VmId);

impl Drop for Evicting {
    fn drop(&mut self) {
        self.0.evicting.remove(&self.1);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.reserved.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    /// Largest output a reply may carry and still fit the server's max_payload.
    /// The token that ends work on `vm_id` (see `endings`).
    fn ending(&self, vm_id: &VmId) -> CancellationToken {
        self.endings.entry(vm_id.clone()).or_default().clone()
    }

    /// Ends every exec and file transfer running on or waiting for `vm_id`.
    fn end_work(&self, vm_id: &VmId) {
        if let Some((_, token)) = self.endings.remove(vm_id) {
            token.cancel();
        }
    }

    /// Applies the backup retention to `dir` after `newest` was written there. A failure is
    /// logged: the backup itself succeeded.
    async fn prune_backups(&self, dir: &std::path::Path, newest: std::path::PathBuf) {
        let retention = self.config.backup_retention;
        let dir = dir.to_path_buf();
        let pruned = tokio::task::spawn_blocking(move || {
            crate::backups::prune(&dir, &retention, &newest, std::time::SystemTime::now())
        })
        .await;
        match pruned {
            Ok(Ok(deleted)) => {
                for path in &deleted {
                    info!(path = %path.display(), "old backup deleted (retention)");
                }
                metrics::counter!(m::BACKUPS_PRUNED_TOTAL).increment(deleted.len() as u64);
            }
            Ok(Err(err)) => warn!(%err, "pruning the backup directory failed"),
            Err(err) => warn!(%err, "pruning the backup directory panicked"),
        }
    }

    fn max_reply_bytes(&self) -> usize {
        self.nats
            .server_info()
            .max_payload
            .saturating_sub(REPLY_OVERHEAD)
            .max(REPLY_OVERHEAD)
    }

    fn vm_info(&self, view: VmView) -> VmInfo {
        VmInfo {
            session: self.sessions.contains(&view.vm_id),
            // Held by a command, file transfer or job (in a job's own reply: by that job).
            busy: self.locks.is_busy(&view.vm_id),
            vm_id: view.vm_id,
            state: match view.state {
                VmState::Running => hearth_messages::VmState::Running,
                VmState::Stopped => hearth_messages::VmState::Stopped,
                VmState::Destroyed => hearth_messages::VmState::Destroyed,
            },
            template: view.template,
            created_ms: view.created_ms,
            last_activity_ms: view.last_activity_ms,
            restored_from: view.restored_from,
        }
    }

    async fn vm_infos(&self) -> Result<Vec<VmInfo>, ProviderError> {
        Ok(self
            .provider
            .list_vms()
            .await?
            .into_iter()
            .filter(|v| v.state != VmState::Destroyed)
            .map(|v| self.vm_info(v))
            .collect())
    }

    async fn publish_heartbeat(&self) {
        let vms = match self.vm_infos().await {
            Ok(vms) => vms,
            Err(err) => {
                warn!(%err, "listing vms for the heartbeat failed");
                return;
            }
        };
        let running = vms
            .iter()
            .filter(|v| v.state == hearth_messages::VmState::Running)
            .count();
        metrics::gauge!(m::VMS, "state" => "running").set(running as f64);
        metrics::gauge!(m::VMS, "state" => "stopped").set((vms.len() - running) as f64);
        let status = WorkerStatus {
            worker_id: self.config.worker_id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            at_ms: now_ms(),
            started_ms: self.started_ms,
            provider: self.provider.name().to_owned(),
            max_vms: self.config.max_vms,
            used_vms: vms.len() as u32,
            draining: self.draining.load(Ordering::SeqCst),
            jobs_in_flight: self.jobs_in_flight.load(Ordering::Relaxed),
            execs_in_flight: self.execs_in_flight.load(Ordering::Relaxed),
            vms,
            versions: Versions {
                hearth: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: hearth_messages::subjects::PROTOCOL_VERSION.to_owned(),
                provider: None,
            },
            isolation: self.provider.isolation(),
        };
        let Ok(payload) = Encoding::MsgPack.encode(&status) else {
            return;
        };
        let subject = self.config.subjects.worker_status(&self.config.worker_id);
        if let Err(err) = self.nats.publish(subject, payload.into()).await {
            warn!(%err, "publishing heartbeat failed");
        }
        metrics::counter!(m::HEARTBEATS_TOTAL).increment(1);
    }

    async fn vm_event(
        &self,
        vm_id: &VmId,
        state: VmState,
        renamed_from: Option<VmId>,
        reason: Option<TerminationReason>,
    ) {
        let event = VmEvent {
            worker_id: self.config.worker_id.clone(),
            vm_id: vm_id.clone(),
            state: match state {
                VmState::Running => hearth_messages::VmState::Running,
                VmState::Stopped => hearth_messages::VmState::Stopped,
                VmState::Destroyed => hearth_messages::VmState::Destroyed,
            },
            renamed_from,
            reason,
            at_ms: now_ms(),
        };
        if let Ok(payload) = Encoding::MsgPack.encode(&event) {
            let subject = self.config.subjects.vm_events(&self.config.worker_id);
            if let Err(err) = self.nats.publish(subject, payload.into()).await {
                warn!(%err, "publishing vm event failed");
            }
        }
    }

    /// Uploads a snapshot to the fleet's object store.
    async fn publish_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError> {
        let (mut writer, mut reader) = tokio::io::duplex(256 * 1024);
        let provider = self.provider.clone();
        let id = snapshot_id.clone();
        let export = tokio::spawn(async move {
            let result = provider.export_snapshot(&id, &mut writer).await;
            drop(writer);
            result
        });
        let put = self.store.put(snapshot_id.as_str(), &mut reader).await;
        let exported = export
            .await
            .map_err(|e| WireError::internal(format!("snapshot export task: {e}")))?;
        exported.map_err(|e| wire_error(&e))?;
        put.map_err(|e| WireError::internal(format!("uploading snapshot {snapshot_id}: {e}")))?;
        Ok(())
    }

    /// Deletes a snapshot from this worker and, with `unpublish`, from the object store. Both are
    /// idempotent (missing is success). Runs under the snapshot's lock, so it never interleaves
    /// with a fetch of the same snapshot.
    async fn delete_snapshot(&self, snapshot_id: &SnapshotId, unpublish: bool) -> Outcome {
        let lock = self
            .snapshot_fetch
            .entry(snapshot_id.clone())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        match self.provider.delete_snapshot(snapshot_id).await {
            Ok(()) => info!(%snapshot_id, "snapshot deleted"),
            Err(ProviderError::NotFound(_)) => debug!(%snapshot_id, "snapshot already gone"),
            Err(err) => return Err(wire_error(&err)),
        }
        if unpublish {
            match self.store.delete(snapshot_id.as_str()).await {
                Ok(()) => info!(%snapshot_id, "snapshot removed from the object store"),
                Err(err) if err.kind() == jetstream::object_store::DeleteErrorKind::NotFound => {}
                Err(err) => {
                    return Err(WireError::internal(format!(
                        "removing snapshot {snapshot_id} from the object store: {err}"
                    )));
                }
            }
        }
        drop(guard);
        drop(lock);
        self.snapshot_fetch
            .remove_if(snapshot_id, |_, m| Arc::strong_count(m) == 1);
        Ok(JobOutput::Done {})
    }

    /// Makes sure a snapshot is on this worker, fetching it from the object store once.
    async fn ensure_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError> {
        let lock = self
            .snapshot_fetch
            .entry(snapshot_id.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if self
            .provider
            .get_snapshot(snapshot_id)
            .await
            .map_err(|e| wire_error(&e))?
            .is_some()
        {
            return Ok(());
        }
        let mut object = self.store.get(snapshot_id.as_str()).await.map_err(|e| {
            WireError::not_found(format!(
                "snapshot {snapshot_id} is neither on this worker nor in the object store: {e}"
            ))
        })?;
        let info = self
            .provider
            .import_snapshot(snapshot_id, &mut object)
            .await
            .map_err(|e| wire_error(&e))?;
        metrics::counter!(m::SNAPSHOT_FETCH_BYTES_TOTAL).increment(info.size_bytes);
        info!(%snapshot_id, bytes = info.size_bytes, "snapshot fetched from the object store");
        Ok(())
    }
}

async fn open_snapshot_store(
    nats: &async_nats::Client,
    config: &WorkerConfig,
) -> Result<ObjectStore, WorkerError> {
    let js = jetstream::new(nats.clone());
    let bucket = config.subjects.bucket(Bucket::Snapshots);
    if let Ok(store) = js.get_object_store(&bucket).await {
        return Ok(store);
    }
    match js
        .create_object_store(jetstream::object_store::Config {
            bucket: bucket.clone(),
            description: Some("Hearth template snapshots".into()),
            num_replicas: config.store_replicas,
            max_bytes: i64::try_from(config.store_max_bytes).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
    {
        Ok(store) => Ok(store),
        // Another worker created it first.
        Err(create_err) => js
            .get_object_store(&bucket)
            .await
            .map_err(|_| nats_err(format!("object store {bucket}: {create_err}"))),
    }
}

/// Records a job's ids on the current (job) span: the VM, the session it serves (a session's VM id
/// is its session id) and the template it is built from, where the job names them.
fn record_job(job: &JobRequest) {
    let span = tracing::Span::current();
    span.record("job_id", tracing::field::display(&job.job_id));
    span.record("op", job.op.name());
    if let Some(vm_id) = job.op.vm_id() {
        span.record("vm_id", tracing::field::display(vm_id));
    }
    match &job.op {
        JobOp::CreateVm {
            vm_id,
            session: true,
        } => {
            span.record("session_id", tracing::field::display(vm_id));
        }
        JobOp::CreateVmWithSpec {
            vm_id,
            spec,
            session,
        } => {
            if *session {
                span.record("session_id", tracing::field::display(vm_id));
            }
            if let Some(template) = &spec.template {
                span.record("template", tracing::field::display(template));
            }
        }
        JobOp::RenameVm {
            new_vm_id,
            session: true,
            ..
        } => {
            span.record("session_id", tracing::field::display(new_vm_id));
        }
        _ => {}
    }
}

async fn respond(request: &service::Request, reply: Reply) {
    if let Err(err) = request
        .respond_with_headers(Ok(reply.payload), reply.headers)
        .await
    {
        debug!(%err, "reply not sent");
    }
}

async fn forward_chunks(
    nats: async_nats::Client,
    reply_to: async_nats::Subject,
    mut rx: mpsc::Receiver<crate::provider::OutputChunk>,
) {
    while let Some(chunk) = rx.recv().await {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            CHUNK_HEADER,
            match chunk.stream {
                OutputStream::Stdout => hearth_messages::data::CHUNK_STDOUT,
                OutputStream::Stderr => hearth_messages::data::CHUNK_STDERR,
            },
        );
        if nats
            .publish_with_headers(reply_to.clone(), headers, chunk.data)
            .await
            .is_err()
        {
            // Keep draining so the command never blocks on us.
            continue;
        }
    }
}

fn exec_spec(req: &ExecRequest) -> ExecSpec {
    let program = match (&req.argv, &req.cmd) {
        (Some(argv), _) => Program::Argv(argv.clone()),
        (None, Some(cmd)) => Program::Shell(cmd.clone()),
        (None, None) => Program::Argv(Vec::new()),
    };
    ExecSpec {
        program,
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        stdin: req.stdin.as_ref().map(|b| b.as_bytes().to_vec()),
        timeout: Duration::from_millis(req.timeout_ms()),
        max_output_bytes: req.max_output_bytes() as usize,
    }
}

/// Builds the reply, trimming output so the reply fits the server's max_payload.
fn exec_result(outcome: ExecOutcome, budget: usize) -> ExecResult {
    let ExecOutcome {
        exit_code,
        signal,
        mut stdout,
        mut stderr,
        mut stdout_truncated,
        mut stderr_truncated,
        timed_out,
        duration,
        oom_killed,
    } = outcome;
    if stdout.len() + stderr.len() > budget {
        // Share the budget, giving what one stream does not need to the other.
        let half = budget / 2;
        let (out_keep, err_keep) = if stdout.len() <= half {
            (stdout.len(), budget - stdout.len())
        } else if stderr.len() <= half {
            (budget - stderr.len(), stderr.len())
        } else {
            (half, budget - half)
        };
        if stdout.len() > out_keep {
            stdout.truncate(out_keep);
            stdout_truncated = true;
        }
        if stderr.len() > err_keep {
            stderr.truncate(err_keep);
            stderr_truncated = true;
        }
    }
    ExecResult {
        exit_code,
        signal,
        stdout: stdout.into(),
        stderr: stderr.into(),
        stdout_truncated,
        stderr_truncated,
        timed_out,
        duration_ms: duration.as_millis() as u64,
        oom_killed,
    }
}

fn files_metric<T>(op: &'static str, result: &Result<T, WireError>) {
    let label = match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.code.to_string(),
    };
    metrics::counter!(m::FILES_TOTAL, "op" => op, "result" => label).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_output_is_trimmed_to_the_budget_and_flagged() {
        let outcome = ExecOutcome {
            stdout: vec![b'a'; 900],
            stderr: vec![b'b'; 50],
            ..Default::default()
        };
        let r = exec_result(outcome, 500);
        assert_eq!(r.stderr.len(), 50, "the small stream keeps everything");
        assert_eq!(r.stdout.len(), 450);
        assert!(r.stdout_truncated && !r.stderr_truncated);

        let r = exec_result(
            ExecOutcome {
                stdout: vec![0; 10],
                ..Default::default()
            },
            500,
        );
        assert!(!r.stdout_truncated);
    }

    /// What a capture capped at `cap` per stream holds of `len` bytes, and whether it says so.
    fn captured(len: usize, cap: usize) -> (Vec<u8>, bool) {
        (vec![b'x'; len.min(cap)], len > cap)
    }

    #[test]
    fn capping_the_capture_at_the_reply_budget_changes_no_reply() {
        let budget = 1000;
        let max_output = 64 * 1024;
        let lens = [
            0,
            1,
            400,
            499,
            500,
            501,
            999,
            1000,
            1001,
            5000,
            max_output,
            max_output + 1,
        ];
        for &out in &lens {
            for &err in &lens {
                let reply = |cap: usize| {
                    let (stdout, stdout_truncated) = captured(out, cap);
                    let (stderr, stderr_truncated) = captured(err, cap);
                    let r = exec_result(
                        ExecOutcome {
                            stdout,
                            stderr,
                            stdout_truncated,
                            stderr_truncated,
                            ..Default::default()
                        },
                        budget,
                    );
                    (r.stdout, r.stderr, r.stdout_truncated, r.stderr_truncated)
                };
                let full = reply(max_output);
                let capped = reply(max_output.min(budget));
                assert_eq!(full, capped, "stdout {out}, stderr {err}");
                assert!(full.0.len() + full.1.len() <= budget);
                assert_eq!(full.2, full.0.len() < out, "stdout {out}, stderr {err}");
                assert_eq!(full.3, full.1.len() < err, "stdout {out}, stderr {err}");
            }
        }
    }

    #[test]
    fn the_data_queue_bounds_requests_and_bytes_and_admits_one_into_an_empty_queue() {
        let queue = Arc::new(DataQueue::default());
        let big = queue
            .admit(10_000, 3, 100)
            .expect("an empty queue admits anything");
        assert!(queue.admit(1, 3, 100).is_none(), "bytes");
        drop(big);
        assert_eq!(queue.held(), (0, 0));
        let permits: Vec<_> = (0..3).map(|_| queue.admit(10, 3, 100).unwrap()).collect();
        assert!(queue.admit(0, 3, 100).is_none(), "count");
        assert_eq!(queue.held(), (3, 30));
        drop(permits);
        assert_eq!(queue.held(), (0, 0));
        let a = queue.admit(60, 3, 100).unwrap();
        assert!(queue.admit(41, 3, 100).is_none());
        let b = queue.admit(40, 3, 100).unwrap();
        drop((a, b));
        assert_eq!(queue.held(), (0, 0));
    }
}
