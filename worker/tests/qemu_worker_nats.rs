//! The executor flow end to end on real microVMs: workers on the qemu provider behind a real
//! nats-server. A template is cold-booted and snapshotted into the object store on one worker,
//! restored into a warm pool on another, claimed by rename, and used through the data plane (exec
//! contract, streaming, timeout kill, output cap, files, per-VM serialisation), then released.
//! A guest whose agent hangs answers 504 and its clones never become ready. Skips with a printed
//! reason where QEMU or the guest image is missing.

mod qemu_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hearth_messages::transport::decode_reply;
use hearth_messages::*;
use hearth_testkit::NatsServer;
use hearth_worker::provider::{QemuConfig, QemuProvider, VmRuntime};
use hearth_worker::{Worker, WorkerConfig};

fn id<T: TryFrom<String>>(s: impl Into<String>) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.into()).unwrap()
}

/// A worker on the qemu provider, with its own data directory.
struct Node {
    _worker: Worker,
    _dir: tempfile::TempDir,
}

async fn node(nats: &async_nats::Client, name: &str, config: QemuConfig) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = WorkerConfig::new(id(name), dir.path());
    wc.heartbeat_interval = Duration::from_millis(200);
    wc.drain_grace = Duration::from_secs(5);
    let provider: Arc<dyn VmRuntime> = Arc::new(
        QemuProvider::open(QemuConfig {
            root: dir.path().join("qemu"),
            ..config
        })
        .unwrap(),
    );
    let worker = Worker::start(wc, nats.clone(), provider).await.unwrap();
    Node {
        _worker: worker,
        _dir: dir,
    }
}

async fn job(nats: &async_nats::Client, worker: &str, op: JobOp) -> Result<JobOutput, WireError> {
    let request = JobRequest {
        job_id: id(format!("j-{}", uuid::Uuid::new_v4())),
        op,
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(120),
        nats.request(Subjects::default().worker_jobs(&id(worker)), payload.into()),
    )
    .await
    .expect("job reply in time")
    .expect("job request");
    decode_reply::<JobReply>(&msg).map(|r| r.output)
}

fn vm_of(out: JobOutput) -> VmInfo {
    match out {
        JobOutput::Vm { vm } => vm,
        other => panic!("expected a vm, got {other:?}"),
    }
}

async fn vm_ids(nats: &async_nats::Client, worker: &str) -> Vec<String> {
    match job(nats, worker, JobOp::ListVms {}).await.unwrap() {
        JobOutput::Vms { vms } => vms.into_iter().map(|v| v.vm_id.to_string()).collect(),
        other => panic!("{other:?}"),
    }
}

fn restore(snapshot: &str) -> VmSpec {
    VmSpec {
        template: Some(id("py")),
        restore_from: Some(id(snapshot)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_flow_on_real_microvms() {
    let Some(config) = qemu_support::config("") else {
        return;
    };
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    let _a = node(&nats, "qa", config.clone()).await;
    let _b = node(&nats, "qb", config).await;

    // The template: a cold boot with env and bootstrap, snapshotted into the object store.
    let spec = VmSpec {
        template: Some(id("py")),
        env: BTreeMap::from([("GREETING".into(), "hi".into())]),
        bootstrap: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo \"$GREETING from $(hostname)\" > boot.txt".into(),
        ]),
        memory_mib: Some(256),
        ..Default::default()
    };
    job(
        &nats,
        "qa",
        JobOp::CreateVmWithSpec {
            vm_id: id("tmpl"),
            spec,
            session: false,
        },
    )
    .await
    .unwrap();
    let snapshot = match job(
        &nats,
        "qa",
        JobOp::SnapshotVm {
            vm_id: id("tmpl"),
            snapshot_id: id("py-v1"),
            publish: true,
        },
    )
    .await
    .unwrap()
    {
        JobOutput::Snapshot { snapshot } => snapshot,
        other => panic!("{other:?}"),
    };
    assert!(snapshot.published && snapshot.size_bytes > 0);

    // The pool, on a worker that has never seen the snapshot (fetched from the object store).
    for pooled in ["pool-1", "pool-2"] {
        let vm = vm_of(
            job(
                &nats,
                "qb",
                JobOp::CreateVmWithSpec {
                    vm_id: id(pooled),
                    spec: restore("py-v1"),
                    session: false,
                },
            )
            .await
            .unwrap(),
        );
        assert_eq!(vm.restored_from, Some(id("py-v1")));
        assert_eq!(vm.template, Some(id("py")));
    }
    // Claim: rename onto a session.
    let claimed = vm_of(
        job(
            &nats,
            "qb",
            JobOp::RenameVm {
                vm_id: id("pool-1"),
                new_vm_id: id("sess-1"),
                session: true,
            },
        )
        .await
        .unwrap(),
    );
    assert!(claimed.session);
    let sid: SessionId = id("sess-1");

    // The guest is the session: its name, the template's files and env.
    let r = client
        .exec(
            &sid,
            &ExecRequest::cmd("hostname; cat boot.txt; echo $GREETING $HEARTH_SESSION_ID"),
        )
        .await
        .unwrap();
    assert_eq!(
        r.stdout.to_string_lossy(),
        "sess-1\nhi from tmpl\nhi sess-1\n",
        "{r:?}"
    );

    // Exec contract: env, stdin, stderr, exit code, cwd, signals.
    let r = client
        .exec(
            &sid,
            &ExecRequest {
                env: BTreeMap::from([("X".into(), "42".into())]),
                stdin: Some(Blob::from("piped")),
                ..ExecRequest::cmd("mkdir -p sub && echo $X; cat; echo err >&2; exit 3")
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_bytes(), r.stderr.as_bytes()),
        (3, &b"42\npiped"[..], &b"err\n"[..])
    );
    let r = client
        .exec(
            &sid,
            &ExecRequest {
                cwd: Some("sub".into()),
                ..ExecRequest::argv(["pwd"])
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"/work/sub\n");
    let r = client
        .exec(&sid, &ExecRequest::cmd("kill -9 $$"))
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.signal), (137, Some(9)));
    let err = client
        .exec(
            &sid,
            &ExecRequest {
                cwd: Some("../etc".into()),
                ..ExecRequest::argv(["true"])
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");

    // Timeout kills the whole process group in the guest.
    let started = Instant::now();
    let r = client
        .exec(
            &sid,
            &ExecRequest {
                timeout_ms: Some(700),
                ..ExecRequest::cmd("sleep 300 & echo $! > bg.pid; sleep 300")
            },
        )
        .await
        .unwrap();
    assert!(r.timed_out && r.signal == Some(9), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let r = client
        .exec(
            &sid,
            &ExecRequest::cmd("kill -0 $(cat bg.pid) && echo alive || echo gone"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"gone\n");

    // Output cap: kept up to the cap, flagged, drained (the command is not blocked).
    let r = client
        .exec(
            &sid,
            &ExecRequest {
                max_output_bytes: Some(1000),
                ..ExecRequest::cmd("head -c 2000000 /dev/zero; echo done >&2")
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(r.stderr.as_bytes(), b"done\n");

    // Streaming: chunks as they come, then the result without them.
    let events = client
        .exec_stream(
            &sid,
            &ExecRequest::cmd("echo one; sleep 0.3; echo two >&2; echo three"),
        )
        .await
        .unwrap();
    let mut events = std::pin::pin!(events);
    let (mut out, mut err, mut done) = (Vec::new(), Vec::new(), None);
    while let Some(event) = events.next().await {
        match event.unwrap() {
            ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            ExecEvent::Stderr(b) => err.extend_from_slice(&b),
            ExecEvent::Done(r) => done = Some(r),
        }
    }
    let done = done.unwrap();
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"one\nthree\n"[..], &b"two\n"[..])
    );
    assert!(done.stdout.is_empty() && done.exit_code == 0);

    // Files, confined to the work directory.
    assert_eq!(
        client
            .put_file(&sid, "data/in.txt", b"payload".to_vec(), Some(0o600))
            .await
            .unwrap(),
        7
    );
    let r = client
        .exec(
            &sid,
            &ExecRequest::cmd("stat -c %a data/in.txt; cat data/in.txt"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"600\npayload");
    assert_eq!(
        client.get_file(&sid, "data/in.txt").await.unwrap(),
        b"payload"
    );
    let err = client.get_file(&sid, "../etc/passwd").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    let err = client.get_file(&sid, "missing").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");

    // One command at a time per VM: two concurrent execs run back to back.
    let started = Instant::now();
    let slow = ExecRequest::cmd("sleep 1");
    let (r1, r2) = tokio::join!(client.exec(&sid, &slow), client.exec(&sid, &slow));
    assert!(r1.unwrap().success() && r2.unwrap().success());
    assert!(started.elapsed() >= Duration::from_secs(2), "serialised");

    // Release: destroyed, gone from the inventory, nothing answers for the session any more.
    job(
        &nats,
        "qb",
        JobOp::DestroyVm {
            vm_id: id("sess-1"),
            backup: false,
            reason: Some(TerminationReason::Released),
        },
    )
    .await
    .unwrap();
    assert_eq!(vm_ids(&nats, "qb").await, ["pool-2"]);
    let err = client
        .exec(&sid, &ExecRequest::cmd("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::NoResponders { .. }) || err.code() == Some(ErrorCode::Conflict),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_answers_504_and_its_clones_never_enter_the_pool() {
    let Some(config) = qemu_support::config("") else {
        return;
    };
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    let _a = node(
        &nats,
        "qh",
        QemuConfig {
            agent_timeout_ms: 3000,
            exec_grace_ms: 1000,
            ..config
        },
    )
    .await;
    job(
        &nats,
        "qh",
        JobOp::CreateVm {
            vm_id: id("sess-h"),
            session: true,
        },
    )
    .await
    .unwrap();
    let sid: SessionId = id("sess-h");
    // The command stops the agent running it.
    let err = client
        .exec(
            &sid,
            &ExecRequest {
                timeout_ms: Some(500),
                ..ExecRequest::cmd("kill -STOP $PPID")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Deadline), "{err}");

    job(
        &nats,
        "qh",
        JobOp::SnapshotVm {
            vm_id: id("sess-h"),
            snapshot_id: id("hung"),
            publish: false,
        },
    )
    .await
    .unwrap();
    let err = job(
        &nats,
        "qh",
        JobOp::CreateVmWithSpec {
            vm_id: id("pool-h"),
            spec: restore("hung"),
            session: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::Deadline, "{err}");
    assert_eq!(
        vm_ids(&nats, "qh").await,
        ["sess-h"],
        "never enters the pool"
    );
}
