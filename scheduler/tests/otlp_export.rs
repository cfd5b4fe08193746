//! The binaries' OTLP setup (`hearth_messages::telemetry`) on a current-thread runtime, as the
//! scheduler runs: with an endpoint configured it installs the exporter, and shutdown flushes and
//! returns in bounded time even when the collector is unreachable (no deadlock between the batch
//! processor's thread and the runtime that drives the gRPC channel).
//!
//! One test per file: it sets the environment and the process-wide subscriber.

use std::time::{Duration, Instant};

#[test]
fn otlp_export_installs_and_shuts_down_with_an_unreachable_collector() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    with_endpoint(&format!("http://127.0.0.1:{port}"), || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let telemetry = hearth_messages::telemetry::init("hearth-scheduler");
            assert!(telemetry.exporting(), "an endpoint turns export on");
            {
                let span = tracing::info_span!("exported", session_id = "s1");
                let _entered = span.enter();
                tracing::info!("inside a span");
            }
            let started = Instant::now();
            telemetry.shutdown().await;
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "shutdown took {:?}",
                started.elapsed()
            );
        });
    });
}

/// Runs `f` with `HEARTH_OTLP_ENDPOINT=endpoint`: in a child run of this test binary, because
/// edition 2024 makes `set_var` unsafe and the workspace forbids unsafe code.
fn with_endpoint(endpoint: &str, f: impl FnOnce()) {
    if std::env::var_os("HEARTH_OTLP_TEST_CHILD").is_some() {
        f();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new(exe)
        .args([
            "--exact",
            "otlp_export_installs_and_shuts_down_with_an_unreachable_collector",
            "--nocapture",
        ])
        .env("HEARTH_OTLP_TEST_CHILD", "1")
        .env("HEARTH_OTLP_ENDPOINT", endpoint)
        .status()
        .unwrap();
    assert!(status.success(), "the child run failed: {status}");
}
