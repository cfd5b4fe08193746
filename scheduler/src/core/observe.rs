//! What workers report, and the level-triggered repairs it drives: liveness (suspect and lost
//! workers, the sessions of lost ones), session state observed in heartbeats (activity, stop,
//! resume, vanished VMs), pool entries that vanished, and leaked VMs.
//!
//! A fault is not a death: a silent worker is only *suspect* (nothing placed on it, nothing of it
//! compared or destroyed) until `worker_lost_grace`; when it heartbeats again it is healthy, and
//! its inventory drives reconcile again once it answered a fresh `list_vms`.

use std::collections::HashMap;
use std::sync::Arc;

use hearth_messages::{
    InventoryDelta, InventoryDigest, JobOp, JobOutput, MAX_INVENTORY_PAGE, SessionState,
    TerminationReason, VmEvent, VmId, VmInfo, VmState, WorkerId, WorkerStatus,
};
use tokio::time::Instant;

use super::Core;
use super::lifetimes::{Action, End};
use super::state::{Fetch, Inventory, SessionData, SessionSlot, WorkerEntry, settle};
use crate::metrics as m;
use crate::worker_api::job;

/// Sessions the reconcile pass handles between yields.
const RECONCILE_CHUNK: usize = 4096;

impl Core {
    /// A heartbeat: liveness and capacity, then the inventory's changes (O(changes), off the
    /// state lock). Comparing the whole inventory with the scheduler's state is the reconcile
    /// pass's job ([`Core::reconcile_pass`]), not every heartbeat's.
    pub(crate) fn on_heartbeat(self: Arc<Self>, mut status: WorkerStatus) {
        let now = Instant::now();
        let worker = status.worker_id.clone();
        let digest = status.inventory.take();
        let full = std::mem::take(&mut status.vms);
        let (started_ms, at_ms) = (status.started_ms, status.at_ms);
        let (inventory, fresh, silences, wake, want_fresh) = {
            let mut st = self.state.lock();
            let entry = st
                .workers
                .entry(worker.clone())
                .or_insert_with(|| WorkerEntry::unconfirmed(now));
            if let Some(prev) = &entry.status
                && prev.started_ms == status.started_ms
                && status.seq < prev.seq
            {
                return; // out of order
            }
            let came_back = !entry.live || entry.status.is_none();
            let recovered = entry.live && entry.suspect;
            let restarted = entry
                .status
                .as_ref()
                .is_some_and(|p| p.started_ms != status.started_ms);
            if came_back {
                tracing::info!(worker_id = %worker, max_vms = status.max_vms, used_vms = status.used_vms, "worker up");
            } else if recovered {
                tracing::info!(worker_id = %worker, silent_ms = now.duration_since(entry.last_seen).as_millis() as u64,
                    "suspect worker is heartbeating again; healthy");
            }
            if restarted {
                tracing::warn!(worker_id = %worker, "worker restarted");
            }
            entry.status = Some(status);
            entry.last_seen = now;
            entry.live = true;
            entry.suspect = false;
            // After a silence, compare nothing until the worker's inventory was paged in anew:
            // heartbeats buffered across the outage describe the past.
            let want_fresh = !entry.inventory_fresh && !entry.inventory_check;
            if want_fresh {
                entry.inventory_check = true;
            }
            (
                entry.inventory.clone(),
                entry.inventory_fresh,
                entry.silences,
                came_back || recovered || restarted,
                want_fresh,
            )
        };
        let (changed, fetch, synced) = {
            let mut inv = inventory.lock();
            if want_fresh {
                inv.invalidate();
            }
            let (changed, mut fetch) = inv.heard(started_ms, at_ms, digest, full);
            if fetch == Fetch::Nothing && want_fresh && !inv.fetching {
                inv.fetching = true;
                fetch = Fetch::All;
            }
            // A view still catching up (a fetch in flight) is not the heartbeat's.
            (changed, fetch, inv.synced && !inv.fetching)
        };
        if fetch != Fetch::Nothing {
            self.fetch_inventory(worker.clone(), inventory.clone(), fetch, silences);
        }
        self.heartbeats.send_modify(|v| *v += 1);
        if fresh && !changed.is_empty() {
            self.observe_vms(&worker, at_ms, &changed);
        }
        let mut st = self.state.lock();
        if let Some(entry) = st.workers.get_mut(&worker) {
            // Created VMs this heartbeat counts, and released ones it no longer counts, are in
            // its `used_vms` now. (Without a synced view: as of this heartbeat, which may be
            // off by the changes in flight until the next one.)
            if synced {
                let inv = inventory.lock();
                settle(&mut entry.released, |vm| inv.vms.contains_key(vm));
                settle(&mut entry.created, |vm| !inv.vms.contains_key(vm));
            } else {
                entry.released.clear();
                entry.created.clear();
            }
        }
        Core::worker_gauges(&st);
        let below = wake
            || st.pools.iter().any(|(name, p)| {
                st.templates.get(name).is_some_and(|t| {
                    p.ready.len() + p.restoring.len() < t.rec.template.min_ready as usize
                })
            });
        drop(st);
        if below {
            self.pool_wake.notify_one();
        }
    }

    /// Sessions whose VM changed (a heartbeat's delta): activity, stops and resumes the worker
    /// saw. O(changes).
    fn observe_vms(self: &Arc<Self>, worker: &WorkerId, at_ms: u64, changed: &[VmInfo]) {
        let now_ms = self.clock.now_ms();
        let slots: Vec<(Arc<SessionSlot>, &VmInfo)> = {
            let st = self.state.lock();
            changed
                .iter()
                .filter(|vm| vm.session)
                .filter_map(|vm| {
                    st.sessions
                        .get(&vm.vm_id.clone().into())
                        .map(|slot| (slot.clone(), vm))
                })
                .collect()
        };
        for (slot, vm) in slots {
            let action = {
                let mut d = slot.data.lock();
                if !d.is_live() || &d.rec.session.worker_id != worker || d.rec.session.unplaced {
                    continue;
                }
                d.missing_since = None;
                observe_session_vm(&mut d, vm, at_ms, now_ms)
            };
            if let Some(action) = action {
                self.act(slot, action);
            }
        }
    }

    /// Brings the view of `worker`'s inventory up to date: pages its changes in
    /// (`list_vm_changes`) or the whole of it (`list_vms_page`), then whatever the heartbeats heard
    /// meanwhile asks for, until the view is current or was invalidated (a newer fetch owns it).
    /// Once the whole inventory was installed after a silence (`silences` unchanged), the
    /// worker's inventory drives reconcile again. VMs that changed are observed as a heartbeat's
    /// changes are.
    fn fetch_inventory(
        self: &Arc<Self>,
        worker: WorkerId,
        inventory: Arc<parking_lot::Mutex<Inventory>>,
        first: Fetch,
        silences: u64,
    ) {
        let core = self.clone();
        self.spawn(async move {
            let mut what = first;
            let mut installed = false;
            loop {
                let t0 = Instant::now();
                let epoch = inventory.lock().epoch;
                let step = match &what {
                    Fetch::Nothing => break,
                    Fetch::All => match core.page_inventory(&worker).await {
                        Ok((digest, vms)) => {
                            let count = vms.len();
                            let step = inventory.lock().install(epoch, &digest, vms);
                            metrics::histogram!(m::INVENTORY_FETCH_SECONDS)
                                .record(t0.elapsed().as_secs_f64());
                            tracing::debug!(worker_id = %worker, vms = count, generation = digest.generation,
                                installed = step.is_some(), "inventory paged in");
                            installed |= step.is_some();
                            step
                        }
                        Err(err) => {
                            inventory.lock().done_fetching();
                            tracing::warn!(worker_id = %worker, error = %err,
                                "paging the inventory failed; retrying on the next heartbeat");
                            break;
                        }
                    },
                    Fetch::Changes(digest) => {
                        match core.page_changes(&worker, digest.generation).await {
                            Ok(delta) => inventory.lock().apply_changes(epoch, digest, delta),
                            Err(err) => {
                                tracing::debug!(worker_id = %worker, error = %err,
                                    "paging the inventory's changes failed; paging all of it");
                                let mut inv = inventory.lock();
                                if inv.epoch != epoch {
                                    inv.done_fetching();
                                    break;
                                }
                                inv.invalidate();
                                Some((Vec::new(), Fetch::All))
                            }
                        }
                    }
                };
                let Some((changed, next)) = step else {
                    break; // stale: the view was invalidated meanwhile
                };
                let (fresh, at_ms) = {
                    let st = core.state.lock();
                    let fresh = st.workers.get(&worker).is_some_and(|w| w.inventory_fresh);
                    (fresh, inventory.lock().at_ms)
                };
                if fresh && !changed.is_empty() {
                    core.observe_vms(&worker, at_ms, &changed);
                }
                what = next;
            }
            let mut st = core.state.lock();
            let Some(w) = st.workers.get_mut(&worker) else {
                return;
            };
            w.inventory_check = false;
            let synced = inventory.lock().synced;
            if installed && synced && w.healthy() && w.silences == silences && !w.inventory_fresh {
                w.inventory_fresh = true;
                tracing::info!(worker_id = %worker,
                    "fresh inventory after a silence; reconcile resumes on this worker");
            }
        });
    }

    /// Every page of the changes that made generation `generation` of `worker`'s inventory.
    async fn page_changes(
        &self,
        worker: &WorkerId,
        generation: u64,
    ) -> Result<InventoryDelta, crate::worker_api::JobError> {
        let mut all = InventoryDelta::default();
        let mut offset = 0;
        loop {
            let op = JobOp::ListVmChanges {
                generation,
                offset,
                limit: MAX_INVENTORY_PAGE,
            };
            match self.api.job(worker, job(op), self.cfg.jobs.rename).await? {
                JobOutput::VmChanges { delta, next } => {
                    all.base = delta.base;
                    all.removed.extend(delta.removed);
                    all.changed.extend(delta.changed);
                    match next {
                        Some(n) if n > offset => offset = n,
                        Some(_) => {
                            return Err(crate::worker_api::JobError::BadReply(
                                "list_vm_changes did not move on".into(),
                            ));
                        }
                        None => return Ok(all),
                    }
                }
                other => {
                    return Err(crate::worker_api::JobError::BadReply(format!(
                        "list_vm_changes answered {other:?}"
                    )));
                }
            }
        }
    }

    /// Every page of `worker`'s inventory, of one generation (started again, a few times, when
    /// the worker moved on past the generation being paged).
    async fn page_inventory(
        &self,
        worker: &WorkerId,
    ) -> Result<(InventoryDigest, Vec<VmInfo>), crate::worker_api::JobError> {
        let mut attempt = 0;
        'again: loop {
            attempt += 1;
            let mut vms = Vec::new();
            let mut after = None;
            let mut generation = None;
            loop {
                let op = JobOp::ListVmsPage {
                    after: after.take(),
                    limit: MAX_INVENTORY_PAGE,
                    generation,
                };
                match self.api.job(worker, job(op), self.cfg.jobs.rename).await {
                    Ok(JobOutput::VmsPage {
                        vms: page,
                        next,
                        digest,
                    }) => {
                        vms.extend(page);
                        generation = Some(digest.generation);
                        match next {
                            Some(n) => after = Some(n),
                            None => return Ok((digest, vms)),
                        }
                    }
                    Err(crate::worker_api::JobError::Failed(e))
                        if e.code == hearth_messages::ErrorCode::Conflict && attempt < 4 =>
                    {
                        continue 'again;
                    }
                    Ok(other) => {
                        return Err(crate::worker_api::JobError::BadReply(format!(
                            "list_vms_page answered {other:?}"
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// `admin.workers`: every worker as the scheduler sees it (operator only).
    pub(crate) fn workers_status(
        &self,
        caller: &hearth_messages::Caller,
    ) -> Result<hearth_messages::WorkersStatus, hearth_messages::WireError> {
        if !caller.is_operator() {
            return Err(hearth_messages::WireError::not_found("no such endpoint"));
        }
        let st = self.state.lock();
        let mut workers: Vec<hearth_messages::WorkerView> = st
            .workers
            .iter()
            .map(|(id, w)| {
                let health = if !w.live {
                    "lost"
                } else if w.status.is_none() {
                    "unconfirmed"
                } else if w.suspect {
                    "suspect"
                } else {
                    "healthy"
                };
                let inv = w.inventory.lock();
                hearth_messages::WorkerView {
                    worker_id: id.clone(),
                    health: health.to_owned(),
                    draining: w.status.as_ref().is_some_and(|s| s.draining),
                    max_vms: w.status.as_ref().map_or(0, |s| s.max_vms),
                    used_vms: w.status.as_ref().map_or(0, |s| s.used_vms),
                    free_slots: w.free(),
                    inventory: hearth_messages::InventoryView {
                        generation: inv.generation,
                        vms: inv.vms.len() as u32,
                        synced: inv.synced,
                        fresh: w.inventory_fresh,
                    },
                }
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(hearth_messages::WorkersStatus { workers })
    }

    /// Credits the slot of a VM whose destroy `worker` answered, until a heartbeat stops
    /// counting it.
    pub(crate) fn credit_destroyed(&self, worker: &WorkerId, vm: &VmId) {
        let mut st = self.state.lock();
        if let Some(w) = st.workers.get_mut(worker) {
            // Created since the last heartbeat: it no longer takes a slot.
            if w.created.remove(vm).is_some() {
                return;
            }
            let counted = {
                let inv = w.inventory.lock();
                inv.synced && inv.vms.contains_key(vm)
            };
            if counted {
                w.released.insert(vm.clone(), 0);
            }
        }
    }

    /// The reconcile pass: each healthy worker's inventory against the scheduler's state —
    /// pool entries whose VM vanished (or all of a draining worker's), sessions whose VM
    /// vanished, and leaked VMs (nothing owns them). Level-triggered, every liveness tick; the
    /// state lock is held only to read the candidates and to apply the outcome.
    /// The reconcile pass over some sessions (locks: a session's, then its worker's view).
    fn reconcile_sessions(
        &self,
        chunk: &[Arc<SessionSlot>],
        workers: &HashMap<WorkerId, (Arc<parking_lot::Mutex<Inventory>>, bool)>,
        actions: &mut Vec<(Arc<SessionSlot>, Action)>,
        live_ids: &mut HashMap<VmId, WorkerId>,
        now: Instant,
        now_ms: u64,
    ) {
        let grace = self.cfg.vm_missing_grace;
        for slot in chunk {
            let mut d = slot.data.lock();
            if !d.is_live() || d.rec.session.unplaced {
                continue;
            }
            let vm_id: VmId = d.rec.session.session_id.clone().into();
            if let Some((inv, _)) = workers.get(&d.rec.session.worker_id)
                && let inv = inv.lock()
                && inv.synced
            {
                match inv.vms.get(&vm_id) {
                    // A view from before the session's claim cannot miss its VM yet (a
                    // worker killed right after the claim sends no newer view).
                    None if inv.at_ms <= d.rec.session.created_ms => {}
                    None => {
                        d.busy = false;
                        let since = *d.missing_since.get_or_insert(now);
                        if now.duration_since(since) >= grace {
                            actions.push((
                                slot.clone(),
                                Action::End(End::VmGone(TerminationReason::VmFailed)),
                            ));
                        }
                    }
                    Some(vm) => {
                        d.missing_since = None;
                        if let Some(action) = observe_session_vm(&mut d, vm, inv.at_ms, now_ms) {
                            actions.push((slot.clone(), action));
                        }
                    }
                }
            }
            live_ids.insert(vm_id, d.rec.session.worker_id.clone());
            drop(d);
        }
    }

    pub(crate) async fn reconcile_pass(self: &Arc<Self>) {
        let t0 = Instant::now();
        let now = Instant::now();
        let now_ms = self.clock.now_ms();
        let grace = self.cfg.vm_missing_grace;
        let leak_grace = self.cfg.leak_grace.as_millis() as u64;
        let mut dropped_pool: Vec<VmId> = Vec::new();
        // Workers whose inventory may be compared: healthy, fresh after any silence, synced.
        let (workers, slots) = {
            let mut st = self.state.lock();
            let workers: HashMap<WorkerId, (Arc<parking_lot::Mutex<Inventory>>, bool)> = st
                .workers
                .iter()
                .filter(|(_, w)| w.healthy() && w.inventory_fresh)
                .map(|(id, w)| {
                    let draining = w.status.as_ref().is_some_and(|s| s.draining);
                    (id.clone(), (w.inventory.clone(), draining))
                })
                .collect();
            let guards: HashMap<&WorkerId, (parking_lot::MutexGuard<'_, Inventory>, bool)> =
                workers
                    .iter()
                    .map(|(id, (inv, draining))| (id, (inv.lock(), *draining)))
                    .collect();
            // Pool entries: vanished ones (or all, on a draining worker) are forgotten.
            for pool in st.pools.values_mut() {
                pool.ready.retain_mut(|e| {
                    let Some((inv, draining)) = guards.get(&e.rec.worker_id) else {
                        return true;
                    };
                    if *draining {
                        dropped_pool.push(e.rec.vm_id.clone());
                        return false;
                    }
                    if !inv.synced || inv.vms.contains_key(&e.rec.vm_id) {
                        e.missing_since = None;
                        return true;
                    }
                    let since = *e.missing_since.get_or_insert(now);
                    if now.duration_since(since) >= grace {
                        tracing::warn!(vm_id = %e.rec.vm_id, worker_id = %e.rec.worker_id, "pooled vm vanished");
                        dropped_pool.push(e.rec.vm_id.clone());
                        return false;
                    }
                    true
                });
            }
            drop(guards);
            let slots: Vec<Arc<SessionSlot>> = st.sessions.values().cloned().collect();
            (workers, slots)
        };

        // Sessions: vanished VMs, and what the worker saw of the others. In chunks, each under
        // the views' locks taken once, yielding between them: with 100,000 sessions the pass must
        // not hold the scheduler's thread away from claims and heartbeats.
        let mut actions: Vec<(Arc<SessionSlot>, Action)> = Vec::new();
        // A live session's VM is owned on its own worker only: a copy elsewhere (the paused VM
        // of a worker that was lost and came back after the session moved on) is a leak.
        let mut live_ids: HashMap<VmId, WorkerId> = HashMap::with_capacity(slots.len());
        for chunk in slots.chunks(RECONCILE_CHUNK) {
            self.reconcile_sessions(chunk, &workers, &mut actions, &mut live_ids, now, now_ms);
            if slots.len() > RECONCILE_CHUNK {
                tokio::task::yield_now().await;
            }
        }

        // Leaks: VMs nothing owns, old enough that no job can be creating them.
        let mut candidates: Vec<(WorkerId, VmId)> = Vec::new();
        for (id, (inv, _)) in &workers {
            let inv = inv.lock();
            if !inv.synced {
                continue;
            }
            for vm in inv.vms.values() {
                if vm.state != VmState::Destroyed
                    && live_ids.get(&vm.vm_id) != Some(id)
                    && inv.at_ms.saturating_sub(vm.created_ms) >= leak_grace
                {
                    candidates.push((id.clone(), vm.vm_id.clone()));
                }
            }
        }
        let leaked: Vec<(WorkerId, VmId)> = if candidates.is_empty() {
            Vec::new()
        } else {
            let st = self.state.lock();
            candidates
                .into_iter()
                .filter(|key| {
                    // Never a VM that a live session names (claimed meanwhile, too).
                    let live_session = st.sessions.get(&key.1.clone().into()).is_some_and(|slot| {
                        let d = slot.data.lock();
                        d.is_live() && !d.rec.session.unplaced && d.rec.session.worker_id == key.0
                    });
                    let pool_owned = st.pools.values().any(|p| {
                        p.ready.contains(&key.1)
                            || p.restoring.get(&key.1).is_some_and(|r| r.worker == key.0)
                    });
                    !live_session
                        && !pool_owned
                        && !st.inflight.contains_key(key)
                        && !st.destroying.contains(key)
                })
                .collect()
        };

        for vm in dropped_pool {
            let store = self.store.clone();
            self.spawn(async move {
                let _ = store.delete_pool(&vm).await;
            });
        }
        for (worker, vm) in leaked {
            tracing::warn!(vm_id = %vm, worker_id = %worker, "destroying a leaked vm");
            metrics::counter!(m::LEAKED_VMS_DESTROYED_TOTAL).increment(1);
            self.destroy_detached(worker, vm, None);
        }
        for (slot, action) in actions {
            self.act(slot, action);
        }
        metrics::histogram!(m::RECONCILE_PASS_SECONDS).record(t0.elapsed().as_secs_f64());
    }

    pub(crate) fn on_vm_event(self: Arc<Self>, event: VmEvent) {
        if event.state != VmState::Destroyed {
            return;
        }
        let slot = {
            let mut st = self.state.lock();
            let mut dropped = false;
            for pool in st.pools.values_mut() {
                if !pool.ready.contains(&event.vm_id) {
                    continue;
                }
                let before = pool.ready.len();
                pool.ready.retain(|e| {
                    !(e.rec.vm_id == event.vm_id && e.rec.worker_id == event.worker_id)
                });
                dropped |= pool.ready.len() != before;
            }
            if dropped {
                let store = self.store.clone();
                let vm = event.vm_id.clone();
                self.spawn(async move {
                    let _ = store.delete_pool(&vm).await;
                });
                self.pool_wake.notify_one();
            }
            st.sessions
                .get(&event.vm_id.clone().into())
                .filter(|s| {
                    let d = s.data.lock();
                    d.is_live() && d.rec.session.worker_id == event.worker_id
                })
                .cloned()
        };
        if let Some(slot) = slot {
            // Our own destroys hold the session's lock; this ends sessions whose VM the worker
            // removed on its own (evicted, failed).
            let reason = event.reason.unwrap_or(TerminationReason::VmFailed);
            self.act(slot, Action::End(End::VmGone(reason)));
        }
    }

    pub(crate) async fn liveness_loop(self: Arc<Self>) {
        let period = (self.cfg.heartbeat_timeout / 3).max(std::time::Duration::from_millis(50));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.clone().check_liveness();
            self.reconcile_pass().await;
        }
    }

    /// Liveness: a worker silent for `heartbeat_timeout` becomes *suspect* (no placements, no
    /// jobs, no inventory comparisons; its sessions stay as they are); one silent for
    /// `worker_lost_grace` is *lost*: its sessions become `lost`, its pool VMs are forgotten and the
    /// pools refill elsewhere.
    pub(crate) fn check_liveness(self: Arc<Self>) {
        let now = Instant::now();
        let mut lost: Vec<WorkerId> = Vec::new();
        let mut suspect: Vec<(WorkerId, std::time::Duration)> = Vec::new();
        let mut actions = Vec::new();
        let mut dropped_pool = Vec::new();
        {
            let mut st = self.state.lock();
            for (id, w) in st.workers.iter_mut() {
                if !w.live {
                    continue;
                }
                let silent = now.duration_since(w.last_seen);
                if silent >= self.cfg.worker_lost_grace {
                    w.live = false;
                    w.suspect = false;
                    w.inventory_fresh = false;
                    w.pending = 0;
                    lost.push(id.clone());
                } else if silent >= self.cfg.heartbeat_timeout && !w.suspect {
                    w.suspect = true;
                    w.inventory_fresh = false;
                    w.silences += 1;
                    suspect.push((id.clone(), silent));
                }
            }
            if lost.is_empty() {
                Core::worker_gauges(&st);
                drop(st);
                for (w, silent) in &suspect {
                    tracing::warn!(worker_id = %w, silent_ms = silent.as_millis() as u64,
                        lost_in_ms = self.cfg.worker_lost_grace.saturating_sub(*silent).as_millis() as u64,
                        "worker suspect: no heartbeat within the timeout; nothing placed on it");
                }
                return;
            }
            for pool in st.pools.values_mut() {
                pool.ready.retain(|e| {
                    let keep = !lost.contains(&e.rec.worker_id);
                    if !keep {
                        dropped_pool.push(e.rec.vm_id.clone());
                    }
                    keep
                });
            }
            for slot in st.sessions.values() {
                let d = slot.data.lock();
                if d.is_live() && lost.contains(&d.rec.session.worker_id) {
                    actions.push(slot.clone());
                }
            }
            let names: Vec<_> = st.pools.keys().cloned().collect();
            for name in names {
                Core::pool_gauges(&st, &name);
            }
            Core::worker_gauges(&st);
        }
        for (w, silent) in &suspect {
            tracing::warn!(worker_id = %w, silent_ms = silent.as_millis() as u64,
                "worker suspect: no heartbeat within the timeout; nothing placed on it");
        }
        for w in &lost {
            tracing::warn!(worker_id = %w, grace_ms = self.cfg.worker_lost_grace.as_millis() as u64,
                "worker lost: no heartbeat within the grace; its sessions are lost");
        }
        for vm in dropped_pool {
            let store = self.store.clone();
            self.spawn(async move {
                let _ = store.delete_pool(&vm).await;
            });
        }
        for slot in actions {
            self.act_waiting(slot, End::WorkerLost);
        }
        self.pool_wake.notify_one();
    }

    /// Like [`Core::act`] with an end, but waits for the session's lock instead of skipping: a lost
    /// worker must end its sessions even if an operation on them is still timing out. (If this
    /// fails, the lifecycle pass retries: it ends live sessions of lost workers too.)
    fn act_waiting(self: &Arc<Self>, slot: Arc<SessionSlot>, end: End) {
        let core = self.clone();
        self.spawn(async move {
            let guard = slot.op.clone().lock_owned().await;
            if let Err(err) = core.end_locked(&slot, &guard, end).await {
                tracing::warn!(error = %err, "ending a session of a lost worker failed; will retry");
            }
        });
    }
}

/// What a session's VM as its worker reports it says about the session: activity (kept in
/// `d`), or an action (the VM stopped on its own, or an exec resumed it).
fn observe_session_vm(d: &mut SessionData, vm: &VmInfo, at_ms: u64, now_ms: u64) -> Option<Action> {
    d.busy = vm.busy;
    match (d.rec.session.state, vm.state) {
        (SessionState::Running, VmState::Running) => {
            // A held VM is in use (a long command bumps its activity stamp only when it starts
            // and ends); a changed stamp is activity.
            let changed = d
                .observed_activity
                .is_some_and(|seen| seen != vm.last_activity_ms);
            if vm.busy || changed {
                d.last_used_ms = now_ms;
            }
            d.observed_activity = Some(vm.last_activity_ms);
            None
        }
        (SessionState::Running, VmState::Stopped) => Some(Action::MarkStopped {
            activity_ms: vm.last_activity_ms,
        }),
        (SessionState::Running | SessionState::Stopped, VmState::Paused) => {
            Some(Action::MarkPaused {
                activity_ms: vm.last_activity_ms,
            })
        }
        // Resumed by an exec. A report taken before our stop (still "running") is told apart by
        // the worker's own clock: the stop reply's activity stamp is the stop time on that clock.
        (SessionState::Stopped | SessionState::Paused, VmState::Running)
            if vm.last_activity_ms > d.rec.stop_activity_ms.unwrap_or(0)
                || at_ms > d.rec.stop_activity_ms.unwrap_or(0) =>
        {
            Some(Action::Resume)
        }
        _ => None,
    }
}
