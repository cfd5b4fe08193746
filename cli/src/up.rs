//! `hearth up`: the whole local stack in one command — a `nats-server` child with JetStream (unless
//! `--nats-url` names a running one), the scheduler and one worker in this process, with a `default`
//! template and a warm pool. Logs go to stderr; Ctrl-C or SIGTERM stops everything cleanly and
//! destroys the VMs the worker holds, unless `--keep-vms` leaves them for the next start to adopt.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use hearth_messages::{Subjects, TemplateName, WorkerId};
use hearth_scheduler::{SchedulerConfig, TemplateConfig};
use hearth_worker::provider::Isolation;
use hearth_worker::{ProviderKind, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// `hearth up` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where the stack keeps its state (NATS store, VMs, snapshots).
    #[arg(long, default_value = ".hearth")]
    pub data_dir: PathBuf,
    /// Client port of the nats-server started here (ignored with --nats-url).
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Warm VMs to keep ready for the `default` template.
    #[arg(long, default_value_t = 3)]
    pub pool: u32,
    /// Most VMs the worker holds.
    #[arg(long, default_value_t = 64)]
    pub max_vms: u32,
    /// VM backend of the worker.
    #[arg(long, value_enum, default_value = "process")]
    pub provider: ProviderKind,
    /// Isolation of the process provider: `sandbox` (hardened bubblewrap, the default) or
    /// `none` (commands run as your user on this machine: only for code you trust).
    #[arg(long, default_value = "sandbox", value_parser = parse_isolation)]
    pub isolation: Isolation,
    /// bubblewrap binary of the sandbox (default /usr/bin/bwrap).
    #[arg(long)]
    pub bwrap: Option<PathBuf>,
    /// Prometheus `/metrics` of both components; "off" disables it.
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub metrics_listen: String,
    /// Guest image (vmlinuz + initrd.img) for `--provider qemu`; `scripts/setup-qemu.sh` builds it.
    #[arg(long)]
    pub qemu_image: Option<PathBuf>,
    /// A scheduler TOML file (templates, lifetimes); replaces the built-in `default` template.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Leave the VMs running when `hearth up` exits, for the next `hearth up` to adopt (sessions
    /// survive the restart). Without it, every VM this stack holds is destroyed on exit; template
    /// snapshots stay, so the next start refills its pool by restoring.
    #[arg(long)]
    pub keep_vms: bool,
}

fn parse_isolation(value: &str) -> std::result::Result<Isolation, String> {
    Isolation::parse(value).ok_or_else(|| format!("{value:?} is not sandbox or none"))
}

/// The built-in template: small, with a bootstrap that shows it ran once, at template build time.
fn default_template(min_ready: u32) -> TemplateConfig {
    let mut template = TemplateConfig::new(TemplateName::default_template(), min_ready);
    template.max_ready = Some(min_ready.max(1) * 2);
    template.bootstrap = Some(vec![
        "sh".into(),
        "-c".into(),
        "mkdir -p work && echo \"bootstrapped $(date -u +%FT%TZ)\" > .hearth-template".into(),
    ]);
    template
}

/// Runs the stack until Ctrl-C / SIGTERM.
pub async fn up(args: UpArgs, nats_url: Option<String>, subjects: Subjects) -> Result<()> {
    let telemetry = hearth_messages::telemetry::init("hearth");
    let result = run_stack(args, nats_url, subjects).await;
    telemetry.shutdown().await;
    result
}

async fn run_stack(args: UpArgs, nats_url: Option<String>, subjects: Subjects) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .context("resolving the data dir")?;

    // NATS: an existing server, or our own child with JetStream in the data dir.
    let (nats_server, url) = match nats_url {
        Some(url) => (None, url),
        None => {
            let store = data_dir.join("nats");
            let port = args.nats_port;
            let server = tokio::task::spawn_blocking(move || {
                hearth_natsd::NatsServer::builder()
                    .port(port)
                    .store_dir(store)
                    // Room for large exec replies and file transfers (the default is 1 MB).
                    .config("max_payload: 8MB\n")
                    .start()
            })
            .await??;
            let url = server.url().to_owned();
            (Some(server), url)
        }
    };

    let metrics_listen: Option<SocketAddr> = match args.metrics_listen.as_str() {
        "off" => None,
        addr => Some(addr.parse().context("--metrics-listen")?),
    };
    if let Some(listen) = metrics_listen {
        let builder = hearth_scheduler::metrics::builder().map_err(|e| anyhow!("{e}"))?;
        hearth_worker::metrics::configure(builder)
            .map_err(|e| anyhow!("{e}"))?
            .with_http_listener(listen)
            .install()
            .map_err(|e| anyhow!("metrics on {listen}: {e}"))?;
        hearth_worker::metrics::describe();
        hearth_scheduler::metrics::describe();
    }

    // Connection events logged and counted; NATS or JetStream not up yet is waited for.
    let nats = hearth_messages::connection::connect(
        &url,
        "hearth up",
        &hearth_messages::transport::NatsAuth::from_env(),
    )
    .await?;
    tokio::select! {
        _ = hearth_messages::connection::wait_for_jetstream(&nats) => {}
        _ = hearth_messages::telemetry::shutdown_signal() => return Ok(()),
    }

    // The worker.
    let mut worker_config = WorkerConfig::new(WorkerId::new("local")?, data_dir.join("worker"));
    worker_config.nats_url = url.clone();
    worker_config.subjects = subjects.clone();
    worker_config.provider = args.provider;
    worker_config.isolation = args.isolation;
    if let Some(bwrap) = &args.bwrap {
        worker_config.sandbox.bwrap = bwrap.clone();
    }
    worker_config.max_vms = args.max_vms;
    worker_config.backup_dir = Some(data_dir.join("backups"));
    worker_config.qemu.image = args
        .qemu_image
        .clone()
        .unwrap_or_else(|| PathBuf::from(".tools/images/current"));
    let provider = hearth_worker::open_provider(&worker_config).context("opening the provider")?;
    let worker = Worker::start(worker_config, nats.clone(), provider.clone())
        .await
        .context("starting the worker")?;

    // The scheduler.
    let mut scheduler_config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            hearth_scheduler::config::from_toml(&text).map_err(|e| anyhow!("{e}"))?
        }
        None => SchedulerConfig {
            templates: vec![default_template(args.pool)],
            ..SchedulerConfig::default()
        },
    };
    scheduler_config.nats_url = url.clone();
    scheduler_config.subjects = subjects.clone();
    scheduler_config.validate().map_err(|e| anyhow!("{e}"))?;
    let stop = CancellationToken::new();
    let scheduler = {
        let stop = stop.clone();
        let nats = nats.clone();
        tokio::spawn(async move {
            hearth_scheduler::run(scheduler_config, nats, stop.cancelled_owned()).await
        })
    };

    eprintln!();
    eprintln!("hearth up: the stack is running (Ctrl-C to stop)");
    eprintln!("  nats      {url}");
    match metrics_listen {
        Some(listen) => eprintln!("  metrics   http://{listen}/metrics"),
        None => eprintln!("  metrics   off"),
    }
    eprintln!("  data      {}", data_dir.display());
    eprintln!("  worker    local ({:?} provider)", args.provider);
    eprintln!("try, in another terminal:");
    eprintln!("  cargo run -q --bin hearth -- session create");
    eprintln!("  cargo run -q --bin hearth -- exec <session_id> -- uname -a");
    eprintln!();

    let mut scheduler = scheduler;
    tokio::select! {
        _ = hearth_messages::telemetry::shutdown_signal() => {}
        joined = &mut scheduler => {
            // The scheduler stopped on its own: an error worth showing.
            worker.drain().await;
            if !args.keep_vms {
                destroy_vms(provider.as_ref()).await;
            }
            return scheduler_result(joined);
        }
    }
    eprintln!("hearth up: stopping");
    stop.cancel();
    let (joined, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), &mut scheduler),
        worker.drain()
    );
    if !args.keep_vms {
        destroy_vms(provider.as_ref()).await;
    }
    drop(nats_server);
    match joined {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(joined) => scheduler_result(joined),
        Err(_) => Err(anyhow!("the scheduler did not stop within 20 s")),
    }
}

/// Destroys every VM `provider` holds (the stack is stopping without `--keep-vms`), so none
/// outlives `hearth up` (QEMU VMs would, holding ~190 MB each). Failures are reported, not fatal.
async fn destroy_vms(provider: &dyn hearth_worker::provider::VmRuntime) {
    use hearth_worker::provider::VmState;
    let vms = match provider.list_vms().await {
        Ok(vms) => vms,
        Err(err) => {
            eprintln!("hearth up: listing the VMs to destroy failed: {err}");
            return;
        }
    };
    let live: Vec<_> = vms
        .into_iter()
        .filter(|v| v.state != VmState::Destroyed)
        .collect();
    let mut destroyed = 0;
    for vm in &live {
        match provider.destroy_vm(&vm.vm_id).await {
            Ok(_) => destroyed += 1,
            Err(err) => eprintln!("hearth up: destroying {}: {err}", vm.vm_id),
        }
    }
    if !live.is_empty() {
        eprintln!(
            "hearth up: destroyed {destroyed} of {} VMs (--keep-vms keeps them)",
            live.len()
        );
    }
}

fn scheduler_result(
    joined: Result<Result<(), hearth_scheduler::RunError>, tokio::task::JoinError>,
) -> Result<()> {
    match joined {
        Ok(Ok(())) => Err(anyhow!("the scheduler stopped")),
        Ok(Err(err)) => Err(anyhow!("scheduler: {err}")),
        Err(err) => Err(anyhow!("scheduler task: {err}")),
    }
}
