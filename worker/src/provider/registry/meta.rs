//! The metadata every backend records the same way, with a part of its own flattened in: a VM's
//! `meta.json` ([`VmMeta`]) and a snapshot's ([`SnapshotMeta`], also the metadata entry of an
//! export stream). Flattening keeps each backend's files exactly as they were before the
//! backends shared these types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::provider::{
    SnapshotId, SnapshotInfo, TemplateName, VmId, VmSpec, VmState, VmView, now_ms,
};

/// Version of the metadata files. A snapshot of another format is refused on import.
pub(crate) const META_FORMAT: u32 = 1;

/// A VM's `meta.json`. The directory name, not `vm_id`, is authoritative on reopen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VmMeta<V> {
    pub format: u32,
    pub vm_id: VmId,
    pub state: VmState,
    pub template: Option<TemplateName>,
    pub created_ms: u64,
    pub last_activity_ms: u64,
    pub stopped_ms: Option<u64>,
    pub restored_from: Option<SnapshotId>,
    /// The VM's environment: its template's, under the snapshot's it was restored from.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What only this backend records (sizes, the VMM process, its machine).
    #[serde(flatten)]
    pub backend: V,
}

impl<V> VmMeta<V> {
    /// A VM created now from `spec` (restored from `snapshot`, if any): running, its template
    /// and environment inherited from the snapshot under the spec's own.
    pub(crate) fn created<S>(
        vm_id: &VmId,
        spec: &VmSpec,
        snapshot: Option<&SnapshotMeta<S>>,
        backend: V,
    ) -> Self {
        let now = now_ms();
        Self {
            format: META_FORMAT,
            vm_id: vm_id.clone(),
            state: VmState::Running,
            template: spec
                .template
                .clone()
                .or_else(|| snapshot.and_then(|s| s.template.clone())),
            created_ms: now,
            last_activity_ms: now,
            stopped_ms: None,
            restored_from: spec.restore_from.clone(),
            env: inherited_env(spec, snapshot),
            backend,
        }
    }

    pub(crate) fn view(&self) -> VmView {
        VmView {
            vm_id: self.vm_id.clone(),
            state: self.state,
            template: self.template.clone(),
            created_ms: self.created_ms,
            last_activity_ms: self.last_activity_ms,
            stopped_ms: self.stopped_ms,
            restored_from: self.restored_from.clone(),
        }
    }

    /// Now running (started).
    pub(crate) fn mark_running(&mut self) {
        self.state = VmState::Running;
        self.stopped_ms = None;
        self.last_activity_ms = now_ms();
    }

    /// Now paused (to disk, or frozen).
    pub(crate) fn mark_paused(&mut self) {
        let now = now_ms();
        self.state = VmState::Paused;
        self.stopped_ms = Some(now);
        self.last_activity_ms = now;
    }

    /// Now stopped.
    pub(crate) fn mark_stopped(&mut self) {
        let now = now_ms();
        self.state = VmState::Stopped;
        self.stopped_ms = Some(now);
        self.last_activity_ms = now;
    }
}

/// The environment of a VM created from `spec`: the snapshot's, under the spec's own.
pub(crate) fn inherited_env<S>(
    spec: &VmSpec,
    snapshot: Option<&SnapshotMeta<S>>,
) -> BTreeMap<String, String> {
    let mut env = snapshot.map(|s| s.env.clone()).unwrap_or_default();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// What a backend's part of a snapshot's metadata must say.
pub(crate) trait SnapshotBackend {
    /// Bytes the snapshot occupies on this worker.
    fn size_bytes(&self) -> u64;
}

/// A snapshot's `meta.json`, also the metadata entry of its export stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotMeta<S> {
    pub format: u32,
    pub snapshot_id: SnapshotId,
    pub source_vm: Option<VmId>,
    pub template: Option<TemplateName>,
    pub created_ms: u64,
    /// The source VM's env, inherited by VMs restored from the snapshot.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What only this backend records (checksums, the machine to restore into).
    #[serde(flatten)]
    pub backend: S,
}

impl<S: SnapshotBackend> SnapshotMeta<S> {
    /// A snapshot of `vm` taken now, as `snapshot_id`.
    pub(crate) fn of<V>(snapshot_id: &SnapshotId, vm: &VmMeta<V>, backend: S) -> Self {
        Self {
            format: META_FORMAT,
            snapshot_id: snapshot_id.clone(),
            source_vm: Some(vm.vm_id.clone()),
            template: vm.template.clone(),
            created_ms: now_ms(),
            env: vm.env.clone(),
            backend,
        }
    }

    pub(crate) fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: self.snapshot_id.clone(),
            source_vm: self.source_vm.clone(),
            template: self.template.clone(),
            created_ms: self.created_ms,
            size_bytes: self.backend.size_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Part {
        instance: String,
        #[serde(default)]
        identity_pending: bool,
    }

    #[test]
    fn the_backend_part_is_flattened_into_the_same_file() {
        let spec = VmSpec {
            env: [("A".to_owned(), "spec".to_owned())].into(),
            ..VmSpec::default()
        };
        let id = VmId::new("vm-1").unwrap();
        let meta = VmMeta::created::<()>(
            &id,
            &spec,
            None,
            Part {
                instance: "abc".into(),
                identity_pending: false,
            },
        );
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(json["instance"], "abc");
        assert_eq!(json["vm_id"], "vm-1");
        // A file written before the field existed still reads.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("identity_pending");
        let back: VmMeta<Part> = serde_json::from_value(old).unwrap();
        assert_eq!(back.backend, meta.backend);
        assert_eq!(back.env["A"], "spec");
    }
}
