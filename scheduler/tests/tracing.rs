//! W3C trace context through real NATS hops: an executor's `HearthClient` request made inside a
//! root span reaches a real scheduler (and, through its job requests, a real worker), and an exec
//! reaches the worker's data plane; every server-side span lands in the executor's trace with the
//! executor's span as its (transitive) parent.
//!
//! One test per file: it installs the process-wide tracing subscriber (with an in-memory
//! OpenTelemetry exporter) that the in-process scheduler and worker tasks report to.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hearth_messages::{CreateSessionRequest, ExecRequest, HearthClient, SessionId, WorkerId};
use hearth_scheduler::{SchedulerConfig, TemplateConfig};
use hearth_testkit::NatsServer;
use hearth_worker::provider::FakeProvider;
use hearth_worker::{ProviderKind, Worker, WorkerConfig};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The chain of span names from `span` up to the root of what was exported.
fn ancestry(span: &SpanData, by_id: &HashMap<SpanId, &SpanData>) -> Vec<String> {
    let mut names = vec![span.name.to_string()];
    let mut parent = span.parent_span_id;
    while let Some(p) = by_id.get(&parent) {
        names.push(p.name.to_string());
        parent = p.parent_span_id;
    }
    names
}

#[tokio::test]
async fn one_trace_spans_executor_scheduler_and_worker() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))),
    )
    .unwrap();

    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut wc = WorkerConfig::new(WorkerId::new("w1").unwrap(), dir.path().join("w1"));
    wc.nats_url = server.url().to_owned();
    wc.provider = ProviderKind::Fake;
    wc.heartbeat_interval = Duration::from_millis(250);
    wc.drain_grace = Duration::from_millis(200);
    let worker = Worker::start(
        wc,
        server.connect().await.unwrap(),
        Arc::new(FakeProvider::new()),
    )
    .await
    .unwrap();
    let config = SchedulerConfig {
        nats_url: server.url().to_owned(),
        scheduler_id: "s1".to_owned(),
        heartbeat_timeout: Duration::from_millis(1500),
        lease_ttl: Duration::from_millis(1500),
        claim_wait: Duration::from_secs(5),
        drain_grace: Duration::from_secs(2),
        templates: vec![TemplateConfig::new(
            hearth_messages::TemplateName::new("default").unwrap(),
            1,
        )],
        ..SchedulerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(hearth_scheduler::run(
        config,
        server.connect().await.unwrap(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = HearthClient::new(server.connect().await.unwrap());

    // Outside any span the client sends no trace context (none is fabricated): these polls make
    // scheduler spans of their own traces, never children of the executor's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !client
        .pool_status()
        .await
        .is_ok_and(|s| s.pools.iter().any(|p| p.ready >= 1))
    {
        assert!(tokio::time::Instant::now() < deadline, "no warm vm");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The executor's work, in one root span.
    let root = tracing::info_span!("executor");
    let session_id = SessionId::new("traced-1").unwrap();
    async {
        let session = client
            .create_session(&CreateSessionRequest {
                session_id: Some(session_id.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(session.session_id, session_id);
        let result = client
            .exec(&session_id, &ExecRequest::argv(["echo", "traced"]))
            .await
            .unwrap();
        assert_eq!(result.exit_code, 0);
    }
    .instrument(root.clone())
    .await;
    drop(root);

    // Server spans close just after their replies: wait for them to be exported.
    let wanted = |spans: &[SpanData]| {
        ["executor", "sessions-create", "exec"]
            .iter()
            .all(|name| spans.iter().any(|s| s.name == *name))
            && spans
                .iter()
                .any(|s| s.name == "job" && attr(s, "session_id").as_deref() == Some("traced-1"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = exporter.get_finished_spans().unwrap();
        if wanted(&spans) {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans missing; exported: {:?}",
            spans.iter().map(|s| s.name.to_string()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let root = spans.iter().find(|s| s.name == "executor").unwrap();
    let trace_id = root.span_context.trace_id();
    let in_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .collect();
    let by_id: HashMap<SpanId, &SpanData> = in_trace
        .iter()
        .map(|s| (s.span_context.span_id(), *s))
        .collect();

    // executor → scheduler: the claim's span is a direct child of the executor's span, across
    // the NATS hop, and carries the session's ids.
    let create = in_trace
        .iter()
        .find(|s| s.name == "sessions-create")
        .expect("the scheduler's claim span is in the executor's trace");
    assert_eq!(create.parent_span_id, root.span_context.span_id());
    assert!(create.parent_span_is_remote, "parented from the headers");
    assert_eq!(attr(create, "session_id").as_deref(), Some("traced-1"));
    assert_eq!(attr(create, "vm_id").as_deref(), Some("traced-1"));
    assert_eq!(attr(create, "worker_id").as_deref(), Some("w1"));
    assert_eq!(attr(create, "template").as_deref(), Some("default"));

    // scheduler → worker: the job that made the session (a rename of a warm VM, or a cold create)
    // is a worker span whose ancestry runs through the scheduler's job and claim spans to the
    // executor's span.
    let job = in_trace
        .iter()
        .find(|s| s.name == "job" && attr(s, "session_id").as_deref() == Some("traced-1"))
        .expect("the worker's job span is in the executor's trace");
    assert!(job.parent_span_is_remote);
    assert_eq!(attr(job, "worker_id").as_deref(), Some("w1"));
    let chain = ancestry(job, &by_id);
    assert_eq!(chain.first().map(String::as_str), Some("job"));
    assert!(
        chain.iter().any(|n| n == "sessions-create"),
        "job ancestry {chain:?}"
    );
    assert_eq!(chain.last().map(String::as_str), Some("executor"));

    // executor → worker data plane: the exec span is a direct child of the executor's span.
    let exec = in_trace
        .iter()
        .find(|s| s.name == "exec")
        .expect("the worker's exec span is in the executor's trace");
    assert_eq!(exec.parent_span_id, root.span_context.span_id());
    assert!(exec.parent_span_is_remote);
    assert_eq!(attr(exec, "session_id").as_deref(), Some("traced-1"));
    assert_eq!(attr(exec, "worker_id").as_deref(), Some("w1"));

    // Requests made outside the root span stayed out of its trace.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "pools-status" && s.span_context.trace_id() != trace_id),
        "untraced requests get traces of their own"
    );
    assert!(!in_trace.iter().any(|s| s.name == "pools-status"));

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), scheduler).await;
    worker.drain().await;
}
