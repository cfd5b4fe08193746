//! Client API: what executors send to the scheduler (`<prefix>.v1.sessions.*`, `templates.list`,
//! `pools.status`) and what they get back.
//!
//! Every optional field is `#[serde(default)]` so older and newer peers interoperate, and unknown
//! fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::events::IsolationReport;
use crate::ids::{SessionId, SnapshotId, TemplateName, TenantId, WorkerId};

/// Labels: free-form string pairs an executor attaches to a session and filters on.
pub type Labels = BTreeMap<String, String>;

/// Most labels one session may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

fn validate_labels(labels: &Labels) -> Result<(), WireError> {
    if labels.len() > MAX_LABELS {
        return Err(WireError::bad_request(format!(
            "at most {MAX_LABELS} labels are allowed"
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(WireError::bad_request(format!(
                "label keys must be 1..={MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN} bytes"
            )));
        }
    }
    Ok(())
}

/// `sessions.create`: claim a warm VM (or restore one cold) for a new session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSessionRequest {
    /// The template to claim from; `default` when absent.
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// Idempotency key: the same id twice returns the same session. Generated when absent
    /// (`HearthClient` always sends one, so its retries are safe).
    #[serde(default)]
    pub session_id: Option<SessionId>,
    /// Lifetime in seconds of running time (stopped time does not count); capped by the scheduler.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Seconds without exec or file activity after which the VM is stopped (it resumes on the
    /// next exec).
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Labels to attach.
    #[serde(default)]
    pub labels: Labels,
    /// How long the caller will wait for a cold restore when the pool is empty; 0 = fail fast
    /// with 503 when no warm VM is ready.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

impl CreateSessionRequest {
    /// The template name, defaulted.
    pub fn template_or_default(&self) -> TemplateName {
        self.template.clone().unwrap_or_default()
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), WireError> {
        validate_labels(&self.labels)?;
        if self.ttl_s == Some(0) {
            return Err(WireError::bad_request("ttl_s must be positive"));
        }
        if self.idle_timeout_s == Some(0) {
            return Err(WireError::bad_request("idle_timeout_s must be positive"));
        }
        Ok(())
    }
}

/// `sessions.list`: sessions, optionally filtered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListSessionsRequest {
    /// Only sessions of this template.
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// Only sessions carrying all of these labels.
    #[serde(default)]
    pub labels: Labels,
}

/// Reply to `sessions.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    /// Matching sessions, ordered by `created_ms`.
    #[serde(default)]
    pub sessions: Vec<Session>,
}

/// An empty request body (`sessions.<sid>.get`, `.release`, `templates.list`, `pools.status`).
/// An empty payload decodes as this too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `sessions.<sid>.keepalive`: extend the session's lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepaliveRequest {
    /// New lifetime from now, in seconds; the session's current TTL when absent.
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

impl KeepaliveRequest {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.ttl_s == Some(0) {
            return Err(WireError::bad_request("ttl_s must be positive"));
        }
        Ok(())
    }
}

/// `sessions.<sid>.snapshot`: capture the session's VM as a new template others can claim from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSessionRequest {
    /// Name of the new template; 409 if it exists.
    pub template: TemplateName,
    /// Warm pool size to keep for the new template (default 0: cold claims only). Capped by the
    /// scheduler (400 beyond the cap) and by the tenant's quota (429).
    #[serde(default)]
    pub min_ready: Option<u32>,
    /// Warm pool upper bound (default `min_ready`); at least `min_ready`, same caps.
    #[serde(default)]
    pub max_ready: Option<u32>,
}

impl SnapshotSessionRequest {
    /// Checks what serde cannot: `max_ready >= min_ready`, both within `cap`.
    pub fn validate(&self, cap: u32) -> Result<(u32, u32), WireError> {
        let min_ready = self.min_ready.unwrap_or(0);
        let max_ready = self.max_ready.unwrap_or(min_ready);
        if max_ready < min_ready {
            return Err(WireError::bad_request(format!(
                "max_ready ({max_ready}) must be at least min_ready ({min_ready})"
            )));
        }
        if max_ready > cap {
            return Err(WireError::bad_request(format!(
                "min_ready and max_ready may be at most {cap}"
            )));
        }
        Ok((min_ready, max_ready))
    }
}

/// Most sessions one `sessions.<sid>.fork` may make.
pub const MAX_FORK_COUNT: u32 = 64;

/// `sessions.<sid>.fork`: branch a live session into `count` new sessions. The source is
/// snapshotted live (paused for the length of the snapshot, then it goes on) and each copy is
/// restored from that snapshot on the source's worker with a fresh identity (host name, machine
/// id, RNG reseeded, clock set): the copies see the source's files and, on VM providers, its
/// memory (running programs) as they were at the snapshot, then diverge. No template is
/// registered. Counts against the tenant's session quota (429 before any work when `count`
/// does not fit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkSessionRequest {
    /// How many copies, `1..=MAX_FORK_COUNT`.
    pub count: u32,
    /// Lifetime of the copies in seconds; the source's TTL when absent.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Labels of the copies; the source's when absent.
    #[serde(default)]
    pub labels: Option<Labels>,
    /// Ids of the copies (exactly `count`): the idempotency keys. A retry with the same ids
    /// returns the copies already made and makes only the missing ones. Generated when absent.
    #[serde(default)]
    pub session_ids: Option<Vec<SessionId>>,
}

impl ForkSessionRequest {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.count == 0 || self.count > MAX_FORK_COUNT {
            return Err(WireError::bad_request(format!(
                "count must be in 1..={MAX_FORK_COUNT}"
            )));
        }
        if self.ttl_s == Some(0) {
            return Err(WireError::bad_request("ttl_s must be positive"));
        }
        if let Some(labels) = &self.labels {
            validate_labels(labels)?;
        }
        if let Some(ids) = &self.session_ids {
            if ids.len() != self.count as usize {
                return Err(WireError::bad_request(
                    "session_ids must hold exactly count ids",
                ));
            }
            let unique: std::collections::BTreeSet<_> = ids.iter().collect();
            if unique.len() != ids.len() {
                return Err(WireError::bad_request("session_ids must be distinct"));
            }
        }
        Ok(())
    }
}

/// One copy a fork could not make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkFailure {
    /// The copy's id.
    #[serde(default)]
    pub session_id: Option<SessionId>,
    /// Why it was not made.
    pub error: WireError,
}

/// Reply to `sessions.<sid>.fork`: the copies made and, never silently, those that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkSessionReply {
    /// The new sessions, in the order of their ids.
    #[serde(default)]
    pub sessions: Vec<Session>,
    /// The copies that could not be made.
    #[serde(default)]
    pub failed: Vec<ForkFailure>,
}

/// `templates.<name>.delete`: drain a template's pool and delete its snapshots everywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTemplateRequest {
    /// Delete even while sessions created from it are live: they are released first. Without it
    /// such a delete answers 409.
    #[serde(default)]
    pub force: bool,
}

/// A session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// The VM is running; exec goes straight through.
    Running,
    /// The VM was stopped after the idle timeout; the next exec resumes it.
    Stopped,
    /// The VM's whole state (memory, processes, files) was saved to its worker's disk and the VM
    /// ended (`sessions.<sid>.pause`, `idle_action = "pause"`, `ttl_action = "pause"`); the next
    /// exec, file transfer or keepalive resumes it where it was.
    Paused,
    /// Ended (released, expired, pruned or evicted); see the event's reason.
    Released,
    /// Its worker or VM disappeared; the session cannot be used.
    Lost,
}

impl SessionState {
    /// Whether the session has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Released | SessionState::Lost)
    }
}

/// A session: the reply to create, get, keepalive and release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The session's id; also the id of its VM on the worker.
    pub session_id: SessionId,
    /// The template it was claimed from.
    pub template: TemplateName,
    /// Current state.
    pub state: SessionState,
    /// The worker holding the VM (its data plane serves exec and files).
    pub worker_id: WorkerId,
    /// Whether the claim was served from the warm pool.
    pub warm: bool,
    /// When the session was created (unix ms).
    pub created_ms: u64,
    /// When it will expire unless kept alive (unix ms).
    pub expires_ms: u64,
    /// Last exec or file activity (unix ms).
    pub last_used_ms: u64,
    /// Labels given at create.
    #[serde(default)]
    pub labels: Labels,
    /// The isolation its worker enforces (absent from records written before it was reported).
    #[serde(default)]
    pub isolation: Option<IsolationReport>,
    /// The tenant (NATS account) that created it; absent for the operator's sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// When it was paused (unix ms); set while `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
    /// When it was last resumed from a pause (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_ms: Option<u64>,
    /// Its paused state is in the fleet's object store (`pause_upload`), complete and verified:
    /// the session survives the loss of its worker (see `unplaced`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause_uploaded: bool,
    /// Bytes of the uploaded paused state (0 unless `pause_uploaded`); they count against the
    /// tenant's `max_snapshot_bytes`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pause_upload_bytes: u64,
    /// Paused, and its worker was lost: it runs nowhere (`worker_id` names the lost worker) and
    /// the next exec, file transfer, process call or keepalive resumes it on another worker from
    /// the uploaded state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unplaced: bool,
    /// Why the session is as it is, in words: a pause upload that failed or was refused, why a
    /// session was lost, that it was moved to another worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `sessions.<sid>.pause`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRequest {
    /// Upload the paused state to the fleet's object store, so the session survives the loss of
    /// its worker (VM providers that pause to disk only; 400 elsewhere). Absent: the template's
    /// `pause_upload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<bool>,
}

/// A template: a snapshot sessions are restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Its name.
    pub name: TemplateName,
    /// The snapshot pooled VMs restore from; absent while it is being built.
    #[serde(default)]
    pub snapshot_id: Option<SnapshotId>,
    /// The session it was captured from, for templates made by `sessions.<sid>.snapshot`.
    #[serde(default)]
    pub source_session: Option<SessionId>,
    /// Warm pool lower bound.
    #[serde(default)]
    pub min_ready: u32,
    /// Warm pool upper bound.
    #[serde(default)]
    pub max_ready: u32,
    /// vCPUs per VM.
    #[serde(default)]
    pub vcpus: u32,
    /// Memory per VM, MiB.
    #[serde(default)]
    pub memory_mib: u32,
    /// Disk quota of a VM's volume, MiB (0 = none).
    #[serde(default)]
    pub disk_mib: u32,
    /// Most processes at once in a VM (0 = no limit).
    #[serde(default)]
    pub max_processes: u32,
    /// `none` (the default) or `egress` (outbound access, never to the host).
    #[serde(default)]
    pub network: Option<String>,
    /// When the template was created (unix ms).
    #[serde(default)]
    pub created_ms: u64,
    /// The tenant that made it (`sessions.<sid>.snapshot`); absent for the operator's templates,
    /// which every tenant may claim from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Size of its snapshot in the object store, bytes (0 while building, or unknown).
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// Being deleted (`templates.<name>.delete`): no longer claimable; the name stays taken until
    /// its pool is drained and its snapshots are gone.
    #[serde(default)]
    pub deleting: bool,
    /// Notes from its last build (e.g. `nix_profile` not hydrated: no nix in the VM).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A tenant's quotas. Over one, a request gets 429 (with `retry_after_ms` for the create rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Most live (running or stopped) sessions at once.
    pub max_sessions: u32,
    /// Session creates per second, sustained (token bucket refill); 0 = no creates.
    pub creates_per_s: u32,
    /// Creates allowed in a burst (token bucket size); at least 1.
    pub create_burst: u32,
    /// Most templates it may own (`sessions.<sid>.snapshot`).
    pub max_templates: u32,
    /// Largest `min_ready`/`max_ready` of one of its templates.
    pub max_ready_per_template: u32,
    /// Largest sum of `max_ready` over its templates: the warm VMs it may keep in the fleet.
    pub max_ready_total: u32,
    /// Most bytes of its template snapshots in the object store.
    pub max_snapshot_bytes: u64,
    /// Most of the fleet's VM slots its warm pools may hold, in percent (fair placement).
    pub max_fleet_share_pct: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_sessions: 100,
            creates_per_s: 50,
            create_burst: 100,
            max_templates: 10,
            max_ready_per_template: 8,
            max_ready_total: 16,
            max_snapshot_bytes: 10 << 30,
            max_fleet_share_pct: 25,
        }
    }
}

impl Quota {
    /// Checks the values (a quota that cannot be met is a config error, not a silent zero).
    pub fn validate(&self) -> Result<(), WireError> {
        if self.creates_per_s > 0 && self.create_burst == 0 {
            return Err(WireError::bad_request(
                "create_burst must be at least 1 when creates_per_s is positive",
            ));
        }
        if self.max_fleet_share_pct > 100 {
            return Err(WireError::bad_request(
                "max_fleet_share_pct is a percentage (0..=100)",
            ));
        }
        if self.max_ready_per_template > self.max_ready_total {
            return Err(WireError::bad_request(
                "max_ready_per_template cannot exceed max_ready_total",
            ));
        }
        Ok(())
    }
}

/// `admin.quotas.set` (operator only): set a tenant's quota at run time, or with `quota` absent
/// return it to the configured one. Stored durably; survives scheduler restarts and failovers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetQuotaRequest {
    /// The tenant (its NATS account name).
    pub tenant: TenantId,
    /// The new quota; absent = back to the config's.
    #[serde(default)]
    pub quota: Option<Quota>,
}

/// One tenant's quota and usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// The tenant.
    pub tenant: TenantId,
    /// Its effective quota.
    pub quota: Quota,
    /// Set at run time (`admin.quotas.set`) rather than from the config.
    #[serde(default)]
    pub overridden: bool,
    /// Live sessions.
    pub sessions: u32,
    /// Templates it owns.
    pub templates: u32,
    /// Sum of `max_ready` over its templates.
    pub ready_total: u32,
    /// Bytes of its template snapshots.
    pub snapshot_bytes: u64,
}

/// Reply to `admin.maintenance`: what the lifecycle pass it ran found. The actions it started
/// (ending, stopping, backing up, forgetting sessions) run on in the background.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceReport {
    /// Sessions the pass looked at.
    #[serde(default)]
    pub sessions: u32,
    /// Lifetime actions it started.
    #[serde(default)]
    pub actions: u32,
}

/// Reply to `admin.quotas.get` and `admin.quotas.set`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotasStatus {
    /// The quota of tenants with no entry of their own.
    pub default: Quota,
    /// Every tenant that is configured, overridden or owns something, by name.
    #[serde(default)]
    pub tenants: Vec<TenantUsage>,
}

/// Reply to `templates.list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateList {
    /// Every template, ordered by name.
    #[serde(default)]
    pub templates: Vec<Template>,
}

/// One template's warm pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The template.
    pub template: TemplateName,
    /// VMs restored, healthy and waiting to be claimed.
    pub ready: u32,
    /// VMs being restored.
    pub restoring: u32,
    /// The number of ready VMs the scheduler aims for (`min_ready`).
    pub target: u32,
    /// Live sessions claimed from this template.
    pub claimed: u32,
    /// The isolation of the workers holding its ready VMs (one entry per distinct kind).
    #[serde(default)]
    pub isolation: Vec<IsolationReport>,
}

/// Reply to `admin.workers` (operator only): every worker as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersStatus {
    /// One entry per worker, ordered by id.
    #[serde(default)]
    pub workers: Vec<WorkerView>,
}

/// One worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    /// The worker.
    pub worker_id: crate::WorkerId,
    /// `healthy`, `suspect` (silent past the heartbeat timeout), `lost`, or `unconfirmed` (known
    /// from the stored state, no heartbeat yet).
    pub health: String,
    /// It is draining (takes no new VMs).
    #[serde(default)]
    pub draining: bool,
    /// Its capacity.
    #[serde(default)]
    pub max_vms: u32,
    /// VMs its last heartbeat counted.
    #[serde(default)]
    pub used_vms: u32,
    /// Free slots as placement counts them (creates in flight, releases not yet in a heartbeat).
    #[serde(default)]
    pub free_slots: u32,
    /// The scheduler's view of its inventory.
    #[serde(default)]
    pub inventory: InventoryView,
}

/// The scheduler's view of one worker's inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryView {
    /// The worker's inventory generation the view matches.
    #[serde(default)]
    pub generation: u64,
    /// VMs in the view.
    #[serde(default)]
    pub vms: u32,
    /// It matches the worker's latest digest.
    #[serde(default)]
    pub synced: bool,
    /// It may drive reconcile (paged in after the worker's latest silence).
    #[serde(default)]
    pub fresh: bool,
}

/// Reply to `pools.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolsStatus {
    /// One entry per template, ordered by name.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_defaults_from_an_empty_map() {
        let req: CreateSessionRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(req, CreateSessionRequest::default());
        assert_eq!(req.template_or_default().as_str(), "default");
    }

    #[test]
    fn create_request_validation() {
        let mut req = CreateSessionRequest {
            ttl_s: Some(0),
            ..Default::default()
        };
        assert!(req.validate().is_err());
        req.ttl_s = Some(60);
        req.labels.insert(String::new(), "x".into());
        assert!(req.validate().is_err());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let req: KeepaliveRequest =
            serde_json::from_str(r#"{"ttl_s": 5, "from_the_future": [1,2]}"#).unwrap();
        assert_eq!(req.ttl_s, Some(5));
    }
}
