//! What workers report, and the level-triggered repairs it drives: liveness (suspect and lost
//! workers, the sessions of lost ones), session state observed in heartbeats (activity, stop,
//! resume, vanished VMs), pool entries that vanished, and leaked VMs.
//!
//! A fault is not a death: a silent worker is only *suspect* (nothing placed on it, nothing of it
//! compared or destroyed) until `worker_lost_grace`; when it heartbeats again it is healthy, and
//! its inventory drives reconcile again once it answered a fresh `list_vms`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hearth_messages::{
    JobOp, JobOutput, SessionState, TerminationReason, VmEvent, VmId, VmInfo, VmState, WorkerId,
    WorkerStatus,
};
use tokio::time::Instant;

use super::Core;
use super::lifetimes::{Action, End};
use super::state::{SessionSlot, WorkerEntry};
use crate::metrics as m;
use crate::worker_api::job;

impl Core {
    pub(crate) fn on_heartbeat(self: Arc<Self>, status: WorkerStatus) {
        let now = Instant::now();
        let now_ms = self.clock.now_ms();
        let worker = status.worker_id.clone();
        let mut actions: Vec<(Arc<SessionSlot>, Action)> = Vec::new();
        let mut leaked: Vec<VmId> = Vec::new();
        let mut dropped_pool: Vec<VmId> = Vec::new();
        let wake;
        let mut refresh: Option<u64> = None;
        {
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
            let draining = status.draining;
            entry.status = Some(status);
            entry.last_seen = now;
            entry.live = true;
            entry.suspect = false;
            entry.created_since_heartbeat = 0;
            // After a silence, compare nothing until the worker answered a `list_vms` sent now:
            // heartbeats buffered across the outage describe the past.
            let fresh = entry.inventory_fresh;
            if !fresh && !entry.inventory_check {
                entry.inventory_check = true;
                refresh = Some(entry.silences);
            }
            wake = came_back || recovered || restarted;

            let st = &mut *st;
            let status = st.workers[&worker].status.as_ref().expect("just set");
            let inventory: HashMap<&VmId, &VmInfo> = status
                .vms
                .iter()
                .filter(|v| v.state != VmState::Destroyed)
                .map(|v| (&v.vm_id, v))
                .collect();
            let grace = self.cfg.vm_missing_grace;

            // Pool entries: vanished ones (or all, on a draining worker) are forgotten.
            for pool in st.pools.values_mut() {
                pool.ready.retain_mut(|e| {
                    if e.rec.worker_id != worker {
                        return true;
                    }
                    if draining {
                        dropped_pool.push(e.rec.vm_id.clone());
                        return false;
                    }
                    if inventory.contains_key(&e.rec.vm_id) {
                        e.missing_since = None;
                        return true;
                    }
                    if !fresh {
                        return true;
                    }
                    let since = *e.missing_since.get_or_insert(now);
                    if now.duration_since(since) >= grace {
                        tracing::warn!(vm_id = %e.rec.vm_id, worker_id = %worker, "pooled vm vanished");
                        dropped_pool.push(e.rec.vm_id.clone());
                        return false;
                    }
                    true
                });
            }

            // Sessions on this worker.
            let mut owned: HashSet<&VmId> = HashSet::new();
            let slots: Vec<Arc<SessionSlot>> = st.sessions.values().cloned().collect();
            let mut owned_sessions: Vec<VmId> = Vec::new();
            for slot in slots {
                let mut d = slot.data.lock();
                if !d.is_live() || d.rec.session.worker_id != worker {
                    continue;
                }
                let vm_id: VmId = d.rec.session.session_id.clone().into();
                match inventory.get(&vm_id) {
                    None if !fresh => {}
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
                        d.busy = vm.busy;
                        match (d.rec.session.state, vm.state) {
                            (SessionState::Running, VmState::Running) => {
                                // A held VM is in use (a long command bumps its activity stamp
                                // only when it starts and ends); a changed stamp is activity.
                                let changed = d
                                    .observed_activity
                                    .is_some_and(|seen| seen != vm.last_activity_ms);
                                if vm.busy || changed {
                                    d.last_used_ms = now_ms;
                                }
                                d.observed_activity = Some(vm.last_activity_ms);
                            }
                            (SessionState::Running, VmState::Stopped) => actions.push((
                                slot.clone(),
                                Action::MarkStopped {
                                    activity_ms: vm.last_activity_ms,
                                },
                            )),
                            (SessionState::Running | SessionState::Stopped, VmState::Paused) => {
                                actions.push((
                                    slot.clone(),
                                    Action::MarkPaused {
                                        activity_ms: vm.last_activity_ms,
                                    },
                                ))
                            }
                            // Resumed by an exec. A heartbeat taken before our stop (still
                            // "running") is told apart by the worker's own clock: the stop
                            // reply's activity stamp is the stop time on that clock.
                            (SessionState::Stopped | SessionState::Paused, VmState::Running)
                                if vm.last_activity_ms > d.rec.stop_activity_ms.unwrap_or(0)
                                    || status.at_ms > d.rec.stop_activity_ms.unwrap_or(0) =>
                            {
                                actions.push((slot.clone(), Action::Resume));
                            }
                            _ => {}
                        }
                    }
                }
                owned_sessions.push(vm_id);
            }
            owned.extend(owned_sessions.iter());

            // Leaks: VMs nothing owns (old enough that no job can be creating them).
            let pool_owned: HashSet<&VmId> = st
                .pools
                .values()
                .flat_map(|p| p.ready.iter())
                .filter(|e| e.rec.worker_id == worker)
                .map(|e| &e.rec.vm_id)
                .chain(
                    st.pools
                        .values()
                        .flat_map(|p| p.restoring.iter())
                        .filter(|(_, r)| r.worker == worker)
                        .map(|(id, _)| id),
                )
                .collect();
            let leak_grace = self.cfg.leak_grace.as_millis() as u64;
            for vm in inventory.values() {
                if !fresh {
                    break;
                }
                let key = (worker.clone(), vm.vm_id.clone());
                // Never a VM that a live session names, whichever worker its record says.
                let live_session = st
                    .sessions
                    .get(&vm.vm_id.clone().into())
                    .is_some_and(|slot| slot.data.lock().is_live());
                if live_session
                    || owned.contains(&vm.vm_id)
                    || pool_owned.contains(&vm.vm_id)
                    || st.inflight.contains_key(&key)
                    || st.destroying.contains(&key)
                    || status.at_ms.saturating_sub(vm.created_ms) < leak_grace
                {
                    continue;
                }
                leaked.push(vm.vm_id.clone());
            }
        }
        self.heartbeats.send_modify(|v| *v += 1);
        if let Some(silences) = refresh {
            self.refresh_inventory(worker.clone(), silences);
        }

        for vm in dropped_pool {
            let store = self.store.clone();
            self.spawn(async move {
                let _ = store.delete_pool(&vm).await;
            });
        }
        for vm in leaked {
            tracing::warn!(vm_id = %vm, worker_id = %worker, "destroying a leaked vm");
            metrics::counter!(m::LEAKED_VMS_DESTROYED_TOTAL).increment(1);
            self.destroy_detached(worker.clone(), vm, None);
        }
        for (slot, action) in actions {
            self.act(slot, action);
        }
        if wake {
            self.pool_wake.notify_one();
        }
        let st = self.state.lock();
        Core::worker_gauges(&st);
        let below = st.pools.iter().any(|(name, p)| {
            st.templates.get(name).is_some_and(|t| {
                p.ready.len() + p.restoring.len() < t.rec.template.min_ready as usize
            })
        });
        drop(st);
        if below {
            self.pool_wake.notify_one();
        }
    }

    pub(crate) fn on_vm_event(self: Arc<Self>, event: VmEvent) {
        if event.state != VmState::Destroyed {
            return;
        }
        let slot = {
            let mut st = self.state.lock();
            let mut dropped = false;
            for pool in st.pools.values_mut() {
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
        }
    }

    /// Asks `worker` for its inventory after a silence; once it answers (and has not gone silent
    /// again since, `silences` unchanged), its heartbeats drive reconcile again.
    fn refresh_inventory(self: &Arc<Self>, worker: WorkerId, silences: u64) {
        let core = self.clone();
        self.spawn(async move {
            let outcome = core
                .api
                .job(&worker, job(JobOp::ListVms {}), core.cfg.jobs.rename)
                .await;
            let mut st = core.state.lock();
            let Some(w) = st.workers.get_mut(&worker) else {
                return;
            };
            w.inventory_check = false;
            match outcome {
                Ok(JobOutput::Vms { vms }) if w.healthy() && w.silences == silences => {
                    w.inventory_fresh = true;
                    tracing::info!(worker_id = %worker, vms = vms.len(),
                        "fresh inventory after a silence; reconcile resumes on this worker");
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(worker_id = %worker, error = %err,
                        "asking for a fresh inventory failed; retrying on the next heartbeat");
                }
            }
        });
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
