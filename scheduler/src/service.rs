//! The NATS micro service `hearth-scheduler`: decodes client requests, maps them onto the core and
//! encodes the replies. Every request gets its own task (a slow cold claim never blocks a warm
//! one) and exactly one reply — errors included, with `{code, message}` in the body — even if the
//! handler panics.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use async_nats::service::ServiceExt;
use futures::{FutureExt, StreamExt};
use hearth_messages::transport::{Reply, decode_message};
use hearth_messages::{
    CreateSessionRequest, Empty, KeepaliveRequest, ListSessionsRequest, SessionOp,
    SnapshotSessionRequest, Subjects, WireError,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::core::Scheduler;

/// The micro service name (`$SRV.PING.hearth-scheduler`).
pub const SERVICE_NAME: &str = hearth_messages::subjects::SCHEDULER_SERVICE;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[error("starting the {SERVICE_NAME} service: {0}")]
pub struct ServiceError(String);

/// The endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Create,
    List,
    Session(SessionOp),
    Templates,
    Pools,
}

/// Serves the client API until `stop` is cancelled, then stops taking requests and waits (at most
/// `drain_grace`) for the ones in flight.
pub async fn serve(
    scheduler: Scheduler,
    client: async_nats::Client,
    subjects: Subjects,
    scheduler_id: &str,
    stop: CancellationToken,
    drain_grace: Duration,
) -> Result<(), ServiceError> {
    let service = client
        .service_builder()
        .description("Hearth scheduler: warm-pool microVM sessions")
        .metadata(std::collections::HashMap::from([(
            "scheduler_id".to_owned(),
            scheduler_id.to_owned(),
        )]))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| ServiceError(e.to_string()))?;
    let mut routes = vec![
        (
            "sessions-create",
            subjects.sessions_create(),
            Endpoint::Create,
        ),
        ("sessions-list", subjects.sessions_list(), Endpoint::List),
        (
            "templates-list",
            subjects.templates_list(),
            Endpoint::Templates,
        ),
        ("pools-status", subjects.pools_status(), Endpoint::Pools),
    ];
    for op in SessionOp::CONTROL {
        routes.push((
            match op {
                SessionOp::Get => "sessions-get",
                SessionOp::Keepalive => "sessions-keepalive",
                SessionOp::Release => "sessions-release",
                _ => "sessions-snapshot",
            },
            subjects.session_wildcard(op),
            Endpoint::Session(op),
        ));
    }
    let mut streams = Vec::new();
    for (name, subject, endpoint) in routes {
        let ep = service
            .endpoint_builder()
            .name(name)
            .add(subject)
            .await
            .map_err(|e| ServiceError(e.to_string()))?;
        streams.push(ep.map(move |request| (endpoint, request)).boxed());
    }
    let mut requests = futures::stream::select_all(streams);
    tracing::info!(
        service = SERVICE_NAME,
        prefix = subjects.prefix(),
        "serving the client api"
    );

    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            next = requests.next() => match next {
                Some((endpoint, request)) => {
                    let scheduler = scheduler.clone();
                    let subjects = subjects.clone();
                    tracker.spawn(handle(scheduler, subjects, endpoint, request));
                }
                None => break,
            }
        }
    }
    let _ = service.stop().await;
    drop(requests);
    tracker.close();
    if tokio::time::timeout(drain_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "requests still in flight after the drain grace"
        );
    }
    Ok(())
}

async fn handle(
    scheduler: Scheduler,
    subjects: Subjects,
    endpoint: Endpoint,
    request: async_nats::service::Request,
) {
    let span = tracing::debug_span!("request", subject = %request.message.subject);
    async {
        let encoding = hearth_messages::transport::encoding_of(request.message.headers.as_ref());
        let reply = AssertUnwindSafe(dispatch(&scheduler, &subjects, endpoint, &request.message))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!("request handler panicked");
                Reply::error(encoding, &WireError::internal("internal error"))
            });
        if let Err(err) = request
            .respond_with_headers(Ok(reply.payload), reply.headers)
            .await
        {
            tracing::debug!(error = %err, "could not send a reply");
        }
        if endpoint == Endpoint::Create {
            // The refill starts after the reply.
            scheduler.wake_refill();
        }
    }
    .instrument(span)
    .await
}

async fn dispatch(
    s: &Scheduler,
    subjects: &Subjects,
    endpoint: Endpoint,
    message: &async_nats::Message,
) -> Reply {
    match endpoint {
        Endpoint::Create => {
            let (enc, req) = decode_message::<CreateSessionRequest>(message);
            let result = match req {
                Ok(req) => s.claim_session(req).await,
                Err(e) => Err(e),
            };
            Reply::from_result(enc, &result)
        }
        Endpoint::List => {
            let (enc, req) = decode_message::<ListSessionsRequest>(message);
            Reply::from_result(enc, &req.map(|r| s.list_sessions(&r)))
        }
        Endpoint::Templates => {
            let (enc, req) = decode_message::<Empty>(message);
            Reply::from_result(enc, &req.map(|_| s.list_templates()))
        }
        Endpoint::Pools => {
            let (enc, req) = decode_message::<Empty>(message);
            Reply::from_result(enc, &req.map(|_| s.pools_status()))
        }
        Endpoint::Session(op) => {
            let enc = hearth_messages::transport::encoding_of(message.headers.as_ref());
            let sid = match subjects.parse_session(&message.subject) {
                Ok(Some((sid, parsed))) if parsed == op => sid,
                Ok(_) => {
                    return Reply::error(enc, &WireError::bad_request("malformed session subject"));
                }
                Err(e) => return Reply::error(enc, &e.into()),
            };
            match op {
                SessionOp::Get => {
                    let (enc, req) = decode_message::<Empty>(message);
                    Reply::from_result(enc, &req.and_then(|_| s.get_session(&sid)))
                }
                SessionOp::Keepalive => {
                    let (enc, req) = decode_message::<KeepaliveRequest>(message);
                    let result = match req {
                        Ok(req) => s.keepalive(&sid, req).await,
                        Err(e) => Err(e),
                    };
                    Reply::from_result(enc, &result)
                }
                SessionOp::Release => {
                    let (enc, req) = decode_message::<Empty>(message);
                    let result = match req {
                        Ok(_) => s.release(&sid).await,
                        Err(e) => Err(e),
                    };
                    Reply::from_result(enc, &result)
                }
                SessionOp::Snapshot => {
                    let (enc, req) = decode_message::<SnapshotSessionRequest>(message);
                    let result = match req {
                        Ok(req) => s.snapshot_session(&sid, req).await,
                        Err(e) => Err(e),
                    };
                    Reply::from_result(enc, &result)
                }
                _ => Reply::error(enc, &WireError::bad_request("not a scheduler operation")),
            }
        }
    }
}
