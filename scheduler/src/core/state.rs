//! The core's in-memory state. Everything here sits behind one short synchronous lock
//! ([`super::Core::state`]) that is never held across an `.await`; per-session operations are
//! serialised by each session's own async lock ([`SessionSlot::op`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use hearth_messages::{
    InventoryDelta, InventoryDigest, Quota, Session, SessionId, SnapshotId, TemplateName, TenantId,
    VmId, VmInfo, WireError, WorkerId, WorkerStatus, vm_hash,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::TemplateConfig;
use crate::store::{BuildSpec, PoolRecord, SessionRecord, TemplateRecord};

/// The outcome of a claim, shared with duplicate requests that wait for it.
pub(crate) type ClaimResult = Option<Result<Session, WireError>>;

/// Everything the core knows, under one lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Every session still remembered (live, and ended ones within the retention).
    pub sessions: HashMap<SessionId, Arc<SessionSlot>>,
    /// Claims in progress by session id: duplicates wait for the first one's outcome.
    pub claims: HashMap<SessionId, PendingClaim>,
    /// Templates by name.
    pub templates: BTreeMap<TemplateName, TemplateEntry>,
    /// Warm pools by template.
    pub pools: HashMap<TemplateName, Pool>,
    /// Workers by id, from heartbeats (and from the loaded state until they report).
    pub workers: BTreeMap<WorkerId, WorkerEntry>,
    /// VMs that jobs in flight are creating, renaming or building: owned, never leaked. A count,
    /// since two jobs may name the same VM (a rename names the pool id and the session id).
    pub inflight: HashMap<(WorkerId, VmId), u32>,
    /// Leaked VMs with a destroy job in flight (so each heartbeat does not send another).
    pub destroying: HashSet<(WorkerId, VmId)>,
    /// Successful claims per template since start: (warm, total).
    pub claim_stats: HashMap<TemplateName, (u64, u64)>,
    /// Each tenant's sessions, pruned of ended ones whenever its quota is checked.
    pub tenant_sessions: HashMap<TenantId, Vec<Arc<SessionSlot>>>,
    /// Each tenant's create-rate bucket.
    pub create_buckets: HashMap<TenantId, super::tenants::TokenBucket>,
    /// Quotas set at run time (`admin.quotas.set`), over the config's.
    pub quota_overrides: BTreeMap<TenantId, Quota>,
}

impl State {
    /// Marks a VM as owned by a job in flight.
    pub fn mark(&mut self, worker: &WorkerId, vm: &VmId) {
        *self
            .inflight
            .entry((worker.clone(), vm.clone()))
            .or_insert(0) += 1;
    }

    /// Ends one job's ownership of a VM.
    pub fn unmark(&mut self, worker: &WorkerId, vm: &VmId) {
        let key = (worker.clone(), vm.clone());
        if let Some(n) = self.inflight.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(&key);
            }
        }
    }

    /// Whether this worker is healthy (heartbeating, neither suspect nor lost): jobs are sent to it.
    pub fn worker_live(&self, worker: &WorkerId) -> bool {
        self.workers.get(worker).is_some_and(WorkerEntry::healthy)
    }

    /// A healthy worker that accepts new work (not draining).
    pub fn worker_usable(&self, worker: &WorkerId) -> bool {
        self.workers.get(worker).is_some_and(WorkerEntry::usable)
    }

    /// Ready and restoring VMs of `template` on `worker` (for spreading pools).
    pub fn pool_vms_on(&self, template: &TemplateName, worker: &WorkerId) -> usize {
        self.pools.get(template).map_or(0, |p| {
            p.ready.on_worker(worker) + p.restoring.values().filter(|r| &r.worker == worker).count()
        })
    }
}

/// A claim in progress.
#[derive(Debug)]
pub(crate) struct PendingClaim {
    pub template: TemplateName,
    /// The tenant claiming (a retry by another tenant must not join it).
    pub tenant: Option<TenantId>,
    pub done: watch::Receiver<ClaimResult>,
}

/// One session: its async operation lock and its data.
#[derive(Debug)]
pub(crate) struct SessionSlot {
    /// Serialises state-changing operations on the session (release, keepalive, stop, prune,
    /// snapshot, ...). Held across the worker job on purpose: that is its job.
    pub op: Arc<tokio::sync::Mutex<()>>,
    /// The record and its runtime companions; a short synchronous lock.
    pub data: parking_lot::Mutex<SessionData>,
}

impl SessionSlot {
    pub fn new(data: SessionData) -> Arc<Self> {
        Arc::new(Self {
            op: Arc::new(tokio::sync::Mutex::new(())),
            data: parking_lot::Mutex::new(data),
        })
    }

    /// The session as clients see it.
    pub fn view(&self) -> Session {
        self.data.lock().view()
    }
}

/// A session record plus what is tracked in memory only.
#[derive(Debug)]
pub(crate) struct SessionData {
    /// As persisted.
    pub rec: SessionRecord,
    /// Its KV revision (for compare-and-set).
    pub rev: u64,
    /// Last observed activity (scheduler clock). Not persisted on every change: a restart resets
    /// the idle timer instead.
    pub last_used_ms: u64,
    /// The idle timer runs from the later of this and `last_used_ms` (creation; a reload, since
    /// activity between the last write and a restart is unknown).
    pub idle_base_ms: u64,
    /// The worker's `last_activity_ms` last seen; a change is activity.
    pub observed_activity: Option<u64>,
    /// The last heartbeat said a command, file transfer or job holds the VM: never idle-stopped.
    pub busy: bool,
    /// Since when the VM is missing from its live worker's inventory.
    pub missing_since: Option<Instant>,
    /// A failed lifetime action (stop, prune) is retried no earlier than this.
    pub retry_at: Option<Instant>,
}

impl SessionData {
    pub fn new(rec: SessionRecord, rev: u64, observed_activity: Option<u64>) -> Self {
        let last_used_ms = rec.session.last_used_ms;
        Self {
            rec,
            rev,
            last_used_ms,
            idle_base_ms: last_used_ms,
            observed_activity,
            busy: false,
            missing_since: None,
            retry_at: None,
        }
    }

    pub fn view(&self) -> Session {
        let mut s = self.rec.session.clone();
        s.last_used_ms = s.last_used_ms.max(self.last_used_ms);
        s
    }

    /// Since when the session counts as idle.
    pub fn idle_since_ms(&self) -> u64 {
        self.last_used_ms
            .max(self.idle_base_ms)
            .max(self.rec.session.last_used_ms)
    }

    pub fn is_live(&self) -> bool {
        !self.rec.session.state.is_terminal()
    }
}

/// A template and the scheduler's bookkeeping about its snapshot.
#[derive(Debug)]
pub(crate) struct TemplateEntry {
    pub rec: TemplateRecord,
    /// Its `[[templates]]` entry, for templates in the current config (buildable).
    pub config: Option<TemplateConfig>,
    /// A build of its snapshot is running.
    pub building: bool,
    /// Restores kept failing: build a fresh snapshot.
    pub needs_rebuild: bool,
    pub build_failures: u32,
    pub build_backoff_until: Option<Instant>,
    /// A `sessions.<sid>.snapshot` is creating it: the name is taken but not claimable yet.
    pub reserved: bool,
    /// Deleted, drained and its snapshots gone: its record is being removed.
    pub forgetting: bool,
    /// Deletion progress of the snapshots in `rec.retired_snapshots` (in memory: after a restart
    /// the deletion simply starts over, which is idempotent).
    pub gc: BTreeMap<SnapshotId, RetiredSnapshot>,
}

impl TemplateEntry {
    /// A template with no build or deletion in progress.
    pub fn new(rec: TemplateRecord, config: Option<TemplateConfig>) -> Self {
        Self {
            rec,
            config,
            building: false,
            needs_rebuild: false,
            build_failures: 0,
            build_backoff_until: None,
            reserved: false,
            forgetting: false,
            gc: BTreeMap::new(),
        }
    }

    pub fn snapshot(&self) -> Option<&SnapshotId> {
        self.rec.template.snapshot_id.as_ref()
    }

    /// The build spec the config asks for, if this is a config template.
    pub fn wanted_build(&self) -> Option<BuildSpec> {
        self.config.as_ref().map(|c| BuildSpec {
            base: c.base.clone(),
            bootstrap: c.bootstrap.clone(),
            nix_profile: c.nix_profile.clone(),
        })
    }

    /// Whether the snapshot must be (re)built now.
    pub fn needs_build(&self) -> bool {
        match self.wanted_build() {
            None => false,
            Some(wanted) => {
                self.snapshot().is_none()
                    || self.needs_rebuild
                    || self.rec.build.as_ref() != Some(&wanted)
            }
        }
    }
}

/// Deletion progress of one retired template snapshot.
#[derive(Debug)]
pub(crate) struct RetiredSnapshot {
    /// Nothing is sent before this: restores that read the snapshot before it was replaced get to
    /// finish first, and failed attempts back off.
    pub not_before: Instant,
    /// Workers that confirmed the local delete.
    pub deleted_on: BTreeSet<WorkerId>,
    /// Removed from the object store.
    pub unpublished: bool,
    /// Failed attempts so far (for the backoff).
    pub attempts: u32,
    /// Delete jobs (or the final template write) are in flight.
    pub running: bool,
}

impl RetiredSnapshot {
    pub fn new(not_before: Instant) -> Self {
        Self {
            not_before,
            deleted_on: BTreeSet::new(),
            unpublished: false,
            attempts: 0,
            running: false,
        }
    }
}

/// One template's warm pool.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    /// Ready VMs, oldest first.
    pub ready: ReadyVms,
    /// VMs being restored, by id.
    pub restoring: HashMap<VmId, Restoring>,
    /// Consecutive failed restores.
    pub failures: u32,
    /// No restores before this (after failures).
    pub backoff_until: Option<Instant>,
    /// Since when the pool is below its target (for the refill duration metric).
    pub below_target_since: Option<Instant>,
}

/// A pooled VM being restored.
#[derive(Debug, Clone)]
pub(crate) struct Restoring {
    pub worker: WorkerId,
    /// What it is restored from (a retired snapshot is not deleted while a restore reads it).
    pub snapshot: SnapshotId,
}

/// A pool's ready VMs, oldest first, with counts by worker and by snapshot kept beside them, so
/// that what runs on every claim and every pool pass (spreading restores over workers, finding
/// VMs of a replaced snapshot, snapshot GC) is O(workers) or O(snapshots), not O(pooled VMs).
#[derive(Debug, Default)]
pub(crate) struct ReadyVms {
    q: VecDeque<PoolVm>,
    ids: HashSet<VmId>,
    on_worker: HashMap<WorkerId, usize>,
    of_snapshot: HashMap<SnapshotId, usize>,
}

impl ReadyVms {
    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PoolVm> {
        self.q.iter()
    }

    pub fn contains(&self, vm: &VmId) -> bool {
        self.ids.contains(vm)
    }

    /// Ready VMs on `worker`.
    pub fn on_worker(&self, worker: &WorkerId) -> usize {
        self.on_worker.get(worker).copied().unwrap_or(0)
    }

    /// The snapshots the ready VMs were restored from.
    pub fn snapshots(&self) -> impl Iterator<Item = &SnapshotId> {
        self.of_snapshot.keys()
    }

    /// Whether every ready VM was restored from `snapshot`.
    pub fn all_of(&self, snapshot: &SnapshotId) -> bool {
        self.of_snapshot.len() <= 1
            && (self.q.is_empty() || self.of_snapshot.contains_key(snapshot))
    }

    fn count(&mut self, e: &PoolVm) {
        self.ids.insert(e.rec.vm_id.clone());
        *self.on_worker.entry(e.rec.worker_id.clone()).or_default() += 1;
        *self
            .of_snapshot
            .entry(e.rec.snapshot_id.clone())
            .or_default() += 1;
    }

    fn uncount(&mut self, e: &PoolVm) {
        self.ids.remove(&e.rec.vm_id);
        decrement(&mut self.on_worker, &e.rec.worker_id);
        decrement(&mut self.of_snapshot, &e.rec.snapshot_id);
    }

    pub fn push_back(&mut self, e: PoolVm) {
        self.count(&e);
        self.q.push_back(e);
    }

    pub fn pop_back(&mut self) -> Option<PoolVm> {
        let e = self.q.pop_back()?;
        self.uncount(&e);
        Some(e)
    }

    pub fn remove(&mut self, index: usize) -> Option<PoolVm> {
        let e = self.q.remove(index)?;
        self.uncount(&e);
        Some(e)
    }

    /// The index of the oldest entry that matches.
    pub fn position(&self, f: impl FnMut(&PoolVm) -> bool) -> Option<usize> {
        self.q.iter().position(f)
    }

    /// Keeps the entries for which `f` is true (it may update them, not their worker or snapshot).
    pub fn retain_mut(&mut self, mut f: impl FnMut(&mut PoolVm) -> bool) {
        let mut gone = Vec::new();
        self.q.retain_mut(|e| {
            let keep = f(e);
            if !keep {
                gone.push((
                    e.rec.vm_id.clone(),
                    e.rec.worker_id.clone(),
                    e.rec.snapshot_id.clone(),
                ));
            }
            keep
        });
        for (vm_id, worker_id, snapshot_id) in gone {
            self.ids.remove(&vm_id);
            decrement(&mut self.on_worker, &worker_id);
            decrement(&mut self.of_snapshot, &snapshot_id);
        }
    }

    pub fn retain(&mut self, mut f: impl FnMut(&PoolVm) -> bool) {
        self.retain_mut(|e| f(e));
    }

    /// Takes every entry out.
    pub fn drain_all(&mut self) -> Vec<PoolVm> {
        self.ids.clear();
        self.on_worker.clear();
        self.of_snapshot.clear();
        self.q.drain(..).collect()
    }

    /// Orders the entries oldest first (after loading them).
    pub fn sort_by_created(&mut self) {
        self.q.make_contiguous().sort_by_key(|e| e.rec.created_ms);
    }
}

/// Counts one fewer of `k`, forgetting it at zero.
fn decrement<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

/// A ready pooled VM.
#[derive(Debug, Clone)]
pub(crate) struct PoolVm {
    pub rec: PoolRecord,
    /// Since when it is missing from its worker's inventory.
    pub missing_since: Option<Instant>,
}

/// A worker as the scheduler sees it.
#[derive(Debug)]
pub(crate) struct WorkerEntry {
    /// Its last heartbeat; `None` for a worker only known from the loaded state.
    pub status: Option<WorkerStatus>,
    pub last_seen: Instant,
    /// Not lost: heard from within `worker_lost_grace`. Its sessions stay as they are.
    pub live: bool,
    /// Silent past `heartbeat_timeout` (but still `live`): nothing new is placed on it, no job is
    /// sent to it, none of its VMs counts as leaked. A heartbeat makes it healthy again.
    pub suspect: bool,
    /// Its inventory may be compared with the scheduler's state (leaks, vanished VMs). False from
    /// the moment it is suspect or lost until a `list_vms` answered after it came back: heartbeats
    /// buffered across an outage describe the past.
    pub inventory_fresh: bool,
    /// A `list_vms` to refresh the inventory is in flight.
    pub inventory_check: bool,
    /// Times it went silent (suspect); an inventory asked for before the latest silence is stale.
    pub silences: u64,
    /// Creates in flight to it.
    pub pending: u32,
    /// VMs created that its heartbeats do not count yet (not in `used_vms`), with the
    /// heartbeats heard since (one built before the create may arrive after it; the next one
    /// counts it, under this id or a new one after a rename).
    pub created: HashMap<VmId, u8>,
    /// VMs whose destroy it answered that its heartbeats still count: their slots are free
    /// already (a release frees capacity when the destroy answers, not a heartbeat later);
    /// with the heartbeats heard since, as for `created`.
    pub released: HashMap<VmId, u8>,
    /// Its VM inventory as the scheduler knows it (its own lock: a heartbeat's changes are
    /// applied off the state lock).
    pub inventory: Arc<parking_lot::Mutex<Inventory>>,
    /// It refused a create for lack of capacity: skip it until then.
    pub refused_until: Option<Instant>,
}

/// Keeps the entries of `set` (created or released VMs) that the latest heartbeat has not
/// accounted for yet (`pending(vm)`), for one more heartbeat at most.
pub(crate) fn settle(set: &mut HashMap<VmId, u8>, mut pending: impl FnMut(&VmId) -> bool) {
    set.retain(|vm, heard| {
        *heard += 1;
        *heard < 2 && pending(vm)
    });
}

impl WorkerEntry {
    pub fn unconfirmed(now: Instant) -> Self {
        Self {
            status: None,
            last_seen: now,
            live: true,
            suspect: false,
            inventory_fresh: true,
            inventory_check: false,
            silences: 0,
            pending: 0,
            created: HashMap::new(),
            released: HashMap::new(),
            inventory: Arc::default(),
            refused_until: None,
        }
    }

    /// Heartbeating: known from a heartbeat, neither suspect nor lost.
    pub fn healthy(&self) -> bool {
        self.live && !self.suspect && self.status.is_some()
    }

    /// Healthy and not draining: new VMs may be placed on it.
    pub fn usable(&self) -> bool {
        self.healthy() && self.status.as_ref().is_some_and(|s| !s.draining)
    }

    /// Free slots, counting creates in flight and those not yet in a heartbeat, and crediting
    /// destroys answered that heartbeats still count.
    pub fn free(&self) -> u32 {
        self.status.as_ref().map_or(0, |s| {
            (s.free_slots() + self.released.len() as u32)
                .min(s.max_vms)
                .saturating_sub(self.pending)
                .saturating_sub(self.created.len() as u32)
        })
    }
}

/// A worker's VM inventory as the scheduler knows it: paged in full (`list_vms_page`) when it
/// does not match the worker's digest, kept current in between by the changes each heartbeat
/// carries.
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    /// The worker process this describes (its `started_ms`).
    pub started_ms: u64,
    /// Bumped whenever the view is invalidated: a page fetch started before it is stale.
    pub epoch: u64,
    pub generation: u64,
    /// XOR of `vm_hash` over `vms`.
    pub hash: u64,
    pub vms: HashMap<VmId, VmInfo>,
    /// Matches the worker's inventory of `generation`.
    pub synced: bool,
    /// A page fetch is in flight.
    pub fetching: bool,
    /// Digests with changes heard while fetching, applied (or their changes paged) after it.
    pub buffered: Vec<InventoryDigest>,
    /// The worker's clock at its latest heartbeat.
    pub at_ms: u64,
}

/// The most deltas kept while a fetch is in flight (beyond them the next fetch catches up).
const BUFFERED_DELTAS: usize = 16;

/// What the scheduler must fetch from a worker to bring its view of the inventory up to date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetch {
    /// Nothing: the view is current (or a fetch is already in flight).
    Nothing,
    /// The whole inventory (`list_vms_page`).
    All,
    /// The changes that made this digest's generation from the view's (`list_vm_changes`):
    /// more than a heartbeat carries, fewer than the inventory.
    Changes(InventoryDigest),
}

impl Inventory {
    /// Takes a heartbeat's inventory (a digest, or a pre-digest worker's full list): the VMs
    /// that changed, and what must be fetched.
    pub fn heard(
        &mut self,
        started_ms: u64,
        at_ms: u64,
        digest: Option<InventoryDigest>,
        full: Vec<VmInfo>,
    ) -> (Vec<VmInfo>, Fetch) {
        if self.started_ms != started_ms {
            // Another worker process: nothing of the old view holds.
            self.started_ms = started_ms;
            self.invalidate();
            self.vms.clear();
            self.hash = 0;
            self.generation = 0;
        }
        self.at_ms = at_ms;
        let Some(digest) = digest else {
            let changed: Vec<VmInfo> = full
                .iter()
                .filter(|v| self.vms.get(&v.vm_id) != Some(v))
                .cloned()
                .collect();
            self.vms = full.into_iter().map(|v| (v.vm_id.clone(), v)).collect();
            self.hash = self.vms.values().fold(0, |h, v| h ^ vm_hash(v));
            self.synced = true;
            return (changed, Fetch::Nothing);
        };
        if self.fetching {
            if (digest.delta.is_some() || digest.changes > 0)
                && self.buffered.len() < BUFFERED_DELTAS
            {
                self.buffered.push(digest);
            }
            return (Vec::new(), Fetch::Nothing);
        }
        if self.synced {
            if digest.generation == self.generation && digest.hash == self.hash {
                return (Vec::new(), Fetch::Nothing);
            }
            if digest
                .delta
                .as_ref()
                .is_some_and(|d| d.base == self.generation)
            {
                let changed = self.apply(digest.delta.unwrap_or_default(), digest.generation);
                if self.hash == digest.hash {
                    return (changed, Fetch::Nothing);
                }
                tracing::warn!(
                    generation = digest.generation,
                    "inventory diverged from the worker's digest; paging it"
                );
                self.invalidate();
                self.fetching = true;
                return (changed, Fetch::All);
            }
            if digest.changes > 0 && digest.generation == self.generation + 1 {
                self.fetching = true;
                return (Vec::new(), Fetch::Changes(digest));
            }
        }
        self.invalidate();
        self.fetching = true;
        (Vec::new(), Fetch::All)
    }

    /// Applies one generation's changes; the VMs changed.
    pub fn apply(&mut self, delta: InventoryDelta, generation: u64) -> Vec<VmInfo> {
        for id in &delta.removed {
            if let Some(old) = self.vms.remove(id) {
                self.hash ^= vm_hash(&old);
            }
        }
        for vm in &delta.changed {
            if let Some(old) = self.vms.insert(vm.vm_id.clone(), vm.clone()) {
                self.hash ^= vm_hash(&old);
            }
            self.hash ^= vm_hash(vm);
        }
        self.generation = generation;
        delta.changed
    }

    /// Installs a paged inventory (from a fetch started in `epoch`), then catches up with the
    /// changes heard meanwhile: the VMs that changed from the old view, and what to fetch next.
    /// `None` if the view was invalidated since (the fetch is stale).
    pub fn install(
        &mut self,
        epoch: u64,
        digest: &InventoryDigest,
        vms: Vec<VmInfo>,
    ) -> Option<(Vec<VmInfo>, Fetch)> {
        if epoch != self.epoch {
            self.done_fetching();
            return None;
        }
        let old = std::mem::take(&mut self.vms);
        let changed = vms
            .iter()
            .filter(|v| old.get(&v.vm_id) != Some(*v))
            .cloned()
            .collect();
        self.vms = vms.into_iter().map(|v| (v.vm_id.clone(), v)).collect();
        self.hash = self.vms.values().fold(0, |h, v| h ^ vm_hash(v));
        self.generation = digest.generation;
        self.synced = self.hash == digest.hash;
        Some(self.catch_up(changed))
    }

    /// Applies the paged changes that made `digest`'s generation (from a fetch started in
    /// `epoch`), then catches up as [`Inventory::install`] does. A view that does not come out
    /// matching the digest is paged in whole.
    pub fn apply_changes(
        &mut self,
        epoch: u64,
        digest: &InventoryDigest,
        delta: InventoryDelta,
    ) -> Option<(Vec<VmInfo>, Fetch)> {
        if epoch != self.epoch {
            self.done_fetching();
            return None;
        }
        if delta.base != self.generation {
            self.invalidate();
            return Some((Vec::new(), Fetch::All));
        }
        let changed = self.apply(delta, digest.generation);
        if self.hash != digest.hash {
            tracing::warn!(
                generation = digest.generation,
                "inventory diverged from the worker's digest after its changes; paging it"
            );
            self.invalidate();
            return Some((changed, Fetch::All));
        }
        Some(self.catch_up(changed))
    }

    /// Applies the buffered digests in order, until one's changes must be paged (or a gap
    /// means the whole inventory must). The fetch ends when nothing is left to fetch.
    fn catch_up(&mut self, mut changed: Vec<VmInfo>) -> (Vec<VmInfo>, Fetch) {
        let mut buffered = std::mem::take(&mut self.buffered).into_iter();
        if self.synced {
            while let Some(digest) = buffered.next() {
                if digest.generation <= self.generation {
                    continue;
                }
                if digest
                    .delta
                    .as_ref()
                    .is_some_and(|d| d.base == self.generation)
                {
                    let generation = digest.generation;
                    changed.extend(self.apply(digest.delta.unwrap_or_default(), generation));
                    if self.hash == digest.hash {
                        continue;
                    }
                } else if digest.changes > 0 && digest.generation == self.generation + 1 {
                    self.buffered = buffered.collect();
                    return (changed, Fetch::Changes(digest));
                }
                self.invalidate();
                return (changed, Fetch::All);
            }
        }
        self.done_fetching();
        (changed, Fetch::Nothing)
    }

    /// No fetch in flight any more; what was buffered for it is dropped.
    pub fn done_fetching(&mut self) {
        self.fetching = false;
        self.buffered.clear();
    }

    /// The view no longer matches the worker (a silence, a divergence): page it in again.
    pub fn invalidate(&mut self) {
        self.synced = false;
        self.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, worker: &str, snapshot: &str) -> PoolVm {
        PoolVm {
            rec: PoolRecord {
                vm_id: VmId::new(id).unwrap(),
                template: TemplateName::default_template(),
                worker_id: WorkerId::new(worker).unwrap(),
                snapshot_id: SnapshotId::new(snapshot).unwrap(),
                created_ms: 0,
            },
            missing_since: None,
        }
    }

    #[test]
    fn ready_vm_counts_follow_every_way_in_and_out() {
        let (w1, w2) = (WorkerId::new("w1").unwrap(), WorkerId::new("w2").unwrap());
        let (s1, s2) = (
            SnapshotId::new("s1").unwrap(),
            SnapshotId::new("s2").unwrap(),
        );
        let mut r = ReadyVms::default();
        for (id, w, s) in [
            ("a", "w1", "s1"),
            ("b", "w1", "s1"),
            ("c", "w2", "s2"),
            ("d", "w2", "s1"),
        ] {
            r.push_back(vm(id, w, s));
        }
        assert_eq!((r.on_worker(&w1), r.on_worker(&w2)), (2, 2));
        assert!(!r.all_of(&s1));
        assert!(r.contains(&VmId::new("c").unwrap()));
        r.retain(|e| e.rec.snapshot_id == s1);
        assert!(r.all_of(&s1) && !r.all_of(&s2));
        assert!(!r.contains(&VmId::new("c").unwrap()));
        assert_eq!((r.on_worker(&w1), r.on_worker(&w2)), (2, 1));
        let i = r.position(|e| e.rec.worker_id == w2).unwrap();
        assert_eq!(r.remove(i).unwrap().rec.vm_id.as_str(), "d");
        assert_eq!(r.on_worker(&w2), 0);
        assert_eq!(r.pop_back().unwrap().rec.vm_id.as_str(), "b");
        assert_eq!(r.drain_all().len(), 1);
        assert_eq!(
            (r.len(), r.on_worker(&w1), r.snapshots().count()),
            (0, 0, 0)
        );
        assert!(
            r.all_of(&s2),
            "an empty pool holds nothing of another snapshot"
        );
    }
}
