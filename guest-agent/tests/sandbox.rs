//! The agent binary as the process provider runs it: over a socketpair on its stdin
//! (`--channel stdio`), with the work directory taken from its cwd (`--workdir-from-cwd`), and in
//! `--sandbox` mode: the seccomp deny-list seen from commands, and leftover processes killed after
//! each exec. The leftover sweep only ever runs inside a pid namespace made for the test
//! (bubblewrap `--unshare-pid`, else `unshare --pid --fork --mount-proc` with a shell as pid 1);
//! the agent itself also refuses to sweep anywhere else.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hearth_messages::agent::*;
use hearth_messages::{ExecRequest, ExecResult, FileGetRequest, FilePutRequest};

const AGENT: &str = env!("CARGO_BIN_EXE_hearth-guest-agent");

/// An agent started with one end of a socketpair as its stdin; the test is the host.
struct StdioAgent {
    child: Child,
    host: Option<UnixStream>,
    next: u64,
}

impl Drop for StdioAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StdioAgent {
    /// Starts `cmd` (which runs the agent with `--channel stdio`) with the agent's end as stdin.
    fn spawn(mut cmd: Command) -> StdioAgent {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let child = cmd
            .stdin(Stdio::from(OwnedFd::from(agent)))
            .spawn()
            .unwrap();
        StdioAgent {
            child,
            host: Some(host),
            next: 1,
        }
    }

    fn call(&mut self, request: AgentRequest) -> AgentReply {
        let id = self.next;
        self.next += 1;
        let host = self.host.as_mut().unwrap();
        write_frame(host, &HostFrame { id, request }).unwrap();
        loop {
            let frame: AgentFrame = read_frame(host).unwrap().expect("agent closed the channel");
            assert_eq!(frame.id, id);
            if frame.reply.is_final() {
                return frame.reply;
            }
        }
    }

    fn exec(&mut self, req: ExecRequest) -> ExecResult {
        match self.call(AgentRequest::Exec(req)) {
            AgentReply::Exited(r) => r,
            other => panic!("expected exited, got {other:?}"),
        }
    }

    fn sh(&mut self, script: &str) -> ExecResult {
        self.exec(ExecRequest::cmd(script))
    }

    /// Closes the host's end and waits for the agent to exit.
    fn hang_up(&mut self) -> ExitStatus {
        drop(self.host.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after hang-up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn agent_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(AGENT);
    cmd.args(["--channel", "stdio"]).args(args);
    cmd
}

fn text(b: &hearth_messages::Blob) -> String {
    String::from_utf8_lossy(b.as_bytes()).into_owned()
}

#[test]
fn stdio_channel_serves_then_ends_the_agent_when_the_host_closes() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut agent = StdioAgent::spawn(agent_cmd(&[
        "--workdir",
        work.to_str().unwrap(),
        "--no-system",
    ]));
    match agent.call(AgentRequest::Ping {}) {
        AgentReply::Pong(p) => assert_eq!(p.protocol, PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
    let r = agent.sh("echo ok; ls -l /proc/self/fd/");
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    let out = text(&r.stdout);
    assert!(out.starts_with("ok\n"), "{out}");
    // The command's fds: /dev/null, two pipes, the directory ls reads; never the channel.
    assert!(
        !out.contains("socket:"),
        "a command inherited a socket:\n{out}"
    );
    let status = agent.hang_up();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn stdio_channel_refuses_a_stdin_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent_cmd(&["--workdir", dir.path().to_str().unwrap(), "--no-system"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
}

#[test]
fn workdir_from_cwd_follows_a_rename_of_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("vm-a");
    let after = dir.path().join("vm-b");
    std::fs::create_dir(&before).unwrap();
    let mut cmd = agent_cmd(&["--workdir-from-cwd", "--no-system"]);
    cmd.current_dir(&before);
    let mut agent = StdioAgent::spawn(cmd);
    let put = |agent: &mut StdioAgent, path: &str| {
        let reply = agent.call(AgentRequest::PutFile(FilePutRequest {
            path: path.into(),
            data: b"data".to_vec().into(),
            mode: None,
        }));
        assert!(matches!(reply, AgentReply::FileWritten(_)), "{reply:?}");
    };
    put(&mut agent, "one");
    assert!(before.join("one").exists());
    std::fs::rename(&before, &after).unwrap();
    let r = agent.sh("pwd; echo $HOME");
    let want = after.canonicalize().unwrap();
    let want = want.to_str().unwrap();
    assert_eq!(text(&r.stdout), format!("{want}\n{want}\n"));
    put(&mut agent, "two");
    assert!(after.join("two").exists());
    match agent.call(AgentRequest::GetFile(FileGetRequest {
        path: "one".into(),
        max_bytes: None,
    })) {
        AgentReply::FileRead(f) => assert_eq!(f.data.as_bytes(), b"data"),
        other => panic!("{other:?}"),
    }
    assert_eq!(agent.hang_up().code(), Some(0));
}

#[test]
fn get_of_a_fifo_fails_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = StdioAgent::spawn(agent_cmd(&[
        "--workdir",
        dir.path().to_str().unwrap(),
        "--no-system",
    ]));
    assert_eq!(agent.sh("mkfifo pipe").exit_code, 0);
    let started = Instant::now();
    match agent.call(AgentRequest::GetFile(FileGetRequest {
        path: "pipe".into(),
        max_bytes: None,
    })) {
        AgentReply::Error(e) => assert_eq!(e.kind, AgentErrorKind::InvalidArgument, "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Calls the filtered syscalls through ctypes and prints `name errno` for each (0: it worked).
const SYSCALL_PROBE: &str = r#"
import ctypes, os, platform, threading
libc = ctypes.CDLL(None, use_errno=True)
def report(name, rc):
    print(name, ctypes.get_errno() if rc == -1 else 0, flush=True)
ctypes.set_errno(0)
report("ptrace", libc.ptrace(0, 0, None, None))
report("mount", libc.mount(b"none", b"mnt", b"tmpfs", 0, None))
report("unshare_user", libc.unshare(0x10000000))
report("unshare_mount", libc.unshare(0x20000))
report("mknod_char", libc.mknod(b"chr", 0o20600, os.makedev(1, 3)))
report("mknod_block", libc.mknod(b"blk", 0o60600, os.makedev(7, 0)))
nr = {"x86_64": (56, 435), "aarch64": (220, 435)}[platform.machine()]
pid = libc.syscall(nr[0], 0x10000000 | 17, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
report("clone_newuser", pid if pid <= 0 else 0)
report("clone3", libc.syscall(nr[1], None, 0))
report("mknod_fifo", libc.mknod(b"fifo", 0o10600, 0))
report("mknod_file", libc.mknod(b"file", 0o100600, 0))
child = os.fork()
if child == 0:
    os._exit(7)
report("fork", 0 if os.waitpid(child, 0)[1] >> 8 == 7 else -1)
t = threading.Thread(target=lambda: None); t.start(); t.join()
print("thread 0")
"#;

/// Whether `pid` is a live process (a zombie is not: it is dead, only not reaped yet).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn cancel_kills_a_running_exec_and_answers_both_requests() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut agent = StdioAgent::spawn(agent_cmd(&[
        "--workdir",
        work.to_str().unwrap(),
        "--no-system",
    ]));
    let mut req = ExecRequest::cmd("echo $$ > sleep.pid; touch started; exec sleep 300");
    req.stream = true;
    let host = agent.host.as_mut().unwrap();
    let request = AgentRequest::Exec(req);
    write_frame(host, &HostFrame { id: 1, request }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !work.join("started").exists() {
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid: u32 = std::fs::read_to_string(work.join("sleep.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The shell that wrote the marker becomes the sleep.
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != "sleep\n" {
        assert!(
            Instant::now() < deadline,
            "the command did not become the sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(alive(pid));

    let cancelled = Instant::now();
    let request = AgentRequest::Cancel { id: 1 };
    write_frame(host, &HostFrame { id: 2, request }).unwrap();
    // The exec's final reply, then the Cancel's answer; nothing else for the exec.
    let frame: AgentFrame = read_frame(host).unwrap().unwrap();
    assert_eq!(frame.id, 1, "{frame:?}");
    match frame.reply {
        AgentReply::Error(e) => assert_eq!(e.kind, AgentErrorKind::Cancelled, "{e}"),
        other => panic!("expected the cancelled error, got {other:?}"),
    }
    let frame: AgentFrame = read_frame(host).unwrap().unwrap();
    assert_eq!(
        frame,
        AgentFrame {
            id: 2,
            reply: AgentReply::Cancelled { running: true }
        }
    );
    while alive(pid) {
        assert!(
            cancelled.elapsed() < Duration::from_secs(1),
            "the command still runs 1 s after the cancel"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // An id no longer running: nothing to do. The agent serves on.
    agent.next = 3;
    assert_eq!(
        agent.call(AgentRequest::Cancel { id: 1 }),
        AgentReply::Cancelled { running: false }
    );
    let r = agent.sh("echo ok");
    assert_eq!(text(&r.stdout), "ok\n");
    // tokio reaps a dropped child lazily: the zombie is gone once the agent ran another command.
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "not reaped");
}

#[test]
fn a_request_from_a_newer_host_is_answered_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = StdioAgent::spawn(agent_cmd(&[
        "--workdir",
        dir.path().to_str().unwrap(),
        "--no-system",
    ]));
    // {"id": 5, "request": {"op": "teleport"}} in MessagePack.
    let mut body = vec![0x82, 0xa2, b'i', b'd', 0x05, 0xa7];
    body.extend_from_slice(b"request");
    body.extend_from_slice(&[0x81, 0xa2, b'o', b'p', 0xa8]);
    body.extend_from_slice(b"teleport");
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let host = agent.host.as_mut().unwrap();
    std::io::Write::write_all(host, &frame).unwrap();
    let reply: AgentFrame = read_frame(host).unwrap().unwrap();
    assert_eq!(reply.id, 5);
    match reply.reply {
        AgentReply::Error(e) => assert_eq!(e.kind, AgentErrorKind::Unsupported, "{e}"),
        other => panic!("expected unsupported, got {other:?}"),
    }
    assert!(matches!(
        agent.call(AgentRequest::Ping {}),
        AgentReply::Pong(_)
    ));
}

#[test]
fn sandbox_mode_denies_escapes_to_commands() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut agent = StdioAgent::spawn(agent_cmd(&[
        "--workdir",
        work.to_str().unwrap(),
        "--sandbox",
    ]));
    let r = agent.sh("echo ok");
    assert_eq!(
        (r.exit_code, text(&r.stdout)),
        (0, "ok\n".into()),
        "{}",
        text(&r.stderr)
    );
    std::fs::create_dir(work.join("mnt")).unwrap();
    for script in [
        "unshare -U true",
        "unshare -m true",
        "unshare -n true",
        "mount -t tmpfs none mnt",
        "mknod chr c 1 3",
    ] {
        let r = agent.sh(script);
        assert_ne!(r.exit_code, 0, "{script} worked in the sandbox");
        let err = text(&r.stderr).to_lowercase();
        assert!(
            err.contains("operation not permitted") || err.contains("permission denied"),
            "{script}: {err}"
        );
    }
    let r = agent.sh("mkfifo fifo2 && test -p fifo2 && echo fifo");
    assert_eq!(text(&r.stdout), "fifo\n", "{}", text(&r.stderr));
    // Not mounted: the mount point is still an empty directory of the work volume.
    assert_eq!(std::fs::read_dir(work.join("mnt")).unwrap().count(), 0);

    if !Path::new("/usr/bin/python3").exists() {
        eprintln!("skipping the syscall probe: no /usr/bin/python3");
        return;
    }
    let r = agent.exec(ExecRequest::argv(["/usr/bin/python3", "-c", SYSCALL_PROBE]));
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    let out = text(&r.stdout);
    let errno = |name: &str| -> i32 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from:\n{out}"))
            .parse()
            .unwrap()
    };
    const EPERM: i32 = 1;
    const ENOSYS: i32 = 38;
    for name in [
        "ptrace",
        "mount",
        "unshare_user",
        "unshare_mount",
        "mknod_char",
        "mknod_block",
        "clone_newuser",
    ] {
        assert_eq!(errno(name), EPERM, "{name}:\n{out}");
    }
    assert_eq!(errno("clone3"), ENOSYS, "{out}");
    for name in ["mknod_fifo", "mknod_file", "fork", "thread"] {
        assert_eq!(errno(name), 0, "{name}:\n{out}");
    }
    assert!(!work.join("chr").exists() && !work.join("blk").exists());
    assert_eq!(agent.hang_up().code(), Some(0));
}

#[test]
fn sandbox_mode_keeps_the_session_env_without_touching_the_system() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut agent = StdioAgent::spawn(agent_cmd(&[
        "--workdir",
        work.to_str().unwrap(),
        "--sandbox",
    ]));
    let hostname = nix::unistd::gethostname().unwrap();
    let reply = agent.call(AgentRequest::ResetIdentity(Identity {
        hostname: "vm-sandboxed".into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        session_id: "sess-1".into(),
        env: [("K".to_owned(), "v".to_owned())].into(),
        entropy: vec![1; 32].into(),
        now_ms: 1,
    }));
    assert!(matches!(reply, AgentReply::IdentitySet { .. }), "{reply:?}");
    assert!(matches!(
        agent.call(AgentRequest::SetClock { now_ms: 1 }),
        AgentReply::ClockSet {}
    ));
    let r = agent.sh("echo $HEARTH_SESSION_ID $K");
    assert_eq!(text(&r.stdout), "sess-1 v\n");
    assert_eq!(nix::unistd::gethostname().unwrap(), hostname);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(now.as_secs() > 1_600_000_000, "the clock was not set back");
}

/// Runs the agent in a pid namespace of its own with `/proc` remounted, as the child of that
/// namespace's pid 1 — the only place its leftover sweep runs. `None` if neither bubblewrap nor
/// `unshare` can make one here.
fn pid_namespaced_agent(work: &Path) -> Option<StdioAgent> {
    let agent_args = [
        AGENT,
        "--channel",
        "stdio",
        "--workdir",
        work.to_str().unwrap(),
        "--sandbox",
    ];
    let probe = |cmd: &mut Command| {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let bwrap_prefix = [
        "bwrap",
        "--bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--unshare-pid",
        "--die-with-parent",
        "--",
    ];
    if probe(
        Command::new(bwrap_prefix[0])
            .args(&bwrap_prefix[1..])
            .arg("true"),
    ) {
        let mut cmd = Command::new(bwrap_prefix[0]);
        cmd.args(&bwrap_prefix[1..]).args(agent_args);
        return Some(StdioAgent::spawn(cmd));
    }
    let unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];
    if probe(Command::new(unshare[0]).args(&unshare[1..]).arg("true")) {
        // A shell is pid 1 (it reaps), the agent its child with the socket as its stdin (moved
        // through fd 3: a background job's stdin is /dev/null before its redirections).
        let mut cmd = Command::new(unshare[0]);
        cmd.args(&unshare[1..])
            .args([
                "/bin/sh",
                "-c",
                "exec 3<&0 0</dev/null; \"$@\" 0<&3 3<&- & exec 3<&-; wait $!",
                "sh",
            ])
            .args(agent_args);
        return Some(StdioAgent::spawn(cmd));
    }
    None
}

/// The commands of the sandbox's processes that are still running (not zombies).
fn running(agent: &mut StdioAgent) -> Vec<String> {
    let r = agent.sh(
        "for f in /proc/[0-9]*/stat; do read -r line < \"$f\" && echo \"$line\"; done 2>/dev/null",
    );
    text(&r.stdout)
        .lines()
        .filter_map(|line| {
            let (start, end) = (line.find('(')?, line.rfind(')')?);
            let state = line[end + 1..].trim_start().chars().next()?;
            (state != 'Z').then(|| line[start + 1..end].to_owned())
        })
        .collect()
}

#[test]
fn sandbox_mode_kills_what_an_exec_leaves_behind() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let Some(mut agent) = pid_namespaced_agent(&work) else {
        eprintln!("skipping: cannot make a pid namespace here (bwrap or unshare as root)");
        return;
    };
    let r = agent.sh("setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!");
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    let pid: u32 = text(&r.stdout).trim().parse().unwrap();
    let left = running(&mut agent);
    assert!(!left.iter().any(|c| c == "sleep"), "{left:?} (pid {pid})");
    // A double fork out of the group, then an exec that times out with a setsid child.
    agent.sh("(sh -c 'sleep 1001 >/dev/null 2>&1 &' &) ; true");
    let mut slow = ExecRequest::cmd("setsid sleep 1002 >/dev/null 2>&1 & sleep 30");
    slow.timeout_ms = Some(300);
    assert!(agent.exec(slow).timed_out);
    let left = running(&mut agent);
    assert!(!left.iter().any(|c| c == "sleep"), "{left:?}");
    // The agent and the namespace's init are still there.
    assert_eq!(agent.sh("echo alive").exit_code, 0);
    assert_eq!(agent.hang_up().code(), Some(0));
}
