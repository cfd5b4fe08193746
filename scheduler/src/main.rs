//! `hearth-scheduler`: parses configuration, starts logging and metrics, connects to NATS and runs
//! the scheduler until SIGTERM/SIGINT (graceful drain, exit 0). A configuration error exits 64
//! with a one-line message.

use std::process::ExitCode;

use clap::Parser;
use hearth_messages::telemetry;
use hearth_scheduler::{SchedulerArgs, metrics, run};

fn main() -> ExitCode {
    let config = match SchedulerArgs::parse().resolve() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("hearth-scheduler: {err}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("hearth-scheduler: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Inside the runtime: an OTLP exporter's gRPC channel lives on it.
        let telemetry = telemetry::init("hearth-scheduler");
        let result = serve(config).await;
        telemetry.shutdown().await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hearth-scheduler: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: hearth_scheduler::SchedulerConfig) -> Result<(), String> {
    if let Some(listen) = config.metrics_listen {
        metrics::install_exporter(listen)
            .map_err(|e| format!("metrics exporter on {listen}: {e}"))?;
        metrics::register_templates(config.templates.iter().map(|t| &t.name));
        metrics::zero_tenants(config.tenants.quotas.keys().map(|t| t.as_str()));
        tracing::info!(%listen, "serving prometheus metrics");
    }
    // Connection events logged and counted; a NATS server that is not up yet is waited for
    // (and so is JetStream, in `run`).
    let nats = hearth_messages::connection::connect(
        &config.nats_url,
        &format!("hearth-scheduler {}", config.scheduler_id),
        &hearth_messages::transport::NatsAuth::from_env(),
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(url = %config.nats_url, scheduler_id = %config.scheduler_id, "nats client started");
    run(config, nats, telemetry::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
