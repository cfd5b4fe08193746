//! Unit tests of `agent`.

use super::*;

#[test]
fn exec_requests_carry_the_spec_within_the_wire_limits() {
    let spec = ExecSpec::shell("echo hi")
        .with_env("A", "b")
        .with_cwd("sub")
        .with_stdin(b"in".to_vec())
        .with_timeout(Duration::ZERO)
        .with_max_output_bytes(usize::MAX);
    let req = exec_request(&spec);
    assert_eq!(req.cmd.as_deref(), Some("echo hi"));
    assert_eq!(req.timeout_ms, Some(1), "zero is not a valid wire timeout");
    assert_eq!(
        req.max_output_bytes,
        Some(hearth_messages::data::MAX_OUTPUT_BYTES)
    );
    assert_eq!(req.cwd.as_deref(), Some("sub"));
    assert!(req.program().is_ok());
}

use hearth_messages::agent::Pong;
use hearth_messages::{Blob, ExecResult};
use tokio::net::UnixListener;

async fn reply(stream: &mut UnixStream, id: u64, reply: AgentReply) {
    let bytes = encode_frame(&AgentFrame { id, reply }).unwrap();
    stream.write_all(&bytes).await.unwrap();
}

async fn request(stream: &mut UnixStream) -> Option<HostFrame> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.ok()?;
    let mut body = vec![0u8; frame_len(header).unwrap()];
    stream.read_exact(&mut body).await.ok()?;
    Some(decode_frame(&body).unwrap())
}

fn pong() -> AgentReply {
    AgentReply::Pong(Pong {
        protocol: PROTOCOL_VERSION,
        agent_version: "test".into(),
        pid: 1,
        hostname: "h".into(),
    })
}

/// A fake agent: ignores the first connection's ping (a stuck channel), then answers pings and
/// floods an exec with more output than its cap, preceded by a stale reply to an unknown id.
async fn fake_agent(listener: UnixListener) {
    let (mut first, _) = listener.accept().await.unwrap();
    let _ = request(&mut first).await;
    let (mut stream, _) = listener.accept().await.unwrap();
    drop(first);
    while let Some(frame) = request(&mut stream).await {
        match frame.request {
            AgentRequest::Ping {} => reply(&mut stream, frame.id, pong()).await,
            AgentRequest::Exec(req) => {
                assert!(req.stream);
                reply(&mut stream, 12345, pong()).await;
                for _ in 0..4 {
                    let data = Blob(vec![b'x'; 1000]);
                    let output = AgentReply::Output {
                        stream: OutputStreamName::Stdout,
                        data,
                    };
                    reply(&mut stream, frame.id, output).await;
                }
                let result = ExecResult {
                    exit_code: 3,
                    stderr: Blob(b"tail".to_vec()),
                    ..ExecResult::default()
                };
                reply(&mut stream, frame.id, AgentReply::Exited(result)).await;
            }
            _ => {} // never answered: the caller times out
        }
    }
}

#[tokio::test]
async fn the_firecracker_vsock_handshake_precedes_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        // Firecracker's side: the CONNECT line, then OK, then the guest's stream.
        let (mut stream, _) = listener.accept().await.unwrap();
        let line = read_line(&mut stream).await.unwrap();
        assert_eq!(line, "CONNECT 1024");
        stream.write_all(b"OK 1073741824\n").await.unwrap();
        while let Some(frame) = request(&mut stream).await {
            reply(&mut stream, frame.id, pong()).await;
        }
    });
    let link = AgentLink::new(
        Connector::FirecrackerVsock {
            uds: path,
            port: 1024,
        },
        None,
    );
    link.ready(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn reconnects_past_a_stuck_channel_caps_output_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(fake_agent(listener));
    let link = AgentLink::new(Connector::Unix(path), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    link.ready(deadline).await.unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let outcome = link
        .exec(
            ExecRequest::cmd("x"),
            2500,
            Some(tx),
            ExecLimits {
                handshake: Duration::from_secs(5),
                grace: Duration::from_secs(5),
            },
        )
        .await
        .unwrap();
    let (mut stdout, mut stderr) = (0, Vec::new());
    while let Ok(chunk) = rx.try_recv() {
        match chunk.stream {
            OutputStream::Stdout => stdout += chunk.data.len(),
            OutputStream::Stderr => stderr.extend_from_slice(&chunk.data),
        }
    }
    assert_eq!(stdout, 2500, "the host enforces the cap too");
    assert!(outcome.stdout_truncated);
    assert_eq!(outcome.exit_code, 3);
    assert_eq!(stderr, b"tail", "output in the result is delivered too");
    assert!(outcome.stdout.is_empty() && outcome.stderr.is_empty());

    let started = Instant::now();
    let err = link
        .call(
            AgentRequest::SetClock { now_ms: 1 },
            "set clock",
            Instant::now() + Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, AgentCallError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The next request the fake agent receives, within 5 s.
async fn next_request(stream: &mut UnixStream) -> HostFrame {
    tokio::time::timeout(Duration::from_secs(5), request(stream))
        .await
        .expect("no request within 5 s")
        .expect("the host closed the channel")
}

#[tokio::test]
async fn an_exec_dropped_or_timed_out_is_cancelled_in_the_guest() {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let link = AgentLink::attached(host);
    let limits = ExecLimits {
        handshake: Duration::from_secs(5),
        grace: Duration::from_millis(100),
    };

    // Dropped while the command runs (after its first output): the agent gets a Cancel.
    let (tx, mut rx) = mpsc::channel(4);
    let exec = link.exec(ExecRequest::cmd("sleep 300"), 100, Some(tx), limits);
    let running = async {
        let frame = next_request(&mut agent).await;
        assert!(matches!(frame.request, AgentRequest::Exec(_)), "{frame:?}");
        let output = AgentReply::Output {
            stream: OutputStreamName::Stdout,
            data: Blob(b"started".to_vec()),
        };
        reply(&mut agent, frame.id, output).await;
        rx.recv().await.expect("the output chunk");
        frame.id
    };
    let exec_id = tokio::select! {
        outcome = exec => panic!("the exec ended: {outcome:?}"),
        id = running => id,
    };
    let frame = next_request(&mut agent).await;
    assert_eq!(frame.request, AgentRequest::Cancel { id: exec_id });
    assert_ne!(frame.id, exec_id);

    // A finished exec is not cancelled: the next frame is the next exec.
    let mut finished = ExecRequest::cmd("true");
    finished.timeout_ms = Some(100);
    let exec = link.exec(finished.clone(), 100, None, limits);
    let answer = async {
        let frame = next_request(&mut agent).await;
        let result = AgentReply::Exited(ExecResult::default());
        reply(&mut agent, frame.id, result).await;
    };
    let (outcome, ()) = tokio::join!(exec, answer);
    assert_eq!(outcome.unwrap().exit_code, 0);

    // Timed out (no answer within the command's timeout plus the grace): cancelled too.
    let exec = link.exec(finished, 100, None, limits);
    let unanswered = async {
        let frame = next_request(&mut agent).await;
        assert!(matches!(frame.request, AgentRequest::Exec(_)), "{frame:?}");
        frame.id
    };
    let (outcome, exec_id) = tokio::join!(exec, unanswered);
    assert!(
        matches!(outcome, Err(AgentCallError::Timeout { .. })),
        "{outcome:?}"
    );
    let frame = next_request(&mut agent).await;
    assert_eq!(frame.request, AgentRequest::Cancel { id: exec_id });
}
