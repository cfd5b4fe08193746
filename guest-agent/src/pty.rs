//! Pseudo-terminals and new sessions for background processes: the raw kernel interfaces a child
//! needs between `fork` and `exec` (`setsid`, `TIOCSCTTY`) and the window-size ioctl.
//!
//! `unsafe` here is limited to registering `pre_exec` hooks (which run in the forked child, where
//! only async-signal-safe calls are allowed: `setsid` and `ioctl` are) and the `TIOCSWINSZ` ioctl
//! on a descriptor this module owns.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use hearth_messages::processes::PtySize;
use nix::libc;

nix::ioctl_write_ptr_bad!(set_window_size, libc::TIOCSWINSZ, libc::winsize);

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new pseudo-terminal: the master (close-on-exec, non-blocking) and the slave.
pub fn open(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(Some(&winsize(size)), None)
        .map_err(|e| io::Error::other(format!("cannot open a pseudo-terminal: {e}")))?;
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    }
    let flags = fcntl(&pty.master, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    fcntl(
        &pty.master,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    Ok((pty.master, pty.slave))
}

/// Sets the terminal size of `master`; the kernel sends `SIGWINCH` to its foreground group.
pub fn resize(master: &OwnedFd, size: PtySize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: `master` is an open descriptor we own and `ws` outlives the call.
    unsafe { set_window_size(master.as_raw_fd(), &ws) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Makes the child lead a new session (so that its process group is its own and it can have a
/// controlling terminal) and, with `controlling_tty`, makes its stdin (a PTY slave) that
/// terminal.
pub fn new_session(cmd: &mut tokio::process::Command, controlling_tty: bool) {
    // SAFETY: the hook runs in the forked child before exec and only makes the async-signal-safe
    // calls `setsid` and `ioctl`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Registers a PTY master with the runtime for readiness.
pub fn register(master: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the descriptor, so it stays open for as long as it is
    // registered, and nothing else registers it.
    unsafe { tokio::io::unix::AsyncFd::register(master) }.map_err(|e| e.into_parts().1)
}
