//! The scheduler over a real `nats-server` (hearth-testkit) with real workers (the worker library
//! with the fake provider): the micro service on every client subject, bad input, `$SRV`
//! discovery, the KV store, the leader lease and recovery after a crash.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use hearth_messages::codec::{CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE};
use hearth_messages::error::SERVICE_ERROR_CODE_HEADER;
use hearth_messages::{
    CreateSessionRequest, Encoding, ErrorCode, ExecRequest, HearthClient, SessionId, SessionState,
    Subjects, TemplateName, WorkerId,
};
use hearth_scheduler::store::{Kv, NatsKv, StoreError, Table};
use hearth_scheduler::{RunError, SchedulerConfig, TemplateConfig};
use hearth_testkit::NatsServer;
use hearth_worker::provider::FakeProvider;
use hearth_worker::{ProviderKind, Worker, WorkerConfig};
use tokio::task::JoinHandle;

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn tname(s: &str) -> TemplateName {
    TemplateName::new(s).unwrap()
}

fn scheduler_config(server: &NatsServer, id: &str) -> SchedulerConfig {
    SchedulerConfig {
        nats_url: server.url().to_owned(),
        scheduler_id: id.to_owned(),
        heartbeat_timeout: Duration::from_millis(1500),
        lease_ttl: Duration::from_millis(1500),
        reconcile_interval: Duration::from_secs(1),
        claim_wait: Duration::from_secs(5),
        drain_grace: Duration::from_secs(2),
        templates: vec![TemplateConfig::new(tname("default"), 2)],
        ..SchedulerConfig::default()
    }
}

async fn start_worker(server: &NatsServer, id: &str, dir: &std::path::Path) -> Worker {
    let mut wc = WorkerConfig::new(WorkerId::new(id).unwrap(), dir.join(id));
    wc.nats_url = server.url().to_owned();
    wc.provider = ProviderKind::Fake;
    wc.heartbeat_interval = Duration::from_millis(250);
    wc.max_vms = 16;
    wc.drain_grace = Duration::from_millis(200);
    let client = server.connect().await.unwrap();
    Worker::start(wc, client, Arc::new(FakeProvider::new()))
        .await
        .unwrap()
}

/// A scheduler running `hearth_scheduler::run` on its own connection.
struct Running {
    handle: JoinHandle<Result<(), RunError>>,
    stop: tokio::sync::oneshot::Sender<()>,
    client: async_nats::Client,
}

impl Running {
    async fn start(server: &NatsServer, cfg: SchedulerConfig) -> Self {
        let client = server.connect().await.unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(hearth_scheduler::run(cfg, client.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            handle,
            stop,
            client,
        }
    }

    /// SIGTERM: drain and release the lease.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("scheduler stops within its drain grace")
            .unwrap()
            .unwrap();
    }

    /// SIGKILL: the process vanishes (its connection closes, its lease stays until it expires).
    async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
        let _ = self.client.drain().await;
    }
}

/// Every `$SRV.PING.hearth-scheduler` answer within a short window.
async fn ping_all(client: &async_nats::Client) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.PING.hearth-scheduler", inbox, "".into())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        if msg.payload.is_empty() {
            continue; // a no-responders status
        }
        out.push(serde_json::from_slice(&msg.payload).unwrap());
    }
    out
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_pool(client: &HearthClient, template: &str, n: u32) {
    wait_until(
        &format!("{n} ready in {template}"),
        Duration::from_secs(20),
        || async {
            client.pool_status().await.is_ok_and(|s| {
                s.pools
                    .iter()
                    .any(|p| p.template.as_str() == template && p.ready == n)
            })
        },
    )
    .await;
}

fn create(id: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        session_id: Some(sid(id)),
        ..Default::default()
    }
}

async fn raw(
    client: &async_nats::Client,
    subject: String,
    headers: HeaderMap,
    payload: &'static [u8],
) -> async_nats::Message {
    client
        .request_with_headers(subject, headers, payload.into())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_service_answers_every_client_subject() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let sched = Running::start(&server, scheduler_config(&server, "s1")).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));
    wait_pool(&client, "default", 2).await;

    // Discovery.
    let pings = ping_all(&nats).await;
    assert_eq!(pings.len(), 1);
    assert_eq!(pings[0]["name"], "hearth-scheduler");
    assert_eq!(pings[0]["metadata"]["scheduler_id"], "s1");
    let info: serde_json::Value = serde_json::from_slice(
        &nats
            .request("$SRV.INFO.hearth-scheduler", "".into())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(info["name"], "hearth-scheduler");
    let subjects: Vec<String> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    for s in [
        "hearth.v1.sessions.create",
        "hearth.v1.sessions.list",
        "hearth.v1.sessions.*.get",
        "hearth.v1.sessions.*.keepalive",
        "hearth.v1.sessions.*.release",
        "hearth.v1.sessions.*.snapshot",
        "hearth.v1.templates.list",
        "hearth.v1.pools.status",
    ] {
        assert!(subjects.iter().any(|x| x == s), "{s} not in {subjects:?}");
    }
    let stats = nats
        .request("$SRV.STATS.hearth-scheduler", "".into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&stats.payload).contains("stats_response"));

    // The executor flow.
    let s = client.create_session(&create("e1")).await.unwrap();
    assert!(s.warm);
    assert_eq!(s.worker_id.as_str(), "w1");
    assert_eq!(client.get_session(&sid("e1")).await.unwrap(), s);
    let out = client
        .exec(&sid("e1"), &ExecRequest::argv(["echo", "hello"]))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout.to_string_lossy().trim(), "hello");
    let listed = client.list_sessions(&Default::default()).await.unwrap();
    assert_eq!(listed.len(), 1);
    let k = client.keepalive(&sid("e1"), Some(7200)).await.unwrap();
    assert!(k.expires_ms > s.expires_ms);
    let t = client
        .snapshot_session(&sid("e1"), tname("mine"), Some(1))
        .await
        .unwrap();
    assert_eq!(t.name.as_str(), "mine");
    assert!(t.snapshot_id.is_some());
    let names: Vec<String> = client
        .list_templates()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(names, ["default", "mine"]);
    wait_pool(&client, "mine", 1).await;
    let mut from_snap = create("e2");
    from_snap.template = Some(tname("mine"));
    assert!(client.create_session(&from_snap).await.unwrap().warm);
    let released = client.release(&sid("e1")).await.unwrap();
    assert_eq!(released.state, SessionState::Released);
    assert_eq!(client.release(&sid("e1")).await.unwrap(), released);
    assert_eq!(
        client.get_session(&sid("e1")).await.unwrap().state,
        SessionState::Released
    );

    // Errors carry their code in the headers and {code, message} in the body.
    let e = client.get_session(&sid("ghost")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let mut bad_template = create("e3");
    bad_template.template = Some(tname("nope"));
    let e = client.create_session(&bad_template).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let mut conflict = create("e2");
    conflict.template = Some(tname("default"));
    let e = client.create_session(&conflict).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict));
    let e = client
        .snapshot_session(&sid("e2"), tname("mine"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict));

    let subjects = Subjects::default();
    let garbage: &[(String, &[u8])] = &[
        (subjects.sessions_create(), b"\xc1\xff"),
        (subjects.sessions_list(), b"\x92\x01"),
        ("hearth.v1.sessions.e2.keepalive".into(), b"\xc1"),
        ("hearth.v1.sessions.e2.snapshot".into(), b"\x80"),
        ("hearth.v1.sessions.bad%id.get".into(), b""),
        (subjects.templates_list(), b"\xff"),
        (subjects.pools_status(), b"\xff"),
    ];
    for (subject, payload) in garbage {
        let msg = nats
            .request_with_headers(subject.clone(), HeaderMap::new(), payload.to_vec().into())
            .await
            .unwrap();
        let code = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVICE_ERROR_CODE_HEADER))
            .map(|v| v.as_str().to_owned());
        assert_eq!(code.as_deref(), Some("400"), "{subject}");
        let body: hearth_messages::WireError = Encoding::MsgPack.decode(&msg.payload).unwrap();
        assert_eq!(body.code, ErrorCode::BadRequest, "{subject}");
    }

    // JSON in, JSON out (for `nats req` by hand).
    let mut json = HeaderMap::new();
    json.insert(CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE);
    let msg = raw(&nats, subjects.pools_status(), json.clone(), b"{}").await;
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert!(v["pools"].as_array().unwrap().len() == 2, "{v}");
    let msg = raw(&nats, "hearth.v1.sessions.ghost.get".into(), json, b"{}").await;
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["code"], 404);

    sched.stop().await;
}

#[tokio::test]
async fn kv_store_round_trip() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let kv = NatsKv::open(&js, &Subjects::default(), 1).await.unwrap();
    let r1 = kv
        .create(Table::Sessions, "a", b"1".to_vec())
        .await
        .unwrap();
    assert!(matches!(
        kv.create(Table::Sessions, "a", b"x".to_vec()).await,
        Err(StoreError::Conflict { .. })
    ));
    let r2 = kv
        .update(Table::Sessions, "a", b"2".to_vec(), r1)
        .await
        .unwrap();
    assert!(matches!(
        kv.update(Table::Sessions, "a", b"3".to_vec(), r1).await,
        Err(StoreError::Conflict { .. })
    ));
    kv.put(Table::Pool, "p", b"p".to_vec()).await.unwrap();
    kv.put(Table::Templates, "t", b"t".to_vec()).await.unwrap();
    let loaded = kv.load(Table::Sessions).await.unwrap();
    assert_eq!(loaded, vec![("a".to_owned(), b"2".to_vec(), r2)]);
    kv.delete(Table::Sessions, "a").await.unwrap();
    assert!(kv.load(Table::Sessions).await.unwrap().is_empty());
    // A deleted key can be created again (create-if-absent sees through the marker).
    kv.create(Table::Sessions, "a", b"again".to_vec())
        .await
        .unwrap();
    assert_eq!(kv.load(Table::Pool).await.unwrap().len(), 1);
    assert_eq!(kv.load(Table::Templates).await.unwrap().len(), 1);
    // Buckets are named by the contract.
    for n in ["hearth_sessions", "hearth_pool", "hearth_templates"] {
        assert!(js.get_key_value(n).await.is_ok(), "{n}");
    }
    // Opening again keeps the data; the leader bucket follows the configured lease length.
    let again = NatsKv::open(&js, &Subjects::default(), 1).await.unwrap();
    assert_eq!(again.load(Table::Pool).await.unwrap().len(), 1);
    let subjects = Subjects::default();
    for ttl in [Duration::from_secs(3), Duration::from_secs(7)] {
        hearth_scheduler::lease::open_leader_bucket(&js, &subjects, 1, ttl)
            .await
            .unwrap();
        let stream = js.get_stream("KV_hearth_leader").await.unwrap();
        assert_eq!(stream.cached_info().config.max_age, ttl);
    }
}

#[tokio::test]
async fn the_lease_keeps_one_leader_and_a_standby_takes_over() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));

    let a = Running::start(&server, scheduler_config(&server, "a")).await;
    wait_pool(&client, "default", 2).await;
    let b = Running::start(&server, scheduler_config(&server, "b")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Only the leader serves.
    let pings = ping_all(&nats).await;
    assert_eq!(pings.len(), 1, "{pings:?}");
    assert_eq!(pings[0]["metadata"]["scheduler_id"], "a");
    let s = client.create_session(&create("keep")).await.unwrap();

    // The leader dies without a word: the standby takes over once the lease lapses.
    a.crash().await;
    wait_until("b leads", Duration::from_secs(15), || async {
        ping_all(&nats)
            .await
            .iter()
            .any(|p| p["metadata"]["scheduler_id"] == "b")
    })
    .await;
    assert_eq!(ping_all(&nats).await.len(), 1);
    assert_eq!(client.get_session(&sid("keep")).await.unwrap(), s);
    let s2 = client.create_session(&create("after")).await.unwrap();
    assert_eq!(s2.state, SessionState::Running);

    // A graceful stop hands the lease back at once.
    b.stop().await;
    let js = async_nats::jetstream::new(nats.clone());
    let leader = js.get_key_value("hearth_leader").await.unwrap();
    assert!(leader.get("leader").await.unwrap().is_none());
    let c = Running::start(&server, scheduler_config(&server, "c")).await;
    wait_until("c leads", Duration::from_secs(5), || async {
        ping_all(&nats)
            .await
            .iter()
            .any(|p| p["metadata"]["scheduler_id"] == "c")
    })
    .await;
    c.stop().await;
}

#[tokio::test]
async fn a_killed_scheduler_restarts_with_every_session() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let _w2 = start_worker(&server, "w2", dir.path()).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));
    let first = Running::start(&server, scheduler_config(&server, "one")).await;
    wait_pool(&client, "default", 2).await;
    let mut sessions = Vec::new();
    for i in 0..5 {
        sessions.push(
            client
                .create_session(&create(&format!("k{i}")))
                .await
                .unwrap(),
        );
    }
    wait_pool(&client, "default", 2).await;
    first.crash().await;

    let second = Running::start(&server, scheduler_config(&server, "two")).await;
    for s in &sessions {
        let got = async {
            loop {
                match client.get_session(&s.session_id).await {
                    Ok(got) => return got,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        let got = tokio::time::timeout(Duration::from_secs(15), got)
            .await
            .unwrap();
        assert_eq!(&got, s);
        // The VM is still there and still serves.
        let out = client
            .exec(&s.session_id, &ExecRequest::argv(["true"]))
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0);
    }
    // Pool entries were reloaded, not doubled; nothing owned was destroyed as leaked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = client.pool_status().await.unwrap();
    assert_eq!(status.pools[0].ready, 2);
    assert_eq!(status.pools[0].claimed, 5);
    for s in &sessions {
        assert_eq!(
            client.get_session(&s.session_id).await.unwrap().state,
            SessionState::Running
        );
    }
    assert_eq!(
        client.release(&sessions[0].session_id).await.unwrap().state,
        SessionState::Released
    );
    second.stop().await;
}

#[test]
fn the_binary_exits_64_with_one_line_on_bad_config() {
    let bin = env!("CARGO_BIN_EXE_hearth-scheduler");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[templates]]\nname = \"x\"\nmin_ready = 3\nmax_ready = 1\n",
    )
    .unwrap();
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![("HEARTH_SCHEDULER_CONFIG", "/nonexistent/hearth.toml".into())],
        vec![("HEARTH_SCHEDULER_CONFIG", bad.display().to_string())],
        vec![("HEARTH_PREFIX", "a..b".into())],
        vec![("HEARTH_METRICS_LISTEN", "nowhere".into())],
    ];
    for env in cases {
        let out = std::process::Command::new(bin)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{env:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{env:?}: {stderr}");
        assert!(stderr.starts_with("hearth-scheduler: "), "{stderr}");
    }
}

#[tokio::test]
async fn the_binary_serves_and_drains_on_sigterm() {
    let server = NatsServer::start().unwrap();
    let bin = env!("CARGO_BIN_EXE_hearth-scheduler");
    let mut child = tokio::process::Command::new(bin)
        .env("HEARTH_NATS_URL", server.url())
        .env("HEARTH_SCHEDULER_ID", "bin")
        .env("HEARTH_METRICS_LISTEN", "off")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let nats = server.connect().await.unwrap();
    wait_until("the binary serves", Duration::from_secs(15), || async {
        ping_all(&nats).await.len() == 1
    })
    .await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after draining")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(ping_all(&nats).await.is_empty());
}

#[tokio::test]
async fn a_scheduler_takes_its_own_lease_back_and_each_term_fences_the_last() {
    use hearth_scheduler::lease::{Lease, LeaseHolder, open_leader_bucket};
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let js = async_nats::jetstream::new(nats.clone());
    let ttl = Duration::from_secs(30);
    let kv = open_leader_bucket(&js, &Subjects::default(), 1, ttl)
        .await
        .unwrap();
    let never = tokio_util::sync::CancellationToken::new();
    let a = LeaseHolder::new("a");
    let first = Lease::acquire(kv.clone(), &a, ttl, &never).await.unwrap();
    let t1 = first.term();
    // The term ends without a release (renewals failed across a NATS outage, say): the key still
    // names this process, long before it would expire. The same process takes it back at once,
    // as a new, higher term.
    drop(first);
    let again = tokio::time::timeout(
        Duration::from_secs(2),
        Lease::acquire(kv.clone(), &a, ttl, &never),
    )
    .await
    .expect("own lease recognised at once")
    .unwrap();
    assert!(again.term() > t1, "{} > {t1}", again.term());
    // Another process with the same scheduler id is another holder: it stands by.
    let stop = tokio_util::sync::CancellationToken::new();
    let other = LeaseHolder::new("a");
    let standby = {
        let (kv, stop) = (kv.clone(), stop.clone());
        tokio::spawn(async move { Lease::acquire(kv, &other, ttl, &stop).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !standby.is_finished(),
        "a second holder acquired a held lease"
    );
    stop.cancel();
    assert!(standby.await.unwrap().is_none());
    again.release().await;
}

#[tokio::test]
async fn heartbeats_and_vm_events_spoofing_another_worker_change_nothing() {
    use hearth_messages::{VmEvent, VmState, WorkerStatus};
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let _w2 = start_worker(&server, "w2", dir.path()).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));
    let sched = Running::start(&server, scheduler_config(&server, "a")).await;
    wait_pool(&client, "default", 2).await;
    let s = client.create_session(&create("victim")).await.unwrap();
    let victim = s.worker_id.clone();
    let other = WorkerId::new(if victim.as_str() == "w1" { "w2" } else { "w1" }).unwrap();
    let subjects = Subjects::default();

    // The other worker's credentials may publish on its own subjects only; with them it claims
    // the victim's VM was destroyed and the victim worker is empty and draining.
    let event = VmEvent {
        worker_id: victim.clone(),
        vm_id: "victim".parse().unwrap(),
        state: VmState::Destroyed,
        renamed_from: None,
        reason: Some(hearth_messages::TerminationReason::VmFailed),
        at_ms: hearth_messages::now_ms(),
    };
    let fake_status = |worker: &WorkerId, seq: u64| WorkerStatus {
        worker_id: worker.clone(),
        seq,
        at_ms: hearth_messages::now_ms(),
        started_ms: 1,
        provider: "fake".into(),
        max_vms: 16,
        used_vms: 0,
        draining: true,
        jobs_in_flight: 0,
        execs_in_flight: 0,
        vms: Vec::new(),
        inventory: None,
        versions: Default::default(),
        isolation: Default::default(),
    };
    for round in 0..8u64 {
        nats.publish(
            subjects.vm_events(&other),
            Encoding::MsgPack.encode(&event).unwrap().into(),
        )
        .await
        .unwrap();
        // Victim's body on the other's subject, and the other's body on the victim's subject.
        for (subject_worker, body_worker) in [(&other, &victim), (&victim, &other)] {
            nats.publish(
                subjects.worker_status(subject_worker),
                Encoding::MsgPack
                    .encode(&fake_status(body_worker, 1_000_000 + round))
                    .unwrap()
                    .into(),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nothing changed: the session runs on its worker, which still gets new work.
    let now = client.get_session(&sid("victim")).await.unwrap();
    assert_eq!(now.state, SessionState::Running);
    assert_eq!(now.worker_id, victim);
    let listed = client.list_sessions(&Default::default()).await.unwrap();
    assert_eq!(listed.len(), 1);
    let mut placed = std::collections::BTreeSet::new();
    for i in 0..6 {
        placed.insert(
            client
                .create_session(&create(&format!("n{i}")))
                .await
                .unwrap()
                .worker_id,
        );
    }
    assert!(
        placed.contains(&victim),
        "the spoofed 'draining' was believed: {placed:?}"
    );
    sched.stop().await;
}

#[tokio::test]
async fn srv_stats_count_error_replies() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let _sched = Running::start(&server, scheduler_config(&server, "s1")).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));
    wait_pool(&client, "default", 2).await;
    let stats = |name: &'static str| {
        let nats = nats.clone();
        async move {
            let reply = nats
                .request("$SRV.STATS.hearth-scheduler", "".into())
                .await
                .unwrap();
            let stats: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            let e = stats["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("no endpoint {name}: {stats}"))
                .clone();
            (
                e["num_requests"].as_u64().unwrap(),
                e["num_errors"].as_u64().unwrap(),
                e["last_error"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    let err = client.get_session(&sid("missing")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let bad = nats
        .request(Subjects::default().sessions_create(), "not msgpack".into())
        .await
        .unwrap();
    assert_eq!(
        bad.headers
            .as_ref()
            .unwrap()
            .get(SERVICE_ERROR_CODE_HEADER)
            .unwrap()
            .as_str(),
        "400"
    );
    let (requests, errors, last) = stats("sessions-get").await;
    assert_eq!((requests, errors), (1, 1));
    assert!(last.contains("missing"), "last_error: {last:?}");
    let (_, errors, _) = stats("sessions-create").await;
    assert_eq!(errors, 1);
    client.create_session(&create("ok")).await.unwrap();
    let (requests, errors, _) = stats("sessions-create").await;
    assert_eq!((requests, errors), (2, 1));
}

#[tokio::test]
async fn admin_maintenance_runs_the_lifecycle_pass_now() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let mut cfg = scheduler_config(&server, "s1");
    // Without the request, nothing would end the session for an hour.
    cfg.lifecycle_interval = Duration::from_secs(3600);
    let _sched = Running::start(&server, cfg).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone()).with_timeout(Duration::from_secs(5));
    wait_pool(&client, "default", 2).await;
    let mut req = create("m1");
    req.ttl_s = Some(1);
    client.create_session(&req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        client.get_session(&sid("m1")).await.unwrap().state,
        SessionState::Running,
        "no pass ran by itself"
    );
    let report = client.run_maintenance().await.unwrap();
    assert_eq!(report.sessions, 1);
    assert_eq!(report.actions, 1, "the expired session's end");
    wait_until("the session ended", Duration::from_secs(5), || async {
        client.get_session(&sid("m1")).await.unwrap().state == SessionState::Released
    })
    .await;
}

#[tokio::test]
async fn the_lease_holder_reports_itself_leader() {
    let handle = hearth_scheduler::metrics::builder()
        .unwrap()
        .install_recorder()
        .unwrap();
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let _sched = Running::start(&server, scheduler_config(&server, "s1")).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats).with_timeout(Duration::from_secs(5));
    wait_pool(&client, "default", 2).await;
    let leader = handle
        .render()
        .lines()
        .find(|l| l.starts_with(hearth_scheduler::metrics::SCHEDULER_LEADER))
        .map(str::to_owned);
    assert_eq!(
        leader.as_deref(),
        Some("hearth_scheduler_leader 1"),
        "the scheduler holding the lease"
    );
}

#[tokio::test]
async fn a_template_nix_profile_outcome_is_in_the_template_status() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _w1 = start_worker(&server, "w1", dir.path()).await;
    let mut cfg = scheduler_config(&server, "s1");
    cfg.templates[0].nix_profile = Some("github:o/r".into());
    let _sched = Running::start(&server, cfg).await;
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats).with_timeout(Duration::from_secs(5));
    wait_pool(&client, "default", 2).await;
    let templates = client.list_templates().await.unwrap();
    // The fake provider's VMs run any command successfully, `nix` included.
    assert_eq!(templates[0].notes, ["nix_profile \"github:o/r\" hydrated"]);
}
