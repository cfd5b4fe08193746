//! The background-process endpoints of a session's data plane: `processes.start|list` and
//! `processes.<id>.wait|output|stdin|signal|resize`, passed to the provider (the VM's guest
//! agent, which owns the processes and their output rings).
//!
//! Architecture invariant: no process operation takes the VM's lock — a background process runs
//! beside foreground execs and lifecycle jobs; only resuming a stopped VM does. While a process
//! runs, a watcher task keeps the VM busy ([`crate::locks::VmLocks::background_started`]), so
//! the scheduler never idle-stops it and eviction never picks it.

use std::time::Duration;

use async_nats::service;
use hearth_messages::agent::{ProcessAnswer, ProcessCall};
use hearth_messages::data::CHUNK_HEADER;
use hearth_messages::processes::{
    OFFSET_HEADER, ProcessOutput, ProcessOutputRequest, ProcessResizeRequest, ProcessSignalRequest,
    ProcessStartRequest, ProcessStdinRequest, ProcessWaitRequest,
};
use hearth_messages::transport::{Reply, decode_message, encoding_of};
use hearth_messages::{Empty, Encoding, ErrorCode, SessionOp, VmId, WireError};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::data_plane::session_ended;
use super::{Worker, wire_error};
use crate::provider::VmState;

/// Most output follows open at once per session; a new one ends the oldest's window.
pub(super) const MAX_FOLLOWERS_PER_VM: usize = 32;

/// Most bytes one followed read asks the agent for: the worker never holds more per follower.
const FOLLOW_READ_BYTES: u64 = 256 << 10;
/// Longest single wait the agent is asked for while following or watching.
const POLL: Duration = Duration::from_secs(10);

/// A session's open output follows, oldest first. NATS does not tell a publisher that its
/// subscriber went away, so a follower that disconnected would hold its follow for the rest of
/// its window; beyond [`MAX_FOLLOWERS_PER_VM`] the oldest follow is ended instead (its final
/// message says the window closed, and a client still reading opens the next one from
/// `next_offset`).
#[derive(Debug, Default)]
pub(super) struct Followers {
    open: parking_lot::Mutex<std::collections::VecDeque<(u64, CancellationToken)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Followers {
    /// Registers a follow: its id and the token that ends it early.
    fn join(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut open = self.open.lock();
        open.push_back((id, token.clone()));
        while open.len() > MAX_FOLLOWERS_PER_VM {
            if let Some((_, oldest)) = open.pop_front() {
                oldest.cancel();
            }
        }
        (id, token)
    }

    fn leave(&self, id: u64) {
        self.open.lock().retain(|(i, _)| *i != id);
    }
}

/// Whether a request is an output follow (decoded here, before admission: the payload is small).
pub(super) fn is_follow(op: SessionOp, request: &service::Request) -> bool {
    op == SessionOp::ProcessOutput
        && decode::<ProcessOutputRequest>(request).is_ok_and(|r| r.follow)
}

impl Worker {
    /// Answers one process request.
    pub(super) async fn process_op(
        &self,
        op: SessionOp,
        vm_id: &VmId,
        request: &service::Request,
    ) -> Reply {
        let encoding = encoding_of(request.message.headers.as_ref());
        let ending = self.inner.ending(vm_id);
        let work = self.process_inner(op, vm_id, request, encoding);
        let result = tokio::select! {
            result = work => result,
            () = ending.cancelled() => Err(session_ended(vm_id)),
        };
        result.unwrap_or_else(|err| Reply::error(encoding, &err))
    }

    async fn process_inner(
        &self,
        op: SessionOp,
        vm_id: &VmId,
        request: &service::Request,
        encoding: Encoding,
    ) -> Result<Reply, WireError> {
        let limits = self.inner.config.processes;
        let process_id = if op.per_process() {
            let subjects = &self.inner.config.subjects;
            match subjects.parse_process_id(&request.message.subject) {
                Some(id) => id.to_owned(),
                None => return Err(WireError::not_found("no such process")),
            }
        } else {
            String::new()
        };
        match op {
            SessionOp::ProcessesStart => {
                let req: ProcessStartRequest = decode(request)?;
                req.program()?;
                self.resume_if_stopped(vm_id).await?;
                let call = ProcessCall::Start {
                    request: req,
                    ring_bytes: limits.ring_bytes,
                    max_running: limits.max_per_vm,
                };
                let started = match self.call(vm_id, call, Duration::ZERO).await? {
                    ProcessAnswer::Started(started) => started,
                    other => return Err(unexpected(&other)),
                };
                self.watch(vm_id, started.process_id.clone());
                Ok(Reply::ok(encoding, &started))
            }
            SessionOp::ProcessesList => {
                let _: Empty = decode(request)?;
                self.resume_if_stopped(vm_id).await?;
                match self
                    .call(vm_id, ProcessCall::List {}, Duration::ZERO)
                    .await?
                {
                    ProcessAnswer::List(list) => Ok(Reply::ok(encoding, &list)),
                    other => Err(unexpected(&other)),
                }
            }
            SessionOp::ProcessWait => {
                let req: ProcessWaitRequest = decode(request)?;
                let timeout_ms = req.timeout_ms()?;
                self.resume_if_stopped(vm_id).await?;
                let wait = Duration::from_millis(timeout_ms);
                let call = ProcessCall::Wait {
                    process_id: process_id.clone(),
                    timeout_ms,
                };
                match self.call(vm_id, call, wait).await? {
                    ProcessAnswer::Info(info) if info.exited => Ok(Reply::ok(encoding, &info)),
                    ProcessAnswer::Info(_) => Err(WireError::deadline(format!(
                        "process {process_id} is still running after {timeout_ms} ms; it keeps \
                         running"
                    ))),
                    other => Err(unexpected(&other)),
                }
            }
            SessionOp::ProcessOutput => {
                let req: ProcessOutputRequest = decode(request)?;
                let window = Duration::from_millis(req.timeout_ms()?);
                self.resume_if_stopped(vm_id).await?;
                let offset = req.offset.unwrap_or(0);
                if req.follow {
                    let Some(reply_to) = request.message.reply.clone() else {
                        return Err(WireError::bad_request("follow needs a reply subject"));
                    };
                    let last = self
                        .follow(vm_id, &process_id, offset, window, reply_to)
                        .await?;
                    return Ok(Reply::ok(encoding, &last));
                }
                let max = req
                    .max_bytes
                    .unwrap_or(u64::MAX)
                    .min(limits.ring_bytes)
                    .min(self.inner.max_reply_bytes() as u64);
                let call = ProcessCall::Read {
                    process_id,
                    offset,
                    max_bytes: max,
                    wait_ms: 0,
                };
                match self.call(vm_id, call, Duration::ZERO).await? {
                    ProcessAnswer::Output(output) => Ok(Reply::ok(encoding, &output)),
                    other => Err(unexpected(&other)),
                }
            }
            SessionOp::ProcessStdin => {
                let req: ProcessStdinRequest = decode(request)?;
                let data = req.data.unwrap_or_default();
                if data.len() as u64 > limits.max_stdin_bytes {
                    return Err(WireError::bad_request(format!(
                        "stdin data of {} bytes is more than the limit of {} per request",
                        data.len(),
                        limits.max_stdin_bytes
                    )));
                }
                self.resume_if_stopped(vm_id).await?;
                let call = ProcessCall::Stdin {
                    process_id,
                    data,
                    eof: req.eof,
                };
                match self.call(vm_id, call, Duration::ZERO).await? {
                    ProcessAnswer::Stdin(result) => Ok(Reply::ok(encoding, &result)),
                    other => Err(unexpected(&other)),
                }
            }
            SessionOp::ProcessSignal => {
                let req: ProcessSignalRequest = decode(request)?;
                let signal = req.number()?;
                self.resume_if_stopped(vm_id).await?;
                let call = ProcessCall::Signal { process_id, signal };
                match self.call(vm_id, call, Duration::ZERO).await? {
                    ProcessAnswer::Info(info) => Ok(Reply::ok(encoding, &info)),
                    other => Err(unexpected(&other)),
                }
            }
            SessionOp::ProcessResize => {
                let size: ProcessResizeRequest = decode(request)?;
                size.validate()?;
                self.resume_if_stopped(vm_id).await?;
                let call = ProcessCall::Resize { process_id, size };
                match self.call(vm_id, call, Duration::ZERO).await? {
                    ProcessAnswer::Done {} => Ok(Reply::ok(encoding, &Empty {})),
                    other => Err(unexpected(&other)),
                }
            }
            _ => Err(WireError::internal("unexpected subject")),
        }
    }

    async fn call(
        &self,
        vm_id: &VmId,
        call: ProcessCall,
        wait: Duration,
    ) -> Result<ProcessAnswer, WireError> {
        self.inner
            .provider
            .process(vm_id, call, wait)
            .await
            .map_err(|e| wire_error(&e))
    }

    /// A running VM is used as it is (no lock: background work runs beside foreground work); a
    /// stopped or paused one is resumed under its lock, as for an exec.
    async fn resume_if_stopped(&self, vm_id: &VmId) -> Result<(), WireError> {
        let view = self
            .inner
            .provider
            .get_vm(vm_id)
            .await
            .map_err(|e| wire_error(&e))?;
        match view.map(|v| v.state) {
            Some(VmState::Running) => Ok(()),
            Some(VmState::Stopped | VmState::Paused) => self.lock_running(vm_id).await.map(drop),
            Some(VmState::Destroyed) => Err(WireError::conflict(format!(
                "session {vm_id} has ended (its vm is destroyed)"
            ))),
            None => Err(WireError::not_found(format!("session {vm_id} not found"))),
        }
    }

    /// Streams output from `offset` to `reply_to` until the process has ended and everything was
    /// sent, or the window closes, or the worker drains; returns the final message. One read of
    /// at most [`FOLLOW_READ_BYTES`] is in flight at a time: a slow follower slows the reads,
    /// while the agent's ring drops the oldest output (the chunks' offsets then jump).
    async fn follow(
        &self,
        vm_id: &VmId,
        process_id: &str,
        offset: u64,
        window: Duration,
        reply_to: async_nats::Subject,
    ) -> Result<ProcessOutput, WireError> {
        let deadline = tokio::time::Instant::now() + window;
        let followers = self.inner.served.get(vm_id).map(|s| s.followers.clone());
        let followers = followers.unwrap_or_default();
        let (me, evicted) = followers.join();
        let result = self
            .follow_until(vm_id, process_id, offset, deadline, evicted, reply_to)
            .await;
        followers.leave(me);
        result
    }

    async fn follow_until(
        &self,
        vm_id: &VmId,
        process_id: &str,
        mut offset: u64,
        deadline: tokio::time::Instant,
        evicted: CancellationToken,
        reply_to: async_nats::Subject,
    ) -> Result<ProcessOutput, WireError> {
        let stop = self.inner.stop.clone();
        let mut found = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = left.min(POLL);
            let call = ProcessCall::Read {
                process_id: process_id.to_owned(),
                offset,
                max_bytes: FOLLOW_READ_BYTES,
                wait_ms: wait.as_millis() as u64,
            };
            let answer = tokio::select! {
                answer = self.call(vm_id, call, wait) => answer,
                () = stop.cancelled() => return self.last(vm_id, process_id, offset).await,
                () = evicted.cancelled() => return self.last(vm_id, process_id, offset).await,
            };
            // Unknown now after an earlier read found it: its agent went away between two reads
            // (and a new one answers).
            let answer = match answer {
                Err(err) if found && err.code == ErrorCode::NotFound => {
                    return Err(WireError::conflict(format!(
                        "process_lost: process {process_id} of session {vm_id} is gone with the \
                         guest agent that ran it"
                    )));
                }
                answer => answer?,
            };
            found = true;
            let mut output = match answer {
                ProcessAnswer::Output(output) => output,
                other => return Err(unexpected(&other)),
            };
            let sent = !output.chunks.is_empty();
            for chunk in std::mem::take(&mut output.chunks) {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(CHUNK_HEADER, chunk.stream.as_str());
                headers.insert(OFFSET_HEADER, chunk.offset.to_string().as_str());
                // A follower that went away costs nothing more than the window.
                let _ = self
                    .inner
                    .nats
                    .publish_with_headers(reply_to.clone(), headers, chunk.data.into_vec().into())
                    .await;
            }
            offset = output.next_offset;
            // The agent answers an ended process's read with nothing only once all was read.
            let done = output.process.exited && !sent;
            if done || left.is_zero() || tokio::time::Instant::now() >= deadline {
                return Ok(output);
            }
        }
    }

    /// The final message of a follow cut short: where to go on from.
    async fn last(
        &self,
        vm_id: &VmId,
        process_id: &str,
        offset: u64,
    ) -> Result<ProcessOutput, WireError> {
        let call = ProcessCall::Read {
            process_id: process_id.to_owned(),
            offset,
            max_bytes: 1,
            wait_ms: 0,
        };
        match self.call(vm_id, call, Duration::ZERO).await? {
            ProcessAnswer::Output(mut output) => {
                output.chunks.clear();
                output.next_offset = offset;
                Ok(output)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Keeps the VM busy while the process runs: waits for it in bounded polls until it ends,
    /// its session ends, its agent is gone, or the worker drains.
    fn watch(&self, vm_id: &VmId, process_id: String) {
        let inner = self.inner.clone();
        let vm_id = vm_id.clone();
        let ending = inner.ending(&vm_id);
        inner.locks.background_started(&vm_id);
        let stop = inner.stop.clone();
        let tasks = inner.tasks.clone();
        tasks.spawn(async move {
            loop {
                let call = ProcessCall::Wait {
                    process_id: process_id.clone(),
                    timeout_ms: POLL.as_millis() as u64,
                };
                tokio::select! {
                    answer = inner.provider.process(&vm_id, call, POLL) => match answer {
                        Ok(ProcessAnswer::Info(info)) if !info.exited => {}
                        _ => break,
                    },
                    () = ending.cancelled() => break,
                    () = stop.cancelled() => break,
                }
            }
            inner.locks.background_ended(&vm_id);
        });
    }
}

fn decode<T: DeserializeOwned>(request: &service::Request) -> Result<T, WireError> {
    decode_message::<T>(&request.message).1
}

fn unexpected(answer: &ProcessAnswer) -> WireError {
    WireError::internal(format!(
        "unexpected answer from the guest agent: {answer:?}"
    ))
}
