//! The scheduler core: pools, placement, claims and session lifetimes. It decides; it does I/O only
//! through [`WorkerApi`] (jobs), [`Store`] (KV) and [`EventSink`] (events), so it runs in logic
//! tests with paused time, an in-memory store and in-process workers.
//!
//! Architecture invariants:
//! - A pooled VM leaves the ready list only by being popped under the state lock; a popped VM is
//!   never pushed back. Hence no VM is ever handed to two sessions.
//! - The state lock ([`Core::state`]) is synchronous and never held across an `.await`. Operations
//!   on one session are serialised by that session's async lock.
//! - A session is written to the store before the client hears of it; a VM that was claimed but
//!   could not be recorded is destroyed.
//! - Every VM on a live worker is owned by a live session, a ready pool entry or a job in flight,
//!   or it is destroyed as leaked (after a grace for young VMs).
//! - A replaced template snapshot stays listed in its template record until it is deleted from
//!   every live worker and the object store; it is not deleted while a pool entry or a pool
//!   restore uses it, nor within a grace after its replacement (cold restores that read it).
//! - A session whose VM its worker reports `busy` is never idle-stopped.

mod claim;
mod fork;
mod lifetimes;
mod observe;
mod paused;
mod pool;
pub(crate) mod state;
mod tenants;

use std::sync::Arc;
use std::time::Duration;

use hearth_messages::{
    Caller, CreateSessionRequest, DeleteTemplateRequest, KeepaliveRequest, ListSessionsRequest,
    PoolStatus, PoolsStatus, QuotasStatus, Session, SessionEvent, SessionId, SessionList,
    SessionState, SetQuotaRequest, SnapshotSessionRequest, Template, TemplateList, TemplateName,
    VmEvent, WireError, WorkerId, WorkerStatus,
};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::metrics as m;
use crate::store::{Store, StoreError, TemplateRecord};
use crate::worker_api::{EventSink, WorkerApi};
use state::{PoolVm, SessionData, SessionSlot, State, TemplateEntry, WorkerEntry};

/// The shared core behind [`Scheduler`].
pub(crate) struct Core {
    cfg: Arc<SchedulerConfig>,
    api: Arc<dyn WorkerApi>,
    store: Store,
    events: Arc<dyn EventSink>,
    clock: Clock,
    state: Mutex<State>,
    /// Wakes the pool supervisor (claims, restores finishing, workers appearing).
    pool_wake: Notify,
    /// Bumped whenever a template's snapshot changes (cold claims wait on it).
    templates_changed: watch::Sender<u64>,
    /// Bumped on every heartbeat (startup waits on it).
    heartbeats: watch::Sender<u64>,
    /// Bumped when a session becomes or stops being unplaced (the service serves their data
    /// plane).
    unplaced_changed: watch::Sender<u64>,
    /// Serialises read-modify-write of template records (a build recording its snapshot, snapshot
    /// GC removing a retired one), so neither overwrites the other's change with a stale record.
    template_writes: tokio::sync::Mutex<()>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Cancelled when this scheduler lost the lease: from then on it writes nothing (claims in
    /// flight end with 503 before recording).
    deposed: CancellationToken,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

/// The scheduler core: a cheap handle (clone it freely).
#[derive(Debug, Clone)]
pub struct Scheduler {
    core: Arc<Core>,
}

impl Scheduler {
    /// Loads every session, pool entry and template from `store` and merges the templates of the
    /// config. Nothing runs until [`Scheduler::start_background`].
    pub async fn load(
        cfg: Arc<SchedulerConfig>,
        api: Arc<dyn WorkerApi>,
        store: Store,
        events: Arc<dyn EventSink>,
    ) -> Result<Self, StoreError> {
        let loaded = store.load_all().await?;
        for err in &loaded.corrupt {
            tracing::error!(error = %err, "skipping a corrupt record");
        }
        let now = Instant::now();
        let clock = Clock::new();
        let mut st = State::default();
        let mut template_writes = Vec::new();

        // Templates: the stored ones, merged with the config (which wins on sizing).
        for rec in loaded.templates {
            st.templates
                .insert(rec.template.name.clone(), TemplateEntry::new(rec, None));
        }
        for tc in &cfg.templates {
            let entry = st.templates.entry(tc.name.clone()).or_insert_with(|| {
                let rec = TemplateRecord {
                    template: Template {
                        name: tc.name.clone(),
                        snapshot_id: None,
                        source_session: None,
                        min_ready: 0,
                        max_ready: 0,
                        vcpus: 0,
                        memory_mib: 0,
                        disk_mib: 0,
                        max_processes: 0,
                        network: None,
                        created_ms: clock.now_ms(),
                        tenant: None,
                        snapshot_bytes: 0,
                        deleting: false,
                        notes: Vec::new(),
                    },
                    env: Default::default(),
                    build: None,
                    retired_snapshots: Vec::new(),
                };
                TemplateEntry::new(rec, None)
            });
            let before = entry.rec.clone();
            let t = &mut entry.rec.template;
            t.min_ready = tc.min_ready;
            t.max_ready = tc.max_ready();
            t.vcpus = tc.vcpus;
            t.memory_mib = tc.memory_mib;
            t.disk_mib = tc.disk_mib;
            t.max_processes = tc.max_processes;
            t.network = Some(tc.network.clone());
            entry.rec.env = tc.env.clone();
            entry.config = Some(tc.clone());
            if entry.rec != before {
                template_writes.push(entry.rec.clone());
            }
        }
        for entry in st.templates.values_mut() {
            if entry.config.is_none() && entry.rec.build.is_some() {
                // A config template that is no longer configured: keep it claimable (cold), but
                // keep no pool.
                entry.rec.template.min_ready = 0;
                entry.rec.template.max_ready = 0;
            }
        }

        // Sessions.
        for (rec, rev) in loaded.sessions {
            let sid = rec.session.session_id.clone();
            if !rec.session.state.is_terminal() {
                st.workers
                    .entry(rec.session.worker_id.clone())
                    .or_insert_with(|| WorkerEntry::unconfirmed(now));
            }
            let mut data = SessionData::new(rec, rev, None);
            // The idle timer restarts: activity since the last write is unknown.
            data.idle_base_ms = clock.now_ms();
            let slot = SessionSlot::new(data);
            if slot.data.lock().is_live() {
                Core::track_tenant_session(&mut st, &slot);
            }
            st.sessions.insert(sid, slot);
        }
        st.quota_overrides = loaded.quotas.into_iter().collect();

        // Pool entries.
        let mut pool_deletes = Vec::new();
        for rec in loaded.pool {
            if !st.templates.contains_key(&rec.template) {
                pool_deletes.push(rec.vm_id.clone());
                continue;
            }
            st.workers
                .entry(rec.worker_id.clone())
                .or_insert_with(|| WorkerEntry::unconfirmed(now));
            st.pools
                .entry(rec.template.clone())
                .or_default()
                .ready
                .push_back(PoolVm {
                    rec,
                    missing_since: None,
                });
        }
        for pool in st.pools.values_mut() {
            pool.ready.sort_by_created();
        }
        tracing::info!(
            sessions = st.sessions.len(),
            pool = st.pools.values().map(|p| p.ready.len()).sum::<usize>(),
            templates = st.templates.len(),
            "state loaded"
        );

        let core = Arc::new(Core {
            cfg,
            api,
            store,
            events,
            clock,
            state: Mutex::new(st),
            pool_wake: Notify::new(),
            templates_changed: watch::Sender::new(0),
            heartbeats: watch::Sender::new(0),
            unplaced_changed: watch::Sender::new(0),
            template_writes: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            deposed: CancellationToken::new(),
        });
        for rec in template_writes {
            if let Err(err) = core.store.put_template(&rec).await {
                tracing::warn!(error = %err, template = %rec.template.name, "saving template");
            }
        }
        for vm in pool_deletes {
            let _ = core.store.delete_pool(&vm).await;
        }
        Ok(Self { core })
    }

    /// Starts the background loops: pool supervisor, session lifetimes, worker liveness.
    pub fn start_background(&self) {
        let core = self.core.clone();
        self.core.spawn(async move { core.pool_supervisor().await });
        let core = self.core.clone();
        self.core.spawn(async move { core.lifecycle_loop().await });
        let core = self.core.clone();
        self.core.spawn(async move { core.liveness_loop().await });
    }

    /// Waits until every worker the loaded state references has sent a heartbeat, or `timeout`.
    /// Call before serving after a restart, so that claims see the fleet as it is.
    pub async fn wait_for_workers(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut rx = self.core.heartbeats.subscribe();
        loop {
            let pending = self
                .core
                .state
                .lock()
                .workers
                .values()
                .any(|w| w.status.is_none());
            if !pending {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// This scheduler lost the leader lease: stop acting at once. Background loops stop, and
    /// requests in flight write nothing more (a claim not yet recorded answers 503).
    pub fn depose(&self) {
        tracing::warn!("deposed: acting no more");
        self.core.deposed.cancel();
        self.core.cancel.cancel();
    }

    /// Stops the background loops and waits (at most `grace`) for the tasks they spawned. The
    /// gauges are zeroed: a standby must not report a fleet it no longer manages.
    pub async fn shutdown(&self, grace: Duration) {
        self.core.cancel.cancel();
        self.core.tasks.close();
        {
            let st = self.core.state.lock();
            for name in st.templates.keys() {
                let label = [("template", name.to_string())];
                metrics::gauge!(m::POOL_READY, &label).set(0.0);
                metrics::gauge!(m::POOL_RESTORING, &label).set(0.0);
                metrics::gauge!(m::POOL_TARGET, &label).set(0.0);
            }
            for state in ["running", "stopped", "released", "lost"] {
                metrics::gauge!(m::SESSIONS, "state" => state).set(0.0);
            }
            metrics::gauge!(m::WORKERS_UP).set(0.0);
            metrics::gauge!(m::WORKERS_SUSPECT).set(0.0);
        }
        if tokio::time::timeout(grace, self.core.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks still running after the grace period");
        }
    }

    /// `sessions.create` as the operator: claim a warm VM, or restore one cold. Wakes the refill
    /// afterwards.
    pub async fn create_session(&self, req: CreateSessionRequest) -> Result<Session, WireError> {
        self.create_session_as(&Caller::Operator, req).await
    }

    /// `sessions.create` as `caller` (the session is the caller's tenant's).
    pub async fn create_session_as(
        &self,
        caller: &Caller,
        req: CreateSessionRequest,
    ) -> Result<Session, WireError> {
        let result = self.claim_session_as(caller, req).await;
        self.wake_refill();
        result
    }

    /// `sessions.create` as the operator without waking the refill.
    pub async fn claim_session(&self, req: CreateSessionRequest) -> Result<Session, WireError> {
        self.claim_session_as(&Caller::Operator, req).await
    }

    /// `sessions.create` without waking the refill: the service replies first, then calls
    /// [`Scheduler::wake_refill`].
    pub async fn claim_session_as(
        &self,
        caller: &Caller,
        req: CreateSessionRequest,
    ) -> Result<Session, WireError> {
        self.core.clone().claim_session(req, caller.clone()).await
    }

    /// Wakes the pool supervisor (after a claim's reply).
    pub fn wake_refill(&self) {
        self.core.pool_wake.notify_one();
    }

    /// `sessions.<sid>.get` as the operator.
    pub fn get_session(&self, sid: &SessionId) -> Result<Session, WireError> {
        self.get_session_as(&Caller::Operator, sid)
    }

    /// `sessions.<sid>.get`: 404 unless the caller owns it.
    pub fn get_session_as(&self, caller: &Caller, sid: &SessionId) -> Result<Session, WireError> {
        self.core.owned_slot(caller, sid).map(|s| s.view())
    }

    /// `sessions.list` as the operator.
    pub fn list_sessions(&self, req: &ListSessionsRequest) -> SessionList {
        self.list_sessions_as(&Caller::Operator, req)
    }

    /// `sessions.list`: the caller's live sessions matching the filter, by creation time.
    pub fn list_sessions_as(&self, caller: &Caller, req: &ListSessionsRequest) -> SessionList {
        let slots: Vec<_> = match caller.tenant() {
            None => self.core.state.lock().sessions.values().cloned().collect(),
            Some(t) => self
                .core
                .state
                .lock()
                .tenant_sessions
                .get(t)
                .cloned()
                .unwrap_or_default(),
        };
        let mut sessions: Vec<Session> = slots
            .iter()
            .map(|s| s.view())
            .filter(|s| !s.state.is_terminal() && caller.owns(s.tenant.as_ref()))
            .filter(|s| req.template.as_ref().is_none_or(|t| &s.template == t))
            .filter(|s| {
                req.labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == v))
            })
            .collect();
        sessions.sort_by(|a, b| {
            (a.created_ms, a.session_id.as_str()).cmp(&(b.created_ms, b.session_id.as_str()))
        });
        SessionList { sessions }
    }

    /// `sessions.<sid>.keepalive` as the operator.
    pub async fn keepalive(
        &self,
        sid: &SessionId,
        req: KeepaliveRequest,
    ) -> Result<Session, WireError> {
        self.keepalive_as(&Caller::Operator, sid, req).await
    }

    /// `sessions.<sid>.keepalive`: 404 unless the caller owns it.
    pub async fn keepalive_as(
        &self,
        caller: &Caller,
        sid: &SessionId,
        req: KeepaliveRequest,
    ) -> Result<Session, WireError> {
        self.core.owned_slot(caller, sid)?;
        self.core.keepalive(sid, req).await
    }

    /// `sessions.<sid>.pause` as the operator.
    pub async fn pause(&self, sid: &SessionId) -> Result<Session, WireError> {
        self.pause_as(&Caller::Operator, sid).await
    }

    /// `sessions.<sid>.pause`: saves the session's VM to its worker's disk (404 unless the caller
    /// owns it; 409 if it has ended or a command runs in it). Pausing a paused session returns it.
    pub async fn pause_as(&self, caller: &Caller, sid: &SessionId) -> Result<Session, WireError> {
        self.pause_with(caller, sid, hearth_messages::PauseRequest::default())
            .await
    }

    /// `sessions.<sid>.pause` with its request: `upload` overrides the template's
    /// `pause_upload` (400 on a worker that keeps paused sessions in memory).
    pub async fn pause_with(
        &self,
        caller: &Caller,
        sid: &SessionId,
        req: hearth_messages::PauseRequest,
    ) -> Result<Session, WireError> {
        self.core.owned_slot(caller, sid)?;
        self.core.pause(sid, req.upload).await
    }

    /// A data-plane request for an unplaced session (its worker lost, its paused state
    /// uploaded): resumes it on another worker, after which the request can go there. 404
    /// unless the caller owns it; 409 if its state could not be restored (it is `lost`); 503
    /// when no worker can take it now.
    pub async fn place_as(&self, caller: &Caller, sid: &SessionId) -> Result<Session, WireError> {
        let slot = self.core.owned_slot(caller, sid)?;
        self.core.touch_unplaced(slot, sid).await
    }

    /// The sessions whose data plane the scheduler serves (unplaced ones).
    pub fn unplaced_sessions(&self) -> Vec<SessionId> {
        self.core.unplaced_sessions()
    }

    /// Changes to [`Scheduler::unplaced_sessions`].
    pub fn unplaced_changes(&self) -> watch::Receiver<u64> {
        self.core.unplaced_changed.subscribe()
    }

    /// `sessions.<sid>.fork` as the operator.
    pub async fn fork(
        &self,
        sid: &SessionId,
        req: hearth_messages::ForkSessionRequest,
    ) -> Result<hearth_messages::ForkSessionReply, WireError> {
        self.fork_as(&Caller::Operator, sid, req).await
    }

    /// `sessions.<sid>.fork`: branches the session into `req.count` new ones (404 unless the
    /// caller owns it; 429 when the copies do not fit its quota).
    pub async fn fork_as(
        &self,
        caller: &Caller,
        sid: &SessionId,
        req: hearth_messages::ForkSessionRequest,
    ) -> Result<hearth_messages::ForkSessionReply, WireError> {
        self.core.fork(caller, sid, req).await
    }

    /// `sessions.<sid>.release` as the operator.
    pub async fn release(&self, sid: &SessionId) -> Result<Session, WireError> {
        self.release_as(&Caller::Operator, sid).await
    }

    /// `sessions.<sid>.release`: destroys the VM now (404 unless the caller owns it). Releasing
    /// an ended session returns it.
    pub async fn release_as(&self, caller: &Caller, sid: &SessionId) -> Result<Session, WireError> {
        self.core.owned_slot(caller, sid)?;
        self.core.release(sid).await
    }

    /// `sessions.<sid>.snapshot` as the operator.
    pub async fn snapshot_session(
        &self,
        sid: &SessionId,
        req: SnapshotSessionRequest,
    ) -> Result<Template, WireError> {
        self.snapshot_session_as(&Caller::Operator, sid, req).await
    }

    /// `sessions.<sid>.snapshot`: captures the session's VM as a new template owned by the
    /// session's tenant (404 unless the caller owns the session).
    pub async fn snapshot_session_as(
        &self,
        caller: &Caller,
        sid: &SessionId,
        req: SnapshotSessionRequest,
    ) -> Result<Template, WireError> {
        self.core.owned_slot(caller, sid)?;
        self.core.clone().snapshot_session(sid, req).await
    }

    /// `templates.<name>.delete`: its owner (or the operator) drains its pool and deletes its
    /// snapshots everywhere, in the background; the reply is the template marked `deleting`.
    pub async fn delete_template_as(
        &self,
        caller: &Caller,
        name: &TemplateName,
        req: DeleteTemplateRequest,
    ) -> Result<Template, WireError> {
        self.core.clone().delete_template(caller, name, req).await
    }

    /// Whether a create by `tenant` would be refused by its quotas now (429), without taking a
    /// create token: the service answers such a flood before spending anything else on it.
    pub fn create_refused(&self, tenant: &hearth_messages::TenantId) -> Option<WireError> {
        self.core.create_refused(tenant)
    }

    /// `admin.quotas.get` (operator only).
    pub fn quotas_status(&self, caller: &Caller) -> Result<QuotasStatus, WireError> {
        self.core.quotas_status(caller)
    }

    /// `admin.maintenance`: runs the session lifecycle pass now (operator only).
    pub fn run_maintenance(
        &self,
        caller: &Caller,
    ) -> Result<hearth_messages::MaintenanceReport, WireError> {
        self.core.run_maintenance(caller)
    }

    /// `admin.workers` (operator only).
    pub fn workers_status(
        &self,
        caller: &Caller,
    ) -> Result<hearth_messages::WorkersStatus, WireError> {
        self.core.workers_status(caller)
    }

    /// `admin.quotas.set` (operator only).
    pub async fn set_quota(
        &self,
        caller: &Caller,
        req: SetQuotaRequest,
    ) -> Result<QuotasStatus, WireError> {
        self.core.set_quota(caller, req).await
    }

    /// `templates.list` as the operator.
    pub fn list_templates(&self) -> TemplateList {
        self.list_templates_as(&Caller::Operator)
    }

    /// `templates.list`: the operator's templates and the caller's own.
    pub fn list_templates_as(&self, caller: &Caller) -> TemplateList {
        let st = self.core.state.lock();
        TemplateList {
            templates: st
                .templates
                .values()
                .filter(|t| !t.reserved && caller.may_use_template(t.rec.template.tenant.as_ref()))
                .map(|t| t.rec.template.clone())
                .collect(),
        }
    }

    /// `pools.status` as the operator.
    pub fn pools_status(&self) -> PoolsStatus {
        self.pools_status_as(&Caller::Operator)
    }

    /// `pools.status`: the pools of the templates the caller may use; `claimed` counts the
    /// caller's own sessions (a tenant learns nothing of others' use of a shared template).
    pub fn pools_status_as(&self, caller: &Caller) -> PoolsStatus {
        let st = self.core.state.lock();
        let mut claimed: std::collections::HashMap<TemplateName, u32> = Default::default();
        let slots: Vec<_> = match caller.tenant() {
            None => st.sessions.values().cloned().collect(),
            Some(t) => st.tenant_sessions.get(t).cloned().unwrap_or_default(),
        };
        for s in slots.iter().map(|s| s.view()) {
            if !s.state.is_terminal() && caller.owns(s.tenant.as_ref()) {
                *claimed.entry(s.template).or_default() += 1;
            }
        }
        PoolsStatus {
            pools: st
                .templates
                .values()
                .filter(|t| !t.reserved && caller.may_use_template(t.rec.template.tenant.as_ref()))
                .map(|t| {
                    let name = &t.rec.template.name;
                    let pool = st.pools.get(name);
                    let mut isolation: Vec<_> = pool
                        .into_iter()
                        .flat_map(|p| p.ready.iter().map(|e| &e.rec.worker_id))
                        .filter_map(|w| st.workers.get(w)?.status.as_ref())
                        .map(|s| s.isolation.clone())
                        .collect();
                    isolation.sort();
                    isolation.dedup();
                    PoolStatus {
                        isolation,
                        template: name.clone(),
                        ready: pool.map_or(0, |p| p.ready.len() as u32),
                        restoring: pool.map_or(0, |p| p.restoring.len() as u32),
                        target: t.rec.template.min_ready,
                        claimed: claimed.get(name).copied().unwrap_or(0),
                    }
                })
                .collect(),
        }
    }

    /// Feeds one worker heartbeat (observations, liveness, leak reconcile). Trusts the body's
    /// worker id: for in-process callers; NATS messages go through [`Scheduler::on_heartbeat_from`].
    pub fn on_heartbeat(&self, status: WorkerStatus) {
        self.core.clone().on_heartbeat(status);
    }

    /// Feeds one VM event from a worker (trusting the body; see [`Scheduler::on_vm_event_from`]).
    pub fn on_vm_event(&self, event: VmEvent) {
        self.core.clone().on_vm_event(event);
    }

    /// Feeds a heartbeat that arrived on worker `from`'s subject. A body naming another worker is
    /// a spoof: dropped, counted and logged, never acted on. Returns whether it was accepted.
    pub fn on_heartbeat_from(&self, from: &WorkerId, status: WorkerStatus) -> bool {
        if !same_sender(from, &status.worker_id, "heartbeat") {
            return false;
        }
        self.core.clone().on_heartbeat(status);
        true
    }

    /// Feeds a VM event that arrived on worker `from`'s subject (spoofs dropped as for
    /// heartbeats). Returns whether it was accepted.
    pub fn on_vm_event_from(&self, from: &WorkerId, event: VmEvent) -> bool {
        if !same_sender(from, &event.worker_id, "vm_event") {
            return false;
        }
        self.core.clone().on_vm_event(event);
        true
    }

    /// Runs one liveness pass now (tests; the background loop runs it periodically).
    pub fn check_liveness(&self) {
        self.core.clone().check_liveness();
    }

    /// Ready pooled VMs of `template` (tests and status).
    pub fn ready_count(&self, template: &TemplateName) -> usize {
        self.core
            .state
            .lock()
            .pools
            .get(template)
            .map_or(0, |p| p.ready.len())
    }

    /// Ids and workers of the ready pooled VMs of `template`, oldest first (tests).
    pub fn ready_vms(
        &self,
        template: &TemplateName,
    ) -> Vec<(hearth_messages::VmId, hearth_messages::WorkerId)> {
        self.core
            .state
            .lock()
            .pools
            .get(template)
            .map(|p| {
                p.ready
                    .iter()
                    .map(|e| (e.rec.vm_id.clone(), e.rec.worker_id.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Healthy workers (heartbeating, not suspect).
    pub fn live_workers(&self) -> Vec<hearth_messages::WorkerId> {
        let st = self.core.state.lock();
        st.workers
            .iter()
            .filter(|(_, w)| w.healthy())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The scheduler's clock (unix ms), which follows tokio's (paused in tests) time.
    pub fn now_ms(&self) -> u64 {
        self.core.clock.now_ms()
    }
}

/// Whether a message's body speaks for the worker whose subject it came on.
fn same_sender(from: &WorkerId, body: &WorkerId, kind: &'static str) -> bool {
    if from == body {
        return true;
    }
    metrics::counter!(m::SPOOFED_MESSAGES_TOTAL, "kind" => kind).increment(1);
    tracing::warn!(subject_worker = %from, body_worker = %body, kind,
        "dropping a message whose body names another worker than its subject");
    false
}

pub(crate) fn unknown_session(sid: &SessionId) -> WireError {
    WireError::not_found(format!("unknown session {sid}"))
}

fn store_error(err: StoreError) -> WireError {
    match err {
        StoreError::Conflict { key } => {
            WireError::conflict(format!("concurrent update of {key}; retry"))
        }
        other => WireError::no_capacity(other.to_string(), 1000),
    }
}

impl Core {
    /// Spawns a task owned by the core (cancelled on shutdown).
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    fn slot(&self, sid: &SessionId) -> Option<Arc<SessionSlot>> {
        self.state.lock().sessions.get(sid).cloned()
    }

    /// The session if `caller` owns it; else 404, worded exactly as for an unknown id.
    fn owned_slot(&self, caller: &Caller, sid: &SessionId) -> Result<Arc<SessionSlot>, WireError> {
        self.slot(sid)
            .filter(|s| caller.owns(s.data.lock().rec.session.tenant.as_ref()))
            .ok_or_else(|| unknown_session(sid))
    }

    /// An error if this scheduler lost the lease (nothing may be written any more).
    fn check_leader(&self) -> Result<(), StoreError> {
        if self.deposed.is_cancelled() {
            return Err(StoreError::Unavailable(
                "this scheduler is no longer the leader".into(),
            ));
        }
        Ok(())
    }

    fn retry_after_ms(&self) -> u64 {
        self.cfg.retry_after.as_millis() as u64
    }

    /// Publishes a session event in the background.
    fn publish(
        self: &Arc<Self>,
        session: &Session,
        reason: Option<hearth_messages::TerminationReason>,
    ) {
        let event = SessionEvent {
            tenant: session.tenant.clone(),
            session_id: session.session_id.clone(),
            state: session.state,
            reason,
            at_ms: self.clock.now_ms(),
        };
        let events = self.events.clone();
        self.spawn(async move { events.session_event(event).await });
    }

    /// Sets the pool gauges of `template`.
    fn pool_gauges(st: &State, template: &TemplateName) {
        let (ready, restoring) = st
            .pools
            .get(template)
            .map_or((0, 0), |p| (p.ready.len(), p.restoring.len()));
        let target = st
            .templates
            .get(template)
            .map_or(0, |t| t.rec.template.min_ready);
        let label = [("template", template.to_string())];
        metrics::gauge!(m::POOL_READY, &label).set(ready as f64);
        metrics::gauge!(m::POOL_RESTORING, &label).set(restoring as f64);
        metrics::gauge!(m::POOL_TARGET, &label).set(target as f64);
    }

    /// Sets the sessions-by-state gauge.
    fn session_gauges(&self) {
        let slots: Vec<_> = self.state.lock().sessions.values().cloned().collect();
        let mut counts = [0u64; 5];
        let mut by_tenant: std::collections::HashMap<Option<hearth_messages::TenantId>, u64> =
            Default::default();
        for s in &slots {
            let d = s.data.lock();
            if d.is_live() {
                let tenant = &d.rec.session.tenant;
                match by_tenant.get_mut(tenant) {
                    Some(n) => *n += 1,
                    None => {
                        by_tenant.insert(tenant.clone(), 1);
                    }
                }
            }
            let i = match d.rec.session.state {
                SessionState::Running => 0,
                SessionState::Stopped => 1,
                SessionState::Released => 2,
                SessionState::Lost => 3,
                SessionState::Paused => 4,
            };
            counts[i] += 1;
        }
        for (i, state) in ["running", "stopped", "released", "lost", "paused"]
            .iter()
            .enumerate()
        {
            metrics::gauge!(m::SESSIONS, "state" => *state).set(counts[i] as f64);
        }
        self.tenant_gauges(by_tenant);
    }

    /// Healthy workers (for the gauge).
    fn workers_up(st: &State) -> usize {
        st.workers.values().filter(|w| w.healthy()).count()
    }

    /// Sets the worker gauges (healthy, suspect).
    fn worker_gauges(st: &State) {
        metrics::gauge!(m::WORKERS_UP).set(Core::workers_up(st) as f64);
        let suspect = st.workers.values().filter(|w| w.live && w.suspect).count();
        metrics::gauge!(m::WORKERS_SUSPECT).set(suspect as f64);
    }
}
