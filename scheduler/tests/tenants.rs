//! Tenants in the scheduler core (in-memory store, in-process fleet, paused time): quotas over and
//! under, template deletion, fair placement, ownership of snapshots, run-time quota changes. The
//! same rules over real NATS accounts: tests/tests/tenants_nats.rs.

mod support;

use std::time::Duration;

use hearth_messages::{
    Caller, CreateSessionRequest, DeleteTemplateRequest, ErrorCode, JobOp, Quota, SessionId,
    SetQuotaRequest, SnapshotSessionRequest, TenantId,
};
use hearth_worker::provider::VmProvider;
use support::*;

fn tenant(name: &str) -> Caller {
    Caller::Tenant(TenantId::new(name).unwrap())
}

fn req(sid: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        session_id: Some(SessionId::new(sid).unwrap()),
        ..Default::default()
    }
}

fn snap(template: &str, min_ready: u32) -> SnapshotSessionRequest {
    SnapshotSessionRequest {
        template: tname(template),
        min_ready: Some(min_ready),
        max_ready: None,
    }
}

fn with_quota(min_ready: u32, name: &str, quota: Quota) -> hearth_scheduler::SchedulerConfig {
    let mut cfg = config(min_ready);
    cfg.tenants
        .quotas
        .insert(TenantId::new(name).unwrap(), quota);
    cfg
}

#[tokio::test(start_paused = true)]
async fn snapshot_bytes_over_quota_are_refused_and_undone_under_quota_kept() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 20);
    let quota = Quota {
        max_snapshot_bytes: 1000,
        ..Quota::default()
    };
    let h = Harness::start(with_quota(1, "a", quota), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let a = tenant("a");
    let s = h.sched.create_session_as(&a, req("s1")).await.unwrap();
    let vm = s.session_id.clone().into();
    // Under: a small file fits.
    w1.provider
        .put_file(&vm, "small", &[1u8; 100], None)
        .await
        .unwrap();
    let t = h
        .sched
        .snapshot_session_as(&a, &s.session_id, snap("small", 0))
        .await
        .unwrap();
    assert_eq!(t.snapshot_bytes, 100);
    assert_eq!(t.tenant, a.tenant().cloned());
    // Over: 100 + 2000 > 1000. Refused with 429, and the snapshot taken is deleted again.
    w1.provider
        .put_file(&vm, "big", &[2u8; 2000], None)
        .await
        .unwrap();
    let deletes_before = fleet.ops("delete_snapshot").len();
    let err = h
        .sched
        .snapshot_session_as(&a, &s.session_id, snap("big", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota, "{err:?}");
    assert!(
        h.sched
            .list_templates_as(&a)
            .templates
            .iter()
            .all(|t| t.name.as_str() != "big")
    );
    let deletes = fleet.ops("delete_snapshot");
    assert_eq!(deletes.len(), deletes_before + 1);
    assert!(matches!(
        &deletes.last().unwrap().1,
        JobOp::DeleteSnapshot {
            unpublish: true,
            ..
        }
    ));
    // Now at its limit, even before taking a snapshot.
    let status = h.sched.quotas_status(&Caller::Operator).unwrap();
    let usage = status
        .tenants
        .iter()
        .find(|u| u.tenant.as_str() == "a")
        .unwrap();
    assert_eq!((usage.templates, usage.snapshot_bytes), (1, 100));
}

#[tokio::test(start_paused = true)]
async fn template_count_and_pool_sizes_are_capped_per_tenant() {
    let fleet = Fleet::new();
    fleet.add("w1", 40);
    let quota = Quota {
        max_templates: 2,
        max_ready_per_template: 3,
        max_ready_total: 4,
        ..Quota::default()
    };
    let h = Harness::start(with_quota(1, "a", quota), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let a = tenant("a");
    let s = h.sched.create_session_as(&a, req("s1")).await.unwrap();
    let sid = &s.session_id;
    // Over the global cap: 400, whoever asks.
    for caller in [&a, &Caller::Operator] {
        let err = h
            .sched
            .snapshot_session_as(caller, sid, snap("huge", 100_000))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{err:?}");
    }
    // max_ready below min_ready: 400.
    let err = h
        .sched
        .snapshot_session_as(
            &a,
            sid,
            SnapshotSessionRequest {
                max_ready: Some(1),
                ..snap("inverted", 2)
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    // Over the per-template cap: 429; at it: fine.
    let err = h
        .sched
        .snapshot_session_as(&a, sid, snap("four", 4))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota);
    h.sched
        .snapshot_session_as(&a, sid, snap("three", 3))
        .await
        .unwrap();
    // Over the total (3 + 2 > 4): 429; within it (3 + 1): fine; then the count is reached.
    let err = h
        .sched
        .snapshot_session_as(&a, sid, snap("two", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota);
    h.sched
        .snapshot_session_as(&a, sid, snap("one", 1))
        .await
        .unwrap();
    let err = h
        .sched
        .snapshot_session_as(&a, sid, snap("zero", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota);
    assert!(err.message.contains("templates"), "{err:?}");
    // Nothing of the refused requests stays behind.
    let names: Vec<String> = h
        .sched
        .list_templates()
        .templates
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(names, ["default", "one", "three"]);
}

#[tokio::test(start_paused = true)]
async fn live_sessions_and_create_rate_per_tenant() {
    let fleet = Fleet::new();
    fleet.add("w1", 40);
    let quota = Quota {
        max_sessions: 3,
        creates_per_s: 2,
        create_burst: 2,
        ..Quota::default()
    };
    let h = Harness::start(with_quota(4, "a", quota), fleet.clone()).await;
    h.wait_ready("default", 4).await;
    let a = tenant("a");
    // Burst of 2, then the rate: 429 with a retry hint of about half a second.
    h.sched.create_session_as(&a, req("s1")).await.unwrap();
    h.sched.create_session_as(&a, req("s2")).await.unwrap();
    let err = h.sched.create_session_as(&a, req("s3")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota);
    let wait = err.retry_after_ms.expect("a rate limit says when to retry");
    assert!((1..=500).contains(&wait), "{wait}");
    // An idempotent retry of an existing session is not a new create.
    h.sched.create_session_as(&a, req("s1")).await.unwrap();
    h.sleep(Duration::from_millis(wait)).await;
    h.sched.create_session_as(&a, req("s3")).await.unwrap();
    // Live sessions: 3 of 3; another is refused without a retry hint (releasing helps, not
    // waiting), and released ones free their place.
    h.sleep(Duration::from_secs(2)).await;
    let err = h.sched.create_session_as(&a, req("s4")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Quota);
    assert_eq!(err.retry_after_ms, None);
    // Other tenants and the operator are not affected.
    h.sched
        .create_session_as(&tenant("b"), req("b1"))
        .await
        .unwrap();
    h.sched.create_session(req("op1")).await.unwrap();
    h.sched
        .release_as(&a, &SessionId::new("s1").unwrap())
        .await
        .unwrap();
    h.sched.create_session_as(&a, req("s4")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_template_in_use_is_deleted_only_with_force_and_then_everywhere() {
    let fleet = Fleet::new();
    fleet.add("w1", 20);
    fleet.add("w2", 20);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let a = tenant("a");
    let src = h.sched.create_session_as(&a, req("src")).await.unwrap();
    let t = h
        .sched
        .snapshot_session_as(&a, &src.session_id, snap("mine", 1))
        .await
        .unwrap();
    let snapshot = t.snapshot_id.clone().unwrap();
    h.wait_ready("mine", 1).await;
    let user = h
        .sched
        .create_session_as(
            &a,
            CreateSessionRequest {
                template: Some(tname("mine")),
                ..req("user")
            },
        )
        .await
        .unwrap();
    // Another tenant: 404. The owner without force while a session of it lives: 409.
    let del = |force| DeleteTemplateRequest { force };
    let err = h
        .sched
        .delete_template_as(&tenant("b"), &tname("mine"), del(true))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let err = h
        .sched
        .delete_template_as(&a, &tname("mine"), del(false))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err:?}");
    assert!(
        !h.sched
            .get_session_as(&a, &user.session_id)
            .unwrap()
            .state
            .is_terminal()
    );
    // With force: the session is released, the template is no longer claimable, its pool drains,
    // its snapshot goes from every worker and the object store, then the template itself.
    let deleting = h
        .sched
        .delete_template_as(&a, &tname("mine"), del(true))
        .await
        .unwrap();
    assert!(deleting.deleting);
    assert!(
        h.sched
            .get_session_as(&a, &user.session_id)
            .unwrap()
            .state
            .is_terminal()
    );
    let err = h
        .sched
        .create_session_as(
            &a,
            CreateSessionRequest {
                template: Some(tname("mine")),
                ..req("late")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // Deleting again answers the same (idempotent).
    assert!(
        h.sched
            .delete_template_as(&a, &tname("mine"), del(false))
            .await
            .unwrap()
            .deleting
    );
    h.wait_for("the template is gone", Duration::from_secs(600), || {
        h.sched
            .list_templates()
            .templates
            .iter()
            .all(|t| t.name.as_str() != "mine")
    })
    .await;
    assert_eq!(h.sched.ready_count(&tname("mine")), 0);
    for w in ["w1", "w2"] {
        assert!(!fleet.worker(w).has_snapshot(&snapshot).await, "{w}");
    }
    assert!(!fleet.objects.lock().contains_key(&snapshot));
    // The name is free again.
    h.sched
        .snapshot_session_as(&a, &src.session_id, snap("mine", 0))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn config_templates_are_not_deleted_through_the_api() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    for caller in [Caller::Operator, tenant("a")] {
        let err = h
            .sched
            .delete_template_as(
                &caller,
                &tname("default"),
                DeleteTemplateRequest { force: true },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Conflict, "{caller}: {err:?}");
    }
    let err = h
        .sched
        .delete_template_as(
            &Caller::Operator,
            &tname("nope"),
            DeleteTemplateRequest::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test(start_paused = true)]
async fn a_tenants_warm_pools_stay_within_its_fleet_share() {
    let fleet = Fleet::new();
    fleet.add("w1", 20);
    let quota = Quota {
        max_fleet_share_pct: 25,
        max_ready_per_template: 16,
        max_ready_total: 16,
        ..Quota::default()
    };
    let h = Harness::start(with_quota(4, "a", quota), fleet.clone()).await;
    h.wait_ready("default", 4).await;
    let a = tenant("a");
    let s = h.sched.create_session_as(&a, req("src")).await.unwrap();
    h.sched
        .snapshot_session_as(&a, &s.session_id, snap("greedy", 16))
        .await
        .unwrap();
    // 25 % of 20 slots: 5 warm VMs, however long the supervisor runs; the operator's pool keeps
    // its target.
    h.sleep(Duration::from_secs(30)).await;
    assert_eq!(h.sched.ready_count(&tname("greedy")), 5);
    h.wait_ready("default", 4).await;
}

#[tokio::test(start_paused = true)]
async fn the_operator_snapshotting_a_tenant_session_leaves_the_template_to_that_tenant() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let a = tenant("a");
    let s = h.sched.create_session_as(&a, req("src")).await.unwrap();
    let t = h
        .sched
        .snapshot_session(&s.session_id, snap("theirs", 0))
        .await
        .unwrap();
    assert_eq!(t.tenant, a.tenant().cloned());
    assert!(
        h.sched
            .list_templates_as(&tenant("b"))
            .templates
            .iter()
            .all(|t| t.name.as_str() != "theirs")
    );
}

#[tokio::test(start_paused = true)]
async fn quotas_set_at_run_time_hold_at_once_and_survive_a_restart() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut h = Harness::start(config(3), fleet.clone()).await;
    h.wait_ready("default", 3).await;
    let a = tenant("a");
    let tight = Quota {
        max_sessions: 1,
        ..Quota::default()
    };
    let set = SetQuotaRequest {
        tenant: TenantId::new("a").unwrap(),
        quota: Some(tight),
    };
    // Tenants cannot reach the admin calls (404, as for any endpoint they may not use).
    assert_eq!(
        h.sched.set_quota(&a, set.clone()).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    let status = h.sched.set_quota(&Caller::Operator, set).await.unwrap();
    assert!(
        status
            .tenants
            .iter()
            .any(|u| u.tenant.as_str() == "a" && u.overridden)
    );
    h.sched.create_session_as(&a, req("s1")).await.unwrap();
    assert_eq!(
        h.sched
            .create_session_as(&a, req("s2"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Quota
    );
    h.restart().await;
    h.wait_ready("default", 3).await;
    assert_eq!(
        h.sched
            .create_session_as(&a, req("s2"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Quota,
        "the override and the live session count survive the restart"
    );
    // Back to the configured quota.
    h.sched
        .set_quota(
            &Caller::Operator,
            SetQuotaRequest {
                tenant: TenantId::new("a").unwrap(),
                quota: None,
            },
        )
        .await
        .unwrap();
    h.sched.create_session_as(&a, req("s2")).await.unwrap();
    // A quota that cannot be met is refused.
    let bad = Quota {
        max_ready_per_template: 10,
        max_ready_total: 5,
        ..Quota::default()
    };
    let err = h
        .sched
        .set_quota(
            &Caller::Operator,
            SetQuotaRequest {
                tenant: TenantId::new("a").unwrap(),
                quota: Some(bad),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
}
