//! `hearth shell <sid>`: an interactive terminal in a session over NATS — a background process on
//! a PTY (`sh -i` by default) whose output is followed and whose stdin is this terminal's input.
//!
//! The local terminal is put in raw mode (every key, Ctrl-C and Ctrl-D included, goes to the
//! remote terminal, whose line discipline does the rest) and restored on the way out; a
//! `SIGWINCH` resizes the remote PTY. The command ends when the remote shell does (Ctrl-D or
//! `exit`), with its exit code. If this command dies instead, the shell keeps running in the
//! session: `hearth shell <sid> --attach <process_id>` reattaches, replaying what its ring buffer
//! still holds.

use std::io::{Read, Write};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use futures::StreamExt;
use hearth_messages::processes::{ProcessStartRequest, PtySize};
use hearth_messages::{HearthClient, ProcessEvent, SessionId};
use tokio::sync::mpsc;

/// `hearth shell`.
#[derive(Debug, clap::Args)]
pub struct ShellArgs {
    /// Session id.
    session: String,
    /// Reattach to this running process instead of starting a new shell.
    #[arg(long)]
    attach: Option<String>,
    /// The program to run on the terminal (with `sh -c` when it has spaces).
    #[arg(long, default_value = "sh -i")]
    command: String,
}

/// The local terminal's settings, restored when dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    /// Puts stdin's terminal in raw mode; `None` when stdin is not a terminal.
    fn enter() -> Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !rustix::termios::isatty(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).context("reading the terminal")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .context("setting raw mode")?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = rustix::termios::tcsetattr(
            stdin.as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The local terminal's size (80x24 when it has none).
fn terminal_size() -> PtySize {
    match rustix::termios::tcgetwinsize(std::io::stdout().as_fd()) {
        Ok(ws) if ws.ws_col > 0 && ws.ws_row > 0 => PtySize {
            cols: ws.ws_col,
            rows: ws.ws_row,
        },
        _ => PtySize { cols: 80, rows: 24 },
    }
}

/// Runs the shell; its exit code.
pub async fn shell(hearth: &HearthClient, args: ShellArgs) -> Result<i32> {
    let sid = SessionId::new(args.session).context("session id")?;
    let process_id = match args.attach {
        Some(id) => id,
        None => {
            let request = ProcessStartRequest {
                argv: Some(if args.command.contains(' ') {
                    vec!["sh".into(), "-c".into(), args.command.clone()]
                } else {
                    vec![args.command.clone()]
                }),
                pty: Some(terminal_size()),
                tag: Some("hearth shell".into()),
                ..ProcessStartRequest::default()
            };
            let started = hearth.start_process(&sid, &request).await?;
            eprintln!(
                "hearth: shell {} (reattach with: hearth shell {sid} --attach {})",
                started.process_id, started.process_id
            );
            started.process_id
        }
    };
    let mut events = Box::pin(hearth.follow_process(&sid, &process_id, 0).await?);
    // An attached terminal may have another size than the one the shell started with.
    let size = terminal_size();
    let _ = hearth
        .resize_process(&sid, &process_id, size.cols, size.rows)
        .await;
    let raw = RawMode::enter()?;
    // Keys are read on a thread of their own (a blocking read the runtime need not wait for).
    let (keys_tx, mut keys) = mpsc::channel::<Option<Vec<u8>>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = keys_tx.blocking_send(None);
                    break;
                }
                Ok(n) => {
                    if keys_tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("watching SIGWINCH")?;
    let mut stdout = std::io::stdout();
    let mut keys_open = true;
    let code = loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(ProcessEvent::Output { data, .. })) => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Some(Ok(ProcessEvent::Exited(info))) => break info.exit_code.unwrap_or(0),
                Some(Err(e)) => {
                    drop(raw);
                    return Err(e.into());
                }
                None => break 0,
            },
            key = keys.recv(), if keys_open => {
                // Local end of input (not a terminal): the remote terminal gets its EOF.
                let (bytes, eof) = match key {
                    Some(Some(bytes)) => (bytes, false),
                    Some(None) | None => (Vec::new(), true),
                };
                keys_open &= !eof;
                match hearth.write_stdin(&sid, &process_id, bytes, eof).await {
                    Ok(_) => {}
                    // The shell just ended: its exit arrives on the output.
                    Err(e) if e.code() == Some(hearth_messages::ErrorCode::Conflict) => {
                        keys_open = false;
                    }
                    Err(e) => {
                        drop(raw);
                        return Err(e.into());
                    }
                }
            }
            _ = winch.recv() => {
                let size = terminal_size();
                hearth.resize_process(&sid, &process_id, size.cols, size.rows).await?;
            }
        }
    };
    drop(raw);
    Ok(code)
}
