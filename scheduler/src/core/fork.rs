//! `sessions.<sid>.fork`: a live session branched into `count` new sessions on its worker.
//!
//! 1. Checked first, before any work: the request, the caller's ownership of the source, and the
//!    tenant's session quota for every copy still to make (429 when they do not fit).
//! 2. Ids already recorded (a retried fork) are returned as they are; the missing ones are
//!    registered as claims in flight (so they count against the quota and a concurrent
//!    `sessions.create` of the same id waits for them).
//! 3. The source is snapshotted live (`snapshot_vm`: the VM is paused for the length of the save,
//!    then goes on; a paused source is resumed first) under its op lock.
//! 4. Each copy is restored from that snapshot on the source's worker (`create_vm_with_spec`
//!    with `restore_from`: the worker resets the identity — host name, machine id, RNG, clock) and
//!    recorded like a cold claim. A copy that fails is reported in `failed`, never dropped.
//! 5. The snapshot is deleted: no template is registered.
//!
//! Copies are not spread over other workers (that would ship the snapshot through the object
//! store first): a worker without room for a copy reports it failed (503).

use std::sync::Arc;
use std::time::Instant;

use hearth_messages::{
    Caller, CreateSessionRequest, ForkFailure, ForkSessionReply, ForkSessionRequest, JobOp,
    JobOutput, SessionId, SessionState, SnapshotId, VmId, VmInfo, VmSpec, WireError,
};
use tokio::sync::watch;

use super::Core;
use super::state::PendingClaim;
use crate::metrics as m;
use crate::worker_api::{JobError, job};

impl Core {
    pub(crate) async fn fork(
        self: &Arc<Self>,
        caller: &Caller,
        sid: &SessionId,
        req: ForkSessionRequest,
    ) -> Result<ForkSessionReply, WireError> {
        req.validate()?;
        let started = Instant::now();
        let slot = self.owned_slot(caller, sid)?;
        let (source, ttl_s, idle_timeout_s) = {
            let d = slot.data.lock();
            (d.view(), d.rec.ttl_s, d.rec.idle_timeout_s)
        };
        if source.state.is_terminal() {
            return Err(WireError::conflict(format!(
                "session {sid} has ended: it cannot be forked"
            )));
        }
        let ids: Vec<SessionId> = match &req.session_ids {
            Some(ids) => ids.clone(),
            None => (0..req.count)
                .map(|_| hearth_messages::client::new_session_id())
                .collect(),
        };
        if ids.contains(sid) {
            return Err(WireError::bad_request(
                "a fork's session_ids must not name its source",
            ));
        }
        let mut reply = ForkSessionReply::default();
        let (to_make, pending) = {
            let mut st = self.state.lock();
            let mut to_make = Vec::new();
            for id in &ids {
                if let Some(existing) = st.sessions.get(id) {
                    let existing = existing.view();
                    if caller.owns(existing.tenant.as_ref()) && existing.template == source.template
                    {
                        reply.sessions.push(existing);
                    } else {
                        reply.failed.push(failure(
                            id,
                            WireError::conflict(format!("session id {id} is taken")),
                        ));
                    }
                } else if st.claims.contains_key(id) {
                    reply.failed.push(failure(
                        id,
                        WireError::conflict(format!("session {id} is being created; retry")),
                    ));
                } else {
                    to_make.push(id.clone());
                }
            }
            if let Some(tenant) = caller.tenant() {
                self.admit_fork(&mut st, tenant, to_make.len())?;
            }
            let mut pending = Vec::new();
            for id in &to_make {
                let (tx, rx) = watch::channel(None);
                st.claims.insert(
                    id.clone(),
                    PendingClaim {
                        template: source.template.clone(),
                        tenant: caller.tenant().cloned(),
                        done: rx,
                    },
                );
                pending.push((id.clone(), tx));
            }
            (to_make, pending)
        };
        let made = self
            .fork_copies(
                caller,
                &slot,
                &source,
                ttl_s,
                idle_timeout_s,
                &req,
                &to_make,
            )
            .await;
        {
            let mut st = self.state.lock();
            for (id, tx) in pending {
                st.claims.remove(&id);
                let result = made.iter().find(|(i, _)| i == &id).map(|(_, r)| r.clone());
                tx.send_replace(Some(result.unwrap_or_else(|| {
                    Err(WireError::internal("the fork did not make this copy"))
                })));
            }
        }
        for (id, result) in made {
            match result {
                Ok(session) => reply.sessions.push(session),
                Err(error) => reply.failed.push(failure(&id, error)),
            }
        }
        reply
            .sessions
            .sort_by_key(|s| ids.iter().position(|i| i == &s.session_id));
        let result = if reply.failed.is_empty() {
            "ok"
        } else if reply.sessions.is_empty() {
            "failed"
        } else {
            "partial"
        };
        metrics::histogram!(m::FORK_DURATION_SECONDS, "result" => result)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(session_id = %sid, made = reply.sessions.len(), failed = reply.failed.len(), "session forked");
        Ok(reply)
    }

    /// Snapshots the source and restores one copy per id; every id gets an outcome.
    #[allow(clippy::too_many_arguments)]
    async fn fork_copies(
        self: &Arc<Self>,
        caller: &Caller,
        slot: &super::state::SessionSlot,
        source: &hearth_messages::Session,
        ttl_s: u64,
        idle_timeout_s: Option<u64>,
        req: &ForkSessionRequest,
        ids: &[SessionId],
    ) -> Vec<(SessionId, Result<hearth_messages::Session, WireError>)> {
        if ids.is_empty() {
            return Vec::new();
        }
        let all_failed = |error: WireError| {
            ids.iter()
                .map(|id| (id.clone(), Err(error.clone())))
                .collect::<Vec<_>>()
        };
        let worker = source.worker_id.clone();
        if !self.state.lock().worker_live(&worker) {
            return all_failed(WireError::no_capacity(
                format!("the worker of session {} is not live", source.session_id),
                1000,
            ));
        }
        let snapshot_id = match SnapshotId::new(format!("fork-{}", uuid::Uuid::new_v4().simple())) {
            Ok(id) => id,
            Err(e) => return all_failed(WireError::internal(format!("snapshot id: {e}"))),
        };
        // The live snapshot, under the source's op lock (no stop, pause or release meanwhile).
        {
            let guard = slot.op.clone().lock_owned().await;
            let state = slot.view().state;
            if state.is_terminal() {
                return all_failed(WireError::conflict(format!(
                    "session {} ended while forking",
                    source.session_id
                )));
            }
            if state == SessionState::Paused
                && let Err(e) = self.start_locked(slot, &guard).await
            {
                return all_failed(e);
            }
            let op = JobOp::SnapshotVm {
                vm_id: source.session_id.clone().into(),
                snapshot_id: snapshot_id.clone(),
                publish: false,
            };
            match self.api.job(&worker, job(op), self.cfg.jobs.snapshot).await {
                Ok(_) => {}
                Err(JobError::Failed(err)) => return all_failed(err),
                Err(e) => return all_failed(WireError::internal(format!("snapshot: {e}"))),
            }
        }
        let create = CreateSessionRequest {
            template: Some(source.template.clone()),
            session_id: None,
            ttl_s: Some(req.ttl_s.unwrap_or(ttl_s)),
            idle_timeout_s,
            labels: req.labels.clone().unwrap_or_else(|| source.labels.clone()),
            wait_ms: None,
        };
        let copies = ids.iter().map(|id| {
            let (create, worker, snapshot_id) = (&create, &worker, &snapshot_id);
            async move {
                let result = self.fork_one(caller, id, create, worker, snapshot_id).await;
                (id.clone(), result)
            }
        });
        let made = futures::future::join_all(copies).await;
        // No template: the snapshot goes as soon as the copies are made.
        let op = JobOp::DeleteSnapshot {
            snapshot_id,
            unpublish: false,
        };
        let core = self.clone();
        self.spawn(async move {
            if let Err(e) = core.api.job(&worker, job(op), core.cfg.jobs.lifecycle).await {
                tracing::warn!(worker_id = %worker, error = %e, "deleting a fork's snapshot failed");
            }
        });
        made
    }

    /// Restores one copy and records it as a session.
    async fn fork_one(
        self: &Arc<Self>,
        caller: &Caller,
        id: &SessionId,
        create: &CreateSessionRequest,
        worker: &hearth_messages::WorkerId,
        snapshot_id: &SnapshotId,
    ) -> Result<hearth_messages::Session, WireError> {
        let vm_id: VmId = id.clone().into();
        self.state.lock().mark(worker, &vm_id);
        let mut restore = job(JobOp::CreateVmWithSpec {
            vm_id: vm_id.clone(),
            spec: VmSpec {
                template: create.template.clone(),
                restore_from: Some(snapshot_id.clone()),
                ..VmSpec::default()
            },
            session: true,
        });
        restore.tenant = caller.tenant().cloned();
        let vm: VmInfo = match self.api.job(worker, restore, self.cfg.jobs.restore).await {
            Ok(JobOutput::Vm { vm }) => vm,
            Ok(other) => {
                self.state.lock().unmark(worker, &vm_id);
                return Err(WireError::internal(format!("restore answered {other:?}")));
            }
            Err(e) => {
                self.state.lock().unmark(worker, &vm_id);
                return Err(match e {
                    JobError::Failed(err) => err,
                    e => WireError::internal(format!("restore: {e}")),
                });
            }
        };
        let template = create.template.clone().unwrap_or_default();
        self.record_claim(id, &template, create, caller, worker, false, Some(&vm), &[])
            .await
    }
}

fn failure(id: &SessionId, error: WireError) -> ForkFailure {
    ForkFailure {
        session_id: Some(id.clone()),
        error,
    }
}
