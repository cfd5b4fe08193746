//! Chaos: faults that must not lose anything. Real nats-server, `hearth-scheduler` and
//! `hearth-worker` processes on loopback, 5 running sessions and a light background load of
//! claims + execs, then one fault: nats-server frozen (SIGSTOP) for 10 s, nats-server killed and
//! restarted on the same port and store after 6 s, the scheduler SIGKILLed with a standby
//! taking over, the worker SIGTERMed or SIGKILLed and restarted on its data dir, or the leader
//! frozen (SIGSTOP) past its lease while a standby takes over, then thawed (its jobs fenced). After each: no session lost (each still `running`, exec works in it), no leaked VM
//! after a reconcile pass, every acknowledged claim of the load still answered for. The client-API
//! gap (or takeover time) is printed (docs/BENCHMARKS.md, "Recovery"); timings are not asserted.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Stack;
use hearth_messages::*;

const TEMPLATE: &str = r#"
[[templates]]
name = "default"
min_ready = 3
max_ready = 6
"#;

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

/// What the background load saw.
#[derive(Debug, Default)]
struct Load {
    /// Sessions whose create was acknowledged and that were not released (yet).
    open: BTreeSet<SessionId>,
    acked: u32,
    released: u32,
    /// Creates that never got an answer within the load's retries.
    gave_up: u32,
}

/// Claims, execs in and releases sessions until `stop`, one at a time. A failed request is retried
/// with the same session id (idempotent), as an executor does.
async fn background_load(
    client: HearthClient,
    stop: Arc<AtomicBool>,
    load: Arc<parking_lot_free::Mutex<Load>>,
) {
    let mut i = 0u32;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let id = sid(&format!("load-{i}"));
        let req = CreateSessionRequest {
            session_id: Some(id.clone()),
            ttl_s: Some(600),
            wait_ms: Some(2000),
            ..Default::default()
        };
        let mut created = false;
        for _ in 0..40 {
            if client.create_session(&req).await.is_ok() {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !created {
            load.lock().gave_up += 1;
            continue;
        }
        {
            let mut l = load.lock();
            l.acked += 1;
            l.open.insert(id.clone());
        }
        let _ = client.exec(&id, &ExecRequest::cmd("echo load")).await;
        for _ in 0..40 {
            if client.release(&id).await.is_ok() {
                let mut l = load.lock();
                l.open.remove(&id);
                l.released += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// A std mutex with a `lock()` that does not return a `Result` (a poisoned lock is a failed
/// test anyway).
mod parking_lot_free {
    pub struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Self(std::sync::Mutex::new(v))
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }
    }
}

/// Polls a request the leader answers (`pools.status`) until it succeeds; returns when it did.
async fn wait_api(client: &HearthClient, limit: Duration) -> Instant {
    let quick = client.clone().with_timeout(Duration::from_millis(250));
    let deadline = Instant::now() + limit;
    loop {
        if quick.pool_status().await.is_ok() {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the client api did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The VMs worker `w` holds (its `list_vms` job).
async fn inventory(nats: &async_nats::Client, w: &str) -> Vec<VmInfo> {
    let subject = Subjects::default().worker_jobs(&WorkerId::new(w).unwrap());
    let request = hearth_messages::JobRequest {
        job_id: hearth_messages::JobId::new(format!(
            "inv-{}",
            hearth_messages::client::new_session_id()
        ))
        .unwrap(),
        op: hearth_messages::JobOp::ListVms {},
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        nats.request(subject, payload.into()),
    )
    .await
    .expect("a list_vms reply")
    .unwrap();
    match Encoding::MsgPack
        .decode::<hearth_messages::JobReply>(&msg.payload)
        .expect("a job reply")
        .output
    {
        hearth_messages::JobOutput::Vms { vms } => vms,
        other => panic!("list_vms answered {other:?}"),
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    NatsFrozen,
    NatsRestarted,
    SchedulerKilled,
    /// The worker drains (SIGTERM), exits and is started again on the same data dir.
    WorkerTerminated,
    /// The worker is SIGKILLed and started again on the same data dir.
    WorkerKilled,
    /// The leader is frozen (SIGSTOP) past its lease, a standby takes over, then the old leader
    /// is thawed (SIGCONT) and must act on nothing.
    LeaderFrozen,
}

/// Sends `signal` (e.g. "-STOP") to a child.
fn signal(child: &hearth_testkit::ChildProcess, signal: &str) {
    let pid = child.pid().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

/// Waits until an exec in `id` answers; returns when it did.
async fn wait_exec(client: &HearthClient, id: &SessionId, limit: Duration) -> Instant {
    let quick = client.clone().with_timeout(Duration::from_millis(500));
    let deadline = Instant::now() + limit;
    loop {
        if quick.exec(id, &ExecRequest::cmd("true")).await.is_ok() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "exec in {id} did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one chaos scenario and returns the measured recovery time.
async fn scenario(fault: Fault) -> Duration {
    let mut stack = Stack::start(&["w1"], TEMPLATE).await;
    let c = stack.client.clone().with_timeout(Duration::from_secs(5));
    stack
        .wait_pool("default", Duration::from_secs(60), |p| p.ready >= 3)
        .await;
    let mut standby = match fault {
        Fault::SchedulerKilled | Fault::LeaderFrozen => Some(stack.spawn_scheduler("s2")),
        _ => None,
    };

    // Five sessions with a file each.
    let mut sessions = Vec::new();
    for i in 0..5 {
        let s = c
            .create_session(&CreateSessionRequest {
                session_id: Some(sid(&format!("keep-{i}"))),
                ttl_s: Some(600),
                ..Default::default()
            })
            .await
            .unwrap();
        c.put_file(&s.session_id, "mark", format!("m{i}").into_bytes(), None)
            .await
            .unwrap();
        sessions.push(s.session_id);
    }

    // The load runs on its own connection (it reconnects like any executor's).
    let load_nats =
        hearth_messages::connection::connect(stack.nats.url(), "chaos load", &Default::default())
            .await
            .unwrap();
    let load_client = HearthClient::new(load_nats).with_timeout(Duration::from_secs(2));
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(parking_lot_free::Mutex::new(Load::default()));
    let loader = tokio::spawn(background_load(load_client, stop.clone(), load.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let recovery = match fault {
        Fault::NatsFrozen => {
            stack.nats.pause().unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            stack.nats.resume().unwrap();
            let back = Instant::now();
            wait_api(&c, Duration::from_secs(20)).await - back
        }
        Fault::NatsRestarted => {
            stack.nats.kill();
            tokio::time::sleep(Duration::from_secs(6)).await;
            stack.nats.restart().unwrap();
            let back = Instant::now();
            wait_api(&c, Duration::from_secs(20)).await - back
        }
        Fault::SchedulerKilled => {
            stack.scheduler.as_mut().unwrap().kill();
            let killed = Instant::now();
            wait_api(&c, Duration::from_secs(20)).await - killed
        }
        Fault::WorkerTerminated | Fault::WorkerKilled => {
            let down = Instant::now();
            if matches!(fault, Fault::WorkerKilled) {
                stack.worker("w1").kill();
            } else {
                let status = stack
                    .worker("w1")
                    .terminate(Duration::from_secs(40))
                    .unwrap();
                println!(
                    "worker drained and exited in {} ms ({status})",
                    down.elapsed().as_millis()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let child = stack.spawn_worker("w1", 32);
            *stack.worker("w1") = child;
            // Recovery: from the worker going down until its sessions serve execs again.
            wait_exec(&c, &sessions[0], Duration::from_secs(30)).await - down
        }
        Fault::LeaderFrozen => {
            let old = stack.scheduler.as_ref().unwrap();
            signal(old, "-STOP");
            let frozen = Instant::now();
            let takeover = wait_api(&c, Duration::from_secs(20)).await - frozen;
            // Frozen well past its 2 s lease, and long enough for the new leader to act.
            tokio::time::sleep(Duration::from_secs(4).saturating_sub(frozen.elapsed())).await;
            signal(stack.scheduler.as_ref().unwrap(), "-CONT");
            takeover
        }
    };

    // Let the load run on the recovered stack, then stop it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), loader)
        .await
        .expect("the load winds down")
        .unwrap();

    // 0 sessions lost: every one still running, its file there, exec works.
    for (i, id) in sessions.iter().enumerate() {
        let s = c.get_session(id).await.unwrap();
        assert_eq!(
            s.state,
            SessionState::Running,
            "{id} after {fault:?}\n{}",
            stack.logs()
        );
        let mut ok = None;
        for _ in 0..50 {
            if let Ok(r) = c.exec(id, &ExecRequest::cmd("cat mark")).await {
                ok = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r = ok.unwrap_or_else(|| panic!("no exec in {id}\n{}", stack.logs()));
        assert_eq!(r.stdout.as_bytes(), format!("m{i}").as_bytes());
    }
    // Every acknowledged claim of the load is answered for: released, or still running.
    let (acked, released, open, gave_up) = {
        let l = load.lock();
        (l.acked, l.released, l.open.clone(), l.gave_up)
    };
    assert!(acked > 0, "the load never claimed");
    for id in &open {
        let s = c.get_session(id).await.unwrap();
        assert_ne!(s.state, SessionState::Lost, "{id} lost after {fault:?}");
    }
    // 0 leaked VMs after a reconcile pass: the worker holds exactly the live sessions' VMs and
    // the pool's (leak_grace is 2 s, reconcile runs on every fresh heartbeat).
    let nats = stack.nats.connect().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let live: BTreeSet<String> = c
            .list_sessions(&ListSessionsRequest::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|s| !s.state.is_terminal())
            .map(|s| s.session_id.to_string())
            .collect();
        let pool = c.pool_status().await.unwrap();
        let ready: u32 = pool.pools.iter().map(|p| p.ready).sum();
        let restoring: u32 = pool.pools.iter().map(|p| p.restoring).sum();
        let vms = inventory(&nats, "w1").await;
        let ids: BTreeSet<String> = vms.iter().map(|v| v.vm_id.to_string()).collect();
        let sessions_present = live.iter().all(|s| ids.contains(s));
        // A restore in flight may or may not have made its VM yet.
        let extra = ids.len() as i64 - live.len() as i64 - ready as i64;
        assert!(
            sessions_present,
            "a live session's vm is gone: {live:?} vs {ids:?}"
        );
        if (0..=restoring as i64).contains(&extra) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{extra} vm(s) beyond sessions + pool after {fault:?}: {ids:?}, live {live:?}, pool {pool:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "chaos {fault:?}: recovery {} ms; load: {acked} claims acknowledged, {released} released, {} open, {gave_up} gave up",
        recovery.as_millis(),
        open.len()
    );
    if matches!(fault, Fault::LeaderFrozen) {
        // The thawed leader stepped down: it knows it lost the lease, and whatever it still
        // tried was refused by the worker (counted in hearth_worker_jobs_fenced_total) or had no
        // effect (the checks above: nothing lost, duplicated or leaked).
        let old = stack.scheduler.as_ref().unwrap().log();
        assert!(
            old.contains("stepping down") || old.contains("taken over"),
            "the thawed leader did not step down:\n{}",
            stack.logs()
        );
        let fenced = stack
            .worker("w1")
            .log()
            .matches("refusing a job from a deposed scheduler")
            .count();
        println!("jobs of the thawed leader fenced by the worker: {fenced}");
        // The standby is still the leader and serves.
        wait_api(&c, Duration::from_secs(5)).await;
    }
    if let Some(s) = standby.as_mut() {
        s.kill();
    }
    recovery
}

#[tokio::test]
async fn nats_frozen_for_10_s_loses_nothing() {
    let gap = scenario(Fault::NatsFrozen).await;
    println!("client-api gap after SIGCONT: {} ms", gap.as_millis());
}

#[tokio::test]
async fn nats_restarted_after_6_s_loses_nothing() {
    let gap = scenario(Fault::NatsRestarted).await;
    println!("client-api gap after restart: {} ms", gap.as_millis());
}

#[tokio::test]
async fn scheduler_killed_a_standby_takes_over_and_loses_nothing() {
    let takeover = scenario(Fault::SchedulerKilled).await;
    println!(
        "takeover (kill -> api answers): {} ms",
        takeover.as_millis()
    );
}

#[tokio::test]
async fn worker_terminated_and_restarted_loses_nothing() {
    let gap = scenario(Fault::WorkerTerminated).await;
    println!(
        "worker SIGTERM -> execs answer again: {} ms",
        gap.as_millis()
    );
}

#[tokio::test]
async fn worker_killed_and_restarted_loses_nothing() {
    let gap = scenario(Fault::WorkerKilled).await;
    println!(
        "worker SIGKILL -> execs answer again: {} ms",
        gap.as_millis()
    );
}

#[tokio::test]
async fn a_frozen_leader_is_deposed_and_fenced_when_it_thaws() {
    let takeover = scenario(Fault::LeaderFrozen).await;
    println!(
        "takeover (SIGSTOP -> standby answers): {} ms",
        takeover.as_millis()
    );
}

#[tokio::test]
async fn a_scheduler_started_before_nats_waits_and_comes_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let mut cmd =
        std::process::Command::new(hearth_testkit::workspace_bin("hearth-scheduler").unwrap());
    cmd.args(["--nats-url", &url, "--scheduler-id", "early"])
        .args(["--metrics-listen", "off"])
        .env("RUST_LOG", "info");
    let mut scheduler = hearth_testkit::ChildProcess::spawn("scheduler", cmd, dir.path()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        scheduler.is_running(),
        "exited without nats:\n{}",
        scheduler.log()
    );
    assert!(
        scheduler.log().contains("nats unavailable; retrying"),
        "no log line per attempt:\n{}",
        scheduler.log()
    );
    let nats = hearth_testkit::NatsServer::builder()
        .port(port)
        .start()
        .unwrap();
    let client = HearthClient::new(nats.connect().await.unwrap());
    wait_api(&client, Duration::from_secs(15)).await;
    assert!(scheduler.is_running());
}
