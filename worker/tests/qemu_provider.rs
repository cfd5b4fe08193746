//! The qemu provider against real Linux guests under QEMU (TCG on these machines): identity after
//! restore and rename, a hung agent, a dead VMM, corrupt snapshots, adoption across a provider
//! restart, and nothing left behind. Skips with a printed reason where QEMU or the guest image is
//! missing. Timings are printed by `measurements` (ignored; run it by hand), never asserted.

mod qemu_support;

use std::time::{Duration, Instant};

use hearth_worker::provider::{
    ExecSpec, ProviderError, ProviderErrorKind, QemuConfig, QemuProvider, SnapshotId, VmId,
    VmProvider, VmQuery, VmSpec, VmState,
};

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

fn snap(id: &str) -> SnapshotId {
    SnapshotId::new(id).unwrap()
}

fn restore(id: &str) -> VmSpec {
    VmSpec {
        restore_from: Some(snap(id)),
        ..VmSpec::default()
    }
}

/// Runs `cmd` with `sh -c` and returns its stdout, trimmed; the command must succeed.
async fn sh(p: &QemuProvider, id: &VmId, cmd: &str) -> String {
    let outcome = p.exec(id, ExecSpec::shell(cmd), None).await.unwrap();
    assert_eq!(outcome.exit_code, 0, "{cmd}: {outcome:?}");
    String::from_utf8(outcome.stdout).unwrap().trim().to_owned()
}

/// No QEMU process and no VM file of this provider is left.
fn assert_nothing_left(root: &std::path::Path) {
    let pids = qemu_support::qemu_pids_mentioning(&root.to_string_lossy());
    assert!(pids.is_empty(), "qemu processes left: {pids:?}");
    for sub in ["vms", "run", "tmp"] {
        let dir = root.join(sub);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{}: {left:?}", dir.display());
    }
}

/// Kills QEMU processes under a root when dropped (tests whose provider does not kill on drop).
struct KillGuard(std::path::PathBuf);

impl Drop for KillGuard {
    fn drop(&mut self) {
        for pid in qemu_support::qemu_pids_mentioning(&self.0.to_string_lossy()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn open(config: QemuConfig) -> QemuProvider {
    QemuProvider::open(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_reports_the_qemu_version() {
    let Some((p, _dir)) = qemu_support::provider() else {
        return;
    };
    let version = p.version().expect("a version");
    assert!(version.starts_with("QEMU emulator version"), "{version}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_one_snapshot_get_their_own_identity_and_clock() {
    let Some((p, dir)) = qemu_support::provider() else {
        return;
    };
    let template = vm("template");
    p.create_vm(&template).await.unwrap();
    p.put_file(&template, "app/state", b"from the template", None)
        .await
        .unwrap();
    let template_id = sh(&p, &template, "cat /etc/machine-id").await;
    p.snapshot_vm(&template, &snap("tpl")).await.unwrap();
    // The snapshot sits on disk for a while: the clones' clocks must not stay behind.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let probe = "hostname; cat /etc/machine-id; echo $HEARTH_SESSION_ID; \
                 head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; cat app/state";
    let mut seen = Vec::new();
    for clone in ["clone-a", "clone-b"] {
        let id = vm(clone);
        let view = p.create_vm_with_spec(&id, &restore("tpl")).await.unwrap();
        assert_eq!(view.restored_from, Some(snap("tpl")));
        let out = sh(&p, &id, probe).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{out}");
        assert_eq!(lines[0], clone, "host name = vm id");
        assert_eq!(lines[1].len(), 32, "{out}");
        assert_ne!(lines[1], template_id, "a new machine id");
        assert_eq!(lines[2], clone, "session id");
        let guest_now: u64 = lines[4].parse().unwrap();
        let host_now = hearth_messages::now_ms() / 1000;
        assert!(
            guest_now.abs_diff(host_now) <= 2,
            "guest clock {guest_now} vs host {host_now}"
        );
        assert_eq!(lines[5], "from the template");
        seen.push((lines[1].to_owned(), lines[3].to_owned()));
    }
    assert_ne!(seen[0].0, seen[1].0, "machine ids differ");
    assert_ne!(seen[0].1, seen[1].1, "random streams differ");
    for id in ["template", "clone-a", "clone-b"] {
        p.destroy_vm(&vm(id)).await.unwrap();
    }
    assert_nothing_left(&dir.path().join("qemu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_resets_the_identity_without_touching_memory() {
    let Some((p, _dir)) = qemu_support::provider() else {
        return;
    };
    let pooled = vm("pool-1");
    p.create_vm(&pooled).await.unwrap();
    // A process started before the rename must survive it: the VM's memory is untouched.
    let pid = sh(
        &p,
        &pooled,
        "setsid sleep 1000 >/dev/null 2>&1 & sleep 0.3; pidof sleep",
    )
    .await;
    let before = sh(&p, &pooled, "cat /etc/machine-id").await;
    p.rename_vm(&pooled, &vm("session-1")).await.unwrap();
    let out = sh(
        &p,
        &vm("session-1"),
        &format!(
            "hostname; echo $HEARTH_SESSION_ID; cat /etc/machine-id; kill -0 {pid} && echo alive"
        ),
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["session-1", "session-1"], "{out}");
    assert_ne!(lines[2], before);
    assert_eq!(lines[3], "alive", "{out}");

    // Snapshotted and renamed while stopped: the guest learns its name when it starts again.
    p.stop_vm(&vm("session-1")).await.unwrap();
    p.snapshot_vm(&vm("session-1"), &snap("while-stopped"))
        .await
        .unwrap();
    p.rename_vm(&vm("session-1"), &vm("session-2"))
        .await
        .unwrap();
    p.start_vm(&vm("session-2")).await.unwrap();
    assert_eq!(sh(&p, &vm("session-2"), "hostname").await, "session-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_a_timeout_and_its_clones_never_become_ready() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = qemu_support::config(dir.path().join("qemu")) else {
        return;
    };
    let p = open(QemuConfig {
        exec_grace_ms: 1000,
        agent_timeout_ms: 3000,
        ..config
    });
    let id = vm("hangs");
    p.create_vm(&id).await.unwrap();
    // The command stops the agent that runs it: no answer will ever come.
    let started = Instant::now();
    let err = p
        .exec(
            &id,
            ExecSpec::shell("kill -STOP $PPID").with_timeout(Duration::from_millis(500)),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::Timeout, "{err}");
    assert_eq!(err.status_code(), 504);
    assert!(started.elapsed() < Duration::from_secs(20));
    // Still a timeout, not a hang, on the next call (a fresh handshake fails too).
    let err = p
        .exec(&id, ExecSpec::argv(["true"]), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::Timeout, "{err}");

    // A snapshot of it restores into a guest that never answers: the create fails, nothing stays.
    p.snapshot_vm(&id, &snap("hung")).await.unwrap();
    let err = p
        .create_vm_with_spec(&vm("clone"), &restore("hung"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::Timeout, "{err}");
    assert!(p.get_vm(&vm("clone")).await.unwrap().is_none());
    p.destroy_vm(&id).await.unwrap();
    // The failed clone's QEMU is killed in the background.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_nothing_left(&dir.path().join("qemu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_detected_and_the_vm_reported_failed() {
    let Some((p, dir)) = qemu_support::provider() else {
        return;
    };
    let id = vm("victim");
    p.create_vm(&id).await.unwrap();
    let pid = p.qemu_pid(&id).unwrap();
    let running = {
        let p = std::sync::Arc::new(p);
        let (p2, id2) = (p.clone(), id.clone());
        let task =
            tokio::spawn(async move { p2.exec(&id2, ExecSpec::shell("sleep 60"), None).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let started = Instant::now();
        let err = task.await.unwrap().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "no hang");
        assert!(err.to_string().contains("failed"), "{err}");
        p
    };
    let p = running;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let view = p.get_vm(&id).await.unwrap().unwrap();
        if view.state == VmState::Destroyed {
            break;
        }
        assert!(Instant::now() < deadline, "still {:?}", view.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = p
        .exec(&id, ExecSpec::argv(["true"]), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::InvalidState(_)), "{err}");
    assert!(err.to_string().contains("signal 9"), "{err}");
    assert!(
        p.list_vms()
            .await
            .unwrap()
            .iter()
            .all(|v| v.state == VmState::Destroyed)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_nothing_left(&dir.path().join("qemu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_snapshot_file_fails_the_restore_clearly() {
    let Some((p, dir)) = qemu_support::provider() else {
        return;
    };
    let id = vm("src");
    p.create_vm(&id).await.unwrap();
    p.snapshot_vm(&id, &snap("good")).await.unwrap();
    p.snapshot_vm(&id, &snap("flipped")).await.unwrap();
    p.snapshot_vm(&id, &snap("gone")).await.unwrap();
    p.destroy_vm(&id).await.unwrap();

    let path = p.snapshot_state_path(&snap("flipped"));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x55;
    }
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(p.snapshot_state_path(&snap("gone"))).unwrap();

    for (snapshot, expect) in [("flipped", "corrupt"), ("gone", "cannot be restored")] {
        let err = p
            .create_vm_with_spec(&vm("clone"), &restore(snapshot))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ProviderErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains(expect), "{snapshot}: {err}");
        assert!(err.to_string().contains(snapshot), "{err}");
        assert!(p.get_vm(&vm("clone")).await.unwrap().is_none());
    }
    // A good snapshot still restores.
    p.create_vm_with_spec(&vm("clone"), &restore("good"))
        .await
        .unwrap();
    p.destroy_vm(&vm("clone")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_nothing_left(&dir.path().join("qemu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_adopts_live_vms_and_drops_dead_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("qemu");
    let Some(config) = qemu_support::config(&root) else {
        return;
    };
    let _guard = KillGuard(root.clone());
    let config = QemuConfig {
        kill_on_drop: false,
        ..config
    };
    let (keep, stopped, dies) = (vm("keep"), vm("idle"), vm("dies"));
    let doomed_pid = {
        let p = open(config.clone());
        for id in [&keep, &stopped, &dies] {
            p.create_vm(id).await.unwrap();
        }
        p.put_file(&keep, "f", b"survives", None).await.unwrap();
        p.stop_vm(&stopped).await.unwrap();
        p.qemu_pid(&dies).unwrap()
        // Dropped: the VMs keep running, as after a worker crash.
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(doomed_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let p = open(config);
    let views = p.list_vms().await.unwrap();
    let ids: Vec<(String, VmState)> = views
        .iter()
        .map(|v| (v.vm_id.to_string(), v.state))
        .collect();
    assert_eq!(
        ids,
        [
            ("idle".to_owned(), VmState::Stopped),
            ("keep".to_owned(), VmState::Running)
        ]
    );
    assert_eq!(
        sh(&p, &keep, "cat f; echo; hostname").await,
        "survives\nkeep"
    );
    p.start_vm(&stopped).await.unwrap();
    assert_eq!(sh(&p, &stopped, "hostname").await, "idle");
    for id in [&keep, &stopped] {
        p.destroy_vm(id).await.unwrap();
    }
    assert_nothing_left(&root);
}

/// Prints the numbers docs/BENCHMARKS.md quotes. Run by hand:
/// `cargo test -p hearth-worker --test qemu_provider -- --ignored --nocapture measurements`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measurements() {
    let dir = tempfile::tempdir().unwrap();
    let Some(config) = qemu_support::config(dir.path().join("qemu")) else {
        return;
    };
    // HEARTH_QEMU_VERIFY=0 measures restores without the state checksum.
    let verify = std::env::var("HEARTH_QEMU_VERIFY").map_or(true, |v| v != "0");
    let p = open(QemuConfig {
        verify_snapshots: verify,
        ..config
    });
    let spec = VmSpec {
        memory_mib: 256,
        ..VmSpec::default()
    };
    // Cold boots, one VM at a time.
    let mut boots = Vec::new();
    for i in 0..3 {
        let id = vm(&format!("cold-{i}"));
        let t = Instant::now();
        p.create_vm_with_spec(&id, &spec).await.unwrap();
        boots.push(t.elapsed());
        if i > 0 {
            p.destroy_vm(&id).await.unwrap();
        }
    }
    let t = Instant::now();
    p.snapshot_vm(&vm("cold-0"), &snap("m")).await.unwrap();
    let snapshot_time = t.elapsed();
    let cold_rss = rss_kib(&p, "cold-0");
    p.destroy_vm(&vm("cold-0")).await.unwrap();
    let size = p
        .get_snapshot(&snap("m"))
        .await
        .unwrap()
        .unwrap()
        .size_bytes;
    // Restores on an otherwise idle host, one at a time.
    let mut restores = Vec::new();
    for i in 0..5 {
        let id = vm(&format!("solo-{i}"));
        let t = Instant::now();
        p.create_vm_with_spec(&id, &restore("m")).await.unwrap();
        restores.push(t.elapsed());
        p.destroy_vm(&id).await.unwrap();
    }
    // Three restores at once.
    let t = Instant::now();
    let p = std::sync::Arc::new(p);
    let mut parallel = tokio::task::JoinSet::new();
    for i in 0..3 {
        let p = p.clone();
        parallel.spawn(async move {
            let t = Instant::now();
            p.create_vm_with_spec(&vm(&format!("warm-{i}")), &restore("m"))
                .await
                .unwrap();
            t.elapsed()
        });
    }
    let each: Vec<Duration> = parallel.join_all().await;
    let parallel_total = t.elapsed();
    let mut execs = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        p.exec(&vm("warm-0"), ExecSpec::argv(["true"]), None)
            .await
            .unwrap();
        execs.push(t.elapsed());
    }
    let mut renames = Vec::new();
    for i in 1..3 {
        let t = Instant::now();
        p.rename_vm(&vm(&format!("warm-{i}")), &vm(&format!("sess-{i}")))
            .await
            .unwrap();
        renames.push(t.elapsed());
    }
    execs.sort();
    println!("accel: {:?}, verify_snapshots: {verify}", p.accel());
    println!("cold boot -> agent ready (256 MiB): {boots:?}");
    println!("snapshot (pause + save + resume): {snapshot_time:?}");
    println!("restore -> agent ready (incl. identity reset), one at a time: {restores:?}");
    println!("3 restores in parallel: each {each:?}, all {parallel_total:?}");
    println!("rename (identity reset in the guest): {renames:?}");
    println!(
        "exec true round trip: p50 {:?} p90 {:?} max {:?}",
        execs[execs.len() / 2],
        execs[execs.len() * 9 / 10],
        execs[execs.len() - 1]
    );
    println!("snapshot size: {size} bytes");
    println!(
        "RSS: cold-booted {cold_rss} KiB, restored {} KiB",
        rss_kib(&p, "warm-0")
    );
}

/// Resident set of a VM's QEMU process.
fn rss_kib(p: &QemuProvider, id: &str) -> u64 {
    let pid = p.qemu_pid(&vm(id)).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

/// The attacks of `escape.rs` that apply to a VM: guest code sees nothing of the host (files,
/// network, the worker's environment), and what a request's `env` carries runs in the guest only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_code_cannot_reach_the_host() {
    let Some((p, dir)) = qemu_support::provider() else {
        return;
    };
    let secret = std::env::temp_dir().join(format!("hearth-qemu-escape-{}", std::process::id()));
    std::fs::write(&secret, "host secret").unwrap();
    let marker = std::env::temp_dir().join(format!("hearth-qemu-marker-{}", std::process::id()));
    let id = vm("attacker");
    p.create_vm(&id).await.unwrap();

    // The host's files: not there, by path or through /proc.
    let probe = format!(
        "cat {} 2>/dev/null || echo absent; cat /proc/1/environ | tr '\\0' '\\n' | grep -c NATS || true",
        secret.display()
    );
    let out = sh(&p, &id, &probe).await;
    assert!(out.starts_with("absent"), "{out}");
    assert!(!out.contains("host secret"), "{out}");
    // No network device but loopback: NATS on the host's 127.0.0.1 is the guest's own loopback.
    let interfaces = sh(
        &p,
        &id,
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    )
    .await;
    assert_eq!(interfaces, "lo", "only loopback in the guest");
    // A request's env (LD_PRELOAD and friends) reaches the guest's command only.
    let outcome = p
        .exec(
            &id,
            ExecSpec::shell(format!("echo x > {}; true", marker.display()))
                .with_env("LD_PRELOAD", "/nonexistent/evil.so")
                .with_env("LD_LIBRARY_PATH", "/nonexistent"),
            None,
        )
        .await
        .unwrap();
    assert!(outcome.stderr.len() < 4096, "{outcome:?}");
    assert!(!marker.exists(), "a guest command wrote on the host");
    // Writing "outside" in the guest changes nothing on the host.
    sh(
        &p,
        &id,
        &format!("echo guest > {} || true", secret.display()),
    )
    .await;
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret");

    let _ = std::fs::remove_file(&secret);
    p.destroy_vm(&id).await.unwrap();
    assert_nothing_left(&dir.path().join("qemu"));
}
