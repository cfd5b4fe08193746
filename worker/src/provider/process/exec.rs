//! The exec engine: runs one command in its own process group and turns it into an [`ExecOutcome`].
//!
//! Guarantees, whatever the command does:
//! - stdout and stderr are drained concurrently in 64 KiB reads; at most `max_output_bytes` per
//!   stream is kept, the rest is read and dropped (so the child never blocks on a full pipe and memory
//!   stays bounded) and flagged as truncated;
//! - streamed chunks never block pipe draining: kept bytes go through an internal queue (bounded by
//!   the cap) to a forwarder, and a slow or closed receiver only means the undelivered bytes come
//!   back in the outcome instead;
//! - on timeout the whole process group gets SIGKILL;
//! - when the main child exits, a background grandchild holding the pipes gets `pipe_grace` before the
//!   group is killed, and the group is always killed at the end: nothing from an exec outlives it
//!   (except a process that left the group with `setsid`, which only pid-namespace isolation stops);
//! - a command that cannot be spawned yields exit code 127 with the reason on stderr, like a shell;
//! - dropping the future kills the group too.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::provider::{ExecOutcome, OutputChunk, OutputStream};

/// After the group is killed, how long the readers get to drain what is left in the pipes before
/// reading stops (only a process that left the group can keep a pipe open that long).
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Read size for the output pipes.
const READ_CHUNK: usize = 64 * 1024;

/// A fully resolved command: `argv[0]` is the binary, `env` is the complete environment.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    pub argv: Vec<OsString>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub stdin: Option<Vec<u8>>,
}

/// Finds `program` on `path` (the child's PATH) like `execvp` would: names containing a `/` are
/// used as they are; `None` when nothing executable is found (the spawn then reports it).
fn resolve_program(program: &std::ffi::OsStr, path: Option<&str>) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    if program.as_bytes().contains(&b'/') {
        return None;
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Time and size limits of one exec.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub timeout: Duration,
    pub max_output_bytes: usize,
    /// How long the pipes may stay open after the main child exited before the group is killed.
    pub pipe_grace: Duration,
    /// How long a slow chunk receiver gets, after the command finished, to take the remaining
    /// chunks; what it has not taken by then is returned in the outcome.
    pub flush_grace: Duration,
}

impl Limits {
    pub(crate) fn new(timeout: Duration, max_output_bytes: usize) -> Self {
        Self {
            timeout,
            max_output_bytes,
            pipe_grace: Duration::from_millis(100),
            flush_grace: Duration::from_secs(5),
        }
    }
}

/// Told about the process group of each exec, so that stopping a VM can kill what runs in it.
pub(crate) trait GroupTracker: Send + Sync {
    /// Called right after spawn. Returning `false` (the VM stopped meanwhile) kills the group.
    fn started(&self, pgid: i32) -> bool;
    /// Called once the group has been killed, before the exec returns (or when it is dropped).
    fn finished(&self, pgid: i32);
}

/// A tracker for commands that belong to no registered VM (bootstrap during create).
#[derive(Debug)]
pub(crate) struct Untracked;

impl GroupTracker for Untracked {
    fn started(&self, _pgid: i32) -> bool {
        true
    }
    fn finished(&self, _pgid: i32) {}
}

/// SIGKILLs a process group; a group that is already gone is fine.
pub(crate) fn kill_group(pgid: i32) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Kills the group and aborts the helper tasks if the exec future is dropped half way.
struct ExecGuard<'a> {
    pgid: i32,
    tracker: &'a dyn GroupTracker,
    group_released: bool,
    tasks: Vec<AbortHandle>,
}

impl ExecGuard<'_> {
    fn release_group(&mut self) {
        if !self.group_released {
            self.group_released = true;
            kill_group(self.pgid);
            self.tracker.finished(self.pgid);
        }
    }
}

impl Drop for ExecGuard<'_> {
    fn drop(&mut self) {
        self.release_group();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What one output reader kept.
#[derive(Debug, Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

/// Runs `inv` to completion under `limits`. See the module docs for the guarantees.
pub(crate) async fn run(
    inv: Invocation,
    limits: Limits,
    chunks: Option<mpsc::Sender<OutputChunk>>,
    tracker: &dyn GroupTracker,
) -> ExecOutcome {
    let started = Instant::now();
    // A huge timeout must not overflow `Instant`; a year is "never".
    let deadline = started
        .checked_add(limits.timeout)
        .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));

    let Some((program, args)) = inv.argv.split_first() else {
        return spawn_failed("", "empty argv", started);
    };
    // Resolve a bare program name against the child's PATH here: std can spawn with posix_spawn
    // (vfork, no copy of the worker's page tables) only when the program is a path; otherwise it
    // falls back to fork + exec, which costs time proportional to the worker's memory on every
    // command. argv[0] keeps the name as given.
    let resolved = resolve_program(program, inv.env.get("PATH").map(String::as_str));
    let mut cmd = Command::new(
        resolved
            .as_ref()
            .map_or(program.as_os_str(), |p| p.as_os_str()),
    );
    cmd.arg0(program)
        .args(args)
        .env_clear()
        .envs(&inv.env)
        .current_dir(&inv.cwd)
        .process_group(0)
        .stdin(if inv.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return spawn_failed(&program.to_string_lossy(), &e.to_string(), started),
    };
    // The child is the leader of its own group, so its pid is the group id.
    let pgid = child.id().map_or(0, |pid| pid as i32);
    let mut guard = ExecGuard {
        pgid,
        tracker,
        group_released: false,
        tasks: Vec::new(),
    };
    if !tracker.started(pgid) {
        kill_group(pgid);
    }

    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), inv.stdin) {
        let task = tokio::spawn(async move {
            // A child that exits without reading its stdin is not an error.
            let _ = stdin.write_all(&data).await;
            let _ = stdin.shutdown().await;
        });
        guard.tasks.push(task.abort_handle());
    }

    // Streaming: readers push kept chunks into an unbounded queue (bounded in bytes by the cap) that
    // a forwarder feeds to the caller's bounded channel, so pipe draining never waits on the caller.
    let forward_stop = CancellationToken::new();
    let (queue_tx, forwarder) = match chunks {
        Some(sink) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(forward(rx, sink, forward_stop.clone()));
            guard.tasks.push(task.abort_handle());
            (Some(tx), Some(task))
        }
        None => (None, None),
    };
    let read_stop = CancellationToken::new();
    let mut readers = Vec::with_capacity(2);
    for (pipe, stream) in [
        (
            child.stdout.take().map(|p| Box::new(p) as BoxedPipe),
            OutputStream::Stdout,
        ),
        (
            child.stderr.take().map(|p| Box::new(p) as BoxedPipe),
            OutputStream::Stderr,
        ),
    ] {
        let task = pipe.map(|pipe| {
            tokio::spawn(read_stream(
                pipe,
                stream,
                limits.max_output_bytes,
                queue_tx.clone(),
                read_stop.clone(),
            ))
        });
        if let Some(task) = &task {
            guard.tasks.push(task.abort_handle());
        }
        readers.push(task);
    }
    drop(queue_tx);

    let mut timed_out = false;
    let status = tokio::select! {
        status = child.wait() => status,
        _ = tokio::time::sleep_until(deadline) => {
            timed_out = true;
            kill_group(pgid);
            child.wait().await
        }
    };
    let exited = Instant::now();

    let mut err_task = readers.pop().flatten();
    let mut out_task = readers.pop().flatten();
    let all_read = async {
        let out = join_captured(out_task.take()).await;
        let err = join_captured(err_task.take()).await;
        (out, err)
    };
    tokio::pin!(all_read);
    let (out, err) = tokio::select! {
        captured = &mut all_read => captured,
        _ = tokio::time::sleep(limits.pipe_grace) => {
            // Something in the group still holds the pipes open.
            kill_group(pgid);
            tokio::select! {
                captured = &mut all_read => captured,
                _ = tokio::time::sleep(DRAIN_GRACE) => {
                    // Held by a process outside the group (it called setsid): stop reading.
                    read_stop.cancel();
                    all_read.await
                }
            }
        }
    };
    guard.release_group();

    let mut outcome = ExecOutcome {
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        stdout: out.data,
        stderr: err.data,
        timed_out,
        duration: exited - started,
        ..ExecOutcome::default()
    };
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => outcome.exit_code = code,
            (None, Some(signal)) => {
                outcome.exit_code = 128 + signal;
                outcome.signal = Some(signal);
            }
            (None, None) => outcome.exit_code = -1,
        },
        Err(e) => {
            outcome.exit_code = -1;
            outcome
                .stderr
                .extend_from_slice(format!("hearth: cannot wait for command: {e}\n").as_bytes());
        }
    }

    if let Some(mut forwarder) = forwarder {
        let leftovers = tokio::select! {
            left = &mut forwarder => left,
            _ = tokio::time::sleep(limits.flush_grace) => {
                forward_stop.cancel();
                forwarder.await
            }
        }
        .unwrap_or_default();
        outcome.stdout = leftovers.stdout;
        outcome.stderr = leftovers.stderr;
    }
    drop(guard);
    outcome
}

type BoxedPipe = Box<dyn AsyncRead + Unpin + Send>;

async fn join_captured(task: Option<JoinHandle<Captured>>) -> Captured {
    match task {
        Some(task) => task.await.unwrap_or_default(),
        None => Captured::default(),
    }
}

/// Drains one pipe to EOF (or until `stop`), keeping at most `cap` bytes: in `Captured::data`, or as
/// chunks on `queue` when streaming.
async fn read_stream(
    mut pipe: BoxedPipe,
    stream: OutputStream,
    cap: usize,
    queue: Option<mpsc::UnboundedSender<OutputChunk>>,
    stop: CancellationToken,
) -> Captured {
    let mut captured = Captured::default();
    let mut kept = 0usize;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            read = pipe.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let keep = n.min(cap - kept);
        if keep < n {
            captured.truncated = true;
        }
        if keep == 0 {
            continue;
        }
        kept += keep;
        match &queue {
            Some(queue) => {
                let chunk = OutputChunk {
                    stream,
                    data: Bytes::copy_from_slice(&buf[..keep]),
                };
                // The forwarder only goes away when the exec is being torn down.
                let _ = queue.send(chunk);
            }
            None => captured.data.extend_from_slice(&buf[..keep]),
        }
    }
    captured
}

/// Output that could not be delivered as chunks.
#[derive(Debug, Default)]
struct Leftovers {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Leftovers {
    fn push(&mut self, chunk: &OutputChunk) {
        match chunk.stream {
            OutputStream::Stdout => self.stdout.extend_from_slice(&chunk.data),
            OutputStream::Stderr => self.stderr.extend_from_slice(&chunk.data),
        }
    }
}

/// Feeds queued chunks to the caller in order until the queue closes. Once the receiver is gone or
/// `stop` fires, the remaining chunks are collected instead and returned.
async fn forward(
    mut queue: mpsc::UnboundedReceiver<OutputChunk>,
    sink: mpsc::Sender<OutputChunk>,
    stop: CancellationToken,
) -> Leftovers {
    let mut leftovers = Leftovers::default();
    let mut delivering = true;
    while let Some(chunk) = queue.recv().await {
        if delivering {
            let permit = tokio::select! {
                biased;
                permit = sink.reserve() => permit.ok(),
                _ = stop.cancelled() => None,
            };
            match permit {
                Some(permit) => {
                    permit.send(chunk);
                    continue;
                }
                None => delivering = false,
            }
        }
        leftovers.push(&chunk);
    }
    leftovers
}

fn spawn_failed(program: &str, reason: &str, started: Instant) -> ExecOutcome {
    ExecOutcome {
        exit_code: 127,
        stderr: format!("hearth: cannot run {program:?}: {reason}\n").into_bytes(),
        duration: started.elapsed(),
        ..ExecOutcome::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Invocation {
        Invocation {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: crate::provider::default_env("/tmp"),
            cwd: std::env::temp_dir(),
            stdin: None,
        }
    }

    fn limits(timeout_ms: u64, cap: usize) -> Limits {
        Limits::new(Duration::from_millis(timeout_ms), cap)
    }

    #[tokio::test]
    async fn output_beyond_the_cap_is_drained_dropped_and_flagged() {
        let outcome = run(
            sh("head -c 300000 /dev/zero; echo err >&2"),
            limits(10_000, 1000),
            None,
            &Untracked,
        )
        .await;
        assert_eq!(outcome.exit_code, 0);
        assert_eq!(outcome.stdout.len(), 1000);
        assert!(outcome.stdout_truncated);
        assert_eq!(outcome.stderr, b"err\n");
        assert!(!outcome.stderr_truncated);
    }

    #[tokio::test]
    async fn output_exactly_at_the_cap_is_not_truncated() {
        let outcome = run(sh("printf abcd"), limits(10_000, 4), None, &Untracked).await;
        assert_eq!(outcome.stdout, b"abcd");
        assert!(!outcome.stdout_truncated);
    }

    #[tokio::test]
    async fn spawn_failure_is_exit_127_with_the_reason_on_stderr() {
        let mut inv = sh("");
        inv.argv = vec!["/nonexistent/hearth-binary".into()];
        let outcome = run(inv, limits(10_000, 1000), None, &Untracked).await;
        assert_eq!(outcome.exit_code, 127);
        assert!(
            String::from_utf8_lossy(&outcome.stderr).contains("hearth-binary"),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_receiver_that_never_reads_does_not_hang_the_exec() {
        let (tx, _rx) = mpsc::channel(1);
        let mut l = limits(10_000, 1 << 20);
        l.flush_grace = Duration::from_millis(200);
        let outcome = run(
            sh("echo first; sleep 0.2; echo second; sleep 0.2; echo third"),
            l,
            Some(tx),
            &Untracked,
        )
        .await;
        assert_eq!(outcome.exit_code, 0);
        assert!(!outcome.timed_out);
        // The first chunk fits in the channel; what was not delivered comes back in the outcome.
        assert_eq!(outcome.stdout, b"second\nthird\n");
    }

    #[tokio::test]
    async fn a_closed_receiver_returns_everything_in_the_outcome() {
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let outcome = run(sh("echo hello"), limits(10_000, 1000), Some(tx), &Untracked).await;
        assert_eq!(outcome.stdout, b"hello\n");
    }

    #[tokio::test]
    async fn streamed_output_counts_against_the_cap() {
        let (tx, mut rx) = mpsc::channel(1024);
        let outcome = run(
            sh("head -c 100000 /dev/zero"),
            limits(10_000, 10),
            Some(tx),
            &Untracked,
        )
        .await;
        let mut streamed = 0;
        while let Ok(chunk) = rx.try_recv() {
            streamed += chunk.data.len();
        }
        assert_eq!(streamed, 10);
        assert!(outcome.stdout.is_empty());
        assert!(outcome.stdout_truncated);
    }

    #[tokio::test]
    async fn a_process_that_left_the_group_cannot_hold_the_exec_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut inv = sh("setsid sleep 30 & echo $! > pid; echo done");
        inv.cwd = dir.path().to_path_buf();
        let started = std::time::Instant::now();
        let outcome = run(inv, limits(30_000, 1000), None, &Untracked).await;
        let escaped: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = nix::sys::signal::kill(Pid::from_raw(escaped), Signal::SIGKILL);
        assert_eq!(outcome.stdout, b"done\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[derive(Default)]
    struct Recording(parking_lot::Mutex<Vec<(bool, i32)>>);

    impl GroupTracker for Recording {
        fn started(&self, pgid: i32) -> bool {
            self.0.lock().push((true, pgid));
            false
        }
        fn finished(&self, pgid: i32) {
            self.0.lock().push((false, pgid));
        }
    }

    #[tokio::test]
    async fn a_tracker_refusing_the_group_gets_it_killed_and_is_told_when_it_ends() {
        let tracker = Recording::default();
        let outcome = run(sh("sleep 30"), limits(30_000, 1000), None, &tracker).await;
        assert_eq!(outcome.signal, Some(9));
        assert_eq!(outcome.exit_code, 137);
        let events = tracker.0.lock().clone();
        assert_eq!(events.len(), 2);
        assert!(events[0].0 && !events[1].0 && events[0].1 == events[1].1);
    }
}
