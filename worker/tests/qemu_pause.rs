//! Pause to disk under QEMU (TCG here): a paused VM has no QEMU process, and `start_vm` brings
//! back the same machine — its files, a program still running with the value it held, its host
//! name — through repeated cycles, across a provider restart; a corrupt state file fails the VM
//! clearly and leaves nothing running. Skips with a printed reason where QEMU or the guest image
//! is missing. Kept few: every test boots a guest.

mod qemu_support;

use std::time::Duration;

use hearth_worker::provider::{
    ExecSpec, ProviderErrorKind, QemuConfig, QemuProvider, VmId, VmProvider, VmQuery, VmState,
};

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

async fn sh(p: &QemuProvider, id: &VmId, cmd: &str) -> String {
    let outcome = p.exec(id, ExecSpec::shell(cmd), None).await.unwrap();
    assert_eq!(outcome.exit_code, 0, "{cmd}: {outcome:?}");
    String::from_utf8(outcome.stdout).unwrap().trim().to_owned()
}

/// Starts a program in the guest that counts in a shell variable (its memory) and shows the count
/// in `/tmp/counter`; returns its pid.
async fn start_counter(p: &QemuProvider, id: &VmId) -> String {
    sh(
        p,
        id,
        // Waits for the first count: the command's leftovers are killed when it returns, and the
        // program is safe from that only once `setsid` has run.
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done' \
         >/dev/null 2>&1 & pid=$!; while [ ! -s /tmp/counter ]; do sleep 0.05; done; echo $pid",
    )
    .await
}

async fn counter(p: &QemuProvider, id: &VmId) -> u64 {
    sh(p, id, "cat /tmp/counter").await.parse().unwrap()
}

fn qemu_running(root: &std::path::Path) -> bool {
    !qemu_support::qemu_pids_mentioning(&root.to_string_lossy()).is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_has_no_qemu_and_resumes_with_its_files_and_memory_through_20_cycles() {
    let Some((p, dir)) = qemu_support::provider() else {
        return;
    };
    let root = dir.path().join("qemu");
    let id = vm("sleeper");
    p.create_vm(&id).await.unwrap();
    let pid = start_counter(&p, &id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.put_file(&id, "notes/kept", b"before the pause", None)
        .await
        .unwrap();

    let view = p.pause_vm(&id).await.unwrap();
    assert_eq!(view.state, VmState::Paused);
    assert!(!qemu_running(&root), "a paused vm keeps no qemu process");
    assert!(p.paused_bytes() > 0);
    let err = p
        .exec(&id, ExecSpec::shell("true"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    assert!(err.to_string().contains("paused"), "{err}");
    let err = p.pause_vm(&id).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let view = p.start_vm(&id).await.unwrap();
    assert_eq!(view.state, VmState::Running);
    assert_eq!(p.paused_bytes(), 0);
    // The same program, still counting where it was (its variable lived in the saved memory).
    let first = counter(&p, &id).await;
    let out = sh(
        &p,
        &id,
        &format!("kill -0 {pid} && echo alive; cat notes/kept; echo; hostname; date +%s"),
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..3],
        ["alive", "before the pause", "sleeper"],
        "{out}"
    );
    let guest_now: u64 = lines[3].parse().unwrap();
    let host_now = hearth_messages::now_ms() / 1000;
    assert!(
        guest_now.abs_diff(host_now) <= 2,
        "the clock is pushed on resume: guest {guest_now} vs host {host_now}"
    );
    assert!(first >= 5, "the counter ran before the pause: {first}");

    // The E2B bug class: nothing lost over repeated cycles.
    let mut last = first;
    for cycle in 1..=20 {
        sh(&p, &id, &format!("echo cycle-{cycle} >> cycles.log")).await;
        p.pause_vm(&id).await.unwrap();
        assert!(!qemu_running(&root), "cycle {cycle}: qemu ended");
        p.start_vm(&id).await.unwrap();
        let now = counter(&p, &id).await;
        assert!(
            now >= last,
            "cycle {cycle}: counter went back from {last} to {now}"
        );
        last = now;
    }
    let log = sh(&p, &id, "cat cycles.log").await;
    let expected: Vec<String> = (1..=20).map(|c| format!("cycle-{c}")).collect();
    assert_eq!(log.lines().collect::<Vec<_>>(), expected);
    assert_eq!(
        sh(&p, &id, &format!("kill -0 {pid} && echo alive")).await,
        "alive"
    );
    // A paused VM is destroyed like any other: its state file goes with it.
    p.pause_vm(&id).await.unwrap();
    p.destroy_vm(&id).await.unwrap();
    assert!(!qemu_running(&root));
    assert!(!root.join("vms/sleeper").exists());
    assert_eq!(p.paused_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_survives_a_provider_restart_and_a_corrupt_state_fails_the_vm_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("qemu");
    let Some(config) = qemu_support::config(&root) else {
        return;
    };
    let config = QemuConfig {
        kill_on_drop: false,
        ..config
    };
    let (kept, broken) = (vm("kept"), vm("broken"));
    let pid = {
        let p = QemuProvider::open(config.clone()).unwrap();
        p.create_vm(&kept).await.unwrap();
        p.create_vm(&broken).await.unwrap();
        let pid = start_counter(&p, &kept).await;
        p.put_file(&kept, "f", b"survives", None).await.unwrap();
        p.pause_vm(&kept).await.unwrap();
        p.pause_vm(&broken).await.unwrap();
        pid
        // Dropped as by a worker crash: paused VMs have nothing running to adopt.
    };
    assert!(!qemu_running(&root));
    // Corrupt the second VM's state on disk.
    let state = root.join("vms/broken/paused.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();

    let p = QemuProvider::open(QemuConfig {
        kill_on_drop: true,
        ..config
    })
    .unwrap();
    let states: Vec<(String, VmState)> = p
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.vm_id.to_string(), v.state))
        .collect();
    assert_eq!(
        states,
        [
            ("broken".to_owned(), VmState::Paused),
            ("kept".to_owned(), VmState::Paused)
        ]
    );
    p.start_vm(&kept).await.unwrap();
    assert_eq!(
        sh(
            &p,
            &kept,
            &format!("cat f; echo; kill -0 {pid} && echo alive")
        )
        .await,
        "survives\nalive"
    );

    let err = p.start_vm(&broken).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("failed") && text.contains("checksum"),
        "the error says why: {text}"
    );
    // Failed, not half-running: a tombstone, one qemu (the kept vm's) and no files of it left.
    assert_eq!(
        p.get_vm(&broken).await.unwrap().map(|v| v.state),
        Some(VmState::Destroyed)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        qemu_support::qemu_pids_mentioning(&root.to_string_lossy()).len(),
        1
    );
    assert!(!root.join("vms/broken").exists());
    p.destroy_vm(&kept).await.unwrap();
}

/// A file system of `mib` MiB mounted at `dir` for the length of a test (root only).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u32) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs (not root?)");
        }
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_that_does_not_fit_on_the_state_disk_fails_cleanly_and_the_vm_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let root = disk.join("qemu");
    let Some(config) = qemu_support::config(&root) else {
        return;
    };
    // Room for the VM's files and sockets, not for its memory.
    let Some(_tmpfs) = Tmpfs::mount(&disk, 64) else {
        return;
    };
    let p = QemuProvider::open(config).unwrap();
    let id = vm("cramped");
    p.create_vm(&id).await.unwrap();
    sh(&p, &id, "echo before > f").await;
    let err = p.pause_vm(&id).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains("cannot be paused"), "{err}");
    assert_eq!(
        p.get_vm(&id).await.unwrap().map(|v| v.state),
        Some(VmState::Running)
    );
    assert_eq!(p.paused_bytes(), 0);
    assert_eq!(sh(&p, &id, "cat f").await, "before");
    assert!(!root.join("vms/cramped/paused.state").exists());
    p.destroy_vm(&id).await.unwrap();
}
