//! End to end on the `oci` provider and with container images: real nats-server, scheduler and
//! workers. The executor flow passes unchanged on workers run with `--provider oci`, and a
//! template whose `base` is an OCI image archive (busybox, built locally by the test) serves warm
//! claims on the `oci` provider and on the process provider, its sessions running on the image's
//! root filesystem; a session whose container dies is `lost`, its exec answered 409 with the
//! runtime's exit code; a session the scheduler stops when idle keeps what is in its memory
//! (frozen, then thawed by the next file transfer or exec), and one whose container is killed
//! while it is stopped is `lost` when it resumes. Skips, with the reason printed, without crun,
//! tini or busybox-static (`scripts/setup.sh` installs them).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{DEFAULT_TEMPLATE, Stack};
use hearth_messages::*;

/// Why the oci provider cannot run here, if it cannot.
fn oci_missing() -> Option<String> {
    for (bin, package) in [("/usr/bin/crun", "crun"), ("/usr/bin/tini-static", "tini")] {
        if !Path::new(bin).is_file() {
            return Some(format!(
                "{bin} is not installed (apt-get install {package})"
            ));
        }
    }
    None
}

#[tokio::test]
async fn executor_flow_on_oci_workers() {
    if let Some(reason) = oci_missing() {
        eprintln!("skipping: {reason}");
        return;
    }
    let stack =
        Stack::start_with_worker_args(&["w1"], DEFAULT_TEMPLATE, &["--provider", "oci"]).await;
    common::executor_flow(&stack, "w1").await;
}

/// The busybox image as an OCI archive (a tarred layout) under `dir`, or why not.
fn image_archive(dir: &Path) -> Result<PathBuf, String> {
    let layers = hearth_testkit::images::busybox_layers()?;
    let layout = dir.join("layout");
    hearth_worker::image::write_layout(
        &layout,
        &layers,
        &["PATH=/bin".into(), "IMAGE=busybox".into()],
    )
    .map_err(|e| e.to_string())?;
    let archive = dir.join("busybox.oci.tar");
    hearth_testkit::images::tar_dir(&layout, &archive).map_err(|e| e.to_string())?;
    Ok(archive)
}

async fn image_template_serves_warm_claims(worker_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let archive = match image_archive(dir.path()) {
        Ok(archive) => archive,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    // The template entry as `hearth templates build` prints it (and its unpack, checked).
    let out = std::process::Command::new(hearth_testkit::workspace_bin("hearth").unwrap())
        .args(["templates", "build", "--name", "busybox", "--image"])
        .arg(&archive)
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .args(["--bootstrap", "sh", "--bootstrap", "-c"])
        .args(["--bootstrap", "echo bootstrapped > .built"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unpacked at"),
        "{out:?}"
    );
    let entry = String::from_utf8(out.stdout).unwrap();
    assert!(
        entry.starts_with("[[templates]]\nname = \"busybox\"\n"),
        "{entry}"
    );
    let template = format!("{entry}min_ready = 2\nmax_ready = 2\n");
    let stack = Stack::start_with_worker_args(&["w1"], &template, worker_args).await;
    stack
        .wait_pool("busybox", Duration::from_secs(60), |p| p.ready >= 2)
        .await;
    let c = &stack.client;
    // Both ready VMs claimed (the sessions are left to the stack's teardown).
    for _ in 0..2 {
        let session = c
            .create_session(&CreateSessionRequest {
                template: Some(TemplateName::new("busybox").unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(session.warm, "{session:?}");
        let r = c
            .exec(
                &session.session_id,
                &ExecRequest::cmd("test -d /usr && echo host-usr; echo image=$IMAGE; cat .built"),
            )
            .await
            .unwrap();
        assert_eq!(
            r.stdout.as_bytes(),
            b"image=busybox\nbootstrapped\n",
            "{r:?}\n{}",
            stack.logs()
        );
    }
}

#[tokio::test]
async fn a_template_from_an_oci_archive_serves_warm_claims_on_oci() {
    if let Some(reason) = oci_missing() {
        eprintln!("skipping: {reason}");
        return;
    }
    image_template_serves_warm_claims(&["--provider", "oci"]).await;
}

#[tokio::test]
async fn a_template_from_an_oci_archive_serves_warm_claims_on_process() {
    if !Path::new("/usr/bin/bwrap").is_file() {
        eprintln!("skipping: bubblewrap is not installed");
        return;
    }
    image_template_serves_warm_claims(&[]).await;
}

#[tokio::test]
async fn a_session_whose_container_dies_is_lost_with_the_exit_code() {
    if let Some(reason) = oci_missing() {
        eprintln!("skipping: {reason}");
        return;
    }
    let stack =
        Stack::start_with_worker_args(&["w1"], DEFAULT_TEMPLATE, &["--provider", "oci"]).await;
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 1)
        .await;
    let c = &stack.client;
    let session = c
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap();
    let sid = session.session_id;
    // The command kills the container's agent (its init's only child): the container ends.
    let _ = c.exec(&sid, &ExecRequest::cmd("kill -9 $PPID")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let err = loop {
        match c.exec(&sid, &ExecRequest::cmd("true")).await {
            Err(err) => break err,
            Ok(r) => {
                assert!(std::time::Instant::now() < deadline, "still running: {r:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The worker answers from the VM's tombstone: 409 with how the container ended.
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err:?}");
    assert!(
        err.to_string()
            .contains("failed: the container exited with code 137"),
        "{err:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = c.get_session(&sid).await.unwrap().state;
        if state == SessionState::Lost {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session {state:?}, never lost\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until the session is in `state`.
async fn wait_state(stack: &Stack, sid: &SessionId, state: SessionState) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = stack.client.get_session(sid).await.unwrap().state;
        if now == state {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session {now:?}, never {state:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stack with one oci worker and a session on it whose idle timeout is 1 s, or `None` (the
/// reason printed) without crun or tini.
async fn idle_session_on_oci() -> Option<(Stack, SessionId)> {
    if let Some(reason) = oci_missing() {
        eprintln!("skipping: {reason}");
        return None;
    }
    let stack =
        Stack::start_with_worker_args(&["w1"], DEFAULT_TEMPLATE, &["--provider", "oci"]).await;
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 1)
        .await;
    let session = stack
        .client
        .create_session(&CreateSessionRequest {
            idle_timeout_s: Some(1),
            ..CreateSessionRequest::default()
        })
        .await
        .unwrap();
    Some((stack, session.session_id))
}

#[tokio::test]
async fn an_idle_stopped_oci_session_keeps_its_memory_when_it_resumes() {
    let Some((stack, sid)) = idle_session_on_oci().await else {
        return;
    };
    let c = &stack.client;
    // State that lives in the container's memory only: a file on its tmpfs /tmp, and the agent's
    // record (exit code, output ring) of a background process that has ended.
    let r = c
        .exec(&sid, &ExecRequest::cmd("echo in-memory > /tmp/note"))
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let started = c
        .start_process(
            &sid,
            &hearth_messages::processes::ProcessStartRequest {
                cmd: Some("echo from-the-process; exit 3".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ended = c
        .wait_process(&sid, &started.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ended.exit_code, Some(3), "{ended:?}");
    let kept = |c: &HearthClient, sid: &SessionId| {
        let (c, sid, process_id) = (c.clone(), sid.clone(), started.process_id.clone());
        async move {
            let r = c
                .exec(&sid, &ExecRequest::cmd("cat /tmp/note"))
                .await
                .unwrap();
            assert_eq!(r.stdout.as_bytes(), b"in-memory\n", "{r:?}");
            let out = c.process_output(&sid, &process_id, 0).await.unwrap();
            assert!(out.process.exited, "{out:?}");
            assert_eq!(out.process.exit_code, Some(3), "{out:?}");
            let text: Vec<u8> = out
                .chunks
                .iter()
                .flat_map(|c| c.data.as_bytes().to_vec())
                .collect();
            assert_eq!(text, b"from-the-process\n");
        }
    };
    // Idle: the scheduler stops it (its container frozen). A keepalive extends its lifetime
    // and leaves it stopped (PROTOCOL.md: only a paused session is resumed by one); a file
    // transfer resumes it.
    wait_state(&stack, &sid, SessionState::Stopped).await;
    let alive = c.keepalive(&sid, None).await.unwrap();
    assert_eq!(alive.state, SessionState::Stopped, "{alive:?}");
    assert_eq!(c.get_file(&sid, "../tmp/note").await.ok(), None, "confined");
    c.get_file(&sid, ".template-marker").await.unwrap();
    wait_state(&stack, &sid, SessionState::Running).await;
    kept(c, &sid).await;
    // Idle again: an exec resumes it.
    wait_state(&stack, &sid, SessionState::Stopped).await;
    kept(c, &sid).await;
    wait_state(&stack, &sid, SessionState::Running).await;
}

#[tokio::test]
async fn a_session_whose_container_is_killed_while_stopped_is_lost_on_resume() {
    let Some((stack, sid)) = idle_session_on_oci().await else {
        return;
    };
    let c = &stack.client;
    wait_state(&stack, &sid, SessionState::Stopped).await;
    // The session's container is the frozen one: its init sits in a freezer cgroup of Hearth's.
    let state_dir = stack.dir.path().join("w1/oci/runtime");
    let out = std::process::Command::new("/usr/bin/crun")
        .arg("--root")
        .arg(&state_dir)
        .args(["list", "--format", "json"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let frozen: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            let pid = c["pid"].as_i64().unwrap_or(0);
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|cg| cg.lines().any(|l| l.contains(":freezer:/hearth-pause-")))
        })
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(frozen.len(), 1, "{list}");
    // Killed from the host while frozen: the kill lands when the resume thaws it.
    let status = std::process::Command::new("/usr/bin/crun")
        .arg("--root")
        .arg(&state_dir)
        .args(["kill", &frozen[0], "KILL"])
        .status()
        .unwrap();
    assert!(status.success());
    let err = c.exec(&sid, &ExecRequest::cmd("true")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err:?}");
    assert!(
        err.to_string()
            .contains("failed: the container exited with code 137"),
        "{err:?}"
    );
    wait_state(&stack, &sid, SessionState::Lost).await;
}
