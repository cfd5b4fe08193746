//! End to end: real nats-server, real `hearth-scheduler` and `hearth-worker` processes with the
//! process provider, driven through `HearthClient` the way an executor drives them.

mod common;

use std::time::{Duration, Instant};

use common::{DEFAULT_TEMPLATE, Stack};
use futures::StreamExt;
use hearth_messages::*;

fn id<T: TryFrom<String>>(s: impl Into<String>) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.into()).unwrap()
}

#[tokio::test]
async fn executor_flow_create_exec_files_keepalive_release() {
    let stack = Stack::start(&["w1"], DEFAULT_TEMPLATE).await;
    common::executor_flow(&stack, "w1").await;
}

/// The same flow, unchanged, from a tenant's account through the imports of
/// deploy/nats/accounts.conf (the binaries log in with their roles).
#[tokio::test]
async fn executor_flow_as_a_tenant_through_the_account_imports() {
    let stack = Stack::start_with_accounts(&["worker-1"], DEFAULT_TEMPLATE).await;
    common::executor_flow(&stack, "worker-1").await;
}

#[tokio::test]
async fn cold_fallback_when_drained_and_503_without_capacity() {
    let mut stack = Stack::start(
        &[],
        r#"
[[templates]]
name = "default"
min_ready = 1
max_ready = 1
"#,
    )
    .await;
    // Room for the three sessions plus the refill the warm claim triggers.
    stack.add_worker("w1", 4);
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 1)
        .await;
    let c = stack.client.clone();
    // Three claims at once against a pool of one: one warm, the rest restored cold.
    let claims = futures::future::join_all((0..3).map(|_| {
        let c = c.clone();
        async move {
            c.create_session(&CreateSessionRequest {
                wait_ms: Some(15_000),
                ..Default::default()
            })
            .await
        }
    }))
    .await;
    let sessions: Vec<Session> = claims
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}\n{}", stack.logs())))
        .collect();
    let cold = sessions.iter().filter(|s| !s.warm).count();
    assert!(cold >= 2, "{sessions:?}");
    for s in &sessions {
        let r = c
            .exec(&s.session_id, &ExecRequest::cmd("true"))
            .await
            .unwrap();
        assert_eq!(r.exit_code, 0);
    }
    // Keep claiming: once the worker is full (sessions + pool VM = 4), a claim gets 503 with a
    // retry hint instead of waiting forever or crashing anything.
    let mut held = sessions.len();
    let err = loop {
        match c
            .create_session(&CreateSessionRequest {
                wait_ms: Some(500),
                ..Default::default()
            })
            .await
        {
            Ok(_) => held += 1,
            Err(err) => break err,
        }
        assert!(held <= 4, "more sessions than the worker has slots");
    };
    assert_eq!(err.code(), Some(ErrorCode::NoCapacity), "{err:?}");
    assert!(err.is_retryable() && err.retry_after().is_some());
}

#[tokio::test]
async fn a_session_snapshot_becomes_a_template_restored_on_another_worker() {
    let mut stack = Stack::start(&["w1"], DEFAULT_TEMPLATE).await;
    let c = stack.client.clone();
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 2)
        .await;
    let s = c
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap();
    c.exec(
        &s.session_id,
        &ExecRequest::cmd("mkdir -p app && echo 'from the snapshot' > app/state"),
    )
    .await
    .unwrap();
    let template = c
        .snapshot_session(&s.session_id, id("mine"), Some(1))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    assert_eq!(template.name.as_str(), "mine");

    // Only a second worker remains: it must fetch the snapshot from the object store.
    stack.add_worker("w2", 16);
    stack.worker("w1").kill();
    stack
        .wait_pool("mine", Duration::from_secs(30), |p| p.ready >= 1)
        .await;
    let from_snapshot = c
        .create_session(&CreateSessionRequest {
            template: Some(id("mine")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(from_snapshot.worker_id.as_str(), "w2");
    let r = c
        .exec(
            &from_snapshot.session_id,
            &ExecRequest::cmd("cat app/state"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"from the snapshot\n");
    let templates = c.list_templates().await.unwrap();
    assert!(templates.iter().any(|t| t.name.as_str() == "mine"));
}

#[tokio::test]
async fn sigkill_of_the_scheduler_mid_load_loses_no_acknowledged_session() {
    let mut stack = Stack::start(
        &[],
        r#"
[[templates]]
name = "default"
min_ready = 4
max_ready = 8
"#,
    )
    .await;
    stack.add_worker("w1", 512);
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 4)
        .await;
    let stop_at = Instant::now() + Duration::from_secs(4);
    let loaders: Vec<_> = (0..4)
        .map(|n| {
            let c = stack.client.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let mut i = 0;
                while Instant::now() < stop_at {
                    i += 1;
                    let request = CreateSessionRequest {
                        session_id: Some(id(format!("load-{n}-{i}"))),
                        wait_ms: Some(5000),
                        ..Default::default()
                    };
                    // Retry the same request (same idempotency key) until it is acknowledged.
                    loop {
                        match c.create_session(&request).await {
                            Ok(s) => {
                                acknowledged.push(s.session_id);
                                break;
                            }
                            Err(e) if e.is_retryable() => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                if Instant::now() > stop_at + Duration::from_secs(20) {
                                    panic!("claim never acknowledged: {e}");
                                }
                            }
                            Err(e) => panic!("caller error under load: {e}"),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stack.scheduler.as_mut().unwrap().kill(); // SIGKILL
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.scheduler = Some(stack.spawn_scheduler("s2"));
    let mut acknowledged = Vec::new();
    for l in loaders {
        acknowledged.extend(l.await.unwrap());
    }
    assert!(acknowledged.len() >= 8, "too little load: {acknowledged:?}");
    for sid in &acknowledged {
        let s = stack
            .client
            .get_session(sid)
            .await
            .unwrap_or_else(|e| panic!("{sid}: {e}\n{}", stack.logs()));
        assert_eq!(s.state, SessionState::Running, "{s:?}");
        let r = stack
            .client
            .exec(sid, &ExecRequest::cmd("echo alive"))
            .await
            .unwrap_or_else(|e| panic!("{sid}: {e}\n{}", stack.logs()));
        assert_eq!(r.stdout.as_bytes(), b"alive\n");
    }
    println!(
        "{} sessions acknowledged across the crash",
        acknowledged.len()
    );
}

#[tokio::test]
async fn sigkill_of_a_worker_marks_its_sessions_lost_and_pools_refill_elsewhere() {
    // Suspect after 1.5 s of silence, lost after 5 s (60 s by default).
    let config = format!("worker_lost_grace_ms = 5000\n{DEFAULT_TEMPLATE}");
    let mut stack = Stack::start(&["w1", "w2"], &config).await;
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 2)
        .await;
    let c = stack.client.clone();
    let s = c
        .create_session(&CreateSessionRequest::default())
        .await
        .unwrap();
    let victim = s.worker_id.to_string();
    let survivor = if victim == "w1" { "w2" } else { "w1" };
    let mut events = c
        .nats()
        .subscribe(c.subjects().session_events(&s.session_id))
        .await
        .unwrap();
    stack.worker(&victim).kill();
    // Suspect first: nothing placed on it, but its session is not lost yet.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        c.get_session(&s.session_id).await.unwrap().state,
        SessionState::Running,
        "lost before the grace\n{}",
        stack.logs()
    );

    let lost = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let msg = events.next().await.unwrap();
            let ev: SessionEvent = Encoding::MsgPack.decode(&msg.payload).unwrap();
            if ev.state == SessionState::Lost {
                return ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no lost event\n{}", stack.logs()));
    assert_eq!(lost.reason, Some(TerminationReason::WorkerLost));
    assert_eq!(
        c.get_session(&s.session_id).await.unwrap().state,
        SessionState::Lost
    );
    stack
        .wait_pool("default", Duration::from_secs(30), |p| p.ready >= 2)
        .await;
    for _ in 0..2 {
        let s = c
            .create_session(&CreateSessionRequest::default())
            .await
            .unwrap();
        assert_eq!(s.worker_id.as_str(), survivor);
        assert!(s.warm);
    }
}
