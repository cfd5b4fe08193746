//! Pause and fork end to end on real microVMs (QEMU, TCG here): the scheduler over a real
//! nats-server with a worker on the qemu provider. A session with a running program is paused to
//! disk and resumed by an exec with its files and memory; an expired session with
//! `ttl_action = "pause"` stays resumable; a fork x4 gives four sessions that see the source's
//! files and running program, differ in host name, machine id and random stream, and diverge.
//! Skips with a printed reason where QEMU or the guest image is missing. One test: every guest
//! boot costs seconds under TCG.

#[path = "../../worker/tests/qemu_support/mod.rs"]
mod qemu_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hearth_messages::{
    CreateSessionRequest, ExecRequest, ForkSessionRequest, HearthClient, SessionId, SessionState,
    TemplateName, WorkerId,
};
use hearth_scheduler::config::TtlAction;
use hearth_scheduler::{SchedulerConfig, TemplateConfig};
use hearth_testkit::NatsServer;
use hearth_worker::provider::{QemuProvider, VmRuntime};
use hearth_worker::{Worker, WorkerConfig};

async fn sh(client: &HearthClient, sid: &SessionId, cmd: &str) -> String {
    let out = client.exec(sid, &ExecRequest::cmd(cmd)).await.unwrap();
    assert_eq!(out.exit_code, 0, "{cmd}: {out:?}");
    out.stdout.to_string_lossy().trim().to_owned()
}

async fn wait_state(client: &HearthClient, sid: &SessionId, state: SessionState, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let now = client.get_session(sid).await.unwrap().state;
        if now == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {sid}: {now:?}, waiting for {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_ttl_pause_and_fork_on_real_vms() {
    let dir = tempfile::tempdir().unwrap();
    let Some(qemu) = qemu_support::config(dir.path().join("qemu")) else {
        return;
    };
    let server = NatsServer::start().unwrap();
    let mut wc = WorkerConfig::new(WorkerId::new("wq").unwrap(), dir.path().join("worker"));
    wc.nats_url = server.url().to_owned();
    wc.heartbeat_interval = Duration::from_millis(250);
    wc.max_vms = 10;
    let provider: Arc<dyn VmRuntime> = Arc::new(QemuProvider::open(qemu).unwrap());
    let _worker = Worker::start(wc, server.connect().await.unwrap(), provider)
        .await
        .unwrap();
    let mut template = TemplateConfig::new(TemplateName::new("default").unwrap(), 1);
    template.memory_mib = 256;
    template.ttl_action = TtlAction::Pause;
    let cfg = SchedulerConfig {
        nats_url: server.url().to_owned(),
        templates: vec![template],
        lifecycle_interval: Duration::from_millis(300),
        claim_wait: Duration::from_secs(60),
        ..SchedulerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(hearth_scheduler::run(
        cfg,
        server.connect().await.unwrap(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = HearthClient::new(server.connect().await.unwrap());
    // The template is built (a cold boot) and one VM restored into the pool.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while !client
        .pool_status()
        .await
        .is_ok_and(|s| s.pools.iter().any(|p| p.ready >= 1))
    {
        assert!(tokio::time::Instant::now() < deadline, "no warm pool");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sid = SessionId::new("source").unwrap();
    let create = CreateSessionRequest {
        session_id: Some(sid.clone()),
        wait_ms: Some(120_000),
        ttl_s: Some(3600),
        ..Default::default()
    };
    client.create_session(&create).await.unwrap();

    // A program holding a value in memory, and a file.
    let pid = sh(
        &client,
        &sid,
        "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done' \
         >/dev/null 2>&1 & pid=$!; while [ ! -s /tmp/counter ]; do sleep 0.05; done; echo $pid",
    )
    .await;
    client
        .put_file(&sid, "work/notes.txt", b"from the source".to_vec(), None)
        .await
        .unwrap();

    // Pause to disk, then an exec resumes it where it was.
    let paused = client.pause(&sid).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    assert!(paused.paused_ms.is_some());
    let out = sh(
        &client,
        &sid,
        &format!("kill -0 {pid} && echo alive; cat work/notes.txt"),
    )
    .await;
    assert_eq!(out, "alive\nfrom the source");
    wait_state(
        &client,
        &sid,
        SessionState::Running,
        Duration::from_secs(10),
    )
    .await;
    assert!(client.get_session(&sid).await.unwrap().resumed_ms.is_some());

    // Fork x4: the copies see the files and the running program, each with its own identity.
    let ids: Vec<SessionId> = (1..=4)
        .map(|i| SessionId::new(format!("branch-{i}")).unwrap())
        .collect();
    let reply = client
        .fork(
            &sid,
            &ForkSessionRequest {
                count: 4,
                session_ids: Some(ids.clone()),
                ttl_s: Some(600),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(reply.failed.is_empty(), "{:?}", reply.failed);
    assert_eq!(reply.sessions.len(), 4);
    let probe = format!(
        "kill -0 {pid} && echo alive; cat work/notes.txt; echo; hostname; cat /etc/machine-id; \
         head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
    );
    let mut machine_ids = BTreeSet::new();
    let mut randoms = BTreeSet::new();
    for id in &ids {
        let out = sh(&client, id, &probe).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(
            lines[..3],
            ["alive", "from the source", id.as_str()],
            "{out}"
        );
        machine_ids.insert(lines[3].to_owned());
        randoms.insert(lines[4].to_owned());
    }
    machine_ids.insert(sh(&client, &sid, "cat /etc/machine-id").await);
    assert_eq!(machine_ids.len(), 5, "every copy has its own machine id");
    assert_eq!(randoms.len(), 4, "every copy has its own random stream");
    // They diverge: what one writes, the others (and the source) do not see.
    for id in &ids {
        sh(&client, id, &format!("echo {id} > work/mine.txt")).await;
    }
    for id in &ids {
        assert_eq!(sh(&client, id, "cat work/mine.txt").await, id.as_str());
    }
    assert_eq!(
        sh(&client, &sid, "test -e work/mine.txt || echo absent").await,
        "absent"
    );

    // ttl_action = "pause": past its TTL the session is paused, not released, and an exec brings
    // it back with its files.
    let short = SessionId::new("short").unwrap();
    client
        .create_session(&CreateSessionRequest {
            session_id: Some(short.clone()),
            wait_ms: Some(120_000),
            ttl_s: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    sh(&client, &short, "echo kept > f").await;
    wait_state(
        &client,
        &short,
        SessionState::Paused,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        client.get_session(&short).await.unwrap().state,
        SessionState::Paused
    );
    assert_eq!(sh(&client, &short, "cat f").await, "kept");
    wait_state(
        &client,
        &short,
        SessionState::Running,
        Duration::from_secs(10),
    )
    .await;

    for id in ids.iter().chain([&sid, &short]) {
        client.release(id).await.unwrap();
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), scheduler).await;
}
