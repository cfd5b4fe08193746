//! W3C trace context over NATS headers (feature `otel`): the one place where Hearth injects and
//! extracts `traceparent` / `tracestate`.
//!
//! * Senders ([`crate::HearthClient`], the scheduler's job requests) call [`inject`]: when the
//!   current `tracing` span has an OpenTelemetry context (a `tracing-opentelemetry` layer is
//!   installed and the span is sampled or recorded), its `traceparent` goes into the headers. With
//!   no such context nothing is added: no trace is fabricated.
//! * Receivers (the scheduler's service, the worker's jobs and data plane) call [`set_parent`] on
//!   the request's span right after creating it: the remote context becomes the span's parent, so
//!   one trace spans executor → scheduler → worker. Without a `traceparent` header this is one
//!   header lookup and nothing else.
//!
//! A receiver without an OpenTelemetry layer can still pass the caller's context on: run the
//! handler under [`with_remote`] and [`inject`] falls back to the attached (remote) context.

use std::future::Future;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` header: `00-<trace id>-<parent span id>-<flags>`.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C `tracestate` header (vendor data, passed on unchanged).
pub const TRACESTATE_HEADER: &str = "tracestate";

/// The header name as a constant: looking it up allocates nothing.
const TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT_HEADER);

/// Writes propagation fields into a NATS [`HeaderMap`].
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

/// Reads propagation fields from a NATS [`HeaderMap`].
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Whether `cx` carries a valid span context (something worth propagating).
pub fn has_span(cx: &Context) -> bool {
    cx.span().span_context().is_valid()
}

/// The context to propagate from here: the current `tracing` span's OpenTelemetry context, or
/// else the attached OpenTelemetry context (a remote context passed through by [`with_remote`]).
/// Neither may hold a span: check with [`has_span`].
pub fn current_context() -> Context {
    let cx = tracing::Span::current().context();
    if has_span(&cx) {
        cx
    } else {
        Context::current()
    }
}

/// Injects `cx` into `headers` (nothing when `cx` holds no valid span).
pub fn inject_context(cx: &Context, headers: &mut HeaderMap) {
    if has_span(cx) {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// Injects the [`current_context`] into `headers`, if there is one.
pub fn inject(headers: &mut HeaderMap) {
    inject_context(&current_context(), headers);
}

/// Fresh headers carrying the current trace context (empty, and unallocated, when there is none).
pub fn headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    inject(&mut headers);
    headers
}

/// The remote context a message carries, if it has a valid `traceparent`.
pub fn extract(headers: Option<&HeaderMap>) -> Option<Context> {
    let headers = headers?;
    headers.get(TRACEPARENT)?;
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    has_span(&cx).then_some(cx)
}

/// Makes the context carried by `headers` the parent of `span` (call it before the span is first
/// entered). Returns the remote context, for [`with_remote`]. Without a `traceparent` (or without
/// an OpenTelemetry layer to record the parent) the span keeps its local parent.
pub fn set_parent(span: &tracing::Span, headers: Option<&HeaderMap>) -> Option<Context> {
    let cx = extract(headers)?;
    // Errors mean no OpenTelemetry layer or a disabled span: nothing to record, not a failure.
    let _ = span.set_parent(cx.clone());
    Some(cx)
}

/// Runs `future` with `remote` attached as the current OpenTelemetry context (when there is one),
/// so requests it makes carry the caller's trace even when this process records no spans.
pub async fn with_remote<F: Future>(remote: Option<Context>, future: F) -> F::Output {
    match remote {
        Some(cx) => future.with_context(cx).await,
        None => future.await,
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceFlags, TraceId, TraceState, TracerProvider as _,
    };
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn remote_context() -> Context {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "value")]).unwrap(),
        );
        Context::new().with_remote_span_context(span_context)
    }

    #[test]
    fn inject_then_extract_round_trips() {
        let cx = remote_context();
        let mut headers = HeaderMap::new();
        inject_context(&cx, &mut headers);
        assert_eq!(
            headers.get(TRACEPARENT_HEADER).unwrap().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            headers.get(TRACESTATE_HEADER).unwrap().as_str(),
            "vendor=value"
        );
        let back = extract(Some(&headers)).expect("a context");
        let (sent, got) = (cx.span().span_context().clone(), back.span());
        let got = got.span_context();
        assert_eq!(got.trace_id(), sent.trace_id());
        assert_eq!(got.span_id(), sent.span_id());
        assert_eq!(got.trace_flags(), sent.trace_flags());
        assert_eq!(got.trace_state().header(), "vendor=value");
        assert!(got.is_remote());
    }

    #[test]
    fn nothing_is_fabricated_without_a_context() {
        // No tracing span, no attached context: no headers.
        assert!(headers().is_empty());
        let mut headers = HeaderMap::new();
        inject_context(&Context::new(), &mut headers);
        assert!(headers.is_empty());
        assert!(extract(None).is_none());
        assert!(extract(Some(&HeaderMap::new())).is_none());
        let mut bad = HeaderMap::new();
        bad.insert(TRACEPARENT_HEADER, "00-not-a-trace-01");
        assert!(extract(Some(&bad)).is_none());
    }

    #[test]
    fn the_current_span_is_injected_and_a_remote_parent_is_adopted() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            // A server span parented from headers...
            let mut incoming = HeaderMap::new();
            inject_context(&remote_context(), &mut incoming);
            let span = tracing::info_span!("server");
            assert!(set_parent(&span, Some(&incoming)).is_some());
            // ...propagates its own id, in the caller's trace, to the next hop.
            let outgoing = span.in_scope(headers);
            let parent = outgoing
                .get(TRACEPARENT_HEADER)
                .unwrap()
                .as_str()
                .to_owned();
            assert!(parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert!(!parent.contains("00f067aa0ba902b7"), "a new span id");
            drop(span);
        });
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            spans[0].parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
    }

    #[tokio::test]
    async fn a_remote_context_passes_through_without_a_layer() {
        let headers = with_remote(Some(remote_context()), async { headers() }).await;
        assert_eq!(
            headers.get(TRACEPARENT_HEADER).unwrap().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }
}
