//! The host side of the guest agent protocol ([`hearth_messages::agent`]), shared by the VM
//! adapters: over QEMU's virtio-serial chardev socket, or over Firecracker's vsock socket after its
//! `CONNECT <port>` handshake (see [`Connector`]).
//!
//! [`AgentConn`] is one socket connection: a reader task routes reply frames to the requests
//! waiting for them by id. [`AgentLink`] is the VM's agent as the provider sees it: it (re)connects
//! on demand and only hands out a connection whose agent answered a ping, so it survives what
//! interrupts the channel (a snapshot restore, a worker restart, a lost port-open notification).
//!
//! Everything read from the guest is bounded: frames by [`hearth_messages::agent::MAX_FRAME_BYTES`], exec output by the
//! exec's cap, every wait by a deadline.
//!
//! A request whose [`Pending`] is dropped before its final reply (the caller's future was dropped,
//! or it timed out) is cancelled in the guest: a task sends `Cancel { id }` on the same connection,
//! so a command stops instead of running on until it ends by itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hearth_messages::ExecRequest;
use hearth_messages::agent::{
    AgentError, AgentFrame, AgentReply, AgentRequest, FrameError, HostFrame, OutputStreamName,
    PROTOCOL_VERSION, decode_frame, encode_frame, frame_len,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::provider::{
    ExecOutcome, ExecSpec, OutputChunk, OutputStream, Program, ProviderError, VmId,
};

/// How long a handshake ping waits before the connection is dropped and made again.
const PING_RETRY: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// How long a process call may take beyond the wait it asks the agent for.
const PROCESS_GRACE: Duration = Duration::from_secs(15);

/// How long sending a `Cancel` for a dropped request may wait for the connection's writer.
const CANCEL_SEND: Duration = Duration::from_secs(2);

/// While a handshake ping waits, how often the VMM is nudged (see [`Poke`]).
const POKE_EVERY: Duration = Duration::from_millis(50);

/// Nudges the VMM while a ping waits. QEMU reads the chardev socket only when its main loop sees
/// that the guest can take data, and a guest opening its port does not wake that loop: host bytes
/// sent before the guest was ready can sit unread until something else happens. Any QMP command
/// is such an event.
pub(crate) type Poke = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Request ids are unique across connections and provider instances, so a late reply to a request
/// of an earlier connection can never be taken for the answer to a new one.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn next_id() -> u64 {
    if NEXT_ID.load(Ordering::Relaxed) == 0 {
        let seed = crate::provider::now_ms() << 20 | u64::from(std::process::id() & 0xfffff);
        let _ = NEXT_ID.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// How to reach the agent's byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Connector {
    /// A Unix socket that is the channel itself (QEMU's chardev socket).
    Unix(PathBuf),
    /// Firecracker's host side of a vsock device: connect to `uds`, send `CONNECT <port>\n`, and
    /// after `OK <host port>\n` the socket carries the guest port's stream.
    FirecrackerVsock { uds: PathBuf, port: u32 },
}

impl Connector {
    fn path(&self) -> &Path {
        match self {
            Connector::Unix(path) => path,
            Connector::FirecrackerVsock { uds, .. } => uds,
        }
    }

    async fn connect(&self) -> std::io::Result<UnixStream> {
        let mut stream = UnixStream::connect(self.path()).await?;
        if let Connector::FirecrackerVsock { port, .. } = self {
            stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .await?;
            let line = tokio::time::timeout(Duration::from_secs(2), read_line(&mut stream))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            if !line.starts_with("OK ") {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("vsock handshake refused: {:?}", line.trim()),
                ));
            }
        }
        Ok(stream)
    }
}

/// Reads one `\n`-terminated line byte by byte (nothing past it is consumed), at most 64 bytes.
async fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    while line.len() < 64 {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "vsock handshake line too long",
    ))
}

/// The agent request that runs `spec`, within the wire's limits.
pub(crate) fn exec_request(spec: &ExecSpec) -> ExecRequest {
    let mut req = match &spec.program {
        Program::Shell(cmd) => ExecRequest::cmd(cmd.clone()),
        Program::Argv(argv) => ExecRequest::argv(argv.iter().cloned()),
    };
    req.env = spec.env.clone();
    req.cwd = spec.cwd.clone();
    req.stdin = spec.stdin.clone().map(Into::into);
    let max_timeout = hearth_messages::data::MAX_EXEC_TIMEOUT_MS;
    req.timeout_ms = Some((spec.timeout.as_millis() as u64).clamp(1, max_timeout));
    req.max_output_bytes =
        Some((spec.max_output_bytes as u64).min(hearth_messages::data::MAX_OUTPUT_BYTES));
    req
}

/// Extra time for moving `bytes` through an agent channel (about 4 MiB/s, generous for a serial
/// port under TCG).
pub(crate) fn transfer_allowance(bytes: u64) -> Duration {
    Duration::from_millis(bytes / 4096)
}

/// A failed call to the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentCallError {
    /// No final reply before the deadline (the agent is hung, or the guest is).
    #[error("guest agent did not answer {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The channel ended (QEMU exited) while waiting.
    #[error("guest agent connection lost")]
    Closed,
    /// The agent refused the request.
    #[error("{0}")]
    Agent(AgentError),
    /// The agent said something that makes no sense (a bug or a hostile guest).
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    #[error("guest agent channel: {0}")]
    Io(#[from] std::io::Error),
    /// A background process's agent went away under a call for it (see [`lost`]).
    #[error("{0}")]
    Lost(String),
}

/// The message of a background process whose agent went away: the process is gone with it.
pub(crate) fn lost(vm_id: &VmId) -> String {
    format!(
        "process_lost: the guest agent of vm {vm_id} went away while the call ran; \
         its background processes are gone"
    )
}

impl AgentCallError {
    /// The provider error of a failed call to `vm_id`'s agent, the same for every backend. A lost
    /// channel is `Internal` here: a backend that knows better why (its VMM died, the VM was
    /// stopped) says so before it falls back on this.
    pub(crate) fn for_vm(self, vm_id: &VmId) -> ProviderError {
        use hearth_messages::agent::AgentErrorKind as K;
        match self {
            AgentCallError::Timeout { .. } => ProviderError::Timeout(format!("vm {vm_id}: {self}")),
            AgentCallError::Lost(message) => ProviderError::InvalidState(message),
            AgentCallError::Agent(err) => match err.kind {
                K::InvalidArgument => ProviderError::InvalidArgument(err.message),
                K::NotFound => ProviderError::NotFound(err.message),
                K::Unsupported => ProviderError::Unsupported(err.message),
                K::NoSpace => ProviderError::NoSpace(err.message),
                K::Conflict => ProviderError::InvalidState(err.message),
                K::Quota => ProviderError::Quota(err.message),
                K::Io | K::Cancelled | K::Other => {
                    ProviderError::internal(format!("vm {vm_id}: in the guest"), err.message)
                }
            },
            e => ProviderError::internal(format!("vm {vm_id}"), e),
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<AgentReply>>>,
    closed: CancellationToken,
}

/// One connection to the agent socket.
#[derive(Debug)]
pub(crate) struct AgentConn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    reader: AbortHandle,
}

impl Drop for AgentConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Replies to one request, in order; the last one is final. Dropped before the final reply
/// arrived, it cancels the request in the guest.
pub(crate) struct Pending {
    id: u64,
    rx: mpsc::UnboundedReceiver<AgentReply>,
    shared: Arc<Shared>,
    /// Set once the request is sent (unless it is a ping), until its final reply arrives or the
    /// connection ends: the connection to send the `Cancel` on.
    cancel_on_drop: Option<Arc<AgentConn>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
        if let Some(conn) = self.cancel_on_drop.take()
            && !conn.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let id = self.id;
            runtime.spawn(async move { conn.cancel(id).await });
        }
    }
}

impl Pending {
    /// The next reply, or `Closed` when the connection ended first.
    async fn next(&mut self) -> Result<AgentReply, AgentCallError> {
        let reply = self.rx.recv().await;
        if reply.as_ref().is_none_or(AgentReply::is_final) {
            self.cancel_on_drop = None;
        }
        reply.ok_or(AgentCallError::Closed)
    }
}

impl AgentConn {
    async fn connect(connector: &Connector) -> std::io::Result<AgentConn> {
        Ok(Self::over(connector.connect().await?))
    }

    /// A connection over a stream that is already open (one end of a socketpair).
    fn over(stream: UnixStream) -> AgentConn {
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_loop(read, shared.clone())).abort_handle();
        AgentConn {
            writer: tokio::sync::Mutex::new(write),
            shared,
            reader,
        }
    }

    fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Sends `request`; its replies arrive on the returned [`Pending`], which cancels the request
    /// in the guest if dropped before the final reply (pings excepted: nothing to stop).
    pub(crate) async fn send(
        self: &Arc<Self>,
        request: AgentRequest,
    ) -> Result<Pending, AgentCallError> {
        if self.is_closed() {
            return Err(AgentCallError::Closed);
        }
        let id = next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.pending.lock().insert(id, tx);
        let mut pending = Pending {
            id,
            rx,
            shared: self.shared.clone(),
            cancel_on_drop: None,
        };
        let cancellable = !matches!(request, AgentRequest::Ping {});
        let bytes = encode_frame(&HostFrame { id, request })
            .map_err(|e| AgentCallError::Protocol(e.to_string()))?;
        self.write(&bytes).await?;
        if cancellable {
            pending.cancel_on_drop = Some(self.clone());
        }
        Ok(pending)
    }

    async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut writer = self.writer.lock().await;
        writer.write_all(bytes).await?;
        writer.flush().await
    }

    /// Asks the agent to cancel request `id`, without waiting for its answer (an agent older than
    /// `Cancel` does not answer) and giving up after [`CANCEL_SEND`]: best effort.
    async fn cancel(&self, id: u64) {
        let frame = HostFrame {
            id: next_id(),
            request: AgentRequest::Cancel { id },
        };
        let Ok(bytes) = encode_frame(&frame) else {
            return;
        };
        match tokio::time::timeout(CANCEL_SEND, self.write(&bytes)).await {
            Ok(Ok(())) => debug!(id, "asked the agent to cancel a request"),
            Ok(Err(e)) => debug!(id, error = %e, "cannot cancel an agent request"),
            Err(_) => debug!(id, "cannot cancel an agent request: the channel is stuck"),
        }
    }

    /// Sends `request` and waits for its final reply until `deadline`.
    async fn call(
        self: &Arc<Self>,
        request: AgentRequest,
        what: &'static str,
        deadline: Instant,
        started: Instant,
    ) -> Result<AgentReply, AgentCallError> {
        let mut pending = self.send(request).await?;
        loop {
            let reply = tokio::time::timeout_at(deadline, pending.next())
                .await
                .map_err(|_| AgentCallError::Timeout {
                    what,
                    after: deadline - started,
                })??;
            if reply.is_final() {
                return match reply {
                    AgentReply::Error(e) => Err(AgentCallError::Agent(e)),
                    reply => Ok(reply),
                };
            }
        }
    }
}

async fn read_loop(mut read: OwnedReadHalf, shared: Arc<Shared>) {
    loop {
        match read_frame(&mut read).await {
            Ok(frame) => {
                let is_final = frame.reply.is_final();
                let mut pending = shared.pending.lock();
                if let Some(tx) = pending.get(&frame.id) {
                    let _ = tx.send(frame.reply);
                    if is_final {
                        pending.remove(&frame.id);
                    }
                }
            }
            // The frame's length was fine, so the stream is still in step.
            Err(FrameError::Malformed(e)) => debug!(error = %e, "skipping a malformed agent frame"),
            Err(e) => {
                debug!(error = %e, "agent connection ended");
                break;
            }
        }
    }
    shared.closed.cancel();
    shared.pending.lock().clear();
}

async fn read_frame(read: &mut OwnedReadHalf) -> Result<AgentFrame, FrameError> {
    let mut header = [0u8; 4];
    read.read_exact(&mut header).await?;
    let len = frame_len(header)?;
    // Grows as bytes arrive: a lying length costs nothing up front.
    let mut body = Vec::with_capacity(len.min(1 << 20));
    (&mut *read).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    decode_frame(&body)
}

/// The agent of one VM, reached through its chardev socket, or through one stream it was handed at
/// start (a sandbox's socketpair: when that closes, the agent is gone for good).
pub(crate) struct AgentLink {
    connector: Option<Connector>,
    conn: tokio::sync::Mutex<Option<Arc<AgentConn>>>,
    poke: Option<Poke>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl AgentLink {
    pub(crate) fn new(connector: Connector, poke: Option<Poke>) -> Self {
        Self {
            connector: Some(connector),
            conn: tokio::sync::Mutex::new(None),
            poke,
        }
    }

    /// A link over `stream`, an agent's only channel: no reconnects, and once it closes every
    /// call fails with `Closed`. Needs a runtime (the reader task starts here).
    pub(crate) fn attached(stream: UnixStream) -> Self {
        Self {
            connector: None,
            conn: tokio::sync::Mutex::new(Some(Arc::new(AgentConn::over(stream)))),
            poke: None,
        }
    }

    /// The channel closed (an attached agent exited).
    pub(crate) fn is_closed(&self) -> bool {
        match self.conn.try_lock() {
            Ok(conn) => conn.as_ref().is_none_or(|c| c.is_closed()),
            Err(_) => false,
        }
    }

    /// Closes the connection without waiting (the provider is going away; the next worker
    /// connects). Best effort: a call in flight keeps it until it is done.
    pub(crate) fn detach(&self) {
        if let Ok(mut conn) = self.conn.try_lock() {
            conn.take();
        }
    }

    /// Drops the current connection; the next call makes a new one (after a restore, or when a
    /// call timed out and the channel may be stuck).
    pub(crate) async fn reset(&self) {
        if self.connector.is_some() {
            self.conn.lock().await.take();
        }
    }

    /// A connection whose agent answered a ping, reusing the current one while it is open.
    /// Connecting is retried until `deadline`; a ping that stays unanswered drops the connection
    /// and makes a new one (the host reconnecting re-announces the port to the guest).
    pub(crate) async fn ready(&self, deadline: Instant) -> Result<Arc<AgentConn>, AgentCallError> {
        let started = Instant::now();
        let mut conn_slot = self.conn.lock().await;
        if let Some(conn) = conn_slot.as_ref()
            && !conn.is_closed()
        {
            return Ok(conn.clone());
        }
        conn_slot.take();
        let Some(connector) = &self.connector else {
            return Err(AgentCallError::Closed);
        };
        let mut attempt = 0usize;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(AgentCallError::Timeout {
                    what: "a ping",
                    after: deadline - started,
                });
            }
            let conn = match AgentConn::connect(connector).await {
                Ok(conn) => Arc::new(conn),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let wait = PING_RETRY[attempt.min(PING_RETRY.len() - 1)];
            attempt += 1;
            let ping_deadline = (now + wait).min(deadline);
            let ping = conn.call(AgentRequest::Ping {}, "a ping", ping_deadline, now);
            let answer = match &self.poke {
                Some(poke) => {
                    tokio::pin!(ping);
                    loop {
                        tokio::select! {
                            answer = &mut ping => break answer,
                            _ = tokio::time::sleep(POKE_EVERY) => poke().await,
                        }
                    }
                }
                None => ping.await,
            };
            match answer {
                Ok(AgentReply::Pong(pong)) => {
                    if pong.protocol != PROTOCOL_VERSION {
                        return Err(AgentCallError::Protocol(format!(
                            "agent {} speaks protocol {}, expected {PROTOCOL_VERSION}",
                            pong.agent_version, pong.protocol
                        )));
                    }
                    *conn_slot = Some(conn.clone());
                    return Ok(conn);
                }
                Ok(other) => {
                    return Err(AgentCallError::Protocol(format!(
                        "unexpected answer to a ping: {other:?}"
                    )));
                }
                Err(AgentCallError::Timeout { .. } | AgentCallError::Closed) => {
                    debug!(socket = %connector.path().display(), attempt, "agent not answering yet, reconnecting");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request/final-reply exchange, connecting first if needed; everything by `deadline`.
    pub(crate) async fn call(
        &self,
        request: AgentRequest,
        what: &'static str,
        deadline: Instant,
    ) -> Result<AgentReply, AgentCallError> {
        let started = Instant::now();
        let conn = self.ready(deadline).await?;
        let result = conn.call(request, what, deadline, started).await;
        if matches!(result, Err(AgentCallError::Timeout { .. })) {
            self.reset().await;
        }
        result
    }

    /// A background-process operation, as [`AgentLink::process`], retried once on a fresh
    /// connection when the channel closed under a call that can be repeated (everything but a
    /// start): a connection reset is not the agent's death. Still closed, or the process unknown
    /// to the agent that answers now, is [`lost`].
    pub(crate) async fn process_call(
        &self,
        vm_id: &VmId,
        call: hearth_messages::agent::ProcessCall,
        wait: Duration,
    ) -> Result<hearth_messages::agent::ProcessAnswer, AgentCallError> {
        use hearth_messages::agent::{AgentErrorKind, ProcessCall};
        let repeatable = !matches!(call, ProcessCall::Start { .. });
        let named = !matches!(call, ProcessCall::Start { .. } | ProcessCall::List {});
        match self.process(call.clone(), wait).await {
            // A write into a channel whose agent just died fails with an I/O error instead.
            Err(AgentCallError::Closed | AgentCallError::Io(_)) if repeatable => {
                self.reset().await;
                match self.process(call, wait).await {
                    Err(AgentCallError::Closed | AgentCallError::Io(_)) => {
                        Err(AgentCallError::Lost(lost(vm_id)))
                    }
                    Err(AgentCallError::Agent(e))
                        if named && e.kind == AgentErrorKind::NotFound =>
                    {
                        Err(AgentCallError::Lost(lost(vm_id)))
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    /// A background-process operation; the agent may hold it for `wait`, and has
    /// [`PROCESS_GRACE`] beyond that (or to come up) to answer.
    pub(crate) async fn process(
        &self,
        call: hearth_messages::agent::ProcessCall,
        wait: Duration,
    ) -> Result<hearth_messages::agent::ProcessAnswer, AgentCallError> {
        let deadline = Instant::now() + wait + PROCESS_GRACE;
        match self
            .call(AgentRequest::Process(call), "a process call", deadline)
            .await?
        {
            AgentReply::Process(answer) => Ok(answer),
            other => Err(AgentCallError::Protocol(format!(
                "unexpected answer to a process call: {other:?}"
            ))),
        }
    }

    /// Writes a file through the agent (confined to its work directory there); the size written.
    /// Everything by `deadline`.
    pub(crate) async fn put_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
        deadline: Instant,
    ) -> Result<u64, AgentCallError> {
        let request = AgentRequest::PutFile(hearth_messages::FilePutRequest {
            path: path.to_owned(),
            data: data.to_vec().into(),
            mode,
        });
        match self.call(request, "a file put", deadline).await? {
            AgentReply::FileWritten(r) => Ok(r.size),
            other => Err(AgentCallError::Protocol(format!(
                "unexpected answer to a file put: {other:?}"
            ))),
        }
    }

    /// Reads a file through the agent, refusing one over `max_bytes` whatever the agent sends.
    /// Everything by `deadline`.
    pub(crate) async fn get_file(
        &self,
        path: &str,
        max_bytes: u64,
        deadline: Instant,
    ) -> Result<Vec<u8>, AgentCallError> {
        let request = AgentRequest::GetFile(hearth_messages::FileGetRequest {
            path: path.to_owned(),
            max_bytes: Some(max_bytes),
        });
        match self.call(request, "a file get", deadline).await? {
            AgentReply::FileRead(r) if r.data.len() as u64 <= max_bytes => Ok(r.data.into_vec()),
            AgentReply::FileRead(_) => Err(AgentCallError::Agent(AgentError::new(
                hearth_messages::agent::AgentErrorKind::InvalidArgument,
                format!("file {path:?} is more than the limit of {max_bytes} bytes"),
            ))),
            other => Err(AgentCallError::Protocol(format!(
                "unexpected answer to a file get: {other:?}"
            ))),
        }
    }

    /// Runs `req` in the guest, streaming its output to `chunks` (if given) and keeping at most
    /// `cap` bytes per stream whatever the guest sends. Reaching the agent may take
    /// `limits.handshake`; it then has the command's own timeout plus `limits.grace` to answer
    /// before the call fails with `Timeout`. On that timeout, or when this future is dropped before
    /// the command's result arrived, the agent is asked to cancel the command (kill it).
    pub(crate) async fn exec(
        &self,
        mut req: ExecRequest,
        cap: usize,
        chunks: Option<mpsc::Sender<OutputChunk>>,
        limits: ExecLimits,
    ) -> Result<ExecOutcome, AgentCallError> {
        let conn = self.ready(Instant::now() + limits.handshake).await?;
        let started = Instant::now();
        let deadline = started
            .checked_add(Duration::from_millis(req.timeout_ms()) + limits.grace)
            .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
        req.stream = true;
        let mut pending = conn.send(AgentRequest::Exec(req)).await?;
        let mut collector = Collector::new(cap, chunks);
        let result = loop {
            let reply = match tokio::time::timeout_at(deadline, pending.next()).await {
                Ok(reply) => reply,
                Err(_) => {
                    // Cancels the command in the guest.
                    drop(pending);
                    self.reset().await;
                    return Err(AgentCallError::Timeout {
                        what: "an exec",
                        after: deadline - started,
                    });
                }
            }?;
            match reply {
                AgentReply::Output { stream, data } => {
                    collector.push(stream, data.into_vec()).await
                }
                AgentReply::Exited(result) => break result,
                AgentReply::Error(e) => return Err(AgentCallError::Agent(e)),
                other => {
                    return Err(AgentCallError::Protocol(format!(
                        "unexpected answer to an exec: {other:?}"
                    )));
                }
            }
        };
        let mut outcome = ExecOutcome {
            exit_code: result.exit_code,
            signal: result.signal,
            stdout_truncated: result.stdout_truncated,
            stderr_truncated: result.stderr_truncated,
            timed_out: result.timed_out,
            duration: Duration::from_millis(result.duration_ms),
            ..ExecOutcome::default()
        };
        // We asked for streaming, but an agent may still return output in the result.
        collector
            .push(OutputStreamName::Stdout, result.stdout.into_vec())
            .await;
        collector
            .push(OutputStreamName::Stderr, result.stderr.into_vec())
            .await;
        collector.finish(&mut outcome);
        Ok(outcome)
    }
}

/// How long an exec may take beyond the command itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExecLimits {
    /// To reach an agent that answers a ping (only when not connected yet).
    pub handshake: Duration,
    /// For the agent to answer past the command's own timeout.
    pub grace: Duration,
}

/// Applies the cap and delivers output: to the caller's channel while it takes chunks, else into
/// the outcome.
struct Collector {
    cap: usize,
    sink: Option<mpsc::Sender<OutputChunk>>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    kept: [usize; 2],
    truncated: [bool; 2],
}

impl Collector {
    fn new(cap: usize, sink: Option<mpsc::Sender<OutputChunk>>) -> Self {
        Self {
            cap,
            sink,
            stdout: Vec::new(),
            stderr: Vec::new(),
            kept: [0; 2],
            truncated: [false; 2],
        }
    }

    async fn push(&mut self, stream: OutputStreamName, mut data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let i = usize::from(stream == OutputStreamName::Stderr);
        let room = self.cap - self.kept[i];
        if data.len() > room {
            data.truncate(room);
            self.truncated[i] = true;
        }
        if data.is_empty() {
            return;
        }
        self.kept[i] += data.len();
        let stream = match stream {
            OutputStreamName::Stdout => OutputStream::Stdout,
            OutputStreamName::Stderr => OutputStream::Stderr,
        };
        if let Some(sink) = &self.sink {
            let chunk = OutputChunk {
                stream,
                data: Bytes::from(data),
            };
            match sink.send(chunk).await {
                Ok(()) => return,
                // The receiver is gone: keep the rest for the outcome.
                Err(mpsc::error::SendError(chunk)) => {
                    self.sink = None;
                    data = chunk.data.to_vec();
                }
            }
        }
        match stream {
            OutputStream::Stdout => self.stdout.extend_from_slice(&data),
            OutputStream::Stderr => self.stderr.extend_from_slice(&data),
        }
    }

    fn finish(self, outcome: &mut ExecOutcome) {
        outcome.stdout = self.stdout;
        outcome.stderr = self.stderr;
        outcome.stdout_truncated |= self.truncated[0];
        outcome.stderr_truncated |= self.truncated[1];
    }
}

#[cfg(test)]
mod tests;
