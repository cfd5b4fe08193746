//! `hearth shell` as a person uses it, driven through tmux (send-keys, capture-pane) against
//! `hearth up`: a prompt appears, `echo` works, a resize of the terminal reaches the remote
//! `stty size`, `exit` returns to the host shell, and a shell left behind is reattached.
//! Skips with a printed reason where tmux is missing.

use std::process::Command;
use std::time::{Duration, Instant};

use hearth_messages::HearthClient;
use hearth_testkit::{ChildProcess, workspace_bin};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tmux on its own server socket, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cols: u16, rows: u16) -> Option<Tmux> {
        let socket = format!("hearth-shell-test-{}", std::process::id());
        let tmux = Tmux { socket };
        let ok = tmux
            .run(&[
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                &cols.to_string(),
                "-y",
                &rows.to_string(),
                "env PS1='host$ ' bash --norc --noprofile",
            ])
            .is_some();
        ok.then_some(tmux)
    }

    fn run(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "t", "-l", line]).unwrap();
        self.run(&["send-keys", "-t", "t", "Enter"]).unwrap();
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t", "-S", "-200"])
            .unwrap_or_default()
    }

    /// Waits until the screen shows `needle`; the screen.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Tmux {
    /// Waits until the last non-empty line of the screen is `prompt` (the host shell is back).
    fn wait_for_prompt(&self, prompt: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            let last = screen.lines().rev().find(|l| !l.trim().is_empty());
            if last.is_some_and(|l| l.trim_end() == prompt) {
                return;
            }
            assert!(Instant::now() < deadline, "no {prompt:?} prompt:\n{screen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test]
async fn hearth_shell_through_tmux_prompt_echo_resize_exit_and_reattach() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipping: tmux is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hearth = workspace_bin("hearth").unwrap();
    let mut cmd = Command::new(&hearth);
    cmd.args(["up", "--nats-port", &port.to_string()])
        .args(["--metrics-listen", "off", "--pool", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "warn");
    let mut up = ChildProcess::spawn("hearth-up", cmd, dir.path()).unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        if let Ok(nats) = async_nats::connect(&url).await {
            break HearthClient::new(nats);
        }
        assert!(up.is_running(), "hearth up exited:\n{}", up.log());
        assert!(Instant::now() < deadline, "no nats-server:\n{}", up.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let session = loop {
        match client.create_session(&Default::default()).await {
            Ok(session) => break session,
            Err(e) => {
                assert!(Instant::now() < deadline, "claim: {e}\n{}", up.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let sid = session.session_id.to_string();

    let Some(tmux) = Tmux::start(100, 30) else {
        eprintln!("skipping: tmux cannot start a server here");
        return;
    };
    tmux.wait_for("host$");
    let shell = format!("{} --nats-url {url} shell {sid}", hearth.display());
    tmux.type_line(&shell);
    tmux.wait_for("hearth: shell p");
    // The remote prompt (dash's `$ `) after the banner, then a command.
    tmux.type_line("echo remote-$((6*7))");
    tmux.wait_for("remote-42");
    tmux.type_line("stty size");
    tmux.wait_for("30 100");
    // Resizing the terminal resizes the remote one.
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tmux.type_line("stty size");
    tmux.wait_for("40 120");
    tmux.type_line("exit");
    tmux.wait_for_prompt("host$");
    tmux.type_line("echo back-on-host-$((1+1))");
    tmux.wait_for("back-on-host-2");

    // A shell left behind (its `hearth shell` killed) is reattached with its output replayed.
    tmux.type_line("clear");
    tmux.type_line(&shell);
    let screen = tmux.wait_for("(reattach with: ");
    let process_id = screen
        .split("hearth: shell ")
        .last()
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    tmux.type_line("echo before-detach");
    tmux.wait_for("\nbefore-detach\n");
    // The terminal goes away without a word: kill the `hearth shell` (the pane shell's child).
    let pane = tmux
        .run(&["display-message", "-p", "-t", "t", "#{pane_pid}"])
        .unwrap();
    let pane = pane.trim();
    let children = std::fs::read_to_string(format!("/proc/{pane}/task/{pane}/children")).unwrap();
    let cli: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cli), nix::sys::signal::SIGKILL).unwrap();
    tmux.type_line("stty sane; clear");
    tmux.wait_for_prompt("host$");
    tmux.type_line(&format!(
        "{} --nats-url {url} shell {sid} --attach {process_id}",
        hearth.display()
    ));
    // Its output is replayed, and it still answers.
    tmux.wait_for("before-detach");
    tmux.type_line("echo still-$((2+3))");
    tmux.wait_for("still-5");
    tmux.type_line("exit");
    tmux.wait_for_prompt("host$");
    tmux.type_line("echo back-again");
    tmux.wait_for("\nback-again\n");
    drop(tmux);
    let _ = up.terminate(Duration::from_secs(30));
}
