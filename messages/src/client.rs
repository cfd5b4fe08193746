//! [`HearthClient`]: the typed async client an executor embeds.
//!
//! It speaks MessagePack, sends a fresh `session_id` with every create so a retry after a timeout
//! cannot create a second session, and returns [`ClientError`]s that say whether a retry may help.
//! With feature `otel`, every request carries the current span's W3C `traceparent` (see
//! [`crate::trace`]).

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    CreateSessionRequest, Empty, ForkSessionReply, ForkSessionRequest, KeepaliveRequest,
    ListSessionsRequest, PoolsStatus, Session, SessionList, SnapshotSessionRequest, Template,
    TemplateList,
};
use crate::codec::Encoding;
use crate::data::{
    CHUNK_HEADER, CHUNK_STDERR, CHUNK_STDOUT, ExecRequest, ExecResult, FileGetRequest,
    FileGetResult, FilePutRequest, FilePutResult,
};
use crate::error::{ErrorCode, WireError};
use crate::ids::{SessionId, TemplateName};
use crate::processes::{
    OFFSET_HEADER, ProcessInfo, ProcessList, ProcessOutput, ProcessOutputRequest,
    ProcessSignalRequest, ProcessStartRequest, ProcessStarted, ProcessStdinRequest,
    ProcessStdinResult, ProcessWaitRequest, PtySize, StreamName,
};
use crate::subjects::{SessionOp, Subjects};
use crate::transport::{check_reply, decode_reply};

/// Default timeout for control requests (create adds its `wait_ms`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The scheduler's default `wait_ms` (its `claim_wait_ms`): a create that names no `wait_ms` may
/// legitimately take this long before its 503, so the client waits for it.
pub const DEFAULT_CLAIM_WAIT: Duration = Duration::from_secs(10);
/// How long, beyond the command's own timeout, an exec may wait for its VM's lock and the reply.
pub const DEFAULT_EXEC_GRACE: Duration = Duration::from_secs(30);

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error.
    #[error("hearth error {0}")]
    Service(#[from] WireError),
    /// Nobody serves the subject: the scheduler is down, or (for exec and files) the session is
    /// unknown or its worker is gone.
    #[error("no responders on {subject}")]
    NoResponders {
        /// The subject requested.
        subject: String,
    },
    /// No reply within the timeout. The request may or may not have taken effect.
    #[error("request to {subject} timed out after {timeout:?}")]
    Timeout {
        /// The subject requested.
        subject: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The NATS connection failed.
    #[error("nats: {0}")]
    Transport(String),
    /// The reply could not be decoded (a version mismatch or a bug).
    #[error("undecodable reply: {0}")]
    Decode(String),
}

impl ClientError {
    /// Whether retrying the same request later may succeed: 429, 503, 504, timeouts and no
    /// responders (a restarting scheduler). Caller errors (400, 404, 409) are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Service(err) => err.is_retryable(),
            ClientError::NoResponders { .. } | ClientError::Timeout { .. } => true,
            ClientError::Transport(_) => true,
            ClientError::Decode(_) => false,
        }
    }

    /// The service error code, if the service answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Service(err) => Some(err.code),
            _ => None,
        }
    }

    /// With a 503: how long the service asked us to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Service(err) => err.retry_after_ms.map(Duration::from_millis),
            _ => None,
        }
    }
}

/// One event of a streamed exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes the command wrote to stdout.
    Stdout(Bytes),
    /// Bytes the command wrote to stderr.
    Stderr(Bytes),
    /// The final result; its stdout/stderr hold nothing already streamed. Always last.
    Done(ExecResult),
}

/// The typed Hearth client. Cheap to clone (it shares the NATS connection).
#[derive(Debug, Clone)]
pub struct HearthClient {
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
    exec_grace: Duration,
}

impl HearthClient {
    /// A client on `nats` using the default `hearth` prefix.
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            nats,
            subjects: Subjects::default(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            exec_grace: DEFAULT_EXEC_GRACE,
        }
    }

    /// Uses the given subjects (a non-default prefix).
    pub fn with_subjects(mut self, subjects: Subjects) -> Self {
        self.subjects = subjects;
        self
    }

    /// Timeout for control requests.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Extra time an exec may take beyond its own `timeout_ms` (lock wait, transfer).
    pub fn with_exec_grace(mut self, grace: Duration) -> Self {
        self.exec_grace = grace;
        self
    }

    /// The underlying NATS client.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The subjects in use.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Claims a session. A `session_id` is generated when absent, so retrying the same request
    /// value after a timeout returns the same session instead of creating a second one.
    pub async fn create_session(
        &self,
        request: &CreateSessionRequest,
    ) -> Result<Session, ClientError> {
        let mut request = request.clone();
        if request.session_id.is_none() {
            request.session_id = Some(new_session_id());
        }
        let wait = request
            .wait_ms
            .map_or(DEFAULT_CLAIM_WAIT, Duration::from_millis);
        let timeout = self.timeout + wait;
        self.request(self.subjects.sessions_create(), &request, timeout)
            .await
    }

    /// A session by id.
    pub async fn get_session(&self, session_id: &SessionId) -> Result<Session, ClientError> {
        self.session_request(session_id, SessionOp::Get, &Empty {})
            .await
    }

    /// Sessions matching the filter.
    pub async fn list_sessions(
        &self,
        request: &ListSessionsRequest,
    ) -> Result<Vec<Session>, ClientError> {
        let list: SessionList = self
            .request(self.subjects.sessions_list(), request, self.timeout)
            .await?;
        Ok(list.sessions)
    }

    /// Extends a session's lifetime (by `ttl_s` from now, or its current TTL).
    pub async fn keepalive(
        &self,
        session_id: &SessionId,
        ttl_s: Option<u64>,
    ) -> Result<Session, ClientError> {
        self.session_request(
            session_id,
            SessionOp::Keepalive,
            &KeepaliveRequest { ttl_s },
        )
        .await
    }

    /// Ends a session now. Releasing a released session returns it again (idempotent).
    pub async fn release(&self, session_id: &SessionId) -> Result<Session, ClientError> {
        self.session_request(session_id, SessionOp::Release, &Empty {})
            .await
    }

    /// Pauses a session to disk: its VM's whole state is kept and the next exec, file transfer or
    /// keepalive resumes it. 409 while a command or file transfer runs in it.
    pub async fn pause(&self, session_id: &SessionId) -> Result<Session, ClientError> {
        self.pause_with(session_id, &crate::PauseRequest::default())
            .await
    }

    /// [`pause`](Self::pause) with a request: `upload` puts the paused state in the fleet's
    /// object store (or keeps it off), whatever the template's `pause_upload` says.
    pub async fn pause_with(
        &self,
        session_id: &SessionId,
        request: &crate::PauseRequest,
    ) -> Result<Session, ClientError> {
        // Saving a VM's memory (and uploading it) takes longer than a control request.
        self.request(
            self.subjects.session(session_id, SessionOp::Pause),
            request,
            self.timeout * 12,
        )
        .await
    }

    /// Branches a session into `request.count` new sessions (see [`ForkSessionRequest`]). Ids are
    /// generated when the request has none, so a retry of this call is safe.
    pub async fn fork(
        &self,
        session_id: &SessionId,
        request: &ForkSessionRequest,
    ) -> Result<ForkSessionReply, ClientError> {
        let mut request = request.clone();
        if request.session_ids.is_none() {
            request.session_ids = Some((0..request.count).map(|_| new_session_id()).collect());
        }
        // A live snapshot plus restores: far longer than a control request.
        self.request(
            self.subjects.session(session_id, SessionOp::Fork),
            &request,
            self.timeout * 12,
        )
        .await
    }

    /// Captures a session's VM as a new template.
    pub async fn snapshot_session(
        &self,
        session_id: &SessionId,
        template: TemplateName,
        min_ready: Option<u32>,
    ) -> Result<Template, ClientError> {
        let request = SnapshotSessionRequest {
            template,
            min_ready,
            max_ready: None,
        };
        // Snapshots copy the VM's disk; give them longer than a control request.
        self.request(
            self.subjects.session(session_id, SessionOp::Snapshot),
            &request,
            self.timeout * 6,
        )
        .await
    }

    /// Deletes a template (its owner or the operator): its pool is drained and its snapshots are
    /// deleted everywhere in the background; 409 while sessions made from it are live unless
    /// `force` (which releases them).
    pub async fn delete_template(
        &self,
        template: &TemplateName,
        force: bool,
    ) -> Result<Template, ClientError> {
        self.request(
            self.subjects.template_delete(template),
            &crate::DeleteTemplateRequest { force },
            self.timeout,
        )
        .await
    }

    /// Every tenant's quota and usage (operator credentials only).
    pub async fn quotas(&self) -> Result<crate::QuotasStatus, ClientError> {
        self.request(self.subjects.admin_quotas_get(), &Empty {}, self.timeout)
            .await
    }

    /// Sets a tenant's quota at run time, or returns it to the configured one (`None`).
    pub async fn set_quota(
        &self,
        tenant: crate::TenantId,
        quota: Option<crate::Quota>,
    ) -> Result<crate::QuotasStatus, ClientError> {
        self.request(
            self.subjects.admin_quotas_set(),
            &crate::SetQuotaRequest { tenant, quota },
            self.timeout,
        )
        .await
    }

    /// Runs the scheduler's session lifecycle pass now (`admin.maintenance`, operator only).
    pub async fn run_maintenance(&self) -> Result<crate::MaintenanceReport, ClientError> {
        self.request(self.subjects.admin_maintenance(), &Empty {}, self.timeout)
            .await
    }

    /// Every worker as the scheduler sees it (`admin.workers`, operator only).
    pub async fn workers_status(&self) -> Result<crate::WorkersStatus, ClientError> {
        self.request(self.subjects.admin_workers(), &Empty {}, self.timeout)
            .await
    }

    /// Every template.
    pub async fn list_templates(&self) -> Result<Vec<Template>, ClientError> {
        let list: TemplateList = self
            .request(self.subjects.templates_list(), &Empty {}, self.timeout)
            .await?;
        Ok(list.templates)
    }

    /// Warm pool status per template.
    pub async fn pool_status(&self) -> Result<PoolsStatus, ClientError> {
        self.request(self.subjects.pools_status(), &Empty {}, self.timeout)
            .await
    }

    /// Runs a command and waits for its result (output collected, not streamed).
    pub async fn exec(
        &self,
        session_id: &SessionId,
        request: &ExecRequest,
    ) -> Result<ExecResult, ClientError> {
        let mut request = request.clone();
        request.stream = false;
        let timeout = Duration::from_millis(request.timeout_ms()) + self.exec_grace;
        self.request(
            self.subjects.session(session_id, SessionOp::Exec),
            &request,
            timeout,
        )
        .await
    }

    /// Runs a command, streaming its output as it comes. The stream ends after
    /// [`ExecEvent::Done`] or an error.
    pub async fn exec_stream(
        &self,
        session_id: &SessionId,
        request: &ExecRequest,
    ) -> Result<impl Stream<Item = Result<ExecEvent, ClientError>> + Send + 'static, ClientError>
    {
        let mut request = request.clone();
        request.stream = true;
        let subject = self.subjects.session(session_id, SessionOp::Exec);
        let payload = Encoding::MsgPack
            .encode(&request)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let inbox = self.nats.new_inbox();
        // Subscribe before publishing: the worker may answer before we would otherwise listen.
        let subscriber = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        self.nats
            .publish_with_reply_and_headers(subject.clone(), inbox, trace_headers(), payload.into())
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        // Between two messages we wait at most the whole budget: output may pause for long.
        let budget = Duration::from_millis(request.timeout_ms()) + self.exec_grace;
        let state = (subscriber, false, subject, budget);
        Ok(futures::stream::unfold(
            state,
            |(mut subscriber, done, subject, budget)| async move {
                if done {
                    return None;
                }
                let next = tokio::time::timeout(budget, subscriber.next()).await;
                let event = match next {
                    Err(_) => Err(ClientError::Timeout {
                        subject: subject.clone(),
                        timeout: budget,
                    }),
                    Ok(None) => Err(ClientError::Transport("subscription closed".into())),
                    Ok(Some(message)) => stream_event(&message, &subject),
                };
                let finished = !matches!(event, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_)));
                Some((event, (subscriber, finished, subject, budget)))
            },
        ))
    }

    // ----- background processes ----------------------------------------------------------

    /// Starts a background process; it runs on after this call (and this client) is gone.
    pub async fn start_process(
        &self,
        session_id: &SessionId,
        request: &ProcessStartRequest,
    ) -> Result<ProcessStarted, ClientError> {
        self.session_request(session_id, SessionOp::ProcessesStart, request)
            .await
    }

    /// The session's background processes (running, and the most recent ended ones).
    pub async fn list_processes(
        &self,
        session_id: &SessionId,
    ) -> Result<Vec<ProcessInfo>, ClientError> {
        let list: ProcessList = self
            .session_request(session_id, SessionOp::ProcessesList, &Empty {})
            .await?;
        Ok(list.processes)
    }

    /// Waits up to `timeout` for the process to end; a 504 error if it still runs then (it keeps
    /// running).
    pub async fn wait_process(
        &self,
        session_id: &SessionId,
        process_id: &str,
        timeout: Duration,
    ) -> Result<ProcessInfo, ClientError> {
        let request = ProcessWaitRequest {
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        let subject = self
            .subjects
            .process(session_id, process_id, SessionOp::ProcessWait);
        self.request(subject, &request, timeout + self.timeout)
            .await
    }

    /// The output kept from `offset` on (one reply, at most what a reply carries; page on from
    /// `next_offset`).
    pub async fn process_output(
        &self,
        session_id: &SessionId,
        process_id: &str,
        offset: u64,
    ) -> Result<ProcessOutput, ClientError> {
        let request = ProcessOutputRequest {
            offset: Some(offset),
            ..ProcessOutputRequest::default()
        };
        let subject = self
            .subjects
            .process(session_id, process_id, SessionOp::ProcessOutput);
        self.request(subject, &request, self.timeout).await
    }

    /// Follows the process's output from `offset` until it ends: the events are the chunks as
    /// they come (their offsets jump where the ring dropped output), then
    /// [`ProcessEvent::Exited`]. Reattaching after a disconnect is following again from the
    /// last offset seen. Follow windows are renewed transparently.
    pub async fn follow_process(
        &self,
        session_id: &SessionId,
        process_id: &str,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<ProcessEvent, ClientError>> + Send + 'static, ClientError>
    {
        let subject = self
            .subjects
            .process(session_id, process_id, SessionOp::ProcessOutput);
        let window = Duration::from_millis(crate::processes::DEFAULT_PROCESS_WAIT_MS);
        let budget = window + self.exec_grace;
        let first = self.follow_window(&subject, offset).await?;
        let state = FollowState {
            client: self.clone(),
            subject,
            subscriber: Some(first),
            offset,
            budget,
            done: false,
        };
        Ok(futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                let subscriber = match st.subscriber.as_mut() {
                    Some(subscriber) => subscriber,
                    None => match st.client.follow_window(&st.subject, st.offset).await {
                        Ok(subscriber) => st.subscriber.insert(subscriber),
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                    },
                };
                let message = match tokio::time::timeout(st.budget, subscriber.next()).await {
                    Err(_) => {
                        st.done = true;
                        let timeout = st.budget;
                        let subject = st.subject.clone();
                        return Some((Err(ClientError::Timeout { subject, timeout }), st));
                    }
                    Ok(None) => {
                        st.done = true;
                        let e = ClientError::Transport("subscription closed".into());
                        return Some((Err(e), st));
                    }
                    Ok(Some(message)) => message,
                };
                match follow_event(&message, &st.subject) {
                    Ok(FollowMessage::Chunk(event)) => {
                        if let ProcessEvent::Output { offset, data, .. } = &event {
                            st.offset = offset + data.len() as u64;
                        }
                        return Some((Ok(event), st));
                    }
                    Ok(FollowMessage::End(output)) => {
                        st.offset = output.next_offset;
                        if output.process.exited {
                            st.done = true;
                            return Some((Ok(ProcessEvent::Exited(output.process)), st));
                        }
                        // The window closed: open the next one.
                        st.subscriber = None;
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        }))
    }

    /// Opens one follow window from `offset`: subscribes to a fresh inbox, then asks.
    async fn follow_window(
        &self,
        subject: &str,
        offset: u64,
    ) -> Result<async_nats::Subscriber, ClientError> {
        let request = ProcessOutputRequest {
            offset: Some(offset),
            follow: true,
            ..ProcessOutputRequest::default()
        };
        let payload = Encoding::MsgPack
            .encode(&request)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let inbox = self.nats.new_inbox();
        let subscriber = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        self.nats
            .publish_with_reply_and_headers(
                subject.to_owned(),
                inbox,
                trace_headers(),
                payload.into(),
            )
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(subscriber)
    }

    /// Writes to the process's stdin (a PTY's terminal input); `eof` closes it (^D on a PTY).
    pub async fn write_stdin(
        &self,
        session_id: &SessionId,
        process_id: &str,
        data: impl Into<Vec<u8>>,
        eof: bool,
    ) -> Result<u64, ClientError> {
        let request = ProcessStdinRequest {
            data: Some(data.into().into()),
            eof,
        };
        let subject = self
            .subjects
            .process(session_id, process_id, SessionOp::ProcessStdin);
        let result: ProcessStdinResult = self.request(subject, &request, self.timeout).await?;
        Ok(result.written)
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`, `HUP`, …) to the process's group.
    pub async fn signal_process(
        &self,
        session_id: &SessionId,
        process_id: &str,
        signal: &str,
    ) -> Result<ProcessInfo, ClientError> {
        let request = ProcessSignalRequest {
            signal: signal.to_owned(),
        };
        let subject = self
            .subjects
            .process(session_id, process_id, SessionOp::ProcessSignal);
        self.request(subject, &request, self.timeout).await
    }

    /// Kills the process's group (`KILL`).
    pub async fn kill_process(
        &self,
        session_id: &SessionId,
        process_id: &str,
    ) -> Result<ProcessInfo, ClientError> {
        self.signal_process(session_id, process_id, "KILL").await
    }

    /// Resizes the process's PTY (its foreground group gets `SIGWINCH`).
    pub async fn resize_process(
        &self,
        session_id: &SessionId,
        process_id: &str,
        cols: u16,
        rows: u16,
    ) -> Result<(), ClientError> {
        let subject = self
            .subjects
            .process(session_id, process_id, SessionOp::ProcessResize);
        let _: Empty = self
            .request(subject, &PtySize { cols, rows }, self.timeout)
            .await?;
        Ok(())
    }

    /// Writes a file into the session's VM.
    pub async fn put_file(
        &self,
        session_id: &SessionId,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
        mode: Option<u32>,
    ) -> Result<u64, ClientError> {
        let request = FilePutRequest {
            path: path.into(),
            data: data.into().into(),
            mode,
        };
        let result: FilePutResult = self
            .session_request(session_id, SessionOp::FilesPut, &request)
            .await?;
        Ok(result.size)
    }

    /// Reads a file from the session's VM.
    pub async fn get_file(
        &self,
        session_id: &SessionId,
        path: impl Into<String>,
    ) -> Result<Vec<u8>, ClientError> {
        let request = FileGetRequest {
            path: path.into(),
            max_bytes: None,
        };
        let result: FileGetResult = self
            .session_request(session_id, SessionOp::FilesGet, &request)
            .await?;
        Ok(result.data.into_vec())
    }

    async fn session_request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        session_id: &SessionId,
        op: SessionOp,
        request: &Req,
    ) -> Result<Resp, ClientError> {
        self.request(self.subjects.session(session_id, op), request, self.timeout)
            .await
    }

    /// Sends one request and decodes the reply. Public so tools can reach subjects this client
    /// has no method for (e.g. a worker's jobs).
    pub async fn request<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        subject: String,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let payload = Encoding::MsgPack
            .encode(request)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let message = self
            .nats
            .send_request(
                subject.clone(),
                async_nats::Request::new()
                    .payload(payload.into())
                    .headers(trace_headers())
                    .timeout(Some(timeout)),
            )
            .await
            .map_err(|err| match err.kind() {
                RequestErrorKind::NoResponders => ClientError::NoResponders {
                    subject: subject.clone(),
                },
                RequestErrorKind::TimedOut => ClientError::Timeout {
                    subject: subject.clone(),
                    timeout,
                },
                RequestErrorKind::MaxPayloadExceeded | RequestErrorKind::InvalidSubject => {
                    ClientError::Service(WireError::bad_request(err.to_string()))
                }
                _ => ClientError::Transport(err.to_string()),
            })?;
        decode_reply(&message).map_err(|err| {
            if err.code == ErrorCode::Internal && err.message.starts_with("undecodable reply") {
                ClientError::Decode(err.message)
            } else {
                ClientError::Service(err)
            }
        })
    }
}

/// Headers for a request: the current trace context (feature `otel`) or none. An empty
/// [`HeaderMap`] does not allocate.
fn trace_headers() -> HeaderMap {
    #[cfg(feature = "otel")]
    {
        crate::trace::headers()
    }
    #[cfg(not(feature = "otel"))]
    {
        HeaderMap::new()
    }
}

fn stream_event(message: &async_nats::Message, subject: &str) -> Result<ExecEvent, ClientError> {
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Err(ClientError::NoResponders {
            subject: subject.to_owned(),
        });
    }
    if let Some(kind) = message.headers.as_ref().and_then(|h| h.get(CHUNK_HEADER)) {
        return match kind.as_str() {
            CHUNK_STDOUT => Ok(ExecEvent::Stdout(message.payload.clone())),
            CHUNK_STDERR => Ok(ExecEvent::Stderr(message.payload.clone())),
            other => Err(ClientError::Decode(format!("unknown chunk kind {other:?}"))),
        };
    }
    check_reply(message)?;
    crate::transport::encoding_of(message.headers.as_ref())
        .decode(&message.payload)
        .map(ExecEvent::Done)
        .map_err(|e| ClientError::Decode(e.message))
}

/// One event of a followed process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Output bytes of `stream`, the first at `offset`.
    Output {
        /// Which stream.
        stream: StreamName,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The process ended (always last).
    Exited(ProcessInfo),
}

struct FollowState {
    client: HearthClient,
    subject: String,
    subscriber: Option<async_nats::Subscriber>,
    offset: u64,
    budget: Duration,
    done: bool,
}

enum FollowMessage {
    Chunk(ProcessEvent),
    End(ProcessOutput),
}

fn follow_event(
    message: &async_nats::Message,
    subject: &str,
) -> Result<FollowMessage, ClientError> {
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Err(ClientError::NoResponders {
            subject: subject.to_owned(),
        });
    }
    if let Some(headers) = message.headers.as_ref()
        && let Some(kind) = headers.get(CHUNK_HEADER)
    {
        let stream = match kind.as_str() {
            CHUNK_STDOUT => StreamName::Stdout,
            CHUNK_STDERR => StreamName::Stderr,
            other => return Err(ClientError::Decode(format!("unknown chunk kind {other:?}"))),
        };
        let offset = headers
            .get(OFFSET_HEADER)
            .and_then(|v| v.as_str().parse().ok())
            .ok_or_else(|| ClientError::Decode("chunk without a valid Hearth-Offset".into()))?;
        return Ok(FollowMessage::Chunk(ProcessEvent::Output {
            stream,
            offset,
            data: message.payload.clone(),
        }));
    }
    check_reply(message)?;
    crate::transport::encoding_of(message.headers.as_ref())
        .decode(&message.payload)
        .map(FollowMessage::End)
        .map_err(|e| ClientError::Decode(e.message))
}

/// A fresh session id: a UUID v4 without dashes' ambiguity (dashes are allowed in ids).
pub fn new_session_id() -> SessionId {
    SessionId::new(uuid::Uuid::new_v4().to_string()).expect("a uuid is a valid id")
}
