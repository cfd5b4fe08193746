//! The scheduler's Prometheus metrics: names, descriptions, histogram buckets and the exporter.
//! Names follow `hearth_<thing>_<unit>`: `_total` for counters, `_seconds` for durations.

use std::net::SocketAddr;

use hearth_messages::TemplateName;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Claims by `template`, `launch_type` (warm, cold, none) and `result` (ok, no_capacity,
/// not_found, conflict, bad_request, error).
pub const CLAIMS_TOTAL: &str = "hearth_claims_total";
/// Claim latency by `template` and `launch_type` (successful claims).
pub const CLAIM_DURATION_SECONDS: &str = "hearth_claim_duration_seconds";
/// Ready pooled VMs by `template`.
pub const POOL_READY: &str = "hearth_pool_ready";
/// Pooled VMs being restored by `template`.
pub const POOL_RESTORING: &str = "hearth_pool_restoring";
/// The ready target (`min_ready`) by `template`.
pub const POOL_TARGET: &str = "hearth_pool_target";
/// Share of successful claims served warm since the scheduler started, by `template`.
pub const WARM_HIT_RATIO: &str = "hearth_warm_hit_ratio";
/// Time from a pool dropping below its target until it is back at it, by `template`.
pub const REFILL_DURATION_SECONDS: &str = "hearth_refill_duration_seconds";
/// Time one restore job took (pool refill or cold claim), by `template`.
pub const RESTORE_DURATION_SECONDS: &str = "hearth_restore_duration_seconds";
/// Failed restores by `template` and `reason` (no_capacity, unreachable, timeout, error).
pub const RESTORE_FAILURES_TOTAL: &str = "hearth_restore_failures_total";
/// Template snapshot builds by `template` and `result` (ok, error).
pub const TEMPLATE_BUILDS_TOTAL: &str = "hearth_template_builds_total";
/// Sessions by `state` (running, stopped, released, lost).
pub const SESSIONS: &str = "hearth_sessions";
/// Ended sessions by `reason`.
pub const SESSION_TERMINATIONS_TOTAL: &str = "hearth_session_terminations_total";
/// Healthy workers (heartbeating; neither suspect nor lost).
pub const WORKERS_UP: &str = "hearth_workers_up";
/// Workers silent past `heartbeat_timeout` but not yet past `worker_lost_grace`.
pub const WORKERS_SUSPECT: &str = "hearth_workers_suspect";
/// Heartbeats and VM events dropped because the body names another worker than the subject,
/// by `kind` (heartbeat, vm_event).
pub const SPOOFED_MESSAGES_TOTAL: &str = "hearth_spoofed_messages_total";
/// Leader terms lost (lease taken over or not renewable in time).
pub const LEASE_LOST_TOTAL: &str = "hearth_lease_lost_total";
/// Leaked VMs the reconcile loop destroyed.
pub const LEAKED_VMS_DESTROYED_TOTAL: &str = "hearth_leaked_vms_destroyed_total";
/// Duration of one reconcile pass (every worker's inventory against the state).
pub const RECONCILE_PASS_SECONDS: &str = "hearth_reconcile_pass_seconds";
/// Duration of paging one worker's whole inventory in (its digest did not match).
pub const INVENTORY_FETCH_SECONDS: &str = "hearth_inventory_fetch_seconds";
/// 1 while this scheduler holds the leader lease.
pub const SCHEDULER_LEADER: &str = "hearth_scheduler_leader";

/// Live sessions per tenant (`tenant` = a configured tenant, `_other` or `_operator`).
pub const TENANT_SESSIONS: &str = "hearth_tenant_sessions";
/// Claims per tenant and result.
pub const TENANT_CLAIMS_TOTAL: &str = "hearth_tenant_claims_total";
/// Requests refused because a tenant's quota was exhausted, by tenant and quota.
pub const TENANT_QUOTA_REJECTIONS_TOTAL: &str = "hearth_tenant_quota_rejections_total";
/// Bytes of a tenant's template snapshots in the object store.
pub const TENANT_SNAPSHOT_BYTES: &str = "hearth_tenant_snapshot_bytes";
/// Warm (ready and restoring) pooled VMs of a tenant's templates.
pub const TENANT_POOL_VMS: &str = "hearth_tenant_pool_vms";

/// Duration of `sessions.<sid>.fork` (live snapshot and every copy ready), by `result`
/// (`ok`, `partial`, `failed`).
pub const FORK_DURATION_SECONDS: &str = "hearth_fork_duration_seconds";

/// Paused-state uploads (`pause_upload`) by `result` (`ok`, `failed`, `over_quota`,
/// `unsupported`).
pub const PAUSE_UPLOADS_TOTAL: &str = "hearth_pause_uploads_total";
/// Duration of a successful paused-state upload (the worker's export and the object store put).
pub const PAUSE_UPLOAD_DURATION_SECONDS: &str = "hearth_pause_upload_duration_seconds";
/// Bytes of paused state uploaded.
pub const PAUSE_UPLOAD_BYTES_TOTAL: &str = "hearth_pause_upload_bytes_total";
/// Paused sessions of lost workers resumed elsewhere, by `result` (`ok`, `lost`: the state
/// could not be restored, `retry`: no worker could take it now).
pub const PAUSE_MOVES_TOTAL: &str = "hearth_pause_moves_total";
/// Duration of a successful resume on another worker (download, verify, restore, resume).
pub const PAUSE_MOVE_DURATION_SECONDS: &str = "hearth_pause_move_duration_seconds";

/// The quota names of [`TENANT_QUOTA_REJECTIONS_TOTAL`].
pub const QUOTAS: &[&str] = &[
    "sessions",
    "create_rate",
    "templates",
    "ready_per_template",
    "ready_total",
    "snapshot_bytes",
];

/// Every metric the scheduler emits (for dashboards and the test that checks they exist).
pub const ALL: &[&str] = &[
    CLAIMS_TOTAL,
    CLAIM_DURATION_SECONDS,
    POOL_READY,
    POOL_RESTORING,
    POOL_TARGET,
    WARM_HIT_RATIO,
    REFILL_DURATION_SECONDS,
    RESTORE_DURATION_SECONDS,
    RESTORE_FAILURES_TOTAL,
    TEMPLATE_BUILDS_TOTAL,
    SESSIONS,
    SESSION_TERMINATIONS_TOTAL,
    WORKERS_UP,
    WORKERS_SUSPECT,
    SPOOFED_MESSAGES_TOTAL,
    LEASE_LOST_TOTAL,
    LEAKED_VMS_DESTROYED_TOTAL,
    RECONCILE_PASS_SECONDS,
    INVENTORY_FETCH_SECONDS,
    SCHEDULER_LEADER,
    TENANT_SESSIONS,
    TENANT_CLAIMS_TOTAL,
    TENANT_QUOTA_REJECTIONS_TOTAL,
    TENANT_SNAPSHOT_BYTES,
    TENANT_POOL_VMS,
    FORK_DURATION_SECONDS,
    PAUSE_UPLOADS_TOTAL,
    PAUSE_UPLOAD_DURATION_SECONDS,
    PAUSE_UPLOAD_BYTES_TOTAL,
    PAUSE_MOVES_TOTAL,
    PAUSE_MOVE_DURATION_SECONDS,
];

/// Buckets of the claim latency histogram: a warm claim is about a millisecond, a cold one
/// seconds.
pub const CLAIM_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of restore and refill histograms.
pub const RESTORE_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Registers descriptions (shown as `# HELP`).
pub fn describe() {
    describe_counter!(CLAIMS_TOTAL, "Claims by template, launch type and result");
    describe_histogram!(
        CLAIM_DURATION_SECONDS,
        Unit::Seconds,
        "Latency of successful claims"
    );
    describe_gauge!(POOL_READY, "Ready pooled VMs");
    describe_gauge!(POOL_RESTORING, "Pooled VMs being restored");
    describe_gauge!(POOL_TARGET, "Ready target (min_ready) of the pool");
    describe_gauge!(
        WARM_HIT_RATIO,
        "Share of successful claims served from the warm pool since start"
    );
    describe_histogram!(
        REFILL_DURATION_SECONDS,
        Unit::Seconds,
        "Time from a pool dropping below target until it is back at target"
    );
    describe_histogram!(
        RESTORE_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one successful restore job"
    );
    describe_counter!(RESTORE_FAILURES_TOTAL, "Failed restore jobs");
    describe_counter!(TEMPLATE_BUILDS_TOTAL, "Template snapshot builds");
    describe_gauge!(SESSIONS, "Sessions by state");
    describe_counter!(SESSION_TERMINATIONS_TOTAL, "Ended sessions by reason");
    describe_gauge!(WORKERS_UP, "Healthy workers (heartbeating)");
    describe_gauge!(
        WORKERS_SUSPECT,
        "Workers silent past heartbeat_timeout, not yet lost"
    );
    describe_counter!(
        SPOOFED_MESSAGES_TOTAL,
        "Heartbeats and VM events dropped: the body names another worker than the subject"
    );
    for kind in ["heartbeat", "vm_event"] {
        metrics::counter!(SPOOFED_MESSAGES_TOTAL, "kind" => kind).absolute(0);
    }
    describe_counter!(
        LEASE_LOST_TOTAL,
        "Leader terms that ended by losing the lease"
    );
    metrics::counter!(LEASE_LOST_TOTAL).absolute(0);
    describe_counter!(
        LEAKED_VMS_DESTROYED_TOTAL,
        "VMs destroyed by reconcile because nothing owned them"
    );
    describe_gauge!(SCHEDULER_LEADER, "1 while this scheduler holds the lease");
    describe_histogram!(
        RECONCILE_PASS_SECONDS,
        Unit::Seconds,
        "Duration of one reconcile pass over every worker's inventory"
    );
    describe_histogram!(
        INVENTORY_FETCH_SECONDS,
        Unit::Seconds,
        "Duration of paging one worker's whole inventory in"
    );
    metrics::counter!(LEAKED_VMS_DESTROYED_TOTAL).increment(0);
    let _ = metrics::histogram!(FORK_DURATION_SECONDS, "result" => "ok");
    for reason in hearth_messages::TerminationReason::ALL {
        metrics::counter!(SESSION_TERMINATIONS_TOTAL, "reason" => reason.as_str()).increment(0);
    }
    describe_gauge!(TENANT_SESSIONS, "Live sessions per tenant");
    describe_histogram!(
        FORK_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of a session fork until every copy is ready, by result"
    );
    describe_counter!(TENANT_CLAIMS_TOTAL, "Claims per tenant and result");
    describe_counter!(
        TENANT_QUOTA_REJECTIONS_TOTAL,
        "Requests refused with 429 because a tenant quota was exhausted"
    );
    describe_gauge!(
        TENANT_SNAPSHOT_BYTES,
        Unit::Bytes,
        "Bytes of a tenant's template snapshots"
    );
    describe_gauge!(TENANT_POOL_VMS, "Warm pooled VMs of a tenant's templates");
    describe_counter!(
        PAUSE_UPLOADS_TOTAL,
        "Paused-state uploads (pause_upload) by result"
    );
    describe_histogram!(
        PAUSE_UPLOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of a successful paused-state upload"
    );
    describe_counter!(PAUSE_UPLOAD_BYTES_TOTAL, "Bytes of paused state uploaded");
    describe_counter!(
        PAUSE_MOVES_TOTAL,
        "Paused sessions of lost workers resumed on another worker, by result"
    );
    describe_histogram!(
        PAUSE_MOVE_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of a successful resume of a paused session on another worker"
    );
    for result in ["ok", "failed", "over_quota", "unsupported"] {
        metrics::counter!(PAUSE_UPLOADS_TOTAL, "result" => result).increment(0);
    }
    for result in ["ok", "lost", "retry"] {
        metrics::counter!(PAUSE_MOVES_TOTAL, "result" => result).increment(0);
    }
    metrics::counter!(PAUSE_UPLOAD_BYTES_TOTAL).increment(0);
    let _ = metrics::histogram!(PAUSE_UPLOAD_DURATION_SECONDS);
    let _ = metrics::histogram!(PAUSE_MOVE_DURATION_SECONDS);
}

/// Exports the per-tenant series for every label value that can occur (the configured tenants,
/// `_other` and `_operator`), so dashboards and rate alerts have data from the first scrape.
/// Counters keep their value (registered with `increment(0)`); gauges start at zero.
pub fn zero_tenants<'a>(configured: impl Iterator<Item = &'a str>) {
    let mut labels: Vec<String> = configured.map(str::to_owned).collect();
    labels.push("_other".into());
    labels.push("_operator".into());
    for t in labels {
        metrics::gauge!(TENANT_SESSIONS, "tenant" => t.clone()).set(0.0);
        metrics::gauge!(TENANT_SNAPSHOT_BYTES, "tenant" => t.clone()).set(0.0);
        metrics::gauge!(TENANT_POOL_VMS, "tenant" => t.clone()).set(0.0);
        for result in ["ok", "quota", "not_found", "no_capacity", "error"] {
            metrics::counter!(TENANT_CLAIMS_TOTAL, "tenant" => t.clone(), "result" => result)
                .increment(0);
        }
        for quota in QUOTAS {
            metrics::counter!(TENANT_QUOTA_REJECTIONS_TOTAL, "tenant" => t.clone(), "quota" => *quota)
                .increment(0);
        }
    }
}

/// Registers the per-template counters and histograms (at zero if new; `increment(0)` never
/// resets one) for the configured templates, so the
/// first scrape has every series the dashboard and the alerts query.
pub fn register_templates<'a>(templates: impl IntoIterator<Item = &'a TemplateName>) {
    for template in templates {
        let t = template.to_string();
        for launch in ["warm", "cold"] {
            metrics::counter!(CLAIMS_TOTAL, "template" => t.clone(), "launch_type" => launch,
                "result" => "ok")
            .increment(0);
            let _ = metrics::histogram!(CLAIM_DURATION_SECONDS, "template" => t.clone(),
                "launch_type" => launch);
        }
        let _ = metrics::histogram!(REFILL_DURATION_SECONDS, "template" => t.clone());
        let _ = metrics::histogram!(RESTORE_DURATION_SECONDS, "template" => t.clone());
        metrics::counter!(TEMPLATE_BUILDS_TOTAL, "template" => t, "result" => "ok").increment(0);
    }
}

/// A Prometheus builder with the scheduler's histogram buckets (histograms, not summaries).
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CLAIM_DURATION_SECONDS.into()), CLAIM_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(REFILL_DURATION_SECONDS.into()),
            RESTORE_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(RESTORE_DURATION_SECONDS.into()),
            RESTORE_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(FORK_DURATION_SECONDS.into()), RESTORE_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(PAUSE_UPLOAD_DURATION_SECONDS.into()),
            RESTORE_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(PAUSE_MOVE_DURATION_SECONDS.into()),
            RESTORE_BUCKETS,
        )?
        // Anything else timed (e.g. the NATS client's) gets the claim buckets.
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), CLAIM_BUCKETS)
}

/// Installs the global recorder with an HTTP `/metrics` listener on `listen`.
pub fn install_exporter(listen: SocketAddr) -> Result<(), BuildError> {
    builder()?.with_http_listener(listen).install()?;
    describe();
    Ok(())
}
