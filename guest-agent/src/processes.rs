//! Background processes: commands the agent runs apart from any request or connection, each with
//! its output in a bounded ring buffer ([`Ring`]) that readers page through by offset.
//!
//! - Every process leads a session of its own (`setsid`), so its process group is its own and
//!   signals go to the whole group; on a PTY the terminal is its controlling terminal (job
//!   control, `SIGWINCH` on resize, `SIGHUP` when it ends).
//! - Output is read as it comes, whether anyone reads it or not; beyond the ring's size the oldest
//!   bytes are dropped and `first_offset` says so. A reader never makes the agent keep more.
//! - When the process's main child exits, what is left of its group gets a short grace to close
//!   the output, then is killed, as for an exec; `exited` is set once all output is in the ring,
//!   so a reader that saw `exited` has seen everything.
//! - Under `--sandbox`, the sweep after every foreground exec spares the sessions of running
//!   background processes ([`protected_sessions`]); a foreground command cannot join them
//!   (`setsid` only makes new sessions, and process groups cannot cross sessions).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hearth_messages::agent::{AgentError, AgentErrorKind, OUTPUT_CHUNK_BYTES};
use hearth_messages::processes::{
    ProcessChunk, ProcessInfo, ProcessList, ProcessOutput, ProcessStarted, PtySize, StreamName,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::watch;

/// After the main child exited, how long the output may stay open before the group is killed.
const PIPE_GRACE: Duration = Duration::from_millis(100);
/// After the group is killed, how long the readers may drain what is left.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Ended processes kept for `list`, `wait` and `output` (the oldest go first).
const KEEP_ENDED: usize = 64;

/// Sessions (= pids of their leaders) of the background processes still running; see
/// [`protected_sessions`].
static SESSIONS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Held while a background process is spawned, and by the sandbox sweep: a child between `fork`
/// and `setsid` is still in the agent's session and must not be swept.
static SPAWNING: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sessions the sandbox sweep must spare, and a guard that keeps new background processes
/// from being spawned while the caller sweeps.
pub fn protected_sessions() -> (BTreeSet<i32>, MutexGuard<'static, ()>) {
    let guard = lock(&SPAWNING);
    (lock(&SESSIONS).clone(), guard)
}

/// A byte ring of output chunks, addressed by offsets since the process started.
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    /// Offset of the first byte held.
    first: u64,
    /// Offset one past the last byte held.
    end: u64,
    /// Bytes held (`end - first`).
    held: usize,
    chunks: VecDeque<(StreamName, Vec<u8>)>,
}

impl Ring {
    /// An empty ring holding at most `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            first: 0,
            end: 0,
            held: 0,
            chunks: VecDeque::new(),
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the cap.
    pub fn push(&mut self, stream: StreamName, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.end += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        self.held += data.len();
        match self.chunks.back_mut() {
            // Small writes of one stream are merged, so a chatty process costs few entries.
            Some((s, last)) if *s == stream && last.len() + data.len() <= OUTPUT_CHUNK_BYTES => {
                last.extend_from_slice(data)
            }
            _ => self.chunks.push_back((stream, data.to_vec())),
        }
        while self.held > self.cap {
            let excess = self.held - self.cap;
            let Some((_, front)) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= excess {
                self.held -= front.len();
                self.chunks.pop_front();
            } else {
                front.drain(..excess);
                self.held -= excess;
            }
        }
        self.first = self.end - self.held as u64;
    }

    /// The oldest offset held.
    pub fn first_offset(&self) -> u64 {
        self.first
    }

    /// One past the newest byte.
    pub fn end_offset(&self) -> u64 {
        self.end
    }

    /// Up to `max` bytes from `offset` (clamped to what is held), and where the next read starts.
    pub fn read(&self, offset: u64, max: usize) -> (Vec<ProcessChunk>, u64) {
        let mut at = offset.max(self.first);
        if at >= self.end {
            return (Vec::new(), offset.max(self.end));
        }
        let mut out = Vec::new();
        let mut budget = max.max(1);
        let mut chunk_start = self.first;
        for (stream, data) in &self.chunks {
            let chunk_end = chunk_start + data.len() as u64;
            if chunk_end > at && budget > 0 {
                let from = (at - chunk_start) as usize;
                let take = (data.len() - from).min(budget);
                out.push(ProcessChunk {
                    stream: *stream,
                    offset: at,
                    data: data[from..from + take].to_vec().into(),
                });
                at += take as u64;
                budget -= take;
            }
            chunk_start = chunk_end;
        }
        (out, at)
    }
}

/// What can be written to a process's stdin.
#[derive(Debug)]
enum Input {
    Pipe(ChildStdin),
    Pty(Arc<AsyncFd<OwnedFd>>),
}

#[derive(Debug)]
struct State {
    info: ProcessInfo,
    ring: Ring,
}

/// One background process.
#[derive(Debug)]
struct Proc {
    state: Mutex<State>,
    /// Bumped on every change (output, end): readers and waiters watch it.
    changed: watch::Sender<u64>,
    stdin: tokio::sync::Mutex<Option<Input>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
    pgid: i32,
}

impl Proc {
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn push(&self, stream: StreamName, data: &[u8]) {
        lock(&self.state).ring.push(stream, data);
        self.bump();
    }

    fn info(&self) -> ProcessInfo {
        lock(&self.state).info.clone()
    }
}

/// What to start, resolved by the agent.
#[derive(Debug)]
pub struct Launch {
    pub argv: Vec<OsString>,
    pub env: std::collections::BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub stdin: bool,
    pub pty: Option<PtySize>,
    pub timeout: Option<Duration>,
    pub tag: Option<String>,
    pub ring_bytes: usize,
    pub max_running: usize,
}

/// The agent's background processes.
#[derive(Debug, Default)]
pub struct Processes {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    procs: HashMap<String, Arc<Proc>>,
    /// Ids oldest first.
    order: Vec<String>,
    next: u64,
}

fn err(kind: AgentErrorKind, message: impl Into<String>) -> AgentError {
    AgentError::new(kind, message)
}

fn io_err(what: &str, e: impl std::fmt::Display) -> AgentError {
    err(AgentErrorKind::Io, format!("{what}: {e}"))
}

/// A fresh id: a counter and random bits, so that ids from before an agent restart are not
/// reused.
fn new_id(n: u64) -> String {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    let random: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("p{n}-{random}")
}

impl Processes {
    fn get(&self, id: &str) -> Result<Arc<Proc>, AgentError> {
        lock(&self.table)
            .procs
            .get(id)
            .cloned()
            .ok_or_else(|| err(AgentErrorKind::NotFound, format!("no process {id:?}")))
    }

    /// Starts a process; its supervision runs on the current runtime, apart from the caller.
    pub fn start(&self, launch: Launch) -> Result<ProcessStarted, AgentError> {
        let mut table = lock(&self.table);
        let running = table
            .procs
            .values()
            .filter(|p| !lock(&p.state).info.exited)
            .count();
        if running >= launch.max_running {
            return Err(err(
                AgentErrorKind::Quota,
                format!("{running} background processes are running, the most a session may have"),
            ));
        }
        let Some((program, args)) = launch.argv.split_first() else {
            return Err(err(AgentErrorKind::InvalidArgument, "empty argv"));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(&launch.env)
            .current_dir(&launch.cwd)
            .kill_on_drop(false);
        let pty = match launch.pty {
            Some(size) => {
                let (master, slave) =
                    crate::pty::open(size).map_err(|e| io_err("cannot open a pty", e))?;
                let dup = |fd: &OwnedFd| {
                    fd.try_clone()
                        .map_err(|e| io_err("cannot duplicate the pty", e))
                };
                cmd.stdin(Stdio::from(dup(&slave)?))
                    .stdout(Stdio::from(dup(&slave)?))
                    .stderr(Stdio::from(slave));
                let master = crate::pty::register(master)
                    .map_err(|e| io_err("cannot register the pty", e))?;
                Some(Arc::new(master))
            }
            None => {
                cmd.stdin(if launch.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
                None
            }
        };
        crate::pty::new_session(&mut cmd, pty.is_some());
        let mut child = {
            let _spawning = lock(&SPAWNING);
            let child = cmd.spawn().map_err(|e| {
                err(
                    AgentErrorKind::InvalidArgument,
                    format!("cannot run {:?}: {e}", program.to_string_lossy()),
                )
            })?;
            if let Some(pid) = child.id() {
                lock(&SESSIONS).insert(pid as i32);
            }
            child
        };
        // `cmd` holds the parent's copies of the slave: close them now, so that the master
        // reads end-of-file once the session is gone.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        table.next += 1;
        let process_id = new_id(table.next);
        let info = ProcessInfo {
            process_id: process_id.clone(),
            pid,
            argv: launch
                .argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            tag: launch.tag,
            started_ms: hearth_messages::now_ms(),
            pty: pty.is_some(),
            stdin: pty.is_some() || launch.stdin,
            ..ProcessInfo::default()
        };
        let input = match (&pty, child.stdin.take()) {
            (Some(master), _) => Some(Input::Pty(master.clone())),
            (None, Some(pipe)) => Some(Input::Pipe(pipe)),
            (None, None) => None,
        };
        let proc = Arc::new(Proc {
            state: Mutex::new(State {
                info,
                ring: Ring::new(launch.ring_bytes),
            }),
            changed: watch::channel(0).0,
            stdin: tokio::sync::Mutex::new(input),
            pty: pty.clone(),
            pgid: pid as i32,
        });
        let mut readers = Vec::new();
        if let Some(master) = pty {
            readers.push(tokio::spawn(read_pty(master, proc.clone())));
        }
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(read_pipe(
                Box::new(out),
                StreamName::Stdout,
                proc.clone(),
            )));
        }
        if let Some(errs) = child.stderr.take() {
            readers.push(tokio::spawn(read_pipe(
                Box::new(errs),
                StreamName::Stderr,
                proc.clone(),
            )));
        }
        tokio::spawn(supervise(child, proc.clone(), readers, launch.timeout));
        table.procs.insert(process_id.clone(), proc);
        table.order.push(process_id.clone());
        forget_old(&mut table);
        Ok(ProcessStarted { process_id, pid })
    }

    /// Every process held, oldest first.
    pub fn list(&self) -> ProcessList {
        let table = lock(&self.table);
        ProcessList {
            processes: table
                .order
                .iter()
                .filter_map(|id| table.procs.get(id))
                .map(|p| p.info())
                .collect(),
        }
    }

    /// Output from `offset`, waiting up to `wait` for some (or the end).
    pub async fn read(
        &self,
        id: &str,
        offset: u64,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<ProcessOutput, AgentError> {
        let proc = self.get(id)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = proc.changed.subscribe();
        loop {
            let output = {
                let state = lock(&proc.state);
                let (chunks, next_offset) = state.ring.read(offset, max_bytes);
                ProcessOutput {
                    chunks,
                    first_offset: state.ring.first_offset(),
                    next_offset,
                    process: state.info.clone(),
                }
            };
            if !output.chunks.is_empty() || output.process.exited {
                return Ok(output);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Ok(output) },
                _ = tokio::time::sleep_until(deadline) => return Ok(output),
            }
        }
    }

    /// The process once it has ended, or as it is after `wait`.
    pub async fn wait(&self, id: &str, wait: Duration) -> Result<ProcessInfo, AgentError> {
        let proc = self.get(id)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = proc.changed.subscribe();
        loop {
            let info = proc.info();
            if info.exited {
                return Ok(info);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Ok(info) },
                _ = tokio::time::sleep_until(deadline) => return Ok(proc.info()),
            }
        }
    }

    /// Writes to the process's stdin (and closes it with `eof`; a PTY gets ^D instead).
    pub async fn stdin(&self, id: &str, data: &[u8], eof: bool) -> Result<u64, AgentError> {
        let proc = self.get(id)?;
        let mut input = proc.stdin.lock().await;
        let no_stdin = || {
            err(
                AgentErrorKind::Conflict,
                format!("process {id} has no open stdin (start it with stdin: true)"),
            )
        };
        if proc.info().exited {
            return Err(err(
                AgentErrorKind::Conflict,
                format!("process {id} has ended"),
            ));
        }
        match input.as_mut() {
            None => Err(no_stdin()),
            Some(Input::Pipe(pipe)) => {
                let written = pipe.write_all(data).await;
                let _ = pipe.flush().await;
                if eof {
                    input.take();
                }
                written
                    .map(|()| data.len() as u64)
                    .map_err(|e| io_err("cannot write to stdin", e))
            }
            Some(Input::Pty(master)) => {
                write_pty(master, data).await?;
                if eof {
                    // VEOF in canonical mode: what a terminal sends for Ctrl-D.
                    write_pty(master, b"\x04").await?;
                }
                Ok(data.len() as u64)
            }
        }
    }

    /// Sends `signal` to the process's group; `Conflict` once it has ended.
    pub fn signal(&self, id: &str, signal: i32) -> Result<ProcessInfo, AgentError> {
        let proc = self.get(id)?;
        let signal = Signal::try_from(signal)
            .map_err(|_| err(AgentErrorKind::InvalidArgument, "unknown signal"))?;
        if proc.info().exited {
            return Err(err(
                AgentErrorKind::Conflict,
                format!("process {id} has ended"),
            ));
        }
        killpg(Pid::from_raw(proc.pgid), signal).map_err(|e| io_err("cannot signal", e))?;
        Ok(proc.info())
    }

    /// Resizes the process's PTY.
    pub fn resize(&self, id: &str, size: PtySize) -> Result<(), AgentError> {
        let proc = self.get(id)?;
        let Some(master) = &proc.pty else {
            return Err(err(
                AgentErrorKind::Conflict,
                format!("process {id} has no pty"),
            ));
        };
        crate::pty::resize(master.get_ref(), size).map_err(|e| io_err("cannot resize", e))
    }
}

/// Drops the oldest ended processes beyond [`KEEP_ENDED`].
fn forget_old(table: &mut Table) {
    let ended: Vec<String> = table
        .order
        .iter()
        .filter(|id| table.procs.get(*id).is_some_and(|p| p.info().exited))
        .cloned()
        .collect();
    let excess = ended.len().saturating_sub(KEEP_ENDED);
    for id in &ended[..excess] {
        table.procs.remove(id);
    }
    table.order.retain(|id| table.procs.contains_key(id));
}

type BoxedPipe = Box<dyn AsyncRead + Unpin + Send>;

async fn read_pipe(mut pipe: BoxedPipe, stream: StreamName, proc: Arc<Proc>) {
    let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => proc.push(stream, &buf[..n]),
        }
    }
}

async fn read_pty(master: Arc<AsyncFd<OwnedFd>>, proc: Arc<Proc>) {
    let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        let Ok(mut ready) = master.readable().await else {
            break;
        };
        match ready.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
            // EIO: every slave descriptor is closed (the session is gone).
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => proc.push(StreamName::Stdout, &buf[..n]),
            Err(_would_block) => continue,
        }
    }
}

async fn write_pty(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> Result<(), AgentError> {
    while !data.is_empty() {
        let mut ready = master
            .writable()
            .await
            .map_err(|e| io_err("cannot write to the pty", e))?;
        match ready.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(Into::into)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(io_err("cannot write to the pty", e)),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Waits for the process (killing its group at its timeout), drains its output, records how it
/// ended.
async fn supervise(
    mut child: tokio::process::Child,
    proc: Arc<Proc>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    timeout: Option<Duration>,
) {
    let pgid = proc.pgid;
    let kill = || {
        if pgid > 0 {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    };
    let mut timed_out = false;
    let status = match timeout {
        Some(timeout) => tokio::select! {
            status = child.wait() => status,
            _ = tokio::time::sleep(timeout) => {
                timed_out = true;
                kill();
                child.wait().await
            }
        },
        None => child.wait().await,
    };
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    let all_read = futures_join(readers);
    tokio::pin!(all_read);
    tokio::select! {
        () = &mut all_read => {}
        _ = tokio::time::sleep(PIPE_GRACE) => {
            kill();
            tokio::select! {
                () = &mut all_read => {}
                _ = tokio::time::sleep(DRAIN_GRACE) => aborts.iter().for_each(|a| a.abort()),
            }
        }
    }
    kill();
    lock(&SESSIONS).remove(&pgid);
    proc.stdin.lock().await.take();
    {
        let mut state = lock(&proc.state);
        let info = &mut state.info;
        info.exited = true;
        info.timed_out = timed_out;
        info.ended_ms = Some(hearth_messages::now_ms());
        match status {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => info.exit_code = Some(code),
                (None, Some(signal)) => {
                    info.exit_code = Some(128 + signal);
                    info.signal = Some(signal);
                }
                (None, None) => info.exit_code = Some(-1),
            },
            Err(_) => info.exit_code = Some(-1),
        }
    }
    proc.bump();
}

async fn futures_join(readers: Vec<tokio::task::JoinHandle<()>>) {
    for reader in readers {
        let _ = reader.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_drops_the_oldest_bytes_and_says_where_it_starts() {
        let mut ring = Ring::new(10);
        ring.push(StreamName::Stdout, b"hello");
        ring.push(StreamName::Stderr, b"world");
        let (chunks, next) = ring.read(0, 100);
        assert_eq!(next, 10);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].stream, StreamName::Stderr);
        assert_eq!(chunks[1].offset, 5);
        ring.push(StreamName::Stdout, b"!!!");
        assert_eq!(ring.first_offset(), 3);
        let (chunks, next) = ring.read(0, 100);
        assert_eq!(chunks[0].offset, 3);
        assert_eq!(chunks[0].data.as_bytes(), b"lo");
        assert_eq!(next, 13);
        // Longer than the ring: only its tail is kept.
        ring.push(StreamName::Stdout, &[b'x'; 25]);
        assert_eq!((ring.first_offset(), ring.end_offset()), (28, 38));
        let (chunks, _) = ring.read(0, 100);
        assert_eq!(chunks.iter().map(|c| c.data.len()).sum::<usize>(), 10);
        // Reads are bounded, and past the end give nothing.
        let (chunks, next) = ring.read(30, 3);
        assert_eq!((chunks[0].data.len(), next), (3, 33));
        let (chunks, next) = ring.read(1000, 3);
        assert!(chunks.is_empty());
        assert_eq!(next, 1000);
    }
}
