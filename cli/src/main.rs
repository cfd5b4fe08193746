//! `hearth`: run the local stack (`hearth up`) and talk to it (`hearth session …`, `hearth exec …`,
//! `hearth pool status`). Thin: every command is a call on `HearthClient` or a library's `run`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use hearth_messages::{HearthClient, Subjects};

mod bench;
mod client_cmds;
mod shell;
mod up;

const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Hearth: warm microVM sessions over NATS.
#[derive(Debug, Parser)]
#[command(name = "hearth", version)]
struct Cli {
    /// NATS server URL (default nats://127.0.0.1:4222). With `up`: use this server instead of
    /// starting one.
    #[arg(long, global = true, env = "HEARTH_NATS_URL")]
    nats_url: Option<String>,
    /// Subject prefix.
    #[arg(long, global = true, env = "HEARTH_PREFIX", default_value = "hearth")]
    prefix: String,
    /// Request timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local stack: nats-server, the scheduler and one worker with a warm pool.
    Up(up::UpArgs),
    /// Measure claims, exec, cold claims, refill and memory against a same-run NATS baseline.
    Bench(bench::BenchArgs),
    /// Sessions: create, get, list, keepalive, release, snapshot.
    #[command(subcommand)]
    Session(client_cmds::SessionCmd),
    /// Run a command in a session, streaming its output; exits with the command's exit code.
    Exec(client_cmds::ExecArgs),
    /// An interactive terminal in a session (a shell on a PTY; `--attach` reattaches to one);
    /// exits with the shell's exit code.
    Shell(shell::ShellArgs),
    /// Warm pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Templates: list them (the default), or build one's root filesystem from a container image.
    Templates(client_cmds::TemplatesArgs),
    /// Operator requests to the scheduler.
    #[command(subcommand)]
    Admin(AdminCmd),
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    /// Run the session lifecycle pass (TTL, idle stop, backup, prune, retention) now instead of
    /// at its next tick.
    Maintenance,
    /// Every worker as the scheduler sees it: health, capacity, and its view of the worker's
    /// inventory (generation, VMs, synced).
    Workers,
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    /// Ready / restoring / target / claimed per template.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("hearth: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("hearth: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn client(
    nats_url: Option<&str>,
    subjects: Subjects,
    timeout: Duration,
) -> Result<HearthClient> {
    let url = nats_url.unwrap_or(DEFAULT_NATS_URL);
    let nats = hearth_messages::transport::connect(
        url,
        "hearth cli",
        &hearth_messages::transport::NatsAuth::from_env(),
        false,
    )
    .await?;
    Ok(HearthClient::new(nats)
        .with_subjects(subjects)
        .with_timeout(timeout))
}

async fn dispatch(cli: Cli) -> Result<u8> {
    let subjects = Subjects::new(&cli.prefix)?;
    let timeout = Duration::from_millis(cli.timeout_ms);
    let command = match cli.command {
        Command::Up(args) => {
            up::up(args, cli.nats_url, subjects).await?;
            return Ok(0);
        }
        Command::Bench(args) => {
            bench::run(args, cli.nats_url, subjects).await?;
            return Ok(0);
        }
        // Local: unpacks an image on this host, no NATS needed.
        Command::Templates(client_cmds::TemplatesArgs {
            cmd: Some(client_cmds::TemplatesCmd::Build(args)),
        }) => {
            client_cmds::build_template(&args)?;
            return Ok(0);
        }
        other => other,
    };
    let hearth = client(cli.nats_url.as_deref(), subjects, timeout).await?;
    match command {
        Command::Session(cmd) => client_cmds::session(&hearth, cmd).await?,
        Command::Exec(args) => {
            let code = client_cmds::exec(&hearth, args).await?;
            return Ok(code.clamp(0, 255) as u8);
        }
        Command::Shell(args) => {
            let code = shell::shell(&hearth, args).await?;
            return Ok(code.clamp(0, 255) as u8);
        }
        Command::Pool(PoolCmd::Status) => client_cmds::pool_status(&hearth).await?,
        Command::Templates(args) => client_cmds::templates(&hearth, args).await?,
        Command::Admin(AdminCmd::Maintenance) => client_cmds::maintenance(&hearth).await?,
        Command::Admin(AdminCmd::Workers) => client_cmds::workers(&hearth).await?,
        Command::Up(_) | Command::Bench(_) => {}
    }
    Ok(0)
}
