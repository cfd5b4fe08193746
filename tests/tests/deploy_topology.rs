//! The docker-compose cluster topology as local processes: the 3-node NATS cluster from
//! deploy/nats/cluster-*.conf on loopback ports, a `hearth-scheduler` binary keeping its state in
//! R3 KV buckets, two `hearth-worker` binaries sharing an R3 object store, each process on a
//! different node, and an executor logged in as `executor`. It runs claim → exec → files → release
//! rounds and kills one NATS node (the one a worker is connected to) in the middle: every round
//! completes — the executor retries what the client marks retryable, with the same session id so a
//! retried claim is the same claim — and no session is left behind.

use std::time::{Duration, Instant};

use hearth_messages::{
    ClientError, CreateSessionRequest, ExecRequest, HearthClient, SessionId, SessionState,
};
use hearth_testkit::{ChildProcess, nats_server_bin, workspace_bin, workspace_root};

/// The development password of `user` in deploy/nats/accounts.conf.
fn password(user: &str) -> String {
    hearth_natsd::accounts::password(user).unwrap()
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Retries `op` while the error is retryable, for up to 60 s; counts the retries.
async fn retrying<T, F, Fut>(what: &str, retries: &mut u32, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                eprintln!("{what}: retrying after {e}");
                *retries += 1;
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(200))).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_exec_release_across_a_nats_cluster_survive_losing_a_node() {
    let scheduler_bin = match workspace_bin("hearth-scheduler") {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("SKIPPED: {why:#}");
            return;
        }
    };
    let worker_bin = workspace_bin("hearth-worker").expect("hearth-worker binary");
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(6);
    let (client_ports, cluster_ports) = ports.split_at(3);
    let url = |i: usize| format!("nats://127.0.0.1:{}", client_ports[i]);

    // The cluster, from the deploy files with loopback ports and routes on the command line.
    let bin = nats_server_bin().unwrap();
    let mut nodes: Vec<Option<ChildProcess>> = Vec::new();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        let routes: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("nats-route://127.0.0.1:{}", cluster_ports[j]))
            .collect();
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("-c")
            .arg(workspace_root().join(format!("deploy/nats/cluster-{node}.conf")))
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &client_ports[i].to_string(),
                "-m",
                "-1",
            ])
            .arg("-sd")
            .arg(dir.path().join(format!("js-{node}")))
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster_ports[i]),
            ])
            .args(["--routes", &routes.join(",")]);
        nodes.push(Some(
            ChildProcess::spawn(&format!("nats-{node}"), cmd, dir.path()).unwrap(),
        ));
    }

    // Wait for a JetStream meta leader (an R3 probe stream can be created), so the binaries find
    // a working cluster.
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = loop {
        if let Ok(c) = async_nats::ConnectOptions::with_user_and_password(
            "scheduler".into(),
            password("scheduler"),
        )
        .connect(url(0))
        .await
        {
            break c;
        }
        assert!(Instant::now() < deadline, "node a does not accept clients");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut js = async_nats::jetstream::new(probe);
    js.set_timeout(Duration::from_secs(1));
    loop {
        let created = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "hearth_probe".into(),
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        if created.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no JetStream meta leader: {created:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = js.delete_key_value("hearth_probe").await;

    // Hearth: scheduler on node a, worker-1 on node b, worker-2 on node c, each logged in as its
    // own role (deploy/nats/permissions.conf).
    let mut scheduler_cmd = std::process::Command::new(&scheduler_bin);
    scheduler_cmd
        .arg("--config")
        .arg(workspace_root().join("deploy/hearth/scheduler.toml"))
        .args(["--nats-url", &url(0), "--kv-replicas", "3"])
        .args(["--metrics-listen", "off", "--reconcile-interval-ms", "200"])
        .env("HEARTH_NATS_USER", "scheduler")
        .env("HEARTH_NATS_PASSWORD", password("scheduler"))
        .env("RUST_LOG", "warn");
    let mut scheduler = ChildProcess::spawn("scheduler", scheduler_cmd, dir.path()).unwrap();
    let mut workers = Vec::new();
    for (i, worker_id) in [(1, "worker-1"), (2, "worker-2")] {
        let mut cmd = std::process::Command::new(&worker_bin);
        cmd.args(["--nats-url", &url(i), "--worker-id", worker_id])
            .args(["--store-replicas", "3", "--heartbeat-ms", "200"])
            .args(["--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(dir.path().join(worker_id))
            .env("HEARTH_NATS_USER", worker_id)
            .env("HEARTH_NATS_PASSWORD", password(worker_id))
            .env("RUST_LOG", "warn");
        workers.push(ChildProcess::spawn(worker_id, cmd, dir.path()).unwrap());
    }

    // The executor, on node a.
    let executor =
        async_nats::ConnectOptions::with_user_and_password("executor".into(), password("executor"))
            .connect(url(0))
            .await
            .unwrap();
    let client = HearthClient::new(executor).with_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = client
            .pool_status()
            .await
            .map(|s| s.pools.iter().map(|p| p.ready).sum::<u32>() >= 2)
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline && scheduler.is_running(),
            "no warm pool within 90 s:\n{}\n{}\n{}",
            scheduler.log(),
            workers[0].log(),
            workers[1].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let rounds = 6;
    let mut retries = 0;
    let mut workers_used = std::collections::BTreeSet::new();
    for round in 0..rounds {
        if round == rounds / 2 {
            // Mid-flow: node b goes away; worker-1 fails over to another node.
            nodes[1].take().unwrap().kill();
        }
        let sid: SessionId = SessionId::new(format!("flow-{round}")).unwrap();
        let request = CreateSessionRequest {
            session_id: Some(sid.clone()),
            wait_ms: Some(20_000),
            ..Default::default()
        };
        let session = retrying("claim", &mut retries, || client.create_session(&request)).await;
        assert_eq!(session.session_id, sid);
        workers_used.insert(session.worker_id.to_string());
        let exec = ExecRequest {
            cmd: Some(format!("echo round {round}")),
            ..Default::default()
        };
        let result = retrying("exec", &mut retries, || client.exec(&sid, &exec)).await;
        assert_eq!(
            String::from_utf8_lossy(&result.stdout.into_vec()),
            format!("round {round}\n")
        );
        retrying("put", &mut retries, || {
            client.put_file(&sid, "r.txt", round.to_string().into_bytes(), None)
        })
        .await;
        let data = retrying("get", &mut retries, || client.get_file(&sid, "r.txt")).await;
        assert_eq!(data, round.to_string().into_bytes());
        let released = retrying("release", &mut retries, || client.release(&sid)).await;
        assert_eq!(released.state, SessionState::Released);
    }
    eprintln!("{rounds} rounds on workers {workers_used:?} with {retries} retries");

    // Every session ended; none is left running.
    for round in 0..rounds {
        let sid = SessionId::new(format!("flow-{round}")).unwrap();
        let session = retrying("get", &mut retries, || client.get_session(&sid)).await;
        assert_eq!(session.state, SessionState::Released, "{session:?}");
    }
    assert!(scheduler.is_running(), "{}", scheduler.log());
    for worker in &mut workers {
        assert!(worker.is_running(), "{}", worker.log());
    }
}
