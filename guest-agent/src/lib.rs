//! The Hearth guest agent: runs inside a microVM as its init service and serves the
//! [agent protocol](hearth_messages::agent) over the VMM's host↔guest channel — exec with the wire
//! contract's semantics, file put/get confined to a work directory, a health ping, identity reset
//! (host name, machine id, session env, RNG reseed, clock) and clock sync.
//!
//! Shape: one blocking thread owns the channel — it opens it, reads frames and hands each request
//! to a task on a small tokio runtime; replies go through an in-order write queue drained by a
//! writer thread. When the channel ends (the host disconnected, the VM was restored from a
//! snapshot) both threads let go of it and the reader reopens it after a short pause; requests
//! still running finish and their replies are dropped.
//!
//! Each connection tracks its requests still running (id → abort handle of their task). A
//! `Cancel` from the host, answered right on the reader thread, aborts the task: dropping an exec
//! kills its process group (and in `--sandbox` mode every leftover process). Frames for a request
//! only go out while it is tracked, so a cancelled request's final reply is the `cancelled` error
//! and nothing follows it.
//!
//! The agent expects to be supervised (busybox `init` respawns it), not to be PID 1 itself: it does
//! not reap orphans.
//!
//! The same binary is the init-side process of the process provider's sandboxes:
//!
//! - `--channel stdio`: the host's end of a socketpair is the agent's fd 0; when the host closes
//!   it the agent exits (status 0) and the sandbox ends with it;
//! - `--workdir-from-cwd`: the work directory is the agent's current directory, looked up again
//!   for every request (the host may rename a VM's volume directory while the agent runs);
//! - `--sandbox`: before reading any request the agent installs a seccomp deny-list that every
//!   command inherits and makes itself undumpable; identity reset leaves the host name, clock and
//!   RNG alone (no privileges); and after every exec all processes but the sandbox's init and the
//!   agent are killed. See [`sandbox`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_messages::agent::{
    AgentError, AgentErrorKind, AgentFrame, AgentReply, AgentRequest, FrameError, HostFrame,
    PROTOCOL_VERSION, Pong, ProcessAnswer, ProcessCall, decode_frame, encode_frame, host_frame_id,
    read_frame_body,
};
use hearth_messages::data::{DEFAULT_MAX_FILE_BYTES, Program};
use hearth_messages::{ExecRequest, FileGetResult, FilePutResult};
use tokio::task::AbortHandle;

pub mod channel;
pub mod exec;
pub mod files;
pub mod identity;
pub mod processes;
mod pty;
mod rng;
pub mod sandbox;
pub mod vsock;

pub use channel::Channel;

/// Largest ring buffer a process may get (the host sends its configured size).
const MAX_RING_BYTES: u64 = 256 << 20;
/// Largest output read in one answer.
const MAX_READ_BYTES: u64 = 8 << 20;

/// Pause before reopening a channel that ended or could not be opened.
const REOPEN_PAUSE: Duration = Duration::from_millis(10);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the host is.
    pub channel: Channel,
    /// The work directory: commands' default cwd and `HOME`, the root of file paths. Created
    /// and canonicalised at start (unless `workdir_from_cwd`).
    pub workdir: PathBuf,
    /// Ignore `workdir`: the work directory is the current directory, resolved again for every
    /// request, so that it follows renames of the directory.
    pub workdir_from_cwd: bool,
    /// Where `machine-id` and `hostname` are written on identity reset (`/etc` in a guest);
    /// `None` writes neither.
    pub etc: Option<PathBuf>,
    /// Change the system on identity reset and clock sync (clock, RNG, host name). Off only for
    /// tests on a host, and in effect off in `sandbox` mode.
    pub system: bool,
    /// Run as the init-side process of a bubblewrap sandbox ([`sandbox`]).
    pub sandbox: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            channel: Channel::default(),
            workdir: PathBuf::from("/work"),
            workdir_from_cwd: false,
            etc: Some(PathBuf::from("/etc")),
            system: true,
            sandbox: false,
        }
    }
}

/// Logs one line to stderr (the guest console).
macro_rules! log {
    ($($arg:tt)*) => { eprintln!("hearth-agent: {}", format_args!($($arg)*)) };
}

/// How long requests still running get once a final channel ended (their commands are killed).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Runs the agent: forever (until the process is killed), or until the host closes a final
/// channel ([`Channel::is_final`]), which returns `Ok`.
pub fn run(config: Config) -> io::Result<()> {
    if config.sandbox {
        // Before any thread exists and before any request is read.
        sandbox::lock_down()?;
        log!("sandbox: seccomp filter on, agent not dumpable");
    }
    let workdir = if config.workdir_from_cwd {
        None
    } else {
        std::fs::create_dir_all(&config.workdir)?;
        Some(config.workdir.canonicalize()?)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let agent = Arc::new(Agent {
        workdir,
        config,
        identity: Mutex::new(identity::IdentityState::default()),
        processes: processes::Processes::default(),
    });
    let handle = runtime.handle().clone();
    log!(
        "version {} serving {:?}",
        env!("CARGO_PKG_VERSION"),
        agent.config.channel
    );
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let port = std::thread::Builder::new()
        .name("channel".into())
        .spawn(move || {
            let result = agent.serve_forever(&handle);
            let _ = done_tx.send(());
            result
        })?;
    let _ = runtime.block_on(done_rx);
    let result = port
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("channel thread panicked")));
    // Drops the requests still running: their exec guards kill what they started.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// The in-order reply queue of one connection. Closed when the connection ends; sends after that
/// are dropped.
#[derive(Clone, Debug)]
struct Outbox(Arc<Mutex<Option<std::sync::mpsc::Sender<Vec<u8>>>>>);

impl Outbox {
    fn send(&self, id: u64, reply: AgentReply) {
        let bytes = match encode_frame(&AgentFrame { id, reply }) {
            Ok(bytes) => bytes,
            Err(e) => {
                let reply = AgentReply::Error(AgentError::new(
                    AgentErrorKind::Io,
                    format!("cannot encode the reply: {e}"),
                ));
                match encode_frame(&AgentFrame { id, reply }) {
                    Ok(bytes) => bytes,
                    Err(_) => return,
                }
            }
        };
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(bytes);
        }
    }

    fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The requests of one connection still running: the abort handles of their tasks, by request id.
/// Every frame for a tracked request goes out under this lock and only while it is tracked, so
/// whoever takes a request out (its task finishing, or a `Cancel`) sends its final reply, and no
/// frame for it follows.
#[derive(Clone, Debug, Default)]
struct Inflight(Arc<Mutex<HashMap<u64, AbortHandle>>>);

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a non-final reply for `id` if it is still running.
    fn send(&self, outbox: &Outbox, id: u64, reply: AgentReply) {
        let running = self.lock();
        if running.contains_key(&id) {
            outbox.send(id, reply);
        }
    }

    /// Sends the final reply for `id` and stops tracking it, unless it was cancelled.
    fn finish(&self, outbox: &Outbox, id: u64, reply: AgentReply) {
        let mut running = self.lock();
        if running.remove(&id).is_some() {
            outbox.send(id, reply);
        }
    }

    /// Cancels `id` if it is still running: aborts its task (dropping an exec kills its process
    /// group) and sends its final `cancelled` error. Whether it was running.
    fn cancel(&self, outbox: &Outbox, id: u64) -> bool {
        let mut running = self.lock();
        let Some(task) = running.remove(&id) else {
            return false;
        };
        task.abort();
        outbox.send(
            id,
            AgentReply::Error(AgentError::new(AgentErrorKind::Cancelled, "cancelled")),
        );
        true
    }
}

#[derive(Debug)]
struct Agent {
    config: Config,
    /// `config.workdir`, canonical; `None` with `config.workdir_from_cwd`.
    workdir: Option<PathBuf>,
    identity: Mutex<identity::IdentityState>,
    /// Background processes: the agent's, not a connection's.
    processes: processes::Processes,
}

impl Agent {
    /// The work directory now, canonical.
    fn workdir(&self) -> Result<PathBuf, AgentError> {
        match &self.workdir {
            Some(dir) => Ok(dir.clone()),
            None => std::env::current_dir()
                .and_then(|dir| dir.canonicalize())
                .map_err(|e| {
                    AgentError::new(
                        AgentErrorKind::Io,
                        format!("cannot resolve the work directory (the current directory): {e}"),
                    )
                }),
        }
    }

    /// Whether identity reset and clock sync may change the system (host name, clock, RNG).
    fn system(&self) -> bool {
        self.config.system && !self.config.sandbox
    }

    /// Serves the channel: forever, or until a final channel ends (`Ok`) or cannot be opened.
    fn serve_forever(self: Arc<Self>, handle: &tokio::runtime::Handle) -> io::Result<()> {
        let mut last_error: Option<String> = None;
        loop {
            match self.config.channel.open() {
                Ok(connection) => {
                    if last_error.take().is_some() {
                        log!("channel open");
                    }
                    self.serve_connection(connection, handle);
                    if self.config.channel.is_final() {
                        log!("host closed the channel; exiting");
                        return Ok(());
                    }
                }
                Err(e) if self.config.channel.is_final() => {
                    return Err(io::Error::other(format!("cannot open the channel: {e}")));
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(&text) {
                        log!("cannot open the channel (retrying): {text}");
                        last_error = Some(text);
                    }
                }
            }
            std::thread::sleep(REOPEN_PAUSE);
        }
    }

    /// Serves one open channel until it is gone for good.
    ///
    /// On a virtio-serial port, end-of-file only means that no host is connected right now (at
    /// boot, across a restore, while a worker restarts): the port stays open and reading resumes
    /// after a pause. Closing and reopening it instead would race with QEMU, which does not look at
    /// its chardev socket again when the guest reopens the port, so a host's first bytes could sit
    /// unread. A frame cut short by a disconnect is dropped. On a Unix socket, end-of-file is final.
    fn serve_connection(
        self: &Arc<Self>,
        connection: channel::Connection,
        handle: &tokio::runtime::Handle,
    ) {
        let channel::Connection {
            mut reader,
            mut writer,
            transient_eof,
        } = connection;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let outbox = Outbox(Arc::new(Mutex::new(Some(tx))));
        // While no host is connected, a write to a virtio port blocks until one is: replies then
        // reach the next host, which ignores ids it did not send.
        let writer_thread = std::thread::spawn(move || {
            for bytes in rx {
                if writer
                    .write_all(&bytes)
                    .and_then(|()| writer.flush())
                    .is_err()
                {
                    break;
                }
            }
        });
        let inflight = Inflight::default();
        let mut host_present = true;
        loop {
            let frame = read_frame_body(&mut reader).and_then(|body| match body {
                Some(body) => match decode_frame::<HostFrame>(&body) {
                    Ok(frame) => Ok(Some(frame)),
                    Err(e) => {
                        refuse_undecodable(&body, &e, &outbox, &inflight);
                        Err(e)
                    }
                },
                None => Ok(None),
            });
            match frame {
                Ok(Some(frame)) => {
                    host_present = true;
                    self.dispatch(frame, &outbox, &inflight, handle);
                }
                // The length was fine, so the stream is still in step: skip the frame.
                Err(FrameError::Malformed(e)) => log!("skipping a malformed request: {e}"),
                Ok(None) | Err(FrameError::Truncated) if transient_eof => {
                    if host_present {
                        log!("host disconnected; waiting for the next one");
                        host_present = false;
                    }
                    std::thread::sleep(REOPEN_PAUSE);
                }
                // Out of step with this host: drop what it sends until it goes away.
                Err(FrameError::TooLarge(len)) if transient_eof => {
                    log!("frame of {len} bytes refused; discarding until the host reconnects");
                    drain_until_eof(&mut reader);
                }
                Ok(None) => break,
                Err(e) => {
                    log!("channel error, reopening: {e}");
                    break;
                }
            }
        }
        outbox.close();
        drop(reader);
        let _ = writer_thread.join();
    }

    /// Starts a request's task, tracked in `inflight`; a `Cancel` is answered right here.
    fn dispatch(
        self: &Arc<Self>,
        frame: HostFrame,
        outbox: &Outbox,
        inflight: &Inflight,
        handle: &tokio::runtime::Handle,
    ) {
        let id = frame.id;
        if let AgentRequest::Cancel { id: target } = frame.request {
            let running = inflight.cancel(outbox, target);
            outbox.send(id, AgentReply::Cancelled { running });
            return;
        }
        // Locked until the task is tracked, so that it cannot finish untracked.
        let mut running = inflight.lock();
        if running.contains_key(&id) {
            log!("refusing request {id}: a request with that id is still running");
            return;
        }
        let agent = self.clone();
        let (outbox, tracked) = (outbox.clone(), inflight.clone());
        let task = handle.spawn(async move { agent.handle(frame, outbox, tracked).await });
        running.insert(id, task.abort_handle());
    }

    async fn handle(self: Arc<Self>, frame: HostFrame, outbox: Outbox, inflight: Inflight) {
        use hearth_messages::agent::AgentRequest as R;
        let id = frame.id;
        let result = match frame.request {
            R::Ping {} => Ok(AgentReply::Pong(Pong {
                protocol: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                hostname: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            })),
            R::Exec(req) => self.exec(id, req, &outbox, &inflight).await,
            R::PutFile(req) => {
                let root = self.workdir();
                blocking(move || {
                    let root = root?;
                    files::put(&root, &req.path, req.data.as_bytes(), req.mode)
                        .map(|size| AgentReply::FileWritten(FilePutResult { size }))
                })
                .await
            }
            R::GetFile(req) => {
                let root = self.workdir();
                blocking(move || {
                    let root = root?;
                    let max = req.max_bytes.unwrap_or(DEFAULT_MAX_FILE_BYTES);
                    files::get(&root, &req.path, max).map(|data| {
                        AgentReply::FileRead(FileGetResult {
                            size: data.len() as u64,
                            data: data.into(),
                        })
                    })
                })
                .await
            }
            R::ResetIdentity(identity) => {
                let agent = self.clone();
                blocking(move || {
                    let state =
                        identity::apply(&identity, agent.system(), agent.config.etc.as_deref())?;
                    *agent.identity.lock().unwrap_or_else(|e| e.into_inner()) = state;
                    Ok(AgentReply::IdentitySet {
                        hostname: identity.hostname,
                    })
                })
                .await
            }
            R::SetClock { now_ms } => {
                if self.system() {
                    identity::set_clock(now_ms).map(|()| AgentReply::ClockSet {})
                } else {
                    Ok(AgentReply::ClockSet {})
                }
            }
            // Answered by `dispatch`, never spawned.
            R::Cancel { .. } => Ok(AgentReply::Cancelled { running: false }),
            R::Process(call) => self.process(call).await.map(AgentReply::Process),
        };
        inflight.finish(&outbox, id, result.unwrap_or_else(AgentReply::Error));
    }

    async fn exec(
        &self,
        id: u64,
        req: ExecRequest,
        outbox: &Outbox,
        inflight: &Inflight,
    ) -> Result<AgentReply, AgentError> {
        let program = req.program().map_err(invalid)?;
        let (argv, cwd, env) = self.resolve(program, req.cwd.as_deref(), &req.env)?;
        let sink: Option<exec::ChunkSink> = req.stream.then(|| {
            let (outbox, inflight) = (outbox.clone(), inflight.clone());
            Arc::new(move |stream, data: &[u8]| {
                inflight.send(
                    &outbox,
                    id,
                    AgentReply::Output {
                        stream,
                        data: data.to_vec().into(),
                    },
                );
            }) as exec::ChunkSink
        });
        let inv = exec::Invocation {
            argv,
            env,
            cwd,
            stdin: req.stdin.as_ref().map(|b| b.as_bytes().to_vec()),
            kill_leftovers: self.config.sandbox,
        };
        let result = exec::run(
            inv,
            Duration::from_millis(req.timeout_ms()),
            req.max_output_bytes() as usize,
            sink,
        )
        .await;
        Ok(AgentReply::Exited(result))
    }

    /// What a command request runs: its argv (`cmd` through `/bin/sh -c`), its cwd resolved in
    /// the work directory, and its whole environment.
    fn resolve(
        &self,
        program: Program<'_>,
        cwd: Option<&str>,
        env: &BTreeMap<String, String>,
    ) -> Result<(Vec<OsString>, PathBuf, Env), AgentError> {
        let argv: Vec<OsString> = match program {
            Program::Argv(argv) => argv.iter().map(OsString::from).collect(),
            Program::Shell(cmd) => vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        };
        let rel_cwd = files::relative_path("cwd", cwd.unwrap_or(""))?;
        let workdir = self.workdir()?;
        let cwd = files::resolve_dir(&workdir, &rel_cwd)?;
        let env = self.command_env(&workdir, env);
        Ok((argv, cwd, env))
    }

    /// A background-process operation ([`processes`]).
    async fn process(&self, call: ProcessCall) -> Result<ProcessAnswer, AgentError> {
        let ms = Duration::from_millis;
        let p = &self.processes;
        Ok(match call {
            ProcessCall::Start {
                request,
                ring_bytes,
                max_running,
            } => {
                let program = request.program().map_err(invalid)?;
                let (argv, cwd, mut env) =
                    self.resolve(program, request.cwd.as_deref(), &request.env)?;
                if request.pty.is_some() {
                    env.entry("TERM".to_owned())
                        .or_insert_with(|| "xterm-256color".to_owned());
                }
                ProcessAnswer::Started(p.start(processes::Launch {
                    argv,
                    env,
                    cwd,
                    stdin: request.stdin,
                    pty: request.pty,
                    timeout: request.timeout_ms.filter(|t| *t > 0).map(ms),
                    tag: request.tag,
                    ring_bytes: ring_bytes.clamp(1, MAX_RING_BYTES) as usize,
                    max_running: max_running as usize,
                })?)
            }
            ProcessCall::List {} => ProcessAnswer::List(p.list()),
            ProcessCall::Read {
                process_id,
                offset,
                max_bytes,
                wait_ms,
            } => {
                let max = max_bytes.clamp(1, MAX_READ_BYTES) as usize;
                ProcessAnswer::Output(p.read(&process_id, offset, max, ms(wait_ms)).await?)
            }
            ProcessCall::Wait {
                process_id,
                timeout_ms,
            } => ProcessAnswer::Info(p.wait(&process_id, ms(timeout_ms)).await?),
            ProcessCall::Stdin {
                process_id,
                data,
                eof,
            } => {
                let written = p.stdin(&process_id, data.as_bytes(), eof).await?;
                ProcessAnswer::Stdin(hearth_messages::processes::ProcessStdinResult { written })
            }
            ProcessCall::Signal { process_id, signal } => {
                ProcessAnswer::Info(p.signal(&process_id, signal)?)
            }
            ProcessCall::Resize { process_id, size } => {
                p.resize(&process_id, size)?;
                ProcessAnswer::Done {}
            }
        })
    }

    /// Defaults, then the identity's env, then the request's.
    fn command_env(
        &self,
        workdir: &std::path::Path,
        request: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::from([
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOME".to_owned(), workdir.to_string_lossy().into_owned()),
        ]);
        let identity = self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !identity.session_id.is_empty() {
            env.insert("HEARTH_SESSION_ID".to_owned(), identity.session_id);
        }
        env.extend(identity.env);
        env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

/// A command's whole environment.
type Env = BTreeMap<String, String>;

/// A request the wire types refused, as the agent's error.
fn invalid(e: hearth_messages::WireError) -> AgentError {
    AgentError::new(AgentErrorKind::InvalidArgument, e.message)
}

/// Answers a request that could not be decoded (an `op` from a newer host) with `Unsupported`, if
/// its id can be read and is not that of a request still running.
fn refuse_undecodable(body: &[u8], error: &FrameError, outbox: &Outbox, inflight: &Inflight) {
    let Some(id) = host_frame_id(body) else {
        return;
    };
    if inflight.lock().contains_key(&id) {
        return;
    }
    let message = format!("request not supported by this agent: {error}");
    outbox.send(
        id,
        AgentReply::Error(AgentError::new(AgentErrorKind::Unsupported, message)),
    );
}

/// Reads and discards until end-of-file (the host went away) or an error.
fn drain_until_eof(reader: &mut Box<dyn channel::ReadHalf>) {
    let mut buf = [0u8; 64 * 1024];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
}

async fn blocking<F>(f: F) -> Result<AgentReply, AgentError>
where
    F: FnOnce() -> Result<AgentReply, AgentError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(AgentError::new(
            AgentErrorKind::Io,
            format!("request task failed: {e}"),
        ))
    })
}
