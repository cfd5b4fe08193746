//! The agent binary over a Unix socket, as the host sees it: framing, ping, exec (argv, shell,
//! stdin, env, cwd, streaming, caps, timeouts), files, identity, and reconnecting after the host
//! goes away (what happens across a snapshot restore).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hearth_messages::agent::*;
use hearth_messages::{Blob, ExecRequest, FileGetRequest, FilePutRequest};

struct Agent {
    child: Child,
    listener: UnixListener,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hearth-guest-agent"))
            .arg("--channel")
            .arg(format!("unix:{}", sock.display()))
            .arg("--workdir")
            .arg(dir.path().join("work"))
            .arg("--etc")
            .arg(dir.path().join("etc"))
            .arg("--no-system")
            .spawn()
            .unwrap();
        Agent {
            child,
            listener,
            dir,
        }
    }

    fn accept(&self) -> Host {
        let (stream, _) = self.listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Host { stream, next: 1 }
    }
}

struct Host {
    stream: UnixStream,
    next: u64,
}

impl Host {
    fn send(&mut self, request: AgentRequest) -> u64 {
        let id = self.next;
        self.next += 1;
        let bytes = encode_frame(&HostFrame { id, request }).unwrap();
        self.stream.write_all(&bytes).unwrap();
        id
    }

    fn recv(&mut self) -> AgentFrame {
        read_frame(&mut self.stream).unwrap().unwrap()
    }

    /// Sends `request` and returns the chunks and the final reply.
    fn call(&mut self, request: AgentRequest) -> (Vec<AgentReply>, AgentReply) {
        let id = self.send(request);
        let mut chunks = Vec::new();
        loop {
            let frame = self.recv();
            assert_eq!(frame.id, id);
            if frame.reply.is_final() {
                return (chunks, frame.reply);
            }
            chunks.push(frame.reply);
        }
    }

    fn exec(&mut self, req: ExecRequest) -> hearth_messages::ExecResult {
        match self.call(AgentRequest::Exec(req)).1 {
            AgentReply::Exited(r) => r,
            other => panic!("expected exited, got {other:?}"),
        }
    }
}

fn err_kind(reply: AgentReply) -> AgentErrorKind {
    match reply {
        AgentReply::Error(e) => e.kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn ping_exec_and_files() {
    let agent = Agent::start();
    let mut host = agent.accept();
    match host.call(AgentRequest::Ping {}).1 {
        AgentReply::Pong(p) => assert_eq!(p.protocol, PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }

    let r = host.exec(ExecRequest::argv(["echo", "hello"]));
    assert_eq!((r.exit_code, r.stdout.as_bytes()), (0, &b"hello\n"[..]));
    let r = host.exec(ExecRequest::cmd("echo $HOME; exit 3"));
    assert_eq!(r.exit_code, 3);
    let work = agent.dir.path().join("work").canonicalize().unwrap();
    assert_eq!(r.stdout.to_string_lossy().trim(), work.to_string_lossy());
    let mut req = ExecRequest::argv(["cat"]);
    req.stdin = Some(Blob(b"in".to_vec()));
    assert_eq!(host.exec(req).stdout.as_bytes(), b"in");
    let mut req = ExecRequest::cmd("echo $A");
    req.env.insert("A".into(), "from-request".into());
    assert_eq!(host.exec(req).stdout.as_bytes(), b"from-request\n");

    // Output cap and streaming.
    let mut req = ExecRequest::cmd("head -c 5000 /dev/zero; echo oops >&2");
    req.max_output_bytes = Some(100);
    let r = host.exec(req);
    assert_eq!(r.stdout.len(), 100);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    let mut req = ExecRequest::cmd("echo one; sleep 0.1; echo two");
    req.stream = true;
    let (chunks, last) = host.call(AgentRequest::Exec(req));
    let mut streamed = Vec::new();
    for chunk in chunks {
        match chunk {
            AgentReply::Output {
                stream: OutputStreamName::Stdout,
                data,
            } => streamed.extend_from_slice(data.as_bytes()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(streamed, b"one\ntwo\n");
    match last {
        AgentReply::Exited(r) => assert!(r.stdout.is_empty() && r.exit_code == 0),
        other => panic!("{other:?}"),
    }

    // Timeout kills the group.
    let mut req = ExecRequest::cmd("sleep 30");
    req.timeout_ms = Some(200);
    let started = Instant::now();
    let r = host.exec(req);
    assert!(r.timed_out && r.signal == Some(9));
    assert!(started.elapsed() < Duration::from_secs(10));

    // Bad input is an error reply, not silence.
    let (_, reply) = host.call(AgentRequest::Exec(ExecRequest::default()));
    assert_eq!(err_kind(reply), AgentErrorKind::InvalidArgument);
    let mut req = ExecRequest::argv(["true"]);
    req.cwd = Some("../".into());
    assert_eq!(
        err_kind(host.call(AgentRequest::Exec(req)).1),
        AgentErrorKind::InvalidArgument
    );

    // Files.
    let (_, reply) = host.call(AgentRequest::PutFile(FilePutRequest {
        path: "sub/f.txt".into(),
        data: Blob(b"data".to_vec()),
        mode: Some(0o600),
    }));
    assert_eq!(
        reply,
        AgentReply::FileWritten(hearth_messages::FilePutResult { size: 4 })
    );
    let mut req = ExecRequest::argv(["cat", "f.txt"]);
    req.cwd = Some("sub".into());
    assert_eq!(host.exec(req).stdout.as_bytes(), b"data");
    match host
        .call(AgentRequest::GetFile(FileGetRequest {
            path: "sub/f.txt".into(),
            max_bytes: None,
        }))
        .1
    {
        AgentReply::FileRead(r) => assert_eq!(r.data.as_bytes(), b"data"),
        other => panic!("{other:?}"),
    }
    let (_, reply) = host.call(AgentRequest::GetFile(FileGetRequest {
        path: "nope".into(),
        max_bytes: None,
    }));
    assert_eq!(err_kind(reply), AgentErrorKind::NotFound);
}

#[test]
fn identity_env_reaches_commands_and_the_agent_reconnects() {
    let agent = Agent::start();
    let mut host = agent.accept();
    let (_, reply) = host.call(AgentRequest::ResetIdentity(Identity {
        hostname: "clone-1".into(),
        machine_id: "ab".repeat(16),
        session_id: "sess-1".into(),
        env: [("TEMPLATE_VAR".to_owned(), "x".to_owned())].into(),
        entropy: Blob(vec![3; 64]),
        now_ms: 1,
    }));
    assert_eq!(
        reply,
        AgentReply::IdentitySet {
            hostname: "clone-1".into()
        }
    );
    assert_eq!(
        std::fs::read_to_string(agent.dir.path().join("etc/machine-id")).unwrap(),
        format!("{}\n", "ab".repeat(16))
    );
    let r = host.exec(ExecRequest::cmd("echo $HEARTH_SESSION_ID $TEMPLATE_VAR"));
    assert_eq!(r.stdout.as_bytes(), b"sess-1 x\n");

    // A half-sent frame, then the host disappears: the agent reopens and serves the next host.
    host.stream.write_all(&[0, 0, 0, 50, 1, 2]).unwrap();
    drop(host);
    let mut host = agent.accept();
    // Ids are per connection; the new host starts over.
    assert!(matches!(
        host.call(AgentRequest::Ping {}).1,
        AgentReply::Pong(_)
    ));
    let r = host.exec(ExecRequest::cmd("echo $HEARTH_SESSION_ID"));
    assert_eq!(
        r.stdout.as_bytes(),
        b"sess-1\n",
        "identity survives reconnects"
    );

    // A lying length prefix drops the connection instead of allocating it.
    host.stream.write_all(&(u32::MAX).to_be_bytes()).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut host.stream, &mut buf).unwrap(),
        0,
        "the agent hung up"
    );
    let mut host = agent.accept();
    assert!(matches!(
        host.call(AgentRequest::Ping {}).1,
        AgentReply::Pong(_)
    ));
    assert!(Path::new(&agent.dir.path().join("work")).is_dir());
}

#[test]
fn pipelined_requests_are_answered_by_id() {
    let agent = Agent::start();
    let mut host = agent.accept();
    let slow = host.send(AgentRequest::Exec(ExecRequest::cmd("sleep 0.3; echo slow")));
    let fast = host.send(AgentRequest::Ping {});
    let first = host.recv();
    assert_eq!(first.id, fast, "the ping is not stuck behind the exec");
    let second = host.recv();
    assert_eq!(second.id, slow);
}
