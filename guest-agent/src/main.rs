//! `hearth-guest-agent`: the guest side of Hearth's agent protocol, started by the guest's init.
//!
//! ```text
//! hearth-guest-agent [--channel auto|vport:NAME|/dev/vportNpM|vsock:PORT|unix:PATH] [--workdir DIR]
//!                    [--etc DIR] [--no-system]
//! ```
//! Exits 64 on a bad argument; otherwise runs until killed (init respawns it).

use std::path::PathBuf;
use std::process::ExitCode;

use hearth_guest_agent::{Channel, Config};

fn usage() -> ExitCode {
    eprintln!(
        "usage: hearth-guest-agent [--channel auto|vport:NAME|/dev/vportNpM|vsock:PORT|unix:PATH] \
         [--workdir DIR] [--etc DIR] [--no-system]"
    );
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--channel" => match args.next() {
                Some(v) => config.channel = Channel::parse(&v),
                None => return usage(),
            },
            "--workdir" => match args.next() {
                Some(v) => config.workdir = PathBuf::from(v),
                None => return usage(),
            },
            "--etc" => match args.next() {
                Some(v) => config.etc = PathBuf::from(v),
                None => return usage(),
            },
            "--no-system" => config.system = false,
            "--version" => {
                println!("hearth-guest-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
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
