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
