//! Pause in the scheduler's session lifetimes (fake provider, paused time): `idle_action` and
//! `ttl_action = "pause"`, `paused_retention_s`, resume on touch (exec, keepalive), the explicit
//! `sessions.<sid>.pause`, and fallbacks for workers that cannot pause.

mod support;

use std::time::Duration;

use hearth_messages::{
    CreateSessionRequest, ErrorCode, KeepaliveRequest, SessionId, SessionState, TerminationReason,
    VmState,
};
use hearth_scheduler::config::{IdleAction, SchedulerConfig, TtlAction};
use support::*;

fn req(sid: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        session_id: Some(SessionId::new(sid).unwrap()),
        ..Default::default()
    }
}

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn pausing(idle: Option<IdleAction>, ttl: TtlAction, retention_s: Option<u64>) -> SchedulerConfig {
    let mut cfg = config(1);
    cfg.templates[0].idle_action = idle;
    cfg.templates[0].ttl_action = ttl;
    cfg.templates[0].paused_retention_s = retention_s;
    cfg.sessions.prune_after = Duration::from_secs(3600);
    cfg
}

#[tokio::test(start_paused = true)]
async fn idle_pause_then_exec_resumes_and_the_retention_prunes_with_backup() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut cfg = pausing(Some(IdleAction::Pause), TtlAction::Release, Some(120));
    cfg.sessions.backup_on_prune = true;
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("idle");
    r.idle_timeout_s = Some(5);
    h.sched.create_session(r).await.unwrap();

    h.wait_for("idle pause", Duration::from_secs(15), || {
        h.sched.get_session(&sid("idle")).unwrap().state == SessionState::Paused
    })
    .await;
    let s = h.sched.get_session(&sid("idle")).unwrap();
    assert!(s.paused_ms.is_some());
    let w1 = fleet.worker("w1");
    assert_eq!(
        w1.vms().await.get(&"idle".parse().unwrap()),
        Some(&VmState::Paused)
    );
    assert_eq!(w1.ops("pause_vm").len(), 1);
    assert!(w1.ops("stop_vm").is_empty(), "paused, not stopped");

    // Touched: the worker resumes it and the scheduler sees it running again.
    h.sleep(Duration::from_secs(30)).await;
    fleet.exec("w1", "idle").await;
    h.wait_for("resumed", Duration::from_secs(5), || {
        h.sched.get_session(&sid("idle")).unwrap().state == SessionState::Running
    })
    .await;
    let s = h.sched.get_session(&sid("idle")).unwrap();
    assert!(s.resumed_ms.is_some() && s.paused_ms.is_none(), "{s:?}");

    // Idle again, then past paused_retention_s: pruned with a backup, reason idle.
    h.wait_for("paused again", Duration::from_secs(15), || {
        h.sched.get_session(&sid("idle")).unwrap().state == SessionState::Paused
    })
    .await;
    h.sleep(Duration::from_secs(60)).await;
    assert_eq!(
        h.sched.get_session(&sid("idle")).unwrap().state,
        SessionState::Paused,
        "kept for the retention"
    );
    h.wait_for("pruned", Duration::from_secs(90), || {
        h.sched.get_session(&sid("idle")).unwrap().state == SessionState::Released
    })
    .await;
    assert_eq!(w1.backups.lock().as_slice(), &["idle".parse().unwrap()]);
    let events = h.events.for_session("idle");
    assert!(events.iter().any(|e| e.state == SessionState::Paused));
    assert_eq!(events.last().unwrap().reason, Some(TerminationReason::Idle));
}

#[tokio::test(start_paused = true)]
async fn ttl_action_pause_keeps_an_expired_session_resumable_with_a_fresh_ttl() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(pausing(None, TtlAction::Pause, Some(300)), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("t");
    r.ttl_s = Some(10);
    h.sched.create_session(r).await.unwrap();
    h.wait_for("ttl pause", Duration::from_secs(20), || {
        h.sched.get_session(&sid("t")).unwrap().state == SessionState::Paused
    })
    .await;
    // Long past its TTL, it is still there, paused.
    h.sleep(Duration::from_secs(120)).await;
    assert_eq!(
        h.sched.get_session(&sid("t")).unwrap().state,
        SessionState::Paused
    );
    assert!(fleet.worker("w1").has_vm("t").await);

    fleet.exec("w1", "t").await;
    h.wait_for("resumed", Duration::from_secs(5), || {
        h.sched.get_session(&sid("t")).unwrap().state == SessionState::Running
    })
    .await;
    let s = h.sched.get_session(&sid("t")).unwrap();
    let now = h.sched.now_ms();
    assert!(
        s.expires_ms > now && s.expires_ms <= now + 10_000,
        "a whole TTL again: expires {} now {now}",
        s.expires_ms
    );
    // Its TTL ends again: paused again; then the retention ends it for good.
    h.wait_for("paused again", Duration::from_secs(20), || {
        h.sched.get_session(&sid("t")).unwrap().state == SessionState::Paused
    })
    .await;
    h.wait_for("pruned", Duration::from_secs(400), || {
        h.sched.get_session(&sid("t")).unwrap().state == SessionState::Released
    })
    .await;
    h.sleep(Duration::from_millis(50)).await;
    assert!(!fleet.worker("w1").has_vm("t").await);
}

#[tokio::test(start_paused = true)]
async fn an_explicit_pause_is_undone_by_a_keepalive_and_refused_once_ended() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(pausing(None, TtlAction::Release, None), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("p")).await.unwrap();

    let s = h.sched.pause(&sid("p")).await.unwrap();
    assert_eq!(s.state, SessionState::Paused);
    // Idempotent.
    assert_eq!(
        h.sched.pause(&sid("p")).await.unwrap().state,
        SessionState::Paused
    );
    assert_eq!(fleet.worker("w1").ops("pause_vm").len(), 1);

    let s = h
        .sched
        .keepalive(&sid("p"), KeepaliveRequest { ttl_s: Some(600) })
        .await
        .unwrap();
    assert_eq!(s.state, SessionState::Running);
    assert!(s.resumed_ms.is_some());
    assert_eq!(
        fleet.worker("w1").vms().await.get(&"p".parse().unwrap()),
        Some(&VmState::Running)
    );

    h.sched.release(&sid("p")).await.unwrap();
    let err = h.sched.pause(&sid("p")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    let err = h.sched.pause(&sid("nope")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test(start_paused = true)]
async fn without_an_idle_action_a_worker_that_does_not_pause_to_disk_stops() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(pausing(None, TtlAction::Release, None), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("s");
    r.idle_timeout_s = Some(5);
    h.sched.create_session(r).await.unwrap();
    h.wait_for("idle stop", Duration::from_secs(15), || {
        h.sched.get_session(&sid("s")).unwrap().state == SessionState::Stopped
    })
    .await;
    assert!(fleet.worker("w1").ops("pause_vm").is_empty());
}
