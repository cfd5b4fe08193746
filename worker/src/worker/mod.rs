//! The worker process's core: the NATS micro service `hearth-worker` with its jobs endpoint and the
//! per-session data plane, heartbeats, VM events, capacity and eviction, snapshot transfer through
//! the fleet's object store, and graceful drain.
//!
//! This file is the service wiring (start, reconcile, the jobs endpoint, drain, and [`NatsHost`],
//! the NATS side the job runner asks for); the rest is split by concern: [`runner`] (the job
//! runner's state and its host trait, no NATS), [`job_runner`] (lifecycle jobs), [`admission`]
//! (capacity and eviction),
//! [`data_plane`] (exec and files per session), [`snapshots`] (object-store sync),
//! [`heartbeats`] (status and VM events) and [`convert`] (provider types to and from the wire).
//!
//! Architecture invariant: every operation on a VM — lifecycle job, exec, files — runs under that
//! VM's lock from [`VmLocks`]; nothing else holds a lock across an `.await`.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use async_nats::service::{self, ServiceExt};
use dashmap::DashMap;
use futures::StreamExt;
use hearth_messages::transport::{self, Reply};
use hearth_messages::{SnapshotId, VmEvent, VmId, WireError, now_ms};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::WorkerConfig;
use crate::metrics as m;
use crate::provider::{ProviderError, VmRuntime, VmState};

mod admission;
mod convert;
mod data_plane;
mod heartbeats;
mod job_runner;
mod processes;
mod runner;
mod snapshots;

use runner::RunnerCore;
pub use runner::{JobHost, JobRunner, MemoryHost, MemoryObjects, MemoryStore};

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
    /// The session's open output follows (see [`processes::Followers`]).
    followers: Arc<processes::Followers>,
}

/// The worker. Cheap to clone; all clones share one state.
#[derive(Clone, Debug)]
pub struct Worker {
    inner: Arc<Inner>,
}

/// The NATS worker's state: the job runner's ([`RunnerCore`], reached through `Deref`, so
/// `inner.locks`, `inner.provider`, `inner.config`, … are the runner's) and the service's own.
struct Inner {
    core: Arc<RunnerCore>,
    nats: async_nats::Client,
    service: service::Service,
    store: ObjectStore,
    served: DashMap<VmId, Served>,
    started_ms: u64,
    seq: AtomicU64,
    execs_in_flight: AtomicU32,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Stops heartbeats: only when the drain is over, so the scheduler sees `draining` until then.
    heartbeat_stop: CancellationToken,
}

impl std::ops::Deref for Inner {
    type Target = RunnerCore;

    fn deref(&self) -> &RunnerCore {
        &self.core
    }
}

/// The NATS service as the job runner's host: VM events on `events.vms.<wid>`, session data
/// planes as micro-service endpoints, snapshots in the JetStream object store.
struct NatsHost {
    /// Set once the worker exists (the worker holds the runner that holds this host).
    inner: OnceLock<Weak<Inner>>,
}

impl NatsHost {
    fn worker(&self) -> Option<Worker> {
        let inner = self.inner.get()?.upgrade()?;
        Some(Worker { inner })
    }
}

fn gone() -> WireError {
    WireError::no_capacity("worker is shutting down", RETRY_AFTER_MS)
}

#[async_trait::async_trait]
impl JobHost for NatsHost {
    async fn vm_event(&self, event: VmEvent) {
        if let Some(w) = self.worker() {
            w.inner.publish_vm_event(&event).await;
        }
    }

    async fn serve_session(&self, vm_id: &VmId) -> Result<(), WireError> {
        self.worker().ok_or_else(gone)?.serve(vm_id.clone()).await
    }

    fn stop_serving(&self, vm_id: &VmId) {
        if let Some(w) = self.worker() {
            w.stop_serving(vm_id);
        }
    }

    async fn upload_snapshot(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<(), WireError> {
        let w = self.worker().ok_or_else(gone)?;
        w.inner.upload_to_store(provider, snapshot_id).await
    }

    async fn download_snapshot(
        &self,
        provider: &Arc<dyn VmRuntime>,
        snapshot_id: &SnapshotId,
    ) -> Result<u64, WireError> {
        let w = self.worker().ok_or_else(gone)?;
        w.inner.download_from_store(provider, snapshot_id).await
    }

    async fn unpublish_snapshot(&self, snapshot_id: &SnapshotId) -> Result<(), WireError> {
        let w = self.worker().ok_or_else(gone)?;
        w.inner.delete_from_store(snapshot_id).await
    }

    async fn is_published(&self, snapshot_id: &SnapshotId) -> bool {
        match self.worker() {
            Some(w) => w.inner.in_store(snapshot_id).await,
            None => false,
        }
    }

    async fn upload_paused(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<u64, WireError> {
        let w = self.worker().ok_or_else(gone)?;
        w.inner.upload_paused_to_store(provider, vm_id, key).await
    }

    async fn download_paused(
        &self,
        provider: &Arc<dyn VmRuntime>,
        vm_id: &VmId,
        key: &str,
    ) -> Result<crate::provider::VmView, WireError> {
        let w = self.worker().ok_or_else(gone)?;
        w.inner
            .download_paused_from_store(provider, vm_id, key)
            .await
    }
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
        let host = Arc::new(NatsHost {
            inner: OnceLock::new(),
        });
        let runner = JobRunner::new(config.clone(), provider.clone(), host.clone())?;
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
        let inner = Arc::new(Inner {
            core: runner.core,
            nats,
            service,
            store,
            served: DashMap::new(),
            started_ms: now_ms(),
            seq: AtomicU64::new(0),
            execs_in_flight: AtomicU32::new(0),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            heartbeat_stop: CancellationToken::new(),
        });
        let _ = host.inner.set(Arc::downgrade(&inner));
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
