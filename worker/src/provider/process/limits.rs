//! Per-sandbox resource limits for the process adapter: one cgroup (v2) or one cgroup per v1
//! hierarchy (memory, pids, cpu) per VM, falling back to shell rlimits where cgroups are not usable.
//!
//! The worker does not move sandbox processes itself: [`SandboxCgroup::enter_script`] is a POSIX sh
//! fragment that moves the shell that runs it (`$$`) into the cgroup(s) before that shell `exec`s
//! bubblewrap, so the sandbox and everything it forks start inside the limits:
//! `sh -c '<enter_script> && exec "$@"' sh bwrap …`.
//!
//! Layout: `<root>/<parent>/<name>` on v2 (`<root>` = `/sys/fs/cgroup`), and
//! `<root>/{memory,pids,cpu}/<parent>/<name>` on v1. `<parent>` holds no processes, only sandboxes,
//! which is what the v2 "no internal processes" rule asks for.
//!
//! Every function here blocks (file writes to cgroupfs, short sleeps while killing and removing):
//! callers on an async runtime use `spawn_blocking`.
//!
//! An OOM kill takes one process (the kernel's pick), not the whole sandbox: `memory.oom.group` is
//! left off so a long-lived sandbox survives one runaway command; [`SandboxCgroup::oom_kills`]
//! counts them.
//!
//! Known limits: under v2 the parent is a fixed `/sys/fs/cgroup/<parent>` created by a root worker;
//! a worker run by systemd with `Delegate=yes` should rather use its own delegated subtree. Under
//! [`LimitsMechanism::Rlimit`] only memory is limited (`ulimit -v`, address space, not resident
//! memory); process count and CPU are not enforced (see [`SandboxCgroup::enter_script`]).

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::provider::ProviderError;

/// Where the cgroup hierarchies are mounted on every Linux we support.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CFS period written with every CPU quota (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;
/// How long [`SandboxCgroup::kill_all`] keeps killing before giving up.
const KILL_DEADLINE: Duration = Duration::from_secs(1);
/// How long removal retries `rmdir` (it is `EBUSY` while killed tasks are still exiting).
const RMDIR_DEADLINE: Duration = Duration::from_secs(1);
/// Pause between kill / rmdir attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Longest parent or sandbox name accepted.
const MAX_NAME_LEN: usize = 64;

/// Resource limits for one sandbox, from the VM's template. `0` means "no limit" for that resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LimitSpec {
    /// Memory (RAM; swap is disabled where the kernel lets us) in MiB.
    pub memory_mib: u32,
    /// Tasks (processes and threads) alive at once in the sandbox.
    pub max_processes: u32,
    /// CPU bandwidth in whole CPUs (a CFS quota of `vcpus` × period).
    pub vcpus: u32,
}

/// How limits are enforced on this host; reported in heartbeats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LimitsMechanism {
    /// A unified (v2) hierarchy with the memory and pids controllers.
    CgroupV2,
    /// Legacy (v1) memory and pids hierarchies (and cpu when mounted).
    CgroupV1,
    /// No usable cgroups: `ulimit -v` in the sandbox's shell, memory only.
    Rlimit,
    /// Limits switched off.
    None,
}

impl LimitsMechanism {
    /// Lowercase name for logs, metrics labels and heartbeats.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitsMechanism::CgroupV2 => "cgroup_v2",
            LimitsMechanism::CgroupV1 => "cgroup_v1",
            LimitsMechanism::Rlimit => "rlimit",
            LimitsMechanism::None => "none",
        }
    }
}

impl std::fmt::Display for LimitsMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parent directories sandboxes are created under, per mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// `<root>/<parent>`, with `+memory +pids` (and `+cpu` when `cpu`) in its subtree_control.
    V2 {
        parent: PathBuf,
        cpu: bool,
    },
    /// `<root>/memory/<parent>`, `<root>/pids/<parent>`, and `<root>/cpu/<parent>` when mounted.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
    Rlimit,
    None,
}

/// The host's way of limiting sandboxes, found once at startup by [`Cgroups::detect`].
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    layout: Layout,
    /// Why a weaker mechanism was chosen (what was missing); `None` when the best one was available.
    reason: Option<String>,
}

impl Cgroups {
    /// Picks the best mechanism available under `/sys/fs/cgroup` for sandboxes grouped under
    /// `parent` (a single path component, e.g. `hearth` or `hearth-<root hash>`). Never fails: what
    /// was missing ends up in [`reason`](Self::reason) and the result falls back to rlimits.
    pub(crate) fn detect(parent: &str) -> Cgroups {
        Self::detect_in(Path::new(CGROUP_ROOT), parent)
    }

    /// [`detect`](Self::detect) with another cgroup mount root (tests).
    pub(crate) fn detect_in(root: &Path, parent: &str) -> Cgroups {
        if let Err(e) = validate_name(parent) {
            return Self::rlimit(format!("bad cgroup parent name: {e}"));
        }
        let mut why = Vec::new();
        match detect_v2(root, parent) {
            Ok(layout) => return Cgroups::new(layout, None),
            Err(e) => why.push(format!("cgroup v2: {e}")),
        }
        match detect_v1(root, parent) {
            Ok(layout) => return Cgroups::new(layout, Some(why.join("; "))),
            Err(e) => why.push(format!("cgroup v1: {e}")),
        }
        Self::rlimit(why.join("; "))
    }

    /// Rlimits only (config override, or when no cgroup hierarchy is usable).
    pub(crate) fn rlimit(reason: impl Into<String>) -> Cgroups {
        Cgroups::new(Layout::Rlimit, Some(reason.into()))
    }

    /// No limits at all (config override).
    pub(crate) fn disabled() -> Cgroups {
        Cgroups::new(
            Layout::None,
            Some("limits disabled by configuration".into()),
        )
    }

    fn new(layout: Layout, reason: Option<String>) -> Cgroups {
        Cgroups { layout, reason }
    }

    pub(crate) fn mechanism(&self) -> LimitsMechanism {
        match self.layout {
            Layout::V2 { .. } => LimitsMechanism::CgroupV2,
            Layout::V1 { .. } => LimitsMechanism::CgroupV1,
            Layout::Rlimit => LimitsMechanism::Rlimit,
            Layout::None => LimitsMechanism::None,
        }
    }

    /// Why the mechanism is weaker than cgroup v2, for a log line at startup.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The parent directories, one per hierarchy (empty without cgroups).
    fn parents(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V2 { parent, .. } => vec![parent],
            Layout::V1 { memory, pids, cpu } => {
                let mut dirs = vec![memory.as_path(), pids.as_path()];
                dirs.extend(cpu.as_deref());
                dirs
            }
            Layout::Rlimit | Layout::None => Vec::new(),
        }
    }

    /// Creates the cgroup(s) of sandbox `name` (a uuid-like token) and writes `spec` into them. An
    /// existing cgroup of that name is reused with its limits rewritten (a restarted worker). On
    /// failure the sandbox's cgroup(s) are removed again (a reused one too, killing what ran in it). Under rlimits, nothing is created and the
    /// limits live in the [`enter_script`](SandboxCgroup::enter_script).
    pub(crate) fn create(
        &self,
        name: &str,
        spec: &LimitSpec,
    ) -> Result<SandboxCgroup, ProviderError> {
        validate_name(name).map_err(ProviderError::InvalidArgument)?;
        let mut sandbox = SandboxCgroup {
            name: name.to_owned(),
            mechanism: self.mechanism(),
            dirs: Vec::new(),
            spec: *spec,
            removed: false,
        };
        for parent in self.parents() {
            let dir = parent.join(name);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    // `sandbox` drops on return and removes the directories made so far.
                    return Err(ProviderError::io(
                        format!("cannot create cgroup {}", dir.display()),
                        e,
                    ));
                }
            }
            sandbox.dirs.push(dir);
        }
        match &self.layout {
            Layout::V2 { cpu, .. } => sandbox.write_v2(*cpu)?,
            Layout::V1 { cpu, .. } => sandbox.write_v1(cpu.is_some())?,
            Layout::Rlimit | Layout::None => {}
        }
        debug!(sandbox = name, mechanism = %self.mechanism(), ?spec, "sandbox cgroup created");
        Ok(sandbox)
    }

    /// Removes every sandbox cgroup under the parent whose name is not in `keep` (left over from a
    /// worker that died), killing what still runs in it. Returns the names removed. Blocking.
    pub(crate) fn remove_stale(&self, keep: &HashSet<String>) -> Vec<String> {
        let mut names = BTreeSet::new();
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if let Some(name) = entry.file_name().to_str()
                    && validate_name(name).is_ok()
                    && !keep.contains(name)
                {
                    names.insert(name.to_owned());
                }
            }
        }
        let mut removed = Vec::new();
        for name in names {
            let sandbox = SandboxCgroup {
                dirs: self.parents().iter().map(|p| p.join(&name)).collect(),
                name: name.clone(),
                mechanism: self.mechanism(),
                spec: LimitSpec::default(),
                removed: false,
            };
            match sandbox.remove() {
                Ok(()) => removed.push(name),
                Err(e) => warn!(sandbox = %name, error = %e, "cannot remove stale sandbox cgroup"),
            }
        }
        removed
    }
}

/// The cgroup(s) of one sandbox. Dropping it kills what is left inside and removes the
/// directories (blocking for up to about two seconds: drop it from blocking context).
#[derive(Debug)]
pub(crate) struct SandboxCgroup {
    name: String,
    mechanism: LimitsMechanism,
    /// One directory per hierarchy (v2: one; v1: memory, pids[, cpu]; rlimits: none). On v1 the
    /// memory directory comes first.
    dirs: Vec<PathBuf>,
    spec: LimitSpec,
    removed: bool,
}

impl SandboxCgroup {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn mechanism(&self) -> LimitsMechanism {
        self.mechanism
    }

    /// A POSIX sh fragment (no trailing `exec`, `&&`-chainable) that puts the shell running it into
    /// this sandbox's limits: `echo $$ > '<dir>/cgroup.procs'` per hierarchy, or under rlimits
    /// `ulimit -v <KiB>` for memory. Always a valid command (`:` when there is nothing to do).
    ///
    /// Deliberately absent under rlimits: `ulimit -u`. RLIMIT_NPROC counts every process of the
    /// real uid, so with one sandbox uid it would cap all sandboxes together (and the worker's own
    /// processes when that uid is root's, for which the kernel does not enforce it at all); dash
    /// (`/bin/sh` on Debian) does not even have `-u`. Process count is only enforced by cgroups.
    pub(crate) fn enter_script(&self) -> String {
        let mut steps: Vec<String> = self
            .dirs
            .iter()
            .map(|dir| format!("echo $$ > {}", sh_quote(&dir.join("cgroup.procs"))))
            .collect();
        if self.mechanism == LimitsMechanism::Rlimit && self.spec.memory_mib > 0 {
            steps.push(format!(
                "ulimit -v {}",
                u64::from(self.spec.memory_mib) * 1024
            ));
        }
        if steps.is_empty() {
            ":".to_owned()
        } else {
            steps.join(" && ")
        }
    }

    /// How many times the kernel's OOM killer killed a process in this sandbox (0 when unknown).
    pub(crate) fn oom_kills(&self) -> u64 {
        let file = match self.mechanism {
            LimitsMechanism::CgroupV2 => "memory.events",
            LimitsMechanism::CgroupV1 => "memory.oom_control",
            LimitsMechanism::Rlimit | LimitsMechanism::None => return 0,
        };
        let Some(dir) = self.dirs.first() else {
            return 0;
        };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| keyed_value(&text, "oom_kill"))
            .unwrap_or(0)
    }

    /// Every process in the sandbox (pids in the worker's pid namespace), sorted.
    pub(crate) fn pids(&self) -> Vec<i32> {
        let mut pids = BTreeSet::new();
        for dir in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.into_iter().collect()
    }

    /// Kills everything in the sandbox: v2 `cgroup.kill` where the kernel has it, else SIGKILL to
    /// every listed pid, repeated (a process may fork between read and kill) until the cgroup is
    /// empty or about a second has passed. Returns whether it ended empty. Blocking.
    pub(crate) fn kill_all(&self) -> bool {
        if self.dirs.is_empty() {
            return true;
        }
        let cgroup_kill = self.dirs[0].join("cgroup.kill");
        let use_cgroup_kill = self.mechanism == LimitsMechanism::CgroupV2 && cgroup_kill.exists();
        let deadline = Instant::now() + KILL_DEADLINE;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            if use_cgroup_kill {
                if let Err(e) = std::fs::write(&cgroup_kill, "1") {
                    warn!(sandbox = %self.name, error = %e, "cgroup.kill failed");
                }
            } else {
                for pid in pids {
                    // ESRCH (already gone) is the normal race; anything else is worth a log line.
                    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL)
                        && e != nix::errno::Errno::ESRCH
                    {
                        warn!(sandbox = %self.name, pid, error = %e, "cannot kill sandbox process");
                    }
                }
            }
            if Instant::now() >= deadline {
                let left = self.pids().len();
                if left > 0 {
                    warn!(sandbox = %self.name, left, "processes survived kill_all");
                }
                return left == 0;
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// Kills what is left and removes the cgroup directories (retrying `rmdir` for about a second
    /// while killed tasks exit). Blocking. Dropping the value does the same but only logs failures.
    pub(crate) fn remove(mut self) -> Result<(), ProviderError> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> Result<(), ProviderError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        self.kill_all();
        let mut first_error = None;
        // Reverse order: a v1 memory directory goes last, so its OOM count stays readable longest.
        for dir in self.dirs.iter().rev() {
            if let Err(e) = rmdir_retrying(dir)
                && first_error.is_none()
            {
                first_error = Some(ProviderError::io(
                    format!("cannot remove cgroup {}", dir.display()),
                    e,
                ));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// v2: memory.max (+ memory.swap.max = 0), pids.max, cpu.max.
    fn write_v2(&self, cpu: bool) -> Result<(), ProviderError> {
        let dir = &self.dirs[0];
        let spec = &self.spec;
        write_knob(
            dir,
            "memory.max",
            &limit_or(mib_bytes(spec.memory_mib), "max"),
        )?;
        if dir.join("memory.swap.max").exists() {
            let swap = if spec.memory_mib > 0 { "0" } else { "max" };
            write_knob(dir, "memory.swap.max", swap)?;
        }
        write_knob(
            dir,
            "pids.max",
            &limit_or(u64::from(spec.max_processes), "max"),
        )?;
        if cpu {
            let quota = limit_or(u64::from(spec.vcpus) * CPU_PERIOD_US, "max");
            write_knob(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        Ok(())
    }

    /// v1: memory.limit_in_bytes (+ memory.memsw.limit_in_bytes), pids.max, cpu.cfs_*.
    fn write_v1(&self, cpu: bool) -> Result<(), ProviderError> {
        let spec = &self.spec;
        let (memory, pids) = (&self.dirs[0], &self.dirs[1]);
        let bytes = limit_or(mib_bytes(spec.memory_mib), "-1");
        let memsw = memory.join("memory.memsw.limit_in_bytes").exists();
        // memsw must stay >= the memory limit: raise it first when lifting, last when lowering.
        if memsw && spec.memory_mib == 0 {
            write_knob(memory, "memory.memsw.limit_in_bytes", &bytes)?;
        }
        write_knob(memory, "memory.limit_in_bytes", &bytes)?;
        if memsw && spec.memory_mib > 0 {
            write_knob(memory, "memory.memsw.limit_in_bytes", &bytes)?;
        }
        write_knob(
            pids,
            "pids.max",
            &limit_or(u64::from(spec.max_processes), "max"),
        )?;
        if cpu {
            let cpu_dir = &self.dirs[2];
            write_knob(cpu_dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            let quota = limit_or(u64::from(spec.vcpus) * CPU_PERIOD_US, "-1");
            write_knob(cpu_dir, "cpu.cfs_quota_us", &quota)?;
        }
        Ok(())
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner() {
            warn!(sandbox = %self.name, error = %e, "cannot remove sandbox cgroup");
        }
    }
}

/// v2 is usable when `root` is a cgroup2 mount (it has `cgroup.controllers`) offering memory and
/// pids. Creates `<root>/<parent>` and delegates the controllers to it and to its children.
fn detect_v2(root: &Path, parent: &str) -> Result<Layout, String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("{} is not a cgroup2 mount ({e})", root.display()))?;
    let available: HashSet<&str> = controllers.split_whitespace().collect();
    for needed in ["memory", "pids"] {
        if !available.contains(needed) {
            return Err(format!(
                "controller {needed} not available at {}",
                root.display()
            ));
        }
    }
    // The root cgroup is exempt from "no internal processes"; `<parent>` holds none of its own.
    // cpu is optional: the kernel refuses to enable it in some setups (realtime tasks outside the
    // root with RT group scheduling), which must not cost us memory and pids.
    let dir = root.join(parent);
    let delegate = |enable: &str| -> Result<(), String> {
        write_knob(root, "cgroup.subtree_control", enable).map_err(|e| e.to_string())?;
        mkdir_ok_if_exists(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write_knob(&dir, "cgroup.subtree_control", enable).map_err(|e| e.to_string())
    };
    let cpu = available.contains("cpu")
        && delegate("+memory +pids +cpu")
            .inspect_err(|e| warn!(error = %e, "cgroup v2 cpu unusable; vcpus not enforced"))
            .is_ok();
    if !cpu {
        delegate("+memory +pids")?;
    }
    probe_child(&dir)?;
    Ok(Layout::V2 { parent: dir, cpu })
}

/// v1 is usable when the memory and pids hierarchies are mounted and a child can be made in each.
fn detect_v1(root: &Path, parent: &str) -> Result<Layout, String> {
    let mut dirs = Vec::new();
    for controller in ["memory", "pids"] {
        let hierarchy = root.join(controller);
        if !hierarchy.join("cgroup.procs").exists() {
            return Err(format!("{} is not mounted", hierarchy.display()));
        }
        let dir = hierarchy.join(parent);
        mkdir_ok_if_exists(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        probe_child(&dir)?;
        dirs.push(dir);
    }
    let cpu_hierarchy = root.join("cpu");
    let cpu = if cpu_hierarchy.join("cpu.cfs_quota_us").exists() {
        let dir = cpu_hierarchy.join(parent);
        match mkdir_ok_if_exists(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| probe_child(&dir))
        {
            Ok(()) => Some(dir),
            Err(e) => {
                warn!(error = %e, "cgroup v1 cpu hierarchy not writable; vcpus will not be enforced");
                None
            }
        }
    } else {
        None
    };
    let pids = dirs.pop().expect("two hierarchies");
    let memory = dirs.pop().expect("two hierarchies");
    Ok(Layout::V1 { memory, pids, cpu })
}

/// Makes and removes a child of `dir`, proving sandboxes can be created there.
fn probe_child(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|e| format!("cannot create a child in {}: {e}", dir.display()))?;
    std::fs::remove_dir(&probe).map_err(|e| format!("cannot remove {}: {e}", probe.display()))
}

fn mkdir_ok_if_exists(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn write_knob(dir: &Path, file: &str, value: &str) -> Result<(), ProviderError> {
    let path = dir.join(file);
    std::fs::write(&path, value)
        .map_err(|e| ProviderError::io(format!("cannot write {value:?} to {}", path.display()), e))
}

fn rmdir_retrying(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + RMDIR_DEADLINE;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(RETRY_PAUSE),
        }
    }
}

fn mib_bytes(mib: u32) -> u64 {
    u64::from(mib) << 20
}

/// `value` as text, or `unlimited` when it is 0.
fn limit_or(value: u64, unlimited: &str) -> String {
    if value == 0 {
        unlimited.to_owned()
    } else {
        value.to_string()
    }
}

/// The number after `key` in a "key value" per line file (memory.events, memory.oom_control).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A cgroup parent or sandbox name: one path component of `[A-Za-z0-9_-]`, not starting with `-`.
fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid cgroup name {name:?}: want 1-{MAX_NAME_LEN} of [A-Za-z0-9_-], not starting with '-'"
        ))
    }
}

/// Single-quotes a path for sh (`'` becomes `'\''`).
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests;
