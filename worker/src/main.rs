//! `hearth-worker`: parses configuration, starts logging and metrics, connects to NATS and runs the
//! worker until SIGTERM/SIGINT. A configuration error, or a host that cannot give the configured
//! isolation, exits 64 with a one-line message saying what to install or change.

use std::process::ExitCode;

use clap::Parser;
use hearth_messages::{connection, telemetry};
use hearth_worker::{WorkerArgs, WorkerConfig, metrics, open_provider, run};

fn main() -> ExitCode {
    let config = match WorkerArgs::parse().resolve() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("hearth-worker: {err}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("hearth-worker: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Inside the runtime: an OTLP exporter's gRPC channel lives on it.
        let telemetry = telemetry::init("hearth-worker");
        let result = serve(config).await;
        telemetry.shutdown().await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("hearth-worker: {message}");
            ExitCode::from(code)
        }
    }
}

/// Why the worker stopped, and its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { code: 1, message }
    }
}

async fn serve(config: WorkerConfig) -> Result<(), Failure> {
    if let Some(listen) = config.metrics_listen {
        metrics::install_exporter(listen)
            .map_err(|e| format!("metrics exporter on {listen}: {e}"))?;
        metrics::describe();
    }
    let provider = open_provider(&config).map_err(|e| Failure {
        // The host cannot do what the configuration asks (no bubblewrap, no agent binary, …).
        code: if e.kind() == hearth_worker::provider::ProviderErrorKind::Unavailable {
            64
        } else {
            1
        },
        message: format!("provider: {e}"),
    })?;
    let nats = connection::connect(
        &config.nats_url,
        &format!("hearth-worker {}", config.worker_id),
        &hearth_messages::transport::NatsAuth::from_env(),
    )
    .await
    .map_err(|e| e.to_string())?;
    // NATS or JetStream may not be up yet: wait (logging each attempt) instead of exiting.
    let shutdown = telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        _ = connection::wait_for_jetstream(&nats) => {}
        _ = &mut shutdown => return Ok(()),
    }
    run(config, nats, provider, shutdown)
        .await
        .map_err(|e| Failure::from(e.to_string()))
}
