//! The host↔guest channel: where the agent's frames travel.
//!
//! - A virtio-serial port (QEMU): found by name under `/sys/class/virtio-ports/*/name`, opened as
//!   `/dev/vportNpM`. Only one opener at a time; `read` returns end-of-file while no host is
//!   connected (at boot before the host attaches, after the host disconnects, across a snapshot
//!   restore) and works again once one is, so the agent keeps it open and reads again after a
//!   short pause.
//! - A vsock port the agent listens on (Firecracker): one host connection at a time; when it
//!   ends, the next one is accepted.
//! - A Unix socket the agent connects to (tests on a host; serial-over-socket setups).
//! - `stdio`: the agent's fd 0 is already a connected Unix stream socket (the process provider
//!   starts the agent with one end of a socketpair as its stdin). The agent takes CLOEXEC
//!   duplicates of it and points fd 0 at `/dev/null`, so no command can inherit the channel.
//!   There is only ever this one connection: its end-of-file is final and the agent exits.
//!
//! - `auto` (the default): the virtio-serial port if the VM has one, else vsock if it has
//!   `/dev/vsock` — so one image works under QEMU and under Firecracker.
//!
//! Each connection yields a blocking reader and writer (two descriptors of one open file).

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::vsock::VsockListener;

/// Where to find the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A virtio-serial port by name (`org.hearth.agent.0`) or by device path (`/dev/vport0p1`).
    VirtioPort(String),
    /// Connect to a Unix socket at this path.
    Unix(PathBuf),
    /// Listen on this vsock port (Firecracker).
    Vsock(u32),
    /// The named virtio-serial port if present, else vsock on the given port.
    Auto { port_name: String, vsock_port: u32 },
    /// fd 0, a connected Unix stream socket; opened once, and the agent ends with it.
    Stdio,
}

/// One open connection: a reader and a writer of the same channel.
#[derive(Debug)]
pub struct Connection {
    pub reader: Box<dyn ReadHalf>,
    pub writer: Box<dyn WriteHalf>,
    /// End-of-file only means "no host right now" (a virtio-serial port, which stays usable), not
    /// "this connection is over" (a socket).
    pub transient_eof: bool,
}

/// The reading side of a connection.
pub trait ReadHalf: io::Read + Send + std::fmt::Debug {}
impl<T: io::Read + Send + std::fmt::Debug> ReadHalf for T {}
/// The writing side of a connection.
pub trait WriteHalf: io::Write + Send + std::fmt::Debug {}
impl<T: io::Write + Send + std::fmt::Debug> WriteHalf for T {}

impl Channel {
    /// Parses `auto`, `stdio`, `vport:NAME`, `unix:PATH`, `vsock:PORT`, or a plain port name /
    /// `/dev/...` path.
    pub fn parse(text: &str) -> Channel {
        if text == "auto" {
            Channel::default()
        } else if text == "stdio" {
            Channel::Stdio
        } else if let Some(port) = text.strip_prefix("vsock:").and_then(|p| p.parse().ok()) {
            Channel::Vsock(port)
        } else if let Some(path) = text.strip_prefix("unix:") {
            Channel::Unix(PathBuf::from(path))
        } else if let Some(name) = text.strip_prefix("vport:") {
            Channel::VirtioPort(name.to_owned())
        } else {
            Channel::VirtioPort(text.to_owned())
        }
    }

    /// Whether the end of a connection is the end of the agent (nothing can ever be reopened).
    pub fn is_final(&self) -> bool {
        matches!(self, Channel::Stdio)
    }

    /// Opens the channel once; the caller retries (except for [`Channel::Stdio`], see
    /// [`Channel::is_final`]).
    pub fn open(&self) -> io::Result<Connection> {
        match self {
            Channel::Stdio => {
                let stream = take_stdin_socket()?;
                Ok(Connection {
                    writer: Box::new(stream.try_clone()?),
                    reader: Box::new(stream),
                    transient_eof: false,
                })
            }
            Channel::Auto {
                port_name,
                vsock_port,
            } => match find_port(port_name) {
                Ok(_) => Channel::VirtioPort(port_name.clone()).open(),
                Err(_) if Path::new("/dev/vsock").exists() => Channel::Vsock(*vsock_port).open(),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no virtio port named {port_name:?} and no /dev/vsock"),
                )),
            },
            Channel::VirtioPort(name) => {
                let path = find_port(name)?;
                let file = File::options().read(true).write(true).open(&path)?;
                Ok(Connection {
                    writer: Box::new(file.try_clone()?),
                    reader: Box::new(file),
                    transient_eof: true,
                })
            }
            Channel::Unix(path) => {
                let stream = UnixStream::connect(path)?;
                Ok(Connection {
                    writer: Box::new(stream.try_clone()?),
                    reader: Box::new(stream),
                    transient_eof: false,
                })
            }
            Channel::Vsock(port) => {
                // One listener for the agent's life, bound on first use.
                static LISTENER: Mutex<Option<(u32, VsockListener)>> = Mutex::new(None);
                let mut listener = LISTENER.lock().unwrap_or_else(|e| e.into_inner());
                if listener.as_ref().is_none_or(|(p, _)| p != port) {
                    *listener = Some((*port, VsockListener::bind(*port)?));
                }
                let stream = listener.as_ref().map(|(_, l)| l.accept()).transpose()?;
                let stream = stream.ok_or_else(|| io::Error::other("no vsock listener"))?;
                Ok(Connection {
                    writer: Box::new(stream.try_clone()?),
                    reader: Box::new(stream),
                    transient_eof: false,
                })
            }
        }
    }
}

impl Default for Channel {
    fn default() -> Self {
        Channel::Auto {
            port_name: hearth_messages::agent::VIRTIO_PORT_NAME.to_owned(),
            vsock_port: hearth_messages::agent::VSOCK_PORT,
        }
    }
}

/// Takes the socket on fd 0: returns a CLOEXEC duplicate and points fd 0 at `/dev/null`. Fails
/// if fd 0 is not a Unix stream socket (or was taken already).
fn take_stdin_socket() -> io::Result<UnixStream> {
    use std::os::fd::AsFd;
    let stdin = io::stdin();
    let fd = stdin.as_fd();
    let kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
        .map_err(|e| io::Error::other(format!("stdin is not a socket: {e}")))?;
    if kind != nix::sys::socket::SockType::Stream {
        return Err(io::Error::other(format!(
            "stdin is a {kind:?} socket, not a stream"
        )));
    }
    // `try_clone_to_owned` duplicates with F_DUPFD_CLOEXEC.
    let stream = UnixStream::from(fd.try_clone_to_owned()?);
    let null = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)
        .map_err(|e| io::Error::other(format!("cannot detach stdin: {e}")))?;
    Ok(stream)
}

/// The device path of the virtio-serial port `name` (or `name` itself if it is a path).
fn find_port(name: &str) -> io::Result<PathBuf> {
    if name.starts_with('/') {
        return Ok(PathBuf::from(name));
    }
    let class = Path::new("/sys/class/virtio-ports");
    for entry in std::fs::read_dir(class)?.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio port named {name:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse() {
        assert_eq!(Channel::parse("auto"), Channel::default());
        assert_eq!(Channel::parse("stdio"), Channel::Stdio);
        assert!(Channel::Stdio.is_final() && !Channel::default().is_final());
        assert_eq!(Channel::parse("vsock:1024"), Channel::Vsock(1024));
        assert_eq!(
            Channel::parse("unix:/tmp/a.sock"),
            Channel::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Channel::parse("/dev/vport0p1"),
            Channel::VirtioPort("/dev/vport0p1".into())
        );
        assert_eq!(
            Channel::parse("vport:org.x"),
            Channel::VirtioPort("org.x".into())
        );
    }
}
