//! A VMM process (QEMU, Firecracker) as the provider supervises it: started in a process group of
//! its own (terminal signals to the worker do not reach it, and it can outlive a worker restart),
//! its output in a log, reaped by a task that records how it ended; killed and waited for; or
//! adopted after a restart (not our child: watched by pid).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::provider::{ProviderError, tail_lossy};

/// How long a killed VMM may take to go away before the provider gives up waiting.
const KILL_PATIENCE: Duration = Duration::from_secs(10);

/// One VMM process.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    /// What the VMM is called in messages: `qemu`, `firecracker`.
    name: &'static str,
    /// Names its run directory (`run/<instance>`) and appears on its command line.
    pub instance: String,
    pub pid: i32,
    /// Set when the provider itself ends the process (destroy, drop): not a failure.
    pub ending: AtomicBool,
    /// Fired once the process is known to be gone.
    pub dead: CancellationToken,
    /// How the process ended, when known (exit status of a child, or why it was given up).
    exit: Arc<Mutex<Option<String>>>,
    /// The worker's own child: reaped by a task that fires `reaped`.
    pub child: bool,
    pub reaped: CancellationToken,
    /// Fired when the provider lets go of the process (dropped without killing it).
    pub detached: CancellationToken,
}

impl VmmProcess {
    /// Starts `command` (its program is the VMM) with stdout and stderr in `log`, in a process
    /// group of its own; a task reaps it and records how it ended. `Unavailable` if it cannot
    /// start.
    pub(crate) fn spawn(
        name: &'static str,
        mut command: tokio::process::Command,
        log: std::fs::File,
        instance: String,
    ) -> Result<Self, ProviderError> {
        let log_err = log
            .try_clone()
            .map_err(|e| ProviderError::io(format!("cannot open the {name} log"), e))?;
        let program = command.as_std().get_program().to_owned();
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                ProviderError::Unavailable(format!(
                    "cannot start {}: {e}",
                    Path::new(&program).display()
                ))
            })?;
        let process = Self {
            pid: child.id().map_or(0, |p| p as i32),
            ..Self::new(name, instance, 0, true)
        };
        let (exit, reaped) = (process.exit.clone(), process.reaped.clone());
        tokio::spawn(async move {
            let reason = match child.wait().await {
                Ok(status) => match std::os::unix::process::ExitStatusExt::signal(&status) {
                    Some(signal) => format!("{name} was killed by signal {signal}"),
                    None => format!("{name} exited with {status}"),
                },
                Err(e) => format!("{name} could not be waited for: {e}"),
            };
            exit.lock().get_or_insert(reason);
            reaped.cancel();
        });
        Ok(process)
    }

    /// No process: the VMM of a VM paused to disk (its state is in a file, its process ended).
    /// Killing it does nothing; it counts as ended and dead from the start.
    pub(crate) fn none(name: &'static str, instance: String) -> Self {
        let process = Self::new(name, instance, 0, false);
        process.end();
        process.dead.cancel();
        process
    }

    /// A VMM process left by a previous provider (not our child), found alive at `pid`.
    pub(crate) fn adopted(name: &'static str, instance: String, pid: i32) -> Self {
        Self::new(name, instance, pid, false)
    }

    fn new(name: &'static str, instance: String, pid: i32, child: bool) -> Self {
        Self {
            name,
            instance,
            pid,
            ending: AtomicBool::new(false),
            dead: CancellationToken::new(),
            exit: Arc::new(Mutex::new(None)),
            child,
            reaped: CancellationToken::new(),
            detached: CancellationToken::new(),
        }
    }

    /// How the process ended, as far as known.
    pub(crate) fn exit_reason(&self) -> String {
        self.exit
            .lock()
            .clone()
            .unwrap_or_else(|| format!("{} exited", self.name))
    }

    /// Records why the provider gave the process up (it overrides an exit status).
    pub(crate) fn give_up(&self, reason: String) {
        *self.exit.lock() = Some(reason);
    }

    /// Whether the provider is ending the process itself.
    pub(crate) fn is_ending(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }

    /// The provider ends the process itself (destroy, drop, detach): its end is no failure.
    pub(crate) fn end(&self) {
        self.ending.store(true, Ordering::SeqCst);
    }

    /// SIGKILLs the process (if it still is ours) and waits until it is gone.
    pub(crate) async fn kill(&self) {
        self.end();
        if !self.dead.is_cancelled() || self.child && !self.reaped.is_cancelled() {
            signal_kill(self.pid);
        }
        let gone = async {
            if self.child {
                self.reaped.cancelled().await;
            } else {
                while process_alive(self.pid) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        if tokio::time::timeout(KILL_PATIENCE, gone).await.is_err() {
            warn!(
                pid = self.pid,
                vmm = self.name,
                "the vmm did not exit after SIGKILL"
            );
        }
    }

    /// The same, synchronously and without waiting (Drop); a pid that is no longer this VMM's
    /// is left alone.
    pub(crate) fn kill_now(&self) {
        self.end();
        if !self.reaped.is_cancelled() && is_ours(self.pid, &self.instance) {
            signal_kill(self.pid);
        }
    }

    /// Lets go of the process without ending it (the next provider on this root adopts it).
    pub(crate) fn detach(&self) {
        self.end();
        self.detached.cancel();
    }
}

/// Whether `pid` is a VMM process started for `instance` (its command line names it).
pub(crate) fn is_ours(pid: i32, instance: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(instance))
}

/// SIGKILL, ignoring a process that is already gone.
pub(crate) fn signal_kill(pid: i32) {
    // 0 and negative pids name process groups (our own, for 0): never a VMM.
    if pid <= 0 {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

pub(crate) fn process_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The last lines of a VMM's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| tail_lossy(&b, 600))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spawned_process_is_reaped_with_its_reason_and_killed_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("sleep.log")).unwrap();
        let mut command = tokio::process::Command::new("sleep");
        command.arg("1000");
        let vmm = VmmProcess::spawn("sleep", command, log, "1000".into()).unwrap();
        assert!(process_alive(vmm.pid));
        // The kernel fills /proc/<pid>/cmdline a moment after the exec it reports to the parent.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_ours(vmm.pid, "1000") && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(is_ours(vmm.pid, "1000"));
        vmm.kill().await;
        assert!(vmm.reaped.is_cancelled());
        assert_eq!(vmm.exit_reason(), "sleep was killed by signal 9");
        assert!(vmm.is_ending());
    }

    #[test]
    fn a_vmm_that_cannot_start_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("x.log")).unwrap();
        let command = tokio::process::Command::new(dir.path().join("no-such-vmm"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(async { VmmProcess::spawn("x", command, log, "i".into()) })
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("no-such-vmm"), "{err}");
    }
}
