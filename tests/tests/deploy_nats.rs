//! deploy/nats/ for real: nats-server runs the unmodified config files (ports, store directory and
//! routes overridden on the command line, as the files document).
//!
//! - Roles (permissions.conf): an executor can request sessions but cannot publish a worker job,
//!   fake a heartbeat or listen to other traffic; a worker cannot publish another worker's jobs,
//!   client-facing subjects or session events, nor read the scheduler's KV; and a real
//!   `hearth-worker` (in process, logged in as `worker-1` / `worker-2`) does all its work — jobs,
//!   snapshot upload and cross-worker restore through the object store, streamed exec, files,
//!   a background process followed to its end, heartbeats — without a single permission error, driven by a `scheduler` and an `executor`;
//!   so does the real scheduler (in process, as `scheduler`) serving a claim, exec and release.
//!   (In process because the binaries cannot log in yet: see permissions.conf.)
//! - Connections without credentials are refused.
//! - The 3-node cluster (cluster-{a,b,c}.conf) forms on loopback ports, holds an R3 KV bucket
//!   and keeps accepting writes after one node is killed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hearth_messages::transport::decode_reply;
use hearth_messages::{
    Encoding, ExecEvent, ExecRequest, HearthClient, JobOp, JobOutput, JobReply, JobRequest,
    SessionId, Subjects, VmInfo, VmSpec, WorkerStatus,
};
use hearth_testkit::{ChildProcess, NatsServer, nats_server_bin, workspace_root};
use hearth_worker::provider::{ProcessConfig, ProcessProvider, VmRuntime};
use hearth_worker::{Worker, WorkerConfig};
use tokio::sync::mpsc;

fn nats_conf(name: &str) -> PathBuf {
    workspace_root().join("deploy/nats").join(name)
}

/// The development password of `user` in deploy/nats/accounts.conf.
fn password(user: &str) -> String {
    hearth_natsd::accounts::password(user).unwrap()
}

/// nats-server with deploy/nats/single.conf (roles, JetStream, 8 MB payloads), on random ports.
fn secure_server() -> NatsServer {
    NatsServer::builder()
        .arg("-c")
        .arg(nats_conf("single.conf").display().to_string())
        .arg("-m")
        .arg("-1")
        .start()
        .expect("nats-server with deploy/nats/single.conf")
}

/// A client logged in as `user`, and the server errors (permission violations) it receives.
async fn connect_as(
    url: &str,
    user: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    let _ = tx.send(err.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting as {user}: {e}"));
    (client, rx)
}

/// Waits for a permissions violation mentioning `subject`.
async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, kind: &str, subject: &str) {
    let want = format!("permissions violation for {kind} to \"{subject}\"").to_lowercase();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut others = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(err)) if err.to_lowercase().contains(&want) => return,
            Ok(Some(other)) => others.push(other),
            _ => panic!("no server error {want:?} (got {others:?})"),
        }
    }
}

/// Asserts that no server error arrived (after a round trip to the server).
async fn expect_no_errors(
    client: &async_nats::Client,
    errors: &mut mpsc::UnboundedReceiver<String>,
) {
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Ok(err) = errors.try_recv() {
        panic!("unexpected server error: {err}");
    }
}

async fn nothing_arrives(sub: &mut async_nats::Subscriber) {
    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("{} must not have been delivered", msg.subject);
    }
}

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).unwrap()
}

#[tokio::test]
async fn executor_requests_sessions_but_cannot_publish_a_worker_job() {
    let server = secure_server();
    let url = server.url();

    // A scheduler answering sessions.create, and worker-1 listening for its jobs.
    let (scheduler, mut scheduler_errors) = connect_as(url, "scheduler").await;
    let mut creates = scheduler
        .subscribe("hearth.v1.sessions.create")
        .await
        .unwrap();
    let responder = scheduler.clone();
    tokio::spawn(async move {
        while let Some(msg) = creates.next().await {
            if let Some(reply) = msg.reply {
                responder.publish(reply, "created".into()).await.unwrap();
            }
        }
    });
    let (worker, mut worker_errors) = connect_as(url, "worker-1").await;
    let mut jobs = worker
        .subscribe("hearth.v1.workers.worker-1.jobs")
        .await
        .unwrap();
    expect_no_errors(&scheduler, &mut scheduler_errors).await;
    expect_no_errors(&worker, &mut worker_errors).await;

    let (executor, mut errors) = connect_as(url, "executor").await;
    // Allowed: a request to the scheduler, answered (through allow_responses).
    let reply = executor
        .request("hearth.v1.sessions.create", "{}".into())
        .await
        .expect("executor may request sessions.create");
    assert_eq!(reply.payload.as_ref(), b"created");
    // Allowed, just unserved here: the other client subjects.
    for subject in [
        "hearth.v1.templates.list",
        "hearth.v1.pools.status",
        "hearth.v1.sessions.s-1.exec",
    ] {
        let err = executor.request(subject, "{}".into()).await.unwrap_err();
        assert_eq!(
            err.kind(),
            async_nats::client::RequestErrorKind::NoResponders,
            "{subject}: {err}"
        );
    }
    expect_no_errors(&executor, &mut errors).await;

    // Denied: a lifecycle job. The server refuses the publish; worker-1 never sees it.
    executor
        .publish(
            "hearth.v1.workers.worker-1.jobs",
            "destroy everything".into(),
        )
        .await
        .unwrap();
    expect_violation(&mut errors, "publish", "hearth.v1.workers.worker-1.jobs").await;
    nothing_arrives(&mut jobs).await;
    // As a request it gets no reply either.
    let attempt = tokio::time::timeout(
        Duration::from_secs(1),
        executor.request("hearth.v1.workers.worker-1.jobs", "x".into()),
    )
    .await;
    assert!(!matches!(attempt, Ok(Ok(_))), "a job request got through");
    expect_violation(&mut errors, "publish", "hearth.v1.workers.worker-1.jobs").await;
    nothing_arrives(&mut jobs).await;

    // Denied: a fake heartbeat, and the JetStream API.
    let mut beats = scheduler
        .subscribe("hearth.v1.workers.*.status")
        .await
        .unwrap();
    scheduler.flush().await.unwrap();
    executor
        .publish("hearth.v1.workers.worker-1.status", "fake".into())
        .await
        .unwrap();
    expect_violation(&mut errors, "publish", "hearth.v1.workers.worker-1.status").await;
    nothing_arrives(&mut beats).await;
    executor
        .publish("$JS.API.STREAM.LIST", "".into())
        .await
        .unwrap();
    expect_violation(&mut errors, "publish", "$JS.API.STREAM.LIST").await;

    // Denied: listening to anyone else's traffic.
    let mut spy = executor.subscribe("hearth.v1.>").await.unwrap();
    expect_violation(&mut errors, "subscription", "hearth.v1.>").await;
    worker
        .publish("hearth.v1.workers.worker-1.status", "beat".into())
        .await
        .unwrap();
    worker.flush().await.unwrap();
    assert!(
        beats.next().await.is_some(),
        "the scheduler gets real heartbeats"
    );
    nothing_arrives(&mut spy).await;

    // Credentials are checked: a wrong password is refused.
    let refused = async_nats::ConnectOptions::with_user_and_password(
        "executor".into(),
        "not-the-password".into(),
    )
    .connect(url)
    .await;
    assert!(refused.is_err(), "a wrong password must be refused");
}

#[tokio::test]
async fn a_worker_is_confined_to_its_own_id() {
    let server = secure_server();
    let url = server.url();
    let (scheduler, mut scheduler_errors) = connect_as(url, "scheduler").await;
    let (w1, mut errors) = connect_as(url, "worker-1").await;
    let (w2, mut w2_errors) = connect_as(url, "worker-2").await;

    // The scheduler's KV bucket exists (the scheduler role may create it).
    let js = async_nats::jetstream::new(scheduler.clone());
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: Subjects::default().bucket(hearth_messages::Bucket::Sessions),
            ..Default::default()
        })
        .await
        .expect("scheduler creates its KV bucket");
    kv.put("s-1", "record".into()).await.unwrap();
    assert_eq!(kv.get("s-1").await.unwrap().unwrap().as_ref(), b"record");

    let mut w2_jobs = w2
        .subscribe("hearth.v1.workers.worker-2.jobs")
        .await
        .unwrap();
    let mut creates = scheduler
        .subscribe("hearth.v1.sessions.create")
        .await
        .unwrap();
    let mut status = scheduler
        .subscribe("hearth.v1.workers.*.status")
        .await
        .unwrap();
    let mut session_events = scheduler
        .subscribe("hearth.v1.events.sessions.>")
        .await
        .unwrap();
    expect_no_errors(&w2, &mut w2_errors).await;
    expect_no_errors(&scheduler, &mut scheduler_errors).await;

    for (subject, sub) in [
        ("hearth.v1.workers.worker-2.jobs", &mut w2_jobs),
        ("hearth.v1.sessions.create", &mut creates),
        ("hearth.v1.workers.worker-2.status", &mut status),
        ("hearth.v1.events.sessions.s-1", &mut session_events),
    ] {
        w1.publish(subject, "x".into()).await.unwrap();
        expect_violation(&mut errors, "publish", subject).await;
        nothing_arrives(sub).await;
    }
    // Another worker's jobs cannot be received either.
    let _steal = w1
        .subscribe("hearth.v1.workers.worker-2.jobs")
        .await
        .unwrap();
    expect_violation(
        &mut errors,
        "subscription",
        "hearth.v1.workers.worker-2.jobs",
    )
    .await;
    // The scheduler's state is out of reach.
    for subject in [
        "$JS.API.STREAM.INFO.KV_hearth_sessions",
        "$JS.API.STREAM.DELETE.KV_hearth_sessions",
        "$JS.API.DIRECT.GET.KV_hearth_sessions.$KV.hearth_sessions.s-1",
    ] {
        w1.publish(subject, "".into()).await.unwrap();
        expect_violation(&mut errors, "publish", subject).await;
    }
    w1.publish("$KV.hearth_sessions.s-1", "forged".into())
        .await
        .unwrap();
    expect_violation(&mut errors, "publish", "$KV.hearth_sessions.s-1").await;
    assert_eq!(kv.get("s-1").await.unwrap().unwrap().as_ref(), b"record");

    // Its own heartbeat goes through.
    w1.publish("hearth.v1.workers.worker-1.status", "beat".into())
        .await
        .unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(2), status.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(beat.subject.as_str(), "hearth.v1.workers.worker-1.status");
}

async fn start_worker(
    url: &str,
    name: &str,
    dir: &std::path::Path,
) -> (Worker, async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (nats, errors) = connect_as(url, name).await;
    let mut config = WorkerConfig::new(id(name), dir);
    config.heartbeat_interval = Duration::from_millis(200);
    config.drain_grace = Duration::from_secs(2);
    let provider: Arc<dyn VmRuntime> =
        Arc::new(ProcessProvider::open(ProcessConfig::new(dir.join("process"))).unwrap());
    let worker = Worker::start(config, nats.clone(), provider)
        .await
        .unwrap_or_else(|e| panic!("{name} starts under its role: {e}"));
    (worker, nats, errors)
}

/// Sends a job as the scheduler does; a session it makes belongs to tenant-a (whose `executor`
/// then uses it through the imports).
async fn job(nats: &async_nats::Client, worker: &str, n: &mut u32, op: JobOp) -> JobOutput {
    *n += 1;
    let session = matches!(
        op,
        JobOp::RenameVm { session: true, .. } | JobOp::CreateVmWithSpec { session: true, .. }
    );
    let request = JobRequest {
        job_id: id(&format!("job-{n}")),
        op,
        lease_revision: 0,
        tenant: session.then(|| id("tenant-a")),
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(30),
        nats.request(Subjects::default().worker_jobs(&id(worker)), payload.into()),
    )
    .await
    .expect("job reply in time")
    .expect("job request");
    decode_reply::<JobReply>(&msg)
        .unwrap_or_else(|e| panic!("job on {worker}: {e:?}"))
        .output
}

fn vm(out: JobOutput) -> VmInfo {
    match out {
        JobOutput::Vm { vm } => vm,
        other => panic!("expected a vm, got {other:?}"),
    }
}

#[tokio::test]
async fn real_workers_do_all_their_work_under_the_worker_role() {
    let server = secure_server();
    let url = server.url();
    let (scheduler, mut scheduler_errors) = connect_as(url, "scheduler").await;
    let mut beats = scheduler
        .subscribe("hearth.v1.workers.*.status")
        .await
        .unwrap();
    let mut vm_events = scheduler.subscribe("hearth.v1.events.vms.*").await.unwrap();

    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let (w1, w1_nats, mut w1_errors) = start_worker(url, "worker-1", dir1.path()).await;
    let (w2, w2_nats, mut w2_errors) = start_worker(url, "worker-2", dir2.path()).await;

    // Heartbeats from both arrive at the scheduler.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), beats.next())
            .await
            .expect("heartbeats")
            .unwrap();
        let status: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
        seen.insert(status.worker_id.to_string());
    }

    // A template VM on worker-1, snapshotted into the object store ...
    let mut n = 0;
    let spec = VmSpec {
        bootstrap: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo warm > boot.txt".into(),
        ]),
        ..Default::default()
    };
    vm(job(
        &scheduler,
        "worker-1",
        &mut n,
        JobOp::CreateVmWithSpec {
            vm_id: id("tmpl"),
            spec,
            session: false,
        },
    )
    .await);
    match job(
        &scheduler,
        "worker-1",
        &mut n,
        JobOp::SnapshotVm {
            vm_id: id("tmpl"),
            snapshot_id: id("snap-1"),
            publish: true,
        },
    )
    .await
    {
        JobOutput::Snapshot { snapshot } => assert!(snapshot.published),
        other => panic!("{other:?}"),
    }
    // ... restored on worker-2, which fetches it from the object store, then handed out.
    let spec = VmSpec {
        restore_from: Some(id("snap-1")),
        ..Default::default()
    };
    vm(job(
        &scheduler,
        "worker-2",
        &mut n,
        JobOp::CreateVmWithSpec {
            vm_id: id("pool-1"),
            spec,
            session: false,
        },
    )
    .await);
    let session = vm(job(
        &scheduler,
        "worker-2",
        &mut n,
        JobOp::RenameVm {
            vm_id: id("pool-1"),
            new_vm_id: id("sess-1"),
            session: true,
        },
    )
    .await);
    assert_eq!(session.vm_id.as_str(), "sess-1");
    assert!(
        vm_events.next().await.is_some(),
        "VM events reach the scheduler"
    );

    // The executor reaches the session's data plane on worker-2 directly.
    let (executor, mut executor_errors) = connect_as(url, "executor").await;
    let client = HearthClient::new(executor.clone());
    let sid: SessionId = id("sess-1");
    let result = client
        .exec(
            &sid,
            &ExecRequest {
                cmd: Some("cat boot.txt".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec under the executor role");
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout.into_vec(), b"warm\n");
    // Streamed output: many messages to the executor's inbox.
    let stream = client
        .exec_stream(
            &sid,
            &ExecRequest {
                cmd: Some("for i in 1 2 3; do echo $i; sleep 0.05; done".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut streamed = Vec::new();
    let mut done = false;
    while let Some(event) = stream.next().await {
        match event.expect("stream event") {
            ExecEvent::Stdout(bytes) => streamed.extend_from_slice(&bytes),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Done(result) => {
                streamed.extend_from_slice(&result.stdout.into_vec());
                done = true;
            }
        }
    }
    assert!(done);
    assert_eq!(streamed, b"1\n2\n3\n");
    client
        .put_file(&sid, "notes.txt", b"hello".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(client.get_file(&sid, "notes.txt").await.unwrap(), b"hello");
    // A background process: started, fed, followed to its end (the worker serves
    // `sessions.*.processes.>` and streams to the executor's inbox).
    let started = client
        .start_process(
            &sid,
            &hearth_messages::processes::ProcessStartRequest {
                cmd: Some("cat".into()),
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .expect("process start under the executor role");
    client
        .write_stdin(&sid, &started.process_id, b"bg\n".to_vec(), true)
        .await
        .unwrap();
    let follow = client
        .follow_process(&sid, &started.process_id, 0)
        .await
        .unwrap();
    let mut follow = std::pin::pin!(follow);
    let mut followed = Vec::new();
    while let Some(event) = follow.next().await {
        match event.expect("follow event") {
            hearth_messages::ProcessEvent::Output { data, .. } => followed.extend_from_slice(&data),
            hearth_messages::ProcessEvent::Exited(info) => assert_eq!(info.exit_code, Some(0)),
        }
    }
    assert_eq!(followed, b"bg\n");

    // Not one permission error on any side.
    expect_no_errors(&w1_nats, &mut w1_errors).await;
    expect_no_errors(&w2_nats, &mut w2_errors).await;
    expect_no_errors(&scheduler, &mut scheduler_errors).await;
    expect_no_errors(&executor, &mut executor_errors).await;
    w1.drain().await;
    w2.drain().await;
}

#[tokio::test]
async fn the_real_scheduler_serves_claims_under_the_scheduler_role() {
    let server = secure_server();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let (worker, worker_nats, mut worker_errors) = start_worker(url, "worker-1", dir.path()).await;

    // The scheduler in process (the binary cannot log in yet), configured from the compose
    // stack's deploy/hearth/scheduler.toml, logged in as `scheduler`.
    let toml =
        std::fs::read_to_string(workspace_root().join("deploy/hearth/scheduler.toml")).unwrap();
    let mut config = hearth_scheduler::config::from_toml(&toml).expect("scheduler.toml");
    config.reconcile_interval = Duration::from_millis(200);
    config.drain_grace = Duration::from_secs(2);
    let (scheduler_nats, mut scheduler_errors) = connect_as(url, "scheduler").await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(hearth_scheduler::run(
        config,
        scheduler_nats.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // An executor waits for the warm pool, claims, runs a command and releases.
    let (executor, mut executor_errors) = connect_as(url, "executor").await;
    let client = HearthClient::new(executor.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .pool_status()
            .await
            .map(|s| s.pools.iter().any(|p| p.ready > 0))
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline && !scheduler.is_finished(),
            "no warm VM within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!client.list_templates().await.unwrap().is_empty());
    let session = client
        .create_session(&hearth_messages::CreateSessionRequest::default())
        .await
        .expect("claim under the executor role");
    assert!(session.warm, "{session:?}");
    let result = client
        .exec(
            &session.session_id,
            &ExecRequest {
                cmd: Some("echo hi".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(result.stdout.into_vec(), b"hi\n");
    client.keepalive(&session.session_id, None).await.unwrap();
    client.release(&session.session_id).await.unwrap();

    expect_no_errors(&scheduler_nats, &mut scheduler_errors).await;
    expect_no_errors(&worker_nats, &mut worker_errors).await;
    expect_no_errors(&executor, &mut executor_errors).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), scheduler)
        .await
        .expect("scheduler drains")
        .unwrap()
        .expect("scheduler ran without error");
    worker.drain().await;
}

#[tokio::test]
async fn clients_without_credentials_are_refused() {
    // No anonymous access: the Hearth binaries log in with HEARTH_NATS_USER / _PASSWORD.
    let server = secure_server();
    let anonymous = async_nats::ConnectOptions::new()
        .connect(server.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous connection was accepted");
}

/// Free loopback ports (bound, then released for the servers to take).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

#[tokio::test]
async fn three_node_cluster_from_the_deploy_configs_replicates_kv_and_survives_a_node_loss() {
    let bin = nats_server_bin().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(6);
    let (client_ports, cluster_ports) = ports.split_at(3);
    let mut nodes: Vec<Option<ChildProcess>> = Vec::new();
    for (i, node) in ["a", "b", "c"].iter().enumerate() {
        let routes: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("nats-route://127.0.0.1:{}", cluster_ports[j]))
            .collect();
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("-c")
            .arg(nats_conf(&format!("cluster-{node}.conf")))
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &client_ports[i].to_string(),
                "-m",
                "-1",
            ])
            .arg("-sd")
            .arg(dir.path().join(node))
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster_ports[i]),
            ])
            .args(["--routes", &routes.join(",")]);
        nodes.push(Some(
            ChildProcess::spawn(&format!("nats-{node}"), cmd, dir.path()).unwrap(),
        ));
    }
    let logs = |nodes: &[Option<ChildProcess>]| -> String {
        nodes
            .iter()
            .flatten()
            .map(|n| n.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };

    // Connect to node a as the scheduler (its role has the JetStream rights).
    let url = format!("nats://127.0.0.1:{}", client_ports[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let scheduler = loop {
        match async_nats::ConnectOptions::with_user_and_password(
            "scheduler".into(),
            password("scheduler"),
        )
        .connect(url.as_str())
        .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connecting to node a: {e}\n{}", logs(&nodes)),
        }
    };
    // The cluster elects a JetStream meta leader; then an R3 bucket can be created. (Requests
    // sent before that get no answer: retry on a short timeout.)
    let mut js = async_nats::jetstream::new(scheduler.clone());
    js.set_timeout(Duration::from_secs(1));
    let bucket = Subjects::default().bucket(hearth_messages::Bucket::Sessions);
    let kv = loop {
        match js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: bucket.clone(),
                history: 1,
                num_replicas: 3,
                ..Default::default()
            })
            .await
        {
            Ok(kv) => break kv,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("creating an R3 bucket: {e}\n{}", logs(&nodes)),
        }
    };
    let mut stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.clone().expect("clustered stream");
    assert_eq!(cluster.name.as_deref(), Some("hearth"));
    assert_eq!(cluster.replicas.len(), 2, "{cluster:?}");
    kv.put("s-1", "one".into()).await.unwrap();

    // Kill a follower (neither node a, which we are connected to, nor the stream's leader):
    // the remaining two keep the quorum and writes go on without an election.
    let leader = cluster.leader.clone().unwrap_or_default();
    let victim = ["b", "c"]
        .into_iter()
        .position(|n| leader != format!("nats-{n}"))
        .unwrap()
        + 1;
    nodes[victim].take().unwrap().kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match kv.put("s-2", "two".into()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("write after losing a node: {e}\n{}", logs(&nodes)),
        }
    }
    assert_eq!(kv.get("s-1").await.unwrap().unwrap().as_ref(), b"one");
    assert_eq!(kv.get("s-2").await.unwrap().unwrap().as_ref(), b"two");
}

/// Issue 11: a worker spoofing another worker's id changes nothing. Under the deploy
/// permissions, worker-2's credentials cannot publish worker-1's heartbeat or VM-event subjects
/// nor receive its jobs, and what worker-2 may publish — its own subjects — naming worker-1 in the
/// body (an empty inventory, a destroyed VM) is dropped by the real scheduler: worker-1's session
/// stays running and serves execs.
#[tokio::test]
async fn a_worker_spoofing_another_workers_id_changes_nothing() {
    use hearth_messages::{
        CreateSessionRequest, Encoding, SessionState, VmEvent, VmState, WorkerStatus,
    };

    let server = secure_server();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let (worker, _worker_nats, _worker_errors) = start_worker(url, "worker-1", dir.path()).await;
    let toml =
        std::fs::read_to_string(workspace_root().join("deploy/hearth/scheduler.toml")).unwrap();
    let mut config = hearth_scheduler::config::from_toml(&toml).expect("scheduler.toml");
    config.reconcile_interval = Duration::from_millis(200);
    config.vm_missing_grace = Duration::from_millis(500);
    config.drain_grace = Duration::from_secs(2);
    let (scheduler_nats, _scheduler_errors) = connect_as(url, "scheduler").await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(hearth_scheduler::run(
        config,
        scheduler_nats.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let (executor, _executor_errors) = connect_as(url, "executor").await;
    let client = HearthClient::new(executor.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let session = loop {
        if let Ok(s) = client
            .create_session(&CreateSessionRequest {
                wait_ms: Some(1000),
                ..Default::default()
            })
            .await
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no session within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(session.worker_id.as_str(), "worker-1");
    let sid = session.session_id.clone();

    // The forgeries: worker-1 with an empty inventory, and worker-1's session VM destroyed.
    let status_of = |w: &str| {
        WorkerStatus {
            worker_id: id("worker-1"),
            seq: u64::MAX / 2,
            at_ms: 0,
            started_ms: 0,
            provider: "process".into(),
            max_vms: 64,
            used_vms: 0,
            draining: false,
            jobs_in_flight: 0,
            execs_in_flight: 0,
            vms: Vec::new(),
            inventory: None,
            versions: Default::default(),
            isolation: Default::default(),
        }
        .pipe_subject(w)
    };
    let destroyed = Encoding::MsgPack
        .encode(&VmEvent {
            worker_id: id("worker-1"),
            vm_id: sid.clone().into(),
            state: VmState::Destroyed,
            renamed_from: None,
            reason: Some(hearth_messages::TerminationReason::VmFailed),
            at_ms: 0,
        })
        .unwrap();

    let (w2, mut errors) = connect_as(url, "worker-2").await;
    // Worker-1's subjects are out of reach.
    let (subject, beat) = status_of("worker-1");
    w2.publish(subject.clone(), beat.into()).await.unwrap();
    expect_violation(&mut errors, "publish", &subject).await;
    let events_1 = "hearth.v1.events.vms.worker-1";
    w2.publish(events_1, destroyed.clone().into())
        .await
        .unwrap();
    expect_violation(&mut errors, "publish", events_1).await;
    let _steal = w2
        .subscribe("hearth.v1.workers.worker-1.jobs")
        .await
        .unwrap();
    expect_violation(
        &mut errors,
        "subscription",
        "hearth.v1.workers.worker-1.jobs",
    )
    .await;
    // Its own subjects with worker-1 in the body: delivered, and dropped by the scheduler.
    for _ in 0..10 {
        let (subject, beat) = status_of("worker-2");
        w2.publish(subject, beat.into()).await.unwrap();
        w2.publish("hearth.v1.events.vms.worker-2", destroyed.clone().into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expect_no_errors(&w2, &mut errors).await;

    // Past vm_missing_grace and several reconcile passes: nothing changed.
    let s = client.get_session(&sid).await.unwrap();
    assert_eq!(s.state, SessionState::Running, "{s:?}");
    assert_eq!(s.worker_id.as_str(), "worker-1");
    let r = client
        .exec(
            &sid,
            &ExecRequest {
                cmd: Some("echo still".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.into_vec(), b"still\n");

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), scheduler).await;
    worker.drain().await;
}

/// A heartbeat published on worker `w`'s status subject.
trait PipeSubject {
    fn pipe_subject(self, w: &str) -> (String, Vec<u8>);
}

impl PipeSubject for hearth_messages::WorkerStatus {
    fn pipe_subject(self, w: &str) -> (String, Vec<u8>) {
        (
            format!("hearth.v1.workers.{w}.status"),
            hearth_messages::Encoding::MsgPack.encode(&self).unwrap(),
        )
    }
}
