//! Scheduler configuration: command-line flags, `HEARTH_*` environment variables and an optional TOML
//! file, in that order of precedence. [`SchedulerConfig`] is the resolved form the library runs on;
//! `SchedulerConfig::default()` is a complete, sensible configuration for tests and embedding.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_messages::{Quota, Subjects, TemplateName, TenantId};
use serde::Deserialize;

/// A configuration error: the binary prints it on one line and exits 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// One template the scheduler keeps a warm pool for (`[[templates]]` in the TOML file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// The template's name; what clients put in `sessions.create{template}`.
    pub name: TemplateName,
    /// Ready VMs the pool aims for.
    #[serde(default = "default_min_ready")]
    pub min_ready: u32,
    /// Most pooled VMs (ready + restoring) ever kept; defaults to `min_ready`.
    #[serde(default)]
    pub max_ready: Option<u32>,
    /// vCPUs per VM.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Memory per VM, MiB (enforced by the process provider with cgroups where the host allows).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Disk quota of a VM's volume, MiB (0 = none).
    #[serde(default = "default_disk_mib")]
    pub disk_mib: u32,
    /// Most processes at once in a VM (0 = no limit).
    #[serde(default = "default_max_processes")]
    pub max_processes: u32,
    /// `none` (the default: no network) or `egress` (outbound access, never to the host).
    #[serde(default = "default_network")]
    pub network: String,
    /// Provider-specific base image on the worker (process and oci providers: a directory or
    /// tarball seeding the volume, or a container image to run on).
    #[serde(default)]
    pub base: Option<String>,
    /// Argv run once while building the template snapshot.
    #[serde(default)]
    pub bootstrap: Option<Vec<String>>,
    /// Environment for every command in the template's VMs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A nix profile (flake reference) hydrated at template build (`nix develop <profile>
    /// --command true` in the build VM) when the VM has `nix`; otherwise, or when it fails, the
    /// template's `notes` say so (seed 001's `nix_profile`).
    #[serde(default)]
    pub nix_profile: Option<String>,
    /// What the idle timeout does to a session of this template: `stop` (the VM is paused in
    /// memory) or `pause` (its state goes to the worker's disk and the VMM ends: no host memory).
    /// Absent: `pause` on workers whose provider pauses to disk (`qemu`), `stop` elsewhere.
    #[serde(default)]
    pub idle_action: Option<IdleAction>,
    /// What the end of a session's TTL does: `release` (destroy it) or `pause` (it stays
    /// resumable, paused, for `paused_retention_s`, then is pruned like an idle session).
    #[serde(default)]
    pub ttl_action: TtlAction,
    /// How long a paused session is kept before it is pruned (with the usual backup); absent:
    /// `[sessions] prune_after_s`.
    #[serde(default)]
    pub paused_retention_s: Option<u64>,
    /// Upload a paused session's state to the fleet's object store (chunked, checksummed), so
    /// the session survives the loss of its worker: resumed on another worker on its next
    /// touch. VM providers that pause to disk only (qemu); the process provider keeps a paused
    /// session in memory, so there it is not uploaded (the session's `detail` says so).
    #[serde(default)]
    pub pause_upload: bool,
}

/// What the idle timeout does (`idle_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleAction {
    Stop,
    Pause,
}

/// What the end of the TTL does (`ttl_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TtlAction {
    #[default]
    Release,
    Pause,
}

/// Providers whose workers pause to disk: `idle_action` defaults to `pause` on them.
pub const PAUSING_PROVIDERS: &[&str] = &["qemu"];

/// Providers whose paused VMs can be uploaded (`pause_upload`) and restored on another worker:
/// those that pause to disk, and the fake (its in-memory VM is a document; scheduler tests).
pub const UPLOADING_PROVIDERS: &[&str] = &["qemu", "fake"];

fn default_min_ready() -> u32 {
    2
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory_mib() -> u32 {
    512
}
fn default_disk_mib() -> u32 {
    4096
}
fn default_max_processes() -> u32 {
    512
}
fn default_network() -> String {
    "none".into()
}

impl TemplateConfig {
    /// A template with default sizing and `min_ready` warm VMs.
    pub fn new(name: TemplateName, min_ready: u32) -> Self {
        Self {
            name,
            min_ready,
            max_ready: None,
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            disk_mib: default_disk_mib(),
            max_processes: default_max_processes(),
            network: default_network(),
            base: None,
            bootstrap: None,
            nix_profile: None,
            env: BTreeMap::new(),
            idle_action: None,
            ttl_action: TtlAction::Release,
            paused_retention_s: None,
            pause_upload: false,
        }
    }

    /// `max_ready`, defaulted to `min_ready`.
    pub fn max_ready(&self) -> u32 {
        self.max_ready.unwrap_or(self.min_ready).max(self.min_ready)
    }
}

/// Session lifetime defaults (`[sessions]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// TTL when a create names none.
    pub default_ttl: Duration,
    /// Longest TTL a create or keepalive may ask for (longer requests are capped).
    pub max_ttl: Duration,
    /// Idle timeout when a create names none; `None` never stops idle sessions.
    pub default_idle_timeout: Option<Duration>,
    /// How long a stopped (idle) session is kept before it is destroyed.
    pub prune_after: Duration,
    /// Back the volume up (`DestroyVm{backup: true}`) before a prune.
    pub backup_on_prune: bool,
    /// Back a stopped session's volume up (`BackupVm`, the VM stays) once it has been stopped
    /// this long: at most one such backup per session, independent of prune. `None`: never.
    pub backup_after: Option<Duration>,
    /// How long an ended session stays readable (get/release answer with its final state).
    pub retention: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            default_idle_timeout: Some(Duration::from_secs(600)),
            prune_after: Duration::from_secs(3600),
            backup_on_prune: false,
            backup_after: None,
            retention: Duration::from_secs(3600),
        }
    }
}

/// Timeouts of the lifecycle jobs the scheduler sends to workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTimeouts {
    /// The rename on the claim path (warm hand-off); a worker that is slower is skipped.
    pub rename: Duration,
    /// Restoring a pooled VM (includes fetching the snapshot from the object store).
    pub restore: Duration,
    /// Cold-creating the template VM and running its bootstrap.
    pub build: Duration,
    /// Snapshotting a VM and publishing it to the object store.
    pub snapshot: Duration,
    /// Stop, start and destroy (a destroy with backup archives the volume first).
    pub lifecycle: Duration,
}

impl Default for JobTimeouts {
    fn default() -> Self {
        Self {
            rename: Duration::from_secs(2),
            restore: Duration::from_secs(60),
            build: Duration::from_secs(600),
            snapshot: Duration::from_secs(300),
            lifecycle: Duration::from_secs(60),
        }
    }
}

/// Everything the scheduler needs, resolved.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// Subjects (and bucket names) under the configured prefix.
    pub subjects: Subjects,
    /// This scheduler's id, written into the leader lease (default: host name + pid).
    pub scheduler_id: String,
    /// Prometheus `/metrics` listen address; none disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Replicas of the KV buckets when the scheduler creates them (3 on a JetStream cluster).
    pub kv_replicas: usize,
    /// A worker silent for this long is *suspect* (3 × the worker's 1 s heartbeat): nothing new is
    /// placed on it, its sessions stay as they are and none of its VMs counts as leaked.
    pub heartbeat_timeout: Duration,
    /// A worker silent for this long is *lost*: its sessions end `lost` (`worker_lost`). Long on
    /// purpose, so a NATS blip or a stalled process never ends a session.
    pub worker_lost_grace: Duration,
    /// Period of the level-triggered passes (pool targets, template builds, liveness).
    pub reconcile_interval: Duration,
    /// Period of the session lifetime pass (TTL, idle stop, prune, retention).
    pub lifecycle_interval: Duration,
    /// A session or pool VM missing from its live worker's inventory for this long is gone.
    pub vm_missing_grace: Duration,
    /// A VM younger than this is never destroyed as leaked (it may belong to a job in flight).
    pub leak_grace: Duration,
    /// Length of the leader lease; renewed every third of it.
    pub lease_ttl: Duration,
    /// How long `sessions.create` waits for a cold restore when the request names no `wait_ms`.
    pub claim_wait: Duration,
    /// `retry_after_ms` in 503 replies.
    pub retry_after: Duration,
    /// Restores one template runs at once.
    pub refill_parallelism: u32,
    /// Threads of the scheduler's async runtime: 1 (the default) runs everything on one thread,
    /// as measured on 2 cores (`HEARTH_RUNTIME_THREADS=N hearth bench claims`: the bench's scheduler inherits it).
    pub runtime_threads: usize,
    /// Consecutive failed restores of a template after which its snapshot is rebuilt.
    pub restore_failures_before_rebuild: u32,
    /// Job timeouts.
    pub jobs: JobTimeouts,
    /// Session lifetime defaults.
    pub sessions: SessionConfig,
    /// Templates with warm pools.
    pub templates: Vec<TemplateConfig>,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_grace: Duration,
    /// Tenants' quotas.
    pub tenants: TenantsConfig,
}

/// `[tenants]`: quotas per tenant (NATS account). Requests from the service account (the
/// operator) have no quota.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// The quota of tenants without an entry in `quotas` (`[tenants.default]`).
    pub default: Quota,
    /// Quotas by tenant (`[tenants.quotas.<name>]`; unset keys take the built-in defaults). These
    /// names are also the `tenant` label values of the metrics; other tenants count as `_other`.
    pub quotas: BTreeMap<TenantId, Quota>,
    /// The largest `min_ready`/`max_ready` a snapshot request may ask for, operator included
    /// (400 beyond it).
    pub max_ready_cap: u32,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        Self {
            default: Quota::default(),
            quotas: BTreeMap::new(),
            max_ready_cap: 64,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            subjects: Subjects::default(),
            scheduler_id: default_scheduler_id(),
            metrics_listen: None,
            kv_replicas: 1,
            heartbeat_timeout: Duration::from_secs(3),
            worker_lost_grace: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(5),
            lifecycle_interval: Duration::from_secs(1),
            vm_missing_grace: Duration::from_secs(5),
            leak_grace: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(10),
            claim_wait: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
            refill_parallelism: 4,
            runtime_threads: 1,
            restore_failures_before_rebuild: 3,
            jobs: JobTimeouts::default(),
            sessions: SessionConfig::default(),
            templates: vec![TemplateConfig::new(TemplateName::default_template(), 2)],
            drain_grace: Duration::from_secs(15),
            tenants: TenantsConfig::default(),
        }
    }
}

impl SchedulerConfig {
    /// Checks what types cannot: unique template names, sane bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.templates {
            if !seen.insert(t.name.clone()) {
                return Err(ConfigError(format!(
                    "template {:?} is defined twice",
                    t.name.as_str()
                )));
            }
            if let Some(max) = t.max_ready
                && max < t.min_ready
            {
                return Err(ConfigError(format!(
                    "template {:?}: max_ready ({max}) is below min_ready ({})",
                    t.name.as_str(),
                    t.min_ready
                )));
            }
        }
        let positive = [
            ("heartbeat_timeout_ms", self.heartbeat_timeout),
            ("worker_lost_grace_ms", self.worker_lost_grace),
            ("reconcile_interval_ms", self.reconcile_interval),
            ("lifecycle_interval_ms", self.lifecycle_interval),
            ("lease_ttl_ms", self.lease_ttl),
            ("sessions.default_ttl_s", self.sessions.default_ttl),
            ("sessions.max_ttl_s", self.sessions.max_ttl),
            ("jobs.rename_timeout_ms", self.jobs.rename),
            ("jobs.restore_timeout_ms", self.jobs.restore),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be positive")));
            }
        }
        if self.worker_lost_grace < self.heartbeat_timeout {
            return Err(ConfigError(format!(
                "worker_lost_grace_ms ({}) is below heartbeat_timeout_ms ({})",
                self.worker_lost_grace.as_millis(),
                self.heartbeat_timeout.as_millis()
            )));
        }
        if self.kv_replicas == 0 || self.kv_replicas > 5 {
            return Err(ConfigError("kv_replicas must be between 1 and 5".into()));
        }
        if self.runtime_threads == 0 {
            return Err(ConfigError("runtime_threads must be positive".into()));
        }
        if self.refill_parallelism == 0 {
            return Err(ConfigError("refill_parallelism must be positive".into()));
        }
        for (name, quota) in std::iter::once(("default".to_owned(), &self.tenants.default)).chain(
            self.tenants
                .quotas
                .iter()
                .map(|(t, q)| (format!("quotas.{t}"), q)),
        ) {
            quota
                .validate()
                .map_err(|e| ConfigError(format!("tenants.{name}: {}", e.message)))?;
        }
        if self.sessions.default_ttl > self.sessions.max_ttl {
            return Err(ConfigError(
                "sessions.default_ttl_s exceeds sessions.max_ttl_s".into(),
            ));
        }
        Ok(())
    }
}

/// Command-line flags (each also readable from its `HEARTH_*` variable).
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "hearth-scheduler",
    version,
    about = "Hearth scheduler: warm pools, claims, session lifetimes"
)]
pub struct SchedulerArgs {
    /// TOML file with any of the settings below, plus `[sessions]`, `[jobs]` and `[[templates]]`
    /// (flags and environment win).
    #[arg(long, env = "HEARTH_SCHEDULER_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "HEARTH_NATS_URL")]
    pub nats_url: Option<String>,
    /// Subject prefix.
    #[arg(long, env = "HEARTH_PREFIX")]
    pub prefix: Option<String>,
    /// This scheduler's id (default: host name and pid).
    #[arg(long, env = "HEARTH_SCHEDULER_ID")]
    pub scheduler_id: Option<String>,
    /// Prometheus listen address, e.g. 0.0.0.0:9101; "off" disables.
    #[arg(long, env = "HEARTH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Replicas of the KV buckets.
    #[arg(long, env = "HEARTH_KV_REPLICAS")]
    pub kv_replicas: Option<usize>,
    /// Milliseconds without a heartbeat after which a worker is suspect (no new placements).
    #[arg(long, env = "HEARTH_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Milliseconds without a heartbeat after which a worker is lost (its sessions end `lost`).
    #[arg(long, env = "HEARTH_WORKER_LOST_GRACE_MS")]
    pub worker_lost_grace_ms: Option<u64>,
    /// Milliseconds between reconcile passes.
    #[arg(long, env = "HEARTH_RECONCILE_INTERVAL_MS")]
    pub reconcile_interval_ms: Option<u64>,
    /// Default `wait_ms` of a claim.
    #[arg(long, env = "HEARTH_CLAIM_WAIT_MS")]
    pub claim_wait_ms: Option<u64>,
    /// Leader lease length in milliseconds.
    #[arg(long, env = "HEARTH_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Threads of the async runtime (1: one thread).
    #[arg(long, env = "HEARTH_RUNTIME_THREADS")]
    pub runtime_threads: Option<usize>,
}

/// `[sessions]` in the TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionsFile {
    default_ttl_s: Option<u64>,
    max_ttl_s: Option<u64>,
    /// 0 disables idle stop.
    default_idle_timeout_s: Option<u64>,
    prune_after_s: Option<u64>,
    backup_on_prune: Option<bool>,
    /// 0 disables it.
    backup_after_s: Option<u64>,
    retention_s: Option<u64>,
}

/// `[jobs]` in the TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsFile {
    rename_timeout_ms: Option<u64>,
    restore_timeout_ms: Option<u64>,
    build_timeout_ms: Option<u64>,
    snapshot_timeout_ms: Option<u64>,
    lifecycle_timeout_ms: Option<u64>,
}

/// The TOML file's shape (every key optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulerFile {
    nats_url: Option<String>,
    prefix: Option<String>,
    scheduler_id: Option<String>,
    metrics_listen: Option<String>,
    kv_replicas: Option<usize>,
    heartbeat_timeout_ms: Option<u64>,
    worker_lost_grace_ms: Option<u64>,
    reconcile_interval_ms: Option<u64>,
    lifecycle_interval_ms: Option<u64>,
    vm_missing_grace_ms: Option<u64>,
    leak_grace_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    claim_wait_ms: Option<u64>,
    retry_after_ms: Option<u64>,
    refill_parallelism: Option<u32>,
    runtime_threads: Option<usize>,
    restore_failures_before_rebuild: Option<u32>,
    drain_grace_s: Option<u64>,
    #[serde(default)]
    sessions: SessionsFile,
    #[serde(default)]
    jobs: JobsFile,
    templates: Option<Vec<TemplateConfig>>,
    tenants: Option<TenantsConfig>,
}

fn read_file(path: &Path) -> Result<SchedulerFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    parse_file(&text).map_err(|e| ConfigError(format!("invalid {}: {}", path.display(), e.0)))
}

fn parse_file(text: &str) -> Result<SchedulerFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError(one_line(&e.to_string())))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a metrics listen setting: an address, or `off`.
pub fn parse_listen(value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.eq_ignore_ascii_case("off") || value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e| ConfigError(format!("invalid metrics listen address {value:?}: {e}")))
}

fn default_scheduler_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "scheduler".into());
    format!("{}-{}", host.trim(), std::process::id())
}

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn secs(value: u64) -> Duration {
    Duration::from_secs(value)
}

impl SchedulerArgs {
    /// Merges flags, environment, the TOML file and defaults, then validates.
    pub fn resolve(self) -> Result<SchedulerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => SchedulerFile::default(),
        };
        resolve(self, file)
    }
}

/// Resolves a configuration from TOML text alone (no flags); for embedding and tests.
pub fn from_toml(text: &str) -> Result<SchedulerConfig, ConfigError> {
    resolve(SchedulerArgs::default(), parse_file(text)?)
}

fn resolve(args: SchedulerArgs, file: SchedulerFile) -> Result<SchedulerConfig, ConfigError> {
    let mut c = SchedulerConfig::default();
    if let Some(v) = args.nats_url.or(file.nats_url) {
        c.nats_url = v;
    }
    if let Some(prefix) = args.prefix.or(file.prefix) {
        c.subjects = Subjects::new(&prefix).map_err(|e| ConfigError(e.to_string()))?;
    }
    if let Some(v) = args.scheduler_id.or(file.scheduler_id) {
        if v.trim().is_empty() {
            return Err(ConfigError("scheduler_id must not be empty".into()));
        }
        c.scheduler_id = v;
    }
    if let Some(v) = args.metrics_listen.or(file.metrics_listen) {
        c.metrics_listen = parse_listen(&v)?;
    }
    if let Some(v) = args.kv_replicas.or(file.kv_replicas) {
        c.kv_replicas = v;
    }
    if let Some(v) = args.heartbeat_timeout_ms.or(file.heartbeat_timeout_ms) {
        c.heartbeat_timeout = ms(v);
    }
    if let Some(v) = args.worker_lost_grace_ms.or(file.worker_lost_grace_ms) {
        c.worker_lost_grace = ms(v);
    }
    if let Some(v) = args.reconcile_interval_ms.or(file.reconcile_interval_ms) {
        c.reconcile_interval = ms(v);
    }
    if let Some(v) = args.claim_wait_ms.or(file.claim_wait_ms) {
        c.claim_wait = ms(v);
    }
    if let Some(v) = args.lease_ttl_ms.or(file.lease_ttl_ms) {
        c.lease_ttl = ms(v);
    }
    if let Some(v) = args.runtime_threads.or(file.runtime_threads) {
        c.runtime_threads = v;
    }
    if let Some(v) = file.lifecycle_interval_ms {
        c.lifecycle_interval = ms(v);
    }
    if let Some(v) = file.vm_missing_grace_ms {
        c.vm_missing_grace = ms(v);
    }
    if let Some(v) = file.leak_grace_ms {
        c.leak_grace = ms(v);
    }
    if let Some(v) = file.retry_after_ms {
        c.retry_after = ms(v);
    }
    if let Some(v) = file.refill_parallelism {
        c.refill_parallelism = v;
    }
    if let Some(v) = file.restore_failures_before_rebuild {
        c.restore_failures_before_rebuild = v;
    }
    if let Some(v) = file.drain_grace_s {
        c.drain_grace = secs(v);
    }
    let s = file.sessions;
    if let Some(v) = s.default_ttl_s {
        c.sessions.default_ttl = secs(v);
    }
    if let Some(v) = s.max_ttl_s {
        c.sessions.max_ttl = secs(v);
    }
    if let Some(v) = s.default_idle_timeout_s {
        c.sessions.default_idle_timeout = (v > 0).then(|| secs(v));
    }
    if let Some(v) = s.prune_after_s {
        c.sessions.prune_after = secs(v);
    }
    if let Some(v) = s.backup_on_prune {
        c.sessions.backup_on_prune = v;
    }
    if let Some(v) = s.backup_after_s {
        c.sessions.backup_after = (v > 0).then(|| secs(v));
    }
    if let Some(v) = s.retention_s {
        c.sessions.retention = secs(v);
    }
    let j = file.jobs;
    if let Some(v) = j.rename_timeout_ms {
        c.jobs.rename = ms(v);
    }
    if let Some(v) = j.restore_timeout_ms {
        c.jobs.restore = ms(v);
    }
    if let Some(v) = j.build_timeout_ms {
        c.jobs.build = ms(v);
    }
    if let Some(v) = j.snapshot_timeout_ms {
        c.jobs.snapshot = ms(v);
    }
    if let Some(v) = j.lifecycle_timeout_ms {
        c.jobs.lifecycle = ms(v);
    }
    if let Some(mut templates) = file.templates {
        // An empty bootstrap is a no-op (as in seed 001), not an error.
        for t in &mut templates {
            if t.bootstrap.as_ref().is_some_and(Vec::is_empty) {
                t.bootstrap = None;
            }
        }
        c.templates = templates;
    }
    if let Some(tenants) = file.tenants {
        c.tenants = tenants;
    }
    c.validate()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_quotas_parse_and_bad_ones_are_refused_with_a_clear_error() {
        let c = from_toml(
            "[tenants]\nmax_ready_cap = 10\n[tenants.default]\nmax_sessions = 5\n\
             [tenants.quotas.acme-1]\ncreates_per_s = 3\ncreate_burst = 6\n",
        )
        .unwrap();
        assert_eq!(c.tenants.max_ready_cap, 10);
        assert_eq!(c.tenants.default.max_sessions, 5);
        let acme = &c.tenants.quotas[&TenantId::new("acme-1").unwrap()];
        assert_eq!((acme.creates_per_s, acme.create_burst), (3, 6));
        // Unset keys take the built-in defaults.
        assert_eq!(acme.max_templates, Quota::default().max_templates);
        for (bad, why) in [
            ("[tenants.quotas.\"a.b\"]\nmax_sessions = 1\n", "tenant"),
            ("[tenants.quotas.x]\nmax_sesions = 1\n", "unknown field"),
            ("[tenants.quotas.x]\ncreate_burst = 0\n", "create_burst"),
            (
                "[tenants.default]\nmax_fleet_share_pct = 101\n",
                "percentage",
            ),
            (
                "[tenants.default]\nmax_ready_per_template = 9\nmax_ready_total = 8\n",
                "max_ready_total",
            ),
            ("[tenants.default]\nmax_sessions = -1\n", "invalid value"),
        ] {
            let err = from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = from_toml("").unwrap();
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(3));
        assert_eq!(c.worker_lost_grace, Duration::from_secs(60));
        assert_eq!(c.templates.len(), 1);
        assert_eq!(c.templates[0].name.as_str(), "default");
        assert_eq!(c.subjects.prefix(), "hearth");
    }

    #[test]
    fn full_file_parses() {
        let c = from_toml(
            r#"
            prefix = "acme.hearth"
            kv_replicas = 3
            heartbeat_timeout_ms = 4500
            metrics_listen = "127.0.0.1:9101"
            [sessions]
            default_ttl_s = 60
            max_ttl_s = 120
            default_idle_timeout_s = 0
            backup_on_prune = true
            backup_after_s = 90
            [jobs]
            rename_timeout_ms = 500
            [[templates]]
            name = "py"
            min_ready = 3
            max_ready = 5
            bootstrap = ["sh", "-c", "echo hi > /tmp/x"]
            env = { LANG = "C" }
            "#,
        )
        .unwrap();
        assert_eq!(c.subjects.prefix(), "acme.hearth");
        assert_eq!(c.kv_replicas, 3);
        assert_eq!(c.sessions.default_idle_timeout, None);
        assert!(c.sessions.backup_on_prune);
        assert_eq!(c.sessions.backup_after, Some(Duration::from_secs(90)));
        assert_eq!(c.jobs.rename, Duration::from_millis(500));
        assert_eq!(c.templates[0].max_ready(), 5);
        assert_eq!(c.templates[0].env["LANG"], "C");
        assert_eq!(c.metrics_listen.unwrap().port(), 9101);
    }

    #[test]
    fn an_empty_bootstrap_is_no_bootstrap() {
        let c = from_toml("[[templates]]\nname = \"x\"\nbootstrap = []\n").unwrap();
        assert_eq!(c.templates[0].bootstrap, None);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        for bad in [
            "nope = 1",
            "prefix = \"a..b\"",
            "[[templates]]\nname = \"a.b\"",
            "[[templates]]\nname = \"x\"\nmin_ready = 3\nmax_ready = 1",
            "[[templates]]\nname = \"x\"\n[[templates]]\nname = \"x\"",
            "kv_replicas = 0",
            "[sessions]\ndefault_ttl_s = 100\nmax_ttl_s = 10",
            "metrics_listen = \"nowhere\"",
            "worker_lost_grace_ms = 0",
            "heartbeat_timeout_ms = 5000\nworker_lost_grace_ms = 4000",
        ] {
            let err = from_toml(bad).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{bad:?} -> {err}");
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let args = SchedulerArgs {
            prefix: Some("flag".into()),
            ..Default::default()
        };
        let file = parse_file("prefix = \"file\"").unwrap();
        assert_eq!(resolve(args, file).unwrap().subjects.prefix(), "flag");
    }
}
