//! The exec engine, the only one: runs one command in its own process group and turns it into an
//! [`ExecResult`]. Every provider runs commands through it — inside QEMU and Firecracker guests,
//! and as the first process of every process-provider sandbox — so a command behaves the same on
//! every provider:
//!
//! - stdout and stderr are drained concurrently; at most `max_output_bytes` per stream is kept, the
//!   rest is read and dropped (the child never blocks on a full pipe, memory stays bounded) and
//!   flagged as truncated; streamed chunks count against the cap too;
//! - on timeout the whole process group gets SIGKILL and the result says `timed_out`;
//! - when the main child exits, a background process still holding the pipes gets a short grace,
//!   then the group is killed; the group is always killed at the end;
//! - a command that cannot be spawned yields exit code 127 with the reason on stderr, like a shell;
//! - dropping the future kills the group too;
//! - with [`Invocation::kill_leftovers`] (`--sandbox` only), once the exec is over — normal exit,
//!   timeout or the future dropped — every other process of the sandbox is killed as well, so a
//!   `setsid` or double-forked child cannot outlive its exec (see [`crate::sandbox`]).
//!
//! Streamed chunks never wait on a slow receiver: they go straight into the connection's
//! unbounded write queue (bounded in bytes by the cap), in order, before the result.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use hearth_messages::ExecResult;
use hearth_messages::agent::{OUTPUT_CHUNK_BYTES, OutputStreamName};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// After the main child exited, how long the pipes may stay open before the group is killed.
const PIPE_GRACE: Duration = Duration::from_millis(100);
/// After the group is killed, how long the readers may drain what is left (only a process that left
/// the group can hold a pipe open that long).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// A fully resolved command: `argv[0]` is the program, `env` the complete environment.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub argv: Vec<OsString>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub stdin: Option<Vec<u8>>,
    /// When the exec is over, kill every process but pid 1 and the agent
    /// ([`crate::sandbox::kill_leftovers`]). Only in `--sandbox` mode, where the agent is alone in
    /// its pid namespace and commands run one at a time; never in a VM guest.
    pub kill_leftovers: bool,
}

/// Receives streamed output chunks (each at most [`OUTPUT_CHUNK_BYTES`]); must not block.
pub type ChunkSink = std::sync::Arc<dyn Fn(OutputStreamName, &[u8]) + Send + Sync>;

/// SIGKILLs a process group; a group that is already gone is fine.
fn kill_group(pgid: i32) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Kills the group (and in the sandbox every leftover process) and aborts the helper tasks when
/// dropped (also when the exec future is).
struct GroupGuard {
    pgid: i32,
    kill_leftovers: bool,
    tasks: Vec<AbortHandle>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.pgid);
        if self.kill_leftovers {
            sweep();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Kills the sandbox's leftover processes, logging a failure (the next exec tries again).
fn sweep() {
    if let Err(e) = crate::sandbox::kill_leftovers() {
        eprintln!("hearth-agent: {e}");
    }
}

#[derive(Debug, Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

/// Runs `inv` to completion. With a `sink`, kept output is streamed instead of returned.
pub async fn run(
    inv: Invocation,
    timeout: Duration,
    max_output_bytes: usize,
    sink: Option<ChunkSink>,
) -> ExecResult {
    let started = Instant::now();
    let deadline = started
        .checked_add(timeout)
        .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
    let Some((program, args)) = inv.argv.split_first() else {
        return spawn_failed("", "empty argv", started);
    };
    // A command that could not even start leaves nothing behind; one that could always goes
    // through the guard below.
    let mut cmd = Command::new(program);
    cmd.args(args)
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
    let pgid = child.id().map_or(0, |pid| pid as i32);
    let mut guard = GroupGuard {
        pgid,
        kill_leftovers: inv.kill_leftovers,
        tasks: Vec::new(),
    };
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), inv.stdin) {
        let task = tokio::spawn(async move {
            // A child that exits without reading its stdin is not an error.
            let _ = stdin.write_all(&data).await;
            let _ = stdin.shutdown().await;
        });
        guard.tasks.push(task.abort_handle());
    }
    let stop = tokio_stop();
    let out = child.stdout.take().map(|p| {
        spawn_reader(
            Box::new(p),
            OutputStreamName::Stdout,
            max_output_bytes,
            sink.clone(),
            stop.1.clone(),
        )
    });
    let err = child.stderr.take().map(|p| {
        spawn_reader(
            Box::new(p),
            OutputStreamName::Stderr,
            max_output_bytes,
            sink.clone(),
            stop.1.clone(),
        )
    });
    for task in out.iter().chain(err.iter()) {
        guard.tasks.push(task.abort_handle());
    }

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

    let all_read = async { (join(out).await, join(err).await) };
    tokio::pin!(all_read);
    let (out, err) = tokio::select! {
        captured = &mut all_read => captured,
        _ = tokio::time::sleep(PIPE_GRACE) => {
            kill_group(pgid);
            tokio::select! {
                captured = &mut all_read => captured,
                _ = tokio::time::sleep(DRAIN_GRACE) => {
                    let _ = stop.0.send(true);
                    all_read.await
                }
            }
        }
    };
    drop(guard);

    let mut result = ExecResult {
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        stdout: out.data.into(),
        stderr: err.data.into(),
        timed_out,
        duration_ms: (exited - started).as_millis() as u64,
        ..ExecResult::default()
    };
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => result.exit_code = code,
            (None, Some(signal)) => {
                result.exit_code = 128 + signal;
                result.signal = Some(signal);
            }
            (None, None) => result.exit_code = -1,
        },
        Err(e) => {
            result.exit_code = -1;
            result
                .stderr
                .0
                .extend_from_slice(format!("hearth: cannot wait for command: {e}\n").as_bytes());
        }
    }
    result
}

/// A stop flag for the readers: `send(true)` makes them stop reading.
fn tokio_stop() -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
) {
    tokio::sync::watch::channel(false)
}

type BoxedPipe = Box<dyn AsyncRead + Unpin + Send>;

fn spawn_reader(
    pipe: BoxedPipe,
    stream: OutputStreamName,
    cap: usize,
    sink: Option<ChunkSink>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<Captured> {
    tokio::spawn(read_stream(pipe, stream, cap, sink, stop))
}

async fn join(task: Option<JoinHandle<Captured>>) -> Captured {
    match task {
        Some(task) => task.await.unwrap_or_default(),
        None => Captured::default(),
    }
}

/// Drains one pipe to EOF (or until stopped), keeping at most `cap` bytes.
async fn read_stream(
    mut pipe: BoxedPipe,
    stream: OutputStreamName,
    cap: usize,
    sink: Option<ChunkSink>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Captured {
    let mut captured = Captured::default();
    let mut kept = 0usize;
    let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
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
        match &sink {
            Some(sink) => sink(stream, &buf[..keep]),
            None => captured.data.extend_from_slice(&buf[..keep]),
        }
    }
    captured
}

fn spawn_failed(program: &str, reason: &str, started: Instant) -> ExecResult {
    ExecResult {
        exit_code: 127,
        stderr: format!("hearth: cannot run {program:?}: {reason}\n")
            .into_bytes()
            .into(),
        duration_ms: started.elapsed().as_millis() as u64,
        ..ExecResult::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn sh(script: &str) -> Invocation {
        Invocation {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
            cwd: std::env::temp_dir(),
            stdin: None,
            // Never in unit tests: they do not run in a sandbox of their own.
            kill_leftovers: false,
        }
    }

    const LONG: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn exit_codes_signals_and_stdin() {
        assert_eq!(run(sh("exit 3"), LONG, 100, None).await.exit_code, 3);
        let killed = run(sh("kill -9 $$"), LONG, 100, None).await;
        assert_eq!((killed.exit_code, killed.signal), (137, Some(9)));
        let mut cat = sh("cat");
        cat.stdin = Some(b"piped".to_vec());
        assert_eq!(run(cat, LONG, 100, None).await.stdout.as_bytes(), b"piped");
    }

    #[tokio::test]
    async fn output_beyond_the_cap_is_dropped_and_flagged() {
        let r = run(
            sh("head -c 300000 /dev/zero; echo err >&2"),
            LONG,
            1000,
            None,
        )
        .await;
        assert_eq!(r.stdout.len(), 1000);
        assert!(r.stdout_truncated);
        assert_eq!(r.stderr.as_bytes(), b"err\n");
        assert!(!r.stderr_truncated);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut inv = sh("(sleep 30; touch survived) & sleep 30");
        inv.cwd = dir.path().to_path_buf();
        let started = std::time::Instant::now();
        let r = run(inv, Duration::from_millis(300), 100, None).await;
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(9));
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!dir.path().join("survived").exists());
    }

    #[tokio::test]
    async fn streamed_chunks_count_against_the_cap_and_are_not_repeated() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink: ChunkSink = {
            let seen = seen.clone();
            Arc::new(move |stream, data: &[u8]| {
                assert_eq!(stream, OutputStreamName::Stdout);
                seen.lock().unwrap().extend_from_slice(data);
            })
        };
        let r = run(sh("head -c 100000 /dev/zero"), LONG, 10, Some(sink)).await;
        assert_eq!(seen.lock().unwrap().len(), 10);
        assert!(r.stdout.is_empty());
        assert!(r.stdout_truncated);
    }

    #[tokio::test]
    async fn spawn_failure_is_exit_127() {
        let mut inv = sh("");
        inv.argv = vec!["/nonexistent/prog".into()];
        let r = run(inv, LONG, 100, None).await;
        assert_eq!(r.exit_code, 127);
        assert!(r.stderr.to_string_lossy().contains("/nonexistent/prog"));
    }
}
