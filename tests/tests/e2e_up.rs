//! `hearth up` as a person runs it: the binary starts its own nats-server, scheduler and worker;
//! the Python example of docs/PROTOCOL.md runs against it unchanged; SIGTERM stops it cleanly.

use std::process::Command;
use std::time::{Duration, Instant};

use hearth_messages::HearthClient;
use hearth_testkit::{ChildProcess, workspace_bin, workspace_root};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Python with nats-py and msgpack: the project's venv (scripts/setup.sh), else none.
fn python() -> Option<std::path::PathBuf> {
    let venv = workspace_root().join(".tools/venv/bin/python");
    let ok = Command::new(&venv)
        .args(["-c", "import nats, msgpack"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(venv)
}

/// Runs `hearth up` (with `extra` flags) on `state` until its pool holds a VM and a session
/// exists, then stops it with SIGTERM.
async fn up_once(dir: &std::path::Path, state: &std::path::Path, extra: &[&str]) {
    let port = free_port();
    let mut cmd = Command::new(workspace_bin("hearth").unwrap());
    cmd.args(["up", "--nats-port", &port.to_string()])
        .args(["--metrics-listen", "off", "--pool", "1"])
        .arg("--data-dir")
        .arg(state)
        .args(extra)
        .env("RUST_LOG", "warn");
    let mut up = ChildProcess::spawn("hearth-up", cmd, dir).unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        if let Ok(nats) = async_nats::connect(&url).await {
            break HearthClient::new(nats);
        }
        assert!(up.is_running(), "hearth up exited:\n{}", up.log());
        assert!(Instant::now() < deadline, "no nats-server:\n{}", up.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        if let Ok(status) = client.pool_status().await
            && status.pools.iter().any(|p| p.ready >= 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool never filled:\n{}",
            up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .create_session(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("claim: {e}\n{}", up.log()));
    // The claim's VM is replaced in the pool before `hearth up` stops: a pool VM and a session.
    loop {
        if let Ok(status) = client.pool_status().await
            && status.pools.iter().any(|p| p.ready >= 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool never refilled:\n{}",
            up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = up.terminate(Duration::from_secs(30)).unwrap();
    assert!(
        status.success(),
        "hearth up exited with {status}:\n{}",
        up.log()
    );
}

/// VMs the process provider holds under a `hearth up` data dir.
async fn live_vms(state: &std::path::Path) -> usize {
    use hearth_worker::provider::{ProcessConfig, ProcessProvider, VmQuery, VmState};
    let provider = ProcessProvider::open(ProcessConfig::new(state.join("worker/process"))).unwrap();
    let vms = provider.list_vms().await.unwrap();
    vms.iter().filter(|v| v.state != VmState::Destroyed).count()
}

#[tokio::test]
async fn hearth_up_destroys_its_vms_on_exit_unless_keep_vms() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    up_once(dir.path(), &state, &["--keep-vms"]).await;
    let kept = live_vms(&state).await;
    assert!(
        kept >= 2,
        "--keep-vms: the pool VM and the session stay ({kept})"
    );
    up_once(dir.path(), &state, &[]).await;
    assert_eq!(
        live_vms(&state).await,
        0,
        "without --keep-vms nothing outlives hearth up"
    );
}

#[tokio::test]
async fn hearth_up_serves_the_python_example_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(workspace_bin("hearth").unwrap());
    cmd.args([
        "up",
        "--nats-port",
        &port.to_string(),
        "--metrics-listen",
        "off",
    ])
    .args(["--pool", "2"])
    .arg("--data-dir")
    .arg(dir.path().join("state"))
    .env("RUST_LOG", "info");
    let mut up = ChildProcess::spawn("hearth-up", cmd, dir.path()).unwrap();

    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        if let Ok(nats) = async_nats::connect(&url).await {
            break HearthClient::new(nats);
        }
        assert!(up.is_running(), "hearth up exited:\n{}", up.log());
        assert!(Instant::now() < deadline, "no nats-server:\n{}", up.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        if let Ok(status) = client.pool_status().await
            && status.pools.iter().any(|p| p.ready >= 2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool never filled:\n{}",
            up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    match python() {
        Some(python) => {
            let out = Command::new(python)
                .arg(workspace_root().join("docs/examples/hearth_example.py"))
                .args(["--url", &url])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "example failed:\n{stdout}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                up.log()
            );
            assert!(stdout.trim_end().ends_with("OK"), "{stdout}");
        }
        None => println!(
            "SKIP python example: no .tools/venv with nats-py and msgpack (run scripts/setup.sh)"
        ),
    }

    let status = up.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "hearth up exited with {status}");
}
