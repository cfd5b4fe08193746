//! Test support for the scheduler's logic tests: an in-process fleet of workers — each the
//! worker's real job runner ([`JobRunner`]: capacity with eviction, health exec before a create
//! answers, publish to and fetch from a shared object store, backup before destroy, job-id dedupe)
//! over the real fake provider, without NATS — plus fault injection, heartbeats on the fleet's
//! clock, and a harness around the core with paused time.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hearth_messages::{
    JobId, JobOp, JobOutput, JobRequest, SessionEvent, SnapshotId, TemplateName, VmId, VmInfo,
    VmState, WireError, WorkerId, WorkerStatus,
};
use hearth_scheduler::clock::Clock;
use hearth_scheduler::config::SchedulerConfig;
use hearth_scheduler::store::{MemKv, Store};
use hearth_scheduler::worker_api::{EventSink, JobError, WorkerApi};
use hearth_scheduler::{Scheduler, TemplateConfig};
use hearth_worker::provider::{ExecSpec, FakeConfig, FakeProvider, VmProvider, VmQuery};
use hearth_worker::{JobRunner, MemoryHost, MemoryObjects, MemoryStore, WorkerConfig};
use parking_lot::Mutex;

pub fn wid(s: &str) -> WorkerId {
    WorkerId::new(s).unwrap()
}

pub fn tname(s: &str) -> TemplateName {
    TemplateName::new(s).unwrap()
}

fn wire(e: hearth_worker::provider::ProviderError) -> WireError {
    hearth_worker::wire_error(&e)
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    created_ms: u64,
    activity_ms: u64,
    session: bool,
}

/// One in-process worker.
#[derive(Debug)]
pub struct FleetWorker {
    pub id: WorkerId,
    pub provider: Arc<FakeProvider>,
    /// Capacity as heartbeats report it; the runner enforces the value given to `add`.
    pub max_vms: AtomicU32,
    /// No heartbeats, jobs unreachable (a crashed host).
    pub down: AtomicBool,
    /// No heartbeats, but jobs still answer (late or lost heartbeats).
    pub mute: AtomicBool,
    /// Jobs never answer (a wedged worker).
    pub hang: AtomicBool,
    /// Creates are refused with 503 although heartbeats show free slots.
    pub refuse: AtomicBool,
    pub draining: AtomicBool,
    /// `delete_snapshot` jobs fail (500).
    pub fail_deletes: AtomicBool,
    /// VMs reported busy (a command holds them) in heartbeats.
    busy: Mutex<HashSet<VmId>>,
    started_ms: AtomicU64,
    pub seq: AtomicU64,
    meta: Mutex<HashMap<VmId, Meta>>,
    done: Mutex<HashMap<JobId, Result<JobOutput, WireError>>>,
    /// Every job op that ran, in order.
    pub log: Mutex<Vec<JobOp>>,
    /// VMs backed up (before a destroy, or by `backup_vm`).
    pub backups: Mutex<Vec<VmId>>,
    /// The worker's own job runner over `provider` (capacity, eviction, health check, snapshot
    /// store, dedupe): the jobs run as on a real worker, without NATS.
    runner: JobRunner,
    /// The runner's data dir (its session journal).
    _dir: tempfile::TempDir,
}

impl FleetWorker {
    fn new(id: &str, max_vms: u32, config: FakeConfig, fleet: &Fleet) -> Self {
        let provider = Arc::new(FakeProvider::with_config(config));
        let dir = tempfile::tempdir().unwrap();
        let mut worker_config = WorkerConfig::new(wid(id), dir.path());
        worker_config.max_vms = max_vms;
        worker_config.backup_dir = Some(fleet.backup_dir.path().to_path_buf());
        // The fleet's shared object store; VM events and data planes are not modelled (tests
        // call `on_vm_event` themselves).
        let mut host = MemoryHost::with_store(fleet.objects.clone());
        host.paused = fleet.paused.clone();
        let host = Arc::new(host);
        let runner = JobRunner::new(worker_config, provider.clone(), host).unwrap();
        let now = fleet.clock.now_ms();
        Self {
            id: wid(id),
            provider,
            runner,
            _dir: dir,
            max_vms: AtomicU32::new(max_vms),
            down: AtomicBool::new(false),
            mute: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            fail_deletes: AtomicBool::new(false),
            busy: Mutex::new(HashSet::new()),
            started_ms: AtomicU64::new(now),
            seq: AtomicU64::new(0),
            meta: Mutex::new(HashMap::new()),
            done: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            backups: Mutex::new(Vec::new()),
        }
    }

    /// VMs that are not destroyed, by id.
    pub async fn vms(&self) -> BTreeMap<VmId, VmState> {
        self.provider
            .list_vms()
            .await
            .unwrap()
            .into_iter()
            .filter(|v| v.state != hearth_worker::provider::VmState::Destroyed)
            .map(|v| {
                let state = match v.state {
                    hearth_worker::provider::VmState::Running => VmState::Running,
                    hearth_worker::provider::VmState::Stopped => VmState::Stopped,
                    hearth_worker::provider::VmState::Paused => VmState::Paused,
                    hearth_worker::provider::VmState::Destroyed => VmState::Destroyed,
                };
                (v.vm_id, state)
            })
            .collect()
    }

    pub async fn has_vm(&self, vm: &str) -> bool {
        self.vms().await.contains_key(&VmId::new(vm).unwrap())
    }

    pub fn ops(&self, name: &str) -> Vec<JobOp> {
        self.log
            .lock()
            .iter()
            .filter(|op| op.name() == name)
            .cloned()
            .collect()
    }

    async fn info(&self, vm_id: &VmId) -> Option<VmInfo> {
        let view = self.provider.get_vm(vm_id).await.ok()??;
        let meta = self.meta.lock().get(vm_id).copied().unwrap_or(Meta {
            created_ms: 0,
            activity_ms: 0,
            session: false,
        });
        Some(VmInfo {
            vm_id: view.vm_id,
            state: match view.state {
                hearth_worker::provider::VmState::Running => VmState::Running,
                hearth_worker::provider::VmState::Stopped => VmState::Stopped,
                hearth_worker::provider::VmState::Paused => VmState::Paused,
                hearth_worker::provider::VmState::Destroyed => VmState::Destroyed,
            },
            template: view.template,
            session: meta.session,
            created_ms: meta.created_ms,
            last_activity_ms: meta.activity_ms,
            restored_from: view.restored_from,
            busy: self.busy.lock().contains(vm_id),
            notes: Vec::new(),
        })
    }

    /// Reports `vm` busy (a long command holds it) or not, without touching its activity stamp.
    pub fn set_busy(&self, vm: &str, busy: bool) {
        let id = VmId::new(vm).unwrap();
        let mut set = self.busy.lock();
        if busy {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    /// Whether the worker holds the snapshot locally.
    pub async fn has_snapshot(&self, snapshot: &SnapshotId) -> bool {
        self.provider
            .get_snapshot(snapshot)
            .await
            .unwrap()
            .is_some()
    }

    fn touch(&self, vm_id: &VmId, now: u64) {
        if let Some(m) = self.meta.lock().get_mut(vm_id) {
            m.activity_ms = now;
        }
    }

    /// A heartbeat, as the worker would publish it.
    pub async fn status(&self, now: u64) -> WorkerStatus {
        let mut vms = Vec::new();
        for id in self.vms().await.keys() {
            if let Some(info) = self.info(id).await {
                vms.push(info);
            }
        }
        WorkerStatus {
            worker_id: self.id.clone(),
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            at_ms: now,
            started_ms: self.started_ms.load(Ordering::SeqCst),
            provider: "fake".into(),
            max_vms: self.max_vms.load(Ordering::SeqCst),
            used_vms: vms.len() as u32,
            draining: self.draining.load(Ordering::SeqCst),
            jobs_in_flight: 0,
            execs_in_flight: 0,
            // As a worker's heartbeat: a digest and the changes, pages on request.
            inventory: Some(self.runner.observe_inventory(vms)),
            vms: Vec::new(),
            versions: Default::default(),
            isolation: self.provider.isolation(),
        }
    }

    /// Runs `job` with the worker's real job runner, then keeps this fleet's bookkeeping: VM
    /// times on the fleet's (paused) clock, which VMs are sessions, backups taken.
    async fn run(&self, fleet: &Fleet, job: JobRequest) -> Result<JobOutput, WireError> {
        let now = fleet.clock.now_ms();
        if self.fail_deletes.load(Ordering::SeqCst)
            && matches!(job.op, JobOp::DeleteSnapshot { .. })
        {
            return Err(WireError::internal("delete failed (test)"));
        }
        let op = job.op.clone();
        let output = self.runner.run(job).await?.output;
        match &op {
            JobOp::CreateVm { vm_id, session } | JobOp::CreateVmWithSpec { vm_id, session, .. } => {
                self.meta.lock().insert(
                    vm_id.clone(),
                    Meta {
                        created_ms: now,
                        activity_ms: now,
                        session: *session,
                    },
                );
            }
            JobOp::StartVm { vm_id } | JobOp::StopVm { vm_id } => self.touch(vm_id, now),
            JobOp::RestorePausedVm { vm_id, .. } => {
                self.meta.lock().insert(
                    vm_id.clone(),
                    Meta {
                        created_ms: now,
                        activity_ms: now,
                        session: true,
                    },
                );
            }
            JobOp::RenameVm {
                vm_id,
                new_vm_id,
                session,
            } => {
                let mut meta = self.meta.lock();
                let mut m = meta.remove(vm_id).unwrap_or(Meta {
                    created_ms: now,
                    activity_ms: now,
                    session: *session,
                });
                m.activity_ms = now;
                m.session = *session;
                meta.insert(new_vm_id.clone(), m);
            }
            JobOp::DestroyVm { vm_id, backup, .. } => {
                if *backup {
                    self.backups.lock().push(vm_id.clone());
                }
                self.meta.lock().remove(vm_id);
            }
            JobOp::BackupVm { vm_id } => self.backups.lock().push(vm_id.clone()),
            _ => {}
        }
        // VM replies carry this fleet's clock, as its heartbeats do (the runner's provider stamps
        // wall-clock time, which does not move under paused time).
        Ok(match output {
            JobOutput::Vm { vm } => {
                let mut info = self.info(&vm.vm_id).await.unwrap_or(vm.clone());
                info.notes = vm.notes;
                JobOutput::Vm { vm: info }
            }
            JobOutput::Vms { vms } => {
                let mut out = Vec::with_capacity(vms.len());
                for vm in vms {
                    out.push(self.info(&vm.vm_id).await.unwrap_or(vm));
                }
                JobOutput::Vms { vms: out }
            }
            other => other,
        })
    }
}

/// The in-process fleet: workers plus the shared snapshot object store.
#[derive(Debug)]
pub struct Fleet {
    pub workers: Mutex<BTreeMap<WorkerId, Arc<FleetWorker>>>,
    /// The fleet's object store: published snapshots.
    pub objects: MemoryStore,
    /// The same store's uploaded paused VMs, by object name.
    pub paused: MemoryObjects,
    pub clock: Clock,
    backup_dir: tempfile::TempDir,
}

impl Fleet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            workers: Mutex::new(BTreeMap::new()),
            objects: MemoryStore::default(),
            paused: MemoryObjects::default(),
            clock: Clock::new(),
            backup_dir: tempfile::tempdir().unwrap(),
        })
    }

    pub fn add(&self, id: &str, max_vms: u32) -> Arc<FleetWorker> {
        self.add_with(id, max_vms, FakeConfig::default())
    }

    pub fn add_with(&self, id: &str, max_vms: u32, config: FakeConfig) -> Arc<FleetWorker> {
        let w = Arc::new(FleetWorker::new(id, max_vms, config, self));
        self.workers.lock().insert(w.id.clone(), w.clone());
        w
    }

    pub fn worker(&self, id: &str) -> Arc<FleetWorker> {
        self.workers.lock()[&wid(id)].clone()
    }

    pub fn all(&self) -> Vec<Arc<FleetWorker>> {
        self.workers.lock().values().cloned().collect()
    }

    /// Where the VM `vm` lives (not destroyed), if anywhere.
    pub async fn locate(&self, vm: &str) -> Vec<WorkerId> {
        let mut out = Vec::new();
        for w in self.all() {
            if w.has_vm(vm).await {
                out.push(w.id.clone());
            }
        }
        out
    }

    /// An exec in a session's VM, as the data plane would run it (a stopped VM is resumed).
    pub async fn exec(&self, worker: &str, vm: &str) {
        let w = self.worker(worker);
        let id = VmId::new(vm).unwrap();
        if matches!(
            w.vms().await.get(&id),
            Some(&VmState::Stopped | &VmState::Paused)
        ) {
            w.provider.start_vm(&id).await.unwrap();
        }
        w.provider
            .exec(&id, ExecSpec::argv(["true"]), None)
            .await
            .unwrap();
        w.touch(&id, self.clock.now_ms());
    }

    /// Every job op that ran on any worker with this name.
    pub fn ops(&self, name: &str) -> Vec<(WorkerId, JobOp)> {
        let mut out = Vec::new();
        for w in self.all() {
            for op in w.ops(name) {
                out.push((w.id.clone(), op));
            }
        }
        out
    }
}

#[async_trait]
impl WorkerApi for Fleet {
    async fn job(
        &self,
        worker: &WorkerId,
        job: JobRequest,
        timeout: Duration,
    ) -> Result<JobOutput, JobError> {
        let Some(w) = self.workers.lock().get(worker).cloned() else {
            return Err(JobError::Unreachable);
        };
        if w.down.load(Ordering::SeqCst) {
            return Err(JobError::Unreachable);
        }
        if w.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(timeout).await;
            return Err(JobError::Timeout);
        }
        if w.refuse.load(Ordering::SeqCst)
            && matches!(
                job.op,
                JobOp::CreateVm { .. } | JobOp::CreateVmWithSpec { .. }
            )
        {
            return Err(JobError::Failed(WireError::no_capacity(
                "refused (test)",
                500,
            )));
        }
        if let Some(done) = w.done.lock().get(&job.job_id).cloned() {
            return done.map_err(JobError::Failed);
        }
        let result = w.run(self, job.clone()).await;
        w.done.lock().insert(job.job_id.clone(), result.clone());
        w.log.lock().push(job.op);
        result.map_err(JobError::Failed)
    }

    async fn delete_object(&self, key: &str) -> Result<(), WireError> {
        self.paused.lock().remove(key);
        Ok(())
    }
}

/// Records session events.
#[derive(Debug, Default)]
pub struct Recorder {
    pub events: Mutex<Vec<SessionEvent>>,
}

#[async_trait]
impl EventSink for Recorder {
    async fn session_event(&self, event: SessionEvent) {
        self.events.lock().push(event);
    }
}

impl Recorder {
    pub fn for_session(&self, sid: &str) -> Vec<SessionEvent> {
        self.events
            .lock()
            .iter()
            .filter(|e| e.session_id.as_str() == sid)
            .cloned()
            .collect()
    }
}

/// A config for logic tests: one `default` template with `min_ready` warm VMs.
pub fn config(min_ready: u32) -> SchedulerConfig {
    let mut template = TemplateConfig::new(tname("default"), min_ready);
    template.max_ready = Some(min_ready.max(1) * 2);
    SchedulerConfig {
        templates: vec![template],
        leak_grace: Duration::from_secs(10),
        ..SchedulerConfig::default()
    }
}

/// The scheduler core over an in-memory store and an in-process fleet, with a heartbeat pump.
pub struct Harness {
    pub sched: Scheduler,
    pub fleet: Arc<Fleet>,
    pub kv: Arc<MemKv>,
    pub events: Arc<Recorder>,
    pub cfg: Arc<SchedulerConfig>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Harness {
    /// Starts a scheduler over `fleet` (whose workers already exist).
    pub async fn start(cfg: SchedulerConfig, fleet: Arc<Fleet>) -> Self {
        Self::start_with(cfg, fleet, Arc::new(MemKv::new())).await
    }

    pub async fn start_with(cfg: SchedulerConfig, fleet: Arc<Fleet>, kv: Arc<MemKv>) -> Self {
        let cfg = Arc::new(cfg);
        let events = Arc::new(Recorder::default());
        let (sched, pump) = boot(cfg.clone(), fleet.clone(), kv.clone(), events.clone()).await;
        Self {
            sched,
            fleet,
            kv,
            events,
            cfg,
            pump,
        }
    }

    /// Simulates a scheduler crash and restart over the same store and fleet.
    pub async fn restart(&mut self) {
        self.pump.abort();
        self.sched.shutdown(Duration::from_millis(1)).await;
        let (sched, pump) = boot(
            self.cfg.clone(),
            self.fleet.clone(),
            self.kv.clone(),
            self.events.clone(),
        )
        .await;
        self.sched = sched;
        self.pump = pump;
    }

    /// Polls `cond` (advancing paused time) for up to `limit`.
    pub async fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_ready(&self, template: &str, n: usize) {
        let t = tname(template);
        self.wait_for(
            &format!("{n} ready vms of {template}"),
            Duration::from_secs(60),
            || self.sched.ready_count(&t) == n,
        )
        .await;
    }

    pub async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

async fn boot(
    cfg: Arc<SchedulerConfig>,
    fleet: Arc<Fleet>,
    kv: Arc<MemKv>,
    events: Arc<Recorder>,
) -> (Scheduler, tokio::task::JoinHandle<()>) {
    let sched = Scheduler::load(cfg.clone(), fleet.clone(), Store::new(kv), events)
        .await
        .unwrap();
    let pump = {
        let sched = sched.clone();
        let fleet = fleet.clone();
        tokio::spawn(async move {
            loop {
                for w in fleet.all() {
                    if !w.down.load(Ordering::SeqCst) && !w.mute.load(Ordering::SeqCst) {
                        sched.on_heartbeat(w.status(fleet.clock.now_ms()).await);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    sched.wait_for_workers(cfg.heartbeat_timeout).await;
    sched.start_background();
    (sched, pump)
}
