//! The claim path (`sessions.create`): idempotency, warm pop + rename, cold restore, record, reply.

use std::sync::Arc;
use std::time::Duration;

use hearth_messages::client::new_session_id;
use hearth_messages::{
    Caller, CreateSessionRequest, ErrorCode, JobOp, JobOutput, Session, SessionId, SessionState,
    SnapshotId, TemplateName, VmId, VmInfo, VmSpec, WireError, WorkerId,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::state::{ClaimResult, PendingClaim, PoolVm, SessionData, SessionSlot, State};
use super::{Core, store_error};
use crate::metrics as m;
use crate::store::{SessionRecord, StoreError};
use crate::worker_api::{JobError, job};

/// The longest a claim waits (`wait_ms` beyond it is clamped).
pub(crate) const MAX_CLAIM_WAIT: Duration = Duration::from_secs(300);

/// When a session with `ttl_s` seconds of lifetime left at `now_ms` expires (saturating).
pub(crate) fn expiry_ms(now_ms: u64, ttl_s: u64) -> u64 {
    now_ms.saturating_add(ttl_s.saturating_mul(1000))
}

/// What the idempotency check decided.
// `Done` carries a whole `Session`; a `Begin` lives for one call, so boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum Begin {
    /// Answer now (existing session, or a conflict).
    Done(Result<Session, WireError>),
    /// The same claim is in flight: wait for its outcome.
    Follow(watch::Receiver<ClaimResult>),
    /// This request runs the claim.
    Lead(ClaimGuard),
}

/// Removes the in-flight claim entry when the claim ends, also when its task is dropped.
struct ClaimGuard {
    core: Arc<Core>,
    sid: SessionId,
    tx: watch::Sender<ClaimResult>,
    finished: bool,
}

impl ClaimGuard {
    fn finish(mut self, result: &Result<Session, WireError>) {
        self.core.state.lock().claims.remove(&self.sid);
        self.tx.send_replace(Some(result.clone()));
        self.finished = true;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.core.state.lock().claims.remove(&self.sid);
            self.tx.send_replace(Some(Err(WireError::no_capacity(
                "the claim was interrupted; retry",
                1000,
            ))));
        }
    }
}

/// What reading a claim's session record back found.
enum Recorded {
    /// A live record naming this claim's worker, so its VM: the claim succeeded.
    Ours(SessionRecord, u64),
    /// A record naming another VM (a raced retry, another leader) or an ended session.
    Other(SessionRecord, u64),
    /// No record: the write did not land.
    Absent,
    /// The store did not answer in time.
    Unknown(StoreError),
}

/// How a claim was (or was not) served, for metrics.
#[derive(Clone, Copy)]
enum Launch {
    Warm,
    Cold,
    None,
}

impl Launch {
    fn as_str(self) -> &'static str {
        match self {
            Launch::Warm => "warm",
            Launch::Cold => "cold",
            Launch::None => "none",
        }
    }
}

fn result_label(result: &Result<Session, WireError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => match e.code {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NoCapacity | ErrorCode::Quota => "no_capacity",
            ErrorCode::Deadline => "deadline",
            _ => "error",
        },
    }
}

/// The id a pooled VM gets: `pool-<template>-<random>`, within the id length limit.
pub(crate) fn pool_vm_id(prefix: &str, template: &TemplateName) -> VmId {
    let short: String = template.as_str().chars().take(96).collect();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    VmId::new(format!("{prefix}-{short}-{}", &rand[..12])).expect("a valid vm id")
}

impl Core {
    pub(crate) async fn claim_session(
        self: Arc<Self>,
        req: CreateSessionRequest,
        caller: Caller,
    ) -> Result<Session, WireError> {
        let started = Instant::now();
        let template = req.template_or_default();
        if let Err(err) = req.validate() {
            let result = Err(err);
            self.count_claim(&template, &caller, Launch::None, &result, started);
            return result;
        }
        let sid = req.session_id.clone().unwrap_or_else(new_session_id);
        // Clamped: a client's `wait_ms` (up to u64::MAX) must not overflow the deadline.
        let wait = req
            .wait_ms
            .map(Duration::from_millis)
            .unwrap_or(self.cfg.claim_wait)
            .min(MAX_CLAIM_WAIT);
        let deadline = started + wait;

        let guard = match self.begin_claim(&sid, &template, &caller) {
            Begin::Done(result) => {
                if result.is_err() {
                    self.count_claim(&template, &caller, Launch::None, &result, started);
                }
                return result;
            }
            Begin::Follow(mut rx) => {
                // The first claim is bounded by its own deadline, a few renames and one create.
                let limit = deadline + self.cfg.jobs.rename * 4 + self.cfg.jobs.restore;
                let outcome = tokio::time::timeout_at(limit, rx.wait_for(Option::is_some)).await;
                return match outcome {
                    Ok(Ok(r)) => r.clone().unwrap_or_else(|| Err(self.busy())),
                    _ => Err(self.busy()),
                };
            }
            Begin::Lead(guard) => guard,
        };
        let (launch, result) = self
            .clone()
            .run_claim(&sid, &template, &req, &caller, deadline, wait.is_zero())
            .await;
        guard.finish(&result);
        self.count_claim(&template, &caller, launch, &result, started);
        match &result {
            Ok(s) => {
                tracing::info!(session_id = %sid, template = %template, worker_id = %s.worker_id,
                warm = s.warm, elapsed_us = started.elapsed().as_micros() as u64, "session claimed")
            }
            Err(e) => {
                tracing::info!(session_id = %sid, template = %template, error = %e, "claim failed")
            }
        }
        result
    }

    fn busy(&self) -> WireError {
        WireError::no_capacity(
            "the same session is being claimed; retry",
            self.retry_after_ms(),
        )
    }

    fn count_claim(
        &self,
        template: &TemplateName,
        caller: &Caller,
        launch: Launch,
        result: &Result<Session, WireError>,
        started: Instant,
    ) {
        let tenant_result = match result {
            Ok(_) => "ok",
            Err(e) => match e.code {
                ErrorCode::Quota => "quota",
                ErrorCode::NotFound => "not_found",
                ErrorCode::NoCapacity => "no_capacity",
                _ => "error",
            },
        };
        metrics::counter!(m::TENANT_CLAIMS_TOTAL, "tenant" => self.tenant_label(caller.tenant()),
            "result" => tenant_result)
        .increment(1);
        // Unknown names come from clients (and another tenant's are unknown to this one): keep
        // them out of the label values.
        let known = Core::visible_template(&self.state.lock(), caller, template);
        let t = if known {
            template.to_string()
        } else {
            "_unknown".to_owned()
        };
        metrics::counter!(m::CLAIMS_TOTAL, "template" => t.clone(),
            "launch_type" => launch.as_str(), "result" => result_label(result))
        .increment(1);
        if result.is_ok() {
            metrics::histogram!(m::CLAIM_DURATION_SECONDS, "template" => t.clone(),
                "launch_type" => launch.as_str())
            .record(started.elapsed().as_secs_f64());
            let ratio = {
                let mut st = self.state.lock();
                let stats = st.claim_stats.entry(template.clone()).or_default();
                if matches!(launch, Launch::Warm) {
                    stats.0 += 1;
                }
                stats.1 += 1;
                stats.0 as f64 / stats.1 as f64
            };
            metrics::gauge!(m::WARM_HIT_RATIO, "template" => t).set(ratio);
        }
    }

    fn begin_claim(
        self: &Arc<Self>,
        sid: &SessionId,
        template: &TemplateName,
        caller: &Caller,
    ) -> Begin {
        let mut st = self.state.lock();
        if let Some(slot) = st.sessions.get(sid) {
            let session = slot.view();
            return Begin::Done(if !caller.owns(session.tenant.as_ref()) {
                // Another tenant's id: say no more than that it cannot be used.
                Err(taken(sid))
            } else if &session.template == template {
                Ok(session)
            } else {
                Err(conflict(sid, &session.template))
            });
        }
        if let Some(pending) = st.claims.get(sid) {
            return if pending.tenant.as_ref() != caller.tenant() {
                Begin::Done(Err(taken(sid)))
            } else if &pending.template == template {
                Begin::Follow(pending.done.clone())
            } else {
                Begin::Done(Err(conflict(sid, &pending.template)))
            };
        }
        if let Some(tenant) = caller.tenant()
            && let Err(err) = self.admit_claim(&mut st, tenant)
        {
            return Begin::Done(Err(err));
        }
        let (tx, rx) = watch::channel(None);
        st.claims.insert(
            sid.clone(),
            PendingClaim {
                template: template.clone(),
                tenant: caller.tenant().cloned(),
                done: rx,
            },
        );
        Begin::Lead(ClaimGuard {
            core: self.clone(),
            sid: sid.clone(),
            tx,
            finished: false,
        })
    }

    async fn run_claim(
        self: Arc<Self>,
        sid: &SessionId,
        template: &TemplateName,
        req: &CreateSessionRequest,
        caller: &Caller,
        deadline: Instant,
        fail_fast: bool,
    ) -> (Launch, Result<Session, WireError>) {
        let known = Core::visible_template(&self.state.lock(), caller, template);
        if !known {
            return (
                Launch::None,
                Err(WireError::not_found(format!("unknown template {template}"))),
            );
        }
        let vm_sid: VmId = sid.clone().into();
        // A worker where a VM with this id is still owned (an earlier attempt being settled)
        // would refuse the rename or create: skip it rather than burn a warm VM there.
        let mut exclude: Vec<WorkerId> = {
            let st = self.state.lock();
            st.inflight
                .keys()
                .filter(|(_, vm)| vm == &vm_sid)
                .map(|(w, _)| w.clone())
                .collect()
        };

        // Warm: pop ready VMs until one renames.
        // A worker that timed out or is unreachable is skipped for the rest of this claim, which
        // bounds the warm phase by the number of workers.
        while let Some(entry) = self.pop_ready(template, &vm_sid, &exclude) {
            if self.deposed.is_cancelled() {
                self.state
                    .lock()
                    .unmark(&entry.rec.worker_id, &entry.rec.vm_id);
                self.state.lock().unmark(&entry.rec.worker_id, &vm_sid);
                return (Launch::None, Err(self.not_leader()));
            }
            let worker = entry.rec.worker_id.clone();
            let mut rename = job(JobOp::RenameVm {
                vm_id: entry.rec.vm_id.clone(),
                new_vm_id: vm_sid.clone(),
                session: true,
            });
            rename.tenant = caller.tenant().cloned();
            // The rename first, then the record: a record is only ever written for a VM that
            // is renamed, so a leader taking over mid-claim (it loads the records) never finds a
            // session without its VM. (Running the two together saved ~0.06 ms a claim, and let a
            // deposed leader's record of a fenced rename be loaded by its successor: e2e_chaos.)
            let outcome = self.api.job(&worker, rename, self.cfg.jobs.rename).await;
            // The pool entry is gone either way.
            let store = self.store.clone();
            let pool_id = entry.rec.vm_id.clone();
            self.spawn(async move {
                let _ = store.delete_pool(&pool_id).await;
            });
            match outcome {
                Ok(JobOutput::Vm { vm }) => {
                    let result = self
                        .record_claim(
                            sid,
                            template,
                            req,
                            caller,
                            &worker,
                            true,
                            Some(&vm),
                            &[&entry.rec.vm_id],
                        )
                        .await;
                    return (Launch::Warm, result);
                }
                other => {
                    let err = match other {
                        Ok(out) => JobError::BadReply(format!("rename answered {out:?}")),
                        Err(e) => e,
                    };
                    tracing::warn!(session_id = %sid, vm_id = %entry.rec.vm_id, worker_id = %worker,
                        error = %err, "warm hand-off failed; trying the next pooled vm");
                    {
                        let mut st = self.state.lock();
                        st.unmark(&worker, &entry.rec.vm_id);
                        st.unmark(&worker, &vm_sid);
                    }
                    if matches!(err, JobError::Timeout | JobError::Unreachable) {
                        // The rename may yet happen there; keep this claim's id off that worker.
                        exclude.push(worker.clone());
                    } else if !err.is_gone() {
                        self.destroy_detached(worker.clone(), entry.rec.vm_id.clone(), None);
                    }
                }
            }
        }
        if fail_fast {
            return (
                Launch::None,
                Err(WireError::no_capacity(
                    format!("no warm vm of template {template} is ready"),
                    self.retry_after_ms(),
                )),
            );
        }

        // Cold: restore the template snapshot on the worker with the most free capacity.
        let snapshot = match self.wait_for_snapshot(template, deadline).await {
            Ok(s) => s,
            Err(e) => return (Launch::Cold, Err(e)),
        };
        let spec = match self.restore_spec(template, &snapshot) {
            Some(s) => s,
            None => {
                return (
                    Launch::Cold,
                    Err(WireError::not_found(format!("unknown template {template}"))),
                );
            }
        };
        loop {
            if self.deposed.is_cancelled() {
                return (Launch::Cold, Err(self.not_leader()));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return (
                    Launch::Cold,
                    Err(self.no_capacity(template, "wait_ms elapsed")),
                );
            }
            let Some(worker) = self.reserve_worker(Some(template), &exclude, &vm_sid) else {
                return (
                    Launch::Cold,
                    Err(self.no_capacity(template, "no worker has a free slot")),
                );
            };
            let t0 = Instant::now();
            let mut create = job(JobOp::CreateVmWithSpec {
                vm_id: vm_sid.clone(),
                spec: spec.clone(),
                session: true,
            });
            create.tenant = caller.tenant().cloned();
            let outcome = self
                .api
                .job(&worker, create, remaining.min(self.cfg.jobs.restore))
                .await;
            self.release_worker(&worker, outcome.is_ok().then_some(&vm_sid));
            match outcome {
                Ok(JobOutput::Vm { vm }) => {
                    metrics::histogram!(m::RESTORE_DURATION_SECONDS, "template" => template.to_string())
                        .record(t0.elapsed().as_secs_f64());
                    let result = self
                        .record_claim(sid, template, req, caller, &worker, false, Some(&vm), &[])
                        .await;
                    return (Launch::Cold, result);
                }
                other => {
                    self.state.lock().unmark(&worker, &vm_sid);
                    let err = match other {
                        Ok(out) => JobError::BadReply(format!("create answered {out:?}")),
                        Err(e) => e,
                    };
                    tracing::warn!(session_id = %sid, worker_id = %worker, error = %err, "cold restore failed");
                    self.note_restore_failure(template, &worker, &err);
                    exclude.push(worker.clone());
                    match &err {
                        JobError::Timeout => {
                            return (
                                Launch::Cold,
                                Err(self.no_capacity(
                                    template,
                                    "the cold restore did not finish within wait_ms",
                                )),
                            );
                        }
                        JobError::Failed(e) if e.code == ErrorCode::Conflict => {
                            // A VM with this id is there already (an earlier attempt that timed
                            // out): nobody owns it yet; destroy it and place elsewhere.
                            self.destroy_detached(worker, vm_sid.clone(), None);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn not_leader(&self) -> WireError {
        WireError::no_capacity(
            "this scheduler is no longer the leader; retry",
            self.retry_after_ms(),
        )
    }

    fn no_capacity(&self, template: &TemplateName, why: &str) -> WireError {
        WireError::no_capacity(
            format!("no capacity for template {template}: {why}"),
            self.retry_after_ms(),
        )
    }

    /// Pops the oldest ready VM of `template` on a usable worker, marking both its ids owned.
    fn pop_ready(
        &self,
        template: &TemplateName,
        new_id: &VmId,
        exclude: &[WorkerId],
    ) -> Option<PoolVm> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let current = st.templates.get(template)?.snapshot()?;
        let workers = &st.workers;
        let pool = st.pools.get_mut(template)?;
        let index = pool.ready.position(|e| {
            &e.rec.snapshot_id == current
                && !exclude.contains(&e.rec.worker_id)
                && workers.get(&e.rec.worker_id).is_some_and(|w| w.usable())
        })?;
        let entry = pool.ready.remove(index)?;
        let st = &mut *guard;
        let min_ready = st
            .templates
            .get(template)
            .map_or(0, |t| t.rec.template.min_ready) as usize;
        let pool = st.pools.get_mut(template)?;
        if pool.ready.len() < min_ready && pool.below_target_since.is_none() {
            pool.below_target_since = Some(Instant::now());
        }
        st.mark(&entry.rec.worker_id, &entry.rec.vm_id);
        st.mark(&entry.rec.worker_id, new_id);
        Core::pool_gauges(st, template);
        Some(entry)
    }

    /// Waits (until `deadline`) for the template's snapshot to exist.
    async fn wait_for_snapshot(
        &self,
        template: &TemplateName,
        deadline: Instant,
    ) -> Result<SnapshotId, WireError> {
        let mut rx = self.templates_changed.subscribe();
        loop {
            {
                let st = self.state.lock();
                match st.templates.get(template) {
                    None => {
                        return Err(WireError::not_found(format!("unknown template {template}")));
                    }
                    Some(t) => {
                        if let Some(s) = t.snapshot() {
                            return Ok(s.clone());
                        }
                    }
                }
            }
            self.pool_wake.notify_one();
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(self.no_capacity(template, "its snapshot is still being built"));
            }
        }
    }

    /// The spec that restores `snapshot` as a VM of `template`.
    pub(crate) fn restore_spec(
        &self,
        template: &TemplateName,
        snapshot: &SnapshotId,
    ) -> Option<VmSpec> {
        let st = self.state.lock();
        let t = st.templates.get(template)?;
        Some(VmSpec {
            template: Some(template.clone()),
            vcpus: Some(t.rec.template.vcpus).filter(|v| *v > 0),
            memory_mib: Some(t.rec.template.memory_mib).filter(|v| *v > 0),
            disk_mib: Some(t.rec.template.disk_mib).filter(|v| *v > 0),
            max_processes: Some(t.rec.template.max_processes).filter(|v| *v > 0),
            network: t.rec.template.network.clone(),
            env: t.rec.env.clone(),
            base: None,
            bootstrap: None,
            restore_from: Some(snapshot.clone()),
            nix_profile: None,
        })
    }

    /// Picks the best worker for a claim's VM and reserves a slot on it (and marks `vm` owned
    /// there).
    pub(crate) fn reserve_worker(
        &self,
        template: Option<&TemplateName>,
        exclude: &[WorkerId],
        vm: &VmId,
    ) -> Option<WorkerId> {
        let mut st = self.state.lock();
        let now = Instant::now();
        // A worker that refused a moment ago is only a last resort (its 503 is cheap).
        let worker = pick_worker(&st, template, exclude, now)
            .or_else(|| pick_worker(&st, template, exclude, now + self.cfg.retry_after * 2))?;
        if let Some(w) = st.workers.get_mut(&worker) {
            w.pending += 1;
        }
        st.mark(&worker, vm);
        Some(worker)
    }

    /// Ends a reservation made by [`Core::reserve_worker`] (the `vm` mark is the caller's);
    /// `created` is the VM it made, if it did (its slot counts until a heartbeat does).
    pub(crate) fn release_worker(&self, worker: &WorkerId, created: Option<&VmId>) {
        let mut st = self.state.lock();
        if let Some(w) = st.workers.get_mut(worker) {
            w.pending = w.pending.saturating_sub(1);
            if let Some(vm) = created {
                w.created.insert(vm.clone(), 0);
            }
        }
    }

    /// Book-keeping for a failed restore: capacity refusals steer placement, real failures count
    /// towards a rebuild of the template snapshot.
    pub(crate) fn note_restore_failure(
        &self,
        template: &TemplateName,
        worker: &WorkerId,
        err: &JobError,
    ) {
        let reason = match err {
            JobError::Failed(e) if e.code == ErrorCode::NoCapacity => "no_capacity",
            JobError::Unreachable => "unreachable",
            JobError::Timeout => "timeout",
            _ => "error",
        };
        metrics::counter!(m::RESTORE_FAILURES_TOTAL, "template" => template.to_string(), "reason" => reason)
            .increment(1);
        let mut st = self.state.lock();
        if reason == "no_capacity" {
            let until = Instant::now() + self.cfg.retry_after;
            if let Some(w) = st.workers.get_mut(worker) {
                w.refused_until = Some(until);
            }
            return;
        }
        if reason != "error" {
            return;
        }
        let threshold = self.cfg.restore_failures_before_rebuild.max(1);
        let failures = {
            let pool = st.pools.entry(template.clone()).or_default();
            pool.failures += 1;
            let backoff = Duration::from_millis(250)
                .saturating_mul(1 << pool.failures.min(7))
                .min(Duration::from_secs(30));
            pool.backoff_until = Some(Instant::now() + backoff);
            pool.failures
        };
        if failures >= threshold
            && let Some(t) = st.templates.get_mut(template)
            && t.config.is_some()
            && !t.needs_rebuild
        {
            tracing::warn!(template = %template, failures, "restores keep failing; rebuilding the template snapshot");
            t.needs_rebuild = true;
        }
    }

    /// The record of a session claimed onto `worker` (written by [`Core::write_record`]).
    fn session_record(
        &self,
        sid: &SessionId,
        template: &TemplateName,
        req: &CreateSessionRequest,
        caller: &Caller,
        worker: &WorkerId,
        warm: bool,
    ) -> SessionRecord {
        let now = self.clock.now_ms();
        let s = &self.cfg.sessions;
        let max_ttl = s.max_ttl.as_secs().max(1);
        let ttl_s = req
            .ttl_s
            .unwrap_or(s.default_ttl.as_secs())
            .clamp(1, max_ttl);
        // An idle timeout longer than the longest lifetime never fires: clamp it there.
        let idle_timeout_s = req
            .idle_timeout_s
            .or(s.default_idle_timeout.map(|d| d.as_secs().max(1)))
            .map(|t| t.clamp(1, max_ttl));
        let isolation = self
            .state
            .lock()
            .workers
            .get(worker)
            .and_then(|w| w.status.as_ref())
            .map(|s| s.isolation.clone());
        SessionRecord {
            session: Session {
                session_id: sid.clone(),
                template: template.clone(),
                state: SessionState::Running,
                worker_id: worker.clone(),
                warm,
                created_ms: now,
                expires_ms: expiry_ms(now, ttl_s),
                last_used_ms: now,
                labels: req.labels.clone(),
                isolation,
                tenant: caller.tenant().cloned(),
                paused_ms: None,
                resumed_ms: None,
                pause_uploaded: false,
                pause_upload_bytes: 0,
                unplaced: false,
                detail: None,
            },
            ttl_s,
            idle_timeout_s,
            stopped_ms: None,
            ttl_paused_ms: None,
            stop_activity_ms: None,
            reason: None,
            ended_ms: None,
            backed_up: false,
            pause_object: false,
        }
    }

    /// Writes a claim's record (create-if-absent). A deposed leader records nothing: the renamed
    /// VM is left to the new leader's reconcile (no record names it), the client gets 503 and
    /// retries against the new leader.
    async fn write_record(&self, rec: &SessionRecord) -> Result<u64, StoreError> {
        self.check_leader()?;
        self.store.create_session(rec).await
    }

    /// Records the claimed session durably, then makes it visible. On failure the VM is destroyed:
    /// nothing stays claimed but unrecorded.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record_claim(
        self: &Arc<Self>,
        sid: &SessionId,
        template: &TemplateName,
        req: &CreateSessionRequest,
        caller: &Caller,
        worker: &WorkerId,
        warm: bool,
        vm: Option<&VmInfo>,
        also_unmark: &[&VmId],
    ) -> Result<Session, WireError> {
        let rec = self.session_record(sid, template, req, caller, worker, warm);
        let written = self.write_record(&rec).await;
        self.commit_claim(rec, written, worker, vm, also_unmark)
            .await
    }

    /// Makes a claim whose record write ended with `written` visible, or undoes it: on a failed
    /// write the record is read back, and the VM destroyed unless the record names it.
    async fn commit_claim(
        self: &Arc<Self>,
        rec: SessionRecord,
        written: Result<u64, StoreError>,
        worker: &WorkerId,
        vm: Option<&VmInfo>,
        also_unmark: &[&VmId],
    ) -> Result<Session, WireError> {
        let sid = &rec.session.session_id.clone();
        let template = &rec.session.template.clone();
        let vm_sid: VmId = sid.clone().into();
        let err = {
            let mut st = self.state.lock();
            for id in also_unmark {
                st.unmark(worker, id);
            }
            match written {
                Ok(rev) => {
                    let session = rec.session.clone();
                    let data = SessionData::new(rec, rev, vm.map(|v| v.last_activity_ms));
                    let slot = SessionSlot::new(data);
                    Core::track_tenant_session(&mut st, &slot);
                    st.sessions.insert(sid.clone(), slot);
                    st.unmark(worker, &vm_sid);
                    drop(st);
                    self.publish(&session, None);
                    return Ok(session);
                }
                Err(err) => err,
            }
        };
        if self.deposed.is_cancelled() {
            // A deposed leader records and undoes nothing: no record names the renamed VM unless
            // the write landed, and the new leader's reconcile sorts out either case.
            self.state.lock().unmark(worker, &vm_sid);
            tracing::warn!(session_id = %sid, error = %err, "deposed while recording the claim");
            return Err(self.not_leader());
        }
        tracing::warn!(session_id = %sid, worker_id = %worker, error = %err,
            "recording the session failed; reading it back");
        // The VM stays marked owned (never reconciled as a leak) until the outcome is known.
        let activity = vm.map(|v| v.last_activity_ms);
        let bound = self.cfg.jobs.rename.max(Duration::from_secs(1));
        match self.read_back(sid, worker, Instant::now() + bound).await {
            Recorded::Unknown(read_err) => {
                // Neither the write nor its absence can be confirmed: keep the VM and settle it
                // in the background once the store answers. A retry meanwhile stays off this
                // worker (its VM id is owned) and, once settled, finds the session in memory.
                tracing::warn!(session_id = %sid, worker_id = %worker, error = %read_err,
                    "the claim's record cannot be read back yet; settling it in the background");
                let core = self.clone();
                let (sid, worker) = (sid.clone(), worker.clone());
                self.spawn(async move {
                    let recorded = core
                        .read_back(&sid, &worker, Instant::now() + Duration::from_secs(86_400))
                        .await;
                    let _ = core.settle_claim(&sid, &worker, activity, recorded).await;
                });
                Err(store_error(err))
            }
            recorded => {
                let reply = self
                    .settle_claim(sid, &worker.clone(), activity, recorded)
                    .await;
                match reply {
                    Some(session) if &session.template == template => Ok(session),
                    Some(session) => Err(conflict(sid, &session.template)),
                    None => Err(store_error(err)),
                }
            }
        }
    }

    /// Reads a claim's session record back after a failed or unacknowledged write, retrying
    /// reads (with backoff) until `limit`.
    async fn read_back(&self, sid: &SessionId, worker: &WorkerId, limit: Instant) -> Recorded {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.deposed.is_cancelled() {
                return Recorded::Unknown(StoreError::Unavailable(
                    "this scheduler is no longer the leader".into(),
                ));
            }
            match self.store.get_session(sid).await {
                Ok(Some((rec, rev))) => {
                    // One VM per id per worker: a live record naming this worker names this
                    // claim's VM, whichever write put it there.
                    return if &rec.session.worker_id == worker && !rec.session.state.is_terminal() {
                        Recorded::Ours(rec, rev)
                    } else {
                        Recorded::Other(rec, rev)
                    };
                }
                Ok(None) => return Recorded::Absent,
                Err(e) => {
                    if Instant::now() + backoff >= limit {
                        return Recorded::Unknown(e);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Applies what [`Core::read_back`] found for a claim whose renamed VM `sid` sits on `worker`
    /// (marked owned by the caller; unmarked here): the recorded session is adopted, and the VM
    /// is destroyed unless the record names it. The session to answer with, if any.
    async fn settle_claim(
        self: &Arc<Self>,
        sid: &SessionId,
        worker: &WorkerId,
        activity: Option<u64>,
        recorded: Recorded,
    ) -> Option<Session> {
        let vm_sid: VmId = sid.clone().into();
        let (keep, adopt) = match recorded {
            Recorded::Ours(rec, rev) => (true, Some((rec, rev))),
            Recorded::Other(rec, rev) => (false, Some((rec, rev))),
            Recorded::Absent => (false, None),
            Recorded::Unknown(_) => {
                // Deposed or shut down before the store answered: the new leader's reconcile
                // decides (a record naming the VM keeps it).
                self.state.lock().unmark(worker, &vm_sid);
                return None;
            }
        };
        let mut reply = None;
        if let Some((rec, rev)) = adopt {
            let session = rec.session.clone();
            let mut st = self.state.lock();
            let fresh = !st.sessions.contains_key(sid);
            if fresh {
                if !rec.session.state.is_terminal() {
                    let now = Instant::now();
                    st.workers
                        .entry(rec.session.worker_id.clone())
                        .or_insert_with(|| super::state::WorkerEntry::unconfirmed(now));
                }
                let data = SessionData::new(rec, rev, if keep { activity } else { None });
                let slot = SessionSlot::new(data);
                Core::track_tenant_session(&mut st, &slot);
                st.sessions.insert(sid.clone(), slot);
            }
            let view = st.sessions.get(sid).map(|s| s.view());
            drop(st);
            if fresh && keep {
                self.publish(&session, None);
            }
            reply = view;
        }
        if keep {
            tracing::info!(session_id = %sid, worker_id = %worker, "the claim's record was there after all");
        } else {
            tracing::warn!(session_id = %sid, worker_id = %worker,
                recorded = reply.is_some(), "destroying the claim's unrecorded vm");
            // Undone before answering: a retry with the same session id must not meet a destroy
            // still in flight for its own VM on this worker.
            let op = JobOp::DestroyVm {
                vm_id: vm_sid.clone(),
                backup: false,
                reason: None,
            };
            if let Err(e) = self.api.job(worker, job(op), self.cfg.jobs.lifecycle).await
                && !e.is_gone()
            {
                tracing::warn!(session_id = %sid, worker_id = %worker, error = %e,
                    "undoing the unrecorded claim failed; reconcile will destroy the vm");
            }
        }
        self.state.lock().unmark(worker, &vm_sid);
        reply
    }

    /// Destroys a VM in the background (best effort; reconcile repairs what this misses).
    pub(crate) fn destroy_detached(
        self: &Arc<Self>,
        worker: WorkerId,
        vm: VmId,
        reason: Option<hearth_messages::TerminationReason>,
    ) {
        {
            let mut st = self.state.lock();
            if !st.destroying.insert((worker.clone(), vm.clone())) {
                return;
            }
        }
        let core = self.clone();
        self.spawn(async move {
            let op = JobOp::DestroyVm {
                vm_id: vm.clone(),
                backup: false,
                reason,
            };
            match core
                .api
                .job(&worker, job(op), core.cfg.jobs.lifecycle)
                .await
            {
                Ok(_) => {
                    core.credit_destroyed(&worker, &vm);
                    tracing::debug!(vm_id = %vm, worker_id = %worker, "vm destroyed")
                }
                Err(e) if e.is_gone() => {}
                Err(e) => {
                    tracing::warn!(vm_id = %vm, worker_id = %worker, error = %e, "destroy failed")
                }
            }
            core.state.lock().destroying.remove(&(worker, vm));
        });
    }
}

/// A session id that belongs to another tenant: unusable, and nothing more is said.
fn taken(sid: &SessionId) -> WireError {
    WireError::conflict(format!(
        "session id {sid} is taken; choose another (ids are idempotency keys)"
    ))
}

fn conflict(sid: &SessionId, existing: &TemplateName) -> WireError {
    WireError::conflict(format!(
        "session {sid} already exists with template {existing}"
    ))
}

/// Placement: the healthy (not suspect), non-draining worker with the most free slots (counting creates in flight),
/// then the fewest pooled VMs of the template (spread), then the fewest jobs in flight.
pub(crate) fn pick_worker(
    st: &State,
    template: Option<&TemplateName>,
    exclude: &[WorkerId],
    now: Instant,
) -> Option<WorkerId> {
    st.workers
        .iter()
        .filter(|(id, w)| {
            w.usable() && !exclude.contains(id) && w.refused_until.is_none_or(|t| t <= now)
        })
        .filter_map(|(id, w)| {
            let free = w.free();
            (free > 0).then(|| {
                let spread = template.map_or(0, |t| st.pool_vms_on(t, id));
                let jobs = w.status.as_ref().map_or(0, |s| s.jobs_in_flight) + w.pending;
                (id, free, spread, jobs)
            })
        })
        .min_by(|a, b| {
            b.1.cmp(&a.1)
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
                .then(a.0.cmp(b.0))
        })
        .map(|(id, ..)| id.clone())
}
