//! Reseeding the guest kernel's RNG from host entropy: the only `unsafe` in Hearth.
//!
//! A snapshot freezes the kernel's CRNG state, so every VM restored from one snapshot would produce
//! the same `/dev/urandom` stream until something reseeds it. Debian's cloud kernel has no VMGENID
//! to tell the guest it was cloned, so the host pushes fresh entropy after every restore:
//! `RNDADDENTROPY` mixes it into the input pool *and credits it*, then `RNDRESEEDCRNG` makes the
//! CRNG reseed from the pool immediately instead of at its next scheduled reseed. Writing the bytes
//! to `/dev/urandom` first also mixes them in on kernels where the ioctls are refused.
//!
//! Both ioctls take plain integers/byte buffers and need `CAP_SYS_ADMIN` (the agent runs as root).
#![allow(unsafe_code)]

use std::io::Write;
use std::os::fd::AsRawFd;

/// Most entropy bytes passed in one call (the kernel accepts more; the host sends 64).
pub const MAX_ENTROPY_BYTES: usize = 512;

/// `struct rand_pool_info` from `<linux/random.h>` with a fixed-size buffer.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: nix::libc::c_int,
    buf_size: nix::libc::c_int,
    buf: [u8; MAX_ENTROPY_BYTES],
}

// RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
nix::ioctl_write_ptr!(rnd_add_entropy, b'R', 0x03, [nix::libc::c_int; 2]);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes `entropy` into the kernel RNG (credited) and forces a CRNG reseed.
pub fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    let entropy = &entropy[..entropy.len().min(MAX_ENTROPY_BYTES)];
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    urandom.write_all(entropy)?;
    let mut info = RandPoolInfo {
        entropy_count: (entropy.len() * 8) as nix::libc::c_int,
        buf_size: entropy.len() as nix::libc::c_int,
        buf: [0; MAX_ENTROPY_BYTES],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    let fd = urandom.as_raw_fd();
    // SAFETY: `fd` is an open descriptor of /dev/urandom for the whole call; `info` is a live,
    // properly aligned `struct rand_pool_info` whose `buf_size` never exceeds its buffer, which is
    // all RNDADDENTROPY reads (the kernel copies `buf_size` bytes after the two ints).
    unsafe { rnd_add_entropy(fd, (&raw const info).cast::<[nix::libc::c_int; 2]>()) }
        .map_err(std::io::Error::from)?;
    // SAFETY: RNDRESEEDCRNG takes no argument; `fd` is open.
    unsafe { rnd_reseed_crng(fd) }.map_err(std::io::Error::from)?;
    Ok(())
}
