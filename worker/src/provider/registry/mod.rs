//! The one VM registry of the disk-backed backends (process, qemu, firecracker): which VMs exist
//! (`vms`), which ids are taken but not visible yet (`creating`: creates and rename targets),
//! which were destroyed or failed (`tombstones`), which snapshots exist and which are being
//! written (`snapshotting`); and the only [`VmQuery`] implementation they use.
//!
//! A backend plugs in as a [`Backend`]: its part of a VM's and a snapshot's `meta.json` and what
//! runs a VM (its `Runtime`: a VMM process, a sandbox). The registry owns the backend's
//! [`StateRoot`], so ids and directories move together:
//!
//! - **create**: [`Registry::reserve_vm`] takes the id (and finds the snapshot to restore);
//!   the [`VmReservation`] makes the VM's directory, and [`VmReservation::commit`] writes its
//!   `meta.json` (the commit point) and makes it visible. Dropped uncommitted — an error, or the
//!   create's future dropped half way — it moves the directory to the trash and frees the id.
//! - **rename**: [`Registry::reserve_rename`] takes the new id while the backend tells the guest;
//!   [`Registry::commit_rename`] renames the directory (never over another) and moves the record.
//! - **destroy / failure**: [`Registry::destroy`] and [`Registry::bury_failed`] leave a
//!   tombstone (with the failure's reason), so a later call says `destroyed` or `failed: …`.
//! - **snapshots**: a [`SnapshotStaging`] reserves the id and a staging directory under `tmp/`;
//!   [`SnapshotStaging::publish`] writes `meta.json` and renames the directory into place.
//!
//! Every guard releases what it holds in `Drop`, with file work on the blocking pool, never on
//! the async threads. Lock order: the index, then a record's slot; neither is held across an
//! `.await`.

pub(crate) mod meta;
pub(crate) mod state_root;
mod tombstones;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

pub(crate) use meta::{META_FORMAT, SnapshotBackend, SnapshotMeta, VmMeta};
use state_root::{
    StateRoot, blocking, in_background, read_json, remove_dir_logged, rename_noreplace,
    write_json_atomic,
};
pub use tombstones::TOMBSTONE_CAPACITY;
pub(crate) use tombstones::Tombstones;

use super::{
    ProviderError, SnapshotId, SnapshotInfo, VmId, VmQuery, VmState, VmView, lifecycle, now_ms,
};

/// What a backend plugs into the registry.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Its part of a VM's `meta.json`.
    type Vm: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What runs a VM (a VMM process, a sandbox); cloned out of the slot for each call.
    type Runtime: Clone + Debug + Send + Sync + 'static;
    /// Its part of a snapshot's `meta.json`.
    type Snapshot: SnapshotBackend
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;
}

/// One live VM.
#[derive(Debug)]
pub(crate) struct VmRecord<B: Backend> {
    pub slot: Mutex<VmSlot<B>>,
    /// Held while the VM's runtime is being (re)started, so two callers never start two.
    pub launching: tokio::sync::Mutex<()>,
}

/// A VM's mutable part: where it is on disk, what it records, what runs it.
#[derive(Debug)]
pub(crate) struct VmSlot<B: Backend> {
    pub dir: PathBuf,
    pub meta: VmMeta<B::Vm>,
    pub runtime: B::Runtime,
}

impl<B: Backend> VmRecord<B> {
    fn new(dir: PathBuf, meta: VmMeta<B::Vm>, runtime: B::Runtime) -> Arc<Self> {
        Arc::new(Self {
            slot: Mutex::new(VmSlot { dir, meta, runtime }),
            launching: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn view(&self) -> VmView {
        self.slot.lock().meta.view()
    }

    pub(crate) fn runtime(&self) -> B::Runtime {
        self.slot.lock().runtime.clone()
    }

    /// Bumps the VM's activity (an exec or a transfer started or ended).
    pub(crate) fn touch(&self) {
        self.slot.lock().meta.last_activity_ms = now_ms();
    }

    /// The runtime of a running VM, its activity bumped; `InvalidState` unless running.
    pub(crate) fn touch_running(&self, vm_id: &VmId) -> Result<B::Runtime, ProviderError> {
        let mut slot = self.slot.lock();
        lifecycle::require_running(vm_id, slot.meta.state)?;
        slot.meta.last_activity_ms = now_ms();
        Ok(slot.runtime.clone())
    }

    /// Writes the VM's `meta.json` as it is now (off the async threads).
    pub(crate) async fn save(&self) -> Result<(), ProviderError> {
        let (meta, dir) = {
            let slot = self.slot.lock();
            (slot.meta.clone(), slot.dir.clone())
        };
        blocking(move || write_json_atomic(&dir.join("meta.json"), &meta)).await
    }
}

#[derive(Debug)]
struct Index<B: Backend> {
    vms: BTreeMap<VmId, Arc<VmRecord<B>>>,
    /// Ids being created or renamed to: taken, not visible yet.
    creating: HashSet<VmId>,
    tombstones: Tombstones,
    snapshots: BTreeMap<SnapshotId, SnapshotMeta<B::Snapshot>>,
    /// Snapshot ids being written or imported.
    snapshotting: HashSet<SnapshotId>,
}

impl<B: Backend> Index<B> {
    /// The live record of `vm_id`; `InvalidState` for a tombstone (saying why it failed, if it
    /// did), `NotFound` otherwise.
    fn record(&self, vm_id: &VmId) -> Result<Arc<VmRecord<B>>, ProviderError> {
        if let Some(record) = self.vms.get(vm_id) {
            return Ok(record.clone());
        }
        if self.tombstones.get(vm_id).is_some() {
            return Err(match self.tombstones.failure(vm_id) {
                Some(reason) => ProviderError::InvalidState(format!("vm {vm_id} failed: {reason}")),
                None => ProviderError::vm_destroyed(vm_id),
            });
        }
        Err(ProviderError::vm_not_found(vm_id))
    }

    fn take_vm_id(&mut self, vm_id: &VmId) -> Result<(), ProviderError> {
        if self.vms.contains_key(vm_id) || !self.creating.insert(vm_id.clone()) {
            return Err(ProviderError::vm_exists(vm_id));
        }
        Ok(())
    }

    fn take_snapshot_id(&mut self, snapshot_id: &SnapshotId) -> Result<(), ProviderError> {
        if self.snapshots.contains_key(snapshot_id)
            || !self.snapshotting.insert(snapshot_id.clone())
        {
            return Err(ProviderError::snapshot_exists(snapshot_id));
        }
        Ok(())
    }

    /// Removes `vm_id` and leaves a tombstone (with a failure reason, if any).
    fn bury(&mut self, vm_id: &VmId, mut view: VmView, failure: Option<String>) {
        self.vms.remove(vm_id);
        view.last_activity_ms = now_ms();
        self.tombstones.bury(view, failure);
    }
}

/// A snapshot's metadata in backend `B`.
pub(crate) type Snapshot<B> = SnapshotMeta<<B as Backend>::Snapshot>;

/// How a backend removes a VM directory it abandons.
type Discard = Box<dyn FnOnce(&Path) + Send>;

/// A backend's VMs and snapshots, in memory and under its state root.
#[derive(Debug)]
pub(crate) struct Registry<B: Backend> {
    root: StateRoot,
    index: Mutex<Index<B>>,
}

impl<B: Backend> Registry<B> {
    pub(crate) fn new(root: StateRoot) -> Self {
        Self {
            root,
            index: Mutex::new(Index {
                vms: BTreeMap::new(),
                creating: HashSet::new(),
                tombstones: Tombstones::default(),
                snapshots: BTreeMap::new(),
                snapshotting: HashSet::new(),
            }),
        }
    }

    pub(crate) fn root(&self) -> &StateRoot {
        &self.root
    }

    /// The live record of `vm_id` (see [`Index::record`]).
    pub(crate) fn record(&self, vm_id: &VmId) -> Result<Arc<VmRecord<B>>, ProviderError> {
        self.index.lock().record(vm_id)
    }

    /// A running VM's record and runtime; bumps its activity.
    pub(crate) fn running(
        &self,
        vm_id: &VmId,
    ) -> Result<(Arc<VmRecord<B>>, B::Runtime), ProviderError> {
        let record = self.record(vm_id)?;
        let runtime = record.touch_running(vm_id)?;
        Ok((record, runtime))
    }

    /// Every live record (shutdown, drop).
    pub(crate) fn records(&self) -> Vec<Arc<VmRecord<B>>> {
        self.index.lock().vms.values().cloned().collect()
    }

    /// The id and record of the live VM whose slot matches `pred` (the VM of a runtime).
    pub(crate) fn find(
        &self,
        pred: impl Fn(&VmSlot<B>) -> bool,
    ) -> Option<(VmId, Arc<VmRecord<B>>)> {
        let index = self.index.lock();
        index
            .vms
            .iter()
            .find(|(_, record)| pred(&record.slot.lock()))
            .map(|(id, record)| (id.clone(), record.clone()))
    }

    /// Indexes a VM found on disk by the backend's reconcile (at open). The directory name wins
    /// over the recorded id (a crash between a rename and the meta rewrite).
    pub(crate) fn adopt(
        &self,
        vm_id: VmId,
        dir: PathBuf,
        mut meta: VmMeta<B::Vm>,
        runtime: B::Runtime,
    ) -> Result<(), ProviderError> {
        if meta.vm_id != vm_id {
            meta.vm_id = vm_id.clone();
            write_json_atomic(&dir.join("meta.json"), &meta)?;
        }
        self.index
            .lock()
            .vms
            .insert(vm_id, VmRecord::new(dir, meta, runtime));
        Ok(())
    }

    /// The VM directories under `vms/` with their ids (blocking; reconcile). Entries that are
    /// not VM ids are logged and skipped; a crash's `meta.json.tmp` is removed.
    pub(crate) fn vm_dirs(&self) -> Result<Vec<(VmId, PathBuf)>, ProviderError> {
        let mut dirs = Vec::new();
        for entry in StateRoot::list(self.root.vms_dir())? {
            let dir = entry.path();
            let Some(vm_id) = entry.file_name().to_str().and_then(|n| VmId::new(n).ok()) else {
                warn!(path = %dir.display(), "ignoring entry that is not a vm id");
                continue;
            };
            let _ = std::fs::remove_file(dir.join("meta.json.tmp"));
            dirs.push((vm_id, dir));
        }
        Ok(dirs)
    }

    /// Reserves `vm_id` for a create, after finding the snapshot it restores (`NotFound` if
    /// unknown); `AlreadyExists` if the id is taken.
    pub(crate) fn reserve_vm(
        self: &Arc<Self>,
        vm_id: &VmId,
        restore_from: Option<&SnapshotId>,
    ) -> Result<(VmReservation<B>, Option<Snapshot<B>>), ProviderError> {
        let mut index = self.index.lock();
        let snapshot = match restore_from {
            Some(id) => Some(
                index
                    .snapshots
                    .get(id)
                    .cloned()
                    .ok_or_else(|| ProviderError::snapshot_not_found(id))?,
            ),
            None => None,
        };
        index.take_vm_id(vm_id)?;
        Ok((self.reservation(vm_id), snapshot))
    }

    fn reservation(self: &Arc<Self>, vm_id: &VmId) -> VmReservation<B> {
        VmReservation {
            registry: self.clone(),
            vm_id: vm_id.clone(),
            dir: self.root.vm_dir(vm_id),
            owns_dir: false,
            committed: false,
            discard: None,
        }
    }

    /// The record of `old` and a reservation of `new`, for a rename.
    pub(crate) fn reserve_rename(
        self: &Arc<Self>,
        old: &VmId,
        new: &VmId,
    ) -> Result<(Arc<VmRecord<B>>, VmReservation<B>), ProviderError> {
        let mut index = self.index.lock();
        let record = index.record(old)?;
        index.take_vm_id(new)?;
        Ok((record, self.reservation(new)))
    }

    /// Moves `old` to the id `reservation` holds: renames its directory (never over another;
    /// one `rename(2)`), then runs `update` on its slot; all under the index lock. `InvalidState`
    /// if `old` was destroyed meanwhile. Returns the new view; `meta.json` is not rewritten (the
    /// directory name is authoritative, see [`VmRecord::save`]).
    pub(crate) fn commit_rename(
        &self,
        old: &VmId,
        mut reservation: VmReservation<B>,
        record: &Arc<VmRecord<B>>,
        update: impl FnOnce(&mut VmSlot<B>),
    ) -> Result<VmView, ProviderError> {
        let new = reservation.vm_id.clone();
        let mut index = self.index.lock();
        let mut slot = record.slot.lock();
        if slot.meta.state == VmState::Destroyed || !index.vms.contains_key(old) {
            return Err(ProviderError::vm_destroyed(old));
        }
        rename_noreplace(&slot.dir, &reservation.dir)
            .map_err(|e| ProviderError::io(format!("cannot rename vm {old} to {new}"), e))?;
        slot.dir = reservation.dir.clone();
        slot.meta.vm_id = new.clone();
        slot.meta.last_activity_ms = now_ms();
        update(&mut slot);
        let view = slot.meta.view();
        drop(slot);
        index.vms.remove(old);
        index.creating.remove(&new);
        index.tombstones.remove(&new);
        index.vms.insert(new, record.clone());
        reservation.committed = true;
        Ok(view)
    }

    /// Destroys `vm_id` in the index: runs `end` on its slot (stop its runtime, move its
    /// directory out of the way; an error leaves the VM as it was), marks it destroyed and
    /// leaves a tombstone. `Ok(None)` for a VM already destroyed; `NotFound` if unknown.
    pub(crate) fn destroy<T>(
        &self,
        vm_id: &VmId,
        end: impl FnOnce(&mut VmSlot<B>) -> Result<T, ProviderError>,
    ) -> Result<Option<T>, ProviderError> {
        let mut index = self.index.lock();
        let Some(record) = index.vms.get(vm_id).cloned() else {
            if index.tombstones.get(vm_id).is_some() {
                return Ok(None);
            }
            return Err(ProviderError::vm_not_found(vm_id));
        };
        let mut slot = record.slot.lock();
        let ended = end(&mut slot)?;
        // Marked under the slot lock, so a runtime starting right now is not kept.
        slot.meta.state = VmState::Destroyed;
        let view = slot.meta.view();
        drop(slot);
        index.bury(vm_id, view, None);
        Ok(Some(ended))
    }

    /// A VM's runtime ended on its own: buries the VM whose slot matches `pred` with `reason`
    /// and returns its id and directory (the caller removes it).
    pub(crate) fn bury_failed(
        &self,
        pred: impl Fn(&VmSlot<B>) -> bool,
        reason: String,
    ) -> Option<(VmId, PathBuf)> {
        let mut index = self.index.lock();
        let (vm_id, view, dir) = index.vms.iter().find_map(|(id, record)| {
            let slot = record.slot.lock();
            pred(&slot).then(|| (id.clone(), slot.meta.view(), slot.dir.clone()))
        })?;
        index.bury(&vm_id, view, Some(reason));
        Some((vm_id, dir))
    }

    /// A snapshot's metadata; `NotFound` if unknown.
    pub(crate) fn snapshot(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotMeta<B::Snapshot>, ProviderError> {
        self.index
            .lock()
            .snapshots
            .get(snapshot_id)
            .cloned()
            .ok_or_else(|| ProviderError::snapshot_not_found(snapshot_id))
    }

    /// Reserves `snapshot_id` for an import; `AlreadyExists` if taken.
    pub(crate) fn reserve_snapshot(
        self: &Arc<Self>,
        snapshot_id: &SnapshotId,
    ) -> Result<SnapshotStaging<B>, ProviderError> {
        self.index.lock().take_snapshot_id(snapshot_id)?;
        Ok(self.staging(snapshot_id))
    }

    /// Reserves `snapshot_id` for a snapshot of `vm_id` and returns the VM's record too; the
    /// VM's errors come first, then `AlreadyExists`.
    pub(crate) fn reserve_snapshot_of(
        self: &Arc<Self>,
        vm_id: &VmId,
        snapshot_id: &SnapshotId,
    ) -> Result<(SnapshotStaging<B>, Arc<VmRecord<B>>), ProviderError> {
        let mut index = self.index.lock();
        let record = index.record(vm_id)?;
        index.take_snapshot_id(snapshot_id)?;
        Ok((self.staging(snapshot_id), record))
    }

    fn staging(self: &Arc<Self>, snapshot_id: &SnapshotId) -> SnapshotStaging<B> {
        SnapshotStaging {
            registry: self.clone(),
            snapshot_id: snapshot_id.clone(),
            path: self.root.staging("snapshot"),
            published: false,
        }
    }

    /// Deletes a snapshot: out of the index and moved to the trash at once, removed after.
    pub(crate) async fn delete_snapshot(
        self: &Arc<Self>,
        snapshot_id: &SnapshotId,
    ) -> Result<(), ProviderError> {
        let this = self.clone();
        let snapshot_id = snapshot_id.clone();
        blocking(move || {
            let trash = {
                let mut index = this.index.lock();
                if !index.snapshots.contains_key(&snapshot_id) {
                    return Err(ProviderError::snapshot_not_found(&snapshot_id));
                }
                let trash = this
                    .root
                    .trash(&this.root.snapshot_dir(&snapshot_id), "delete")
                    .map_err(|e| ProviderError::io("cannot remove snapshot", e))?;
                index.snapshots.remove(&snapshot_id);
                trash
            };
            tracing::info!(%snapshot_id, "deleted snapshot");
            remove_dir_logged(&trash);
            Ok(())
        })
        .await
    }

    /// Indexes every snapshot under `snapshots/` whose `meta.json` reads and that `check`
    /// accepts (its files there and of the recorded size, say); logs and skips the rest.
    /// Blocking; reconcile.
    pub(crate) fn load_snapshots(
        &self,
        check: impl Fn(&Path, SnapshotMeta<B::Snapshot>) -> Result<SnapshotMeta<B::Snapshot>, String>,
    ) -> Result<(), ProviderError> {
        let mut index = self.index.lock();
        for entry in StateRoot::list(self.root.snapshots_dir())? {
            let dir = entry.path();
            let Some(snapshot_id) = entry
                .file_name()
                .to_str()
                .and_then(|n| SnapshotId::new(n).ok())
            else {
                warn!(path = %dir.display(), "ignoring entry that is not a snapshot id");
                continue;
            };
            let meta: SnapshotMeta<B::Snapshot> = match read_json(&dir.join("meta.json")) {
                Ok(meta) => meta,
                Err(e) => {
                    warn!(%snapshot_id, error = %e, "ignoring snapshot with unreadable meta.json");
                    continue;
                }
            };
            let meta = SnapshotMeta {
                snapshot_id: snapshot_id.clone(),
                ..meta
            };
            match check(&dir, meta) {
                Ok(meta) => {
                    index.snapshots.insert(snapshot_id, meta);
                }
                Err(why) => warn!(%snapshot_id, why, "ignoring snapshot"),
            }
        }
        tracing::info!(
            vms = index.vms.len(),
            snapshots = index.snapshots.len(),
            "provider state reconciled"
        );
        Ok(())
    }
}

/// A VM id taken for a create or a rename, and the directory a create makes. Dropped without
/// [`commit`](Self::commit): the directory (if this create made it) goes to the trash, then the
/// id is free again.
pub(crate) struct VmReservation<B: Backend> {
    registry: Arc<Registry<B>>,
    vm_id: VmId,
    dir: PathBuf,
    /// Set once this create made `dir`; a directory it did not make is never removed.
    owns_dir: bool,
    committed: bool,
    /// How the backend removes a VM directory it abandons (unmount a disk first, say).
    discard: Option<Discard>,
}

impl<B: Backend> Debug for VmReservation<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmReservation")
            .field("vm_id", &self.vm_id)
            .field("dir", &self.dir)
            .field("owns_dir", &self.owns_dir)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> VmReservation<B> {
    /// The VM's directory (made by [`make_dir`](Self::make_dir) or at commit).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// How to remove the directory if the create fails (default: delete the tree).
    pub(crate) fn on_abort(&mut self, discard: impl FnOnce(&Path) + Send + 'static) {
        self.discard = Some(Box::new(discard));
    }

    /// Makes the VM's directory (`AlreadyExists` as an I/O error if something is there).
    pub(crate) async fn make_dir(&mut self) -> Result<(), ProviderError> {
        let dir = self.dir.clone();
        blocking(move || {
            std::fs::create_dir(&dir)
                .map_err(|e| ProviderError::io(format!("cannot create {}", dir.display()), e))
        })
        .await?;
        self.owns_dir = true;
        Ok(())
    }

    /// Writes the VM's `meta.json` (the commit point; the directory is made if it is not yet)
    /// and makes the VM visible.
    pub(crate) async fn commit(
        mut self,
        meta: VmMeta<B::Vm>,
        runtime: B::Runtime,
    ) -> Result<Arc<VmRecord<B>>, ProviderError> {
        if !self.owns_dir {
            self.make_dir().await?;
        }
        {
            let (dir, meta) = (self.dir.clone(), meta.clone());
            blocking(move || write_json_atomic(&dir.join("meta.json"), &meta)).await?;
        }
        let record = VmRecord::new(self.dir.clone(), meta, runtime);
        let mut index = self.registry.index.lock();
        index.creating.remove(&self.vm_id);
        index.tombstones.remove(&self.vm_id);
        index.vms.insert(self.vm_id.clone(), record.clone());
        self.committed = true;
        Ok(record)
    }
}

impl<B: Backend> Drop for VmReservation<B> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let registry = &self.registry;
        // Out of vms/ first (one rename), so a crash cannot resurrect a half-made VM.
        let doomed = self.owns_dir.then(|| {
            registry
                .root
                .trash(&self.dir, "create")
                .unwrap_or_else(|_| self.dir.clone())
        });
        registry.index.lock().creating.remove(&self.vm_id);
        if let Some(doomed) = doomed {
            let discard = self.discard.take();
            in_background(move || match discard {
                Some(discard) => discard(&doomed),
                None => remove_dir_logged(&doomed),
            });
        }
    }
}

/// A snapshot id taken for a snapshot or an import, and its staging directory under `tmp/`.
/// Dropped unpublished, the id is free again and the staging directory is removed.
#[derive(Debug)]
pub(crate) struct SnapshotStaging<B: Backend> {
    registry: Arc<Registry<B>>,
    snapshot_id: SnapshotId,
    path: PathBuf,
    published: bool,
}

impl<B: Backend> SnapshotStaging<B> {
    /// The staging directory (made by [`make_dir`](Self::make_dir)).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn make_dir(&self) -> Result<(), ProviderError> {
        let path = self.path.clone();
        blocking(move || {
            std::fs::create_dir(&path)
                .map_err(|e| ProviderError::io("cannot create staging directory", e))
        })
        .await
    }

    /// Writes `meta` as the staging directory's `meta.json`, renames the directory into
    /// `snapshots/` and indexes the snapshot.
    pub(crate) async fn publish(
        mut self,
        meta: SnapshotMeta<B::Snapshot>,
    ) -> Result<SnapshotInfo, ProviderError> {
        let meta = SnapshotMeta {
            snapshot_id: self.snapshot_id.clone(),
            ..meta
        };
        {
            let (path, meta) = (self.path.clone(), meta.clone());
            let dest = self.registry.root.snapshot_dir(&meta.snapshot_id);
            blocking(move || {
                write_json_atomic(&path.join("meta.json"), &meta)?;
                rename_noreplace(&path, &dest)
                    .map_err(|e| ProviderError::io("cannot publish snapshot", e))
            })
            .await?;
        }
        self.published = true;
        let info = meta.info();
        let mut index = self.registry.index.lock();
        index.snapshotting.remove(&self.snapshot_id);
        index.snapshots.insert(self.snapshot_id.clone(), meta);
        Ok(info)
    }
}

impl<B: Backend> Drop for SnapshotStaging<B> {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        self.registry
            .index
            .lock()
            .snapshotting
            .remove(&self.snapshot_id);
        let path = std::mem::take(&mut self.path);
        in_background(move || remove_dir_logged(&path));
    }
}

/// A provider whose VMs live in a [`Registry`]: its [`VmQuery`] is the registry's.
pub(crate) trait Registered: Send + Sync + 'static {
    type Backend: Backend;
    fn registry(&self) -> &Registry<Self::Backend>;
}

#[async_trait]
impl<T: Registered> VmQuery for T {
    async fn list_vms(&self) -> Result<Vec<VmView>, ProviderError> {
        let index = self.registry().index.lock();
        let mut views: Vec<VmView> = index
            .vms
            .values()
            .map(|r| r.view())
            .chain(index.tombstones.views().cloned())
            .collect();
        views.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(views)
    }

    async fn count_vms(&self) -> Result<usize, ProviderError> {
        Ok(self.registry().index.lock().vms.len())
    }

    async fn get_vm(&self, vm_id: &VmId) -> Result<Option<VmView>, ProviderError> {
        let index = self.registry().index.lock();
        Ok(match index.vms.get(vm_id) {
            Some(record) => Some(record.view()),
            None => index.tombstones.get(vm_id).cloned(),
        })
    }

    async fn list_snapshots(&self, vm_id: &VmId) -> Result<Option<Vec<SnapshotId>>, ProviderError> {
        let index = self.registry().index.lock();
        if !index.vms.contains_key(vm_id) && index.tombstones.get(vm_id).is_none() {
            return Ok(None);
        }
        Ok(Some(
            index
                .snapshots
                .values()
                .filter(|s| s.source_vm.as_ref() == Some(vm_id))
                .map(|s| s.snapshot_id.clone())
                .collect(),
        ))
    }

    async fn get_snapshot(
        &self,
        snapshot_id: &SnapshotId,
    ) -> Result<Option<SnapshotInfo>, ProviderError> {
        Ok(self
            .registry()
            .index
            .lock()
            .snapshots
            .get(snapshot_id)
            .map(SnapshotMeta::info))
    }

    async fn list_all_snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError> {
        Ok(self
            .registry()
            .index
            .lock()
            .snapshots
            .values()
            .map(SnapshotMeta::info)
            .collect())
    }
}
