//! The worker over a real nats-server with the process provider: every job type, the data plane,
//! per-VM serialisation, timeouts, output caps, file confinement, idempotent jobs, restart
//! reconcile, capacity, and every bad-input case answered with the right code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
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

struct Node {
    _worker: Worker,
    _dir: tempfile::TempDir,
}

async fn start_worker(
    nats: &async_nats::Client,
    name: &str,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut WorkerConfig),
) -> (Worker, WorkerConfig) {
    let mut config = WorkerConfig::new(id(name), dir);
    config.heartbeat_interval = Duration::from_millis(200);
    config.drain_grace = Duration::from_secs(5);
    tweak(&mut config);
    let provider: Arc<dyn VmRuntime> =
        Arc::new(ProcessProvider::open(ProcessConfig::new(dir.join("process"))).unwrap());
    let worker = Worker::start(config.clone(), nats.clone(), provider)
        .await
        .unwrap();
    (worker, config)
}

async fn node(nats: &async_nats::Client, name: &str) -> Node {
    node_with(nats, name, |_| {}).await
}

async fn node_with(
    nats: &async_nats::Client,
    name: &str,
    tweak: impl FnOnce(&mut WorkerConfig),
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (worker, _) = start_worker(nats, name, dir.path(), tweak).await;
    Node {
        _worker: worker,
        _dir: dir,
    }
}

/// Sends one job; a fresh job id unless given.
async fn job(nats: &async_nats::Client, worker: &str, op: JobOp) -> Result<JobOutput, WireError> {
    job_with_id(nats, worker, &format!("j-{}", uuid::Uuid::new_v4()), op).await
}

async fn job_with_id(
    nats: &async_nats::Client,
    worker: &str,
    job_id: &str,
    op: JobOp,
) -> Result<JobOutput, WireError> {
    let subject = Subjects::default().worker_jobs(&id(worker));
    let request = JobRequest {
        job_id: id(job_id),
        op,
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(60),
        nats.request(subject, payload.into()),
    )
    .await
    .expect("job reply in time")
    .expect("job request");
    decode_reply::<JobReply>(&msg).map(|r| {
        assert_eq!(r.job_id.as_str(), job_id);
        r.output
    })
}

fn vm_of(out: JobOutput) -> VmInfo {
    match out {
        JobOutput::Vm { vm } => vm,
        other => panic!("expected a vm, got {other:?}"),
    }
}

async fn create_session(nats: &async_nats::Client, worker: &str, sid: &str) -> VmInfo {
    vm_of(
        job(
            nats,
            worker,
            JobOp::CreateVm {
                vm_id: id(sid),
                session: true,
            },
        )
        .await
        .unwrap(),
    )
}

async fn setup() -> (NatsServer, async_nats::Client, HearthClient) {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    (server, nats, client)
}

#[tokio::test]
async fn every_job_type_and_a_snapshot_restored_on_another_worker() {
    let (_server, nats, client) = setup().await;
    let a = node(&nats, "wa").await;
    let b = node(&nats, "wb").await;

    // A template-style cold create: base directory + bootstrap.
    let base = tempfile::tempdir().unwrap();
    std::fs::write(base.path().join("hello.txt"), "from base").unwrap();
    let spec = VmSpec {
        template: Some(id("t1")),
        env: BTreeMap::from([("GREETING".into(), "hi".into())]),
        base: Some(base.path().display().to_string()),
        bootstrap: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo \"$GREETING\" > boot.txt".into(),
        ]),
        ..Default::default()
    };
    let vm = vm_of(
        job(
            &nats,
            "wa",
            JobOp::CreateVmWithSpec {
                vm_id: id("tmpl-1"),
                spec,
                session: false,
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(vm.state, VmState::Running);
    assert!(!vm.session);

    let stopped = vm_of(
        job(
            &nats,
            "wa",
            JobOp::StopVm {
                vm_id: id("tmpl-1"),
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(stopped.state, VmState::Stopped);
    let started = vm_of(
        job(
            &nats,
            "wa",
            JobOp::StartVm {
                vm_id: id("tmpl-1"),
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(started.state, VmState::Running);

    let snap = match job(
        &nats,
        "wa",
        JobOp::SnapshotVm {
            vm_id: id("tmpl-1"),
            snapshot_id: id("snap-t1"),
            publish: true,
        },
    )
    .await
    .unwrap()
    {
        JobOutput::Snapshot { snapshot } => snapshot,
        other => panic!("{other:?}"),
    };
    assert!(snap.published && snap.size_bytes > 0);

    job(
        &nats,
        "wa",
        JobOp::DestroyVm {
            vm_id: id("tmpl-1"),
            backup: false,
            reason: None,
        },
    )
    .await
    .unwrap();

    // Worker B never saw the snapshot: it fetches it from the object store.
    let pooled = vm_of(
        job(
            &nats,
            "wb",
            JobOp::CreateVmWithSpec {
                vm_id: id("pool-t1-1"),
                spec: VmSpec {
                    template: Some(id("t1")),
                    restore_from: Some(id("snap-t1")),
                    ..Default::default()
                },
                session: false,
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(pooled.restored_from, Some(id("snap-t1")));

    // A pooled VM is not reachable by executors...
    let err = client
        .exec(&id("pool-t1-1"), &ExecRequest::cmd("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoResponders { .. }), "{err:?}");

    // ...until it is renamed onto a session.
    let claimed = vm_of(
        job(
            &nats,
            "wb",
            JobOp::RenameVm {
                vm_id: id("pool-t1-1"),
                new_vm_id: id("sess-1"),
                session: true,
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(claimed.vm_id.as_str(), "sess-1");
    assert!(claimed.session);
    let out = client
        .exec(&id("sess-1"), &ExecRequest::cmd("cat hello.txt boot.txt"))
        .await
        .unwrap();
    assert_eq!(out.stdout.as_bytes(), b"from basehi\n", "{out:?}");

    let vms = match job(&nats, "wb", JobOp::ListVms {}).await.unwrap() {
        JobOutput::Vms { vms } => vms,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        vms.iter().map(|v| v.vm_id.as_str()).collect::<Vec<_>>(),
        vec!["sess-1"]
    );
    drop((a, b));
}

#[tokio::test]
async fn exec_contract_on_the_process_provider() {
    let (_server, nats, client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "s1").await;
    let sid: SessionId = id("s1");

    let r = client
        .exec(
            &sid,
            &ExecRequest {
                env: BTreeMap::from([("X".into(), "42".into())]),
                stdin: Some(Blob::from("piped")),
                ..ExecRequest::cmd("mkdir -p sub && cd sub && echo $X; cat; echo err >&2; exit 3")
            },
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 3);
    assert_eq!(r.stdout.as_bytes(), b"42\npiped");
    assert_eq!(r.stderr.as_bytes(), b"err\n");

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
    assert!(
        r.stdout.to_string_lossy().trim_end().ends_with("/sub"),
        "{r:?}"
    );

    // Killed by a signal.
    let r = client
        .exec(&sid, &ExecRequest::cmd("kill -9 $$"))
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.signal), (137, Some(9)));

    // Timeout kills the whole process tree.
    let r = client
        .exec(
            &sid,
            &ExecRequest {
                timeout_ms: Some(500),
                ..ExecRequest::cmd("sleep 300 & echo $! > bg.pid; sleep 300")
            },
        )
        .await
        .unwrap();
    assert!(r.timed_out, "{r:?}");
    let pid = client.get_file(&sid, "bg.pid").await.unwrap();
    let pid = String::from_utf8(pid).unwrap();
    let proc_path = format!("/proc/{}", pid.trim());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&proc_path).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !std::path::Path::new(&proc_path).exists(),
        "background sleep {pid} survived the timeout"
    );

    // Streaming: chunks in order, then a result without them.
    let events: Vec<ExecEvent> = client
        .exec_stream(
            &sid,
            &ExecRequest::cmd("echo one; echo two >&2; echo three"),
        )
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    let mut out = Vec::new();
    let mut err = Vec::new();
    for e in &events[..events.len() - 1] {
        match e {
            ExecEvent::Stdout(b) => out.extend_from_slice(b),
            ExecEvent::Stderr(b) => err.extend_from_slice(b),
            ExecEvent::Done(_) => panic!("done before the end"),
        }
    }
    assert_eq!(out, b"one\nthree\n");
    assert_eq!(err, b"two\n");
    match events.last().unwrap() {
        ExecEvent::Done(r) => {
            assert_eq!(r.exit_code, 0);
            assert!(r.stdout.is_empty() && r.stderr.is_empty(), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_100_mb_output_is_capped_and_memory_stays_flat() {
    let (_server, nats, client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "big").await;
    let before = rss_kib();
    let started = Instant::now();
    let r = client
        .exec(
            &id("big"),
            &ExecRequest::cmd("head -c 100000000 /dev/zero; echo done >&2"),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout_truncated);
    // Capped at max_output_bytes (1 MiB), and further so the reply fits the server's max_payload
    // (1 MB by default here).
    let max_payload = nats.server_info().max_payload;
    assert!(r.stdout.len() <= 1 << 20 && r.stdout.len() < max_payload);
    assert!(r.stdout.len() >= max_payload - 8192, "{}", r.stdout.len());
    assert_eq!(r.stderr.as_bytes(), b"done\n");
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "worker memory grew by {grown} KiB for a 100 MB output"
    );
    println!("100 MB capped in {:?}, rss +{grown} KiB", started.elapsed());
}

/// `field` (e.g. `VmRSS`, `VmHWM`) of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The memory bound of the README's worker section: 8 parallel execs each printing 200 MB with
/// `max_output_bytes` = 64 MiB grow the `hearth-worker` process's peak RSS by less than this.
const EIGHT_BIG_EXECS_RSS_BOUND_KIB: u64 = 128 * 1024;

#[tokio::test]
async fn eight_parallel_200_mb_execs_keep_the_worker_binary_rss_bounded() {
    let (server, nats, client) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-worker"))
        .args([
            "--nats-url",
            server.url(),
            "--worker-id",
            "wrss",
            "--metrics-listen",
            "off",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut beats = nats
        .subscribe("hearth.v1.workers.wrss.status")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), beats.next())
        .await
        .expect("first heartbeat");
    drop(beats);
    for i in 0..8 {
        create_session(&nats, "wrss", &format!("big{i}")).await;
    }
    let before = status_kib(pid, "VmRSS");
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            client
                .exec(
                    &id(format!("big{i}")),
                    &ExecRequest {
                        max_output_bytes: Some(64 << 20),
                        ..ExecRequest::cmd("head -c 200000000 /dev/zero; echo done >&2")
                    },
                )
                .await
                .unwrap()
        }));
    }
    let max_payload = nats.server_info().max_payload;
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.exit_code, 0, "{:?}", r.stderr);
        assert!(r.stdout_truncated && !r.stderr_truncated);
        assert_eq!(r.stderr.as_bytes(), b"done\n");
        assert!(r.stdout.len() + r.stderr.len() < max_payload);
        assert!(r.stdout.len() >= max_payload - 8192, "{}", r.stdout.len());
    }
    let elapsed = started.elapsed();
    let peak = status_kib(pid, "VmHWM");
    let grown = peak.saturating_sub(before);
    println!(
        "8 x 200 MB execs (max_output_bytes 64 MiB) in {elapsed:?}: worker rss {before} KiB \
         before, peak {peak} KiB, growth {grown} KiB (bound {EIGHT_BIG_EXECS_RSS_BOUND_KIB} KiB)"
    );
    let _ = child.kill();
    let _ = child.wait();
    hearth_testkit::unmount_under(dir.path());
    assert!(
        grown < EIGHT_BIG_EXECS_RSS_BOUND_KIB,
        "worker peak rss grew by {grown} KiB for 8 x 200 MB outputs"
    );
}

#[tokio::test]
async fn a_full_vm_queue_answers_429_with_a_retry_hint_and_the_admitted_run_in_order() {
    let (_server, nats, client) = setup().await;
    let _n = node_with(&nats, "wq", |c| {
        c.max_queued_per_vm = 8;
        c.max_queued_bytes_per_vm = 64 * 1024;
    })
    .await;
    create_session(&nats, "wq", "q").await;
    let sid: SessionId = id("q");
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..40 {
        let (client, sid) = (client.clone(), sid.clone());
        handles.push(tokio::spawn(async move {
            client
                .exec(&sid, &ExecRequest::cmd(format!("echo {i} >> log; sleep 1")))
                .await
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ok = Vec::new();
    let mut rejected = 0;
    for (i, h) in handles.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("no exec hangs")
            .unwrap()
        {
            Ok(r) => {
                assert_eq!(r.exit_code, 0);
                ok.push(i);
            }
            Err(ClientError::Service(err)) => {
                assert_eq!(err.code, ErrorCode::Quota, "{err:?}");
                assert!(err.retry_after_ms.is_some_and(|ms| ms > 0), "{err:?}");
                rejected += 1;
            }
            Err(other) => panic!("exec {i}: {other:?}"),
        }
    }
    assert_eq!(ok.len(), 8, "the running exec and 7 queued: {ok:?}");
    assert_eq!(rejected, 32);
    let log = String::from_utf8(client.get_file(&sid, "log").await.unwrap()).unwrap();
    let ran: Vec<usize> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ran, ok, "the admitted execs ran in arrival order");
    println!(
        "40 execs, 8 admitted, 32 refused, done in {:?}",
        started.elapsed()
    );

    // Bytes: with a command running, a payload past the byte bound is refused; the same payload
    // into an idle VM is taken (an empty queue admits any one request).
    let slow = {
        let (client, sid) = (client.clone(), sid.clone());
        tokio::spawn(async move { client.exec(&sid, &ExecRequest::cmd("sleep 1")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let big = vec![7u8; 100 * 1024];
    match client.put_file(&sid, "big", big.clone(), None).await {
        Err(ClientError::Service(err)) => {
            assert_eq!(err.code, ErrorCode::Quota, "{err:?}");
            assert!(err.retry_after_ms.is_some(), "{err:?}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    slow.await.unwrap().unwrap();
    client
        .put_file(&sid, "big", big.clone(), None)
        .await
        .unwrap();
    assert_eq!(client.get_file(&sid, "big").await.unwrap(), big);
}

#[tokio::test]
async fn pruning_backs_up_and_the_backup_dir_keeps_only_the_newest() {
    let (_server, nats, client) = setup().await;
    let backups = tempfile::tempdir().unwrap();
    let backup_dir = backups.path().to_owned();
    let _n = node_with(&nats, "wb", |c| {
        c.backup_dir = Some(backup_dir);
        c.backup_retention.keep = 2;
    })
    .await;
    // Someone else's file, and a backup older than the age limit.
    std::fs::write(backups.path().join("notes.txt"), "keep me").unwrap();
    let ancient = backups.path().join("gone-1.tar.zst");
    std::fs::write(&ancient, "x").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&ancient)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(30 * 24 * 3600))
        .unwrap();
    for i in 0..4 {
        let sid = format!("bk{i}");
        create_session(&nats, "wb", &sid).await;
        client
            .put_file(&id(sid.as_str()), "f", vec![b'a'; 1000], None)
            .await
            .unwrap();
        job(
            &nats,
            "wb",
            JobOp::DestroyVm {
                vm_id: id(sid.as_str()),
                backup: true,
                reason: None,
            },
        )
        .await
        .unwrap();
        // Distinct modification times, so "oldest" is well defined.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut names: Vec<String> = std::fs::read_dir(backups.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names[0].starts_with("bk2-") && names[1].starts_with("bk3-"),
        "{names:?}"
    );
    assert_eq!(names[2], "notes.txt");
}

#[tokio::test]
async fn execs_on_one_vm_run_one_at_a_time_in_order() {
    let (_server, nats, client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "fifo").await;
    let sid: SessionId = id("fifo");
    let mut handles = Vec::new();
    for i in 0..6 {
        let (client, sid) = (client.clone(), sid.clone());
        handles.push(tokio::spawn(async move {
            client
                .exec(
                    &sid,
                    &ExecRequest::cmd(format!(
                        "echo start {i} >> log; sleep 0.05; echo end {i} >> log"
                    )),
                )
                .await
                .unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for h in handles {
        assert_eq!(h.await.unwrap().exit_code, 0);
    }
    let log = String::from_utf8(client.get_file(&sid, "log").await.unwrap()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 12);
    for pair in lines.chunks(2) {
        let start = pair[0].strip_prefix("start ").unwrap();
        let end = pair[1].strip_prefix("end ").unwrap();
        assert_eq!(start, end, "commands interleaved: {log}");
    }
    // Other VMs are not blocked by this one's lock.
    create_session(&nats, "w1", "other").await;
    let slow = {
        let (client, sid) = (client.clone(), sid.clone());
        tokio::spawn(async move { client.exec(&sid, &ExecRequest::cmd("sleep 1")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    client
        .exec(&id("other"), &ExecRequest::cmd("true"))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "blocked by another vm"
    );
    slow.await.unwrap().unwrap();
}

#[tokio::test]
async fn files_round_trip_and_are_confined_to_the_volume() {
    let (_server, nats, client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "f1").await;
    let sid: SessionId = id("f1");
    let data: Vec<u8> = (0..=255).collect();
    assert_eq!(
        client
            .put_file(&sid, "dir/bin.dat", data.clone(), Some(0o600))
            .await
            .unwrap(),
        256
    );
    assert_eq!(client.get_file(&sid, "dir/bin.dat").await.unwrap(), data);
    let r = client
        .exec(&sid, &ExecRequest::cmd("stat -c %a dir/bin.dat"))
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"600\n");

    client
        .exec(&sid, &ExecRequest::cmd("ln -s /etc escape"))
        .await
        .unwrap();
    for path in ["../x", "/etc/passwd", "escape/passwd", "a/../../x"] {
        let err = client.get_file(&sid, path).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "get {path}: {err}");
        let err = client
            .put_file(&sid, path, b"x".to_vec(), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "put {path}: {err}");
    }
    let err = client.get_file(&sid, "missing").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = client
        .exec(
            &sid,
            &ExecRequest {
                cwd: Some("../..".into()),
                ..ExecRequest::cmd("pwd")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
}

#[tokio::test]
async fn a_retried_job_returns_the_first_outcome_and_runs_once() {
    let (_server, nats, _client) = setup().await;
    let _n = node(&nats, "w1").await;
    let op = JobOp::CreateVm {
        vm_id: id("once"),
        session: false,
    };
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (nats, op) = (nats.clone(), op.clone());
        handles.push(tokio::spawn(async move {
            job_with_id(&nats, "w1", "create-once", op).await
        }));
    }
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap().unwrap());
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]));
    // Later, a retry still gets the success (a fresh job id would get 409).
    let again = job_with_id(&nats, "w1", "create-once", op.clone()).await;
    assert_eq!(again.unwrap(), outcomes[0]);
    let fresh = job(&nats, "w1", op).await.unwrap_err();
    assert_eq!(fresh.code, ErrorCode::Conflict);
}

/// A job carrying a lease revision (the fencing token of the scheduler that sends it).
async fn fenced_job(
    nats: &async_nats::Client,
    worker: &str,
    revision: u64,
) -> Result<JobOutput, WireError> {
    let subject = Subjects::default().worker_jobs(&id(worker));
    let request = JobRequest {
        job_id: id(format!("f-{}", uuid::Uuid::new_v4())),
        op: JobOp::ListVms {},
        lease_revision: revision,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let msg = nats.request(subject, payload.into()).await.unwrap();
    decode_reply::<JobReply>(&msg).map(|r| r.output)
}

#[tokio::test]
async fn jobs_of_a_deposed_scheduler_are_refused() {
    let (_server, nats, _client) = setup().await;
    let _n = node(&nats, "w1").await;
    fenced_job(&nats, "w1", 5).await.unwrap();
    // An older revision is a deposed leader: 409, nothing run.
    let err = fenced_job(&nats, "w1", 3).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(err.message.contains("deposed"), "{err:?}");
    // The same term and newer terms go on; a newer one fences the one before it.
    fenced_job(&nats, "w1", 5).await.unwrap();
    fenced_job(&nats, "w1", 9).await.unwrap();
    assert_eq!(
        fenced_job(&nats, "w1", 5).await.unwrap_err().code,
        ErrorCode::Conflict
    );
    // Jobs without a lease (tools, tests) are not fenced.
    fenced_job(&nats, "w1", 0).await.unwrap();
}

#[tokio::test]
async fn a_draining_worker_heartbeats_draining_until_it_is_done() {
    let (_server, nats, client) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let (worker, _) = start_worker(&nats, "w1", dir.path(), |_| {}).await;
    create_session(&nats, "w1", "long").await;
    let mut status = nats
        .subscribe(Subjects::default().worker_status(&id("w1")))
        .await
        .unwrap();
    let exec = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .exec(&id("long"), &ExecRequest::cmd("sleep 1.5"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let drain = tokio::spawn(async move { worker.drain().await });
    let mut draining = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), status.next()).await {
        let hb: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
        if hb.draining {
            draining += 1;
        }
        if drain.is_finished() {
            break;
        }
    }
    drain.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the drain waited for the command"
    );
    assert!(exec.await.unwrap().is_ok(), "the running command finished");
    // 200 ms heartbeats through a ~1.2 s drain: several, all flagged, none stopped early.
    assert!(
        draining >= 3,
        "only {draining} draining heartbeats during the drain"
    );
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_the_worker_survives() {
    let (_server, nats, client) = setup().await;
    let _n = node_with(&nats, "w1", |c| {
        c.max_vms = 2;
    })
    .await;
    let jobs = Subjects::default().worker_jobs(&id("w1"));

    // Malformed jobs.
    for payload in [&b"\xc1"[..], b"{}", b"\x81\xa6job_id\xa1x"] {
        let msg = nats
            .request(jobs.clone(), payload.to_vec().into())
            .await
            .unwrap();
        let err = decode_reply::<JobReply>(&msg).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{payload:?}");
    }
    // Unknown VM.
    let err = job(&nats, "w1", JobOp::StartVm { vm_id: id("ghost") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // Rename onto an existing id; rename of an unknown id.
    create_session(&nats, "w1", "a").await;
    job(
        &nats,
        "w1",
        JobOp::CreateVm {
            vm_id: id("b"),
            session: false,
        },
    )
    .await
    .unwrap();
    let err = job(
        &nats,
        "w1",
        JobOp::RenameVm {
            vm_id: id("b"),
            new_vm_id: id("a"),
            session: true,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    let err = job(
        &nats,
        "w1",
        JobOp::RenameVm {
            vm_id: id("nope"),
            new_vm_id: id("c"),
            session: true,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // At capacity, nothing stopped to evict: 503 with a hint.
    let err = job(
        &nats,
        "w1",
        JobOp::CreateVm {
            vm_id: id("c"),
            session: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert!(err.retry_after_ms.is_some());
    // Malformed exec and files requests.
    let exec_subject = Subjects::default().session(&id("a"), SessionOp::Exec);
    for payload in [&b"\xc1"[..], b"\x80", b"\x81\xa4argv\x90"] {
        let msg = nats
            .request(exec_subject.clone(), payload.to_vec().into())
            .await
            .unwrap();
        assert_eq!(
            decode_reply::<ExecResult>(&msg).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }
    let err = client
        .exec(
            &id("a"),
            &ExecRequest {
                timeout_ms: Some(0),
                ..ExecRequest::cmd("true")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    // A destroy (release, TTL, prune) ends the session's work at once: the running command is
    // killed and its caller told `session_ended` (409); a later exec finds no session.
    let running = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = client.exec(&id("a"), &ExecRequest::cmd("sleep 30")).await;
            (result, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let destroy = {
        let nats = nats.clone();
        tokio::spawn(async move {
            job(
                &nats,
                "w1",
                JobOp::DestroyVm {
                    vm_id: id("a"),
                    backup: false,
                    reason: Some(TerminationReason::Released),
                },
            )
            .await
        })
    };
    let (result, took) = running.await.unwrap();
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err:?}");
    assert!(err.to_string().contains("session_ended"), "{err}");
    assert!(
        took < Duration::from_secs(10),
        "the command was not ended: {took:?}"
    );
    let err = client
        .exec(&id("a"), &ExecRequest::cmd("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Some(ErrorCode::Conflict))
            || err.to_string().contains("no responders"),
        "{err:?}"
    );
    destroy.await.unwrap().unwrap();
    // Afterwards the session's subjects are gone: nobody answers for it any more.
    let err = client
        .exec(&id("a"), &ExecRequest::cmd("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoResponders { .. }), "{err:?}");
    // Still alive and serving.
    create_session(&nats, "w1", "d").await;
    let r = client
        .exec(&id("d"), &ExecRequest::cmd("echo ok"))
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"ok\n");
}

#[tokio::test]
async fn stopped_vms_resume_on_exec_and_the_oldest_is_evicted_when_full() {
    let (_server, nats, client) = setup().await;
    let backups = tempfile::tempdir().unwrap();
    let backup_dir = backups.path().to_owned();
    let _n = node_with(&nats, "w1", |c| {
        c.max_vms = 2;
        c.backup_dir = Some(backup_dir);
    })
    .await;
    let mut events = nats.subscribe("hearth.v1.events.vms.w1").await.unwrap();
    create_session(&nats, "w1", "old").await;
    create_session(&nats, "w1", "new").await;
    client
        .put_file(&id("old"), "keep.txt", b"state".to_vec(), None)
        .await
        .unwrap();
    job(&nats, "w1", JobOp::StopVm { vm_id: id("old") })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    job(&nats, "w1", JobOp::StopVm { vm_id: id("new") })
        .await
        .unwrap();

    // Exec resumes a stopped VM, state intact.
    let r = client
        .exec(&id("new"), &ExecRequest::cmd("echo back"))
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"back\n");

    // Full: the oldest stopped VM ("old") is evicted, with a backup.
    create_session(&nats, "w1", "third").await;
    let mut evicted = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !evicted {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(1), events.next()).await
        else {
            continue;
        };
        let ev: VmEvent = Encoding::MsgPack.decode(&msg.payload).unwrap();
        evicted = ev.vm_id.as_str() == "old" && ev.reason == Some(TerminationReason::Evicted);
    }
    assert!(evicted, "no eviction event for the oldest stopped vm");
    let backups: Vec<_> = std::fs::read_dir(backups.path()).unwrap().collect();
    assert_eq!(backups.len(), 1, "one backup of the evicted volume");
}

#[tokio::test]
async fn heartbeats_report_inventory_and_the_service_answers_srv() {
    let (_server, nats, _client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "hb").await;
    let mut beats = nats.subscribe("hearth.v1.workers.w1.status").await.unwrap();
    let status: WorkerStatus = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), beats.next())
            .await
            .unwrap()
            .unwrap();
        let s: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
        if s.inventory.as_ref().is_some_and(|d| d.count > 0) {
            break s;
        }
    };
    assert_eq!(status.provider, "process");
    assert_eq!(status.max_vms, 64);
    assert_eq!(status.used_vms, 1);
    // A digest, not the VMs; the VMs come in pages of that generation.
    assert!(status.vms.is_empty());
    let digest = status.inventory.clone().unwrap();
    let page = job(
        &nats,
        "w1",
        JobOp::ListVmsPage {
            after: None,
            limit: 10,
            generation: Some(digest.generation),
        },
    )
    .await
    .unwrap();
    let JobOutput::VmsPage {
        vms,
        next,
        digest: paged,
    } = page
    else {
        panic!("{page:?}")
    };
    assert_eq!(
        (paged.generation, paged.hash),
        (digest.generation, digest.hash)
    );
    assert_eq!(next, None);
    assert_eq!(hearth_messages::inventory_hash(&vms), digest.hash);
    assert!(vms[0].session && vms[0].last_activity_ms > 0);
    assert_eq!(status.versions.protocol, "v1");

    let ping = nats
        .request("$SRV.PING.hearth-worker", "".into())
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "hearth-worker");
    let info = nats
        .request("$SRV.INFO.hearth-worker", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let names: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    // A session is served by three subscriptions (exec, files.*, processes.>), not one per
    // operation: a worker holding 100,000 sessions must not hold a million subscriptions.
    for name in ["jobs", "exec", "files", "processes"] {
        assert!(names.contains(&name), "{names:?}");
    }
    let per_session = names.iter().filter(|n| **n != "jobs").count();
    assert_eq!(per_session, 3, "{names:?}");
    // An operation the data plane does not know, under a subject it serves: 400, not silence.
    let reply = nats
        .request("hearth.v1.sessions.hb.files.bogus", "{}".into())
        .await
        .unwrap();
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(code.as_deref(), Some("400"), "{reply:?}");
}

/// The next heartbeat's entry for `vm` (skipping heartbeats without it).
async fn next_beat_of(
    nats: &async_nats::Client,
    beats: &mut async_nats::Subscriber,
    vm: &str,
) -> VmInfo {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), beats.next())
            .await
            .expect("a heartbeat in time")
            .unwrap();
        if let Some(v) = hearth_testkit::vm_in_heartbeat(nats, &msg, vm).await {
            return v;
        }
    }
}

#[tokio::test]
async fn heartbeats_show_a_vm_busy_while_a_command_runs() {
    let (_server, nats, client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "busy").await;
    let mut beats = nats.subscribe("hearth.v1.workers.w1.status").await.unwrap();
    assert!(
        !next_beat_of(&nats, &mut beats, "busy").await.busy,
        "idle at first"
    );

    let started = now_ms();
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.exec(&id("busy"), &ExecRequest::cmd("sleep 1")).await })
    };
    // Heartbeats every 200 ms: several fall inside the command.
    let mut seen_busy = None;
    while !running.is_finished() {
        let vm = next_beat_of(&nats, &mut beats, "busy").await;
        if vm.busy {
            seen_busy = Some(vm);
            break;
        }
    }
    let busy = seen_busy.expect("a heartbeat during `sleep 1` says busy");
    assert!(
        busy.last_activity_ms >= started,
        "the start of the command is activity"
    );
    let result = running.await.unwrap().unwrap();
    assert_eq!(result.exit_code, 0);
    let ended = now_ms();

    // Afterwards: not busy, and the end of the command was activity too.
    let vm = loop {
        let vm = next_beat_of(&nats, &mut beats, "busy").await;
        if !vm.busy {
            break vm;
        }
    };
    assert!(
        vm.last_activity_ms >= started + 1000 && vm.last_activity_ms <= ended,
        "activity stamped when the command ended: {} not in [{}, {ended}]",
        vm.last_activity_ms,
        started + 1000
    );
}

#[tokio::test]
async fn delete_snapshot_removes_it_locally_and_from_the_object_store_idempotently() {
    let (_server, nats, _client) = setup().await;
    let _a = node(&nats, "wa").await;
    let _b = node(&nats, "wb").await;
    let store = async_nats::jetstream::new(nats.clone())
        .get_object_store("hearth_snapshots")
        .await
        .unwrap();
    create_session(&nats, "wa", "src").await;
    job(
        &nats,
        "wa",
        JobOp::SnapshotVm {
            vm_id: id("src"),
            snapshot_id: id("snap-gc"),
            publish: true,
        },
    )
    .await
    .unwrap();
    assert!(store.get("snap-gc").await.is_ok(), "published");
    let restore = |vm: &str| JobOp::CreateVmWithSpec {
        vm_id: id(vm),
        spec: VmSpec {
            restore_from: Some(id("snap-gc")),
            ..Default::default()
        },
        session: false,
    };
    let delete = |unpublish| JobOp::DeleteSnapshot {
        snapshot_id: id("snap-gc"),
        unpublish,
    };

    // A worker that never had it: success (nothing to do).
    assert_eq!(
        job(&nats, "wb", delete(false)).await.unwrap(),
        JobOutput::Done {}
    );
    // Local only: gone from wa, still in the object store (a restore fetches it again).
    assert_eq!(
        job(&nats, "wa", delete(false)).await.unwrap(),
        JobOutput::Done {}
    );
    assert!(store.get("snap-gc").await.is_ok(), "still published");
    job(&nats, "wa", restore("again")).await.unwrap();

    // With unpublish: gone locally and from the object store.
    assert_eq!(
        job(&nats, "wa", delete(true)).await.unwrap(),
        JobOutput::Done {}
    );
    assert!(store.get("snap-gc").await.is_err(), "unpublished");
    for (worker, vm) in [("wa", "after-a"), ("wb", "after-b")] {
        let err = job(&nats, worker, restore(vm)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "{worker}: {err:?}");
    }
    // Idempotent: deleting again (a fresh job, not a cached reply) still succeeds.
    for worker in ["wa", "wb"] {
        assert_eq!(
            job(&nats, worker, delete(true)).await.unwrap(),
            JobOutput::Done {}
        );
    }
}

#[tokio::test]
async fn a_restarted_worker_finds_its_vms_and_serves_its_sessions() {
    let (_server, nats, client) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let (worker, _) = start_worker(&nats, "w1", dir.path(), |_| {}).await;
    create_session(&nats, "w1", "persist").await;
    job(
        &nats,
        "w1",
        JobOp::CreateVm {
            vm_id: id("pool-x"),
            session: false,
        },
    )
    .await
    .unwrap();
    client
        .put_file(&id("persist"), "note", b"still here".to_vec(), None)
        .await
        .unwrap();
    worker.drain().await;
    drop(worker);

    let (_again, _) = start_worker(&nats, "w1", dir.path(), |_| {}).await;
    let vms = match job(&nats, "w1", JobOp::ListVms {}).await.unwrap() {
        JobOutput::Vms { vms } => vms,
        other => panic!("{other:?}"),
    };
    let ids: Vec<(&str, bool)> = vms.iter().map(|v| (v.vm_id.as_str(), v.session)).collect();
    assert_eq!(ids, vec![("persist", true), ("pool-x", false)]);
    assert_eq!(
        client.get_file(&id("persist"), "note").await.unwrap(),
        b"still here"
    );
    let err = client
        .exec(&id("pool-x"), &ExecRequest::cmd("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoResponders { .. }));
}

#[tokio::test]
async fn sigkilled_worker_binary_reconciles_on_restart() {
    let (server, nats, client) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hearth-worker"))
            .args([
                "--nats-url",
                server.url(),
                "--worker-id",
                "wk",
                "--metrics-listen",
                "off",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let mut beats = nats.subscribe("hearth.v1.workers.wk.status").await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), beats.next())
        .await
        .expect("first heartbeat");
    create_session(&nats, "wk", "survivor").await;
    client
        .put_file(&id("survivor"), "f", b"1".to_vec(), None)
        .await
        .unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut child = spawn();
    let status: WorkerStatus = loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), beats.next())
            .await
            .unwrap()
            .unwrap();
        let s: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
        if s.seq == 0 || s.inventory.as_ref().is_some_and(|d| d.count > 0) {
            break s;
        }
    };
    assert_eq!(status.used_vms, 1, "{status:?}");
    let vms = match job(&nats, "wk", JobOp::ListVms {}).await.unwrap() {
        JobOutput::Vms { vms } => vms,
        other => panic!("{other:?}"),
    };
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0].vm_id.as_str(), "survivor");
    assert_eq!(client.get_file(&id("survivor"), "f").await.unwrap(), b"1");
    // A config error exits 64 with one line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-worker"))
        .args(["--worker-id", "bad.id"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    // SIGTERM drains and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    hearth_testkit::unmount_under(dir.path());
}

/// Host processes whose command line is exactly `sleep 600`.
fn host_sleepers() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c == b"sleep\x00600\x00")
        .count()
}

#[tokio::test]
async fn releasing_sessions_with_running_commands_ends_them_and_the_worker_keeps_serving() {
    let (_server, nats, client) = setup().await;
    let _w = node(&nats, "w1").await;
    const N: usize = 20;
    for i in 0..N {
        create_session(&nats, "w1", &format!("busy-{i}")).await;
    }
    let before = host_sleepers();
    let mut runs = Vec::new();
    for i in 0..N {
        let client = client.clone();
        runs.push(tokio::spawn(async move {
            let sid: SessionId = id(format!("busy-{i}"));
            let mut req = ExecRequest::cmd("touch started; exec sleep 600");
            req.timeout_ms = Some(600_000);
            let result = client.exec(&sid, &req).await;
            (result, Instant::now())
        }));
    }
    // Every command is running.
    let deadline = Instant::now() + Duration::from_secs(30);
    while host_sleepers() < before + N {
        assert!(Instant::now() < deadline, "the commands did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let released_at = Instant::now();
    let releases: Vec<_> = (0..N)
        .map(|i| {
            let nats = nats.clone();
            tokio::spawn(async move {
                job(
                    &nats,
                    "w1",
                    JobOp::DestroyVm {
                        vm_id: id(format!("busy-{i}")),
                        backup: false,
                        reason: Some(TerminationReason::Released),
                    },
                )
                .await
            })
        })
        .collect();
    let mut slowest_release = Duration::ZERO;
    for r in releases {
        r.await.unwrap().unwrap();
        slowest_release = slowest_release.max(released_at.elapsed());
    }
    let mut slowest_answer = Duration::ZERO;
    for run in runs {
        let (result, at) = run.await.unwrap();
        let err = result.unwrap_err();
        assert!(err.to_string().contains("session_ended"), "{err}");
        slowest_answer = slowest_answer.max(at.duration_since(released_at));
    }
    eprintln!(
        "{N} releases with running commands: all released in {slowest_release:?}, \
         every exec answered in {slowest_answer:?}"
    );
    // A hang detector, not a benchmark: the commands ran for 600 s.
    assert!(
        slowest_release < Duration::from_secs(10),
        "{slowest_release:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_sleepers() > before {
        assert!(
            Instant::now() < deadline,
            "a released session's sleep 600 survived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The worker serves creates and execs as before.
    create_session(&nats, "w1", "after").await;
    let started = Instant::now();
    let r = client
        .exec(&id("after"), &ExecRequest::cmd("echo ok"))
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"ok\n");
    eprintln!("exec after the releases: {:?}", started.elapsed());
}

/// The VM ids a worker holds (a `list_vms` job).
async fn vm_ids(nats: &async_nats::Client, worker: &str) -> Vec<String> {
    match job(nats, worker, JobOp::ListVms {}).await.unwrap() {
        JobOutput::Vms { vms } => vms.into_iter().map(|v| v.vm_id.to_string()).collect(),
        other => panic!("expected vms, got {other:?}"),
    }
}

/// Fills a session's volume with many small files, so archiving it (a backup or a snapshot)
/// takes a while, and stops it.
async fn stopped_with_many_files(nats: &async_nats::Client, client: &HearthClient, sid: &str) {
    create_session(nats, "w1", sid).await;
    let r = client
        .exec(
            &id(sid),
            &ExecRequest::cmd("mkdir many && cd many && seq 1 40000 | xargs touch && echo ok"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout.as_bytes(), b"ok\n", "{r:?}");
    job(nats, "w1", JobOp::StopVm { vm_id: id(sid) })
        .await
        .unwrap();
}

async fn evicted_ids(events: &mut async_nats::Subscriber, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && out.len() < n {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(1), events.next()).await
        else {
            continue;
        };
        let ev: VmEvent = Encoding::MsgPack.decode(&msg.payload).unwrap();
        if ev.reason == Some(TerminationReason::Evicted) {
            out.push(ev.vm_id.to_string());
        }
    }
    out
}

#[tokio::test]
async fn eviction_spares_a_vm_that_became_busy_and_never_holds_other_creates_back() {
    let (_server, nats, client) = setup().await;
    let backups = tempfile::tempdir().unwrap();
    let backup_dir = backups.path().to_owned();
    let _n = node_with(&nats, "w1", |c| {
        c.max_vms = 3;
        c.backup_dir = Some(backup_dir);
    })
    .await;
    let mut events = nats.subscribe("hearth.v1.events.vms.w1").await.unwrap();

    // 1. "a" is the oldest stopped VM, but something holds its lock (a snapshot of its many
    //    files) and an exec waits behind it to resume it. A create at capacity must not take
    //    it: it evicts "b" instead, and the exec on "a" keeps its VM.
    stopped_with_many_files(&nats, &client, "a").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    create_session(&nats, "w1", "b").await;
    job(&nats, "w1", JobOp::StopVm { vm_id: id("b") })
        .await
        .unwrap();
    create_session(&nats, "w1", "c").await;
    let snapshot = {
        let nats = nats.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let op = JobOp::SnapshotVm {
                vm_id: id("a"),
                snapshot_id: id("snap-a"),
                publish: false,
            };
            let out = job(&nats, "w1", op).await;
            (out, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let exec = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .exec(&id("a"), &ExecRequest::cmd("ls many | wc -l"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let t0 = Instant::now();
    create_session(&nats, "w1", "d").await;
    let create_d = t0.elapsed();
    let (snap, snap_took) = snapshot.await.unwrap();
    snap.unwrap();
    let r = exec.await.unwrap().unwrap();
    assert_eq!(r.stdout.as_bytes(), b"40000\n");
    println!("snapshot of a: {snap_took:?}; create d (evicting b): {create_d:?}");
    assert_eq!(evicted_ids(&mut events, 1).await, vec!["b".to_owned()]);
    let ids = vm_ids(&nats, "w1").await;
    assert!(ids.contains(&"a".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"b".to_owned()), "{ids:?}");
    // "a" ran the exec and is running: a create at capacity now has nothing to evict.
    let full = job(
        &nats,
        "w1",
        JobOp::CreateVm {
            vm_id: id("e"),
            session: true,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(full.code, ErrorCode::NoCapacity);

    // 2. Two creates at capacity: the first evicts "a" (a slow backup of its many files), the
    //    second evicts "c" and must not wait for that backup.
    job(&nats, "w1", JobOp::StopVm { vm_id: id("a") })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    job(&nats, "w1", JobOp::StopVm { vm_id: id("c") })
        .await
        .unwrap();
    let t0 = Instant::now();
    let first = {
        let nats = nats.clone();
        tokio::spawn(async move {
            create_session(&nats, "w1", "f").await;
            t0.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    create_session(&nats, "w1", "g").await;
    let second = t0.elapsed();
    let first = first.await.unwrap();
    println!(
        "create f (evicting a, backup of 40000 files): {first:?}; create g (evicting c): {second:?}"
    );
    assert!(
        second < first,
        "the second create waited behind the first one's eviction: {second:?} >= {first:?}"
    );
    let mut evicted = evicted_ids(&mut events, 2).await;
    evicted.sort();
    assert_eq!(evicted, vec!["a".to_owned(), "c".to_owned()]);
    let ids = vm_ids(&nats, "w1").await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    let backups: Vec<_> = std::fs::read_dir(backups.path()).unwrap().collect();
    assert_eq!(backups.len(), 3, "one backup per evicted volume");
}

#[tokio::test]
async fn a_job_waiting_for_a_busy_vm_holds_no_job_slot() {
    let (_server, nats, client) = setup().await;
    let _w = node_with(&nats, "w1", |c| c.job_concurrency = 1).await;
    create_session(&nats, "w1", "busy").await;
    // A command holds busy's lock for 5 s.
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.exec(&id("busy"), &ExecRequest::cmd("sleep 5")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A job on busy waits for its lock...
    let waiting = {
        let nats = nats.clone();
        tokio::spawn(async move { job(&nats, "w1", JobOp::StartVm { vm_id: id("busy") }).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...without taking the worker's only job slot: a create elsewhere goes ahead.
    let started = Instant::now();
    create_session(&nats, "w1", "other").await;
    let took = started.elapsed();
    assert!(
        !running.is_finished(),
        "the command ended before the create was measured"
    );
    assert!(
        took < Duration::from_secs(4),
        "a create waited {took:?} behind a job queued on another vm"
    );
    running.await.unwrap().unwrap();
    // Its turn came after the command: a start of a running VM is a conflict.
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err:?}");
}

/// `$SRV.STATS.hearth-worker`'s entry for `endpoint` (summed over endpoints of that name).
async fn endpoint_stats(nats: &async_nats::Client, endpoint: &str) -> (u64, u64, String) {
    let stats = nats
        .request("$SRV.STATS.hearth-worker", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let mut out = (0, 0, String::new());
    for e in stats["endpoints"].as_array().unwrap() {
        if e["name"] == endpoint {
            out.0 += e["num_requests"].as_u64().unwrap();
            out.1 += e["num_errors"].as_u64().unwrap();
            if let Some(last) = e["last_error"].as_str().filter(|s| !s.is_empty()) {
                out.2 = last.to_owned();
            }
        }
    }
    out
}

#[tokio::test]
async fn srv_stats_count_error_replies_and_the_error_body_still_arrives() {
    let (_server, nats, client) = setup().await;
    let _n = node(&nats, "w1").await;
    assert_eq!(endpoint_stats(&nats, "jobs").await, (0, 0, String::new()));
    // A 400 (undecodable job) and a 404 (start of an unknown VM).
    let bad = nats
        .request(
            Subjects::default().worker_jobs(&id("w1")),
            "not msgpack".into(),
        )
        .await
        .unwrap();
    let err = decode_reply::<JobReply>(&bad).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    let err = job(&nats, "w1", JobOp::StartVm { vm_id: id("nope") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("nope"), "the body is kept: {err:?}");
    job(&nats, "w1", JobOp::ListVms {}).await.unwrap();
    let (requests, errors, last) = endpoint_stats(&nats, "jobs").await;
    assert_eq!((requests, errors), (3, 2), "jobs stats");
    assert!(last.contains("nope"), "last_error: {last:?}");

    // The data plane too: an exec without a program is a 400.
    create_session(&nats, "w1", "st").await;
    let err = client
        .exec(&id("st"), &ExecRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    client
        .exec(&id("st"), &ExecRequest::argv(["true"]))
        .await
        .unwrap();
    let (requests, errors, _) = endpoint_stats(&nats, "exec").await;
    assert_eq!((requests, errors), (2, 1), "exec stats");
}

/// A worker whose provider comes from its config (`open_provider`), as the binary opens it.
async fn node_from_config(
    nats: &async_nats::Client,
    name: &str,
    tweak: impl FnOnce(&mut WorkerConfig),
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut config = WorkerConfig::new(id(name), dir.path());
    config.heartbeat_interval = Duration::from_millis(200);
    tweak(&mut config);
    let provider = hearth_worker::open_provider(&config).unwrap();
    let worker = Worker::start(config, nats.clone(), provider).await.unwrap();
    Node {
        _worker: worker,
        _dir: dir,
    }
}

#[tokio::test]
async fn the_worker_wide_shell_shell_args_and_env_apply_to_cmd_execs() {
    let (_server, nats, client) = setup().await;
    let _n = node_from_config(&nats, "w1", |c| {
        c.shell = Some("/bin/sh".into());
        c.shell_args = vec!["-x".into(), "-c".into()];
        c.env = BTreeMap::from([
            ("WORKER_WIDE".into(), "w".into()),
            ("OVERRIDE".into(), "worker".into()),
        ]);
    })
    .await;
    create_session(&nats, "w1", "sh").await;
    let mut req = ExecRequest::cmd("echo $WORKER_WIDE $OVERRIDE");
    req.env = BTreeMap::from([("OVERRIDE".into(), "request".into())]);
    let out = client.exec(&id("sh"), &req).await.unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(
        out.stdout.to_string_lossy().trim(),
        "w request",
        "the worker env sits under the request's"
    );
    assert!(
        out.stderr.to_string_lossy().contains("+ echo"),
        "shell_args (-x) were used: {:?}",
        out.stderr.to_string_lossy()
    );
    // An argv exec is not run through the shell.
    let out = client
        .exec(
            &id("sh"),
            &ExecRequest::argv(["sh", "-c", "echo $WORKER_WIDE"]),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.to_string_lossy().trim(), "w");
    assert!(out.stderr.is_empty(), "{:?}", out.stderr.to_string_lossy());
}

#[tokio::test]
async fn an_empty_bootstrap_is_a_no_op() {
    let (_server, nats, _client) = setup().await;
    let _n = node(&nats, "w1").await;
    let vm = vm_of(
        job(
            &nats,
            "w1",
            JobOp::CreateVmWithSpec {
                vm_id: id("eb"),
                spec: VmSpec {
                    bootstrap: Some(vec![]),
                    ..Default::default()
                },
                session: false,
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(vm.state, VmState::Running);
}

#[tokio::test]
async fn heartbeats_carry_the_provider_version() {
    let (_server, nats, _client) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = WorkerConfig::new(id("wf"), dir.path());
    config.heartbeat_interval = Duration::from_millis(100);
    let mut beats = nats.subscribe("hearth.v1.workers.wf.status").await.unwrap();
    let provider = Arc::new(hearth_worker::provider::FakeProvider::default());
    let want = hearth_worker::provider::VmProvider::version(provider.as_ref());
    assert!(want.is_some());
    let _worker = Worker::start(config, nats.clone(), provider).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), beats.next())
        .await
        .unwrap()
        .unwrap();
    let status: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
    assert_eq!(status.versions.provider, want);
}

#[tokio::test]
async fn get_vm_list_snapshots_and_backup_vm_are_jobs() {
    let (_server, nats, _client) = setup().await;
    let backups = tempfile::tempdir().unwrap();
    let backup_dir = backups.path().to_path_buf();
    let _n = node_with(&nats, "w1", |c| c.backup_dir = Some(backup_dir)).await;
    create_session(&nats, "w1", "gv").await;
    let vm = vm_of(
        job(&nats, "w1", JobOp::GetVm { vm_id: id("gv") })
            .await
            .unwrap(),
    );
    assert_eq!((vm.vm_id.as_str(), vm.session), ("gv", true));
    let err = job(&nats, "w1", JobOp::GetVm { vm_id: id("nope") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);

    let snapshots = |out: JobOutput| match out {
        JobOutput::Snapshots { snapshots } => snapshots,
        other => panic!("{other:?}"),
    };
    let all = job(&nats, "w1", JobOp::ListSnapshots { vm_id: None }).await;
    assert!(snapshots(all.unwrap()).is_empty());
    for (snap, publish) in [("s-local", false), ("s-pub", true)] {
        job(
            &nats,
            "w1",
            JobOp::SnapshotVm {
                vm_id: id("gv"),
                snapshot_id: id(snap),
                publish,
            },
        )
        .await
        .unwrap();
    }
    let of_vm = snapshots(
        job(
            &nats,
            "w1",
            JobOp::ListSnapshots {
                vm_id: Some(id("gv")),
            },
        )
        .await
        .unwrap(),
    );
    let listed: Vec<(&str, bool)> = of_vm
        .iter()
        .map(|s| (s.snapshot_id.as_str(), s.published))
        .collect();
    assert_eq!(listed, [("s-local", false), ("s-pub", true)]);
    assert_eq!(of_vm[0].source_vm.as_ref().map(|v| v.as_str()), Some("gv"));
    let err = job(
        &nats,
        "w1",
        JobOp::ListSnapshots {
            vm_id: Some(id("nope")),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);

    job(&nats, "w1", JobOp::BackupVm { vm_id: id("gv") })
        .await
        .unwrap();
    assert_eq!(std::fs::read_dir(backups.path()).unwrap().count(), 1);
    let vm = vm_of(
        job(&nats, "w1", JobOp::GetVm { vm_id: id("gv") })
            .await
            .unwrap(),
    );
    assert_eq!(vm.state, VmState::Running, "a backup leaves the VM running");
}

#[tokio::test]
async fn backup_vm_without_a_backup_dir_is_a_conflict() {
    let (_server, nats, _client) = setup().await;
    let _n = node(&nats, "w1").await;
    create_session(&nats, "w1", "nb").await;
    let err = job(&nats, "w1", JobOp::BackupVm { vm_id: id("nb") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
}

#[tokio::test]
async fn a_nix_profile_is_hydrated_when_the_vm_has_nix_and_noted_either_way() {
    let (_server, nats, _client) = setup().await;
    let _n = node(&nats, "w1").await;
    let create = |vm: &'static str, base: Option<String>, profile: &'static str| {
        let nats = nats.clone();
        async move {
            vm_of(
                job(
                    &nats,
                    "w1",
                    JobOp::CreateVmWithSpec {
                        vm_id: id(vm),
                        spec: VmSpec {
                            base,
                            env: BTreeMap::from([(
                                "PATH".into(),
                                "/workspace/bin:/usr/local/bin:/usr/bin:/bin".into(),
                            )]),
                            nix_profile: Some(profile.into()),
                            ..Default::default()
                        },
                        session: false,
                    },
                )
                .await
                .unwrap(),
            )
        }
    };
    // No nix in the sandbox: created anyway, with a note saying so.
    let vm = create("nonix", None, "github:o/r").await;
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.notes.len(), 1, "{:?}", vm.notes);
    assert!(
        vm.notes[0].contains("nix is not installed"),
        "{:?}",
        vm.notes
    );

    // A `nix` on the VM's PATH (a script in the base image): run as `nix develop <profile>
    // --command true`; its failure is a warning and a note, not a failed create.
    let base = tempfile::tempdir().unwrap();
    std::fs::create_dir(base.path().join("bin")).unwrap();
    let script = base.path().join("bin/nix");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"$@\" > nix-args\n[ \"$2\" = ok ] && exit 0\necho boom >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = Some(base.path().display().to_string());
    let vm = create("nixok", base.clone(), "ok").await;
    assert_eq!(vm.notes, ["nix_profile \"ok\" hydrated"]);
    let vm = create("nixbad", base, "bad").await;
    assert_eq!(vm.state, VmState::Running);
    assert!(
        vm.notes[0].contains("exited 3") && vm.notes[0].contains("boom"),
        "{:?}",
        vm.notes
    );
}
