//! `--sandbox` mode: what the agent enforces itself when it runs as the init-side process of a
//! hardened bubblewrap sandbox (the process provider), where bubblewrap already gave it its own
//! user, pid, net, ipc, uts and cgroup namespaces, uid 1000 and no capabilities.
//!
//! - [`lock_down`] installs a seccomp filter on the agent before it reads any request, so every
//!   command it runs inherits it (`no_new_privs` is set with it), and makes the agent undumpable
//!   so commands running as the same uid cannot open `/proc/<agent>/fd/*` or `/proc/<agent>/mem`.
//! - [`kill_leftovers`] kills every process of the sandbox except its init (pid 1), the agent and
//!   the sessions of running background processes ([`crate::processes`]) once a foreground exec
//!   is over, so nothing a command started (`setsid`, double forks)
//!   outlives it. Commands on one VM run one at a time, so this is exact. It refuses to run
//!   unless the agent is in a pid namespace of its own whose `/proc` is mounted.
//!
//! The filter is a deny-list: everything not listed is allowed. Listed calls fail with `EPERM`:
//! mounting and changing roots (`mount`, `umount2`, `pivot_root`, `chroot`, the new mount API),
//! namespaces (`unshare`, `setns`, `clone` with any `CLONE_NEW*` flag), other processes' memory
//! (`ptrace`, `process_vm_readv`/`writev`), the kernel itself (modules, `kexec`, `bpf`,
//! `perf_event_open`, `userfaultfd`, keyrings, `syslog`, `reboot`, swap, `acct`, quotas, port I/O,
//! clocks), `open_by_handle_at`/`name_to_handle_at`, `vhangup`, `io_uring`, and `mknod`/`mknodat`
//! of character or block devices (FIFOs, sockets and regular files stay allowed). `clone3` fails
//! with `ENOSYS` instead, because its flags are behind a pointer a filter cannot read: the C
//! library then falls back to `clone`, whose flags are filtered.

use std::io;

/// The architectures the filter is built for (syscall numbers differ per architecture).
pub const SUPPORTED_ARCHES: &[&str] = &["x86_64", "aarch64"];

/// Whether `--sandbox` can run on this machine's architecture.
pub fn arch_supported() -> bool {
    SUPPORTED_ARCHES.contains(&std::env::consts::ARCH)
}

/// Installs the syscall filter and makes the agent undumpable. Call it before the agent starts
/// any thread or reads any request.
pub fn lock_down() -> io::Result<()> {
    filter::install()?;
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| io::Error::other(format!("cannot make the agent undumpable: {e}")))?;
    Ok(())
}

#[cfg(target_os = "linux")]
mod filter {
    use std::collections::BTreeMap;
    use std::io;

    use nix::libc;
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    /// Every `CLONE_NEW*` flag `clone(2)` takes (`CLONE_NEWTIME` only works through `clone3` and
    /// `unshare`, both refused outright).
    pub const CLONE_NEW_FLAGS: &[u64] = &[
        libc::CLONE_NEWNS as u64,
        libc::CLONE_NEWCGROUP as u64,
        libc::CLONE_NEWUTS as u64,
        libc::CLONE_NEWIPC as u64,
        libc::CLONE_NEWUSER as u64,
        libc::CLONE_NEWPID as u64,
        libc::CLONE_NEWNET as u64,
    ];

    /// Syscalls refused whatever their arguments.
    fn always_denied() -> Vec<i64> {
        #[allow(unused_mut)]
        let mut calls = vec![
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_reboot,
            libc::SYS_syslog,
            libc::SYS_acct,
            libc::SYS_quotactl,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_settimeofday,
            libc::SYS_clock_settime,
            libc::SYS_clock_adjtime,
            libc::SYS_adjtimex,
            libc::SYS_vhangup,
            libc::SYS_fsopen,
            libc::SYS_fsmount,
            libc::SYS_fsconfig,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            // Stealing another process's descriptors (bubblewrap's init holds the agent's
            // channel), and comparing them.
            libc::SYS_pidfd_getfd,
            libc::SYS_kcmp,
            // Kernel keyring and mount-API leftovers with no use in a sandbox.
            libc::SYS_lookup_dcookie,
            libc::SYS_nfsservctl,
            libc::SYS_uselib,
        ];
        // Port I/O exists on x86 only.
        #[cfg(target_arch = "x86_64")]
        calls.extend([libc::SYS_iopl, libc::SYS_ioperm]);
        calls
    }

    fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> io::Result<SeccompCondition> {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(compile_error)
    }

    /// `mode & S_IFMT` is a character or a block device, `mode` being argument `arg`.
    fn device_node_rules(arg: u8) -> io::Result<Vec<SeccompRule>> {
        [libc::S_IFCHR, libc::S_IFBLK]
            .into_iter()
            .map(|kind| {
                let masked = SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT));
                SeccompRule::new(vec![condition(arg, masked, u64::from(kind))?])
                    .map_err(compile_error)
            })
            .collect()
    }

    /// The `EPERM` filter.
    fn deny_filter(arch: TargetArch) -> io::Result<SeccompFilter> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = always_denied()
            .into_iter()
            .map(|call| (call, Vec::new()))
            .collect();
        // mknod(path, mode, dev) exists on x86_64 only; mknodat(dirfd, path, mode, dev) everywhere.
        #[cfg(target_arch = "x86_64")]
        rules.insert(libc::SYS_mknod, device_node_rules(1)?);
        rules.insert(libc::SYS_mknodat, device_node_rules(2)?);
        // clone's flags are its first argument on every architecture; the namespace flags all sit
        // in the low 32 bits.
        let clone_rules = CLONE_NEW_FLAGS
            .iter()
            .map(|&flag| {
                SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(flag), flag)?])
                    .map_err(compile_error)
            })
            .collect::<io::Result<Vec<_>>>()?;
        rules.insert(libc::SYS_clone, clone_rules);
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(compile_error)
    }

    /// The `ENOSYS` filter for `clone3`.
    fn clone3_filter(arch: TargetArch) -> io::Result<SeccompFilter> {
        SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(compile_error)
    }

    fn compile_error(e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("cannot build the seccomp filter: {e}"))
    }

    /// Both programs, compiled for this machine's architecture.
    pub fn programs() -> io::Result<Vec<BpfProgram>> {
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(compile_error)?;
        if !super::arch_supported() {
            return Err(compile_error(format!(
                "architecture {} is not supported",
                std::env::consts::ARCH
            )));
        }
        [deny_filter(arch)?, clone3_filter(arch)?]
            .into_iter()
            .map(|f| BpfProgram::try_from(f).map_err(compile_error))
            .collect()
    }

    /// Installs the filters on every thread of the agent (there should be only one yet). The
    /// kernel runs both on every call and the most restrictive answer wins; `apply` sets
    /// `no_new_privs` first.
    pub fn install() -> io::Result<()> {
        for program in programs()? {
            seccompiler::apply_filter_all_threads(&program)
                .map_err(|e| io::Error::other(format!("cannot install the seccomp filter: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod filter {
    pub fn install() -> std::io::Result<()> {
        Err(std::io::Error::other("--sandbox needs Linux"))
    }
}

/// The initial pid namespace's inode number (`PROC_PID_INIT_INO`): the host's.
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// Why [`kill_leftovers`] will not run here, if it will not: it must only ever see the sandbox's
/// own processes, so the agent must be in a pid namespace other than the host's, be the child of
/// that namespace's pid 1, and see that namespace's `/proc`.
fn refuse_reason() -> Option<String> {
    let ns = match std::fs::read_link("/proc/self/ns/pid") {
        Ok(ns) => ns,
        Err(e) => return Some(format!("cannot read /proc/self/ns/pid: {e}")),
    };
    if ns.as_os_str() == INITIAL_PID_NAMESPACE {
        return Some("the agent is in the host's pid namespace".into());
    }
    // In the sandbox the agent is the child of the namespace's init (bubblewrap's). Anywhere else
    // (a container, a test runner) "everything else" would not be the sandbox.
    let parent = nix::unistd::getppid().as_raw();
    if parent != 1 {
        return Some(format!(
            "the agent's parent is pid {parent}, not the sandbox's init (pid 1)"
        ));
    }
    // A /proc mounted for another pid namespace would name other processes.
    let me = std::process::id().to_string();
    match std::fs::read_link("/proc/self") {
        Ok(p) if p.as_os_str() == me.as_str() => None,
        Ok(p) => Some(format!(
            "/proc belongs to another pid namespace (/proc/self is {p:?}, the agent is {me})"
        )),
        Err(e) => Some(format!("cannot read /proc/self: {e}")),
    }
}

/// Whether a process is still running (not a zombie or dead), from `/proc/<pid>/stat`.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X' | 'x'))
}

/// The session id of a process, from `/proc/<pid>/stat` (the 6th field).
fn session_of(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp session
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// The pids under `/proc`, other than 1 and `me` and those in a `spared` session, that are
/// still alive.
fn others(me: u32, spared: &std::collections::BTreeSet<i32>) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if keep(pid, me) || !alive(pid) {
            continue;
        }
        if !spared.is_empty() && session_of(pid).is_some_and(|s| spared.contains(&s)) {
            continue;
        }
        pids.push(pid);
    }
    Ok(pids)
}

/// The processes [`kill_leftovers`] never touches: the sandbox's init and the agent.
fn keep(pid: u32, me: u32) -> bool {
    pid == 1 || pid == me || pid == 0
}

/// How many scan-and-kill rounds before giving up (a process forking as fast as it can is caught
/// within a few).
const ROUNDS: usize = 200;

/// SIGKILLs every process of the sandbox but pid 1 and the agent, and waits (briefly, a bounded
/// number of rounds) until none is left running. Returns how many were killed. Refuses, doing
/// nothing, outside a pid namespace of the agent's own (see [`refuse_reason`]).
pub fn kill_leftovers() -> io::Result<usize> {
    if let Some(reason) = refuse_reason() {
        return Err(io::Error::other(format!(
            "not killing leftover processes: {reason}"
        )));
    }
    let me = std::process::id();
    // Background processes' sessions are spared; none starts while this runs.
    let (spared, _spawning) = crate::processes::protected_sessions();
    let mut killed = std::collections::BTreeSet::new();
    for _ in 0..ROUNDS {
        let pids = others(me, &spared)?;
        if pids.is_empty() {
            return Ok(killed.len());
        }
        for pid in pids {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), nix::sys::signal::SIGKILL)
                .is_ok()
            {
                killed.insert(pid);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(io::Error::other(format!(
        "processes still running after {ROUNDS} rounds of SIGKILL"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        assert!(arch_supported(), "tests run on x86_64 or aarch64");
        let programs = filter::programs().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn init_and_the_agent_are_never_killed() {
        assert!(keep(1, 7));
        assert!(keep(7, 7));
        assert!(!keep(8, 7));
    }

    #[test]
    fn process_state_is_read_past_the_command_name() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }

    #[test]
    fn leftovers_are_not_killed_in_the_host_pid_namespace() {
        // The unit tests run in whatever namespace the test runner has; only check that the guard
        // refuses when it must, never call kill_leftovers itself here.
        let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
        if ns.as_os_str() == INITIAL_PID_NAMESPACE || nix::unistd::getppid().as_raw() != 1 {
            assert!(refuse_reason().is_some());
        }
    }
}
