//! Lifecycle jobs from the scheduler: decoding, lease fencing, deduplication by job id, and the
//! per-op work (create with its health check, start, stop, snapshot, destroy with backup, rename).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_nats::service::{self};
use hearth_messages::transport::{Reply, decode_message};
use hearth_messages::{
    JobOp, JobOutput, JobReply, JobRequest, TenantId, TerminationReason, VmId, WireError,
};
use tracing::{Instrument, debug, info, info_span, warn};

use super::convert::snapshot_info;
use super::runner::RunnerCore;
use super::{HEALTH_TIMEOUT, RETRY_AFTER_MS, Worker, respond, wire_error};
use crate::jobs::Outcome;
use crate::metrics as m;
use crate::provider::{ExecSpec, ProviderError, VmState};

impl Worker {
    // ----- lifecycle jobs -------------------------------------------------------------------

    pub(super) async fn handle_job(&self, request: service::Request) {
        // The job's span, parented from the scheduler's `traceparent` when it sent one.
        let span = info_span!(
            "job",
            otel.kind = "server",
            worker_id = %self.inner.config.worker_id,
            job_id = tracing::field::Empty,
            op = tracing::field::Empty,
            vm_id = tracing::field::Empty,
            session_id = tracing::field::Empty,
            template = tracing::field::Empty,
        );
        let remote = hearth_messages::trace::set_parent(&span, request.message.headers.as_ref());
        let reply =
            hearth_messages::trace::with_remote(remote, self.job_reply(&request).instrument(span))
                .await;
        respond(&self.inner.nats, request, reply).await;
    }

    async fn job_reply(&self, request: &service::Request) -> Reply {
        let (encoding, job) = decode_message::<JobRequest>(&request.message);
        match job {
            Err(err) => {
                metrics::counter!(m::BAD_REQUESTS_TOTAL, "endpoint" => "jobs").increment(1);
                Reply::error(encoding, &err)
            }
            Ok(job) => {
                record_job(&job);
                Reply::from_result(encoding, &self.inner.core.run(job).await)
            }
        }
    }
}

impl RunnerCore {
    /// Runs `job` once per `job_id` (a repeat gets the first outcome), refusing a deposed
    /// scheduler's, and counts it.
    pub(super) async fn run(self: &Arc<Self>, job: JobRequest) -> Result<JobReply, WireError> {
        let op_name = job.op.name();
        if let Err(err) = self.fence(job.lease_revision) {
            metrics::counter!(m::JOBS_TOTAL, "op" => op_name, "result" => err.code.to_string())
                .increment(1);
            return Err(err);
        }
        let started = Instant::now();
        let cell = self.jobs.cell(&job.job_id);
        let outcome = cell
            .get_or_init(|| self.run_job(job.op, job.tenant))
            .await
            .clone();
        let result = match &outcome {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code.to_string(),
        };
        metrics::counter!(m::JOBS_TOTAL, "op" => op_name, "result" => result).increment(1);
        metrics::histogram!(m::JOB_DURATION, "op" => op_name)
            .record(started.elapsed().as_secs_f64());
        outcome.map(|output| JobReply {
            job_id: job.job_id,
            output,
        })
    }

    /// Refuses a job from a deposed scheduler: one whose lease revision is older than the newest
    /// seen. A job without a revision (0: tools, tests) is not fenced.
    pub(super) fn fence(&self, revision: u64) -> Result<(), WireError> {
        if revision == 0 {
            return Ok(());
        }
        let newest = self.newest_lease.fetch_max(revision, Ordering::SeqCst);
        if revision < newest {
            metrics::counter!(m::JOBS_FENCED_TOTAL).increment(1);
            warn!(revision, newest, "refusing a job from a deposed scheduler");
            return Err(WireError::conflict(format!(
                "job from a deposed scheduler: lease revision {revision} is older than {newest}"
            )));
        }
        Ok(())
    }

    /// Runs one job; `tenant` owns the session a `session: true` job makes.
    pub(super) async fn run_job(self: &Arc<Self>, op: JobOp, tenant: Option<TenantId>) -> Outcome {
        let inner = self;
        if inner.draining.load(Ordering::SeqCst) {
            return Err(WireError::no_capacity("worker is draining", RETRY_AFTER_MS));
        }
        // Queries: no lock, no slot (they never wait behind a running command).
        match &op {
            JobOp::ListVms {} => {
                return Ok(JobOutput::Vms {
                    vms: inner.vm_infos().await.map_err(|e| wire_error(&e))?,
                });
            }
            JobOp::ListVmsPage {
                after,
                limit,
                generation,
            } => {
                let page = inner.inventory.page(after.as_ref(), *limit, *generation)?;
                return Ok(JobOutput::VmsPage {
                    vms: page.vms,
                    next: page.next,
                    digest: page.digest,
                });
            }
            JobOp::ListVmChanges {
                generation,
                offset,
                limit,
            } => {
                let (delta, next) = inner.inventory.changes(*generation, *offset, *limit)?;
                return Ok(JobOutput::VmChanges { delta, next });
            }
            JobOp::GetVm { vm_id } => {
                let view = inner
                    .provider
                    .get_vm(vm_id)
                    .await
                    .map_err(|e| wire_error(&e))?
                    .ok_or_else(|| WireError::not_found(format!("vm {vm_id} not found")))?;
                return Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                });
            }
            JobOp::ListSnapshots { vm_id } => {
                return Ok(JobOutput::Snapshots {
                    snapshots: inner.snapshot_infos(vm_id.as_ref()).await?,
                });
            }
            _ => {}
        }
        // Release, TTL, prune and idle stop end the VM's running work first, so its lock comes
        // at once.
        if let JobOp::DestroyVm { vm_id, .. } | JobOp::StopVm { vm_id } = &op {
            inner.end_work(vm_id);
        }
        // A pause does not wait behind a command or file transfer: the caller is told (409) and
        // may try again (pausing would freeze the command half way).
        if let JobOp::PauseVm { vm_id } = &op
            && inner.locks.is_busy(vm_id)
        {
            return Err(WireError::conflict(format!(
                "vm {vm_id} is busy (a command or file transfer is running): not paused"
            )));
        }
        // The VM's lock before a job slot: a job waiting for a busy VM holds no slot, so jobs on
        // other VMs (creates above all) never queue behind it.
        let vm_lock = match op.vm_id() {
            Some(vm_id) => Some(inner.locks.lock(vm_id).await),
            None => None,
        };
        let slot = inner
            .job_slots
            .acquire()
            .await
            .map_err(|_| WireError::no_capacity("worker is shutting down", RETRY_AFTER_MS))?;
        inner.jobs_in_flight.fetch_add(1, Ordering::Relaxed);
        let outcome = self
            .run_op(
                op,
                Holding {
                    vm_lock,
                    _slot: slot,
                },
                tenant.as_ref(),
            )
            .await;
        inner.jobs_in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Err(err) = &outcome {
            debug!(%err, "job failed");
        }
        outcome
    }

    /// Runs `op` with what [`Self::run_job`] took for it (see [`Holding`]).
    async fn run_op(
        self: &Arc<Self>,
        op: JobOp,
        holding: Holding<'_>,
        tenant: Option<&TenantId>,
    ) -> Outcome {
        let inner = self;
        let provider = &inner.provider;
        let werr = |e: ProviderError| wire_error(&e);
        match op {
            JobOp::CreateVm { vm_id, session } => {
                self.create(vm_id, hearth_messages::VmSpec::default(), session, tenant)
                    .await
            }
            JobOp::CreateVmWithSpec {
                vm_id,
                spec,
                session,
            } => self.create(vm_id, spec, session, tenant).await,
            JobOp::StartVm { vm_id } => {
                let view = inner.start_vm(&vm_id).await.map_err(werr)?;
                inner
                    .vm_event(&view.vm_id, VmState::Running, None, None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::StopVm { vm_id } => {
                let view = provider.stop_vm(&vm_id).await.map_err(werr)?;
                inner
                    .vm_event(&view.vm_id, VmState::Stopped, None, None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::PauseVm { vm_id } => {
                let started = Instant::now();
                let paused = provider.pause_vm(&vm_id).await;
                let result = if paused.is_ok() { "ok" } else { "error" };
                metrics::histogram!(m::PAUSE_DURATION, "result" => result)
                    .record(started.elapsed().as_secs_f64());
                let view = paused.map_err(werr)?;
                inner
                    .vm_event(&view.vm_id, VmState::Paused, None, None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::UploadPausedVm { vm_id, key } => {
                check_paused_key(&vm_id, &key)?;
                let started = Instant::now();
                let uploaded = inner.host.upload_paused(provider, &vm_id, &key).await;
                let result = if uploaded.is_ok() { "ok" } else { "error" };
                metrics::histogram!(m::PAUSE_UPLOAD_DURATION, "result" => result)
                    .record(started.elapsed().as_secs_f64());
                let bytes = uploaded?;
                metrics::counter!(m::PAUSE_UPLOAD_BYTES_TOTAL).increment(bytes);
                info!(%vm_id, key, bytes, took_ms = started.elapsed().as_millis() as u64,
                    "paused vm uploaded");
                Ok(JobOutput::Uploaded { bytes })
            }
            JobOp::RestorePausedVm { vm_id, key } => {
                check_paused_key(&vm_id, &key)?;
                let started = Instant::now();
                let restored = self.restore_paused(&vm_id, &key, tenant).await;
                let result = if restored.is_ok() { "ok" } else { "error" };
                metrics::histogram!(m::PAUSE_RESTORE_DURATION, "result" => result)
                    .record(started.elapsed().as_secs_f64());
                restored
            }
            JobOp::SnapshotVm {
                vm_id,
                snapshot_id,
                publish,
            } => {
                let started = Instant::now();
                let info = provider
                    .snapshot_vm(&vm_id, &snapshot_id)
                    .await
                    .map_err(werr)?;
                if publish {
                    inner.publish_snapshot(&snapshot_id).await?;
                }
                metrics::histogram!(m::SNAPSHOT_DURATION).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::SNAPSHOT_BYTES_TOTAL).increment(info.size_bytes);
                Ok(JobOutput::Snapshot {
                    snapshot: snapshot_info(info, publish),
                })
            }
            JobOp::DestroyVm {
                vm_id,
                backup,
                reason,
            } => {
                self.destroy_locked(&vm_id, backup, reason).await?;
                drop(holding.vm_lock);
                inner.locks.forget_if_idle(&vm_id);
                Ok(JobOutput::Done {})
            }
            JobOp::RenameVm {
                vm_id,
                new_vm_id,
                session,
            } => {
                let _new_guard = inner.locks.lock(&new_vm_id).await;
                let view = provider.rename_vm(&vm_id, &new_vm_id).await.map_err(werr)?;
                self.unserve(&vm_id);
                if session {
                    self.make_session(&new_vm_id, tenant).await?;
                }
                drop(holding.vm_lock);
                inner.locks.forget_if_idle(&vm_id);
                inner
                    .vm_event(&new_vm_id, view.state, Some(vm_id), None)
                    .await;
                Ok(JobOutput::Vm {
                    vm: inner.vm_info(view),
                })
            }
            JobOp::ListVms {}
            | JobOp::ListVmsPage { .. }
            | JobOp::ListVmChanges { .. }
            | JobOp::GetVm { .. }
            | JobOp::ListSnapshots { .. } => unreachable_query(),
            JobOp::BackupVm { vm_id } => {
                self.backup_locked(&vm_id).await?;
                Ok(JobOutput::Done {})
            }
            JobOp::DeleteSnapshot {
                snapshot_id,
                unpublish,
            } => inner.delete_snapshot(&snapshot_id, unpublish).await,
        }
    }

    /// `restore_paused_vm`: the paused VM of a lost worker, from the object store, resumed and
    /// served as its session here. Any failure leaves no VM behind (never a half-running one).
    /// (Called holding the VM's lock.)
    async fn restore_paused(
        self: &Arc<Self>,
        vm_id: &VmId,
        key: &str,
        tenant: Option<&TenantId>,
    ) -> Outcome {
        let inner = self;
        if let Some(existing) = inner
            .provider
            .get_vm(vm_id)
            .await
            .map_err(|e| wire_error(&e))?
            && existing.state != VmState::Destroyed
        {
            return Err(WireError::conflict(format!("vm {vm_id} already exists")));
        }
        let _reservation = self.admit(vm_id).await?;
        inner
            .host
            .download_paused(&inner.provider, vm_id, key)
            .await?;
        let view = match inner.start_vm(vm_id).await {
            Ok(view) => view,
            Err(e) => {
                // A state that will not resume is not kept here; the scheduler decides whether
                // the session is lost (the object is still in the store).
                match inner.provider.destroy_vm(vm_id).await {
                    Ok(()) | Err(ProviderError::NotFound(_)) => {}
                    Err(err) => warn!(%vm_id, %err, "removing a paused vm that did not resume"),
                }
                return Err(wire_error(&e));
            }
        };
        self.make_session(vm_id, tenant).await?;
        inner.vm_event(vm_id, VmState::Running, None, None).await;
        info!(%vm_id, key, "paused vm of a lost worker restored and resumed here");
        Ok(JobOutput::Vm {
            vm: inner.vm_info(view),
        })
    }

    /// Creates (or restores) a VM within capacity, checks it answers, and serves it as a session
    /// if asked.
    /// (Called holding the VM's lock.)
    pub(super) async fn create(
        self: &Arc<Self>,
        vm_id: VmId,
        spec: hearth_messages::VmSpec,
        session: bool,
        tenant: Option<&TenantId>,
    ) -> Outcome {
        let inner = self;
        if let Some(existing) = inner
            .provider
            .get_vm(&vm_id)
            .await
            .map_err(|e| wire_error(&e))?
            && existing.state != VmState::Destroyed
        {
            return Err(WireError::conflict(format!("vm {vm_id} already exists")));
        }
        let _reservation = self.admit(&vm_id).await?;
        let started = Instant::now();
        let restore = spec.restore_from.clone();
        let nix_profile = spec.nix_profile.clone();
        if let Some(snapshot_id) = &restore {
            inner.ensure_snapshot(snapshot_id).await?;
        }
        let provider_spec = crate::provider::VmSpec {
            template: spec.template,
            vcpus: spec.vcpus.unwrap_or(1),
            memory_mib: spec
                .memory_mib
                .unwrap_or(crate::provider::DEFAULT_MEMORY_MIB),
            disk_mib: spec.disk_mib.unwrap_or(crate::provider::DEFAULT_DISK_MIB),
            max_processes: spec
                .max_processes
                .unwrap_or(crate::provider::DEFAULT_MAX_PROCESSES),
            network: match spec.network.as_deref() {
                None => crate::provider::NetworkMode::None,
                Some(text) => {
                    crate::provider::NetworkMode::parse(text).map_err(|e| wire_error(&e))?
                }
            },
            env: spec.env,
            base: spec.base.map(Into::into),
            // An empty bootstrap is a no-op (seed 001), not an invalid argv.
            bootstrap: spec.bootstrap.filter(|argv| !argv.is_empty()),
            restore_from: spec.restore_from,
        };
        let view = inner
            .provider
            .create_vm_with_spec(&vm_id, &provider_spec)
            .await
            .map_err(|e| wire_error(&e))?;
        // Healthy before anyone may use it: a trivial command must succeed.
        let health = inner
            .provider
            .exec(
                &vm_id,
                ExecSpec::argv(["true"]).with_timeout(HEALTH_TIMEOUT),
                None,
            )
            .await;
        let healthy = matches!(&health, Ok(outcome) if outcome.success());
        if !healthy {
            let detail = match health {
                Ok(o) => format!(
                    "exit {} {}",
                    o.exit_code,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => e.to_string(),
            };
            let _ = inner.provider.destroy_vm(&vm_id).await;
            inner
                .vm_event(
                    &vm_id,
                    VmState::Destroyed,
                    None,
                    Some(TerminationReason::VmFailed),
                )
                .await;
            return Err(WireError::internal(format!(
                "vm {vm_id} failed its health check: {detail}"
            )));
        }
        if restore.is_some() {
            metrics::histogram!(m::RESTORE_DURATION).record(started.elapsed().as_secs_f64());
        }
        // A restore carries what the snapshot's build hydrated; only a cold create hydrates.
        let notes = match (&restore, &nix_profile) {
            (None, Some(profile)) => vec![self.hydrate_nix_profile(&vm_id, profile).await],
            _ => Vec::new(),
        };
        if session {
            self.make_session(&vm_id, tenant).await?;
        }
        inner.vm_event(&vm_id, VmState::Running, None, None).await;
        let mut vm = inner.vm_info(view);
        vm.notes = notes;
        Ok(JobOutput::Vm { vm })
    }

    /// Hydrates a template's nix profile in the new VM (seed 001: `nix develop <profile>
    /// --command true` in the volume) when the VM has `nix`. Never fails the create: a VM
    /// without nix, or a failing `nix develop`, is a warning and a note for the template's status.
    async fn hydrate_nix_profile(&self, vm_id: &VmId, profile: &str) -> String {
        let provider = &self.provider;
        let probe = ExecSpec::argv(["sh", "-c", "command -v nix"]).with_timeout(HEALTH_TIMEOUT);
        let has_nix = matches!(provider.exec(vm_id, probe, None).await, Ok(o) if o.success());
        if !has_nix {
            info!(%vm_id, profile, "nix_profile not hydrated: no nix in the vm");
            return format!(
                "nix_profile {profile:?} not hydrated: nix is not installed in the VM \
                 (install it in the template's base image)"
            );
        }
        // Through the shell, so `nix` is found on the VM's PATH as the probe found it.
        let develop = ExecSpec::argv([
            "sh",
            "-c",
            "exec nix develop \"$0\" --command true",
            profile,
        ])
        .with_timeout(NIX_TIMEOUT);
        match provider.exec(vm_id, develop, None).await {
            Ok(o) if o.success() => {
                info!(%vm_id, profile, "nix profile hydrated");
                format!("nix_profile {profile:?} hydrated")
            }
            Ok(o) => {
                let stderr = String::from_utf8_lossy(&o.stderr);
                let tail: String = stderr.trim().chars().rev().take(300).collect();
                let tail: String = tail.chars().rev().collect();
                warn!(%vm_id, profile, exit_code = o.exit_code, %tail, "nix develop failed");
                format!(
                    "nix_profile {profile:?} not hydrated: nix develop exited {}: {tail}",
                    o.exit_code
                )
            }
            Err(err) => {
                warn!(%vm_id, profile, %err, "nix develop failed");
                format!("nix_profile {profile:?} not hydrated: {err}")
            }
        }
    }

    /// Backs the VM's volume up to `backup_dir` and applies the retention (`backup_vm`; the VM
    /// keeps running). (Called holding the VM's lock.)
    async fn backup_locked(&self, vm_id: &VmId) -> Result<(), WireError> {
        let inner = self;
        let Some(dir) = &inner.config.backup_dir else {
            return Err(WireError::conflict(format!(
                "worker {} has no backup_dir",
                inner.config.worker_id
            )));
        };
        match inner
            .provider
            .get_vm(vm_id)
            .await
            .map_err(|e| wire_error(&e))?
        {
            Some(view) if view.state != VmState::Destroyed => {}
            _ => return Err(WireError::not_found(format!("vm {vm_id} not found"))),
        }
        let path = inner
            .provider
            .backup_vm(vm_id, dir)
            .await
            .map_err(|e| wire_error(&e))?;
        info!(%vm_id, path = %path.display(), "volume backed up");
        inner.prune_backups(dir, path).await;
        Ok(())
    }

    pub(super) async fn destroy_locked(
        &self,
        vm_id: &VmId,
        backup: bool,
        reason: Option<TerminationReason>,
    ) -> Result<(), WireError> {
        let inner = self;
        if backup
            && inner.config.backup_dir.is_some()
            && let Some(view) = inner
                .provider
                .get_vm(vm_id)
                .await
                .map_err(|e| wire_error(&e))?
            && view.state != VmState::Destroyed
        {
            self.backup_locked(vm_id).await?;
        }
        inner
            .provider
            .destroy_vm(vm_id)
            .await
            .map_err(|e| wire_error(&e))?;
        self.unserve(vm_id);
        inner
            .vm_event(vm_id, VmState::Destroyed, None, reason)
            .await;
        Ok(())
    }
}

/// What a running job holds: its VM's lock (taken first, so a job waiting for a busy VM holds no
/// slot) and one of the worker's `job_concurrency` slots. Destroy and rename give the VM's lock
/// back early, before forgetting the old id's lock.
struct Holding<'a> {
    /// The lock of `op.vm_id()`; `None` for jobs on no VM.
    vm_lock: Option<tokio::sync::OwnedMutexGuard<()>>,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

/// How long hydrating a nix profile may take (it may download and build a toolchain).
const NIX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);

pub(super) fn unreachable_query() -> Outcome {
    Err(WireError::internal("queries are answered before locking"))
}

impl RunnerCore {
    /// Applies the backup retention to `dir` after `newest` was written there. A failure is
    /// logged: the backup itself succeeded.
    pub(super) async fn prune_backups(&self, dir: &std::path::Path, newest: std::path::PathBuf) {
        let retention = self.config.backup_retention;
        let dir = dir.to_path_buf();
        let pruned = tokio::task::spawn_blocking(move || {
            crate::backups::prune(&dir, &retention, &newest, std::time::SystemTime::now())
        })
        .await;
        match pruned {
            Ok(Ok(deleted)) => {
                for path in &deleted {
                    info!(path = %path.display(), "old backup deleted (retention)");
                }
                metrics::counter!(m::BACKUPS_PRUNED_TOTAL).increment(deleted.len() as u64);
            }
            Ok(Err(err)) => warn!(%err, "pruning the backup directory failed"),
            Err(err) => warn!(%err, "pruning the backup directory panicked"),
        }
    }
}

/// Records a job's ids on the current (job) span: the VM, the session it serves (a session's VM id
/// is its session id) and the template it is built from, where the job names them.
pub(super) fn record_job(job: &JobRequest) {
    let span = tracing::Span::current();
    span.record("job_id", tracing::field::display(&job.job_id));
    span.record("op", job.op.name());
    if let Some(vm_id) = job.op.vm_id() {
        span.record("vm_id", tracing::field::display(vm_id));
    }
    match &job.op {
        JobOp::CreateVm {
            vm_id,
            session: true,
        } => {
            span.record("session_id", tracing::field::display(vm_id));
        }
        JobOp::CreateVmWithSpec {
            vm_id,
            spec,
            session,
        } => {
            if *session {
                span.record("session_id", tracing::field::display(vm_id));
            }
            if let Some(template) = &spec.template {
                span.record("template", tracing::field::display(template));
            }
        }
        JobOp::RenameVm {
            new_vm_id,
            session: true,
            ..
        } => {
            span.record("session_id", tracing::field::display(new_vm_id));
        }
        _ => {}
    }
}

/// The object a paused-VM job names must be that VM's uploaded state (`paused/<tenant>/<vm>`):
/// a job can never overwrite or read a template snapshot or another VM's state.
fn check_paused_key(vm_id: &VmId, key: &str) -> Result<(), WireError> {
    let ok = key
        .strip_prefix(hearth_messages::PAUSED_OBJECT_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(tenant, vm)| {
            (tenant == "-" || hearth_messages::ids::validate_id("tenant", tenant).is_ok())
                && vm == vm_id.as_str()
        });
    if ok {
        Ok(())
    } else {
        Err(WireError::bad_request(format!(
            "{key:?} is not the paused state of vm {vm_id} (paused/<tenant>/<vm_id>)"
        )))
    }
}
