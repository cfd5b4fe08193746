//! Pausing a process-provider VM: every process of its sandbox frozen in place, their memory kept
//! resident (a process VM has no VMM whose state could go to disk). With the cgroup v1 `freezer`
//! hierarchy mounted, the processes are moved into a freezer cgroup of their own and frozen there
//! (a process forked before the move is caught by the next round; one forked after it is born in
//! the frozen cgroup); elsewhere each process is sent `SIGSTOP`, round after round until no new
//! process appears. Thawing undoes it (the freezer cgroup is removed again). A frozen sandbox is
//! killed by [`kill_and_thaw`]: `SIGKILL` first (the v1 freezer holds it pending, so nothing in
//! the sandbox runs another instruction), then the thaw that lets it land.
//!
//! The freezer cgroups of one provider are named `hearth-pause-<scope>-<pid>`, `scope` being the
//! provider root's own (see `cgroup_parent` in the provider), so [`kill_stale`] at open can end
//! the frozen sandboxes a killed worker left behind without touching another provider's. Those
//! are dead weight: their agent's channel died with the worker, and a frozen process never even
//! sees that (nor bubblewrap's parent-death signal, nor a runtime's `delete --force`, which
//! returns at once and leaves the processes frozen).

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

/// The prefix of the freezer cgroups of the provider whose scope is `scope`.
fn prefix(scope: &str) -> String {
    format!("hearth-pause-{scope}-")
}

/// Freezes the processes `list()` names (called again each round) in the freezer cgroup
/// `hearth-pause-<scope>-<name>`. Blocking.
pub(crate) fn freeze(
    scope: &str,
    name: &str,
    list: impl Fn() -> BTreeSet<i32>,
) -> Result<Frozen, ProviderError> {
    let root = Path::new(FREEZER_ROOT);
    if root.join("cgroup.procs").exists() {
        let dir = root.join(format!("{}{name}", prefix(scope)));
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
            // A process that ended (a zombie, not yet reaped, cannot join) needs no freezing.
            if inside.contains(&pid) || !alive(pid) {
                continue;
            }
            moved = true;
            if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                && alive(pid)
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

/// Whether `pid` is a process that has not ended (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest.trim_start());
        !(state.starts_with('Z') || state.starts_with('X'))
    })
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

/// Kills every process [`freeze`] froze, without letting any of them run first: `SIGKILL` while
/// they are frozen, then [`thaw`] (which waits for the cgroup to empty). Blocking.
pub(crate) fn kill_and_thaw(frozen: Frozen) {
    let pids = match &frozen {
        Frozen::Cgroup(dir) => members(dir),
        Frozen::Signal(pids) => pids.clone(),
    };
    for pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    thaw(frozen);
}

/// Kills the processes of every freezer cgroup of `scope` (a provider opening its root: no
/// sandbox of it runs yet, so any such cgroup is left from a worker that died with a paused or
/// stopped sandbox) and removes the cgroups. Returns how many there were. Blocking.
pub(crate) fn kill_stale(scope: &str) -> usize {
    let prefix = prefix(scope);
    let stale: Vec<PathBuf> = std::fs::read_dir(FREEZER_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    for dir in &stale {
        kill_and_thaw(Frozen::Cgroup(dir.clone()));
    }
    stale.len()
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
            // Processes move back to the root cgroup (killed ones leave as they exit), then
            // the cgroup goes; bounded, a cgroup that stays busy is logged and left.
            let deadline = Instant::now() + FREEZE_PATIENCE;
            loop {
                for pid in members(&dir) {
                    let _ = std::fs::write(&root, pid.to_string());
                }
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        warn!(dir = %dir.display(), error = %e, "cannot remove a freezer cgroup");
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        Frozen::Signal(pids) => {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
    }
}
