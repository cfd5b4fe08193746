//! Logic tests of the scheduler core: the real fake provider behind in-process workers, an
//! in-memory store and paused time. No NATS here (see `nats.rs`).

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hearth_messages::{
    CreateSessionRequest, ErrorCode, JobOp, KeepaliveRequest, SessionId, SessionState,
    SnapshotSessionRequest, TerminationReason, VmState,
};
use hearth_scheduler::store::Table;
use hearth_worker::provider::{FakeConfig, FakeOp};
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

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn pool_reaches_min_ready_spread_across_workers_from_one_template_build() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    fleet.add("w2", 10);
    let h = Harness::start(config(4), fleet.clone()).await;
    h.wait_ready("default", 4).await;

    // Built once: one cold create with the template spec, one published snapshot.
    let snaps = fleet.ops("snapshot_vm");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(matches!(
        &snaps[0].1,
        JobOp::SnapshotVm { publish: true, .. }
    ));
    // Spread: two per worker.
    let vms = h.sched.ready_vms(&tname("default"));
    for w in ["w1", "w2"] {
        assert_eq!(
            vms.iter().filter(|(_, x)| x.as_str() == w).count(),
            2,
            "{vms:?}"
        );
    }
    // Every ready VM exists on its worker, restored from the snapshot, and is in the pool KV.
    for (vm, w) in &vms {
        assert!(fleet.worker(w.as_str()).has_vm(vm.as_str()).await);
    }
    assert_eq!(h.kv.keys(Table::Pool).len(), 4);
    let status = h.sched.pools_status();
    assert_eq!(status.pools[0].ready, 4);
    assert_eq!(status.pools[0].target, 4);
    // The build VM is gone; nothing else leaked.
    let total: usize = {
        let mut n = 0;
        for w in fleet.all() {
            n += w.vms().await.len();
        }
        n
    };
    assert_eq!(total, 4);
    // The pool never overshoots max_ready while idle.
    h.sleep(MINUTE).await;
    assert_eq!(h.sched.ready_count(&tname("default")), 4);
}

#[tokio::test(start_paused = true)]
async fn warm_claim_renames_records_then_refills() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    let oldest = h.sched.ready_vms(&tname("default"))[0].0.clone();

    let s = h.sched.create_session(req("s1")).await.unwrap();
    assert!(s.warm);
    assert_eq!(s.state, SessionState::Running);
    assert_eq!(s.worker_id.as_str(), "w1");
    // The pooled VM now carries the session's id; its pool entry is gone, the session recorded.
    let w1 = fleet.worker("w1");
    assert!(w1.has_vm("s1").await);
    assert!(!w1.has_vm(oldest.as_str()).await);
    let renames = w1.ops("rename_vm");
    assert!(
        matches!(&renames[..], [JobOp::RenameVm { vm_id, new_vm_id, session: true }]
            if *vm_id == oldest && new_vm_id.as_str() == "s1")
    );
    assert!(h.kv.keys(Table::Sessions).contains(&"s1".to_owned()));
    // Refilled by the claim, back to target.
    h.wait_ready("default", 2).await;
    h.wait_for("pool kv refilled", MINUTE, || {
        h.kv.keys(Table::Pool).len() == 2
    })
    .await;
    assert_eq!(h.sched.get_session(&sid("s1")).unwrap(), s);
    assert_eq!(h.events.for_session("s1")[0].state, SessionState::Running);
}

/// A tiny deterministic PRNG for property-style tests (no extra dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_claims_never_share_a_vm() {
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let fleet = Fleet::new();
        let n_workers = 1 + rng.below(3) as usize;
        let mut capacity = 0;
        for i in 0..n_workers {
            let cfg = FakeConfig::default()
                .with_latency(FakeOp::Rename, Duration::from_micros(rng.below(3000)))
                .with_latency(FakeOp::Create, Duration::from_millis(1 + rng.below(40)));
            let max_vms = 8 + rng.below(40) as u32;
            capacity += max_vms as usize;
            fleet.add_with(&format!("w{i}"), max_vms, cfg);
        }
        let min_ready = rng.below(12) as u32;
        let mut cfg = config(min_ready);
        cfg.claim_wait = Duration::from_secs(5);
        let h = Harness::start(cfg, fleet.clone()).await;
        if min_ready > 0 {
            h.wait_for("pool at target", MINUTE, || {
                h.sched.ready_count(&tname("default")) == min_ready as usize
            })
            .await;
        }
        let pool_before: HashSet<_> = h
            .sched
            .ready_vms(&tname("default"))
            .into_iter()
            .map(|(vm, _)| vm)
            .collect();

        // 64 concurrent claims; a few reuse an id (idempotent duplicates).
        let mut tasks = Vec::new();
        let mut requested = HashSet::new();
        for i in 0..64u64 {
            let id = if rng.below(8) == 0 { i / 2 } else { i };
            requested.insert(id);
            let s = h.sched.clone();
            tasks.push(tokio::spawn(async move {
                (id, s.create_session(req(&format!("s{seed}-{id}"))).await)
            }));
        }
        let mut sessions = std::collections::HashMap::new();
        for t in tasks {
            let (id, result) = t.await.unwrap();
            match result {
                Ok(s) => {
                    if let Some(prev) = sessions.insert(id, s.clone()) {
                        assert_eq!(prev, s, "seed {seed}: duplicate claim diverged");
                    }
                }
                Err(e) => assert_eq!(e.code, ErrorCode::NoCapacity, "seed {seed}: {e}"),
            }
        }
        // Every session has its own VM, under its own id, on its recorded worker, exactly once.
        for s in sessions.values() {
            let found = fleet.locate(s.session_id.as_str()).await;
            assert_eq!(
                found,
                vec![s.worker_id.clone()],
                "seed {seed}: {}",
                s.session_id
            );
        }
        // No pooled VM was renamed twice, and every warm session consumed a distinct pooled VM.
        let renamed: Vec<_> = fleet
            .ops("rename_vm")
            .into_iter()
            .map(|(_, op)| match op {
                JobOp::RenameVm { vm_id, .. } => vm_id,
                _ => unreachable!(),
            })
            .collect();
        let unique: HashSet<_> = renamed.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            renamed.len(),
            "seed {seed}: a vm was renamed twice"
        );
        let warm = sessions.values().filter(|s| s.warm).count();
        println!(
            "seed {seed}: workers {n_workers} (capacity {capacity}), min_ready {min_ready}, \
             sessions {}/{}, warm {warm}",
            sessions.len(),
            requested.len()
        );
        assert_eq!(warm, renamed.len(), "seed {seed}");
        // Every warm claim took a VM that was pooled: ready before the burst or restored into
        // the pool during it (never a session's or a cold VM).
        let restored: HashSet<_> = fleet
            .ops("create_vm_with_spec")
            .into_iter()
            .filter_map(|(_, op)| match op {
                JobOp::CreateVmWithSpec { vm_id, session, .. } if !session => Some(vm_id),
                _ => None,
            })
            .collect();
        for vm in &renamed {
            assert!(
                pool_before.contains(vm) || restored.contains(vm),
                "seed {seed}: {vm} was never a pooled vm"
            );
        }
        // The pool was at target before the burst: every VM in it served a claim.
        assert!(
            warm >= pool_before.len().min(sessions.len()),
            "seed {seed}: {warm} warm claims with {} vms ready",
            pool_before.len()
        );
        assert!(
            renamed
                .iter()
                .all(|vm| vm.as_str().starts_with("pool-default-")),
            "seed {seed}"
        );
        // With room for every claim next to a full pool, nobody got a 503.
        if capacity >= requested.len() + 2 * min_ready.max(1) as usize {
            assert_eq!(
                sessions.len(),
                requested.len(),
                "seed {seed}: capacity {capacity}, a claim was refused"
            );
        }
        h.sched.shutdown(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn create_is_idempotent_and_conflicts_on_another_template() {
    let fleet = Fleet::new();
    fleet.add("w1", 20);
    let mut cfg = config(3);
    cfg.templates
        .push(hearth_scheduler::TemplateConfig::new(tname("other"), 0));
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 3).await;

    let a = h.sched.create_session(req("dup")).await.unwrap();
    let b = h.sched.create_session(req("dup")).await.unwrap();
    assert_eq!(a, b);
    let mut other = req("dup");
    other.template = Some(tname("other"));
    let err = h.sched.create_session(other).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);

    // Concurrent duplicates: one claim, one VM, everyone gets the same session.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = h.sched.clone();
        tasks.push(tokio::spawn(
            async move { s.create_session(req("conc")).await },
        ));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        seen.insert(format!("{:?}", t.await.unwrap().unwrap()));
    }
    assert_eq!(seen.len(), 1);
    assert_eq!(fleet.ops("rename_vm").len(), 2, "one vm per session id");
}

#[tokio::test(start_paused = true)]
async fn empty_pool_goes_cold_and_fail_fast_gets_503() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(0), fleet.clone()).await;
    // The template builds although no pool is kept.
    h.wait_for("template built", MINUTE, || {
        h.sched.list_templates().templates[0].snapshot_id.is_some()
    })
    .await;
    let s = h.sched.create_session(req("cold")).await.unwrap();
    assert!(!s.warm);
    assert!(fleet.worker("w1").has_vm("cold").await);
    let creates = fleet.ops("create_vm_with_spec");
    assert!(creates.iter().any(|(_, op)| matches!(op,
        JobOp::CreateVmWithSpec { vm_id, spec, session: true }
            if vm_id.as_str() == "cold" && spec.restore_from.is_some())));

    let mut fast = req("fast");
    fast.wait_ms = Some(0);
    let err = h.sched.create_session(fast).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(err.retry_after_ms.is_some());
}

#[tokio::test(start_paused = true)]
async fn no_capacity_anywhere_is_503_with_retry_hint() {
    let fleet = Fleet::new();
    fleet.add("w1", 2);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("a")).await.unwrap();
    // Refill takes the second slot; then the worker is full.
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("b")).await.unwrap();
    h.sleep(Duration::from_secs(3)).await;
    let err = h.sched.create_session(req("c")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity, "{err}");
    assert_eq!(err.retry_after_ms, Some(1000));
    assert!(h.sched.get_session(&sid("c")).is_err());
}

#[tokio::test(start_paused = true)]
async fn bad_requests_and_unknowns() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(0), fleet.clone()).await;
    let mut r = req("x");
    r.template = Some(tname("nope"));
    assert_eq!(
        h.sched.create_session(r).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    let mut r = req("x");
    r.ttl_s = Some(0);
    assert_eq!(
        h.sched.create_session(r).await.unwrap_err().code,
        ErrorCode::BadRequest
    );
    assert_eq!(
        h.sched.get_session(&sid("ghost")).unwrap_err().code,
        ErrorCode::NotFound
    );
    assert_eq!(
        h.sched.release(&sid("ghost")).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    assert_eq!(
        h.sched
            .keepalive(&sid("ghost"), KeepaliveRequest::default())
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_destroys_and_reports_ttl() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("t");
    r.ttl_s = Some(10);
    let s = h.sched.create_session(r).await.unwrap();
    assert_eq!(s.expires_ms, s.created_ms + 10_000);
    h.sleep(Duration::from_secs(5)).await;
    assert_eq!(
        h.sched.get_session(&sid("t")).unwrap().state,
        SessionState::Running
    );
    h.wait_for("ttl", Duration::from_secs(10), || {
        h.sched.get_session(&sid("t")).unwrap().state == SessionState::Released
    })
    .await;
    h.sleep(Duration::from_millis(50)).await;
    assert!(!fleet.worker("w1").has_vm("t").await);
    let events = h.events.for_session("t");
    let last = events.last().unwrap();
    assert_eq!(last.reason, Some(TerminationReason::Ttl));
    assert_eq!(last.state, SessionState::Released);
}

#[tokio::test(start_paused = true)]
async fn idle_stop_then_prune_with_backup() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut cfg = config(1);
    cfg.sessions.prune_after = Duration::from_secs(20);
    cfg.sessions.backup_on_prune = true;
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("idle");
    r.idle_timeout_s = Some(5);
    h.sched.create_session(r).await.unwrap();

    // Activity keeps it running.
    for _ in 0..4 {
        h.sleep(Duration::from_secs(3)).await;
        fleet.exec("w1", "idle").await;
    }
    assert_eq!(
        h.sched.get_session(&sid("idle")).unwrap().state,
        SessionState::Running
    );
    // Idle: stopped (the VM too), not ended.
    h.wait_for("idle stop", Duration::from_secs(10), || {
        h.sched.get_session(&sid("idle")).unwrap().state == SessionState::Stopped
    })
    .await;
    assert_eq!(
        fleet.worker("w1").vms().await.get(&"idle".parse().unwrap()),
        Some(&VmState::Stopped)
    );
    // Pruned after prune_after, with a backup first.
    h.wait_for("prune", Duration::from_secs(25), || {
        h.sched.get_session(&sid("idle")).unwrap().state == SessionState::Released
    })
    .await;
    let w1 = fleet.worker("w1");
    assert_eq!(w1.backups.lock().as_slice(), &["idle".parse().unwrap()]);
    h.sleep(Duration::from_millis(50)).await;
    assert!(!w1.has_vm("idle").await);
    let events = h.events.for_session("idle");
    assert!(events.iter().any(|e| e.state == SessionState::Stopped));
    assert_eq!(events.last().unwrap().reason, Some(TerminationReason::Idle));
}

#[tokio::test(start_paused = true)]
async fn backup_after_backs_a_stopped_session_up_once_without_ending_it() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut cfg = config(1);
    cfg.sessions.prune_after = Duration::from_secs(3600);
    cfg.sessions.backup_after = Some(Duration::from_secs(30));
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("bk");
    r.idle_timeout_s = Some(5);
    h.sched.create_session(r).await.unwrap();
    h.wait_for("idle stop", Duration::from_secs(10), || {
        h.sched.get_session(&sid("bk")).unwrap().state == SessionState::Stopped
    })
    .await;
    let w1 = fleet.worker("w1");
    // Not before backup_after.
    h.sleep(Duration::from_secs(20)).await;
    assert!(w1.backups.lock().is_empty());
    h.wait_for("backup", Duration::from_secs(20), || {
        !w1.backups.lock().is_empty()
    })
    .await;
    // One backup, the session and its VM stay; later passes take no second one.
    h.sleep(Duration::from_secs(120)).await;
    assert_eq!(w1.backups.lock().as_slice(), &["bk".parse().unwrap()]);
    assert_eq!(w1.ops("backup_vm").len(), 1);
    assert_eq!(
        h.sched.get_session(&sid("bk")).unwrap().state,
        SessionState::Stopped
    );
    assert!(w1.has_vm("bk").await);
    // Resumed and stopped again: still one backup per session.
    fleet.exec("w1", "bk").await;
    h.sleep(Duration::from_secs(60)).await;
    assert_eq!(w1.ops("backup_vm").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn stopped_time_does_not_count_toward_ttl_and_exec_resumes() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut cfg = config(1);
    cfg.sessions.prune_after = Duration::from_secs(3600);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("p");
    r.ttl_s = Some(30);
    r.idle_timeout_s = Some(5);
    let s0 = h.sched.create_session(r).await.unwrap();
    h.wait_for("stopped", Duration::from_secs(10), || {
        h.sched.get_session(&sid("p")).unwrap().state == SessionState::Stopped
    })
    .await;
    let stopped_at = h.sched.now_ms();
    // Stopped for two minutes: far beyond the 30 s TTL in wall time.
    h.sleep(Duration::from_secs(120)).await;
    assert_eq!(
        h.sched.get_session(&sid("p")).unwrap().state,
        SessionState::Stopped
    );
    fleet.exec("w1", "p").await;
    h.wait_for("resumed", Duration::from_secs(5), || {
        h.sched.get_session(&sid("p")).unwrap().state == SessionState::Running
    })
    .await;
    let s1 = h.sched.get_session(&sid("p")).unwrap();
    let paused = h.sched.now_ms() - stopped_at;
    assert!(
        s1.expires_ms >= s0.expires_ms + paused - 2000,
        "expires moved by the stopped time: {} vs {} + {paused}",
        s1.expires_ms,
        s0.expires_ms
    );
    // Still alive well past created + 30 s; kept busy, it expires by its (moved) TTL.
    assert!(h.sched.now_ms() > s0.created_ms + 100_000);
    let deadline = tokio::time::Instant::now() + MINUTE;
    while h.sched.get_session(&sid("p")).unwrap().state != SessionState::Released {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ttl after resume"
        );
        if fleet.worker("w1").has_vm("p").await {
            fleet.exec("w1", "p").await;
        }
        h.sleep(Duration::from_secs(2)).await;
    }
    let end = h.events.for_session("p");
    assert_eq!(end.last().unwrap().reason, Some(TerminationReason::Ttl));
    assert!(h.sched.now_ms() >= s1.expires_ms);
}

#[tokio::test(start_paused = true)]
async fn keepalive_extends_the_lifetime() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("k");
    r.ttl_s = Some(10);
    h.sched.create_session(r).await.unwrap();
    h.sleep(Duration::from_secs(8)).await;
    let s = h
        .sched
        .keepalive(&sid("k"), KeepaliveRequest { ttl_s: Some(20) })
        .await
        .unwrap();
    let now = h.sched.now_ms();
    assert!(s.expires_ms >= now + 19_000 && s.expires_ms <= now + 20_000);
    h.sleep(Duration::from_secs(10)).await;
    assert_eq!(
        h.sched.get_session(&sid("k")).unwrap().state,
        SessionState::Running
    );
    // A keepalive without ttl_s renews by the session's TTL (now 20 s).
    let s = h
        .sched
        .keepalive(&sid("k"), KeepaliveRequest::default())
        .await
        .unwrap();
    assert!(s.expires_ms >= h.sched.now_ms() + 19_000);
    // Capped by max_ttl.
    let s = h
        .sched
        .keepalive(
            &sid("k"),
            KeepaliveRequest {
                ttl_s: Some(u64::MAX / 2000),
            },
        )
        .await
        .unwrap();
    assert!(s.expires_ms <= h.sched.now_ms() + h.cfg.sessions.max_ttl.as_millis() as u64);
}

#[tokio::test(start_paused = true)]
async fn release_destroys_now_and_is_idempotent_then_forgets_after_retention() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut cfg = config(1);
    cfg.sessions.retention = Duration::from_secs(30);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("r")).await.unwrap();
    let a = h.sched.release(&sid("r")).await.unwrap();
    assert_eq!(a.state, SessionState::Released);
    assert!(!fleet.worker("w1").has_vm("r").await);
    let b = h.sched.release(&sid("r")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(h.sched.get_session(&sid("r")).unwrap(), a);
    assert_eq!(
        h.sched
            .keepalive(&sid("r"), KeepaliveRequest::default())
            .await
            .unwrap_err()
            .code,
        ErrorCode::Conflict
    );
    // Idempotent create of a released id returns it as it is.
    assert_eq!(h.sched.create_session(req("r")).await.unwrap(), a);
    h.sleep(Duration::from_millis(10)).await;
    assert_eq!(
        h.events.for_session("r").last().unwrap().reason,
        Some(TerminationReason::Released)
    );
    assert!(
        h.sched
            .list_sessions(&Default::default())
            .sessions
            .is_empty()
    );
    // Forgotten after the retention, in memory and in KV.
    h.wait_for("forgotten", MINUTE, || {
        h.sched.get_session(&sid("r")).is_err()
    })
    .await;
    assert!(!h.kv.keys(Table::Sessions).contains(&"r".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn worker_loss_loses_its_sessions_and_refills_elsewhere_then_reconciles_its_return() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    fleet.add("w2", 10);
    let mut cfg = config(4);
    cfg.worker_lost_grace = Duration::from_secs(20);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 4).await;
    // Claim until a session sits on w1.
    let mut on_w1 = None;
    for i in 0..4 {
        let s = h.sched.create_session(req(&format!("l{i}"))).await.unwrap();
        if s.worker_id.as_str() == "w1" {
            on_w1 = Some(s);
            break;
        }
    }
    let s = on_w1.expect("a session on w1");
    h.wait_ready("default", 4).await;

    let w1 = fleet.worker("w1");
    w1.down.store(true, Ordering::SeqCst);
    // Past the heartbeat timeout it is only suspect: its session is still running.
    h.wait_for("w1 suspect", Duration::from_secs(5), || {
        h.sched.live_workers() == vec![wid("w2")]
    })
    .await;
    h.sleep(Duration::from_secs(10)).await;
    assert_eq!(
        h.sched.get_session(&s.session_id).unwrap().state,
        SessionState::Running,
        "a suspect worker's sessions stay running"
    );
    // Lost only past the grace.
    h.wait_for("session lost", Duration::from_secs(15), || {
        h.sched.get_session(&s.session_id).unwrap().state == SessionState::Lost
    })
    .await;
    let ev = h.events.for_session(s.session_id.as_str());
    assert_eq!(
        ev.last().unwrap().reason,
        Some(TerminationReason::WorkerLost)
    );
    // The pool is refilled on w2 only.
    h.wait_for("refilled on w2", MINUTE, || {
        let vms = h.sched.ready_vms(&tname("default"));
        vms.len() == 4 && vms.iter().all(|(_, w)| w.as_str() == "w2")
    })
    .await;
    assert_eq!(h.sched.live_workers(), vec![wid("w2")]);

    // w1 comes back: its leftovers (the lost session's VM, its old pool VMs) are destroyed.
    assert!(!w1.vms().await.is_empty());
    w1.down.store(false, Ordering::SeqCst);
    let w1c = w1.clone();
    let deadline = tokio::time::Instant::now() + MINUTE;
    loop {
        if w1c.vms().await.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "w1 not reconciled");
        h.sleep(Duration::from_millis(100)).await;
    }
    // And nothing on w2 was touched.
    assert!(fleet.worker("w2").vms().await.len() >= 4);
}

#[tokio::test(start_paused = true)]
async fn a_silent_worker_is_suspect_and_comes_back_with_nothing_destroyed() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    fleet.add("w2", 10);
    let mut cfg = config(4);
    cfg.leak_grace = Duration::from_secs(5);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 4).await;
    let mut mine = Vec::new();
    for i in 0..4 {
        let s = h.sched.create_session(req(&format!("b{i}"))).await.unwrap();
        if s.worker_id.as_str() == "w1" {
            mine.push(s.session_id);
        }
    }
    assert!(!mine.is_empty(), "a session on w1");
    h.wait_ready("default", 4).await;
    let before = w1.vms().await;

    // A blip far longer than the heartbeat timeout (but within the grace): heartbeats stop and
    // jobs go unanswered.
    w1.down.store(true, Ordering::SeqCst);
    h.wait_for("w1 suspect", Duration::from_secs(5), || {
        h.sched.live_workers() == vec![wid("w2")]
    })
    .await;
    // Nothing new lands on a suspect worker: claims go to w2.
    for i in 0..3 {
        let s = h.sched.create_session(req(&format!("n{i}"))).await.unwrap();
        assert_eq!(s.worker_id.as_str(), "w2", "placed on a suspect worker");
    }
    h.sleep(Duration::from_secs(20)).await;
    for sid in &mine {
        assert_eq!(
            h.sched.get_session(sid).unwrap().state,
            SessionState::Running
        );
    }

    // Back: healthy again, nothing of it destroyed, no session lost, reconcile resumes only after
    // a fresh inventory (a list_vms sent after its return).
    let ops_before = w1.log.lock().len();
    w1.down.store(false, Ordering::SeqCst);
    h.wait_for("w1 healthy", Duration::from_secs(5), || {
        h.sched.live_workers().len() == 2
    })
    .await;
    h.sleep(Duration::from_secs(15)).await;
    for sid in &mine {
        assert_eq!(
            h.sched.get_session(sid).unwrap().state,
            SessionState::Running
        );
        assert!(w1.has_vm(sid.as_str()).await, "{sid}'s vm destroyed");
    }
    for vm in before.keys() {
        assert!(w1.has_vm(vm.as_str()).await, "{vm} destroyed after a blip");
    }
    let after: Vec<JobOp> = w1.log.lock()[ops_before..].to_vec();
    assert!(
        after
            .iter()
            .any(|op| matches!(op, JobOp::ListVmsPage { .. })),
        "a fresh inventory asked for: {after:?}"
    );
    assert!(
        !after.iter().any(|op| matches!(op, JobOp::DestroyVm { .. })),
        "destroyed after a blip: {after:?}"
    );
    assert!(
        h.events
            .for_session(mine[0].as_str())
            .iter()
            .all(|e| e.reason.is_none())
    );

    // Reconcile does run again: a stray VM on w1 is destroyed.
    use hearth_worker::provider::{VmProvider, VmSpec};
    w1.provider
        .create_vm_with_spec(&"stray".parse().unwrap(), &VmSpec::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + MINUTE;
    while w1.has_vm("stray").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stray vm not destroyed"
        );
        h.sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_draining_worker_gets_no_new_vms() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    fleet.add("w2", 10);
    let h = Harness::start(config(4), fleet.clone()).await;
    h.wait_ready("default", 4).await;
    let creates_before = w1.ops("create_vm_with_spec").len() + w1.ops("rename_vm").len();
    w1.draining.store(true, Ordering::SeqCst);
    h.sleep(Duration::from_secs(2)).await;
    for i in 0..6 {
        let s = h.sched.create_session(req(&format!("d{i}"))).await.unwrap();
        assert_eq!(s.worker_id.as_str(), "w2");
    }
    h.wait_ready("default", 4).await;
    assert_eq!(
        w1.ops("create_vm_with_spec").len() + w1.ops("rename_vm").len(),
        creates_before,
        "work placed on a draining worker"
    );
    // Draining is not silence: it stays healthy (not suspect) while it heartbeats.
    h.sleep(Duration::from_secs(10)).await;
    assert_eq!(h.sched.live_workers().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn spoofed_heartbeats_and_vm_events_change_nothing() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let w2 = fleet.add("w2", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    let s = h.sched.create_session(req("victim")).await.unwrap();
    let (victim_worker, other) = if s.worker_id.as_str() == "w1" {
        (w1.clone(), w2.clone())
    } else {
        (w2.clone(), w1.clone())
    };
    // `other` claims, on its own subject, that the victim's VM was destroyed and that the
    // victim worker has no VMs and is draining.
    let event = hearth_messages::VmEvent {
        worker_id: victim_worker.id.clone(),
        vm_id: "victim".parse().unwrap(),
        state: VmState::Destroyed,
        renamed_from: None,
        reason: Some(TerminationReason::VmFailed),
        at_ms: h.sched.now_ms(),
    };
    assert!(!h.sched.on_vm_event_from(&other.id, event));
    let mut status = victim_worker.status(h.sched.now_ms()).await;
    status.vms.clear();
    status.draining = true;
    status.seq += 1000;
    assert!(!h.sched.on_heartbeat_from(&other.id, status.clone()));
    // And the other way round: a body naming `other` on the victim's subject.
    status.worker_id = other.id.clone();
    assert!(!h.sched.on_heartbeat_from(&victim_worker.id, status));
    h.sleep(Duration::from_secs(15)).await;
    assert_eq!(
        h.sched.get_session(&sid("victim")).unwrap().state,
        SessionState::Running
    );
    assert!(victim_worker.has_vm("victim").await);
    assert_eq!(h.sched.live_workers().len(), 2);
    // A genuine message on its own subject is accepted.
    let own = victim_worker.status(h.sched.now_ms()).await;
    assert!(h.sched.on_heartbeat_from(&victim_worker.id, own));
}

#[tokio::test(start_paused = true)]
async fn huge_wait_ttl_and_idle_values_are_clamped() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let mut cfg = config(1);
    cfg.sessions.max_ttl = Duration::from_secs(3600);
    cfg.sessions.default_ttl = Duration::from_secs(600);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let mut r = req("huge");
    r.wait_ms = Some(u64::MAX);
    r.ttl_s = Some(u64::MAX);
    r.idle_timeout_s = Some(u64::MAX);
    let now = h.sched.now_ms();
    let s = h.sched.create_session(r).await.unwrap();
    assert!(
        s.expires_ms <= now + 3600 * 1000 + 1000,
        "ttl capped at max_ttl_s"
    );
    assert!(s.expires_ms >= now + 3599 * 1000);
    // Another claim with an unbounded wait: no panic, no overflow.
    let mut r = req("huge-cold");
    r.wait_ms = Some(u64::MAX);
    let s = h.sched.create_session(r).await.unwrap();
    assert_eq!(s.state, SessionState::Running);
    // Keepalive with u64::MAX is capped too.
    let s = h
        .sched
        .keepalive(
            &sid("huge"),
            hearth_messages::KeepaliveRequest {
                ttl_s: Some(u64::MAX),
            },
        )
        .await
        .unwrap();
    assert!(s.expires_ms <= h.sched.now_ms() + 3600 * 1000 + 1000);
}

#[tokio::test(start_paused = true)]
async fn placement_prefers_free_capacity_and_spills_on_refusal() {
    let fleet = Fleet::new();
    fleet.add("small", 3);
    fleet.add("big", 8);
    let h = Harness::start(config(0), fleet.clone()).await;
    h.wait_for("built", MINUTE, || {
        h.sched.list_templates().templates[0].snapshot_id.is_some()
    })
    .await;
    h.sleep(Duration::from_secs(2)).await;
    // Cold claims go to the worker with the most free slots.
    let s = h.sched.create_session(req("c1")).await.unwrap();
    assert_eq!(s.worker_id.as_str(), "big");
    // big refuses (503) despite its heartbeats: the claim spills to small.
    fleet.worker("big").refuse.store(true, Ordering::SeqCst);
    let s = h.sched.create_session(req("c2")).await.unwrap();
    assert_eq!(s.worker_id.as_str(), "small");
    assert!(!s.warm);
    // Capacity accounting: fill small to its max_vms, then everything goes to big once it
    // accepts again, and nothing exceeds max_vms.
    fleet.worker("big").refuse.store(false, Ordering::SeqCst);
    for i in 0..8 {
        let _ = h.sched.create_session(req(&format!("f{i}"))).await;
        h.sleep(Duration::from_millis(200)).await;
    }
    assert!(fleet.worker("small").vms().await.len() <= 3);
    assert!(fleet.worker("big").vms().await.len() <= 8);
    let placed = h.sched.list_sessions(&Default::default()).sessions.len();
    assert_eq!(placed, 10, "2 + 8 sessions fit 11 slots");
}

#[tokio::test(start_paused = true)]
async fn pool_vms_spread_and_respect_max_vms() {
    let fleet = Fleet::new();
    fleet.add("a", 2);
    fleet.add("b", 2);
    fleet.add("c", 2);
    let h = Harness::start(config(6), fleet.clone()).await;
    h.wait_ready("default", 6).await;
    for w in fleet.all() {
        assert_eq!(w.vms().await.len(), 2, "{}", w.id);
    }
    // Full fleet: a claim is warm, the refill has nowhere to go and does not overshoot.
    h.sched.create_session(req("x")).await.unwrap();
    h.sleep(Duration::from_secs(10)).await;
    for w in fleet.all() {
        assert!(w.vms().await.len() <= 2);
    }
    assert_eq!(h.sched.ready_count(&tname("default")), 5);
}

#[tokio::test(start_paused = true)]
async fn reconcile_destroys_leaks_and_loses_sessions_whose_vm_vanished() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let mut cfg = config(1);
    cfg.leak_grace = Duration::from_secs(5);
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("v")).await.unwrap();

    // A VM nobody owns appears (e.g. a create whose reply was lost).
    use hearth_worker::provider::{VmProvider, VmSpec};
    w1.provider
        .create_vm_with_spec(&"stray".parse().unwrap(), &VmSpec::default())
        .await
        .unwrap();
    // The session's VM disappears behind the scheduler's back.
    w1.provider.destroy_vm(&"v".parse().unwrap()).await.unwrap();

    h.wait_for("vanished vm -> lost", Duration::from_secs(20), || {
        h.sched.get_session(&sid("v")).unwrap().state == SessionState::Lost
    })
    .await;
    assert_eq!(
        h.events.for_session("v").last().unwrap().reason,
        Some(TerminationReason::VmFailed)
    );
    let deadline = tokio::time::Instant::now() + MINUTE;
    while w1.has_vm("stray").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stray vm not destroyed"
        );
        h.sleep(Duration::from_millis(200)).await;
    }
    // Owned VMs survive reconcile.
    h.wait_ready("default", 1).await;
    let (vm, _) = h.sched.ready_vms(&tname("default"))[0].clone();
    h.sleep(Duration::from_secs(30)).await;
    assert!(w1.has_vm(vm.as_str()).await);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_scheduler_reloads_everything_from_the_store() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    fleet.add("w2", 10);
    let mut h = Harness::start(config(3), fleet.clone()).await;
    h.wait_ready("default", 3).await;
    let a = h.sched.create_session(req("a")).await.unwrap();
    let b = h.sched.create_session(req("b")).await.unwrap();
    h.wait_ready("default", 3).await;
    h.sleep(Duration::from_secs(1)).await;
    let pool_before = h.sched.ready_vms(&tname("default"));
    let restores_before = fleet.ops("create_vm_with_spec").len();

    h.restart().await;
    assert_eq!(h.sched.get_session(&sid("a")).unwrap(), a);
    assert_eq!(h.sched.get_session(&sid("b")).unwrap(), b);
    let mut pool_after = h.sched.ready_vms(&tname("default"));
    let mut pb = pool_before.clone();
    pool_after.sort();
    pb.sort();
    assert_eq!(pool_after, pb);
    h.sleep(Duration::from_secs(20)).await;
    // No rebuild, no extra restores, nothing destroyed as leaked.
    assert_eq!(fleet.ops("snapshot_vm").len(), 1);
    assert_eq!(fleet.ops("create_vm_with_spec").len(), restores_before);
    assert!(
        fleet.ops("destroy_vm").len() <= 1,
        "only the template build vm"
    );
    // Claims keep working (warm), sessions keep running.
    let c = h.sched.create_session(req("c")).await.unwrap();
    assert!(c.warm);
    assert_eq!(
        h.sched.get_session(&sid("a")).unwrap().state,
        SessionState::Running
    );
    assert_eq!(
        h.sched.release(&sid("a")).await.unwrap().state,
        SessionState::Released
    );
}

#[tokio::test(start_paused = true)]
async fn failing_restores_back_off_and_rebuild_the_template_snapshot() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let mut cfg = config(2);
    cfg.restore_failures_before_rebuild = 3;
    let h = Harness::start(cfg, fleet.clone()).await;
    h.wait_ready("default", 2).await;
    let first = h.sched.list_templates().templates[0]
        .snapshot_id
        .clone()
        .unwrap();

    // The snapshot is lost everywhere (corrupt store, wiped disk).
    use hearth_worker::provider::VmProvider;
    w1.provider.delete_snapshot(&first).await.unwrap();
    fleet.objects.lock().clear();
    h.sched.create_session(req("x1")).await.unwrap();
    h.sched.create_session(req("x2")).await.unwrap();

    h.wait_for("rebuilt", Duration::from_secs(120), || {
        h.sched.list_templates().templates[0].snapshot_id.as_ref() != Some(&first)
    })
    .await;
    h.wait_ready("default", 2).await;
    assert_eq!(fleet.ops("snapshot_vm").len(), 2);
    let s = h.sched.create_session(req("x3")).await.unwrap();
    assert!(s.warm);
}

#[tokio::test(start_paused = true)]
async fn a_session_snapshot_becomes_a_template_claimable_on_another_worker() {
    let fleet = Fleet::new();
    // Room for the session and the default pool's VM only.
    fleet.add("w1", 2);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    let s = h.sched.create_session(req("src")).await.unwrap();
    let t = h
        .sched
        .snapshot_session(
            &s.session_id,
            SnapshotSessionRequest {
                template: tname("mine"),
                min_ready: Some(1),
                max_ready: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(t.source_session, Some(sid("src")));
    assert!(t.snapshot_id.is_some());
    assert_eq!(t.min_ready, 1);
    // Same name again: 409.
    let err = h
        .sched
        .snapshot_session(
            &s.session_id,
            SnapshotSessionRequest {
                template: tname("mine"),
                min_ready: None,
                max_ready: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    // A second worker joins; the first is full: the new template's pool lands there, restored
    // from the object store.
    fleet.add("w2", 10);
    h.wait_ready("mine", 1).await;
    let (_, w) = h.sched.ready_vms(&tname("mine"))[0].clone();
    assert_eq!(w.as_str(), "w2");
    let mut r = req("fromsnap");
    r.template = Some(tname("mine"));
    let c = h.sched.create_session(r).await.unwrap();
    assert!(c.warm);
    assert_eq!(c.template.as_str(), "mine");
    assert!(h.kv.keys(Table::Templates).contains(&"mine".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_claim_that_cannot_be_recorded_is_undone() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    // The write is refused; the read-back finds no record: the renamed VM is destroyed, 503.
    h.kv.refuse_next_writes(Table::Sessions, 1);
    let err = h.sched.create_session(req("u")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(
        !fleet.worker("w1").has_vm("u").await,
        "claimed but unrecorded"
    );
    assert!(h.sched.get_session(&sid("u")).is_err());
    assert!(h.kv.keys(Table::Sessions).is_empty());
    h.wait_ready("default", 1).await;
    assert!(h.sched.create_session(req("u")).await.unwrap().warm);
}

#[tokio::test(start_paused = true)]
async fn a_lost_ack_on_the_claim_record_is_resolved_by_reading_it_back() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    // The record is written but its ack is lost: the read-back finds it naming this claim's VM.
    h.kv.lose_next_acks(Table::Sessions, 1);
    let s = h.sched.create_session(req("a")).await.unwrap();
    assert!(s.warm);
    assert_eq!(s.worker_id.as_str(), "w1");
    let w1 = fleet.worker("w1");
    assert!(
        w1.has_vm("a").await,
        "the recorded session's vm was destroyed"
    );
    assert_eq!(h.sched.get_session(&sid("a")).unwrap(), s);
    assert_eq!(h.kv.keys(Table::Sessions), vec!["a".to_owned()]);
    // A retry with the same id returns it without burning another warm VM.
    let renames = fleet.ops("rename_vm").len();
    assert_eq!(h.sched.create_session(req("a")).await.unwrap(), s);
    assert_eq!(fleet.ops("rename_vm").len(), renames);
    // Reconcile keeps it: it is a live session.
    h.sleep(MINUTE).await;
    assert!(w1.has_vm("a").await);
    assert_eq!(
        h.sched.get_session(&sid("a")).unwrap().state,
        SessionState::Running
    );
}

#[tokio::test(start_paused = true)]
async fn a_conflict_with_a_record_naming_another_vm_returns_it_and_destroys_only_this_claims_vm() {
    use hearth_messages::Session;
    use hearth_scheduler::store::{SessionRecord, Store};

    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    // A raced retry (through another leader) recorded `r` on worker w9; this scheduler's memory
    // does not know it yet, so its claim renames a warm VM on w1 and meets a `Conflict`.
    let theirs = SessionRecord {
        session: Session {
            session_id: sid("r"),
            template: tname("default"),
            state: SessionState::Running,
            worker_id: wid("w9"),
            warm: true,
            created_ms: 1,
            expires_ms: 3_600_001,
            last_used_ms: 1,
            labels: Default::default(),
            isolation: None,
            tenant: None,
            paused_ms: None,
            resumed_ms: None,
            pause_uploaded: false,
            pause_upload_bytes: 0,
            unplaced: false,
            detail: None,
        },
        ttl_s: 3600,
        idle_timeout_s: None,
        stopped_ms: None,
        ttl_paused_ms: None,
        stop_activity_ms: None,
        backed_up: false,
        pause_object: false,
        reason: None,
        ended_ms: None,
    };
    Store::new(h.kv.clone())
        .create_session(&theirs)
        .await
        .unwrap();

    let pooled = h.sched.ready_vms(&tname("default"));
    let got = h.sched.create_session(req("r")).await.unwrap();
    assert_eq!(got, theirs.session);
    assert_eq!(w1.ops("rename_vm").len(), 1);
    // Only this claim's renamed VM is destroyed.
    assert!(!w1.has_vm("r").await, "the unrecorded vm survived");
    let destroyed: Vec<_> = w1
        .ops("destroy_vm")
        .into_iter()
        .filter_map(|op| match op {
            JobOp::DestroyVm { vm_id, .. } => Some(vm_id),
            _ => None,
        })
        .collect();
    assert_eq!(
        destroyed.iter().filter(|v| v.as_str() == "r").count(),
        1,
        "{destroyed:?}"
    );
    for (vm, _) in &pooled {
        assert!(!destroyed.contains(vm), "a pooled vm was destroyed: {vm}");
    }
    // A retry returns the recorded session from memory: no rename.
    assert_eq!(h.sched.create_session(req("r")).await.unwrap(), got);
    assert_eq!(w1.ops("rename_vm").len(), 1);
    // Another template under the same id is a conflict, as for any existing session.
    let mut other = req("r");
    other.template = Some(tname("nope"));
    assert_eq!(
        h.sched.create_session(other).await.unwrap_err().code,
        ErrorCode::Conflict
    );
}

#[tokio::test(start_paused = true)]
async fn a_claim_record_that_cannot_be_read_back_is_settled_once_the_store_answers() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(3), fleet.clone()).await;
    h.wait_ready("default", 3).await;
    let w1 = fleet.worker("w1");

    // Written, ack lost, reads failing: the outcome is unknown, so the VM is kept and the
    // client gets 503.
    h.kv.lose_next_acks(Table::Sessions, 1);
    h.kv.set_reads_failing(true);
    let err = h.sched.create_session(req("k")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(w1.has_vm("k").await, "destroyed while its record may exist");
    // A retry while it is unsettled burns no warm VM (its id is owned on w1).
    let renames = fleet.ops("rename_vm").len();
    let retry = h.sched.create_session(req("k")).await;
    assert!(retry.is_err(), "{retry:?}");
    assert_eq!(fleet.ops("rename_vm").len(), renames);

    // Refused, reads failing: kept until the store answers, then destroyed (no record).
    h.kv.refuse_next_writes(Table::Sessions, 1);
    let err = h.sched.create_session(req("g")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(w1.has_vm("g").await);

    h.kv.set_reads_failing(false);
    h.wait_for("settled", MINUTE, || h.sched.get_session(&sid("k")).is_ok())
        .await;
    h.sleep(Duration::from_secs(5)).await;
    assert!(w1.has_vm("k").await);
    assert!(!w1.has_vm("g").await, "an unrecorded claim's vm survived");
    assert!(h.sched.get_session(&sid("g")).is_err());
    let k = h.sched.get_session(&sid("k")).unwrap();
    assert_eq!(k.state, SessionState::Running);
    let renames = fleet.ops("rename_vm").len();
    assert_eq!(h.sched.create_session(req("k")).await.unwrap(), k);
    assert_eq!(fleet.ops("rename_vm").len(), renames);
    // After a reconcile pass nothing leaked and nothing of `k` was lost.
    h.sleep(MINUTE).await;
    assert!(w1.has_vm("k").await);
    assert!(!w1.has_vm("g").await);
}

#[tokio::test(start_paused = true)]
async fn claims_wait_for_a_template_that_is_still_building() {
    let fleet = Fleet::new();
    fleet.add_with(
        "w1",
        10,
        FakeConfig::default().with_latency(FakeOp::Create, Duration::from_secs(3)),
    );
    let h = Harness::start(config(0), fleet.clone()).await;
    let mut quick = req("q");
    quick.wait_ms = Some(500);
    let err = h.sched.create_session(quick).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(err.message.contains("being built"), "{err}");
    let mut patient = req("p");
    patient.wait_ms = Some(20_000);
    let s = h.sched.create_session(patient).await.unwrap();
    assert!(!s.warm);
}

#[tokio::test(start_paused = true)]
async fn a_dead_pool_vm_is_skipped_on_claim() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    let (oldest, _) = h.sched.ready_vms(&tname("default"))[0].clone();
    // The oldest pooled VM dies between heartbeats.
    use hearth_worker::provider::VmProvider;
    w1.provider.destroy_vm(&oldest).await.unwrap();
    let s = h.sched.create_session(req("skip")).await.unwrap();
    assert!(s.warm, "served by the next ready vm");
    assert!(w1.has_vm("skip").await);
}

#[tokio::test(start_paused = true)]
async fn every_metric_is_emitted() {
    let handle = hearth_scheduler::metrics::builder()
        .unwrap()
        .install_recorder()
        .unwrap();
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let w2 = fleet.add("w2", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    hearth_scheduler::metrics::describe();
    // As the binary does at start: the tenant series exist before any tenant shows up.
    hearth_scheduler::metrics::zero_tenants(std::iter::empty());
    h.wait_ready("default", 2).await;
    h.sched.create_session(req("m1")).await.unwrap();
    let mut r = req("m2");
    r.ttl_s = Some(1);
    h.sched.create_session(r).await.unwrap();
    h.sched.release(&sid("m1")).await.unwrap();
    // A failed restore and a leak.
    fleet.worker("w1").refuse.store(true, Ordering::SeqCst);
    w2.refuse.store(true, Ordering::SeqCst);
    h.sleep(Duration::from_secs(3)).await;
    fleet.worker("w1").refuse.store(false, Ordering::SeqCst);
    w2.refuse.store(false, Ordering::SeqCst);
    use hearth_worker::provider::{VmProvider, VmSpec};
    w2.provider
        .create_vm_with_spec(&"leak".parse().unwrap(), &VmSpec::default())
        .await
        .unwrap();
    h.sleep(Duration::from_secs(20)).await;
    let text = handle.render();
    for name in hearth_scheduler::metrics::ALL {
        if *name == hearth_scheduler::metrics::SCHEDULER_LEADER {
            // Set by `run` when it holds the lease, which this harness does not take: checked in
            // nats.rs (the_lease_holder_reports_itself_leader).
            continue;
        }
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        text.contains("hearth_claim_duration_seconds_bucket"),
        "histograms, not summaries"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_evicts_a_session_vm_ends_the_session_with_its_reason() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let h = Harness::start(config(1), fleet.clone()).await;
    h.wait_ready("default", 1).await;
    h.sched.create_session(req("ev")).await.unwrap();
    use hearth_worker::provider::VmProvider;
    w1.provider
        .destroy_vm(&"ev".parse().unwrap())
        .await
        .unwrap();
    h.sched.on_vm_event(hearth_messages::VmEvent {
        worker_id: wid("w1"),
        vm_id: "ev".parse().unwrap(),
        state: VmState::Destroyed,
        renamed_from: None,
        reason: Some(TerminationReason::Evicted),
        at_ms: h.sched.now_ms(),
    });
    h.wait_for("evicted", Duration::from_secs(1), || {
        h.sched.get_session(&sid("ev")).unwrap().state == SessionState::Released
    })
    .await;
    h.sleep(Duration::from_millis(10)).await;
    assert_eq!(
        h.events.for_session("ev").last().unwrap().reason,
        Some(TerminationReason::Evicted)
    );
}

#[tokio::test(start_paused = true)]
async fn a_draining_worker_gets_no_new_vms_and_its_pool_moves() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    fleet.add("w2", 10);
    let h = Harness::start(config(4), fleet.clone()).await;
    h.wait_ready("default", 4).await;
    fleet.worker("w1").draining.store(true, Ordering::SeqCst);
    h.wait_for("pool moved to w2", MINUTE, || {
        let vms = h.sched.ready_vms(&tname("default"));
        vms.len() == 4 && vms.iter().all(|(_, w)| w.as_str() == "w2")
    })
    .await;
    for i in 0..6 {
        let s = h.sched.create_session(req(&format!("d{i}"))).await.unwrap();
        assert_eq!(s.worker_id.as_str(), "w2");
    }
}

#[tokio::test(start_paused = true)]
async fn a_wedged_worker_costs_a_claim_one_rename_timeout_at_most() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    // Both ready VMs sit on w1, which now accepts jobs but never answers.
    fleet.add("w2", 10);
    fleet.worker("w1").hang.store(true, Ordering::SeqCst);
    h.sleep(Duration::from_secs(2)).await;
    let t0 = tokio::time::Instant::now();
    let s = h.sched.create_session(req("h1")).await.unwrap();
    let took = t0.elapsed();
    // One rename timeout on w1, then w1 is skipped (its second ready VM too): served on w2
    // (by a VM the refill restored there meanwhile, or cold).
    assert_eq!(s.worker_id.as_str(), "w2");
    assert!(took >= h.cfg.jobs.rename, "{took:?}");
    assert!(
        took <= h.cfg.jobs.rename + Duration::from_millis(100),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn changing_a_template_rebuilds_it_and_replaces_its_pool() {
    let fleet = Fleet::new();
    fleet.add("w1", 10);
    let kv = std::sync::Arc::new(hearth_scheduler::store::MemKv::new());
    let h = Harness::start_with(config(2), fleet.clone(), kv.clone()).await;
    h.wait_ready("default", 2).await;
    let old_vms = h.sched.ready_vms(&tname("default"));
    let old_snap = h.sched.list_templates().templates[0].snapshot_id.clone();
    h.sched.shutdown(Duration::from_millis(1)).await;
    drop(h);

    let mut cfg = config(2);
    cfg.templates[0].bootstrap = Some(vec!["true".into()]);
    let h = Harness::start_with(cfg, fleet.clone(), kv).await;
    h.wait_for("rebuilt", MINUTE, || {
        h.sched.list_templates().templates[0].snapshot_id != old_snap
    })
    .await;
    h.wait_for("pool replaced", MINUTE, || {
        let vms = h.sched.ready_vms(&tname("default"));
        vms.len() == 2 && vms.iter().all(|v| !old_vms.contains(v))
    })
    .await;
    h.sleep(Duration::from_secs(1)).await;
    for (vm, _) in &old_vms {
        assert!(
            !fleet.worker("w1").has_vm(vm.as_str()).await,
            "{vm} not retired"
        );
    }
    let builds: Vec<_> = fleet
        .ops("create_vm_with_spec")
        .into_iter()
        .filter(|(_, op)| matches!(op, JobOp::CreateVmWithSpec { spec, .. } if spec.bootstrap.is_some()))
        .collect();
    assert_eq!(builds.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_busy_vm_is_never_idle_stopped() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let h = Harness::start(config(2), fleet.clone()).await;
    h.wait_ready("default", 2).await;
    // One idle timeout well above the heartbeat interval, one at it.
    for (name, idle_s) in [("long-cmd", 5), ("short-idle", 1)] {
        let mut r = req(name);
        r.idle_timeout_s = Some(idle_s);
        h.sched.create_session(r).await.unwrap();
        // A long command holds the VM: its activity stamp does not move while it runs.
        w1.set_busy(name, true);
    }

    h.sleep(MINUTE).await;
    for name in ["long-cmd", "short-idle"] {
        let s = h.sched.get_session(&sid(name)).unwrap();
        assert_eq!(s.state, SessionState::Running, "{name} stopped while busy");
        assert!(
            s.last_used_ms + 2000 >= h.sched.now_ms(),
            "{name}: busy counts as activity ({} vs {})",
            s.last_used_ms,
            h.sched.now_ms()
        );
        assert_eq!(
            w1.vms().await.get(&name.parse().unwrap()),
            Some(&VmState::Running)
        );
    }
    // Heartbeats late by more than the 1 s idle timeout (but not lost): the last one said busy.
    w1.mute.store(true, Ordering::SeqCst);
    h.sleep(Duration::from_millis(2500)).await;
    w1.mute.store(false, Ordering::SeqCst);
    h.sleep(Duration::from_secs(1)).await;
    assert!(w1.ops("stop_vm").is_empty());

    // The command ends: the idle timer runs from then, and the sessions stop.
    let freed = h.sched.now_ms();
    for name in ["long-cmd", "short-idle"] {
        w1.set_busy(name, false);
    }
    h.sleep(Duration::from_secs(3)).await;
    assert_eq!(
        h.sched.get_session(&sid("long-cmd")).unwrap().state,
        SessionState::Running,
        "idle only from the end of the command"
    );
    h.wait_for("idle stops", Duration::from_secs(10), || {
        ["long-cmd", "short-idle"]
            .iter()
            .all(|n| h.sched.get_session(&sid(n)).unwrap().state == SessionState::Stopped)
    })
    .await;
    assert!(h.sched.now_ms() >= freed + 4000);
}

/// The template records in the store.
async fn stored_templates(
    kv: &std::sync::Arc<hearth_scheduler::store::MemKv>,
) -> Vec<hearth_scheduler::store::TemplateRecord> {
    hearth_scheduler::store::Store::new(kv.clone())
        .load_all()
        .await
        .unwrap()
        .templates
}

fn deletes(fleet: &Fleet) -> Vec<(hearth_messages::WorkerId, hearth_messages::SnapshotId, bool)> {
    fleet
        .ops("delete_snapshot")
        .into_iter()
        .map(|(w, op)| match op {
            JobOp::DeleteSnapshot {
                snapshot_id,
                unpublish,
            } => (w, snapshot_id, unpublish),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Starts a scheduler over `kv` with the default template, then restarts it with the template's
/// bootstrap changed (which rebuilds its snapshot). Returns the new harness and the old snapshot.
async fn rebuild(
    fleet: &std::sync::Arc<Fleet>,
    kv: &std::sync::Arc<hearth_scheduler::store::MemKv>,
) -> (Harness, hearth_messages::SnapshotId) {
    let h = Harness::start_with(config(2), fleet.clone(), kv.clone()).await;
    h.wait_ready("default", 2).await;
    let old = h.sched.list_templates().templates[0]
        .snapshot_id
        .clone()
        .unwrap();
    h.sched.shutdown(Duration::from_millis(1)).await;
    drop(h);
    let mut cfg = config(2);
    cfg.templates[0].bootstrap = Some(vec!["true".into()]);
    let h = Harness::start_with(cfg, fleet.clone(), kv.clone()).await;
    h.wait_for("rebuilt", MINUTE, || {
        h.sched.list_templates().templates[0].snapshot_id.as_ref() != Some(&old)
    })
    .await;
    (h, old)
}

#[tokio::test(start_paused = true)]
async fn a_rebuild_deletes_the_replaced_snapshot_on_every_worker_and_unpublishes_it_once() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let w2 = fleet.add("w2", 10);
    let kv = std::sync::Arc::new(hearth_scheduler::store::MemKv::new());
    let (h, old) = rebuild(&fleet, &kv).await;
    // Both workers held the old snapshot (one built it, the other fetched it for its pool VM).
    assert!(w1.has_snapshot(&old).await && w2.has_snapshot(&old).await);
    assert!(fleet.objects.lock().contains_key(&old));
    // Retired in the same write that replaced it.
    let rec = &stored_templates(&kv).await[0];
    assert_eq!(rec.retired_snapshots, vec![old.clone()]);
    let new = rec.template.snapshot_id.clone().unwrap();

    // Not within the grace for cold restores that read the old snapshot before the rebuild.
    h.sleep(Duration::from_secs(30)).await;
    assert!(deletes(&fleet).is_empty(), "deleted within the grace");
    assert!(w1.has_snapshot(&old).await);

    h.wait_for("old snapshot deleted everywhere", 2 * MINUTE, || {
        !fleet.objects.lock().contains_key(&old) && deletes(&fleet).len() >= 2
    })
    .await;
    h.sleep(Duration::from_secs(1)).await;
    assert!(!w1.has_snapshot(&old).await && !w2.has_snapshot(&old).await);
    let sent = deletes(&fleet);
    assert!(sent.iter().all(|(_, s, _)| *s == old), "{sent:?}");
    let workers: HashSet<_> = sent.iter().map(|(w, ..)| w.clone()).collect();
    assert_eq!(workers.len(), 2, "every worker: {sent:?}");
    assert_eq!(
        sent.iter().filter(|(.., unpublish)| *unpublish).count(),
        1,
        "unpublished once: {sent:?}"
    );
    // The replacement is untouched and serves warm claims.
    assert!(fleet.objects.lock().contains_key(&new));
    h.wait_ready("default", 2).await;
    assert!(h.sched.create_session(req("after")).await.unwrap().warm);

    // Done: the record forgets it, and a restarted scheduler does not delete again.
    let deadline = tokio::time::Instant::now() + MINUTE;
    while !stored_templates(&kv).await[0].retired_snapshots.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "record not updated");
        h.sleep(Duration::from_millis(100)).await;
    }
    let mut h = h;
    h.restart().await;
    h.sleep(3 * MINUTE).await;
    assert_eq!(deletes(&fleet).len(), sent.len());
}

#[tokio::test(start_paused = true)]
async fn snapshot_deletion_is_retried_until_every_worker_confirms_even_across_a_restart() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 10);
    let w2 = fleet.add("w2", 10);
    let kv = std::sync::Arc::new(hearth_scheduler::store::MemKv::new());
    let (mut h, old) = rebuild(&fleet, &kv).await;
    w2.fail_deletes.store(true, Ordering::SeqCst);

    h.wait_for("deleted where it can be", 2 * MINUTE, || {
        !fleet.objects.lock().contains_key(&old)
    })
    .await;
    h.sleep(MINUTE).await;
    assert!(!w1.has_snapshot(&old).await);
    assert!(w2.has_snapshot(&old).await);
    let tries = deletes(&fleet)
        .iter()
        .filter(|(w, ..)| w.as_str() == "w2")
        .count();
    assert!(tries >= 2, "retried: {tries}");
    assert_eq!(
        stored_templates(&kv).await[0].retired_snapshots,
        vec![old.clone()],
        "still pending"
    );

    // A restarted scheduler still knows, and finishes once the worker cooperates.
    h.restart().await;
    w2.fail_deletes.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + 5 * MINUTE;
    while w2.has_snapshot(&old).await
        || !stored_templates(&kv).await[0].retired_snapshots.is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "never finished");
        h.sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_release_at_full_capacity_frees_its_slot_before_the_next_heartbeat() {
    let fleet = Fleet::new();
    let w1 = fleet.add("w1", 2);
    let h = Harness::start(config(0), fleet.clone()).await;
    h.sched.create_session(req("a")).await.unwrap();
    h.sched.create_session(req("b")).await.unwrap();
    // Heartbeats count both VMs: the worker is full.
    h.sleep(Duration::from_secs(2)).await;
    let err = h.sched.create_session(req("c")).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity, "{err}");
    // No heartbeat from here on: the slot must be credited by the destroy's answer.
    w1.mute.store(true, Ordering::SeqCst);
    let seq = w1.seq.load(Ordering::SeqCst);
    h.sched.release(&sid("a")).await.unwrap();
    let c = h.sched.create_session(req("c")).await.unwrap();
    assert_eq!(c.worker_id.as_str(), "w1");
    assert!(w1.has_vm("c").await);
    assert_eq!(w1.seq.load(Ordering::SeqCst), seq, "a heartbeat was sent");
}
