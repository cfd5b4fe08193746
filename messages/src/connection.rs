//! How Hearth's binaries (scheduler, worker, `hearth up`) connect to NATS (feature `telemetry`):
//! one place for the connection event callback and its metric, the reconnect backoff, and the
//! start-up wait for NATS and JetStream.
//!
//! * Every connection event (connect, disconnect, reconnect, lame duck, slow consumer, server and
//!   client errors) is logged and counted in [`NATS_EVENTS_TOTAL`]`{event}`; [`register_metrics`]
//!   puts each known event at zero so a dashboard sees the series before the first fault.
//! * The first connection is retried, not fatal: a service started before its NATS server waits,
//!   with a log line at each attempt. Reconnects back off from 0 to [`MAX_RECONNECT_DELAY`], short
//!   enough that a restarted server is back in use within about a second.
//! * [`retry`] repeats a start-up step (opening KV buckets, the object store) with backoff while
//!   JetStream is unavailable, logging each failure, until it succeeds.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::Event;

use crate::transport::{ConnectError, NatsAuth, connect_with};

/// Counter of NATS connection events, label `event` (one of [`NATS_EVENTS`]).
pub const NATS_EVENTS_TOTAL: &str = "hearth_nats_events_total";

/// The `event` label values of [`NATS_EVENTS_TOTAL`].
pub const NATS_EVENTS: [&str; 9] = [
    "connected",
    "reconnected",
    "disconnected",
    "lame_duck",
    "slow_consumer",
    "server_error",
    "client_error",
    "draining",
    "closed",
];

/// The longest wait between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How often the client pings the server; two unanswered pings mark the connection dead. (The
/// async-nats default, 60 s, would keep a half-open connection for minutes.)
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Describes [`NATS_EVENTS_TOTAL`] and sets each of its series to zero. Call after the metrics
/// recorder is installed (without one this does nothing).
pub fn register_metrics() {
    metrics::describe_counter!(
        NATS_EVENTS_TOTAL,
        "NATS connection events (connects, disconnects, reconnects, slow consumers, lame duck, errors)"
    );
    for event in NATS_EVENTS {
        metrics::counter!(NATS_EVENTS_TOTAL, "event" => event).absolute(0);
    }
}

/// The label value of an event. A `Connected` after the first is a reconnect.
pub fn event_label(event: &Event, connected_before: bool) -> &'static str {
    match event {
        Event::Connected if connected_before => "reconnected",
        Event::Connected => "connected",
        Event::Disconnected => "disconnected",
        Event::LameDuckMode => "lame_duck",
        Event::SlowConsumer(_) => "slow_consumer",
        Event::ServerError(_) => "server_error",
        Event::ClientError(_) => "client_error",
        Event::Draining => "draining",
        Event::Closed => "closed",
    }
}

/// The delay before reconnect attempt `attempt` (1-based): none for the first, then doubling from
/// 100 ms up to [`MAX_RECONNECT_DELAY`].
pub fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempt - 2).min(16) as u32;
    Duration::from_millis(100u64.saturating_mul(1 << exp)).min(MAX_RECONNECT_DELAY)
}

/// Connects as a Hearth service named `name`: credentials from `auth`, the first connection
/// retried until it succeeds (a log line per attempt), every connection event logged and counted,
/// reconnects backed off by [`reconnect_delay`]. Returns at once; the client buffers until the
/// server is there. Fails only on a malformed URL or unreadable credentials.
pub async fn connect(
    urls: &str,
    name: &str,
    auth: &NatsAuth,
) -> Result<async_nats::Client, ConnectError> {
    register_metrics();
    let connected_before = Arc::new(AtomicBool::new(false));
    let owner = name.to_owned();
    let target = urls.to_owned();
    connect_with(urls, name, auth, true, move |options| {
        options
            .ping_interval(PING_INTERVAL)
            .reconnect_delay_callback(move |attempt| {
                // Called before every attempt, the first one (1) included.
                let delay = reconnect_delay(attempt);
                if attempt > 1 {
                    tracing::warn!(urls = %target, attempt, retry_in_ms = delay.as_millis() as u64,
                        "nats unavailable; retrying");
                }
                delay
            })
            .event_callback(move |event| {
                let before = connected_before.load(Ordering::SeqCst);
                if matches!(event, Event::Connected) {
                    connected_before.store(true, Ordering::SeqCst);
                }
                let label = event_label(&event, before);
                metrics::counter!(NATS_EVENTS_TOTAL, "event" => label).increment(1);
                match label {
                    "connected" | "reconnected" => {
                        tracing::info!(client = %owner, event = label, "nats connection event")
                    }
                    _ => tracing::warn!(client = %owner, event = label, detail = %event,
                        "nats connection event"),
                }
                async {}
            })
    })
    .await
}

/// The delay before start-up retry `attempt` (1-based): 250 ms doubling up to 5 s.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.saturating_sub(1).min(10)))
        .min(Duration::from_secs(5))
}

/// Runs `step` until it succeeds, backing off by [`retry_delay`] and logging each failure with
/// `what`. For start-up steps that need NATS or JetStream, which may not be there yet. Never
/// gives up: wrap it in a `select!` with the shutdown signal.
pub async fn retry<T, E, F, Fut>(what: &str, mut step: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        match step().await {
            Ok(value) => {
                if attempt > 0 {
                    tracing::info!(what, attempts = attempt + 1, "succeeded after retrying");
                }
                return value;
            }
            Err(err) => {
                attempt += 1;
                let delay = retry_delay(attempt);
                tracing::warn!(what, attempt, error = %err, retry_in_ms = delay.as_millis() as u64,
                    "nats or jetstream unavailable; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Waits until JetStream answers on `client` (an account info request), retrying with backoff and
/// a log line per attempt.
pub async fn wait_for_jetstream(client: &async_nats::Client) {
    let js = async_nats::jetstream::new(client.clone());
    retry("jetstream", || js.query_account()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_starts_at_zero_and_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(10), MAX_RECONNECT_DELAY);
        assert_eq!(reconnect_delay(usize::MAX), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn retry_delay_backs_off_to_five_seconds() {
        assert_eq!(retry_delay(1), Duration::from_millis(250));
        assert_eq!(retry_delay(2), Duration::from_millis(500));
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn every_event_has_a_registered_label() {
        let events = [
            (Event::Connected, false),
            (Event::Connected, true),
            (Event::Disconnected, false),
            (Event::LameDuckMode, false),
            (Event::SlowConsumer(1), false),
            (Event::Draining, false),
            (Event::Closed, false),
        ];
        let labels: Vec<&str> = events.iter().map(|(e, b)| event_label(e, *b)).collect();
        for label in &labels {
            assert!(NATS_EVENTS.contains(label), "{label}");
        }
        assert_eq!(labels[0], "connected");
        assert_eq!(labels[1], "reconnected");
    }

    #[tokio::test]
    async fn retry_repeats_until_the_step_succeeds() {
        let mut calls = 0;
        let value = retry("test", || {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err("down") } else { Ok(n) } }
        })
        .await;
        assert_eq!(value, 3);
    }
}
