//! `pause_upload` end to end on real microVMs (QEMU, TCG here) and real processes: the
//! `hearth-scheduler` binary and two `hearth-worker` binaries on the qemu provider over a real
//! nats-server. A session with a running program and a file is paused with its state uploaded;
//! its worker is SIGKILLed; past `worker_lost_grace` the session is still `paused` (unplaced);
//! an exec — sent to the session's data plane as any client does — resumes it on the other
//! worker with its program still running and its file, and the uploaded object is gone. Then
//! the killed worker restarts on its old data directory (it still holds the paused VM): the
//! scheduler destroys that copy, so the session runs once, on the worker it moved to.
//! Skips with a printed reason where QEMU or the guest image is missing.
//!
//! And through NATS accounts (deploy/nats/single.conf, workers on the fake provider): an unplaced
//! session's data plane is served by the scheduler under its role's permissions, a tenant's
//! request is forwarded through the import to the session's new worker, and another tenant's is
//! answered 404.

#[path = "../../worker/tests/qemu_support/mod.rs"]
mod qemu_support;

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::FutureExt;
use hearth_messages::*;

async fn sh(client: &HearthClient, sid: &SessionId, cmd: &str) -> String {
    let out = client.exec(sid, &ExecRequest::cmd(cmd)).await.unwrap();
    assert_eq!(out.exit_code, 0, "{cmd}: {out:?}");
    out.stdout.to_string_lossy().trim().to_owned()
}

/// Kills the QEMU processes a SIGKILLed qemu worker left running (they outlive their worker by
/// design: a restarted worker adopts them).
fn kill_qemus(data_dir: &std::path::Path) {
    let Ok(runs) = std::fs::read_dir(data_dir.join("qemu/run")) else {
        return;
    };
    for run in runs.flatten() {
        if let Ok(pid) = std::fs::read_to_string(run.path().join("qemu.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_uploaded_vm_survives_the_sigkill_of_its_worker_and_runs_once_elsewhere() {
    let (_, image) = match qemu_support::environment() {
        Ok(found) => found,
        Err(reason) => {
            eprintln!("skipping qemu test: {reason}");
            return;
        }
    };
    let image = image.display().to_string();
    let config = r#"
worker_lost_grace_ms = 5000
[[templates]]
name = "default"
min_ready = 1
max_ready = 1
memory_mib = 256
pause_upload = true
"#;
    let mut stack = Stack::start_with_worker_args(
        &["w1", "w2"],
        config,
        &["--provider", "qemu", "--qemu-image", &image],
    )
    .await;
    let dir = stack.dir.path().to_path_buf();
    let result = std::panic::AssertUnwindSafe(scenario(&mut stack))
        .catch_unwind()
        .await;
    for (w, _) in &stack.workers {
        kill_qemus(&dir.join(w));
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(stack: &mut Stack) {
    stack
        .wait_pool("default", Duration::from_secs(300), |p| p.ready >= 1)
        .await;
    let c = stack.client.clone();
    let sid = SessionId::new("roamer").unwrap();
    let s = c
        .create_session(&CreateSessionRequest {
            session_id: Some(sid.clone()),
            wait_ms: Some(120_000),
            ttl_s: Some(3600),
            ..Default::default()
        })
        .await
        .unwrap();
    let victim = s.worker_id.to_string();
    let survivor = if victim == "w1" { "w2" } else { "w1" };
    let pid = sh(
        &c,
        &sid,
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done' \
         >/dev/null 2>&1 & pid=$!; while [ ! -s /tmp/counter ]; do sleep 0.05; done; echo $pid",
    )
    .await;
    c.put_file(&sid, "work/notes.txt", b"moved with me".to_vec(), None)
        .await
        .unwrap();

    let paused = c.pause(&sid).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    assert!(paused.pause_uploaded, "{paused:?}\n{}", stack.logs());
    assert!(paused.pause_upload_bytes > 0);
    let key = paused_object_key(None, &VmId::from(sid.clone()));
    let js = async_nats::jetstream::new(c.nats().clone());
    let store = js
        .get_object_store(c.subjects().bucket(Bucket::Snapshots))
        .await
        .unwrap();
    let info = store.info(&key).await.unwrap();
    assert_eq!(info.size as u64, paused.pause_upload_bytes);

    // The worker dies; the session outlives it.
    stack.worker(&victim).kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.get_session(&sid).await.unwrap();
        if s.unplaced {
            assert_eq!(s.state, SessionState::Paused);
            break;
        }
        assert!(
            s.state == SessionState::Paused && Instant::now() < deadline,
            "never unplaced: {s:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An exec is the touch: resumed on the survivor, same machine, program and file intact. (A
    // client retries a 503 — no worker could take it at that moment — as for any request.)
    let touch = ExecRequest::cmd(format!("kill -0 {pid} && echo alive; cat work/notes.txt"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        match c.exec(&sid, &touch).await {
            Ok(out) => break out,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                eprintln!("touch: {e}; retrying");
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(500))).await;
            }
            Err(e) => panic!("touch: {e}\n{}", stack.logs()),
        }
    };
    assert_eq!(out.exit_code, 0, "{out:?}");
    let out = out.stdout.to_string_lossy().trim().to_owned();
    assert_eq!(out, "alive\nmoved with me", "{}", stack.logs());
    let s = c.get_session(&sid).await.unwrap();
    assert_eq!(s.state, SessionState::Running);
    assert_eq!(s.worker_id.as_str(), survivor);
    assert!(!s.unplaced && !s.pause_uploaded, "{s:?}");
    let left = store.info(&key).await;
    assert!(
        left.as_ref().map_or(true, |i| i.deleted),
        "the object was not deleted: {left:?}\n{}",
        stack.logs()
    );
    let host = sh(&c, &sid, "hostname").await;
    assert_eq!(host, sid.as_str(), "the same identity");

    // The dead worker comes back with its copy of the paused VM: destroyed, not resumed.
    stack.workers.retain(|(w, _)| w != &victim);
    stack.add_worker(&victim, 32);
    let stale = stack
        .dir
        .path()
        .join(&victim)
        .join("qemu/vms")
        .join(sid.as_str());
    let deadline = Instant::now() + Duration::from_secs(60);
    while stale.exists() {
        assert!(
            Instant::now() < deadline,
            "the returning worker's copy was never destroyed\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = sh(&c, &sid, &format!("kill -0 {pid} && echo alive")).await;
    assert_eq!(out, "alive");
    assert_eq!(
        c.get_session(&sid).await.unwrap().worker_id.as_str(),
        survivor
    );
    let released = c.release(&sid).await.unwrap();
    assert_eq!(released.state, SessionState::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_request_to_an_unplaced_session_goes_through_the_accounts_to_its_new_worker() {
    let config = r#"
worker_lost_grace_ms = 4000
[[templates]]
name = "default"
min_ready = 1
max_ready = 1
pause_upload = true
"#;
    let mut stack = Stack::start_with_accounts_and_worker_args(
        &["worker-1", "worker-2"],
        config,
        &["--provider", "fake"],
    )
    .await;
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 1)
        .await;
    let c = stack.client.clone();
    let s = c
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap();
    let sid = s.session_id.clone();
    c.put_file(&sid, "notes.txt", b"tenant-a's".to_vec(), None)
        .await
        .unwrap();
    let paused = c.pause(&sid).await.unwrap();
    assert!(paused.pause_uploaded, "{paused:?}\n{}", stack.logs());
    let victim = s.worker_id.to_string();
    stack.worker(&victim).kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.get_session(&sid).await.unwrap().unplaced {
        assert!(
            Instant::now() < deadline,
            "never unplaced\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another tenant: 404 from the scheduler, and nothing moves.
    let b = HearthClient::new(connect_as(stack.nats.url(), "tenant-b").await);
    let err = b.get_file(&sid, "notes.txt").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(c.get_session(&sid).await.unwrap().unplaced);
    // The owner: moved, and answered by the new worker through the import.
    let file = match c.get_file(&sid, "notes.txt").await {
        Ok(file) => file,
        Err(e) => panic!("{e}\n{}\n--- nats\n{}", stack.logs(), stack.nats.log()),
    };
    assert_eq!(file, b"tenant-a's");
    let s = c.get_session(&sid).await.unwrap();
    assert_eq!(s.state, SessionState::Running);
    assert_ne!(s.worker_id.as_str(), victim);
    assert!(
        !stack.logs().contains("Permissions Violation"),
        "{}",
        stack.logs()
    );
}
