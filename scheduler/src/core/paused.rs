//! `pause_upload`: a paused session's state in the fleet's object store, so the session survives
//! the loss of its worker.
//!
//! After a pause (the template's `pause_upload`, or `upload` on the pause request) the session's
//! worker uploads the paused VM as the object `paused/<tenant>/<sid>` (chunked by the store, its
//! SHA-256 recorded by it, the state's own SHA-256 and zstd checksums inside); only once that
//! completed does the session say `pause_uploaded` (with its bytes, counted against the tenant's
//! `max_snapshot_bytes`). A failed or refused upload leaves the session paused on its worker,
//! resumable there, with the reason in `detail`.
//!
//! When the worker is lost, an uploaded paused session is not ended: it becomes `unplaced`
//! (still `paused`, running nowhere). Its next touch — keepalive, fork, or any data-plane
//! request (which the scheduler answers for unplaced sessions, see `service.rs`) — restores it
//! on a worker that runs the lost worker's provider and has room: the worker downloads the
//! object, verifies it, restores the same machine and resumes it, and the session moves there.
//! A state that cannot be restored (missing, corrupt, refused) ends the session `lost`
//! (`vm_failed`) with the reason in `detail`; a worker that cannot take it now (capacity,
//! timeout) leaves it unplaced for the next touch.
//!
//! The object is deleted when the session resumes (it is stale then), ends, or is forgotten; the
//! record's `pause_object` says an object may exist, so even an upload whose reply was lost is
//! removed. A lost worker that comes back still holds its copy of the paused VM: the session no
//! longer names it there (unplaced, or moved), so reconcile destroys it as a leak — the uploaded
//! state (or the worker it moved to) is the one copy.
//!
//! Architecture invariant: the object store is the only thing the scheduler touches besides the
//! KV buckets, and only to delete (through [`crate::worker_api::WorkerApi::delete_object`]).

use std::sync::Arc;

use hearth_messages::{
    ErrorCode, JobOp, JobOutput, Session, SessionId, SessionState, TemplateName, TerminationReason,
    VmId, WireError, WorkerId, paused_object_key,
};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::Core;
use super::lifetimes::End;
use super::state::SessionSlot;
use super::store_error;
use crate::metrics as m;
use crate::worker_api::{JobError, job};

/// The object key of `session`'s uploaded paused state.
fn object_key(session: &Session) -> String {
    paused_object_key(
        session.tenant.as_ref(),
        &VmId::from(session.session_id.clone()),
    )
}

impl Core {
    /// Whether sessions of `template` upload their state when paused (`pause_upload`).
    pub(crate) fn template_pause_upload(&self, template: &TemplateName) -> bool {
        self.state
            .lock()
            .templates
            .get(template)
            .and_then(|t| t.config.as_ref())
            .is_some_and(|c| c.pause_upload)
    }

    /// The provider `worker` runs, as its last heartbeat said.
    fn worker_provider(&self, worker: &WorkerId) -> Option<String> {
        self.state
            .lock()
            .workers
            .get(worker)
            .and_then(|w| w.status.as_ref())
            .map(|s| s.provider.clone())
    }

    /// Whether `worker`'s paused VMs can be uploaded (its provider pauses to disk).
    pub(crate) fn pauses_to_disk(&self, worker: &WorkerId) -> bool {
        self.worker_provider(worker)
            .is_some_and(|p| crate::config::UPLOADING_PROVIDERS.contains(&p.as_str()))
    }

    /// The 400 for an explicit `upload` on a session whose worker keeps paused VMs in memory.
    pub(crate) fn upload_unsupported(&self, session: &Session) -> WireError {
        WireError::bad_request(format!(
            "pause_upload needs a provider that pauses to disk (qemu): worker {} runs {}, which \
             keeps a paused session in memory",
            session.worker_id,
            self.worker_provider(&session.worker_id)
                .unwrap_or_else(|| "an unknown provider".into())
        ))
    }

    /// Uploads the paused state of `slot`'s session (after its pause). Never fails the pause: a
    /// refusal or failure leaves the session paused on its worker with the reason in `detail`
    /// (an error is returned only when the record could not be written).
    pub(crate) async fn upload_pause_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        _guard: &OwnedMutexGuard<()>,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if session.state != SessionState::Paused || session.pause_uploaded || session.unplaced {
            return Ok(());
        }
        if !self.pauses_to_disk(&session.worker_id) {
            let why = self.upload_unsupported(&session).message;
            return self.upload_refused(slot, "unsupported", why).await;
        }
        if let Some(why) = self.snapshot_quota_full(&session, 0) {
            return self.upload_refused(slot, "over_quota", why).await;
        }
        let key = object_key(&session);
        // Before the upload starts: from here an object may exist until it is deleted.
        self.persist(slot, |r| r.pause_object = true)
            .await
            .map_err(store_error)?;
        let started = Instant::now();
        let op = JobOp::UploadPausedVm {
            vm_id: session.session_id.clone().into(),
            key: key.clone(),
        };
        let uploaded = self
            .api
            .job(&session.worker_id, job(op), self.cfg.jobs.restore)
            .await;
        let bytes = match uploaded {
            Ok(JobOutput::Uploaded { bytes }) => bytes,
            Ok(other) => {
                let why = format!("pause state not uploaded: the worker answered {other:?}");
                return self.upload_refused(slot, "failed", why).await;
            }
            Err(e) => {
                let why = match e {
                    JobError::Failed(err) => format!("pause state not uploaded: {}", err.message),
                    e => format!("pause state not uploaded: {e}"),
                };
                // A timed-out upload may still complete: the object goes with the session.
                return self.upload_refused(slot, "failed", why).await;
            }
        };
        if let Some(why) = self.snapshot_quota_full(&session, bytes) {
            self.delete_pause_object(slot).await;
            return self.upload_refused(slot, "over_quota", why).await;
        }
        let session = self
            .persist(slot, |r| {
                r.session.pause_uploaded = true;
                r.session.pause_upload_bytes = bytes;
                r.session.detail = None;
            })
            .await
            .map_err(store_error)?;
        metrics::counter!(m::PAUSE_UPLOADS_TOTAL, "result" => "ok").increment(1);
        metrics::counter!(m::PAUSE_UPLOAD_BYTES_TOTAL).increment(bytes);
        metrics::histogram!(m::PAUSE_UPLOAD_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(session_id = %session.session_id, key, bytes,
            took_ms = started.elapsed().as_millis() as u64, "paused state uploaded");
        Ok(())
    }

    /// Why `session` may not upload `adding` more bytes (its tenant's snapshot bytes), if so.
    fn snapshot_quota_full(&self, session: &Session, adding: u64) -> Option<String> {
        let tenant = session.tenant.as_ref()?;
        let mut st = self.state.lock();
        let usage = self.usage(&mut st, tenant);
        let full = if adding == 0 {
            usage.snapshot_bytes >= usage.quota.max_snapshot_bytes
        } else {
            usage.snapshot_bytes.saturating_add(adding) > usage.quota.max_snapshot_bytes
        };
        full.then(|| {
            let err =
                self.snapshot_bytes_exceeded(tenant, usage.snapshot_bytes, adding, &usage.quota);
            format!("pause state not uploaded: {}", err.message)
        })
    }

    /// Records an upload that did not happen: the session stays paused on its worker.
    async fn upload_refused(
        self: &Arc<Self>,
        slot: &SessionSlot,
        result: &'static str,
        why: String,
    ) -> Result<(), WireError> {
        metrics::counter!(m::PAUSE_UPLOADS_TOTAL, "result" => result).increment(1);
        let session = self
            .persist(slot, |r| r.session.detail = Some(why.clone()))
            .await
            .map_err(store_error)?;
        tracing::warn!(session_id = %session.session_id, reason = %why,
            "paused state not uploaded; the session stays paused on its worker");
        Ok(())
    }

    /// Deletes the session's object, if one may exist, and records that none does. A failure
    /// is logged and kept in the record (`pause_object`), so a later end or the forget retries.
    pub(crate) async fn delete_pause_object(&self, slot: &SessionSlot) -> bool {
        let (session, may_exist) = {
            let d = slot.data.lock();
            (d.view(), d.rec.pause_object)
        };
        if !may_exist {
            return true;
        }
        let key = object_key(&session);
        if let Err(err) = self.api.delete_object(&key).await {
            tracing::warn!(session_id = %session.session_id, key, %err,
                "removing the uploaded paused state failed; will retry");
            return false;
        }
        let cleared = self
            .persist(slot, |r| {
                r.pause_object = false;
                r.session.pause_uploaded = false;
                r.session.pause_upload_bytes = 0;
            })
            .await;
        if let Err(err) = cleared {
            tracing::warn!(session_id = %session.session_id, %err, "recording the removed paused state");
            return false;
        }
        tracing::info!(session_id = %session.session_id, key, "uploaded paused state removed");
        true
    }

    /// What a lost worker means for `slot`'s session: an uploaded paused session becomes
    /// unplaced (`Some(session)`, not ended); any other is ended (`None`), with `detail`
    /// saying why.
    pub(crate) async fn worker_lost_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
    ) -> Result<Option<Session>, WireError> {
        let session = slot.view();
        if session.unplaced {
            return Ok(Some(session));
        }
        if session.state == SessionState::Paused && session.pause_uploaded {
            let worker = session.worker_id.clone();
            let session = self
                .persist(slot, |r| {
                    r.session.unplaced = true;
                    r.session.detail = Some(format!(
                        "worker {worker} was lost; the paused state is in the object store: the \
                         next touch resumes the session on another worker"
                    ));
                })
                .await
                .map_err(store_error)?;
            tracing::warn!(session_id = %session.session_id, worker_id = %worker,
                "worker lost; its paused session is unplaced, to be resumed elsewhere");
            self.publish(&session, None);
            self.unplaced_changed.send_modify(|v| *v += 1);
            return Ok(Some(session));
        }
        let detail = if session.state == SessionState::Paused {
            format!(
                "worker {} was lost while the session was paused; its pause state was not \
                 uploaded (pause_upload{})",
                session.worker_id,
                session
                    .detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )
        } else {
            format!("worker {} stopped heartbeating", session.worker_id)
        };
        self.persist(slot, |r| r.session.detail = Some(detail))
            .await
            .map_err(store_error)?;
        Ok(None)
    }

    /// Resumes the unplaced session of `slot` on another worker (see the module docs); the
    /// caller holds its lock. 409 if its state could not be restored (it is `lost` now), 503
    /// when no worker can take it now.
    pub(crate) async fn place_locked(
        self: &Arc<Self>,
        slot: &SessionSlot,
        guard: &OwnedMutexGuard<()>,
    ) -> Result<(), WireError> {
        let session = slot.view();
        if !session.unplaced {
            return Ok(());
        }
        let sid = session.session_id.clone();
        let vm: VmId = sid.clone().into();
        let lost = session.worker_id.clone();
        // Only a worker of the same provider can load the state.
        let exclude: Vec<WorkerId> = {
            let provider = self.worker_provider(&lost);
            let st = self.state.lock();
            st.workers
                .iter()
                .filter(|(id, w)| {
                    **id == lost
                        || provider
                            .as_ref()
                            .is_some_and(|p| w.status.as_ref().is_some_and(|s| &s.provider != p))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let retry = |why: String| {
            metrics::counter!(m::PAUSE_MOVES_TOTAL, "result" => "retry").increment(1);
            WireError::no_capacity(why, self.cfg.retry_after.as_millis() as u64)
        };
        let Some(worker) = self.reserve_worker(Some(&session.template), &exclude, &vm) else {
            return Err(retry(format!(
                "session {sid} is paused and its worker {lost} was lost; no worker can take it \
                 now"
            )));
        };
        let started = Instant::now();
        let mut restore = job(JobOp::RestorePausedVm {
            vm_id: vm.clone(),
            key: object_key(&session),
        });
        restore.tenant = session.tenant.clone();
        let restored = self.api.job(&worker, restore, self.cfg.jobs.restore).await;
        self.release_worker(&worker, restored.is_ok().then_some(&vm));
        match restored {
            Ok(_) => {
                let isolation = self
                    .state
                    .lock()
                    .workers
                    .get(&worker)
                    .and_then(|w| w.status.as_ref())
                    .map(|s| s.isolation.clone());
                let moved = self
                    .persist(slot, |r| {
                        r.session.worker_id = worker.clone();
                        r.session.unplaced = false;
                        r.session.isolation = isolation.or(r.session.isolation.take());
                        r.session.detail = Some(format!(
                            "resumed on worker {worker} from its uploaded paused state (worker \
                             {lost} was lost)"
                        ));
                    })
                    .await;
                self.state.lock().unmark(&worker, &vm);
                self.unplaced_changed.send_modify(|v| *v += 1);
                moved.map_err(store_error)?;
                metrics::counter!(m::PAUSE_MOVES_TOTAL, "result" => "ok").increment(1);
                metrics::histogram!(m::PAUSE_MOVE_DURATION_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(session_id = %sid, from = %lost, to = %worker,
                    took_ms = started.elapsed().as_millis() as u64,
                    "paused session of a lost worker resumed elsewhere");
                self.resume_locked(slot, guard).await.map_err(store_error)
            }
            Err(JobError::Failed(err))
                if matches!(
                    err.code,
                    ErrorCode::BadRequest | ErrorCode::NotFound | ErrorCode::Conflict
                ) =>
            {
                self.state.lock().unmark(&worker, &vm);
                metrics::counter!(m::PAUSE_MOVES_TOTAL, "result" => "lost").increment(1);
                let detail = format!(
                    "worker {lost} was lost and the uploaded paused state could not be restored \
                     on worker {worker}: {}",
                    err.message
                );
                tracing::warn!(session_id = %sid, %detail, "paused session lost");
                self.persist(slot, |r| {
                    r.session.unplaced = false;
                    r.session.detail = Some(detail.clone());
                })
                .await
                .map_err(store_error)?;
                self.unplaced_changed.send_modify(|v| *v += 1);
                self.end_locked(slot, guard, End::VmGone(TerminationReason::VmFailed))
                    .await?;
                Err(WireError::conflict(format!(
                    "session {sid} is lost: {detail}"
                )))
            }
            Err(e) => {
                self.state.lock().unmark(&worker, &vm);
                Err(retry(format!(
                    "session {sid} could not be resumed on worker {worker} now: {e}"
                )))
            }
        }
    }

    /// The unplaced sessions (their data plane is the scheduler's until they are placed).
    pub(crate) fn unplaced_sessions(&self) -> Vec<SessionId> {
        self.state
            .lock()
            .sessions
            .values()
            .filter_map(|s| {
                let d = s.data.lock();
                (d.is_live() && d.rec.session.unplaced).then(|| d.rec.session.session_id.clone())
            })
            .collect()
    }

    /// A data-plane request for an unplaced session (or a keepalive-like touch): places it.
    pub(crate) async fn touch_unplaced(
        self: &Arc<Self>,
        slot: Arc<SessionSlot>,
        sid: &SessionId,
    ) -> Result<Session, WireError> {
        let guard = slot.op.clone().lock_owned().await;
        let current = slot.view();
        if current.state.is_terminal() {
            return Err(WireError::conflict(format!(
                "session {sid} has ended ({})",
                super::lifetimes::state_name(current.state)
            )));
        }
        if current.unplaced {
            self.place_locked(&slot, &guard).await?;
        }
        Ok(slot.view())
    }
}
