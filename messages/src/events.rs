//! Worker heartbeats and lifecycle events: what observers (the scheduler, dashboards, people
//! debugging) see on `<prefix>.v1.workers.<wid>.status` and `<prefix>.v1.events.>`.

use serde::{Deserialize, Serialize};

use crate::api::SessionState;
use crate::ids::{SessionId, VmId, WorkerId};
use crate::jobs::{VmInfo, VmState};

/// Why a session or VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    /// The client released it.
    Released,
    /// Its TTL ran out.
    Ttl,
    /// It stayed stopped past `prune_after` after an idle stop.
    Idle,
    /// Its worker needed the capacity (oldest stopped VM evicted).
    Evicted,
    /// Its worker stopped sending heartbeats.
    WorkerLost,
    /// Its VM failed (VMM died, health check failed, VM vanished).
    VmFailed,
    /// An unexpected error ended it.
    Error,
}

impl TerminationReason {
    /// Every reason (metrics start each at zero).
    pub const ALL: [TerminationReason; 7] = [
        TerminationReason::Released,
        TerminationReason::Ttl,
        TerminationReason::Idle,
        TerminationReason::Evicted,
        TerminationReason::WorkerLost,
        TerminationReason::VmFailed,
        TerminationReason::Error,
    ];

    /// Lowercase name for labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Released => "released",
            TerminationReason::Ttl => "ttl",
            TerminationReason::Idle => "idle",
            TerminationReason::Evicted => "evicted",
            TerminationReason::WorkerLost => "worker_lost",
            TerminationReason::VmFailed => "vm_failed",
            TerminationReason::Error => "error",
        }
    }
}

/// A session's state change, on `<prefix>.v1.events.sessions.<sid>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// The session.
    pub session_id: SessionId,
    /// Its new state.
    pub state: SessionState,
    /// Why it ended, for terminal states.
    #[serde(default)]
    pub reason: Option<TerminationReason>,
    /// When (unix ms).
    pub at_ms: u64,
    /// The session's tenant; its events are also published on
    /// `<prefix>.v1.events.tenants.<tenant>.sessions.<sid>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<crate::TenantId>,
}

/// A VM's state change on a worker, on `<prefix>.v1.events.vms.<wid>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    /// The worker.
    pub worker_id: WorkerId,
    /// The VM.
    pub vm_id: VmId,
    /// Its new state.
    pub state: VmState,
    /// The id it had before, for a rename.
    #[serde(default)]
    pub renamed_from: Option<VmId>,
    /// Why it ended, for `destroyed`.
    #[serde(default)]
    pub reason: Option<TerminationReason>,
    /// When (unix ms).
    pub at_ms: u64,
}

/// Software versions a worker runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// The Hearth release.
    #[serde(default)]
    pub hearth: String,
    /// The wire protocol (`v1`).
    #[serde(default)]
    pub protocol: String,
    /// The provider's own version string, if it has one (e.g. the VMM's).
    #[serde(default)]
    pub provider: Option<String>,
}

/// What separates a worker's sessions from the host and from each other, as the worker enforces
/// it. Reported in heartbeats and copied onto each `Session` and pool status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IsolationReport {
    /// `sandbox` (process provider: hardened namespaces, seccomp, no capabilities), `vm`
    /// (qemu, firecracker: guest code never runs on the host), `none` (the operator turned
    /// isolation off: commands run as host processes), `fake` (nothing runs).
    #[serde(default)]
    pub mode: String,
    /// How per-session memory, process and CPU limits are enforced: `cgroup_v2`, `cgroup_v1`,
    /// `rlimit` (memory only), `vm` (the VM's own size), `none`.
    #[serde(default)]
    pub limits: String,
    /// How the disk quota (`disk_mib`) is enforced: `loop_ext4`, `vm`, `none`.
    #[serde(default)]
    pub disk: String,
}

/// A worker's heartbeat, published every interval on `<prefix>.v1.workers.<wid>.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The worker.
    pub worker_id: WorkerId,
    /// Increments with every heartbeat; restarts at 0 when the process restarts.
    pub seq: u64,
    /// Sent at (unix ms).
    pub at_ms: u64,
    /// The process started at (unix ms); a change means the worker restarted.
    pub started_ms: u64,
    /// The provider's name (`process`, `fake`, `qemu`, `firecracker`).
    pub provider: String,
    /// Most VMs this worker holds at once.
    pub max_vms: u32,
    /// VMs it holds now (running + stopped).
    pub used_vms: u32,
    /// It is shutting down and takes no new jobs.
    #[serde(default)]
    pub draining: bool,
    /// Jobs running now.
    #[serde(default)]
    pub jobs_in_flight: u32,
    /// Execs running or waiting for their VM's lock now.
    #[serde(default)]
    pub execs_in_flight: u32,
    /// Every VM it holds (workers before the inventory digest; empty when `inventory` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmInfo>,
    /// Its VM inventory in brief: a digest, and what changed since the previous heartbeat. The
    /// scheduler pages the full inventory (`list_vms_page`) only when its view does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<InventoryDigest>,
    /// Software versions.
    #[serde(default)]
    pub versions: Versions,
    /// The isolation its sessions get.
    #[serde(default)]
    pub isolation: IsolationReport,
}

/// A worker's VM inventory in brief, in every heartbeat: which generation it is, a hash of its
/// contents, and (when few VMs changed) the changes since the previous generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryDigest {
    /// Increments whenever the inventory changed between two heartbeats; restarts with the
    /// worker process (`started_ms`).
    pub generation: u64,
    /// [`inventory_hash`] of every VM.
    pub hash: u64,
    /// VMs in the inventory.
    pub count: u32,
    /// What changed since generation `delta.base`; absent when nothing changed or too much did
    /// (then `changes` says how much).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<InventoryDelta>,
    /// When more than [`MAX_INVENTORY_DELTA`] VMs changed since the previous generation: how
    /// many (removed + changed), for `list_vm_changes` to page; 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub changes: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The changes from one inventory generation to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryDelta {
    /// The generation these changes apply to.
    pub base: u64,
    /// VMs added or changed (their whole new state).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<VmInfo>,
    /// VMs gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<VmId>,
}

/// The most changes a heartbeat carries (~130 bytes each): beyond it the scheduler pages.
pub const MAX_INVENTORY_DELTA: usize = 256;

/// A VM's contribution to [`inventory_hash`]: FNV-1a over every field but `notes` (fixed, so
/// that any two Hearth versions agree).
pub fn vm_hash(vm: &VmInfo) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    };
    eat(vm.vm_id.as_str().as_bytes());
    eat(vm.state.as_str().as_bytes());
    eat(vm.template.as_ref().map_or("", |t| t.as_str()).as_bytes());
    eat(&[u8::from(vm.session), u8::from(vm.busy)]);
    eat(&vm.created_ms.to_le_bytes());
    eat(&vm.last_activity_ms.to_le_bytes());
    eat(vm
        .restored_from
        .as_ref()
        .map_or("", |s| s.as_str())
        .as_bytes());
    h
}

/// The hash of an inventory: the XOR of its VMs' [`vm_hash`]es (order-free, and updated in
/// O(1) per changed VM).
pub fn inventory_hash<'a>(vms: impl IntoIterator<Item = &'a VmInfo>) -> u64 {
    vms.into_iter().fold(0, |h, vm| h ^ vm_hash(vm))
}

impl WorkerStatus {
    /// Free VM slots.
    pub fn free_slots(&self) -> u32 {
        self.max_vms.saturating_sub(self.used_vms)
    }
}
