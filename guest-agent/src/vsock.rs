//! A vsock listener (Firecracker guests reach the host over vsock; the host connects to the
//! agent's port through Firecracker's Unix socket with `CONNECT <port>`).
//!
//! The one `unsafe` here takes ownership of the descriptor `accept4(2)` just returned, which
//! nothing else owns (nix returns it as a raw integer).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, socket,
};

/// A listening `AF_VSOCK` stream socket on every CID.
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port`.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(
            fd.as_raw_fd(),
            &VsockAddr::new(nix::libc::VMADDR_CID_ANY, port),
        )?;
        listen(&fd, Backlog::new(4)?)?;
        Ok(Self(fd))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<File> {
        let raw = accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: `raw` is a descriptor accept4 just created for us; nothing else owns or closes it.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
    }
}
