//! How the core reaches the outside: [`WorkerApi`] (lifecycle jobs to one worker) and [`EventSink`]
//! (session events for observers), with their NATS implementations. The core never touches NATS
//! itself, so logic tests run it against in-process fakes with paused time.

use std::time::Duration;

use async_nats::RequestErrorKind;
use async_trait::async_trait;
use hearth_messages::transport::decode_reply;
use hearth_messages::{
    Encoding, ErrorCode, JobId, JobOp, JobOutput, JobReply, JobRequest, SessionEvent, Subjects,
    WireError, WorkerId,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a job did not produce an output.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// The worker answered with an error (404 unknown VM/snapshot, 409 wrong state or id taken,
    /// 503 no capacity, 500 provider failure, ...).
    #[error("worker error {0}")]
    Failed(WireError),
    /// Nobody answers on the worker's job subject: it is gone or restarting.
    #[error("worker unreachable")]
    Unreachable,
    /// No answer in time. The job may still complete on the worker.
    #[error("job timed out")]
    Timeout,
    /// The reply did not decode or did not fit the job.
    #[error("unexpected reply: {0}")]
    BadReply(String),
    /// This scheduler lost the leader lease: it sends no more jobs and stops waiting for replies.
    #[error("this scheduler is no longer the leader")]
    Deposed,
}

impl JobError {
    /// The worker's error code, if the worker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            JobError::Failed(e) => Some(e.code),
            _ => None,
        }
    }

    /// The worker refused for lack of capacity (try another worker).
    pub fn is_no_capacity(&self) -> bool {
        self.code() == Some(ErrorCode::NoCapacity)
    }

    /// The VM (or snapshot) the job names does not exist there, or is already destroyed.
    pub fn is_gone(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::NotFound) | Some(ErrorCode::Conflict)
        )
    }
}

/// Sends lifecycle jobs to workers.
///
/// Implementations retry a job that timed out with the same `job_id` (workers answer a repeated id
/// with the first outcome) until `timeout` has passed.
#[async_trait]
pub trait WorkerApi: Send + Sync + 'static {
    /// Runs `job` on `worker` and waits at most `timeout` for its outcome.
    async fn job(
        &self,
        worker: &WorkerId,
        job: JobRequest,
        timeout: Duration,
    ) -> Result<JobOutput, JobError>;

    /// Removes the object `key` (an uploaded paused state) from the fleet's object store; a
    /// missing object or store is success. Needs no worker: the worker that uploaded it may be
    /// gone. The default (fleets without a store) has nothing to remove.
    async fn delete_object(&self, key: &str) -> Result<(), WireError> {
        let _ = key;
        Ok(())
    }
}

/// A fresh job id.
pub fn new_job_id() -> JobId {
    JobId::new(uuid::Uuid::now_v7().simple().to_string()).expect("a uuid is a valid id")
}

/// A job with a fresh id.
/// A job with a fresh id (the [`WorkerApi`] stamps the lease revision).
pub fn job(op: JobOp) -> JobRequest {
    JobRequest {
        job_id: new_job_id(),
        op,
        lease_revision: 0,
        tenant: None,
    }
}

/// [`WorkerApi`] over NATS request/reply on `<prefix>.v1.workers.<wid>.jobs`.
#[derive(Debug, Clone)]
pub struct NatsWorkerApi {
    client: async_nats::Client,
    subjects: Subjects,
    /// The leader term's fencing token, stamped on every job.
    lease_revision: u64,
    /// Cancelled when the term ends by losing the lease: no job is sent or waited for after it.
    deposed: CancellationToken,
}

impl NatsWorkerApi {
    /// Jobs over `client`, unfenced (no lease; tests and tools).
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        Self {
            client,
            subjects,
            lease_revision: 0,
            deposed: CancellationToken::new(),
        }
    }

    /// Jobs of one leader term: each carries `lease_revision` (workers refuse older ones), and
    /// none is sent or awaited once `deposed` is cancelled.
    pub fn fenced(mut self, lease_revision: u64, deposed: CancellationToken) -> Self {
        self.lease_revision = lease_revision;
        self.deposed = deposed;
        self
    }
}

/// How long one attempt waits before the job is re-sent with the same id.
fn attempt_timeout(total: Duration) -> Duration {
    (total / 3).clamp(Duration::from_millis(500), Duration::from_secs(20))
}

#[async_trait]
impl WorkerApi for NatsWorkerApi {
    async fn job(
        &self,
        worker: &WorkerId,
        job: JobRequest,
        timeout: Duration,
    ) -> Result<JobOutput, JobError> {
        let span = tracing::info_span!(
            "job",
            otel.name = job.op.name(),
            otel.kind = "client",
            worker_id = %worker,
            job_id = %job.job_id,
            op = job.op.name(),
            vm_id = tracing::field::Empty,
        );
        if let Some(vm_id) = job.op.vm_id() {
            span.record("vm_id", tracing::field::display(vm_id));
        }
        if self.deposed.is_cancelled() {
            return Err(JobError::Deposed);
        }
        let job = JobRequest {
            lease_revision: self.lease_revision,
            ..job
        };
        tokio::select! {
            _ = self.deposed.cancelled() => Err(JobError::Deposed),
            result = self.send_job(worker, job, timeout).instrument(span) => result,
        }
    }

    async fn delete_object(&self, key: &str) -> Result<(), WireError> {
        use async_nats::jetstream::object_store::DeleteErrorKind;
        if self.deposed.is_cancelled() {
            return Err(WireError::no_capacity(
                "this scheduler is no longer the leader",
                1000,
            ));
        }
        let js = async_nats::jetstream::new(self.client.clone());
        let bucket = self.subjects.bucket(hearth_messages::Bucket::Snapshots);
        let Ok(store) = js.get_object_store(&bucket).await else {
            // No store yet: no worker ever uploaded anything.
            return Ok(());
        };
        match store.delete(key).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(WireError::internal(format!(
                "removing {key} from the object store: {e}"
            ))),
        }
    }
}

impl NatsWorkerApi {
    async fn send_job(
        &self,
        worker: &WorkerId,
        job: JobRequest,
        timeout: Duration,
    ) -> Result<JobOutput, JobError> {
        let subject = self.subjects.worker_jobs(worker);
        // The job span's trace context (nothing when no OpenTelemetry layer records it); every
        // attempt carries the same one.
        let headers = hearth_messages::trace::headers();
        let payload: bytes::Bytes = Encoding::MsgPack
            .encode(&job)
            .map_err(|e| JobError::BadReply(e.to_string()))?
            .into();
        let deadline = Instant::now() + timeout;
        let per_attempt = attempt_timeout(timeout);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(JobError::Timeout);
            }
            let request = async_nats::Request::new()
                .payload(payload.clone())
                .headers(headers.clone())
                .timeout(Some(remaining.min(per_attempt)));
            match self.client.send_request(subject.clone(), request).await {
                Ok(message) => {
                    let reply: JobReply = decode_reply(&message).map_err(|e| {
                        if e.code == ErrorCode::Internal && e.message.starts_with("undecodable") {
                            JobError::BadReply(e.message)
                        } else {
                            JobError::Failed(e)
                        }
                    })?;
                    if reply.job_id != job.job_id {
                        return Err(JobError::BadReply(format!(
                            "reply for job {} to job {}",
                            reply.job_id, job.job_id
                        )));
                    }
                    return Ok(reply.output);
                }
                Err(err) => match err.kind() {
                    RequestErrorKind::TimedOut => {
                        tracing::debug!(worker = %worker, job = %job.job_id, op = job.op.name(),
                            "job attempt timed out; re-sending with the same id");
                        continue;
                    }
                    RequestErrorKind::NoResponders => return Err(JobError::Unreachable),
                    _ => {
                        // Connection trouble: wait a little and retry within the budget.
                        tracing::debug!(worker = %worker, error = %err, "job request failed");
                        tokio::time::sleep(Duration::from_millis(100).min(remaining)).await;
                    }
                },
            }
        }
    }
}

/// Where session events go.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Publishes one event (best effort: observers may miss events; state lives in KV).
    async fn session_event(&self, event: SessionEvent);
}

/// [`EventSink`] publishing MessagePack on `<prefix>.v1.events.sessions.<sid>` and, for a
/// tenant's session, also on `<prefix>.v1.events.tenants.<tenant>.sessions.<sid>`.
#[derive(Debug, Clone)]
pub struct NatsEvents {
    client: async_nats::Client,
    subjects: Subjects,
}

impl NatsEvents {
    /// Events over `client`.
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        Self { client, subjects }
    }
}

#[async_trait]
impl EventSink for NatsEvents {
    async fn session_event(&self, event: SessionEvent) {
        let payload: bytes::Bytes = match Encoding::MsgPack.encode(&event) {
            Ok(payload) => payload.into(),
            Err(err) => {
                tracing::error!(error = %err, "encoding a session event failed");
                return;
            }
        };
        let mut subjects = vec![self.subjects.session_events(&event.session_id)];
        if let Some(tenant) = &event.tenant {
            subjects.push(
                self.subjects
                    .tenant_session_events(tenant, &event.session_id),
            );
        }
        for subject in subjects {
            if let Err(err) = self.client.publish(subject, payload.clone()).await {
                tracing::warn!(error = %err, "publishing a session event failed");
            }
        }
    }
}

/// An [`EventSink`] that drops events.
#[derive(Debug, Clone, Default)]
pub struct NoEvents;

#[async_trait]
impl EventSink for NoEvents {
    async fn session_event(&self, _event: SessionEvent) {}
}
