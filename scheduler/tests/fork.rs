//! `sessions.<sid>.fork` in the scheduler core (fake provider, paused time): copies restored from
//! one live snapshot of the source on its worker, the source going on, idempotency by
//! `session_ids`, the tenant's quota checked before any work, partial success reported, and bad
//! input.

mod support;

use std::time::Duration;

use hearth_messages::{
    Caller, CreateSessionRequest, ErrorCode, ForkSessionRequest, JobOp, Quota, SessionId,
    SessionState, TenantId,
};
use hearth_worker::provider::{VmProvider, VmQuery};
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

/// The fork snapshots taken on a worker (the template build's is not one).
fn fork_snapshots(w: &FleetWorker) -> usize {
    w.ops("snapshot_vm")
        .iter()
        .filter(|op| matches!(op, JobOp::SnapshotVm { snapshot_id, .. } if snapshot_id.as_str().starts_with("fork-")))
        .count()
}

fn fork_of(ids: &[&str]) -> ForkSessionRequest {
    ForkSessionRequest {
        count: ids.len() as u32,
        session_ids: Some(ids.iter().map(|i| sid(i)).collect()),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_fork_makes_copies_with_the_sources_files_and_is_idempotent_by_ids() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 20);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("src")).await.unwrap();
    w1.provider
        .put_file(
            &"src".parse().unwrap(),
            "state.txt",
            b"before the fork",
            None,
        )
        .await
        .unwrap();

    let ids = ["c1", "c2", "c3", "c4"];
    let reply = h.sched.fork(&sid("src"), fork_of(&ids)).await.unwrap();
    assert!(reply.failed.is_empty(), "{:?}", reply.failed);
    let got: Vec<&str> = reply
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    assert_eq!(got, ids);
    for s in &reply.sessions {
        assert_eq!(s.state, SessionState::Running);
        assert_eq!(s.worker_id.as_str(), "w1");
        let data = w1
            .provider
            .get_file(&s.session_id.clone().into(), "state.txt", 1 << 20)
            .await
            .unwrap();
        assert_eq!(data, b"before the fork");
    }
    // One live snapshot of the source, four restores of it; the source goes on.
    assert_eq!(fork_snapshots(&w1), 1);
    let restores: Vec<_> = w1
        .ops("create_vm_with_spec")
        .into_iter()
        .filter(|op| matches!(op, JobOp::CreateVmWithSpec { spec, .. } if spec.restore_from.as_ref().is_some_and(|s| s.as_str().starts_with("fork-"))))
        .collect();
    assert_eq!(restores.len(), 4);
    assert_eq!(
        h.sched.get_session(&sid("src")).unwrap().state,
        SessionState::Running
    );
    // No template registered, and the snapshot goes away.
    assert!(
        h.sched
            .list_templates()
            .templates
            .iter()
            .all(|t| t.name.as_str() == "default")
    );
    h.wait_for("snapshot deleted", Duration::from_secs(5), || {
        !w1.ops("delete_snapshot").is_empty()
    })
    .await;
    assert!(
        w1.provider
            .list_all_snapshots()
            .await
            .unwrap()
            .iter()
            .all(|s| !s.snapshot_id.as_str().starts_with("fork-"))
    );

    // The same ids again: the same sessions, no new work.
    let again = h.sched.fork(&sid("src"), fork_of(&ids)).await.unwrap();
    assert_eq!(again.sessions, reply.sessions);
    assert_eq!(fork_snapshots(&w1), 1);

    // A paused source is resumed for its snapshot and goes on running.
    h.sched.pause(&sid("src")).await.unwrap();
    let reply = h.sched.fork(&sid("src"), fork_of(&["c5"])).await.unwrap();
    assert_eq!(reply.sessions.len(), 1, "{reply:?}");
    assert_eq!(
        h.sched.get_session(&sid("src")).unwrap().state,
        SessionState::Running
    );

    // A copy is a session like any other: released on its own, the others stay.
    h.sched.release(&sid("c2")).await.unwrap();
    assert_eq!(
        h.sched.get_session(&sid("c1")).unwrap().state,
        SessionState::Running
    );
}

#[tokio::test(start_paused = true)]
async fn a_fork_over_the_tenants_quota_is_refused_before_any_work() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 20);
    let mut cfg = config(1);
    cfg.tenants.quotas.insert(
        TenantId::new("ta").unwrap(),
        Quota {
            max_sessions: 3,
            ..Quota::default()
        },
    );
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let ta = Caller::Tenant(TenantId::new("ta").unwrap());
    h.sched.create_session_as(&ta, req("src")).await.unwrap();

    let err = h
        .sched
        .fork_as(&ta, &sid("src"), fork_of(&["a", "b", "c"]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota, "{err}");
    assert_eq!(fork_snapshots(&w1), 0, "no work before the 429");
    // Two fit.
    let reply = h
        .sched
        .fork_as(&ta, &sid("src"), fork_of(&["a", "b"]))
        .await
        .unwrap();
    assert_eq!(reply.sessions.len(), 2);
    // Another tenant does not see the source at all.
    let tb = Caller::Tenant(TenantId::new("tb").unwrap());
    let err = h
        .sched
        .fork_as(&tb, &sid("src"), fork_of(&["x"]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test(start_paused = true)]
async fn copies_that_do_not_fit_on_the_worker_are_reported_failed_not_dropped() {
    let fleet = Fleet::new();
    // Room for the pooled VM, the source and two copies.
    fleet.add("w1", 4);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("src")).await.unwrap();
    h.wait_ready("default", 1).await;
    let reply = h
        .sched
        .fork(&sid("src"), fork_of(&["p1", "p2", "p3", "p4"]))
        .await
        .unwrap();
    assert_eq!(reply.sessions.len() + reply.failed.len(), 4);
    assert!(!reply.sessions.is_empty(), "{reply:?}");
    assert!(!reply.failed.is_empty(), "{reply:?}");
    for f in &reply.failed {
        assert!(f.session_id.is_some());
        assert_eq!(f.error.code, ErrorCode::NoCapacity, "{:?}", f.error);
        // A failed copy is no session.
        let id = f.session_id.clone().unwrap();
        assert!(h.sched.get_session(&id).is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn bad_forks_are_refused_clearly() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("src")).await.unwrap();
    for bad in [
        ForkSessionRequest::default(),
        ForkSessionRequest {
            count: 65,
            ..Default::default()
        },
        ForkSessionRequest {
            count: 2,
            session_ids: Some(vec![sid("only-one")]),
            ..Default::default()
        },
        ForkSessionRequest {
            count: 2,
            session_ids: Some(vec![sid("same"), sid("same")]),
            ..Default::default()
        },
        fork_of(&["src"]),
    ] {
        let err = h.sched.fork(&sid("src"), bad.clone()).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}: {err}");
    }
    let err = h
        .sched
        .fork(&sid("nope"), fork_of(&["n1"]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    h.sched.release(&sid("src")).await.unwrap();
    let err = h
        .sched
        .fork(&sid("src"), fork_of(&["n2"]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
}
