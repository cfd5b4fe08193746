//! Pause through the worker over a real nats-server (process provider): the `pause_vm` job, resume
//! on touch by the data plane (exec and files), a pause refused (409) while a command runs — the
//! command unharmed — bad input, and a paused session kept across a worker restart.

use std::sync::Arc;
use std::time::Duration;

use hearth_messages::transport::decode_reply;
use hearth_messages::*;
use hearth_testkit::NatsServer;
use hearth_worker::provider::{ProcessConfig, ProcessProvider, VmRuntime};
use hearth_worker::{Worker, WorkerConfig};

fn id<T: TryFrom<String>>(s: impl Into<String>) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.into()).unwrap()
}

async fn start_worker(nats: &async_nats::Client, dir: &std::path::Path) -> Worker {
    let mut config = WorkerConfig::new(id("wp"), dir);
    config.heartbeat_interval = Duration::from_millis(200);
    let provider: Arc<dyn VmRuntime> =
        Arc::new(ProcessProvider::open(ProcessConfig::new(dir.join("process"))).unwrap());
    Worker::start(config, nats.clone(), provider).await.unwrap()
}

async fn job(nats: &async_nats::Client, op: JobOp) -> Result<JobOutput, WireError> {
    let request = JobRequest {
        job_id: id(format!("j-{}", uuid::Uuid::new_v4())),
        op,
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let subject = Subjects::default().worker_jobs(&id("wp"));
    let msg = tokio::time::timeout(
        Duration::from_secs(60),
        nats.request(subject, payload.into()),
    )
    .await
    .expect("job reply in time")
    .expect("job request");
    decode_reply::<JobReply>(&msg).map(|r| r.output)
}

fn state_of(out: JobOutput) -> VmState {
    match out {
        JobOutput::Vm { vm } => vm.state,
        other => panic!("expected a vm, got {other:?}"),
    }
}

async fn vm_state(nats: &async_nats::Client, sid: &str) -> VmState {
    state_of(job(nats, JobOp::GetVm { vm_id: id(sid) }).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_session_resumes_on_exec_and_files_and_a_busy_one_is_not_paused() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    let dir = tempfile::tempdir().unwrap();
    let _worker = start_worker(&nats, dir.path()).await;

    let sid: SessionId = id("s1");
    job(
        &nats,
        JobOp::CreateVm {
            vm_id: id("s1"),
            session: true,
        },
    )
    .await
    .unwrap();
    client
        .put_file(&sid, "kept.txt", b"kept".to_vec(), None)
        .await
        .unwrap();

    let paused = job(&nats, JobOp::PauseVm { vm_id: id("s1") })
        .await
        .unwrap();
    assert_eq!(state_of(paused), VmState::Paused);
    // Paused again: the VM's state says why not.
    let err = job(&nats, JobOp::PauseVm { vm_id: id("s1") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err}");

    // An exec resumes it; the files are there.
    let out = client
        .exec(&sid, &ExecRequest::cmd("cat kept.txt"))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout.as_bytes(), b"kept");
    assert_eq!(vm_state(&nats, "s1").await, VmState::Running);

    // So does a file transfer.
    job(&nats, JobOp::PauseVm { vm_id: id("s1") })
        .await
        .unwrap();
    let data = client.get_file(&sid, "kept.txt").await.unwrap();
    assert_eq!(data, b"kept");
    assert_eq!(vm_state(&nats, "s1").await, VmState::Running);

    // A pause while a command runs is refused, and the command finishes unharmed.
    let running = {
        let client = client.clone();
        let sid = sid.clone();
        tokio::spawn(async move {
            client
                .exec(&sid, &ExecRequest::cmd("sleep 1; echo done"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = job(&nats, JobOp::PauseVm { vm_id: id("s1") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err}");
    assert!(err.message.contains("busy"), "{err}");
    let out = running.await.unwrap().unwrap();
    assert_eq!(out.stdout.as_bytes(), b"done\n");
    assert_eq!(vm_state(&nats, "s1").await, VmState::Running);

    // Unknown VMs are 404.
    let err = job(&nats, JobOp::PauseVm { vm_id: id("nope") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_session_survives_a_worker_restart_and_resumes_on_exec() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    let dir = tempfile::tempdir().unwrap();
    let worker = start_worker(&nats, dir.path()).await;
    let sid: SessionId = id("kept");
    job(
        &nats,
        JobOp::CreateVm {
            vm_id: id("kept"),
            session: true,
        },
    )
    .await
    .unwrap();
    client
        .put_file(&sid, "note", b"still here".to_vec(), None)
        .await
        .unwrap();
    job(&nats, JobOp::PauseVm { vm_id: id("kept") })
        .await
        .unwrap();
    worker.drain().await;
    drop(worker);

    let _again = start_worker(&nats, dir.path()).await;
    assert_eq!(vm_state(&nats, "kept").await, VmState::Paused);
    // Still a session: its data plane is served, and the first exec resumes it.
    let out = client
        .exec(&sid, &ExecRequest::cmd("cat note"))
        .await
        .unwrap();
    assert_eq!(out.stdout.as_bytes(), b"still here");
    assert_eq!(vm_state(&nats, "kept").await, VmState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_state_jobs_refuse_foreign_keys_and_a_provider_that_pauses_in_memory() {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _worker = start_worker(&nats, dir.path()).await;
    job(
        &nats,
        JobOp::CreateVm {
            vm_id: id("p1"),
            session: true,
        },
    )
    .await
    .unwrap();
    job(&nats, JobOp::PauseVm { vm_id: id("p1") })
        .await
        .unwrap();

    // A key that is not this VM's paused state: a template snapshot's name, another VM's, a
    // path trick, a bad tenant. Refused before anything is read or written.
    for key in [
        "snap-1",
        "paused/-/other",
        "paused/-/p1/../snap-1",
        "paused/a.b/p1",
        "paused/p1",
        "",
    ] {
        for op in [
            JobOp::UploadPausedVm {
                vm_id: id("p1"),
                key: key.into(),
            },
            JobOp::RestorePausedVm {
                vm_id: id("p2"),
                key: key.into(),
            },
        ] {
            let err = job(&nats, op).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{key:?}: {err}");
        }
    }
    // The process provider keeps a paused sandbox in memory: nothing to upload (400), and the
    // VM stays paused and resumable here.
    let err = job(
        &nats,
        JobOp::UploadPausedVm {
            vm_id: id("p1"),
            key: "paused/-/p1".into(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{err}");
    assert!(err.message.contains("in memory"), "{err}");
    assert_eq!(vm_state(&nats, "p1").await, VmState::Paused);
    // A restore of an object that is not in the store: 400, no VM made.
    let err = job(
        &nats,
        JobOp::RestorePausedVm {
            vm_id: id("p2"),
            key: "paused/-/p2".into(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{err}");
    let err = job(&nats, JobOp::GetVm { vm_id: id("p2") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err}");
    job(&nats, JobOp::StartVm { vm_id: id("p1") })
        .await
        .unwrap();
    assert_eq!(vm_state(&nats, "p1").await, VmState::Running);
}
