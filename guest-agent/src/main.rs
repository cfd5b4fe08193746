//! `hearth-guest-agent`: the guest side of Hearth's agent protocol, started by the guest's init
//! (QEMU, Firecracker) or as the init-side process of a process-provider sandbox.
//!
//! ```text
//! hearth-guest-agent [--channel auto|stdio|vport:NAME|/dev/vportNpM|vsock:PORT|unix:PATH]
//!                    [--workdir DIR | --workdir-from-cwd] [--etc DIR] [--no-system] [--sandbox]
//! ```
//! Exits 64 on a bad argument (or `--sandbox` on an architecture it has no filter for); with
//! `--channel stdio` exits 0 when the host closes the channel; otherwise runs until killed (init
//! respawns it).

use std::path::PathBuf;
use std::process::ExitCode;

use hearth_guest_agent::{Channel, Config, sandbox};

const USAGE: &str = "\
usage: hearth-guest-agent [--channel auto|stdio|vport:NAME|/dev/vportNpM|vsock:PORT|unix:PATH]
                          [--workdir DIR | --workdir-from-cwd] [--etc DIR] [--no-system] [--sandbox]

  --channel C         where the host is (default auto: the virtio-serial port, else vsock);
                      stdio: fd 0 is a connected Unix stream socket, and its end ends the agent
  --workdir DIR       the work directory (default /work), created and resolved at start
  --workdir-from-cwd  the work directory is the current directory, resolved for every request
                      (follows renames)
  --etc DIR           where identity reset writes machine-id and hostname (default /etc; with
                      --sandbox, only if given)
  --no-system         identity reset and clock sync leave host name, clock and RNG alone
  --sandbox           the init-side process of a bubblewrap sandbox: seccomp deny-list inherited
                      by every command, agent not dumpable, implies --no-system, and after every
                      exec kills all processes but pid 1 and the agent (x86_64 and aarch64 only)";

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut config = Config::default();
    let mut etc_given = false;
    let mut workdir_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--channel" => match args.next() {
                Some(v) => config.channel = Channel::parse(&v),
                None => return usage(),
            },
            "--workdir" => match args.next() {
                Some(v) => {
                    config.workdir = PathBuf::from(v);
                    workdir_given = true;
                }
                None => return usage(),
            },
            "--workdir-from-cwd" => config.workdir_from_cwd = true,
            "--etc" => match args.next() {
                Some(v) => {
                    config.etc = Some(PathBuf::from(v));
                    etc_given = true;
                }
                None => return usage(),
            },
            "--no-system" => config.system = false,
            "--sandbox" => config.sandbox = true,
            "--version" => {
                println!("hearth-guest-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    if workdir_given && config.workdir_from_cwd {
        eprintln!("hearth-agent: --workdir and --workdir-from-cwd exclude each other");
        return usage();
    }
    if config.sandbox {
        if !sandbox::arch_supported() {
            eprintln!(
                "hearth-agent: --sandbox has no seccomp filter for architecture {} (only {}); \
                 refusing to start",
                std::env::consts::ARCH,
                sandbox::SUPPORTED_ARCHES.join(", ")
            );
            return ExitCode::from(64);
        }
        // No privileges in the sandbox: no host name, clock or RNG changes, and /etc is read-only
        // unless the host says where to write.
        config.system = false;
        if !etc_given {
            config.etc = None;
        }
    }
    match hearth_guest_agent::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
