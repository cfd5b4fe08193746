//! Stop and start on the `oci` provider are freeze and thaw: a stopped VM's container keeps its
//! processes and their memory (frozen in a freezer cgroup of Hearth's), and start lets them go on
//! where they were. Attacked the way a hostile session or a host accident would: a fork loop does
//! not hold a stop off nor progress while stopped, a stopped container is destroyed at once
//! leaving no process, container, cgroup, bundle or mount, a container killed while frozen fails
//! its VM (with the runtime's exit code) when it is started instead of being reported running
//! (one that died before a stop fails it at the stop or at the start after it),
//! and the frozen container of a worker killed with SIGKILL is killed and replaced when the
//! worker comes back (the VM keeps its files; its processes, whose agent channel died with the
//! worker, do not survive). Real crun, a real nats-server where messages are involved. Skips,
//! with the reason printed, without crun or tini.

mod oci_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hearth_messages::processes::ProcessStartRequest;
use hearth_messages::transport::decode_reply;
use hearth_messages::{
    Encoding, ErrorCode, ExecRequest, HearthClient, JobOp, JobOutput, JobReply, JobRequest,
    SessionId, Subjects, WireError, WorkerStatus,
};
use hearth_testkit::NatsServer;
use hearth_worker::provider::{
    ExecSpec, ProcessAnswer, ProcessCall, ProcessProvider, ProviderErrorKind, SnapshotId, VmId,
    VmProvider, VmQuery, VmRuntime, VmSpec, VmState,
};
use hearth_worker::{Worker, WorkerConfig};
use oci_support::{containers, wait_containers};

const FREEZER: &str = "/sys/fs/cgroup/freezer";

fn vm(id: &str) -> VmId {
    VmId::new(id).unwrap()
}

fn id<T: TryFrom<String>>(s: impl Into<String>) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.into()).unwrap()
}

fn volume(root: &Path, id: &VmId) -> PathBuf {
    root.join("vms").join(id.as_str()).join("volume")
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits (bounded) until the number in `path` reaches `at_least`.
async fn wait_number(path: &Path, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = read_number(path);
        if n >= at_least {
            return n;
        }
        assert!(Instant::now() < deadline, "{} stuck at {n}", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A shell loop that counts in memory (its variable) and writes the count to `file` in the
/// volume after every step; `marker` makes its command line findable on the host.
fn counter(file: &str, marker: &str) -> String {
    format!(
        "i=0; while :; do i=$((i+1)); echo $i > {file}.tmp && mv {file}.tmp {file}; \
         sleep 0.02; done # {marker}"
    )
}

/// Starts `cmd` as a background process of `vm_id`; its process id.
async fn start_process(p: &ProcessProvider, vm_id: &VmId, cmd: String) -> String {
    let call = ProcessCall::Start {
        request: ProcessStartRequest {
            cmd: Some(cmd),
            ..ProcessStartRequest::default()
        },
        ring_bytes: 1 << 16,
        max_running: 8,
    };
    match p.process(vm_id, call, Duration::ZERO).await.unwrap() {
        ProcessAnswer::Started(started) => started.process_id,
        other => panic!("{other:?}"),
    }
}

/// Host pids whose command line contains `marker`.
fn host_pids(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .filter(|pid| {
            // Zombies are gone already, only not yet reaped.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
        .collect()
}

/// Waits (bounded) until no live host process carries `marker`.
async fn wait_no_process(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = host_pids(marker);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The freezer cgroups holding a process that carries `marker`, with their state.
fn freezer_cgroups_of(marker: &str) -> Vec<(PathBuf, String)> {
    let pids = host_pids(marker);
    std::fs::read_dir(FREEZER)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hearth-pause-"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|procs| {
                procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .any(|p| pids.contains(&p))
            })
        })
        .map(|e| {
            let state = std::fs::read_to_string(e.path().join("freezer.state")).unwrap_or_default();
            (e.path(), state.trim().to_owned())
        })
        .collect()
}

/// The host's cgroup directories (every v1 hierarchy) that `pid` is in, below the roots.
fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let hierarchy = controllers.split(',').next()?.trim_start_matches("name=");
            (path != "/" && !hierarchy.is_empty())
                .then(|| Path::new("/sys/fs/cgroup").join(hierarchy).join(&path[1..]))
        })
        .filter(|dir| dir.is_dir())
        .collect()
}

/// Mounts of the host's mount namespace under `root`.
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| m.starts_with(&root))
        })
        .map(str::to_owned)
        .collect()
}

fn freezer_mounted() -> bool {
    Path::new(FREEZER).join("cgroup.procs").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_is_frozen_and_start_thaws_it_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let id = vm("keeper");
    let Some((p, root)) = oci_support::open_with_vm(dir.path(), &id).await else {
        return;
    };
    let container = containers(&root);
    let marker = "hearth-test-keeper-6f1d";
    let process_id = start_process(&p, &id, counter("count", marker)).await;
    p.put_file(&id, "kept.txt", b"kept", None).await.unwrap();
    let count = volume(&root, &id).join("count");
    wait_number(&count, 5).await;

    let view = p.stop_vm(&id).await.unwrap();
    assert_eq!(view.state, VmState::Stopped);
    let at_stop = read_number(&count);
    if freezer_mounted() {
        let frozen = freezer_cgroups_of(marker);
        assert_eq!(frozen.len(), 1, "{frozen:?}");
        assert_eq!(frozen[0].1, "FROZEN", "{frozen:?}");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        read_number(&count),
        at_stop,
        "a stopped container makes no progress"
    );
    // The same container, kept (not removed and not replaced).
    assert_eq!(containers(&root), container);
    // The contract: a stopped VM runs nothing until started.
    let err = p
        .exec(&id, ExecSpec::shell("true"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");

    // A snapshot of the stopped VM, restored beside it: its files.
    p.snapshot_vm(&id, &SnapshotId::new("stopped-snap").unwrap())
        .await
        .unwrap();
    let copy = vm("copy");
    p.create_vm_with_spec(
        &copy,
        &VmSpec {
            restore_from: Some(SnapshotId::new("stopped-snap").unwrap()),
            ..VmSpec::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(p.get_file(&copy, "kept.txt", 100).await.unwrap(), b"kept");
    assert!(read_number(&volume(&root, &copy).join("count")) >= 5);
    p.destroy_vm(&copy).await.unwrap();
    assert_eq!(read_number(&count), at_stop, "still frozen");

    let view = p.start_vm(&id).await.unwrap();
    assert_eq!(view.state, VmState::Running);
    // The loop goes on from its count in memory: a new process would start again at 1.
    let after = wait_number(&count, at_stop + 1).await;
    assert!(after <= at_stop + 20, "from {at_stop} to {after}");
    let listed = match p
        .process(&id, ProcessCall::List {}, Duration::ZERO)
        .await
        .unwrap()
    {
        ProcessAnswer::List(list) => list.processes,
        other => panic!("{other:?}"),
    };
    assert!(
        listed
            .iter()
            .any(|p| p.process_id == process_id && !p.exited),
        "{listed:?}"
    );
    assert_eq!(containers(&root), container);
    if freezer_mounted() {
        assert!(freezer_cgroups_of(marker).is_empty(), "thawed and removed");
    }
    let out = p
        .exec(&id, ExecSpec::shell("cat kept.txt"), None)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"kept");
    assert_eq!(p.get_file(&id, "kept.txt", 100).await.unwrap(), b"kept");

    // Twenty cycles lose nothing.
    for cycle in 1..=20 {
        let out = p
            .exec(
                &id,
                ExecSpec::shell(format!("echo cycle-{cycle} >> cycles.log")),
                None,
            )
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0);
        p.stop_vm(&id).await.unwrap();
        p.start_vm(&id).await.unwrap();
    }
    let out = p
        .exec(&id, ExecSpec::shell("wc -l < cycles.log"), None)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "20");
    assert_eq!(containers(&root), container);
    p.destroy_vm(&id).await.unwrap();
    wait_no_process(marker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_is_destroyed_at_once_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("oci");
    let Some(p) = oci_support::open(&root) else {
        return;
    };
    let p = Arc::new(p);
    let id = vm("doomed");
    p.create_vm(&id).await.unwrap();
    let marker = "hearth-test-doomed-83a2";
    start_process(&p, &id, counter("count", marker)).await;
    wait_number(&volume(&root, &id).join("count"), 2).await;
    // A foreground command in flight too (another caller's exec, at the provider level).
    let running = {
        let (p, id) = (p.clone(), id.clone());
        tokio::spawn(async move {
            p.exec(
                &id,
                ExecSpec::shell(format!("touch started; sleep 600 # {marker}")),
                None,
            )
            .await
        })
    };
    while !volume(&root, &id).join("started").exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pids = host_pids(marker);
    assert!(pids.len() >= 2, "{pids:?}");
    let cgroups: Vec<PathBuf> = pids.iter().flat_map(|pid| cgroup_dirs(*pid)).collect();
    p.stop_vm(&id).await.unwrap();
    let frozen: Vec<PathBuf> = freezer_cgroups_of(marker)
        .into_iter()
        .map(|(dir, _)| dir)
        .collect();
    if freezer_mounted() {
        assert!(!frozen.is_empty());
    }

    tokio::time::timeout(Duration::from_secs(20), p.destroy_vm(&id))
        .await
        .expect("destroying a stopped vm does not hang")
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the exec of a destroyed stopped vm ends")
        .unwrap();
    assert!(ended.as_ref().map_or(true, |o| !o.success()), "{ended:?}");
    wait_no_process(marker).await;
    wait_containers(&root, <[_]>::is_empty).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<&PathBuf> = frozen
            .iter()
            .chain(&cgroups)
            .filter(|dir| dir.exists())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "cgroups left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_dir(root.join("bundles")).unwrap().count(), 0);
    assert!(!root.join("vms/doomed").exists());
    assert_eq!(mounts_under(&root), Vec::<String>::new());
    assert_eq!(
        p.get_vm(&id).await.unwrap().map(|v| v.state),
        Some(VmState::Destroyed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_loop_neither_holds_off_a_stop_nor_runs_while_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("oci");
    let Some(p) = oci_support::open(&root) else {
        return;
    };
    let id = vm("forker");
    p.create_vm(&id).await.unwrap();
    let marker = "hearth-test-forker-1c9e";
    // Forks as fast as it can (a subshell that forks an orphan each round: the tree changes
    // under the freezer all the time), counting the rounds. Short-lived, so it stays under the
    // process limit, where a shell that cannot fork gives up.
    start_process(
        &p,
        &id,
        format!("n=0; while :; do n=$((n+1)); ( true & ); echo $n > forked; done # {marker}"),
    )
    .await;
    let forked = volume(&root, &id).join("forked");
    wait_number(&forked, 50).await;
    for _ in 0..3 {
        let stopped = tokio::time::timeout(Duration::from_secs(30), p.stop_vm(&id))
            .await
            .expect("a fork loop does not hold a stop off");
        assert_eq!(stopped.unwrap().state, VmState::Stopped);
        let at_stop = read_number(&forked);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(read_number(&forked), at_stop, "no forks while stopped");
        p.start_vm(&id).await.unwrap();
        wait_number(&forked, at_stop + 10).await;
    }
    p.stop_vm(&id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), p.destroy_vm(&id))
        .await
        .expect("destroy does not hang")
        .unwrap();
    wait_no_process(marker).await;
    wait_containers(&root, <[_]>::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_while_stopped_fails_its_vm_when_started() {
    let dir = tempfile::tempdir().unwrap();
    let id = vm("victim");
    let Some((p, root)) = oci_support::open_with_vm(dir.path(), &id).await else {
        return;
    };
    let (container, _) = containers(&root).remove(0);
    p.stop_vm(&id).await.unwrap();
    // Killed from the host while frozen: the kill waits for the thaw.
    oci_support::crun_kill(&root, &container);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.get_vm(&id).await.unwrap().map(|v| v.state),
        Some(VmState::Stopped),
        "nothing dies while frozen"
    );
    // The start thaws it, sees it die and says so: never "running".
    let err = p.start_vm(&id).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    assert!(
        err.to_string()
            .contains("vm victim failed: the container exited with code 137"),
        "{err}"
    );
    assert_eq!(
        p.get_vm(&id).await.unwrap().map(|v| v.state),
        Some(VmState::Destroyed)
    );
    let err = p
        .exec(&id, ExecSpec::shell("true"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
    wait_containers(&root, <[_]>::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_died_is_not_hidden_by_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let id = vm("gone");
    let Some((p, root)) = oci_support::open_with_vm(dir.path(), &id).await else {
        return;
    };
    let (container, _) = containers(&root).remove(0);
    oci_support::crun_kill(&root, &container);
    wait_containers(&root, |l| l.iter().all(|(_, status)| status != "running")).await;
    // Stopped once it is dead: the stop says the VM failed (it, or the watcher, saw it), or —
    // when the agent's end of the channel has not been seen closing yet — the start that thaws
    // it does. Never a stopped VM whose next start quietly runs a new container.
    let err = match p.stop_vm(&id).await {
        Err(err) => err,
        Ok(view) => {
            assert_eq!(view.state, VmState::Stopped);
            p.start_vm(&id).await.unwrap_err()
        }
    };
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    assert!(
        err.to_string().contains("vm gone failed: the container"),
        "{err}"
    );
    assert_eq!(
        p.get_vm(&id).await.unwrap().map(|v| v.state),
        Some(VmState::Destroyed)
    );
    let err = p.start_vm(&id).await.unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::InvalidState, "{err}");
    wait_containers(&root, <[_]>::is_empty).await;
}

async fn job(nats: &async_nats::Client, worker: &str, op: JobOp) -> Result<JobOutput, WireError> {
    let request = JobRequest {
        job_id: id(format!("j-{}", uuid::Uuid::new_v4())),
        op,
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let subject = Subjects::default().worker_jobs(&id(worker));
    let msg = tokio::time::timeout(
        Duration::from_secs(60),
        nats.request(subject, payload.into()),
    )
    .await
    .expect("job reply in time")
    .expect("job request");
    decode_reply::<JobReply>(&msg).map(|r| r.output)
}

fn state_of(out: JobOutput) -> hearth_messages::VmState {
    match out {
        JobOutput::Vm { vm } => vm.state,
        other => panic!("expected a vm, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_oci_session_resumes_on_exec_and_files_with_its_processes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("oci");
    let Some(provider) = oci_support::open(&root) else {
        return;
    };
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    let mut config = WorkerConfig::new(id("wo"), dir.path());
    config.heartbeat_interval = Duration::from_millis(200);
    let provider: Arc<dyn VmRuntime> = Arc::new(provider);
    let _worker = Worker::start(config, nats.clone(), provider).await.unwrap();

    let sid: SessionId = id("s1");
    job(
        &nats,
        "wo",
        JobOp::CreateVm {
            vm_id: id("s1"),
            session: true,
        },
    )
    .await
    .unwrap();
    let marker = "hearth-test-session-5b7a";
    let started = client
        .start_process(
            &sid,
            &ProcessStartRequest {
                cmd: Some(counter("count", marker)),
                ..ProcessStartRequest::default()
            },
        )
        .await
        .unwrap();
    let count = volume(&root, &vm("s1")).join("count");
    wait_number(&count, 3).await;

    // Stopped by a job (the scheduler's idle stop), resumed by an exec.
    let stopped = job(&nats, "wo", JobOp::StopVm { vm_id: id("s1") })
        .await
        .unwrap();
    assert_eq!(state_of(stopped), hearth_messages::VmState::Stopped);
    let at_stop = read_number(&count);
    let out = client
        .exec(&sid, &ExecRequest::cmd("cat count"))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    let seen: u64 = out
        .stdout
        .as_bytes()
        .trim_ascii()
        .iter()
        .fold(0, |n, d| n * 10 + u64::from(d - b'0'));
    assert!(
        seen >= at_stop && seen <= at_stop + 20,
        "{at_stop} then {seen}"
    );
    let processes = client.list_processes(&sid).await.unwrap();
    let same = processes
        .iter()
        .find(|p| p.process_id == started.process_id)
        .expect("the background process is still there");
    assert!(!same.exited, "{same:?}");
    assert_eq!(same.pid, started.pid);

    // Stopped again, resumed by a file transfer; a start job (keepalive) thaws it too.
    job(&nats, "wo", JobOp::StopVm { vm_id: id("s1") })
        .await
        .unwrap();
    let data = client.get_file(&sid, "count").await.unwrap();
    assert!(!data.is_empty());
    job(&nats, "wo", JobOp::StopVm { vm_id: id("s1") })
        .await
        .unwrap();
    let at_stop = read_number(&count);
    let started_again = job(&nats, "wo", JobOp::StartVm { vm_id: id("s1") })
        .await
        .unwrap();
    assert_eq!(state_of(started_again), hearth_messages::VmState::Running);
    wait_number(&count, at_stop + 1).await;
    // Bad input on a stopped session is answered, and leaves it stopped.
    job(&nats, "wo", JobOp::StopVm { vm_id: id("s1") })
        .await
        .unwrap();
    let err = job(&nats, "wo", JobOp::StopVm { vm_id: id("s1") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict, "{err}");
    let err = job(&nats, "wo", JobOp::StopVm { vm_id: id("nope") })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err}");
    let err = client
        .exec(&sid, &ExecRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err:?}");
    let view = job(&nats, "wo", JobOp::GetVm { vm_id: id("s1") })
        .await
        .unwrap();
    assert_eq!(state_of(view), hearth_messages::VmState::Stopped);
    job(
        &nats,
        "wo",
        JobOp::DestroyVm {
            vm_id: id("s1"),
            backup: false,
            reason: None,
        },
    )
    .await
    .unwrap();
    wait_no_process(marker).await;
    wait_containers(&root, <[_]>::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frozen_container_of_a_killed_worker_is_replaced_when_it_restarts() {
    if let Err(reason) = oci_support::config() {
        eprintln!("skipping oci test: {reason}");
        return;
    }
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let client = HearthClient::new(nats.clone());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("oci");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hearth-worker"))
            .args([
                "--nats-url",
                server.url(),
                "--worker-id",
                "wk",
                "--provider",
                "oci",
                "--metrics-listen",
                "off",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut beats = nats.subscribe("hearth.v1.workers.wk.status").await.unwrap();
    let mut child = spawn();
    tokio::time::timeout(Duration::from_secs(30), beats.next())
        .await
        .expect("first heartbeat");
    let sid: SessionId = id("frozen");
    job(
        &nats,
        "wk",
        JobOp::CreateVm {
            vm_id: id("frozen"),
            session: true,
        },
    )
    .await
    .unwrap();
    let marker = "hearth-test-orphan-4e0b";
    client
        .start_process(
            &sid,
            &ProcessStartRequest {
                cmd: Some(counter("count", marker)),
                ..ProcessStartRequest::default()
            },
        )
        .await
        .unwrap();
    client
        .put_file(&sid, "note", b"kept".to_vec(), None)
        .await
        .unwrap();
    wait_number(&volume(&root, &vm("frozen")).join("count"), 2).await;
    job(
        &nats,
        "wk",
        JobOp::StopVm {
            vm_id: id("frozen"),
        },
    )
    .await
    .unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // What the killed worker leaves: its container, frozen, with nobody to thaw it.
    assert!(!host_pids(marker).is_empty());
    assert_eq!(containers(&root).len(), 1);
    let frozen: Vec<PathBuf> = freezer_cgroups_of(marker)
        .into_iter()
        .map(|(dir, _)| dir)
        .collect();
    if freezer_mounted() {
        assert_eq!(frozen.len(), 1);
    }

    let mut child = spawn();
    let status: WorkerStatus = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), beats.next())
            .await
            .unwrap()
            .unwrap();
        let s: WorkerStatus = Encoding::MsgPack.decode(&msg.payload).unwrap();
        if s.seq == 0 || s.inventory.as_ref().is_some_and(|d| d.count > 0) {
            break s;
        }
    };
    assert_eq!(status.used_vms, 1, "{status:?}");
    // Killed and removed at open: no process, no container, no freezer cgroup.
    wait_no_process(marker).await;
    assert_eq!(containers(&root), Vec::<(String, String)>::new());
    assert!(frozen.iter().all(|dir| !dir.exists()), "{frozen:?}");
    let view = job(
        &nats,
        "wk",
        JobOp::GetVm {
            vm_id: id("frozen"),
        },
    )
    .await
    .unwrap();
    assert_eq!(state_of(view), hearth_messages::VmState::Stopped);
    // The first exec starts a new container on the kept volume.
    let out = client
        .exec(&sid, &ExecRequest::cmd("cat note"))
        .await
        .unwrap();
    assert_eq!(out.stdout.as_bytes(), b"kept");
    assert_eq!(containers(&root).len(), 1);
    let processes = client.list_processes(&sid).await.unwrap();
    assert!(processes.is_empty(), "{processes:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    wait_containers(&root, <[_]>::is_empty).await;
    hearth_testkit::unmount_under(dir.path());
}
