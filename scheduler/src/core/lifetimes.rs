//! Session lifetimes: TTL (running time only), idle stop or pause, resume, prune (with optional
//! backup), keepalive, release, pause, and forgetting ended sessions after the retention.
//!
//! A template's `idle_action` says whether the idle timeout stops a session (memory kept by the
//! VMM) or pauses it (to the worker's disk; the default on workers whose provider pauses to disk),
//! its `ttl_action` whether the TTL releases it or pauses it, and `paused_retention_s` how long a
//! paused session stays resumable before it is pruned like a stopped one.

use std::sync::Arc;
use std::time::Duration;

use hearth_messages::{
    JobOp, JobOutput, KeepaliveRequest, Session, SessionId, SessionState, TerminationReason,
    WireError,
};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::state::SessionSlot;
use super::{Core, store_error, unknown_session};
use crate::config::{IdleAction, TtlAction};
use crate::metrics as m;
use crate::store::{SessionRecord, StoreError};
use crate::worker_api::job;

/// How long a destroy without backup may take before the session is ended anyway.
const BEST_EFFORT_DESTROY: Duration = Duration::from_secs(5);

/// How a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client released it: destroy now.
    Release,
    /// Its TTL ran out: destroy.
    Ttl,
    /// Stopped longer than `prune_after`: destroy (with backup if configured).
    Prune,
    /// Its worker is lost: nothing to destroy.
    WorkerLost,
    /// Its VM is gone (vanished, failed, evicted by the worker).
    VmGone(TerminationReason),
}

/// A lifetime action the periodic pass or a heartbeat decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    End(End),
    /// Idle: stop the VM.
    Stop,
    /// Idle (`idle_action = "pause"`) or past its TTL (`ttl_action = "pause"`): pause the VM to
    /// disk. A worker that cannot pause (400) gets the stop, or the TTL's release, instead.
    Pause {
        ttl: bool,
    },
    /// The worker reports the VM paused (not by us): record it.
    MarkPaused {
        activity_ms: u64,
    },
    /// The worker reports the VM stopped (not by us): record it.
    MarkStopped {
        activity_ms: u64,
    },
    /// The worker reports the stopped or paused VM running again (an exec resumed it).
    Resume,
    /// Stopped for `backup_after_s` and not backed up yet: back the volume up (the VM stays).
    Backup,
    /// Ended long enough ago: delete the record.
    Forget,
}

impl Core {
    pub(crate) async fn lifecycle_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.lifecycle_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.lifecycle_pass();
            self.session_gauges();
        }
    }

    /// `admin.maintenance`: the lifecycle pass now (operator only).
    pub(crate) fn run_maintenance(
        self: &Arc<Self>,
        caller: &hearth_messages::Caller,
    ) -> Result<hearth_messages::MaintenanceReport, WireError> {
        if !caller.is_operator() {
            return Err(WireError::not_found("no such endpoint"));
        }
        self.check_leader().map_err(super::store_error)?;
        let report = self.lifecycle_pass();
        self.session_gauges();
        tracing::info!(
            sessions = report.sessions,
            actions = report.actions,
            "lifecycle pass run on request"
        );
        Ok(report)
    }

    /// Decides the due lifetime action of every session and runs them in the background.
    pub(crate) fn lifecycle_pass(self: &Arc<Self>) -> hearth_messages::MaintenanceReport {
        let mut report = hearth_messages::MaintenanceReport::default();
        let now_ms = self.clock.now_ms();
        let now = Instant::now();
        let s = &self.cfg.sessions;
        let (slots, lost_workers, policies) = {
            let st = self.state.lock();
            let slots: Vec<Arc<SessionSlot>> = st.sessions.values().cloned().collect();
            let lost: std::collections::HashSet<_> = st
                .workers
                .iter()
                .filter(|(_, w)| !w.live)
                .map(|(id, _)| id.clone())
                .collect();
            (slots, lost, Policies::of(&st))
        };
        report.sessions = slots.len() as u32;
        for slot in slots {
            let action = {
                let d = slot.data.lock();
                if d.retry_at.is_some_and(|t| t > now) {
                    continue;
                }
                let r = &d.rec;
                if d.is_live() && !r.session.unplaced && lost_workers.contains(&r.session.worker_id)
                {
                    // Level-triggered: a session on a lost worker is lost, even if ending it
                    // failed when the worker was first declared lost.
                    drop(d);
                    self.act(slot, Action::End(End::WorkerLost));
                    report.actions += 1;
                    continue;
                }
                let policy = policies.of_session(&r.session);
                match r.session.state {
                    SessionState::Running => {
                        let idle_for = now_ms.saturating_sub(d.idle_since_ms());
                        if now_ms >= r.session.expires_ms {
                            Some(match policy.ttl_action {
                                TtlAction::Pause => Action::Pause { ttl: true },
                                TtlAction::Release => Action::End(End::Ttl),
                            })
                        } else if !d.busy
                            && r.idle_timeout_s
                                .is_some_and(|t| idle_for >= t.saturating_mul(1000))
                        {
                            Some(match policy.idle_action {
                                IdleAction::Pause => Action::Pause { ttl: false },
                                IdleAction::Stop => Action::Stop,
                            })
                        } else {
                            None
                        }
                    }
                    SessionState::Paused => {
                        let paused_for = now_ms.saturating_sub(r.stopped_ms.unwrap_or(now_ms));
                        let retention = policy
                            .paused_retention_s
                            .map_or(s.prune_after.as_millis() as u64, |t| t.saturating_mul(1000));
                        if paused_for >= retention {
                            Some(Action::End(End::Prune))
                        } else if !r.backed_up
                            && s.backup_after
                                .is_some_and(|after| paused_for >= after.as_millis() as u64)
                        {
                            Some(Action::Backup)
                        } else {
                            None
                        }
                    }
                    SessionState::Stopped => {
                        let stopped_for = now_ms.saturating_sub(r.stopped_ms.unwrap_or(now_ms));
                        if stopped_for >= s.prune_after.as_millis() as u64 {
                            Some(Action::End(End::Prune))
                        } else if !r.backed_up
                            && s.backup_after
                                .is_some_and(|after| stopped_for >= after.as_millis() as u64)
                        {
                            Some(Action::Backup)
                        } else {
                            None
                        }
                    }
                    SessionState::Released | SessionState::Lost => {
                        let since = r.ended_ms.unwrap_or(now_ms);
                        (now_ms.saturating_sub(since) >= s.retention.as_millis() as u64)
                            .then_some(Action::Forget)
                    }
                }
            };
            if let Some(action) = action {
                self.act(slot, action);
                report.actions += 1;
            }
        }
        report
    }

    /// Runs `action` on `slot` in the background, unless another operation holds the session.
    pub(crate) fn act(self: &Arc<Self>, slot: Arc<SessionSlot>, action: Action) {
        let Ok(guard) = slot.op.clone().try_lock_owned() else {
            return;
        };
        let core = self.clone();
        self.spawn(async move {
            let sid = slot.data.lock().rec.session.session_id.clone();
            let result = match action {
                Action::End(end) => core.end_locked(&slot, &guard, end).await.map(|_| ()),
                Action::Stop => core.stop_locked(&slot, &guard).await,
                Action::Pause { ttl } => core.idle_pause_locked(&slot, &guard, ttl).await,
                Action::MarkPaused { activity_ms } => core
                    .mark_paused_locked(&slot, &guard, activity_ms)
                    .await
                    .map_err(store_error),
                Action::MarkStopped { activity_ms } => core
                    .mark_stopped_locked(&slot, &guard, activity_ms)
                    .await
                    .map_err(store_error),
                Action::Resume => core.resume_locked(&slot, &guard).await.map_err(store_error),
                Action::Backup => core.backup_locked(&slot, &guard).await,
                Action::Forget => core.forget_locked(&slot, &guard).await.map_err(store_error),
            };
            if let Err(err) = result {
                tracing::warn!(session_id = %sid, ?action, error = %err, "lifetime action failed; will retry");
                slot.data.lock().retry_at = Some(Instant::now() + Duration::from_secs(10));
            }
            drop(guard);
        });
    }

    /// Writes the session with `change` applied (compare-and-set on its revision). The caller
    /// holds the session's op lock.
    pub(crate) async fn persist(
        &self,
        slot: &SessionSlot,
        change: impl FnOnce(&mut SessionRecord),
    ) -> Result<Session, StoreError> {
        let (mut rec, rev) = {
            let d = slot.data.lock();
            let mut rec = d.rec.clone();
            rec.session.last_used_ms = rec.session.last_used_ms.max(d.last_used_ms);
            (rec, d.rev)
        };
        change(&mut rec);
        self.check_leader()?;
        let new_rev = self.store.update_session(&rec, rev).await?;
        let mut d = slot.data.lock();
        d.rec = rec;
        d.rev = new_rev;
        d.retry_at = None;
        Ok(d.view())
    }

    /// Ends a session (idempotent: an ended session is returned as it is).
    pub(crate) async fn end_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
        end: End,
    ) -> Result<Session, WireError> {
        let session = slot.view();
        if session.state.is_terminal() {
            return Ok(session);
        }
        match end {
            // An unplaced session lives in the object store, not on a worker: its old worker's
            // fate is not its own.
            End::WorkerLost | End::VmGone(_) if session.unplaced => return Ok(session),
            End::WorkerLost => {
                if let Some(kept) = self.worker_lost_locked(slot).await? {
                    return Ok(kept);
                }
            }
            _ => {}
        }
        let (state, reason, destroy, backup) = match end {
            End::Release => (
                SessionState::Released,
                TerminationReason::Released,
                true,
                false,
            ),
            End::Ttl => (SessionState::Released, TerminationReason::Ttl, true, false),
            End::Prune => (
                SessionState::Released,
                TerminationReason::Idle,
                true,
                self.cfg.sessions.backup_on_prune,
            ),
            End::WorkerLost => (
                SessionState::Lost,
                TerminationReason::WorkerLost,
                false,
                false,
            ),
            End::VmGone(reason) => {
                let state = match reason {
                    TerminationReason::Released
                    | TerminationReason::Ttl
                    | TerminationReason::Idle
                    | TerminationReason::Evicted => SessionState::Released,
                    _ => SessionState::Lost,
                };
                (state, reason, false, false)
            }
        };
        if destroy {
            let live = self.state.lock().worker_live(&session.worker_id);
            if live {
                let op = JobOp::DestroyVm {
                    vm_id: session.session_id.clone().into(),
                    backup,
                    reason: Some(reason),
                };
                // Without a backup the destroy is best effort (reconcile removes a VM no session
                // owns), so a wedged worker does not hold a release for long.
                let timeout = if backup {
                    self.cfg.jobs.lifecycle
                } else {
                    self.cfg.jobs.lifecycle.min(BEST_EFFORT_DESTROY)
                };
                match self.api.job(&session.worker_id, job(op), timeout).await {
                    Ok(_) => self
                        .credit_destroyed(&session.worker_id, &session.session_id.clone().into()),
                    Err(e) if e.is_gone() => {}
                    Err(e) if backup => {
                        // Keep the session (and its volume) until the backup can be taken.
                        return Err(WireError::internal(format!("destroy with backup: {e}")));
                    }
                    Err(e) => {
                        // Reconcile destroys the VM once the session no longer owns it.
                        tracing::warn!(session_id = %session.session_id, error = %e,
                            "destroying the session's vm failed; reconcile will retry");
                    }
                }
            } else if backup {
                tracing::warn!(session_id = %session.session_id, "worker not live: pruned without backup");
            }
        }
        let now = self.clock.now_ms();
        let session = self
            .persist(slot, |r| {
                r.session.state = state;
                r.reason = Some(reason);
                r.ended_ms = Some(now);
            })
            .await
            .map_err(store_error)?;
        metrics::counter!(m::SESSION_TERMINATIONS_TOTAL, "reason" => reason.as_str()).increment(1);
        tracing::info!(session_id = %session.session_id, state = ?state, reason = reason.as_str(), "session ended");
        self.publish(&session, Some(reason));
        if self.delete_pause_object(slot).await {
            return Ok(slot.view());
        }
        Ok(session)
    }

    async fn stop_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if session.state != SessionState::Running || slot.data.lock().busy {
            return Ok(());
        }
        if !self.state.lock().worker_live(&session.worker_id) {
            return Ok(());
        }
        let op = JobOp::StopVm {
            vm_id: session.session_id.clone().into(),
        };
        let activity = match self
            .api
            .job(&session.worker_id, job(op), self.cfg.jobs.lifecycle)
            .await
        {
            Ok(JobOutput::Vm { vm }) => vm.last_activity_ms,
            Ok(other) => return Err(WireError::internal(format!("stop answered {other:?}"))),
            Err(e) => return Err(WireError::internal(format!("stop: {e}"))),
        };
        tracing::info!(session_id = %session.session_id, "idle session stopped");
        self.mark_stopped_locked(slot, _guard, activity)
            .await
            .map_err(store_error)
    }

    /// The `backup_after_s` backup: one `BackupVm` per session (a refusal, e.g. a worker without
    /// a backup destination, counts as the one: it would be refused again); the VM keeps its
    /// state. A worker that did not answer is tried again on a later pass.
    async fn backup_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if !matches!(session.state, SessionState::Stopped | SessionState::Paused)
            || slot.data.lock().rec.backed_up
        {
            return Ok(());
        }
        if !self.state.lock().worker_live(&session.worker_id) {
            return Ok(());
        }
        let op = JobOp::BackupVm {
            vm_id: session.session_id.clone().into(),
        };
        match self
            .api
            .job(&session.worker_id, job(op), self.cfg.jobs.lifecycle)
            .await
        {
            Ok(_) => {
                tracing::info!(session_id = %session.session_id, "stopped session backed up")
            }
            Err(crate::worker_api::JobError::Failed(err)) => {
                tracing::warn!(session_id = %session.session_id, %err, "backup_after_s backup refused")
            }
            Err(e) => return Err(WireError::internal(format!("backup: {e}"))),
        }
        self.persist(slot, |r| r.backed_up = true)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn mark_stopped_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
        activity_ms: u64,
    ) -> Result<(), StoreError> {
        if slot.view().state != SessionState::Running {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let session = self
            .persist(slot, |r| {
                r.session.state = SessionState::Stopped;
                r.stopped_ms = Some(now);
                r.ttl_paused_ms = Some(now);
                r.stop_activity_ms = Some(activity_ms);
            })
            .await?;
        slot.data.lock().observed_activity = Some(activity_ms);
        self.publish(&session, None);
        Ok(())
    }

    pub(crate) async fn resume_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
    ) -> Result<(), StoreError> {
        let was = slot.view().state;
        if !matches!(was, SessionState::Stopped | SessionState::Paused) {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let session = self
            .persist(slot, |r| {
                let since = r.ttl_paused_ms.unwrap_or(now);
                if r.session.expires_ms <= since {
                    // Paused at the end of its TTL (`ttl_action = "pause"`): resumed, it gets
                    // a whole TTL again.
                    r.session.expires_ms = super::claim::expiry_ms(now, r.ttl_s);
                } else {
                    // Stopped or paused time does not count against the TTL.
                    let paused = now.saturating_sub(since);
                    r.session.expires_ms = r.session.expires_ms.saturating_add(paused);
                }
                if was == SessionState::Paused {
                    r.session.paused_ms = None;
                    r.session.resumed_ms = Some(now);
                    r.session.pause_uploaded = false;
                    r.session.pause_upload_bytes = 0;
                }
                r.session.state = SessionState::Running;
                r.session.last_used_ms = now;
                r.stopped_ms = None;
                r.ttl_paused_ms = None;
                r.stop_activity_ms = None;
            })
            .await?;
        {
            let mut d = slot.data.lock();
            d.last_used_ms = now;
            d.idle_base_ms = now;
            d.observed_activity = None;
        }
        tracing::info!(session_id = %session.session_id, from = state_name(was), "session resumed");
        self.publish(&session, None);
        // Running again: an uploaded paused state is stale.
        self.delete_pause_object(slot).await;
        Ok(())
    }

    /// `sessions.<sid>.pause`.
    /// `upload`: the request's, else the template's `pause_upload`.
    pub(crate) async fn pause(
        self: &Arc<Self>,
        sid: &SessionId,
        upload: Option<bool>,
    ) -> Result<Session, WireError> {
        let slot = self.slot(sid).ok_or_else(|| unknown_session(sid))?;
        let guard = slot.op.clone().lock_owned().await;
        let current = slot.view();
        if upload == Some(true) && !current.unplaced && !self.pauses_to_disk(&current.worker_id) {
            return Err(self.upload_unsupported(&current));
        }
        let upload = upload.unwrap_or_else(|| self.template_pause_upload(&current.template));
        match current.state {
            SessionState::Paused => {
                // Paused already: an upload asked for now still happens.
                if upload {
                    self.upload_pause_locked(&slot, &guard).await?;
                }
                return Ok(slot.view());
            }
            SessionState::Running | SessionState::Stopped => {}
            state => {
                return Err(WireError::conflict(format!(
                    "session {sid} has ended ({})",
                    state_name(state)
                )));
            }
        }
        self.pause_locked(&slot, &guard, upload).await?;
        Ok(slot.view())
    }

    /// Sends the pause job and records the outcome. The worker answers 409 while a command or
    /// file transfer holds the VM.
    async fn pause_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        guard: &OwnedMutexGuard<()>,
        upload: bool,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if !self.state.lock().worker_live(&session.worker_id) {
            return Err(WireError::no_capacity(
                format!("the worker of session {} is not live", session.session_id),
                1000,
            ));
        }
        let op = JobOp::PauseVm {
            vm_id: session.session_id.clone().into(),
        };
        let activity = match self
            .api
            .job(&session.worker_id, job(op), self.cfg.jobs.lifecycle)
            .await
        {
            Ok(JobOutput::Vm { vm }) => vm.last_activity_ms,
            Ok(other) => return Err(WireError::internal(format!("pause answered {other:?}"))),
            Err(crate::worker_api::JobError::Failed(err)) => return Err(err),
            Err(e) => return Err(WireError::internal(format!("pause: {e}"))),
        };
        tracing::info!(session_id = %session.session_id, "session paused");
        self.mark_paused_locked(slot, guard, activity)
            .await
            .map_err(store_error)?;
        if upload {
            self.upload_pause_locked(slot, guard).await?;
        }
        Ok(())
    }

    /// The idle timeout's or the TTL's pause; a worker whose provider cannot pause (400) gets the
    /// idle stop, or the TTL's release, instead.
    async fn idle_pause_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        guard: &OwnedMutexGuard<()>,
        ttl: bool,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if session.state != SessionState::Running || (!ttl && slot.data.lock().busy) {
            return Ok(());
        }
        if !self.state.lock().worker_live(&session.worker_id) {
            return Ok(());
        }
        let upload = self.template_pause_upload(&session.template);
        match self.pause_locked(slot, guard, upload).await {
            Err(err) if err.code.as_u16() == 400 => {
                tracing::warn!(session_id = %session.session_id, %err, "its worker cannot pause");
                if ttl {
                    self.end_locked(slot, guard, End::Ttl).await.map(drop)
                } else {
                    self.stop_locked(slot, guard).await
                }
            }
            other => other,
        }
    }

    async fn mark_paused_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
        activity_ms: u64,
    ) -> Result<(), StoreError> {
        let was = slot.view().state;
        if !matches!(was, SessionState::Running | SessionState::Stopped) {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let session = self
            .persist(slot, |r| {
                r.session.state = SessionState::Paused;
                r.session.paused_ms = Some(now);
                r.stopped_ms = Some(now);
                if was == SessionState::Running {
                    r.ttl_paused_ms = Some(now);
                }
                r.stop_activity_ms = Some(activity_ms);
            })
            .await?;
        slot.data.lock().observed_activity = Some(activity_ms);
        self.publish(&session, None);
        Ok(())
    }

    /// Resumes a paused session through its worker (a keepalive or a fork touches it) and
    /// records it.
    pub(crate) async fn start_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        guard: &OwnedMutexGuard<()>,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if session.unplaced {
            // Its worker was lost: resumed on another from the uploaded state.
            return self.place_locked(slot, guard).await;
        }
        if !self.state.lock().worker_live(&session.worker_id) {
            return Err(WireError::no_capacity(
                format!("the worker of session {} is not live", session.session_id),
                1000,
            ));
        }
        let op = JobOp::StartVm {
            vm_id: session.session_id.clone().into(),
        };
        match self
            .api
            .job(&session.worker_id, job(op), self.cfg.jobs.lifecycle)
            .await
        {
            Ok(_) => {}
            Err(crate::worker_api::JobError::Failed(err)) => return Err(err),
            Err(e) => return Err(WireError::internal(format!("resume: {e}"))),
        }
        self.resume_locked(slot, guard).await.map_err(store_error)
    }

    async fn forget_locked(
        self: &Arc<Self>,
        slot: &Arc<SessionSlot>,
        _guard: &OwnedMutexGuard<()>,
    ) -> Result<(), StoreError> {
        let (sid, tenant) = {
            let d = slot.data.lock();
            (
                d.rec.session.session_id.clone(),
                d.rec.session.tenant.clone(),
            )
        };
        if !self.delete_pause_object(slot).await {
            // Kept until its object is gone: the record is what says one may exist.
            return Err(StoreError::Unavailable(format!(
                "session {sid}'s uploaded paused state is not removed yet"
            )));
        }
        self.store.delete_session(&sid).await?;
        let mut st = self.state.lock();
        if st.sessions.get(&sid).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            st.sessions.remove(&sid);
        }
        // Its tenant's list lets go of it too (it is pruned of ended sessions only when the
        // tenant creates again, which a tenant that went away never does).
        if let Some(tenant) = tenant
            && let Some(slots) = st.tenant_sessions.get_mut(&tenant)
        {
            slots.retain(|s| !Arc::ptr_eq(s, slot));
            if slots.is_empty() {
                st.tenant_sessions.remove(&tenant);
            }
        }
        Ok(())
    }

    pub(crate) async fn keepalive(
        self: &Arc<Self>,
        sid: &SessionId,
        req: KeepaliveRequest,
    ) -> Result<Session, WireError> {
        if req.ttl_s == Some(0) {
            return Err(WireError::bad_request("ttl_s must be positive"));
        }
        let slot = self.slot(sid).ok_or_else(|| unknown_session(sid))?;
        let guard = slot.op.clone().lock_owned().await;
        let current = slot.view();
        if current.state.is_terminal() {
            return Err(WireError::conflict(format!(
                "session {sid} has ended ({})",
                state_name(current.state)
            )));
        }
        if current.state == SessionState::Paused {
            // A keepalive touches the session: a paused one is resumed first.
            self.start_locked(&slot, &guard).await?;
        }
        let max = self.cfg.sessions.max_ttl.as_secs().max(1);
        let ttl = req
            .ttl_s
            .unwrap_or_else(|| slot.data.lock().rec.ttl_s)
            .clamp(1, max);
        let now = self.clock.now_ms();
        self.persist(&slot, |r| {
            r.ttl_s = ttl;
            r.session.expires_ms = super::claim::expiry_ms(now, ttl);
            if matches!(
                r.session.state,
                SessionState::Stopped | SessionState::Paused
            ) {
                r.ttl_paused_ms = Some(now);
            }
        })
        .await
        .map_err(store_error)
    }

    pub(crate) async fn release(self: &Arc<Self>, sid: &SessionId) -> Result<Session, WireError> {
        let slot = self.slot(sid).ok_or_else(|| unknown_session(sid))?;
        let guard = slot.op.clone().lock_owned().await;
        self.end_locked(&slot, &guard, End::Release).await
    }
}

pub(crate) fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Running => "running",
        SessionState::Stopped => "stopped",
        SessionState::Paused => "paused",
        SessionState::Released => "released",
        SessionState::Lost => "lost",
    }
}

/// What a session's template says its idle timeout and TTL do, resolved.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub idle_action: IdleAction,
    pub ttl_action: TtlAction,
    pub paused_retention_s: Option<u64>,
}

/// The lifetime policies of every template and which workers pause to disk, read once per pass.
pub(crate) struct Policies {
    templates: std::collections::HashMap<
        hearth_messages::TemplateName,
        (Option<IdleAction>, TtlAction, Option<u64>),
    >,
    pausing_workers: std::collections::HashSet<hearth_messages::WorkerId>,
}

impl Policies {
    pub(crate) fn of(st: &super::state::State) -> Self {
        let templates = st
            .templates
            .iter()
            .filter_map(|(name, t)| {
                let c = t.config.as_ref()?;
                Some((
                    name.clone(),
                    (c.idle_action, c.ttl_action, c.paused_retention_s),
                ))
            })
            .collect();
        let pausing_workers = st
            .workers
            .iter()
            .filter(|(_, w)| {
                w.status.as_ref().is_some_and(|s| {
                    crate::config::PAUSING_PROVIDERS.contains(&s.provider.as_str())
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        Self {
            templates,
            pausing_workers,
        }
    }

    /// The policy of `session` (its template's, defaulted).
    pub(crate) fn of_session(&self, session: &Session) -> Policy {
        let (idle, ttl_action, paused_retention_s) = self
            .templates
            .get(&session.template)
            .copied()
            .unwrap_or((None, TtlAction::Release, None));
        let idle_action = idle.unwrap_or(if self.pausing_workers.contains(&session.worker_id) {
            IdleAction::Pause
        } else {
            IdleAction::Stop
        });
        Policy {
            idle_action,
            ttl_action,
            paused_retention_s,
        }
    }
}
