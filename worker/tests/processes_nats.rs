//! Background processes over a real nats-server with the process provider (the guest agent in
//! its hardened sandbox): they outlive the client that started them and are reattached by
//! another, take stdin, get signals, run on a real PTY, keep bounded output, end with their
//! session within a second, and every bad input gets its code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use hearth_messages::processes::{ProcessStartRequest, PtySize};
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

struct Env {
    _server: NatsServer,
    server_url: String,
    nats: async_nats::Client,
    client: HearthClient,
    _worker: Worker,
    _dir: tempfile::TempDir,
}

async fn env_with(tweak: impl FnOnce(&mut WorkerConfig)) -> Env {
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = WorkerConfig::new(id("wp"), dir.path());
    config.heartbeat_interval = Duration::from_millis(200);
    config.drain_grace = Duration::from_secs(2);
    tweak(&mut config);
    let provider: Arc<dyn VmRuntime> =
        Arc::new(ProcessProvider::open(ProcessConfig::new(dir.path().join("process"))).unwrap());
    let worker = Worker::start(config, nats.clone(), provider).await.unwrap();
    Env {
        server_url: server.url().to_owned(),
        _server: server,
        client: HearthClient::new(nats.clone()),
        nats,
        _worker: worker,
        _dir: dir,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

async fn job(nats: &async_nats::Client, op: JobOp) -> Result<JobOutput, WireError> {
    let subject = Subjects::default().worker_jobs(&id("wp"));
    let request = JobRequest {
        job_id: id(format!("j-{}", uuid::Uuid::new_v4())),
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
    transport::decode_reply::<JobReply>(&msg).map(|r| r.output)
}

async fn session(e: &Env, sid: &str) -> SessionId {
    job(
        &e.nats,
        JobOp::CreateVm {
            vm_id: id(sid),
            session: true,
        },
    )
    .await
    .unwrap();
    id(sid)
}

fn cmd(cmd: &str) -> ProcessStartRequest {
    ProcessStartRequest {
        cmd: Some(cmd.into()),
        ..ProcessStartRequest::default()
    }
}

fn code(err: ClientError) -> u16 {
    err.code().expect("a service error").as_u16()
}

/// Reads followed output until `needle` appears (or the process ends); everything seen.
async fn read_until(
    events: &mut (impl Stream<Item = Result<ProcessEvent, ClientError>> + Unpin),
    seen: &mut String,
    needle: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains(needle) {
        assert!(Instant::now() < deadline, "{needle:?} not seen in {seen:?}");
        match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
            Ok(Some(Ok(ProcessEvent::Output { data, .. }))) => {
                seen.push_str(&String::from_utf8_lossy(&data))
            }
            Ok(Some(Ok(ProcessEvent::Exited(info)))) => {
                panic!("ended ({info:?}) before {needle:?}: {seen:?}")
            }
            other => panic!("follow failed before {needle:?}: {other:?} ({seen:?})"),
        }
    }
}

#[tokio::test]
async fn a_long_runner_outlives_its_client_and_a_second_client_reads_it_all_from_offset_0() {
    let e = env().await;
    let sid = session(&e, "s-long").await;
    // The first client starts an HTTP server and goes away.
    let first = HearthClient::new(async_nats::connect(&e.server_url).await.unwrap());
    let started = first
        .start_process(
            &sid,
            &ProcessStartRequest {
                argv: Some(vec![
                    "python3".into(),
                    "-u".into(),
                    "-m".into(),
                    "http.server".into(),
                    "0".into(),
                    "--bind".into(),
                    "127.0.0.1".into(),
                ]),
                tag: Some("web".into()),
                ..ProcessStartRequest::default()
            },
        )
        .await
        .unwrap();
    assert!(started.pid > 0);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A second client reattaches from offset 0 and sees the server come up.
    let second = HearthClient::new(async_nats::connect(&e.server_url).await.unwrap());
    let mut events = Box::pin(
        second
            .follow_process(&sid, &started.process_id, 0)
            .await
            .unwrap(),
    );
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "Serving HTTP").await;
    let port: u16 = seen
        .split("port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the port in the server's banner");
    // It serves (a foreground exec beside it: no lock is held by the background process), and
    // its request log arrives in the followed stream.
    let fetch = second
        .exec(
            &sid,
            &ExecRequest::argv([
                "python3",
                "-c",
                &format!("import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/').status)"),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(fetch.stdout.as_bytes()).trim(),
        "200"
    );
    read_until(&mut events, &mut seen, "\"GET / HTTP/1.1\" 200").await;
    // Everything from offset 0 is the same output again, in order.
    let all = second
        .process_output(&sid, &started.process_id, 0)
        .await
        .unwrap();
    assert_eq!(all.first_offset, 0);
    let text: String = all
        .chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c.data.as_bytes()).into_owned())
        .collect();
    assert!(text.starts_with(&seen[..20]), "{text:?} vs {seen:?}");
    let listed = second.list_processes(&sid).await.unwrap();
    let me = listed
        .iter()
        .find(|p| p.process_id == started.process_id)
        .unwrap();
    assert_eq!(me.tag.as_deref(), Some("web"));
    assert!(!me.exited);
    let killed = second
        .signal_process(&sid, &started.process_id, "TERM")
        .await
        .unwrap();
    assert_eq!(killed.process_id, started.process_id);
    let ended = second
        .wait_process(&sid, &started.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(ended.exited);
}

#[tokio::test]
async fn stdin_streams_into_cat_and_bc() {
    let e = env().await;
    let sid = session(&e, "s-stdin").await;
    let c = &e.client;
    let mut bc = cmd("bc -q");
    bc.stdin = true;
    let bc = c.start_process(&sid, &bc).await.unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &bc.process_id, 0).await.unwrap());
    let mut seen = String::new();
    c.write_stdin(&sid, &bc.process_id, b"6*7\n".to_vec(), false)
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "42\n").await;
    c.write_stdin(&sid, &bc.process_id, b"2^10\n".to_vec(), true)
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "1024\n").await;
    let done = c
        .wait_process(&sid, &bc.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.exit_code, Some(0), "eof ends bc");

    let mut cat = cmd("cat; echo done");
    cat.stdin = true;
    let cat = c.start_process(&sid, &cat).await.unwrap();
    for part in ["hello ", "world\n"] {
        c.write_stdin(&sid, &cat.process_id, part.as_bytes().to_vec(), false)
            .await
            .unwrap();
    }
    c.write_stdin(&sid, &cat.process_id, Vec::new(), true)
        .await
        .unwrap();
    c.wait_process(&sid, &cat.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    let out = c.process_output(&sid, &cat.process_id, 0).await.unwrap();
    let text: Vec<u8> = out
        .chunks
        .iter()
        .flat_map(|c| c.data.as_bytes().to_vec())
        .collect();
    assert_eq!(text, b"hello world\ndone\n");
    // Stdin is closed now: 409.
    let err = c
        .write_stdin(&sid, &cat.process_id, b"x".to_vec(), false)
        .await
        .unwrap_err();
    assert_eq!(code(err), 409);
}

#[tokio::test]
async fn int_and_term_reach_the_process_and_its_handlers_run() {
    let e = env().await;
    let sid = session(&e, "s-sig").await;
    let c = &e.client;
    let p = c
        .start_process(
            &sid,
            &cmd(
                "trap 'echo got-INT' INT; trap 'echo got-TERM; exit 7' TERM; echo ready; \
                  while :; do sleep 0.1; done",
            ),
        )
        .await
        .unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "ready").await;
    c.signal_process(&sid, &p.process_id, "INT").await.unwrap();
    read_until(&mut events, &mut seen, "got-INT").await;
    c.signal_process(&sid, &p.process_id, "SIGTERM")
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "got-TERM").await;
    let done = c
        .wait_process(&sid, &p.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.exit_code, Some(7));
    // The follow ends with the process.
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            if let Ok(ProcessEvent::Exited(info)) = event {
                return info;
            }
        }
        panic!("no exit event")
    })
    .await
    .unwrap();
    assert_eq!(last.exit_code, Some(7));
    // Signalling an ended process: 409. An unknown signal: 400.
    let err = c
        .signal_process(&sid, &p.process_id, "TERM")
        .await
        .unwrap_err();
    assert_eq!(code(err), 409);
    let err = c
        .signal_process(&sid, &p.process_id, "SIGBOGUS")
        .await
        .unwrap_err();
    assert_eq!(code(err), 400);
}

#[tokio::test]
async fn wait_returns_a_fast_process_and_times_out_on_a_slow_one_which_keeps_running() {
    let e = env().await;
    let sid = session(&e, "s-wait").await;
    let c = &e.client;
    let fast = c.start_process(&sid, &cmd("exit 3")).await.unwrap();
    let done = c
        .wait_process(&sid, &fast.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((done.exited, done.exit_code), (true, Some(3)));

    let slow = c.start_process(&sid, &cmd("sleep 30")).await.unwrap();
    let started = Instant::now();
    let err = c
        .wait_process(&sid, &slow.process_id, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(code(err), 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    let listed = c.list_processes(&sid).await.unwrap();
    let info = listed
        .iter()
        .find(|p| p.process_id == slow.process_id)
        .unwrap();
    assert!(!info.exited, "still running after the 504");
    c.kill_process(&sid, &slow.process_id).await.unwrap();
    let done = c
        .wait_process(&sid, &slow.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.signal, Some(9));

    // A process's own timeout ends it.
    let mut timed = cmd("sleep 30");
    timed.timeout_ms = Some(200);
    let timed = c.start_process(&sid, &timed).await.unwrap();
    let done = c
        .wait_process(&sid, &timed.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(done.timed_out);
}

#[tokio::test]
async fn the_ring_buffer_drops_the_oldest_output_and_says_so() {
    let e = env_with(|c| c.processes.ring_bytes = 1000).await;
    let sid = session(&e, "s-ring").await;
    let c = &e.client;
    let p = c
        .start_process(&sid, &cmd("head -c 5000 /dev/zero | tr '\\0' a; echo END"))
        .await
        .unwrap();
    c.wait_process(&sid, &p.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    let out = c.process_output(&sid, &p.process_id, 0).await.unwrap();
    assert_eq!(out.first_offset, 4004, "5004 bytes written, 1000 kept");
    assert_eq!(out.next_offset, 5004);
    assert_eq!(out.chunks[0].offset, 4004);
    let kept: usize = out.chunks.iter().map(|c| c.data.len()).sum();
    assert_eq!(kept, 1000);
    // Beyond the end: nothing, not an error.
    let past = c.process_output(&sid, &p.process_id, 9999).await.unwrap();
    assert!(past.chunks.is_empty());
    // A follower from 0 gets the kept bytes with their true offset, then the end.
    let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
    match events.next().await.unwrap().unwrap() {
        ProcessEvent::Output { offset, .. } => assert_eq!(offset, 4004),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_pty_runs_an_interactive_shell_with_a_terminal_that_resizes() {
    let e = env().await;
    let sid = session(&e, "s-pty").await;
    let c = &e.client;
    let mut shell = cmd("sh -i");
    shell.pty = Some(PtySize { cols: 80, rows: 24 });
    let p = c.start_process(&sid, &shell).await.unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
    let mut seen = String::new();
    let say = |line: &'static str| {
        let (c, sid, pid) = (c.clone(), sid.clone(), p.process_id.clone());
        async move {
            c.write_stdin(&sid, &pid, line.as_bytes().to_vec(), false)
                .await
                .unwrap()
        }
    };
    say("tty; [ -t 0 ] && echo is-a-tty\n").await;
    read_until(&mut events, &mut seen, "/dev/pts/").await;
    read_until(&mut events, &mut seen, "is-a-tty\r\n").await;
    say("stty size\n").await;
    read_until(&mut events, &mut seen, "24 80").await;
    c.resize_process(&sid, &p.process_id, 100, 30)
        .await
        .unwrap();
    say("stty size\n").await;
    read_until(&mut events, &mut seen, "30 100").await;
    say("exit\n").await;
    let done = c
        .wait_process(&sid, &p.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.exit_code, Some(0));
    // Resizing a process without a PTY: 409.
    let plain = c.start_process(&sid, &cmd("sleep 5")).await.unwrap();
    let err = c
        .resize_process(&sid, &plain.process_id, 10, 10)
        .await
        .unwrap_err();
    assert_eq!(code(err), 409);
}

/// Host pids whose command line holds `marker`.
fn host_pids_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn ending_the_session_ends_every_process_within_a_second() {
    let e = env().await;
    let sid = session(&e, "s-end").await;
    let c = &e.client;
    let marker = format!("{}.{}", 700 + std::process::id() % 100, std::process::id());
    for _ in 0..3 {
        let req = ProcessStartRequest {
            argv: Some(vec!["sleep".into(), marker.clone()]),
            ..ProcessStartRequest::default()
        };
        c.start_process(&sid, &req).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_pids_with(&marker).len() < 3 {
        assert!(Instant::now() < deadline, "processes not seen running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = Instant::now();
    job(
        &e.nats,
        JobOp::DestroyVm {
            vm_id: id("s-end"),
            backup: false,
            reason: None,
        },
    )
    .await
    .unwrap();
    while !host_pids_with(&marker).is_empty() {
        assert!(
            released.elapsed() < Duration::from_secs(1),
            "processes outlived their session by a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_dead_agent_reports_the_process_lost_instead_of_hanging() {
    let e = env().await;
    let sid = session(&e, "s-lost").await;
    let c = &e.client;
    let marker = format!("{}.{}", 800 + std::process::id() % 100, std::process::id());
    let req = ProcessStartRequest {
        argv: Some(vec!["sleep".into(), marker.clone()]),
        ..ProcessStartRequest::default()
    };
    let p = c.start_process(&sid, &req).await.unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    let sleeper = loop {
        if let Some(pid) = host_pids_with(&marker).first() {
            break *pid;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The sleeper's parent is the sandbox's agent: kill it.
    let status = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap();
    let agent: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{agent}/comm")).unwrap();
    assert!(
        comm.starts_with("hearth-guest") || comm.trim() == "agent",
        "parent is {comm:?}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::SIGKILL).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the follow ends instead of hanging")
        .expect("an event");
    let err = event.unwrap_err();
    assert_eq!(code(err), 409);
}

#[tokio::test]
async fn bad_input_gets_clear_codes() {
    let e = env_with(|c| {
        c.processes.max_per_vm = 2;
        c.processes.max_stdin_bytes = 16;
    })
    .await;
    let sid = session(&e, "s-bad").await;
    let c = &e.client;
    // Unknown process: 404 for every per-process operation.
    assert_eq!(
        code(
            c.wait_process(&sid, "p9-nope", Duration::ZERO)
                .await
                .unwrap_err()
        ),
        404
    );
    assert_eq!(
        code(c.process_output(&sid, "p9-nope", 0).await.unwrap_err()),
        404
    );
    assert_eq!(
        code(c.signal_process(&sid, "p9-nope", "TERM").await.unwrap_err()),
        404
    );
    // Stdin to a process started without it: 409; too much stdin: 400.
    let p = c.start_process(&sid, &cmd("sleep 30")).await.unwrap();
    assert_eq!(
        code(
            c.write_stdin(&sid, &p.process_id, b"x".to_vec(), false)
                .await
                .unwrap_err()
        ),
        409
    );
    assert_eq!(
        code(
            c.write_stdin(&sid, &p.process_id, vec![b'x'; 17], false)
                .await
                .unwrap_err()
        ),
        400
    );
    // Bad starts: 400.
    for bad in [
        ProcessStartRequest::default(),
        ProcessStartRequest {
            cmd: Some("true".into()),
            pty: Some(PtySize { cols: 0, rows: 0 }),
            ..ProcessStartRequest::default()
        },
        ProcessStartRequest {
            cmd: Some("true".into()),
            cwd: Some("../..".into()),
            ..ProcessStartRequest::default()
        },
    ] {
        assert_eq!(code(c.start_process(&sid, &bad).await.unwrap_err()), 400);
    }
    // The process limit: 429, until one ends.
    let q = c.start_process(&sid, &cmd("sleep 30")).await.unwrap();
    assert_eq!(
        code(c.start_process(&sid, &cmd("sleep 30")).await.unwrap_err()),
        429
    );
    c.kill_process(&sid, &q.process_id).await.unwrap();
    c.wait_process(&sid, &q.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    c.start_process(&sid, &cmd("true")).await.unwrap();
    // Another session's processes: the session is not found.
    let other = HearthClient::new(e.nats.clone());
    assert_eq!(
        code(
            other
                .wait_process(&id("s-none"), &p.process_id, Duration::ZERO)
                .await
                .map_err(|e| match e {
                    ClientError::NoResponders { .. } =>
                        ClientError::Service(WireError::not_found("no responders")),
                    e => e,
                })
                .unwrap_err()
        ),
        404
    );
}

/// Whether the worker's next heartbeat reports `vm` busy.
async fn reported_busy(
    nats: &async_nats::Client,
    status: &mut async_nats::Subscriber,
    vm: &str,
) -> bool {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), status.next())
            .await
            .expect("a heartbeat")
            .expect("the subscription");
        if let Some(info) = hearth_testkit::vm_in_heartbeat(nats, &msg, vm).await {
            return info.busy;
        }
    }
}

#[tokio::test]
async fn a_running_process_keeps_the_vm_busy_so_it_is_never_idle_stopped() {
    let e = env().await;
    let sid = session(&e, "s-busy").await;
    let c = &e.client;
    let mut status = e
        .nats
        .subscribe(Subjects::default().worker_status(&id("wp")))
        .await
        .unwrap();
    assert!(
        !reported_busy(&e.nats, &mut status, "s-busy").await,
        "idle at first"
    );
    let p = c.start_process(&sid, &cmd("sleep 30")).await.unwrap();
    // The heartbeat after the start says busy (the scheduler's idle timer skips busy VMs), and
    // the VM lock is free: a foreground exec runs beside the process at once.
    let _ = reported_busy(&e.nats, &mut status, "s-busy").await;
    assert!(
        reported_busy(&e.nats, &mut status, "s-busy").await,
        "busy while it runs"
    );
    let beside = tokio::time::timeout(
        Duration::from_secs(10),
        c.exec(&sid, &ExecRequest::cmd("echo beside")),
    )
    .await
    .expect("an exec beside a background process is not queued behind it")
    .unwrap();
    assert_eq!(beside.stdout.as_bytes(), b"beside\n");
    // The foreground exec's cleanup spares the background process.
    let listed = c.list_processes(&sid).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|q| q.process_id == p.process_id && !q.exited)
    );
    c.kill_process(&sid, &p.process_id).await.unwrap();
    c.wait_process(&sid, &p.process_id, Duration::from_secs(10))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while reported_busy(&e.nats, &mut status, "s-busy").await {
        assert!(
            Instant::now() < deadline,
            "still busy after the process ended"
        );
    }
}

#[tokio::test]
async fn a_slow_follower_sees_the_oldest_output_dropped_not_buffered() {
    let e = env_with(|c| c.processes.ring_bytes = 64 << 10).await;
    let sid = session(&e, "s-slow").await;
    let c = &e.client;
    // 32 MiB as fast as the process can write, against a 64 KiB ring.
    let p = c
        .start_process(&sid, &cmd("head -c 33554432 /dev/zero"))
        .await
        .unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
    let (mut expected, mut received, mut jumps) = (0u64, 0u64, 0u32);
    loop {
        match tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("the follow goes on")
            .expect("an event")
            .unwrap()
        {
            ProcessEvent::Output { offset, data, .. } => {
                assert!(offset >= expected, "offsets never go back");
                if offset > expected {
                    jumps += 1;
                }
                expected = offset + data.len() as u64;
                received += data.len() as u64;
                // A slow reader.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ProcessEvent::Exited(info) => {
                assert_eq!(info.exit_code, Some(0));
                break;
            }
        }
    }
    assert_eq!(expected, 32 << 20, "the follow reaches the end");
    assert!(jumps > 0, "the ring dropped output the reader had not read");
    assert!(received < 32 << 20, "{received} bytes received");
    let out = c.process_output(&sid, &p.process_id, 0).await.unwrap();
    assert_eq!(out.first_offset, (32 << 20) - (64 << 10));
}

#[tokio::test]
async fn followers_that_went_away_never_lock_out_a_new_one() {
    let e = env().await;
    let sid = session(&e, "s-follow").await;
    let c = &e.client;
    let p = c
        .start_process(&sid, &cmd("echo ready; exec sleep 60"))
        .await
        .unwrap();
    // 100 followers that read one chunk and go away without a word (their follows would stay
    // open for their whole window).
    for _ in 0..100 {
        let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
        assert!(matches!(
            events.next().await,
            Some(Ok(ProcessEvent::Output { .. }))
        ));
    }
    // A new one is served at once, and other process requests are not refused either.
    let mut events = Box::pin(c.follow_process(&sid, &p.process_id, 0).await.unwrap());
    match tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
    {
        Some(Ok(ProcessEvent::Output { data, .. })) => assert_eq!(&data[..], b"ready\n"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.list_processes(&sid).await.unwrap().len(), 1);
    c.kill_process(&sid, &p.process_id).await.unwrap();
}
