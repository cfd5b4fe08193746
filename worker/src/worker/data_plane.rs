//! The session data plane: per-session exec / files / processes endpoints, the bounded queue
//! in front of each VM, resuming a stopped VM on use, and ending a session's work.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_nats::service::{self};
use futures::StreamExt;
use hearth_messages::data::{CHUNK_HEADER, DEFAULT_MAX_FILE_BYTES};
use hearth_messages::transport::{Reply, decode_message, encoding_of};
use hearth_messages::{
    Caller, Encoding, ExecRequest, FileGetRequest, FileGetResult, FilePutRequest, FilePutResult,
    SessionId, SessionOp, VmId, WireError,
};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span};

use super::convert::{exec_result, exec_spec};
use super::{Inner, QUEUE_RETRY_AFTER_MS, REPLY_OVERHEAD, Served, Worker, respond, wire_error};
use crate::metrics as m;
use crate::provider::{OutputStream, VmState};

impl Worker {
    // ----- the session data plane -----------------------------------------------------------

    /// Subscribes the session's data subjects (three, as endpoints of the micro service, so
    /// `$SRV.STATS` counts them).
    pub(super) async fn serve(&self, vm_id: VmId) -> Result<(), WireError> {
        let inner = &self.inner;
        if inner.served.contains_key(&vm_id) {
            return Ok(());
        }
        let sid = SessionId::from(vm_id.clone());
        let mut endpoints = Vec::with_capacity(3);
        for (name, subject) in inner.config.subjects.session_data(&sid) {
            let endpoint = inner
                .service
                .endpoint_builder()
                .name(name)
                .add(subject)
                .await
                .map_err(|e| WireError::internal(format!("subscribing {name}: {e}")))?;
            endpoints.push(endpoint);
        }
        let cancel = inner.stop.child_token();
        let queue = Arc::new(DataQueue::default());
        // Process requests (long waits and follows among them) are held apart: they never take
        // the VM's lock, and must not crowd out its execs.
        let process_queue = Arc::new(DataQueue::default());
        let (max_held, max_bytes) = (
            inner.config.max_queued_per_vm,
            inner.config.max_queued_bytes_per_vm,
        );
        let max_process_requests = inner.config.processes.max_requests_per_vm;
        inner.served.insert(
            vm_id.clone(),
            Served {
                cancel: cancel.clone(),
                followers: Arc::default(),
            },
        );
        let worker = self.clone();
        let owner = inner.sessions.owner(&vm_id);
        inner.tasks.spawn(async move {
            let mut requests = futures::stream::select_all(endpoints);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = requests.next() => {
                        let Some(request) = next else { break };
                        // Another tenant's request is answered exactly as for a VM that is not
                        // here, before it can take a place in this session's queue (or learn
                        // anything else of it).
                        if let Err(err) = worker.check_owner(&vm_id, &request) {
                            let reply = Reply::error(
                                encoding_of(request.message.headers.as_ref()),
                                &err,
                            );
                            respond(&worker.inner.nats, request, reply).await;
                            continue;
                        }
                        let op = match worker.inner.config.subjects.parse_session(&request.message.subject) {
                            Ok(Some((_, op))) if SessionOp::DATA.contains(&op) => op,
                            _ => {
                                let err = WireError::bad_request(format!(
                                    "no such session operation: {}",
                                    request.message.subject
                                ));
                                let reply = Reply::error(encoding_of(request.message.headers.as_ref()), &err);
                                respond(&worker.inner.nats, request, reply).await;
                                continue;
                            }
                        };
                        let bytes = request.message.payload.len() as u64;
                        // A follow may stay open for its whole window: follows are bounded by
                        // evicting the oldest (whose client, if still there, just opens its next
                        // window), not by the queue, so followers that went away cannot lock
                        // out the ones still there.
                        if super::processes::is_follow(op, &request) {
                            let (w, vm) = (worker.clone(), vm_id.clone());
                            worker.inner.tasks.spawn(async move {
                                w.handle_data(op, vm, request).await;
                            });
                            continue;
                        }
                        let (queue, max_held) = if is_process_op(op) {
                            (&process_queue, max_process_requests)
                        } else {
                            (&queue, max_held)
                        };
                        let Some(permit) = queue.admit(bytes, max_held, max_bytes) else {
                            // Answered here, without a task: a flood costs no memory.
                            reject_queue_full(&worker.inner.nats, &vm_id, op, request, max_held, max_bytes).await;
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
            // Unsubscribe, then answer what was already delivered: a request that arrived while
            // the session ended gets 409 at once instead of waiting out its timeout.
            for mut endpoint in requests.into_iter() {
                let _ = endpoint.stop().await;
                while let Ok(Some(request)) =
                    tokio::time::timeout(std::time::Duration::from_millis(50), endpoint.next()).await
                {
                    let enc = encoding_of(request.message.headers.as_ref());
                    // (The session's owner as it was served: the journal entry is gone now.)
                    let theirs = Caller::from_headers(request.message.headers.as_ref())
                        .is_ok_and(|c| owner.as_ref().is_some_and(|o| c.owns(o.as_ref())));
                    let err = if theirs {
                        session_ended(&vm_id)
                    } else {
                        WireError::not_found(format!("session {vm_id} not found"))
                    };
                    let reply = Reply::error(enc, &err);
                    respond(&worker.inner.nats, request, reply).await;
                }
            }
        });
        Ok(())
    }

    /// Stops serving a session's data plane at once. No "ended" responder lingers: the session id
    /// may be claimed again (a retried claim) on this or another worker, and a stale responder in
    /// the same queue group would answer half of the new session's requests. An exec already
    /// queued behind a destroy still gets 409 from the VM's state.
    /// (The job runner removes the session marker and ends the VM's work: `RunnerCore::unserve`.)
    pub(super) fn stop_serving(&self, vm_id: &VmId) {
        if let Some((_, served)) = self.inner.served.remove(vm_id) {
            served.cancel.cancel();
        }
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

    pub(super) async fn handle_data(&self, op: SessionOp, vm_id: VmId, request: service::Request) {
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
                op if is_process_op(op) => self.process_op(op, &vm_id, &request).await,
                _ => Reply::error(
                    Encoding::MsgPack,
                    &WireError::internal("unexpected subject"),
                ),
            }
        }
        .instrument(span);
        let reply = hearth_messages::trace::with_remote(remote, reply).await;
        respond(&self.inner.nats, request, reply).await;
    }

    /// Takes the VM's lock and makes sure the VM is running (resuming a stopped or paused one).
    pub(super) async fn lock_running(
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
                VmState::Stopped | VmState::Paused => {
                    inner.start_vm(vm_id).await.map_err(|e| wire_error(&e))?;
                    inner.vm_event(vm_id, VmState::Running, None, None).await;
                    Ok(guard)
                }
            },
        }
    }

    pub(super) async fn exec(&self, vm_id: &VmId, request: &service::Request) -> Reply {
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

    pub(super) async fn exec_inner(
        &self,
        vm_id: &VmId,
        request: &service::Request,
        encoding: Encoding,
        req: ExecRequest,
    ) -> Reply {
        let inner = &self.inner;
        let mut spec = exec_spec(&req, &inner.config);
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

    pub(super) async fn files_put(&self, vm_id: &VmId, request: &service::Request) -> Reply {
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

    pub(super) async fn files_get(&self, vm_id: &VmId, request: &service::Request) -> Reply {
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

/// The micro-service endpoint name (and metrics label) of a data-plane operation.
fn endpoint_name(op: SessionOp) -> &'static str {
    match op {
        SessionOp::Exec => "exec",
        SessionOp::FilesPut => "files-put",
        SessionOp::FilesGet => "files-get",
        SessionOp::ProcessesStart => "processes-start",
        SessionOp::ProcessesList => "processes-list",
        SessionOp::ProcessWait => "process-wait",
        SessionOp::ProcessOutput => "process-output",
        SessionOp::ProcessStdin => "process-stdin",
        SessionOp::ProcessSignal => "process-signal",
        SessionOp::ProcessResize => "process-resize",
        _ => "other",
    }
}

/// Whether `op` is a background-process operation (served without the VM's lock).
fn is_process_op(op: SessionOp) -> bool {
    op == SessionOp::ProcessesStart || op == SessionOp::ProcessesList || op.per_process()
}

/// The answer to an exec or file transfer whose session ended (released, expired, pruned,
/// stopped) while it ran or waited.
pub(super) fn session_ended(vm_id: &VmId) -> WireError {
    WireError::conflict(format!(
        "session_ended: session {vm_id} ended while the request ran or waited; its command was killed"
    ))
}

/// The exec and file requests one session's VM holds: running, or waiting for its lock. Admission
/// happens only in the session's serve loop; permits give their share back when dropped.
#[derive(Debug, Default)]
pub(super) struct DataQueue {
    /// (requests, payload bytes) held.
    held: parking_lot::Mutex<(usize, u64)>,
}

/// One admitted request's share of its [`DataQueue`].
pub(super) struct QueuePermit {
    queue: Arc<DataQueue>,
    bytes: u64,
}

impl DataQueue {
    /// Admits a request of `bytes` if the VM then holds at most `max_held` requests and
    /// `max_bytes` payload bytes. A VM holding nothing admits any one request (a single request
    /// is bounded by the server's max_payload).
    pub(super) fn admit(
        self: &Arc<Self>,
        bytes: u64,
        max_held: usize,
        max_bytes: u64,
    ) -> Option<QueuePermit> {
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
    pub(super) fn held(&self) -> (usize, u64) {
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
pub(super) async fn reject_queue_full(
    nats: &async_nats::Client,
    vm_id: &VmId,
    op: SessionOp,
    request: service::Request,
    max_held: usize,
    max_bytes: u64,
) {
    let endpoint = endpoint_name(op);
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
    respond(nats, request, reply).await;
}

impl Inner {
    /// Largest output a reply may carry and still fit the server's max_payload.
    pub(super) fn max_reply_bytes(&self) -> usize {
        self.nats
            .server_info()
            .max_payload
            .saturating_sub(REPLY_OVERHEAD)
            .max(REPLY_OVERHEAD)
    }
}

pub(super) async fn forward_chunks(
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

pub(super) fn files_metric<T>(op: &'static str, result: &Result<T, WireError>) {
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
