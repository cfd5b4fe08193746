//! Unit tests of `limits`.

use super::*;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A parent unique to this test run, removed (with any sandbox left in it) on drop.
struct TestParent {
    cgroups: Cgroups,
}

impl TestParent {
    /// `None` (after printing why) unless we are root on a host with v1 or v2 cgroups.
    fn new() -> Option<TestParent> {
        static N: AtomicU32 = AtomicU32::new(0);
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: cgroup tests need root");
            return None;
        }
        let parent = format!(
            "hearth-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let cgroups = Cgroups::detect(&parent);
        match cgroups.mechanism() {
            LimitsMechanism::CgroupV1 | LimitsMechanism::CgroupV2 => Some(TestParent { cgroups }),
            _ => {
                eprintln!(
                    "skipping: no usable cgroup hierarchy: {:?}",
                    cgroups.reason()
                );
                None
            }
        }
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        self.cgroups.remove_stale(&HashSet::new());
        for dir in self.cgroups.parents() {
            let _ = rmdir_retrying(dir);
        }
    }
}

/// `sh -c '<enter> && exec "$@"' sh sh -c <script>`: the way the provider will start bwrap.
fn run_in(sandbox: &SandboxCgroup, script: &str) -> Command {
    let mut cmd = Command::new("sh");
    // Its own process group, so nothing it does to its group can reach the test harness.
    cmd.process_group(0)
        .arg("-c")
        .arg(format!("{} && exec \"$@\"", sandbox.enter_script()))
        .args(["sh", "sh", "-c", script]);
    cmd
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn names_are_validated_and_paths_quoted() {
    assert!(validate_name("0f3c9a2b7d4e4f6a8b1c2d3e4f5a6b7c").is_ok());
    for bad in ["", "..", "a/b", "-x", "a b", "x'y", &"a".repeat(65)] {
        assert!(validate_name(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(sh_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    let err = Cgroups::disabled()
        .create("../escape", &LimitSpec::default())
        .unwrap_err();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf %s {}",
            sh_quote(Path::new("/a b/it's $HOME"))
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "/a b/it's $HOME");
}

#[test]
fn mechanism_names_match_serde() {
    for m in [
        LimitsMechanism::CgroupV2,
        LimitsMechanism::CgroupV1,
        LimitsMechanism::Rlimit,
        LimitsMechanism::None,
    ] {
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            format!("\"{}\"", m.as_str())
        );
    }
}

/// The v2 path cannot run on this (hybrid v1) host, so check what it writes against a fake
/// cgroup2 root: controllers delegated at the root and the parent, and the limit formats.
#[test]
fn v2_writes_limits_in_v2_format_on_a_fake_root() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("cgroup.controllers"),
        "cpuset cpu io memory pids",
    )
    .unwrap();
    let cgroups = Cgroups::detect_in(root.path(), "hearth");
    assert_eq!(
        cgroups.mechanism(),
        LimitsMechanism::CgroupV2,
        "{:?}",
        cgroups.reason()
    );
    assert_eq!(
        read(root.path(), "cgroup.subtree_control"),
        "+memory +pids +cpu"
    );
    let parent = root.path().join("hearth");
    assert_eq!(
        read(&parent, "cgroup.subtree_control"),
        "+memory +pids +cpu"
    );
    let spec = LimitSpec {
        memory_mib: 64,
        max_processes: 20,
        vcpus: 2,
    };
    let sandbox = cgroups.create("abc", &spec).unwrap();
    let dir = parent.join("abc");
    assert_eq!(read(&dir, "memory.max"), (64u64 << 20).to_string());
    assert_eq!(read(&dir, "pids.max"), "20");
    assert_eq!(read(&dir, "cpu.max"), "200000 100000");
    assert_eq!(
        sandbox.enter_script(),
        format!("echo $$ > '{}'", dir.join("cgroup.procs").display())
    );
    std::mem::forget(sandbox); // a plain tempdir cannot be rmdir'ed with files in it

    // No memory controller: v2 refused, and the fake has no v1 hierarchies either.
    let bare = tempfile::tempdir().unwrap();
    std::fs::write(bare.path().join("cgroup.controllers"), "cpu io").unwrap();
    let cgroups = Cgroups::detect_in(bare.path(), "hearth");
    assert_eq!(cgroups.mechanism(), LimitsMechanism::Rlimit);
    let reason = cgroups.reason().unwrap();
    assert!(
        reason.contains("controller memory not available"),
        "{reason}"
    );
    assert!(reason.contains("cgroup v1"), "{reason}");
}

/// Under rlimits the script caps the address space: a 400 MiB allocation fails under 64 MiB.
#[test]
fn rlimit_script_caps_memory() {
    let cgroups = Cgroups::rlimit("test");
    let spec = LimitSpec {
        memory_mib: 64,
        max_processes: 20,
        vcpus: 1,
    };
    let sandbox = cgroups.create("r1", &spec).unwrap();
    assert_eq!(sandbox.enter_script(), "ulimit -v 65536");
    let out = run_in(&sandbox, "ulimit -v").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65536");
    let hog = run_in(&sandbox, "head -c 400M /dev/zero | tail > /dev/null")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!hog.success(), "400 MiB fit under ulimit -v 64 MiB");
    assert_eq!(
        Cgroups::disabled()
            .create("n1", &spec)
            .unwrap()
            .enter_script(),
        ":"
    );
}

#[test]
fn limits_are_written_and_removed() {
    let Some(t) = TestParent::new() else { return };
    let spec = LimitSpec {
        memory_mib: 64,
        max_processes: 20,
        vcpus: 2,
    };
    let sandbox = t.cgroups.create("lim", &spec).unwrap();
    let dirs = sandbox.dirs.clone();
    match t.cgroups.mechanism() {
        LimitsMechanism::CgroupV1 => {
            assert_eq!(
                read(&dirs[0], "memory.limit_in_bytes"),
                (64u64 << 20).to_string()
            );
            if dirs[0].join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(
                    read(&dirs[0], "memory.memsw.limit_in_bytes"),
                    (64u64 << 20).to_string()
                );
            }
            assert_eq!(read(&dirs[1], "pids.max"), "20");
            if let Some(cpu) = dirs.get(2) {
                assert_eq!(read(cpu, "cpu.cfs_quota_us"), "200000");
                assert_eq!(read(cpu, "cpu.cfs_period_us"), "100000");
            }
        }
        _ => {
            assert_eq!(read(&dirs[0], "memory.max"), (64u64 << 20).to_string());
            assert_eq!(read(&dirs[0], "pids.max"), "20");
        }
    }
    // Recreating (a restarted worker) lifts limits set to 0.
    let again = t.cgroups.create("lim", &LimitSpec::default()).unwrap();
    if t.cgroups.mechanism() == LimitsMechanism::CgroupV1 {
        assert_eq!(read(&dirs[1], "pids.max"), "max");
    }
    std::mem::forget(again);
    sandbox.remove().unwrap();
    for dir in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn enter_script_moves_the_child_into_the_cgroup() {
    let Some(t) = TestParent::new() else { return };
    let sandbox = t.cgroups.create("enter", &LimitSpec::default()).unwrap();
    let out = run_in(&sandbox, "cat /proc/self/cgroup").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let parent = t.cgroups.parents()[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let want = format!("/{parent}/enter");
    let lines: Vec<&str> = text.lines().filter(|l| l.ends_with(&want)).collect();
    match t.cgroups.mechanism() {
        LimitsMechanism::CgroupV1 => {
            assert!(lines.iter().any(|l| l.contains(":memory:")), "{text}");
            assert!(lines.iter().any(|l| l.contains(":pids:")), "{text}");
        }
        _ => assert!(lines.iter().any(|l| l.starts_with("0::")), "{text}"),
    }
    // And the test process itself did not move.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert!(!own.contains(&want), "{own}");
}

#[test]
fn memory_hog_is_oom_killed_and_counted() {
    let Some(t) = TestParent::new() else { return };
    let spec = LimitSpec {
        memory_mib: 64,
        max_processes: 0,
        vcpus: 0,
    };
    let sandbox = t.cgroups.create("hog", &spec).unwrap();
    assert_eq!(sandbox.oom_kills(), 0);
    let status = run_in(&sandbox, "head -c 400M /dev/zero | tail > /dev/null")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "a 400 MiB hog survived a 64 MiB limit");
    assert!(sandbox.oom_kills() >= 1, "no OOM kill counted");
    // We are still here (the test process was not in the cgroup), and the cgroup is empty.
    assert!(sandbox.pids().is_empty());
    sandbox.remove().unwrap();
}

#[test]
fn fork_storm_is_capped_and_killed() {
    let Some(t) = TestParent::new() else { return };
    let spec = LimitSpec {
        memory_mib: 0,
        max_processes: 20,
        vcpus: 0,
    };
    let sandbox = t.cgroups.create("storm", &spec).unwrap();
    // dash gives up at the first refused fork ("Cannot fork") and exits; the sleeps it did
    // start stay behind in the cgroup, orphaned, as a real storm's would.
    let out = run_in(
        &sandbox,
        "for i in $(seq 50); do sleep 30 >/dev/null 2>&1 & done; wait",
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fork"),
        "no fork failure reported: {stderr}"
    );
    let pids = sandbox.pids();
    assert!(
        pids.len() <= 20,
        "{} processes under max_processes=20",
        pids.len()
    );
    assert!(pids.len() >= 10, "the storm did not start: {pids:?}");
    let pids_dir = sandbox.dirs.get(1).unwrap_or(&sandbox.dirs[0]);
    let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap();
    assert!(
        keyed_value(&events, "max").unwrap() >= 1,
        "no fork refused: {events}"
    );
    let started = Instant::now();
    assert!(sandbox.kill_all(), "processes survived kill_all");
    assert!(started.elapsed() < KILL_DEADLINE);
    assert!(sandbox.pids().is_empty());
    sandbox.remove().unwrap();
}

/// The composition the provider will use: enter, then exec a hardened bubblewrap (user, pid
/// and cgroup namespaces, caps dropped, uid 1000). Limits still hold inside it.
#[test]
fn limits_hold_inside_hardened_bwrap() {
    let Some(t) = TestParent::new() else { return };
    let bwrap = Path::new("/usr/bin/bwrap");
    if !bwrap.exists() {
        eprintln!("skipping: {} not installed", bwrap.display());
        return;
    }
    let spec = LimitSpec {
        memory_mib: 64,
        max_processes: 20,
        vcpus: 0,
    };
    let sandbox = t.cgroups.create("bwrap", &spec).unwrap();
    let script = "id -u; head -c 400M /dev/zero | tail > /dev/null; echo hog=$?; \
                  for i in $(seq 50); do sleep 30 >/dev/null 2>&1 & done; wait";
    let out = Command::new("sh")
        .process_group(0)
        .arg("-c")
        .arg(format!("{} && exec \"$@\"", sandbox.enter_script()))
        .arg("sh")
        .arg(bwrap)
        .args([
            "--unshare-all",
            "--unshare-user",
            "--uid",
            "1000",
            "--gid",
            "1000",
        ])
        .args(["--cap-drop", "ALL", "--die-with-parent", "--new-session"])
        .args(["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin"])
        .args([
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
        ])
        .args([
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--clearenv",
        ])
        .args(["--setenv", "PATH", "/usr/bin", "--", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("1000\n"),
        "not the sandbox uid: {stdout}"
    );
    assert!(
        stdout.contains("hog=137"),
        "the hog was not SIGKILLed: {stdout}"
    );
    assert!(sandbox.oom_kills() >= 1);
    let pids_dir = sandbox.dirs.get(1).unwrap_or(&sandbox.dirs[0]);
    let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap();
    assert!(
        keyed_value(&events, "max").unwrap() >= 1,
        "no fork refused: {events}"
    );
    assert!(sandbox.pids().len() <= 20);
    sandbox.remove().unwrap();
}

#[test]
fn remove_stale_keeps_only_the_named() {
    let Some(t) = TestParent::new() else { return };
    let keep = t.cgroups.create("keep", &LimitSpec::default()).unwrap();
    let stale = t.cgroups.create("stale", &LimitSpec::default()).unwrap();
    let mut sleeper = run_in(&stale, "sleep 30").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!stale.pids().is_empty());
    let stale_dirs = stale.dirs.clone();
    std::mem::forget(stale); // as if the worker had died
    let removed = t.cgroups.remove_stale(&HashSet::from(["keep".to_owned()]));
    assert_eq!(removed, vec!["stale".to_owned()]);
    assert!(
        sleeper.wait().unwrap().signal().is_some(),
        "the stale sandbox's process lived"
    );
    assert!(stale_dirs.iter().all(|d| !d.exists()));
    assert!(keep.dirs.iter().all(|d| d.exists()));
    drop(keep);
}

#[test]
fn cpu_quota_applies_to_the_sandbox() {
    let Some(t) = TestParent::new() else { return };
    let spec = LimitSpec {
        memory_mib: 0,
        max_processes: 0,
        vcpus: 1,
    };
    let sandbox = t.cgroups.create("cpu", &spec).unwrap();
    let Some(cpu_dir) = (match t.cgroups.mechanism() {
        LimitsMechanism::CgroupV1 => sandbox.dirs.get(2).cloned(),
        _ => sandbox.dirs.first().cloned(),
    }) else {
        eprintln!("skipping: no cpu hierarchy");
        return;
    };
    // Spinners run under the CFS bandwidth control: enforcement periods are counted for this
    // cgroup (only when a quota is set). Whether they reach the quota and get throttled depends
    // on how busy the host is, so that is reported, not asserted.
    let status = run_in(
        &sandbox,
        "(while :; do :; done) & (while :; do :; done) & sleep 0.5",
    )
    .status()
    .unwrap();
    assert!(status.success());
    assert!(sandbox.kill_all());
    let stat = std::fs::read_to_string(cpu_dir.join("cpu.stat")).unwrap();
    assert!(
        keyed_value(&stat, "nr_periods").unwrap() >= 1,
        "no quota periods: {stat}"
    );
    eprintln!("cpu.stat under vcpus=1: {}", stat.replace('\n', ", "));
}
