//! Internal job protocol: the scheduler sends lifecycle jobs to `<prefix>.v1.workers.<wid>.jobs`.
//!
//! Every job carries a `job_id`. A worker answers a repeated `job_id` with the first outcome and
//! does not run the job twice, so the scheduler may retry after a lost reply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::TerminationReason;
use crate::ids::{JobId, SnapshotId, TemplateName, TenantId, VmId};

/// The object-store names of uploaded paused state start with this (`paused/<tenant>/<sid>`,
/// `-` for the operator's sessions); a snapshot id cannot contain `/`, so they never collide.
pub const PAUSED_OBJECT_PREFIX: &str = "paused/";

/// The object-store name of a session's uploaded paused state.
pub fn paused_object_key(tenant: Option<&TenantId>, vm_id: &VmId) -> String {
    let tenant = tenant.map_or("-", TenantId::as_str);
    format!("{PAUSED_OBJECT_PREFIX}{tenant}/{vm_id}")
}

/// A lifecycle job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Idempotency key.
    pub job_id: JobId,
    /// What to do.
    pub op: JobOp,
    /// Fencing token: the revision of the leader lease the sending scheduler holds. A worker
    /// refuses (409) a job whose revision is older than the newest it has seen, so a deposed
    /// leader cannot act. 0 (absent) says the sender holds no lease (operator tools, tests): such a
    /// job is not fenced and does not raise the worker's newest revision.
    #[serde(default)]
    pub lease_revision: u64,
    /// The tenant owning the session a job with `session: true` makes (a claim's rename or cold
    /// create): the worker's data plane then serves that VM to this tenant (and the operator)
    /// only, and answers anyone else 404. Absent: the operator's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
}

/// The lifecycle operations, mirroring the provider trait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobOp {
    /// Create a VM with the worker's defaults.
    CreateVm {
        /// The new VM's id.
        vm_id: VmId,
        /// Serve the session data plane for it (a cold claim creates the session's VM directly).
        #[serde(default)]
        session: bool,
    },
    /// Create a VM from a spec; with `spec.restore_from`, restore a snapshot instead of booting.
    /// The worker replies only after a health exec in the new VM succeeds.
    CreateVmWithSpec {
        /// The new VM's id.
        vm_id: VmId,
        /// How to build it.
        spec: VmSpec,
        /// Serve the session data plane for it.
        #[serde(default)]
        session: bool,
    },
    /// Start (resume) a stopped VM.
    StartVm {
        /// The VM.
        vm_id: VmId,
    },
    /// Stop a running VM (idle timeout).
    StopVm {
        /// The VM.
        vm_id: VmId,
    },
    /// Pause a running or stopped VM to disk (`sessions.<sid>.pause`, `idle_action = "pause"`,
    /// `ttl_action = "pause"`): its whole state is kept and the next exec, file transfer or
    /// `start_vm` resumes it. 409 while a command or file transfer holds the VM.
    PauseVm {
        /// The VM.
        vm_id: VmId,
    },
    /// Upload a paused VM's state (`pause_upload`) to the fleet's object store as `key` (which
    /// must start with [`PAUSED_OBJECT_PREFIX`]), chunked and checksummed; replies `uploaded`
    /// once the object is complete. 400 if the VM is not paused to disk or the provider cannot
    /// export a paused VM (the process provider keeps a paused session in memory).
    UploadPausedVm {
        /// The VM.
        vm_id: VmId,
        /// The object's name.
        key: String,
    },
    /// Bring a paused VM whose worker was lost back on this worker from the object `key`: the
    /// state is downloaded, its checksums verified, the same machine restored (not a new
    /// identity) and resumed, and its session's data plane served. 400 if the object is missing,
    /// corrupt or does not fit this worker (nothing of the VM is left here then).
    RestorePausedVm {
        /// The VM (the session id).
        vm_id: VmId,
        /// The object's name.
        key: String,
    },
    /// Capture a VM as a snapshot.
    SnapshotVm {
        /// The VM.
        vm_id: VmId,
        /// The snapshot's name (fails if it exists).
        snapshot_id: SnapshotId,
        /// Also upload it to the fleet's object store, so any worker can restore it.
        #[serde(default)]
        publish: bool,
    },
    /// Destroy a VM (terminal).
    DestroyVm {
        /// The VM.
        vm_id: VmId,
        /// Back the volume up first (to the worker's configured backup destination).
        #[serde(default)]
        backup: bool,
        /// Why, for the VM event.
        #[serde(default)]
        reason: Option<TerminationReason>,
    },
    /// Rename a VM: the warm-pool hand-off. The VM keeps running and keeps its state.
    RenameVm {
        /// The pooled VM's id.
        vm_id: VmId,
        /// Its new id (the session id).
        new_vm_id: VmId,
        /// Serve the session data plane under the new id (true for a claim).
        #[serde(default)]
        session: bool,
    },
    /// Report every VM the worker holds (operators, small workers; the scheduler pages with
    /// `list_vms_page`, since a large inventory does not fit one message).
    ListVms {},
    /// One page of the worker's inventory as of its latest heartbeat (generation `generation`):
    /// VMs with ids after `after`, at most `limit` (clamped to [`MAX_INVENTORY_PAGE`]). The first
    /// page (no `generation`) names the generation the following pages must ask for; a page of
    /// a generation the worker no longer holds is a conflict (start again).
    ListVmsPage {
        /// Ids strictly after this one (`None`: from the start).
        #[serde(default)]
        after: Option<VmId>,
        /// Most VMs in the page.
        #[serde(default)]
        limit: u32,
        /// The generation being paged (`None` on the first page).
        #[serde(default)]
        generation: Option<u64>,
    },
    /// One page of the changes that made generation `generation` of the inventory from the one
    /// before it, when they were too many for the heartbeat (its digest says how many): the
    /// removed ids, then the changed VMs, as one list, entries `offset..offset + limit` (limit
    /// clamped to [`MAX_INVENTORY_PAGE`]). A generation the worker no longer holds is a conflict
    /// (page the whole inventory instead).
    ListVmChanges {
        /// The generation whose changes are asked for.
        generation: u64,
        /// Entries to skip.
        #[serde(default)]
        offset: u32,
        /// Most entries in the page.
        #[serde(default)]
        limit: u32,
    },
    /// Delete a snapshot from this worker (garbage collection of a replaced template snapshot).
    /// Idempotent: a snapshot the worker does not have is not an error.
    DeleteSnapshot {
        /// The snapshot.
        snapshot_id: SnapshotId,
        /// Also delete it from the fleet's object store (a missing object is not an error).
        #[serde(default)]
        unpublish: bool,
    },
    /// Report one VM (a `destroyed` tombstone included); 404 if the worker never had it.
    GetVm {
        /// The VM.
        vm_id: VmId,
    },
    /// Report the snapshots on this worker: all of them, or those taken of `vm_id` while it had
    /// that id (404 if the VM is unknown).
    ListSnapshots {
        /// Only the snapshots of this VM.
        #[serde(default)]
        vm_id: Option<VmId>,
    },
    /// Back the VM's volume up to the worker's backup destination without destroying it (the
    /// scheduler's `backup_after_s` timer). 409 if the worker has no backup destination.
    BackupVm {
        /// The VM.
        vm_id: VmId,
    },
}

impl JobOp {
    /// Every op's [`Self::name`] (metrics start each at zero).
    pub const NAMES: &'static [&'static str] = &[
        "create_vm",
        "create_vm_with_spec",
        "start_vm",
        "stop_vm",
        "pause_vm",
        "upload_paused_vm",
        "restore_paused_vm",
        "snapshot_vm",
        "destroy_vm",
        "rename_vm",
        "list_vms",
        "delete_snapshot",
        "get_vm",
        "list_snapshots",
        "backup_vm",
    ];

    /// A short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            JobOp::CreateVm { .. } => "create_vm",
            JobOp::CreateVmWithSpec { .. } => "create_vm_with_spec",
            JobOp::StartVm { .. } => "start_vm",
            JobOp::StopVm { .. } => "stop_vm",
            JobOp::PauseVm { .. } => "pause_vm",
            JobOp::UploadPausedVm { .. } => "upload_paused_vm",
            JobOp::RestorePausedVm { .. } => "restore_paused_vm",
            JobOp::SnapshotVm { .. } => "snapshot_vm",
            JobOp::DestroyVm { .. } => "destroy_vm",
            JobOp::RenameVm { .. } => "rename_vm",
            JobOp::ListVms {} => "list_vms",
            JobOp::ListVmsPage { .. } => "list_vms_page",
            JobOp::ListVmChanges { .. } => "list_vm_changes",
            JobOp::DeleteSnapshot { .. } => "delete_snapshot",
            JobOp::GetVm { .. } => "get_vm",
            JobOp::ListSnapshots { .. } => "list_snapshots",
            JobOp::BackupVm { .. } => "backup_vm",
        }
    }

    /// The VM the job acts on (the per-VM lock it takes), if any. A rename locks the old id;
    /// `delete_snapshot` takes a per-snapshot lock instead; the queries (`list_vms`, `get_vm`,
    /// `list_snapshots`) take none, so they never wait behind a running command.
    pub fn vm_id(&self) -> Option<&VmId> {
        match self {
            JobOp::CreateVm { vm_id, .. }
            | JobOp::CreateVmWithSpec { vm_id, .. }
            | JobOp::StartVm { vm_id }
            | JobOp::StopVm { vm_id }
            | JobOp::PauseVm { vm_id }
            | JobOp::UploadPausedVm { vm_id, .. }
            | JobOp::RestorePausedVm { vm_id, .. }
            | JobOp::SnapshotVm { vm_id, .. }
            | JobOp::DestroyVm { vm_id, .. }
            | JobOp::RenameVm { vm_id, .. }
            | JobOp::BackupVm { vm_id } => Some(vm_id),
            JobOp::ListVms {}
            | JobOp::ListVmsPage { .. }
            | JobOp::ListVmChanges { .. }
            | JobOp::DeleteSnapshot { .. }
            | JobOp::GetVm { .. }
            | JobOp::ListSnapshots { .. } => None,
        }
    }
}

/// How to build a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The template the VM belongs to.
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// vCPUs (providers that cannot limit them ignore it).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory in MiB (providers that cannot limit it ignore it).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Disk quota of the VM's volume in MiB (0 = none; providers that cannot limit it ignore it).
    #[serde(default)]
    pub disk_mib: Option<u32>,
    /// Most processes at once (0 = no limit).
    #[serde(default)]
    pub max_processes: Option<u32>,
    /// `none` or `egress`.
    #[serde(default)]
    pub network: Option<String>,
    /// Environment for every command in the VM.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Provider-specific base image: for `process` and `oci`, a directory or `.tar`/`.tar.zst` on
    /// the worker that seeds the volume, or a container image (OCI layout or archive, `docker
    /// save` tarball) whose root filesystem the VM runs on.
    #[serde(default)]
    pub base: Option<String>,
    /// Command run once after a cold create (not after a restore); the job fails if it fails.
    #[serde(default)]
    pub bootstrap: Option<Vec<String>>,
    /// Restore this snapshot instead of booting; fetched from the object store if the worker does
    /// not have it.
    #[serde(default)]
    pub restore_from: Option<SnapshotId>,
    /// A nix profile (flake reference) to hydrate after a cold create, with
    /// `nix develop <profile> --command true` in the VM, when the VM has `nix`. A failure only
    /// warns; the outcome is a note in the created VM's `notes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix_profile: Option<String>,
}

/// A VM's state as workers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Booted and accepting exec.
    Running,
    /// Paused in memory; exec resumes it.
    Stopped,
    /// Paused to disk (VMM process ended) or frozen (process provider); exec resumes it.
    Paused,
    /// Gone (terminal).
    Destroyed,
}

impl VmState {
    /// Lowercase name for labels.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Paused => "paused",
            VmState::Destroyed => "destroyed",
        }
    }
}

/// One VM as a worker reports it (job replies and heartbeats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's id (the session id once claimed).
    pub vm_id: VmId,
    /// Its state.
    pub state: VmState,
    /// Its template.
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// Whether the worker serves the session data plane for it.
    #[serde(default)]
    pub session: bool,
    /// Created (unix ms).
    #[serde(default)]
    pub created_ms: u64,
    /// Last exec or file activity (unix ms); the scheduler's idle timer reads it.
    #[serde(default)]
    pub last_activity_ms: u64,
    /// Restored from this snapshot.
    #[serde(default)]
    pub restored_from: Option<SnapshotId>,
    /// True while a command, file transfer or lifecycle job holds the VM (or waits for it): the
    /// VM is in use even if `last_activity_ms` is old, and the scheduler never idle-stops it.
    #[serde(default)]
    pub busy: bool,
    /// What the worker wants people to know about how the VM was made (in a create's reply):
    /// e.g. that its `nix_profile` could not be hydrated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A snapshot as a worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its id.
    pub snapshot_id: SnapshotId,
    /// The VM it was taken of.
    #[serde(default)]
    pub source_vm: Option<VmId>,
    /// The VM's template.
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// Taken at (unix ms).
    #[serde(default)]
    pub created_ms: u64,
    /// Size of the artifact in bytes.
    #[serde(default)]
    pub size_bytes: u64,
    /// Uploaded to the fleet's object store.
    #[serde(default)]
    pub published: bool,
}

/// The most VMs in one `list_vms_page` reply (a VM is ~130 bytes encoded, ~600 at the
/// longest ids: a page stays far below NATS's 1 MB default `max_payload`).
pub const MAX_INVENTORY_PAGE: u32 = 512;

/// A successful job's reply; failures are error replies (headers + [`crate::WireError`] body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReply {
    /// The job answered.
    pub job_id: JobId,
    /// What it produced.
    pub output: JobOutput,
}

/// What a job produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobOutput {
    /// The VM after the job (create, start, stop, rename).
    Vm {
        /// The VM.
        vm: VmInfo,
    },
    /// The snapshot taken.
    Snapshot {
        /// The snapshot.
        snapshot: SnapshotInfo,
    },
    /// Every VM the worker holds, sorted by id.
    Vms {
        /// The VMs.
        vms: Vec<VmInfo>,
    },
    /// One page of the inventory (list_vms_page), sorted by id.
    VmsPage {
        /// The VMs.
        vms: Vec<VmInfo>,
        /// Ask for the next page after this id; `None` on the last page.
        #[serde(default)]
        next: Option<VmId>,
        /// The inventory being paged, as its heartbeats describe it.
        digest: crate::events::InventoryDigest,
    },
    /// One page of a generation's changes (list_vm_changes).
    VmChanges {
        /// This page's share of the changes (`base` is the generation they apply to).
        delta: crate::events::InventoryDelta,
        /// Ask for the next page at this offset; `None` on the last page.
        #[serde(default)]
        next: Option<u32>,
    },
    /// Done, nothing to report (destroy, delete_snapshot, backup).
    Done {},
    /// A paused VM's state uploaded (upload_paused_vm).
    Uploaded {
        /// The object's size.
        bytes: u64,
    },
    /// Snapshots on the worker, sorted by id (list_snapshots).
    Snapshots {
        /// The snapshots.
        snapshots: Vec<SnapshotInfo>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ops_are_tagged_maps() {
        let job = JobRequest {
            job_id: JobId::new("j1").unwrap(),
            op: JobOp::RenameVm {
                vm_id: VmId::new("pool-1").unwrap(),
                new_vm_id: VmId::new("s1").unwrap(),
                session: true,
            },
            lease_revision: 0,
            tenant: None,
        };
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["op"]["kind"], "rename_vm");
        assert_eq!(json["op"]["new_vm_id"], "s1");
        let back: JobRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.op.vm_id().unwrap().as_str(), "pool-1");
    }

    #[test]
    fn delete_snapshot_is_tagged_and_locks_no_vm() {
        let op: JobOp =
            serde_json::from_str(r#"{"kind":"delete_snapshot","snapshot_id":"snap-1"}"#).unwrap();
        assert_eq!(
            op,
            JobOp::DeleteSnapshot {
                snapshot_id: SnapshotId::new("snap-1").unwrap(),
                unpublish: false,
            }
        );
        assert_eq!(op.name(), "delete_snapshot");
        assert!(op.vm_id().is_none());
    }

    #[test]
    fn vm_info_without_busy_is_not_busy() {
        // What a worker from before the field sends.
        let vm: VmInfo = serde_json::from_str(r#"{"vm_id":"v","state":"running"}"#).unwrap();
        assert!(!vm.busy);
        assert_eq!(vm.last_activity_ms, 0);
    }

    #[test]
    fn unknown_job_kind_is_an_error_not_a_panic() {
        let err = serde_json::from_str::<JobRequest>(r#"{"job_id":"j","op":{"kind":"explode"}}"#);
        assert!(err.is_err());
    }
}
