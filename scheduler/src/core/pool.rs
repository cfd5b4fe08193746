//! Warm pools: the supervisor that keeps each template at its target, restores, template snapshot
//! builds, and templates made from a session's snapshot.

use std::sync::Arc;
use std::time::Duration;

use hearth_messages::{
    Caller, DeleteTemplateRequest, ErrorCode, JobOp, JobOutput, SessionId, SnapshotId,
    SnapshotSessionRequest, Template, TemplateName, VmId, VmSpec, WireError, WorkerId,
};
use tokio::time::Instant;

use super::claim::pool_vm_id;
use super::state::{PoolVm, Restoring, RetiredSnapshot, TemplateEntry};
use super::{Core, store_error, unknown_session};
use crate::metrics as m;
use crate::store::{BuildSpec, PoolRecord, StoreError, TemplateRecord};
use crate::worker_api::{JobError, job};

/// Adds `snapshot` to the record's snapshots to delete (once).
fn retire(rec: &mut TemplateRecord, snapshot: SnapshotId) {
    if rec.template.snapshot_id.as_ref() != Some(&snapshot)
        && !rec.retired_snapshots.contains(&snapshot)
    {
        rec.retired_snapshots.push(snapshot);
    }
}

/// Delete jobs for one retired snapshot: each worker with whether it also unpublishes.
#[derive(Debug)]
struct Deletion {
    template: TemplateName,
    snapshot: SnapshotId,
    targets: Vec<(WorkerId, bool)>,
}

/// A fresh snapshot id for `template`.
fn snapshot_id(template: &TemplateName) -> SnapshotId {
    let short: String = template.as_str().chars().take(100).collect();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    SnapshotId::new(format!("{short}-{}", &rand[..16])).expect("a valid snapshot id")
}

impl Core {
    /// Keeps every pool at its target: woken by claims, finished restores and heartbeats, and
    /// every `reconcile_interval` as a level-triggered backstop.
    pub(crate) async fn pool_supervisor(self: Arc<Self>) {
        loop {
            let next = self.maintain_pools();
            let gc_next = self.collect_snapshots();
            let mut wake_at = Instant::now() + self.cfg.reconcile_interval;
            for t in next.into_iter().chain(gc_next) {
                wake_at = wake_at.min(t);
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.pool_wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// One pass over every template: builds, retirements, restores. Returns the earliest backoff
    /// deadline, when the pass should run again.
    pub(crate) fn maintain_pools(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut soon = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let mut builds = Vec::new();
        let mut restores = Vec::new();
        let mut retire = Vec::new();
        let mut forget = Vec::new();
        {
            let mut st = self.state.lock();
            // The operator's (shared) templates refill first; a tenant's pools stay within its
            // share of the fleet's slots.
            let mut names: Vec<(bool, TemplateName)> = st
                .templates
                .iter()
                .map(|(n, t)| (t.rec.template.tenant.is_some(), n.clone()))
                .collect();
            names.sort();
            let mut tenant_vms = Core::tenant_pool_vms(&st);
            for (_, name) in names {
                let Some(t) = st.templates.get_mut(&name) else {
                    continue;
                };
                if t.reserved {
                    continue;
                }
                if t.rec.template.deleting {
                    let finished = t.rec.retired_snapshots.is_empty() && !t.forgetting;
                    let pool = st.pools.entry(name.clone()).or_default();
                    retire.extend(pool.ready.drain_all());
                    if finished && pool.restoring.is_empty() {
                        if let Some(t) = st.templates.get_mut(&name) {
                            t.forgetting = true;
                        }
                        forget.push(name.clone());
                    }
                    Core::pool_gauges(&st, &name);
                    continue;
                }
                let tenant = t.rec.template.tenant.clone();
                if t.needs_build() && !t.building {
                    match t.build_backoff_until {
                        Some(until) if until > now => soon(until),
                        _ => {
                            t.building = true;
                            builds.push(name.clone());
                        }
                    }
                }
                let building = t.building;
                let Some(snapshot) = t.snapshot().cloned() else {
                    Core::pool_gauges(&st, &name);
                    continue;
                };
                let min_ready = t.rec.template.min_ready as usize;
                let max_ready = t.rec.template.max_ready.max(t.rec.template.min_ready) as usize;
                let pool = st.pools.entry(name.clone()).or_default();

                // Retire VMs of a replaced snapshot, and VMs beyond max_ready (newest first).
                if !pool.ready.all_of(&snapshot) {
                    pool.ready.retain(|e| {
                        let keep = e.rec.snapshot_id == snapshot;
                        if !keep {
                            retire.push(e.clone());
                        }
                        keep
                    });
                }
                while pool.ready.len() + pool.restoring.len() > max_ready {
                    match pool.ready.pop_back() {
                        Some(e) => retire.push(e),
                        None => break,
                    }
                }
                let have = pool.ready.len() + pool.restoring.len();
                if pool.ready.len() < min_ready {
                    pool.below_target_since.get_or_insert(now);
                }
                if building {
                    continue;
                }
                if let Some(until) = pool.backoff_until {
                    if until > now {
                        soon(until);
                        continue;
                    }
                    pool.backoff_until = None;
                }
                let deficit = min_ready.saturating_sub(have);
                let room = max_ready.saturating_sub(have);
                let parallel =
                    (self.cfg.refill_parallelism as usize).saturating_sub(pool.restoring.len());
                let mut wanted = deficit.min(room).min(parallel);
                if let Some(tenant) = &tenant {
                    let share = self.fleet_share(&st, tenant);
                    let held = tenant_vms.entry(tenant.clone()).or_default();
                    wanted = wanted.min(share.saturating_sub(*held));
                    *held += wanted;
                }
                for _ in 0..wanted {
                    let vm_id = pool_vm_id("pool", &name);
                    let Some(worker) = super::claim::pick_worker(&st, Some(&name), &[], now) else {
                        break;
                    };
                    if let Some(w) = st.workers.get_mut(&worker) {
                        w.pending += 1;
                    }
                    st.mark(&worker, &vm_id);
                    st.pools.entry(name.clone()).or_default().restoring.insert(
                        vm_id.clone(),
                        Restoring {
                            worker: worker.clone(),
                            snapshot: snapshot.clone(),
                        },
                    );
                    restores.push((name.clone(), vm_id, worker, snapshot.clone()));
                }
                Core::pool_gauges(&st, &name);
            }
        }
        for e in retire {
            tracing::info!(vm_id = %e.rec.vm_id, template = %e.rec.template, "retiring pooled vm");
            let store = self.store.clone();
            let id = e.rec.vm_id.clone();
            self.spawn(async move {
                let _ = store.delete_pool(&id).await;
            });
            self.destroy_detached(e.rec.worker_id, e.rec.vm_id, None);
        }
        for name in builds {
            let core = self.clone();
            self.spawn(async move { core.build_template(name).await });
        }
        for name in forget {
            let core = self.clone();
            self.spawn(async move { core.forget_template(name).await });
        }
        for (name, vm_id, worker, snapshot) in restores {
            let core = self.clone();
            self.spawn(async move { core.restore_one(name, vm_id, worker, snapshot).await });
        }
        next
    }

    /// One pass of snapshot garbage collection: every retired template snapshot that nothing
    /// uses any more (no ready pool entry, no pool restore, not a template's current snapshot,
    /// and past the grace for cold restores that read it before it was replaced) is deleted on
    /// every live worker and, once, from the object store. Best effort: failures are retried by
    /// later passes (with backoff); when every live worker and the object store confirmed, the
    /// snapshot leaves the template record. Returns when the next pass is due.
    pub(crate) fn collect_snapshots(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        // A cold claim restores the snapshot it read for at most its wait (claim_wait by default),
        // each attempt at most a restore timeout.
        let grace = self.cfg.jobs.restore + self.cfg.claim_wait;
        let mut next: Option<Instant> = None;
        let mut deletions = Vec::new();
        let mut finished = Vec::new();
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let workers: Vec<WorkerId> = st
                .workers
                .keys()
                .filter(|id| st.worker_usable(id))
                .cloned()
                .collect();
            let in_use: std::collections::HashSet<&SnapshotId> = st
                .pools
                .values()
                .flat_map(|p| {
                    p.ready
                        .snapshots()
                        .chain(p.restoring.values().map(|r| &r.snapshot))
                })
                .chain(st.templates.values().filter_map(|t| t.snapshot()))
                .collect();
            let mut blocked = Vec::new();
            for t in st.templates.values() {
                for snap in &t.rec.retired_snapshots {
                    if in_use.contains(snap) {
                        blocked.push(snap.clone());
                    }
                }
            }
            for (name, t) in st.templates.iter_mut() {
                let retired = &t.rec.retired_snapshots;
                t.gc.retain(|snap, _| retired.contains(snap));
                for snap in retired {
                    let gc =
                        t.gc.entry(snap.clone())
                            .or_insert_with(|| RetiredSnapshot::new(now + grace));
                    if gc.running || blocked.contains(snap) {
                        continue;
                    }
                    if gc.not_before > now {
                        next = Some(next.map_or(gc.not_before, |n| n.min(gc.not_before)));
                        continue;
                    }
                    let pending: Vec<&WorkerId> = workers
                        .iter()
                        .filter(|w| !gc.deleted_on.contains(*w))
                        .collect();
                    if gc.unpublished && pending.is_empty() {
                        gc.running = true;
                        finished.push((name.clone(), snap.clone()));
                        continue;
                    }
                    // Unpublished once, by the first worker asked (any live one if all are done).
                    let unpublisher: Option<&WorkerId> = if gc.unpublished {
                        None
                    } else {
                        pending.first().copied().or(workers.first())
                    };
                    let mut targets: Vec<(WorkerId, bool)> = pending
                        .iter()
                        .map(|w| ((*w).clone(), Some(*w) == unpublisher))
                        .collect();
                    if let Some(w) = unpublisher
                        && !pending.contains(&w)
                    {
                        targets.push((w.clone(), true));
                    }
                    if targets.is_empty() {
                        continue; // no live worker to act through
                    }
                    gc.running = true;
                    deletions.push(Deletion {
                        template: name.clone(),
                        snapshot: snap.clone(),
                        targets,
                    });
                }
            }
        }
        for deletion in deletions {
            let core = self.clone();
            self.spawn(async move { core.delete_retired(deletion).await });
        }
        for (template, snapshot) in finished {
            let core = self.clone();
            self.spawn(async move { core.forget_retired(template, snapshot).await });
        }
        next
    }

    /// Sends one round of delete jobs for a retired snapshot and records who confirmed.
    async fn delete_retired(self: Arc<Self>, deletion: Deletion) {
        let Deletion {
            template,
            snapshot,
            targets,
        } = deletion;
        let results = futures::future::join_all(targets.iter().map(|(worker, unpublish)| {
            let op = JobOp::DeleteSnapshot {
                snapshot_id: snapshot.clone(),
                unpublish: *unpublish,
            };
            self.api.job(worker, job(op), self.cfg.jobs.lifecycle)
        }))
        .await;
        let mut st = self.state.lock();
        let Some(gc) = st
            .templates
            .get_mut(&template)
            .and_then(|t| t.gc.get_mut(&snapshot))
        else {
            return;
        };
        gc.running = false;
        let mut failed = false;
        for ((worker, unpublish), result) in targets.iter().zip(results) {
            match result {
                Ok(_) => {
                    gc.deleted_on.insert(worker.clone());
                    gc.unpublished |= *unpublish;
                }
                Err(err) => {
                    failed = true;
                    tracing::warn!(snapshot_id = %snapshot, worker_id = %worker, error = %err,
                        "deleting a retired snapshot failed; will retry");
                }
            }
        }
        if failed {
            gc.attempts += 1;
            let backoff = self
                .cfg
                .reconcile_interval
                .saturating_mul(1 << gc.attempts.min(6))
                .min(Duration::from_secs(300));
            gc.not_before = Instant::now() + backoff;
        } else {
            gc.attempts = 0;
            drop(st);
            // The next pass sees it done and forgets it.
            self.pool_wake.notify_one();
        }
    }

    /// Removes a snapshot that is deleted everywhere from its template record.
    async fn forget_retired(self: Arc<Self>, template: TemplateName, snapshot: SnapshotId) {
        let _writes = self.template_writes.lock().await;
        let rec = self.state.lock().templates.get(&template).map(|t| {
            let mut rec = t.rec.clone();
            rec.retired_snapshots.retain(|s| s != &snapshot);
            rec
        });
        let Some(rec) = rec else {
            return;
        };
        let written = self.store.put_template(&rec).await;
        let mut st = self.state.lock();
        let Some(t) = st.templates.get_mut(&template) else {
            return;
        };
        match written {
            Ok(()) => {
                t.rec.retired_snapshots.retain(|s| s != &snapshot);
                t.gc.remove(&snapshot);
                tracing::info!(template = %template, snapshot_id = %snapshot,
                    "replaced template snapshot deleted from every worker and the object store");
            }
            Err(err) => {
                tracing::warn!(template = %template, error = %err, "recording a deleted snapshot failed; will retry");
                if let Some(gc) = t.gc.get_mut(&snapshot) {
                    gc.running = false;
                    gc.not_before = Instant::now() + self.cfg.reconcile_interval;
                }
            }
        }
    }

    /// Restores one pooled VM; it enters the ready list once its worker replied (health-checked)
    /// and its pool record is written.
    async fn restore_one(
        self: Arc<Self>,
        template: TemplateName,
        vm_id: VmId,
        worker: WorkerId,
        snapshot: SnapshotId,
    ) {
        let started = Instant::now();
        let outcome = match self.restore_spec(&template, &snapshot) {
            Some(spec) => {
                let create = job(JobOp::CreateVmWithSpec {
                    vm_id: vm_id.clone(),
                    spec,
                    session: false,
                });
                self.api.job(&worker, create, self.cfg.jobs.restore).await
            }
            None => Err(JobError::BadReply("template vanished".into())),
        };
        self.release_worker(&worker, outcome.is_ok().then_some(&vm_id));
        let ok = match outcome {
            Ok(JobOutput::Vm { .. }) => true,
            Ok(other) => {
                tracing::warn!(vm_id = %vm_id, "restore answered {other:?}");
                false
            }
            Err(err) => {
                tracing::warn!(template = %template, vm_id = %vm_id, worker_id = %worker,
                    error = %err, "restoring a pooled vm failed");
                self.note_restore_failure(&template, &worker, &err);
                false
            }
        };
        if !ok {
            let mut st = self.state.lock();
            if let Some(p) = st.pools.get_mut(&template) {
                p.restoring.remove(&vm_id);
            }
            st.unmark(&worker, &vm_id);
            Core::pool_gauges(&st, &template);
            drop(st);
            self.pool_wake.notify_one();
            return;
        }
        metrics::histogram!(m::RESTORE_DURATION_SECONDS, "template" => template.to_string())
            .record(started.elapsed().as_secs_f64());

        let rec = PoolRecord {
            vm_id: vm_id.clone(),
            template: template.clone(),
            worker_id: worker.clone(),
            snapshot_id: snapshot.clone(),
            created_ms: self.clock.now_ms(),
        };
        let wanted = {
            let st = self.state.lock();
            st.worker_usable(&worker)
                && st
                    .templates
                    .get(&template)
                    .is_some_and(|t| t.snapshot() == Some(&snapshot))
        };
        let stored = if wanted {
            self.store.put_pool(&rec).await
        } else {
            Err(StoreError::Unavailable("no longer wanted".into()))
        };
        let mut st = self.state.lock();
        if let Some(p) = st.pools.get_mut(&template) {
            p.restoring.remove(&vm_id);
        }
        match stored {
            Ok(()) => {
                let min_ready =
                    st.templates
                        .get(&template)
                        .map_or(0, |t| t.rec.template.min_ready) as usize;
                let pool = st.pools.entry(template.clone()).or_default();
                pool.ready.push_back(PoolVm {
                    rec,
                    missing_since: None,
                });
                pool.failures = 0;
                if pool.ready.len() >= min_ready
                    && let Some(since) = pool.below_target_since.take()
                {
                    metrics::histogram!(m::REFILL_DURATION_SECONDS, "template" => template.to_string())
                        .record(since.elapsed().as_secs_f64());
                }
                st.unmark(&worker, &vm_id);
                Core::pool_gauges(&st, &template);
                tracing::debug!(vm_id = %vm_id, worker_id = %worker, template = %template, "pooled vm ready");
            }
            Err(err) => {
                st.unmark(&worker, &vm_id);
                Core::pool_gauges(&st, &template);
                drop(st);
                tracing::info!(vm_id = %vm_id, error = %err, "discarding a restored vm");
                self.destroy_detached(worker, vm_id, None);
            }
        }
        self.pool_wake.notify_one();
    }

    /// Builds a config template's snapshot: cold-create (with bootstrap) on the least-loaded
    /// worker, snapshot with publish, destroy the build VM, record the template.
    async fn build_template(self: Arc<Self>, name: TemplateName) {
        let spec = {
            let st = self.state.lock();
            st.templates.get(&name).and_then(|t| {
                t.config.as_ref().map(|c| {
                    (
                        VmSpec {
                            template: Some(name.clone()),
                            vcpus: Some(c.vcpus),
                            memory_mib: Some(c.memory_mib),
                            disk_mib: Some(c.disk_mib),
                            max_processes: Some(c.max_processes),
                            network: Some(c.network.clone()),
                            env: c.env.clone(),
                            base: c.base.clone(),
                            bootstrap: c.bootstrap.clone(),
                            restore_from: None,
                            nix_profile: c.nix_profile.clone(),
                        },
                        BuildSpec {
                            base: c.base.clone(),
                            bootstrap: c.bootstrap.clone(),
                            nix_profile: c.nix_profile.clone(),
                        },
                    )
                })
            })
        };
        let Some((spec, build)) = spec else {
            self.finish_build(&name, Err("template is not configured".into()));
            return;
        };
        let vm_id = pool_vm_id("tmpl", &name);
        let Some(worker) = self.reserve_worker(None, &[], &vm_id) else {
            // No worker yet: retry soon, without counting a failure.
            let mut st = self.state.lock();
            if let Some(t) = st.templates.get_mut(&name) {
                t.building = false;
                t.build_backoff_until = Some(Instant::now() + Duration::from_millis(500));
            }
            return;
        };
        tracing::info!(template = %name, worker_id = %worker, vm_id = %vm_id, "building template snapshot");
        let create = job(JobOp::CreateVmWithSpec {
            vm_id: vm_id.clone(),
            spec,
            session: false,
        });
        let created = self.api.job(&worker, create, self.cfg.jobs.build).await;
        self.release_worker(&worker, created.is_ok().then_some(&vm_id));
        // The snapshot id once the snapshot job was sent: it may exist even if the build fails.
        let mut taken = None;
        // What the worker noted about the build VM (e.g. its nix profile), for the template.
        let notes = match &created {
            Ok(JobOutput::Vm { vm }) => vm.notes.clone(),
            _ => Vec::new(),
        };
        let result: Result<SnapshotId, String> = match created {
            Ok(_) => {
                let snap = snapshot_id(&name);
                taken = Some(snap.clone());
                let op = JobOp::SnapshotVm {
                    vm_id: vm_id.clone(),
                    snapshot_id: snap.clone(),
                    publish: true,
                };
                let taken = self.api.job(&worker, job(op), self.cfg.jobs.snapshot).await;
                let destroy = JobOp::DestroyVm {
                    vm_id: vm_id.clone(),
                    backup: false,
                    reason: None,
                };
                match self
                    .api
                    .job(&worker, job(destroy), self.cfg.jobs.lifecycle)
                    .await
                {
                    Ok(_) => self.credit_destroyed(&worker, &vm_id),
                    Err(e) => {
                        tracing::warn!(vm_id = %vm_id, error = %e, "destroying the template build vm failed")
                    }
                }
                match taken {
                    Ok(JobOutput::Snapshot { .. }) => Ok(snap),
                    Ok(other) => Err(format!("snapshot answered {other:?}")),
                    Err(e) => Err(format!("snapshot: {e}")),
                }
            }
            Err(e) => Err(format!("create: {e}")),
        };
        self.state.lock().unmark(&worker, &vm_id);
        // Read, change and write the record (and apply it) without a snapshot GC write between.
        let _writes = self.template_writes.lock().await;
        let result = match result {
            Ok(snap) => {
                let rec = {
                    let st = self.state.lock();
                    st.templates.get(&name).map(|t| {
                        let mut rec = t.rec.clone();
                        // The replaced snapshot is retired in the same write that replaces it.
                        if let Some(old) = rec.template.snapshot_id.replace(snap.clone()) {
                            retire(&mut rec, old);
                        }
                        rec.template.created_ms = self.clock.now_ms();
                        rec.template.notes = notes.clone();
                        rec.build = Some(build.clone());
                        rec
                    })
                };
                match rec {
                    Some(rec) => match self.store.put_template(&rec).await {
                        Ok(()) => Ok(rec),
                        Err(e) => Err(format!("recording: {e}")),
                    },
                    None => Err("template vanished".into()),
                }
            }
            Err(e) => Err(e),
        };
        if result.is_err()
            && let Some(snap) = taken
        {
            // A snapshot that may exist but is not the template's: collect it like a replaced
            // one (durable with the template's next write; deleting a missing one is harmless).
            if let Some(t) = self.state.lock().templates.get_mut(&name) {
                retire(&mut t.rec, snap);
            }
        }
        self.finish_build(&name, result);
    }

    fn finish_build(&self, name: &TemplateName, result: Result<TemplateRecord, String>) {
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(m::TEMPLATE_BUILDS_TOTAL, "template" => name.to_string(), "result" => label)
            .increment(1);
        {
            let mut st = self.state.lock();
            let Some(t) = st.templates.get_mut(name) else {
                return;
            };
            t.building = false;
            match result {
                Ok(rec) => {
                    tracing::info!(template = %name, snapshot_id = ?rec.template.snapshot_id, "template snapshot ready");
                    t.rec = rec;
                    t.needs_rebuild = false;
                    t.build_failures = 0;
                    t.build_backoff_until = None;
                    let pool = st.pools.entry(name.clone()).or_default();
                    pool.failures = 0;
                    pool.backoff_until = None;
                }
                Err(err) => {
                    t.build_failures += 1;
                    let backoff = Duration::from_secs(1)
                        .saturating_mul(1 << t.build_failures.min(6))
                        .min(Duration::from_secs(60));
                    t.build_backoff_until = Some(Instant::now() + backoff);
                    tracing::error!(template = %name, error = %err, failures = t.build_failures,
                        "building the template snapshot failed");
                }
            }
        }
        self.templates_changed.send_modify(|v| *v += 1);
        self.pool_wake.notify_one();
    }

    /// `sessions.<sid>.snapshot`: a new template from the session's VM, claimable on any worker.
    pub(crate) async fn snapshot_session(
        self: Arc<Self>,
        sid: &SessionId,
        req: SnapshotSessionRequest,
    ) -> Result<Template, WireError> {
        let slot = self.slot(sid).ok_or_else(|| unknown_session(sid))?;
        let name = req.template.clone();
        let (min_ready, max_ready) = req.validate(self.cfg.tenants.max_ready_cap)?;
        // Reserve the name.
        let source = {
            let mut st = self.state.lock();
            if st.templates.contains_key(&name) {
                return Err(WireError::conflict(format!(
                    "template {name} already exists"
                )));
            }
            let session = slot.view();
            // The template holds the session's data: it belongs to the session's tenant, whoever
            // asked (the operator may snapshot a tenant's session; it stays that tenant's).
            if let Some(tenant) = &session.tenant {
                self.admit_template(&mut st, tenant, max_ready)?;
            }
            let source = st.templates.get(&session.template).map(|t| t.rec.clone());
            let rec = TemplateRecord {
                template: Template {
                    name: name.clone(),
                    snapshot_id: None,
                    source_session: Some(sid.clone()),
                    tenant: session.tenant.clone(),
                    snapshot_bytes: 0,
                    deleting: false,
                    notes: Vec::new(),
                    min_ready,
                    max_ready,
                    vcpus: source.as_ref().map_or(0, |s| s.template.vcpus),
                    memory_mib: source.as_ref().map_or(0, |s| s.template.memory_mib),
                    disk_mib: source.as_ref().map_or(0, |s| s.template.disk_mib),
                    max_processes: source.as_ref().map_or(0, |s| s.template.max_processes),
                    network: source.as_ref().and_then(|s| s.template.network.clone()),
                    created_ms: self.clock.now_ms(),
                },
                env: source.map(|s| s.env).unwrap_or_default(),
                build: None,
                retired_snapshots: Vec::new(),
            };
            let mut entry = TemplateEntry::new(rec.clone(), None);
            entry.reserved = true;
            st.templates.insert(name.clone(), entry);
            rec
        };
        let result = self.clone().take_snapshot(&slot, source).await;
        let mut st = self.state.lock();
        match result {
            Ok(rec) => {
                if let Some(t) = st.templates.get_mut(&name) {
                    t.rec = rec.clone();
                    t.reserved = false;
                }
                Core::pool_gauges(&st, &name);
                drop(st);
                self.templates_changed.send_modify(|v| *v += 1);
                self.pool_wake.notify_one();
                tracing::info!(session_id = %sid, template = %name, "session snapshot recorded as a template");
                Ok(rec.template)
            }
            Err(e) => {
                st.templates.remove(&name);
                Err(e)
            }
        }
    }

    /// `templates.<name>.delete`: marks the template `deleting` (no longer claimable), retires
    /// its snapshot and empties its pool; the pool supervisor destroys the pooled VMs, the snapshot
    /// GC deletes the snapshots on every worker and in the object store, and the record goes
    /// once both are done (a restarted scheduler carries on from the record).
    pub(crate) async fn delete_template(
        self: Arc<Self>,
        caller: &Caller,
        name: &TemplateName,
        req: DeleteTemplateRequest,
    ) -> Result<Template, WireError> {
        let unknown = || WireError::not_found(format!("unknown template {name}"));
        let _writes = self.template_writes.lock().await;
        let users: Vec<SessionId> = {
            let st = self.state.lock();
            let t = st
                .templates
                .get(name)
                .filter(|t| !t.reserved)
                .ok_or_else(unknown)?;
            let owner = t.rec.template.tenant.as_ref();
            if !caller.owns(owner) {
                return Err(if caller.may_use_template(owner) {
                    WireError::conflict(format!(
                        "template {name} is the operator's; only the operator may delete it"
                    ))
                } else {
                    unknown()
                });
            }
            if t.rec.template.deleting {
                return Ok(t.rec.template.clone());
            }
            if t.config.is_some() {
                return Err(WireError::conflict(format!(
                    "template {name} is defined in the scheduler config; remove it there"
                )));
            }
            st.sessions
                .values()
                .filter_map(|s| {
                    let d = s.data.lock();
                    (d.is_live() && &d.rec.session.template == name)
                        .then(|| d.rec.session.session_id.clone())
                })
                .collect()
        };
        if !users.is_empty() {
            if !req.force {
                return Err(WireError::conflict(format!(
                    "{} live sessions were created from template {name}; release them or delete with force",
                    users.len()
                )));
            }
            for sid in &users {
                self.release(sid).await?;
            }
        }
        self.check_leader().map_err(store_error)?;
        let rec = {
            let st = self.state.lock();
            let Some(t) = st.templates.get(name) else {
                return Err(unknown());
            };
            let mut rec = t.rec.clone();
            rec.template.deleting = true;
            rec.template.min_ready = 0;
            rec.template.max_ready = 0;
            if let Some(snap) = rec.template.snapshot_id.take() {
                retire(&mut rec, snap);
            }
            rec
        };
        self.store.put_template(&rec).await.map_err(store_error)?;
        {
            let mut st = self.state.lock();
            if let Some(t) = st.templates.get_mut(name) {
                t.rec = rec.clone();
            }
        }
        tracing::info!(template = %name, caller = %caller, released = users.len(), "deleting template");
        self.templates_changed.send_modify(|v| *v += 1);
        self.pool_wake.notify_one();
        Ok(rec.template)
    }

    /// Removes a deleted template whose pool and snapshots are gone.
    async fn forget_template(self: Arc<Self>, name: TemplateName) {
        let _writes = self.template_writes.lock().await;
        let done = self
            .state
            .lock()
            .templates
            .get(&name)
            .is_some_and(|t| t.rec.template.deleting && t.rec.retired_snapshots.is_empty());
        if !done {
            return;
        }
        match self.store.delete_template(&name).await {
            Ok(()) => {
                let mut st = self.state.lock();
                st.templates.remove(&name);
                st.pools.remove(&name);
                tracing::info!(template = %name, "template deleted");
            }
            Err(err) => {
                tracing::warn!(template = %name, error = %err, "forgetting a deleted template failed; will retry");
                if let Some(t) = self.state.lock().templates.get_mut(&name) {
                    t.forgetting = false;
                }
            }
        }
    }

    async fn take_snapshot(
        self: Arc<Self>,
        slot: &Arc<super::state::SessionSlot>,
        mut rec: TemplateRecord,
    ) -> Result<TemplateRecord, WireError> {
        let _guard = slot.op.lock().await;
        let session = slot.view();
        if session.state.is_terminal() {
            return Err(WireError::conflict(format!(
                "session {} has ended",
                session.session_id
            )));
        }
        if !self.state.lock().worker_live(&session.worker_id) {
            return Err(WireError::no_capacity(
                format!(
                    "worker {} of the session is not available",
                    session.worker_id
                ),
                self.retry_after_ms(),
            ));
        }
        let snap = snapshot_id(&rec.template.name);
        let op = JobOp::SnapshotVm {
            vm_id: session.session_id.clone().into(),
            snapshot_id: snap.clone(),
            publish: true,
        };
        let size = match self
            .api
            .job(&session.worker_id, job(op), self.cfg.jobs.snapshot)
            .await
        {
            Ok(JobOutput::Snapshot { snapshot }) => snapshot.size_bytes,
            Ok(other) => {
                return Err(WireError::internal(format!("snapshot answered {other:?}")));
            }
            Err(JobError::Failed(e)) => {
                return Err(match e.code {
                    ErrorCode::NotFound | ErrorCode::Conflict => WireError::conflict(format!(
                        "the session's vm cannot be snapshotted: {}",
                        e.message
                    )),
                    _ => e,
                });
            }
            Err(JobError::Timeout) => {
                return Err(WireError::deadline("the snapshot did not finish in time"));
            }
            Err(e) => {
                return Err(WireError::no_capacity(e.to_string(), self.retry_after_ms()));
            }
        };
        if let Some(tenant) = &rec.template.tenant {
            let over = {
                let mut st = self.state.lock();
                let usage = self.usage(&mut st, tenant);
                (usage.snapshot_bytes.saturating_add(size) > usage.quota.max_snapshot_bytes).then(
                    || {
                        self.snapshot_bytes_exceeded(
                            tenant,
                            usage.snapshot_bytes,
                            size,
                            &usage.quota,
                        )
                    },
                )
            };
            if let Some(err) = over {
                // Undone before answering: the snapshot leaves the worker and the object store.
                let op = JobOp::DeleteSnapshot {
                    snapshot_id: snap.clone(),
                    unpublish: true,
                };
                if let Err(e) = self
                    .api
                    .job(&session.worker_id, job(op), self.cfg.jobs.lifecycle)
                    .await
                {
                    tracing::warn!(snapshot_id = %snap, error = %e,
                        "deleting an over-quota snapshot failed; it is unreferenced");
                }
                return Err(err);
            }
        }
        rec.template.snapshot_id = Some(snap);
        rec.template.snapshot_bytes = size;
        rec.template.created_ms = self.clock.now_ms();
        self.store
            .create_template(&rec)
            .await
            .map_err(|e| match e {
                StoreError::Conflict { .. } => {
                    WireError::conflict(format!("template {} already exists", rec.template.name))
                }
                other => store_error(other),
            })?;
        Ok(rec)
    }
}
