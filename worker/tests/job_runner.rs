//! The job runner in-process, without NATS: the worker's job semantics (health check, capacity
//! and eviction, snapshot publish and fetch through the host's store, rename into a session,
//! job-id dedupe) over the fake provider and the in-memory host.

use std::sync::Arc;

use hearth_messages::{
    ErrorCode, JobId, JobOp, JobOutput, JobRequest, TerminationReason, VmId, VmInfo, VmSpec,
    WireError, WorkerId,
};
use hearth_worker::provider::FakeProvider;
use hearth_worker::{JobRunner, MemoryHost, WorkerConfig};

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).unwrap()
}

fn runner(name: &str, max_vms: u32, host: Arc<MemoryHost>, dir: &std::path::Path) -> JobRunner {
    let mut config = WorkerConfig::new(WorkerId::new(name).unwrap(), dir.join(name));
    config.max_vms = max_vms;
    JobRunner::new(config, Arc::new(FakeProvider::default()), host).unwrap()
}

async fn run(r: &JobRunner, job: &str, op: JobOp) -> Result<JobOutput, WireError> {
    r.run(JobRequest {
        job_id: id::<JobId>(job),
        op,
        lease_revision: 0,
        tenant: None,
    })
    .await
    .map(|reply| reply.output)
}

fn vm(out: JobOutput) -> VmInfo {
    match out {
        JobOutput::Vm { vm } => vm,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn jobs_run_in_process_with_the_workers_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let host_a = Arc::new(MemoryHost::default());
    let host_b = Arc::new(MemoryHost::with_store(host_a.store.clone()));
    let a = runner("a", 2, host_a.clone(), dir.path());
    let b = runner("b", 2, host_b.clone(), dir.path());

    // Build on a, publish, restore on b (fetched from the shared store), rename into a session.
    let create = JobOp::CreateVmWithSpec {
        vm_id: id("tmpl"),
        spec: VmSpec::default(),
        session: false,
    };
    assert!(vm(run(&a, "j1", create).await.unwrap()).state == hearth_messages::VmState::Running);
    let snap = JobOp::SnapshotVm {
        vm_id: id("tmpl"),
        snapshot_id: id("s1"),
        publish: true,
    };
    run(&a, "j2", snap).await.unwrap();
    assert!(host_a.store.lock().contains_key(&id("s1")));
    let restore = JobOp::CreateVmWithSpec {
        vm_id: id("pool-1"),
        spec: VmSpec {
            restore_from: Some(id("s1")),
            ..Default::default()
        },
        session: false,
    };
    let restored = vm(run(&b, "j3", restore.clone()).await.unwrap());
    assert_eq!(restored.restored_from, Some(id("s1")));
    // The same job id again: the first outcome, not a second create (which would be 409).
    assert_eq!(
        vm(run(&b, "j3", restore).await.unwrap()).vm_id,
        restored.vm_id
    );
    let rename = JobOp::RenameVm {
        vm_id: id("pool-1"),
        new_vm_id: id("sess"),
        session: true,
    };
    assert!(vm(run(&b, "j4", rename).await.unwrap()).session);
    assert_eq!(host_b.served.lock().as_slice(), &[id::<VmId>("sess")]);
    let renamed = host_b
        .events
        .lock()
        .iter()
        .any(|e| e.vm_id.as_str() == "sess" && e.renamed_from == Some(id("pool-1")));
    assert!(renamed, "a rename event");

    // Full (2 VMs on a): the oldest stopped VM is evicted to make room, not a 503.
    run(&a, "j5", JobOp::StopVm { vm_id: id("tmpl") })
        .await
        .unwrap();
    let second = JobOp::CreateVm {
        vm_id: id("x1"),
        session: false,
    };
    run(&a, "j6", second).await.unwrap();
    let third = JobOp::CreateVm {
        vm_id: id("x2"),
        session: false,
    };
    run(&a, "j7", third).await.unwrap();
    let evicted = host_a
        .events
        .lock()
        .iter()
        .any(|e| e.vm_id.as_str() == "tmpl" && e.reason == Some(TerminationReason::Evicted));
    assert!(evicted, "the stopped vm was evicted");
    // Nothing stopped left to evict: 503 with a retry hint.
    let fourth = JobOp::CreateVm {
        vm_id: id("x3"),
        session: false,
    };
    let err = run(&a, "j8", fourth).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(err.retry_after_ms.is_some());
}
