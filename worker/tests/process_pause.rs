//! Pausing a process-provider VM in the default sandbox: its processes are frozen in place (a
//! running command makes no progress while paused and goes on where it was after `start_vm`),
//! nothing is lost over 20 cycles, and a pause survives a provider reopen (as files: the frozen
//! processes do not outlive the provider, as running ones do not).

use std::path::PathBuf;
use std::time::Duration;

use hearth_worker::provider::{
    ExecSpec, ProcessConfig, ProcessProvider, ProviderErrorKind, VmId, VmProvider, VmQuery, VmState,
};

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

fn open(root: &std::path::Path) -> ProcessProvider {
    ProcessProvider::open(ProcessConfig::new(root)).unwrap()
}

fn volume(root: &std::path::Path, id: &VmId) -> PathBuf {
    root.join("vms").join(id.as_str()).join("volume")
}

fn read_counter(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_is_frozen_and_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let p = std::sync::Arc::new(open(&root));
    let id = vm("frozen");
    p.create_vm(&id).await.unwrap();
    let counting = {
        let (p, id) = (p.clone(), id.clone());
        tokio::spawn(async move {
            let script = "i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo $i > counter; \
                          sleep 0.05; done; echo finished at $i";
            p.exec(&id, ExecSpec::shell(script), None).await.unwrap()
        })
    };
    let counter = volume(&root, &id).join("counter");
    while read_counter(&counter) < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = p.pause_vm(&id).await.unwrap();
    assert_eq!(view.state, VmState::Paused);
    let at_pause = read_counter(&counter);
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer");
    if freezer.join("cgroup.procs").exists() {
        // Where the v1 freezer is mounted, it does the freezing (not SIGSTOP).
        let frozen = std::fs::read_dir(freezer).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("hearth-pause-")
                && std::fs::read_to_string(e.path().join("freezer.state"))
                    .is_ok_and(|s| s.trim() == "FROZEN")
        });
        assert!(frozen, "a frozen hearth-pause cgroup exists while paused");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        read_counter(&counter),
        at_pause,
        "a paused sandbox makes no progress"
    );
    let err = p
        .exec(&id, ExecSpec::shell("true"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    assert!(err.to_string().contains("paused"), "{err}");

    p.start_vm(&id).await.unwrap();
    // The same command goes on: its loop variable was kept, so it ends at 60, not later.
    let outcome = tokio::time::timeout(Duration::from_secs(30), counting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.exit_code, 0, "{outcome:?}");
    assert_eq!(
        String::from_utf8_lossy(&outcome.stdout).trim(),
        "finished at 60"
    );
    assert!(!outcome.timed_out);
    p.destroy_vm(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pause_cycles_lose_nothing_and_a_pause_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let id = vm("cycled");
    {
        let p = open(&root);
        p.create_vm(&id).await.unwrap();
        for cycle in 1..=20 {
            let out = p
                .exec(
                    &id,
                    ExecSpec::shell(format!("echo cycle-{cycle} >> cycles.log")),
                    None,
                )
                .await
                .unwrap();
            assert_eq!(out.exit_code, 0);
            p.pause_vm(&id).await.unwrap();
            p.start_vm(&id).await.unwrap();
        }
        p.pause_vm(&id).await.unwrap();
    }
    let p = open(&root);
    assert_eq!(
        p.get_vm(&id).await.unwrap().map(|v| v.state),
        Some(VmState::Paused)
    );
    p.start_vm(&id).await.unwrap();
    let out = p
        .exec(&id, ExecSpec::shell("cat cycles.log"), None)
        .await
        .unwrap();
    let expected: Vec<String> = (1..=20).map(|c| format!("cycle-{c}")).collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_with_a_running_command_is_destroyed_without_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let p = std::sync::Arc::new(open(&root));
    let id = vm("doomed");
    p.create_vm(&id).await.unwrap();
    let running = {
        let (p, id) = (p.clone(), id.clone());
        tokio::spawn(async move {
            p.exec(&id, ExecSpec::shell("touch started; sleep 600.4242"), None)
                .await
        })
    };
    while !volume(&root, &id).join("started").exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.pause_vm(&id).await.unwrap();
    // This sandbox's freezer cgroups (other tests pause sandboxes of their own meanwhile): the
    // ones holding its marked command.
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer");
    let ours: Vec<std::path::PathBuf> = std::fs::read_dir(freezer)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hearth-pause-"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|procs| {
                procs.split_whitespace().any(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("600.4242"))
                })
            })
        })
        .map(|e| e.path())
        .collect();
    p.destroy_vm(&id).await.unwrap();
    // The frozen command is thawed to be killed: its exec ends, it does not wait 600 s.
    let ended = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the exec of a destroyed paused vm ends")
        .unwrap();
    assert!(
        ended.as_ref().map_or(true, |o| !o.success()),
        "a killed command does not succeed: {ended:?}"
    );
    let left: Vec<_> = ours
        .iter()
        .filter(|dir| {
            std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        })
        .collect();
    assert!(left.is_empty(), "no frozen processes left: {left:?}");
}
