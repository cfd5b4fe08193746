//! `pause_upload` in the scheduler's state machine (fake provider, paused time): a paused
//! session whose state was uploaded survives the loss of its worker (unplaced, then resumed on
//! another worker on its next touch, with its files); without the upload it is lost with the
//! reason; a damaged object ends it lost with no VM left anywhere; the object is deleted when
//! the session resumes or ends; the lost worker coming back keeps no second copy.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hearth_messages::{
    Caller, CreateSessionRequest, ErrorCode, KeepaliveRequest, PauseRequest, SessionId,
    SessionState, TerminationReason, VmId,
};
use hearth_scheduler::config::SchedulerConfig;
use hearth_worker::provider::VmProvider;
use support::*;

const KEY: &str = "paused/-/s";

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

fn uploading(upload: bool) -> SchedulerConfig {
    let mut cfg = config(1);
    cfg.templates[0].pause_upload = upload;
    cfg.worker_lost_grace = Duration::from_secs(20);
    cfg.sessions.prune_after = Duration::from_secs(3600);
    cfg
}

/// Two workers and a session `s` with a file, paused; returns the worker holding it and the
/// other one.
async fn paused_session(cfg: SchedulerConfig) -> (Harness, Arc<Fleet>, String, String) {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    fleet.add("w2", 10);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let s = h
        .sched
        .create_session(CreateSessionRequest {
            session_id: Some(sid("s")),
            ..Default::default()
        })
        .await
        .unwrap();
    let victim = s.worker_id.to_string();
    let survivor = if victim == "w1" { "w2" } else { "w1" }.to_owned();
    fleet
        .worker(&victim)
        .provider
        .put_file(&vm("s"), "work/notes.txt", b"kept", None)
        .await
        .unwrap();
    let paused = h.sched.pause(&sid("s")).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    (h, fleet, victim, survivor)
}

async fn wait_unplaced(h: &Harness) {
    h.wait_for("unplaced", Duration::from_secs(60), || {
        h.sched.get_session(&sid("s")).unwrap().unplaced
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_uploaded_paused_session_moves_to_another_worker_when_its_worker_is_lost() {
    let (h, fleet, victim, survivor) = paused_session(uploading(true)).await;
    let s = h.sched.get_session(&sid("s")).unwrap();
    assert!(s.pause_uploaded, "{s:?}");
    assert!(s.pause_upload_bytes > 0);
    assert!(fleet.paused.lock().contains_key(KEY));

    let w1 = fleet.worker(&victim);
    w1.down.store(true, Ordering::SeqCst);
    wait_unplaced(&h).await;
    let s = h.sched.get_session(&sid("s")).unwrap();
    assert_eq!(s.state, SessionState::Paused, "not ended: {s:?}");
    assert!(
        s.detail
            .as_deref()
            .unwrap()
            .contains(&format!("{victim} was lost")),
        "{s:?}"
    );
    assert_eq!(h.sched.unplaced_sessions(), vec![sid("s")]);
    // The lifecycle pass does not end it either.
    h.sleep(Duration::from_secs(10)).await;
    assert_eq!(
        h.sched.get_session(&sid("s")).unwrap().state,
        SessionState::Paused
    );

    // The next touch resumes it on w2 with its files; the object is gone.
    let s = h
        .sched
        .keepalive(&sid("s"), KeepaliveRequest::default())
        .await
        .unwrap();
    assert_eq!(s.state, SessionState::Running);
    assert_eq!(s.worker_id.as_str(), survivor);
    assert!(
        !s.unplaced && !s.pause_uploaded && s.pause_upload_bytes == 0,
        "{s:?}"
    );
    assert!(h.sched.unplaced_sessions().is_empty());
    let w2 = fleet.worker(&survivor);
    let file = w2
        .provider
        .get_file(&vm("s"), "work/notes.txt", 1 << 20)
        .await
        .unwrap();
    assert_eq!(file, b"kept");
    assert!(fleet.paused.lock().is_empty(), "object left behind");
    assert_eq!(fleet.ops("restore_paused_vm").len(), 1);

    // w1 comes back with its paused copy: destroyed, the session stays on w2.
    assert!(w1.has_vm("s").await, "w1 still holds its paused copy");
    w1.down.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while w1.has_vm("s").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale copy on w1 was never destroyed"
        );
        h.sleep(Duration::from_millis(100)).await;
    }
    assert!(w2.has_vm("s").await);
    let s = h.sched.get_session(&sid("s")).unwrap();
    assert_eq!(s.state, SessionState::Running);
    assert_eq!(s.worker_id.as_str(), survivor);
}

#[tokio::test(start_paused = true)]
async fn without_upload_a_paused_session_of_a_lost_worker_is_lost_with_the_reason() {
    let (h, fleet, victim, _) = paused_session(uploading(false)).await;
    let s = h.sched.get_session(&sid("s")).unwrap();
    assert!(!s.pause_uploaded);
    assert!(fleet.paused.lock().is_empty());
    fleet.worker(&victim).down.store(true, Ordering::SeqCst);
    h.wait_for("lost", Duration::from_secs(60), || {
        h.sched.get_session(&sid("s")).unwrap().state == SessionState::Lost
    })
    .await;
    let s = h.sched.get_session(&sid("s")).unwrap();
    let detail = s.detail.unwrap();
    assert!(detail.contains("not uploaded"), "{detail}");
    h.wait_for("the lost event", Duration::from_secs(5), || {
        h.events.for_session("s").iter().any(|e| {
            e.state == SessionState::Lost && e.reason == Some(TerminationReason::WorkerLost)
        })
    })
    .await;
    // A touch is a conflict, not a resume elsewhere.
    let err = h
        .sched
        .keepalive(&sid("s"), KeepaliveRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(fleet.ops("restore_paused_vm").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_damaged_upload_ends_the_session_lost_and_leaves_no_vm() {
    let (h, fleet, victim, survivor) = paused_session(uploading(true)).await;
    // One byte flipped in the stored object.
    {
        let mut objects = fleet.paused.lock();
        let bytes = objects.get_mut(KEY).unwrap();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x55;
    }
    fleet.worker(&victim).down.store(true, Ordering::SeqCst);
    wait_unplaced(&h).await;
    let err = h
        .sched
        .keepalive(&sid("s"), KeepaliveRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err}");
    let s = h.sched.get_session(&sid("s")).unwrap();
    assert_eq!(s.state, SessionState::Lost);
    assert!(
        s.detail
            .as_deref()
            .unwrap()
            .contains("could not be restored"),
        "{s:?}"
    );
    h.wait_for("the lost event", Duration::from_secs(5), || {
        h.events
            .for_session("s")
            .iter()
            .any(|e| e.state == SessionState::Lost && e.reason == Some(TerminationReason::VmFailed))
    })
    .await;
    assert!(
        !fleet.worker(&survivor).has_vm("s").await,
        "a half-restored vm"
    );
    assert!(fleet.paused.lock().is_empty(), "object left behind");
}

#[tokio::test(start_paused = true)]
async fn the_object_is_deleted_when_the_session_resumes_or_is_released() {
    let (h, fleet, victim, _) = paused_session(uploading(false)).await;
    // Per request, although the template does not upload.
    let s = h
        .sched
        .pause_with(
            &Caller::Operator,
            &sid("s"),
            PauseRequest { upload: Some(true) },
        )
        .await
        .unwrap();
    assert!(s.pause_uploaded, "{s:?}");
    assert!(fleet.paused.lock().contains_key(KEY));
    // Resumed by an exec on its worker: the upload is stale and goes.
    fleet.exec(&victim, "s").await;
    h.wait_for("resumed", Duration::from_secs(30), || {
        h.sched.get_session(&sid("s")).unwrap().state == SessionState::Running
    })
    .await;
    h.wait_for("object deleted", Duration::from_secs(10), || {
        fleet.paused.lock().is_empty()
    })
    .await;
    assert!(!h.sched.get_session(&sid("s")).unwrap().pause_uploaded);

    // Paused and uploaded again, then released: deleted with it.
    let s = h
        .sched
        .pause_with(
            &Caller::Operator,
            &sid("s"),
            PauseRequest { upload: Some(true) },
        )
        .await
        .unwrap();
    assert!(s.pause_uploaded);
    assert_eq!(fleet.paused.lock().len(), 1);
    let s = h.sched.release(&sid("s")).await.unwrap();
    assert_eq!(s.state, SessionState::Released);
    assert!(fleet.paused.lock().is_empty(), "object left behind");

    // An unplaced session released (its worker gone) loses its object too.
    let s2 = h
        .sched
        .create_session(CreateSessionRequest {
            session_id: Some(sid("s2")),
            ..Default::default()
        })
        .await
        .unwrap();
    h.sched
        .pause_with(
            &Caller::Operator,
            &s2.session_id,
            PauseRequest { upload: Some(true) },
        )
        .await
        .unwrap();
    fleet
        .worker(s2.worker_id.as_str())
        .down
        .store(true, Ordering::SeqCst);
    h.wait_for("s2 unplaced", Duration::from_secs(60), || {
        h.sched.get_session(&sid("s2")).unwrap().unplaced
    })
    .await;
    assert_eq!(fleet.paused.lock().len(), 1);
    h.sched.release(&sid("s2")).await.unwrap();
    assert!(fleet.paused.lock().is_empty(), "object left behind");
}

#[tokio::test(start_paused = true)]
async fn an_upload_over_the_tenants_snapshot_bytes_is_not_kept_and_the_session_stays_resumable() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let mut cfg = uploading(true);
    let tenant = hearth_messages::TenantId::new("a").unwrap();
    cfg.tenants.quotas.insert(
        tenant.clone(),
        hearth_messages::Quota {
            max_snapshot_bytes: 600,
            ..hearth_messages::Quota::default()
        },
    );
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let a = Caller::Tenant(tenant);
    let key = "paused/a/big";
    for (name, size) in [("small", 10usize), ("big", 4000)] {
        h.sched
            .create_session_as(
                &a,
                CreateSessionRequest {
                    session_id: Some(sid(name)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        w1.provider
            .put_file(&vm(name), "data", &vec![7u8; size], None)
            .await
            .unwrap();
    }
    // Under the quota: uploaded, and counted.
    let small = h.sched.pause_as(&a, &sid("small")).await.unwrap();
    assert!(small.pause_uploaded, "{small:?}");
    // Over it: the object is not kept, the session is paused on its worker with the reason.
    let big = h.sched.pause_as(&a, &sid("big")).await.unwrap();
    assert_eq!(big.state, SessionState::Paused);
    assert!(!big.pause_uploaded, "{big:?}");
    assert!(big.detail.as_deref().unwrap().contains("quota"), "{big:?}");
    assert!(
        !fleet.paused.lock().contains_key(key),
        "object kept over quota"
    );
    assert!(fleet.paused.lock().contains_key("paused/a/small"));
    // Still resumable where it is.
    let s = h
        .sched
        .keepalive_as(&a, &sid("big"), KeepaliveRequest::default())
        .await
        .unwrap();
    assert_eq!(s.state, SessionState::Running);
    // Another tenant cannot touch it (404, as for any session of another tenant).
    let other = Caller::Tenant(hearth_messages::TenantId::new("b").unwrap());
    let err = h.sched.place_as(&other, &sid("small")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}
