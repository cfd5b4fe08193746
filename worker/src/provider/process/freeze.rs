//! Pausing a process-provider VM: every process of its sandbox frozen in place, their memory kept
//! resident (a process VM has no VMM whose state could go to disk). With the cgroup v1 `freezer`
//! hierarchy mounted, the processes are moved into a freezer cgroup of their own and frozen there
//! (a process forked before the move is caught by the next round; one forked after it is born in
//! the frozen cgroup); elsewhere each process is sent `SIGSTOP`, round after round until no new
//! process appears. Thawing undoes it (the freezer cgroup is removed again), and a frozen sandbox
//! is thawed before it is killed (the v1 freezer holds even `SIGKILL` until thawed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::warn;

use crate::provider::ProviderError;

/// Where the cgroup v1 freezer hierarchy is mounted.
const FREEZER_ROOT: &str = "/sys/fs/cgroup/freezer";
/// Most rounds of catching processes that forked while the sandbox was being frozen.
const MAX_ROUNDS: usize = 50;
/// How long the kernel may take to freeze a cgroup.
const FREEZE_PATIENCE: Duration = Duration::from_secs(5);

/// How a sandbox is frozen.
#[derive(Debug)]
pub(crate) enum Frozen {
    /// In this freezer cgroup.
    Cgroup(PathBuf),
    /// By `SIGSTOP` to these processes.
    Signal(BTreeSet<i32>),
}

/// The processes of a sandbox: the tree under `root` (host pids) and whatever `extra` lists (its
/// resource cgroup, which also holds processes that left the tree).
pub(crate) fn sandbox_pids(root: u32, extra: &[i32]) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    let mut todo = vec![root as i32];
    while let Some(pid) = todo.pop() {
        if pid <= 0 || !pids.insert(pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    pids.extend(extra.iter().copied());
    pids
}

/// Freezes the processes `list()` names (called again each round). Blocking.
pub(crate) fn freeze(
    name: &str,
    list: impl Fn() -> BTreeSet<i32>,
) -> Result<Frozen, ProviderError> {
    let root = Path::new(FREEZER_ROOT);
    if root.join("cgroup.procs").exists() {
        let dir = root.join(format!("hearth-pause-{name}"));
        match freeze_cgroup(&dir, &list) {
            Ok(()) => return Ok(Frozen::Cgroup(dir)),
            Err(e) => {
                warn!(error = %e, "freezer cgroup unusable; pausing with SIGSTOP");
                thaw(Frozen::Cgroup(dir));
            }
        }
    }
    Ok(Frozen::Signal(stop_all(&list)))
}

fn freeze_cgroup(dir: &Path, list: &impl Fn() -> BTreeSet<i32>) -> Result<(), ProviderError> {
    let io = |what: &str, e| ProviderError::io(format!("cannot {what} the freezer cgroup"), e);
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create", e)),
    }
    for _ in 0..MAX_ROUNDS {
        let inside = members(dir);
        let mut moved = false;
        for pid in list() {
            if inside.contains(&pid) {
                continue;
            }
            moved = true;
            // A process that ended meanwhile needs no freezing.
            if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                && Path::new(&format!("/proc/{pid}")).exists()
            {
                return Err(io("join", e));
            }
        }
        std::fs::write(dir.join("freezer.state"), "FROZEN").map_err(|e| io("freeze", e))?;
        let deadline = Instant::now() + FREEZE_PATIENCE;
        while std::fs::read_to_string(dir.join("freezer.state"))
            .map_err(|e| io("read", e))?
            .trim()
            != "FROZEN"
        {
            if Instant::now() > deadline {
                return Err(ProviderError::Timeout(
                    "the sandbox did not freeze in time".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !moved {
            return Ok(());
        }
    }
    Err(ProviderError::Timeout(
        "the sandbox kept forking while it was being frozen".into(),
    ))
}

fn members(dir: &Path) -> BTreeSet<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn stop_all(list: &impl Fn() -> BTreeSet<i32>) -> BTreeSet<i32> {
    let mut stopped = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let fresh: Vec<i32> = list()
            .into_iter()
            .filter(|p| !stopped.contains(p))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            stopped.insert(pid);
        }
    }
    stopped
}

/// Undoes [`freeze`]: thaws the cgroup, moves its processes back to the root freezer cgroup and
/// removes it; or sends `SIGCONT`. Blocking.
pub(crate) fn thaw(frozen: Frozen) {
    match frozen {
        Frozen::Cgroup(dir) => {
            if let Err(e) = std::fs::write(dir.join("freezer.state"), "THAWED") {
                warn!(dir = %dir.display(), error = %e, "cannot thaw the freezer cgroup");
            }
            let root = Path::new(FREEZER_ROOT).join("cgroup.procs");
            for _ in 0..MAX_ROUNDS {
                let pids = members(&dir);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = std::fs::write(&root, pid.to_string());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Frozen::Signal(pids) => {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
    }
}
