//! The worker process's core: the NATS micro service `hearth-worker` with its jobs endpoint and the
//! per-session data plane, heartbeats, VM events, capacity and eviction, snapshot transfer through
//! the fleet's object store, and graceful drain.
//!
//! This file is the service wiring (start, reconcile, the jobs endpoint, drain); the rest is split
//! by concern: [`job_runner`] (lifecycle jobs), [`admission`] (capacity and eviction),
//! [`data_plane`] (exec and files per session), [`snapshots`] (object-store sync),
//! [`heartbeats`] (status and VM events) and [`convert`] (provider types to and from the wire).
//!
//! Architecture invariant: every operation on a VM — lifecycle job, exec, files — runs under that
//! VM's lock from [`VmLocks`]; nothing else holds a lock across an `.await`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use async_nats::service::{self, ServiceExt};
use dashmap::DashMap;
use futures::StreamExt;
use hearth_messages::transport::{self, Reply};
use hearth_messages::{SnapshotId, VmId, WireError, now_ms};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::WorkerConfig;
use crate::jobs::JobCache;
use crate::locks::VmLocks;
use crate::metrics as m;
use crate::provider::{ProviderError, VmRuntime, VmState};
use crate::state::SessionSet;

mod admission;
mod convert;
mod data_plane;
mod heartbeats;
mod job_runner;
mod snapshots;

use snapshots::open_snapshot_store;

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
    #[error("nats: {context}")]
    Nats {
        /// What was being done.
        context: String,
        /// What NATS (or the client) said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Wraps a NATS failure with what was being done, keeping it as the source.
fn nats_err<E>(context: impl Into<String>) -> impl FnOnce(E) -> WorkerError
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let context = context.into();
    move |source| WorkerError::Nats {
        context,
        source: source.into(),
    }
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
            .map_err(nats_err("starting the micro service"))?;
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
            let context = format!("serving session {vm_id}");
            self.serve(vm_id).await.map_err(nats_err(context))?;
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
            .map_err(nats_err("adding the jobs endpoint"))?;
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
}

/// Answers `request` (an error reply counts in `$SRV.STATS`, see [`transport::respond`]).
async fn respond(nats: &async_nats::Client, request: service::Request, reply: Reply) {
    if let Err(err) = transport::respond(nats, request, reply).await {
        debug!(%err, "reply not sent");
    }
}
