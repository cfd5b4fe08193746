//! Process telemetry shared by Hearth's binaries (feature `telemetry`): logging, optional OTLP trace
//! export and the shutdown signal.
//!
//! * Logs: `RUST_LOG`-style filtering (default `info`), text or JSON lines on stderr
//!   (`HEARTH_LOG_FORMAT=json`).
//! * Traces: off by default. `HEARTH_OTLP_ENDPOINT` (or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`),
//!   e.g. `http://otel-collector:4317`, installs a `tracing-opentelemetry` layer exporting spans
//!   over OTLP/gRPC with a batch span processor, `service.name` as given to [`init`]. Without it no
//!   OpenTelemetry layer is installed and spans cost what plain `tracing` spans cost.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Hearth's own variable naming the OTLP/gRPC endpoint.
pub const OTLP_ENDPOINT_ENV: &str = "HEARTH_OTLP_ENDPOINT";
/// The standard OpenTelemetry variable, used when [`OTLP_ENDPOINT_ENV`] is not set.
pub const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The OTLP endpoint from the environment, if tracing export is on.
pub fn otlp_endpoint() -> Option<String> {
    [OTLP_ENDPOINT_ENV, OTEL_ENDPOINT_ENV]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
}

/// What [`init`] installed; call [`Telemetry::shutdown`] before exiting to flush spans.
#[derive(Debug, Default)]
#[must_use = "call shutdown() before exiting so buffered spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the span exporter (no-op without one). Call it inside the runtime the
    /// exporter was created in: the flush runs on a blocking thread while the runtime drives the
    /// gRPC connection.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("telemetry: flushing spans: {err}"),
            Err(err) => eprintln!("telemetry: flushing spans: {err}"),
        }
    }
}

/// Installs the global subscriber for the service `service_name` (`hearth-scheduler`,
/// `hearth-worker`, `hearth`). With an OTLP endpoint configured it must run inside a Tokio runtime
/// (the gRPC channel lives there); outside one, export is skipped with a warning. Safe to call
/// twice (the second call installs nothing and returns an inert [`Telemetry`]).
pub fn init(service_name: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("HEARTH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let text_layer = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });

    let mut warning = None;
    let provider = match otlp_endpoint() {
        None => None,
        Some(_) if tokio::runtime::Handle::try_current().is_err() => {
            warning = Some("OTLP export needs a Tokio runtime at init; not exporting".to_owned());
            None
        }
        Some(endpoint) => match otlp_provider(service_name, &endpoint) {
            Ok(provider) => Some(provider),
            Err(err) => {
                warning = Some(format!(
                    "OTLP exporter for {endpoint}: {err}; not exporting"
                ));
                None
            }
        },
    };
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name))
            .with_tracked_inactivity(false)
    });

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(text_layer)
        .with(json_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    if !installed {
        // Someone else's subscriber is in place: our exporter would receive nothing.
        return Telemetry::default();
    }
    if provider.is_some() {
        tracing::info!(
            service = service_name,
            endpoint = otlp_endpoint().unwrap_or_default(),
            "exporting traces over OTLP/gRPC"
        );
    }
    Telemetry { provider }
}

fn otlp_provider(
    service_name: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown signal received; draining");
}
