//! `hearth-worker`: parses configuration, then (through [`hearth_messages::binary`]) starts logging
//! and metrics, connects to NATS and runs the worker until SIGTERM/SIGINT. A configuration error,
//! or a host that cannot give the configured isolation, exits 64 with a one-line message saying
//! what to install or change.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use hearth_messages::binary::{self, EXIT_CONFIG, Failure, Runtime};
use hearth_messages::{connection, telemetry};
use hearth_worker::provider::{ProviderError, ProviderErrorKind};
use hearth_worker::{WorkerArgs, WorkerConfig, WorkerError, metrics, open_provider, run};

const NAME: &str = "hearth-worker";

fn main() -> ExitCode {
    match WorkerArgs::parse().resolve() {
        Ok(config) => binary::run(NAME, Runtime::MultiThread(None), serve(config)),
        Err(err) => binary::config_error(NAME, &err),
    }
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("metrics exporter on {listen}")]
    Metrics {
        listen: SocketAddr,
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
    #[error("provider")]
    Provider(#[source] ProviderError),
    #[error("connecting to NATS")]
    Connect(#[source] hearth_messages::transport::ConnectError),
    #[error(transparent)]
    Worker(WorkerError),
}

impl Failure for Stop {
    fn exit_code(&self) -> u8 {
        match self {
            // The host cannot do what the configuration asks (no bubblewrap, no agent binary, …).
            Stop::Provider(e) if e.kind() == ProviderErrorKind::Unavailable => EXIT_CONFIG,
            _ => 1,
        }
    }
}

async fn serve(config: WorkerConfig) -> Result<(), Stop> {
    if let Some(listen) = config.metrics_listen {
        metrics::install_exporter(listen).map_err(|source| Stop::Metrics { listen, source })?;
        metrics::describe();
    }
    let provider = open_provider(&config).map_err(Stop::Provider)?;
    let nats = connection::connect(
        &config.nats_url,
        &format!("{NAME} {}", config.worker_id),
        &hearth_messages::transport::NatsAuth::from_env(),
    )
    .await
    .map_err(Stop::Connect)?;
    // NATS or JetStream may not be up yet: wait (logging each attempt) instead of exiting.
    let shutdown = telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        _ = connection::wait_for_jetstream(&nats) => {}
        _ = &mut shutdown => return Ok(()),
    }
    run(config, nats, provider, shutdown)
        .await
        .map_err(Stop::Worker)
}
