//! `hearth-scheduler`: parses configuration, then (through [`hearth_messages::binary`]) starts
//! logging and metrics, connects to NATS and runs the scheduler until SIGTERM/SIGINT (graceful
//! drain, exit 0). A configuration error exits 64 with a one-line message.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use hearth_messages::binary::{self, Failure, Runtime};
use hearth_messages::{connection, telemetry};
use hearth_scheduler::{RunError, SchedulerArgs, SchedulerConfig, metrics, run};

const NAME: &str = "hearth-scheduler";

fn main() -> ExitCode {
    match SchedulerArgs::parse().resolve() {
        // One thread by default: lower request/reply latency than a multi-thread runtime on
        // small hosts (docs/BENCHMARKS.md).
        Ok(config) => {
            let runtime = match config.runtime_threads {
                1 => Runtime::CurrentThread,
                n => Runtime::MultiThread(Some(n)),
            };
            binary::run(NAME, runtime, serve(config))
        }
        Err(err) => binary::config_error(NAME, &err),
    }
}

/// Why the scheduler stopped.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("metrics exporter on {listen}")]
    Metrics {
        listen: SocketAddr,
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
    #[error("connecting to NATS")]
    Connect(#[source] hearth_messages::transport::ConnectError),
    #[error(transparent)]
    Scheduler(RunError),
}

impl Failure for Stop {}

async fn serve(config: SchedulerConfig) -> Result<(), Stop> {
    if let Some(listen) = config.metrics_listen {
        metrics::install_exporter(listen).map_err(|source| Stop::Metrics { listen, source })?;
        metrics::register_templates(config.templates.iter().map(|t| &t.name));
        metrics::zero_tenants(config.tenants.quotas.keys().map(|t| t.as_str()));
        tracing::info!(%listen, "serving prometheus metrics");
    }
    // Connection events logged and counted; a NATS server that is not up yet is waited for
    // (and so is JetStream, in `run`).
    let nats = connection::connect(
        &config.nats_url,
        &format!("{NAME} {}", config.scheduler_id),
        &hearth_messages::transport::NatsAuth::from_env(),
    )
    .await
    .map_err(Stop::Connect)?;
    tracing::info!(url = %config.nats_url, scheduler_id = %config.scheduler_id, "nats client started");
    run(config, nats, telemetry::shutdown_signal())
        .await
        .map_err(Stop::Scheduler)
}
