//! The worker's Prometheus metrics: names in one place, histogram buckets chosen per metric, and the
//! exporter installed by the binary.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Lifecycle jobs by `op` and `result` (`ok` or the error code).
pub const JOBS_TOTAL: &str = "hearth_worker_jobs_total";
/// Job duration by `op`.
pub const JOB_DURATION: &str = "hearth_worker_job_duration_seconds";
/// Execs by `result`: `ok` (exit 0), `nonzero`, `timeout`, `error`.
pub const EXECS_TOTAL: &str = "hearth_exec_total";
/// Command wall time.
pub const EXEC_DURATION: &str = "hearth_exec_duration_seconds";
/// Time an exec or files request waited for its VM's lock.
pub const EXEC_LOCK_WAIT: &str = "hearth_exec_lock_wait_seconds";
/// Output bytes dropped because of `max_output_bytes` or the NATS payload limit.
pub const EXEC_TRUNCATED_TOTAL: &str = "hearth_exec_truncated_total";
/// Files requests by `op` (`put`/`get`) and `result`.
pub const FILES_TOTAL: &str = "hearth_files_total";
/// VMs held, by `state`.
pub const VMS: &str = "hearth_worker_vms";
/// Most VMs this worker holds.
pub const CAPACITY: &str = "hearth_worker_capacity_vms";
/// VMs evicted to make room.
pub const EVICTIONS_TOTAL: &str = "hearth_worker_evictions_total";
/// Snapshot duration (capture, plus upload when published).
pub const SNAPSHOT_DURATION: &str = "hearth_worker_snapshot_duration_seconds";
/// Bytes of snapshots taken.
pub const SNAPSHOT_BYTES_TOTAL: &str = "hearth_worker_snapshot_bytes_total";
/// Restore duration (including fetching the snapshot from the object store when needed).
pub const RESTORE_DURATION: &str = "hearth_worker_restore_duration_seconds";
/// Snapshot bytes fetched from the object store.
pub const SNAPSHOT_FETCH_BYTES_TOTAL: &str = "hearth_worker_snapshot_fetch_bytes_total";
/// Heartbeats published.
pub const HEARTBEATS_TOTAL: &str = "hearth_worker_heartbeats_total";
/// Requests answered with 400 because they could not be decoded or were invalid.
pub const BAD_REQUESTS_TOTAL: &str = "hearth_worker_bad_requests_total";
/// Jobs refused (409) because they carry an older lease revision than one already seen: sent by a
/// deposed scheduler.
pub const JOBS_FENCED_TOTAL: &str = "hearth_worker_jobs_fenced_total";
/// Exec and file requests refused (429) because their VM already holds `max_queued_per_vm`
/// requests or `max_queued_bytes_per_vm` payload bytes, by `endpoint`.
pub const QUEUE_REJECTIONS_TOTAL: &str = "hearth_worker_queue_rejections_total";
/// Data-plane requests answered 404 because they came from a tenant that does not own the session.
pub const FOREIGN_REQUESTS_TOTAL: &str = "hearth_worker_foreign_requests_total";
/// Time to pause a VM (to disk for the VMM providers), by `result`.
pub const PAUSE_DURATION: &str = "hearth_worker_pause_duration_seconds";
/// Time to resume a paused VM (loading its state, clock pushed), by `result`.
pub const RESUME_DURATION: &str = "hearth_worker_resume_duration_seconds";
/// Time to upload a paused VM's state to the object store (`pause_upload`), by `result`.
pub const PAUSE_UPLOAD_DURATION: &str = "hearth_worker_pause_upload_duration_seconds";
/// Bytes of paused VM state uploaded to the object store.
pub const PAUSE_UPLOAD_BYTES_TOTAL: &str = "hearth_worker_pause_upload_bytes_total";
/// Time to bring a paused VM of a lost worker back here (download, verify, restore, resume),
/// by `result`.
pub const PAUSE_RESTORE_DURATION: &str = "hearth_worker_pause_restore_duration_seconds";
/// Bytes of paused VM state held on this worker's disk.
pub const PAUSED_BYTES: &str = "hearth_worker_paused_bytes";
/// Free bytes on the file system of the worker's data directory (where paused state goes).
pub const DATA_DISK_FREE_BYTES: &str = "hearth_worker_data_disk_free_bytes";
/// Old backups deleted by the backup retention.
pub const BACKUPS_PRUNED_TOTAL: &str = "hearth_worker_backups_pruned_total";

/// Data-plane endpoints (the `endpoint` label of queue rejections).
pub const DATA_ENDPOINTS: &[&str] = &["exec", "files-put", "files-get"];

/// Every metric the worker emits (the dashboard check compares against this list).
pub const ALL: &[&str] = &[
    JOBS_TOTAL,
    JOB_DURATION,
    EXECS_TOTAL,
    EXEC_DURATION,
    EXEC_LOCK_WAIT,
    EXEC_TRUNCATED_TOTAL,
    FILES_TOTAL,
    VMS,
    CAPACITY,
    EVICTIONS_TOTAL,
    SNAPSHOT_DURATION,
    SNAPSHOT_BYTES_TOTAL,
    RESTORE_DURATION,
    SNAPSHOT_FETCH_BYTES_TOTAL,
    HEARTBEATS_TOTAL,
    BAD_REQUESTS_TOTAL,
    JOBS_FENCED_TOTAL,
    QUEUE_REJECTIONS_TOTAL,
    BACKUPS_PRUNED_TOTAL,
    FOREIGN_REQUESTS_TOTAL,
    PAUSE_DURATION,
    RESUME_DURATION,
    PAUSED_BYTES,
    DATA_DISK_FREE_BYTES,
    PAUSE_UPLOAD_DURATION,
    PAUSE_UPLOAD_BYTES_TOTAL,
    PAUSE_RESTORE_DURATION,
];

const FAST: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const SLOW: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Sets the worker's histogram buckets on `builder` (a process running several Hearth components
/// installs one exporter and lets each add its buckets).
pub fn configure(mut builder: PrometheusBuilder) -> Result<PrometheusBuilder, BuildError> {
    for (name, buckets) in [
        (JOB_DURATION, SLOW),
        (EXEC_DURATION, SLOW),
        (EXEC_LOCK_WAIT, FAST),
        (SNAPSHOT_DURATION, SLOW),
        (RESTORE_DURATION, SLOW),
        (PAUSE_DURATION, SLOW),
        (RESUME_DURATION, SLOW),
        (PAUSE_UPLOAD_DURATION, SLOW),
        (PAUSE_RESTORE_DURATION, SLOW),
    ] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)?;
    }
    Ok(builder)
}

/// Installs the Prometheus exporter with an HTTP listener on `listen` (serves `/metrics`).
/// Must run inside a tokio runtime.
pub fn install_exporter(listen: SocketAddr) -> Result<(), BuildError> {
    configure(PrometheusBuilder::new().with_http_listener(listen))?.install()
}

/// Registers descriptions so `/metrics` carries `# HELP` lines.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(JOBS_TOTAL, "Lifecycle jobs handled, by op and result");
    describe_histogram!(
        JOB_DURATION,
        metrics::Unit::Seconds,
        "Lifecycle job duration"
    );
    describe_counter!(EXECS_TOTAL, "Commands run, by result");
    describe_histogram!(EXEC_DURATION, metrics::Unit::Seconds, "Command wall time");
    describe_histogram!(
        EXEC_LOCK_WAIT,
        metrics::Unit::Seconds,
        "Time exec and files requests waited for their VM's lock"
    );
    describe_counter!(
        EXEC_TRUNCATED_TOTAL,
        "Exec results whose output was truncated"
    );
    describe_counter!(FILES_TOTAL, "Files requests, by op and result");
    describe_gauge!(VMS, "VMs held by this worker, by state");
    describe_gauge!(CAPACITY, "Most VMs this worker holds");
    describe_counter!(EVICTIONS_TOTAL, "Stopped VMs evicted to make room");
    describe_histogram!(
        SNAPSHOT_DURATION,
        metrics::Unit::Seconds,
        "Snapshot duration"
    );
    describe_counter!(SNAPSHOT_BYTES_TOTAL, "Bytes of snapshots taken");
    describe_histogram!(
        RESTORE_DURATION,
        metrics::Unit::Seconds,
        "Restore duration, including fetching the snapshot"
    );
    describe_counter!(
        SNAPSHOT_FETCH_BYTES_TOTAL,
        "Snapshot bytes fetched from the object store"
    );
    describe_counter!(HEARTBEATS_TOTAL, "Heartbeats published");
    describe_histogram!(
        PAUSE_DURATION,
        metrics::Unit::Seconds,
        "Time to pause a VM (its state to disk for VMM providers), by result"
    );
    describe_histogram!(
        RESUME_DURATION,
        metrics::Unit::Seconds,
        "Time to resume a paused VM, by result"
    );
    describe_histogram!(
        PAUSE_UPLOAD_DURATION,
        metrics::Unit::Seconds,
        "Time to upload a paused VM's state to the object store (pause_upload), by result"
    );
    describe_counter!(
        PAUSE_UPLOAD_BYTES_TOTAL,
        "Bytes of paused VM state uploaded to the object store"
    );
    describe_histogram!(
        PAUSE_RESTORE_DURATION,
        metrics::Unit::Seconds,
        "Time to bring a paused VM of a lost worker back here from the object store, by result"
    );
    describe_gauge!(
        PAUSED_BYTES,
        metrics::Unit::Bytes,
        "Bytes of paused VM state on this worker's disk"
    );
    describe_gauge!(
        DATA_DISK_FREE_BYTES,
        metrics::Unit::Bytes,
        "Free bytes on the file system of the worker's data directory"
    );
    describe_counter!(
        BAD_REQUESTS_TOTAL,
        "Requests rejected as malformed or invalid"
    );
    describe_counter!(
        JOBS_FENCED_TOTAL,
        "Jobs refused because a newer scheduler lease was already seen (a deposed leader)"
    );
    metrics::counter!(JOBS_FENCED_TOTAL).absolute(0);
    describe_counter!(
        QUEUE_REJECTIONS_TOTAL,
        "Exec and file requests refused (429) because their VM's queue was full, by endpoint"
    );
    for endpoint in DATA_ENDPOINTS {
        metrics::counter!(QUEUE_REJECTIONS_TOTAL, "endpoint" => *endpoint).absolute(0);
    }
    describe_counter!(
        BACKUPS_PRUNED_TOTAL,
        "Old backups deleted by the retention limits"
    );
    metrics::counter!(BACKUPS_PRUNED_TOTAL).absolute(0);
    describe_counter!(
        FOREIGN_REQUESTS_TOTAL,
        "Exec and file requests refused (404) because another tenant owns the session"
    );
    metrics::counter!(FOREIGN_REQUESTS_TOTAL).absolute(0);
    register_known_series();
}

/// Registers every counter and histogram for the label sets known at start (at zero), so the first
/// scrape has every series a dashboard or a `rate()` alert queries ("No data" hides an outage,
/// and a rate over a series that appears at its first increment misses that increment).
fn register_known_series() {
    for op in hearth_messages::JobOp::NAMES {
        metrics::counter!(JOBS_TOTAL, "op" => *op, "result" => "ok").increment(0);
        let _ = metrics::histogram!(JOB_DURATION, "op" => *op);
    }
    for result in ["ok", "nonzero", "timeout", "error"] {
        metrics::counter!(EXECS_TOTAL, "result" => result).increment(0);
    }
    for op in ["put", "get"] {
        metrics::counter!(FILES_TOTAL, "op" => op, "result" => "ok").increment(0);
    }
    for endpoint in ["jobs"].iter().chain(DATA_ENDPOINTS) {
        metrics::counter!(BAD_REQUESTS_TOTAL, "endpoint" => *endpoint).increment(0);
    }
    for name in [
        EXEC_TRUNCATED_TOTAL,
        EVICTIONS_TOTAL,
        SNAPSHOT_BYTES_TOTAL,
        SNAPSHOT_FETCH_BYTES_TOTAL,
        HEARTBEATS_TOTAL,
        PAUSE_UPLOAD_BYTES_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        EXEC_DURATION,
        EXEC_LOCK_WAIT,
        SNAPSHOT_DURATION,
        RESTORE_DURATION,
    ] {
        let _ = metrics::histogram!(name);
    }
    for name in [
        PAUSE_DURATION,
        RESUME_DURATION,
        PAUSE_UPLOAD_DURATION,
        PAUSE_RESTORE_DURATION,
    ] {
        let _ = metrics::histogram!(name, "result" => "ok");
    }
}
