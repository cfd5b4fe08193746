//! Background processes on real microVMs: a worker on the qemu provider behind a real
//! nats-server, the processes kept by the guest agent inside the guest. One guest for all the
//! checks (TCG is slow): a long runner survives its client and is reattached from offset 0,
//! stdin streams into `bc`, INT and TERM reach their handlers, `wait` on a fast and a slow
//! process, a PTY runs `sh -i` and resizes, the ring reports dropped output, and destroying the
//! VM (what release does) ends everything within a second. Skips with a printed reason where
//! QEMU or the guest image is missing.

mod qemu_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use hearth_messages::processes::{ProcessStartRequest, PtySize};
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

async fn job(nats: &async_nats::Client, op: JobOp) -> Result<JobOutput, WireError> {
    let request = JobRequest {
        job_id: id(format!("j-{}", uuid::Uuid::new_v4())),
        op,
        lease_revision: 0,
        tenant: None,
    };
    let payload = Encoding::MsgPack.encode(&request).unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(180),
        nats.request(Subjects::default().worker_jobs(&id("qp")), payload.into()),
    )
    .await
    .expect("job reply in time")
    .expect("job request");
    decode_reply::<JobReply>(&msg).map(|r| r.output)
}

fn cmd(cmd: &str) -> ProcessStartRequest {
    ProcessStartRequest {
        cmd: Some(cmd.into()),
        ..ProcessStartRequest::default()
    }
}

async fn read_until(
    events: &mut (impl Stream<Item = Result<ProcessEvent, ClientError>> + Unpin),
    seen: &mut String,
    needle: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains(needle) {
        assert!(Instant::now() < deadline, "{needle:?} not seen in {seen:?}");
        match tokio::time::timeout(Duration::from_secs(60), events.next()).await {
            Ok(Some(Ok(ProcessEvent::Output { data, .. }))) => {
                seen.push_str(&String::from_utf8_lossy(&data))
            }
            other => panic!("follow ended before {needle:?}: {other:?} ({seen:?})"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_processes_in_a_real_guest() {
    let Some(config) = qemu_support::config("") else {
        return;
    };
    let server = NatsServer::start().unwrap();
    let nats = server.connect().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut wc = WorkerConfig::new(id("qp"), dir.path());
    wc.processes.ring_bytes = 4096;
    let root = dir.path().join("qemu");
    let provider: Arc<dyn VmRuntime> = Arc::new(
        QemuProvider::open(QemuConfig {
            root: root.clone(),
            ..config
        })
        .unwrap(),
    );
    let _worker = Worker::start(wc, nats.clone(), provider).await.unwrap();
    job(
        &nats,
        JobOp::CreateVm {
            vm_id: id("qs"),
            session: true,
        },
    )
    .await
    .unwrap();
    let sid: SessionId = id("qs");

    // A long runner, started by a client that then goes away.
    let first = HearthClient::new(async_nats::connect(server.url()).await.unwrap());
    let runner = first
        .start_process(
            &sid,
            &cmd("i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.2; done"),
        )
        .await
        .unwrap();
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = HearthClient::new(async_nats::connect(server.url()).await.unwrap());
    let mut events = Box::pin(c.follow_process(&sid, &runner.process_id, 0).await.unwrap());
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "line-3\n").await;
    assert!(seen.starts_with("line-0\nline-1\n"), "{seen:?}");
    drop(events);

    // Stdin into bc (busybox's).
    let mut bc = cmd("bc");
    bc.stdin = true;
    let bc = c.start_process(&sid, &bc).await.unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &bc.process_id, 0).await.unwrap());
    let mut seen = String::new();
    c.write_stdin(&sid, &bc.process_id, b"6*7\n".to_vec(), false)
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "42").await;
    c.write_stdin(&sid, &bc.process_id, b"2^10\n".to_vec(), true)
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "1024").await;

    // Signals reach their handlers.
    let trapper = c
        .start_process(
            &sid,
            &cmd(
                "trap 'echo got-INT' INT; trap 'echo got-TERM; exit 7' TERM; echo ready; \
                  while :; do sleep 0.1; done",
            ),
        )
        .await
        .unwrap();
    let mut events = Box::pin(
        c.follow_process(&sid, &trapper.process_id, 0)
            .await
            .unwrap(),
    );
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "ready").await;
    c.signal_process(&sid, &trapper.process_id, "INT")
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "got-INT").await;
    c.signal_process(&sid, &trapper.process_id, "TERM")
        .await
        .unwrap();
    read_until(&mut events, &mut seen, "got-TERM").await;
    let done = c
        .wait_process(&sid, &trapper.process_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.exit_code, Some(7));

    // Wait: fast, and slow (504, still running).
    let fast = c.start_process(&sid, &cmd("exit 3")).await.unwrap();
    let done = c
        .wait_process(&sid, &fast.process_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.exit_code, Some(3));
    let slow = c.start_process(&sid, &cmd("sleep 60")).await.unwrap();
    let err = c
        .wait_process(&sid, &slow.process_id, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.as_u16()), Some(504));

    // The ring (4096 bytes here) reports what it dropped.
    let flood = c
        .start_process(
            &sid,
            &cmd("i=0; while [ $i -lt 1000 ]; do echo 0123456789; i=$((i+1)); done"),
        )
        .await
        .unwrap();
    c.wait_process(&sid, &flood.process_id, Duration::from_secs(60))
        .await
        .unwrap();
    let out = c.process_output(&sid, &flood.process_id, 0).await.unwrap();
    assert_eq!((out.first_offset, out.next_offset), (11000 - 4096, 11000));

    // A PTY: an interactive shell on a terminal that resizes.
    let mut shell = cmd("sh -i");
    shell.pty = Some(PtySize { cols: 80, rows: 24 });
    let shell = c.start_process(&sid, &shell).await.unwrap();
    let mut events = Box::pin(c.follow_process(&sid, &shell.process_id, 0).await.unwrap());
    let mut seen = String::new();
    let say = |line: &'static str| {
        let (c, sid, pid) = (c.clone(), sid.clone(), shell.process_id.clone());
        async move {
            c.write_stdin(&sid, &pid, line.as_bytes().to_vec(), false)
                .await
                .unwrap()
        }
    };
    say("tty\n").await;
    read_until(&mut events, &mut seen, "/dev/pts/").await;
    say("stty size\n").await;
    read_until(&mut events, &mut seen, "24 80").await;
    c.resize_process(&sid, &shell.process_id, 100, 30)
        .await
        .unwrap();
    say("stty size\n").await;
    read_until(&mut events, &mut seen, "30 100").await;

    // Release (the destroy job) ends the guest, and every process in it, within a second.
    let listed = c.list_processes(&sid).await.unwrap();
    assert!(
        listed.iter().filter(|p| !p.exited).count() >= 3,
        "{listed:?}"
    );
    let released = Instant::now();
    job(
        &nats,
        JobOp::DestroyVm {
            vm_id: id("qs"),
            backup: false,
            reason: None,
        },
    )
    .await
    .unwrap();
    while !qemu_support::qemu_pids_mentioning(&root.to_string_lossy()).is_empty() {
        assert!(
            released.elapsed() < Duration::from_secs(1),
            "the guest outlived its release by a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
