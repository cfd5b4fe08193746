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
    Caller, CreateSessionRequest, DeleteTemplateRequest, Empty, KeepaliveRequest,
    ListSessionsRequest, QuotasStatus, Session, SessionList, SessionOp, SetQuotaRequest,
    SnapshotSessionRequest, Subjects, Template, TemplateList, TemplateName, WireError,
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
    TemplateDelete,
    Pools,
    QuotasGet,
    QuotasSet,
    Maintenance,
    Workers,
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
        (subjects.sessions_create(), Endpoint::Create),
        (subjects.sessions_list(), Endpoint::List),
        (subjects.templates_list(), Endpoint::Templates),
        (subjects.pools_status(), Endpoint::Pools),
        (
            subjects.template_delete_wildcard(),
            Endpoint::TemplateDelete,
        ),
        (subjects.admin_quotas_get(), Endpoint::QuotasGet),
        (subjects.admin_quotas_set(), Endpoint::QuotasSet),
        (subjects.admin_maintenance(), Endpoint::Maintenance),
        (subjects.admin_workers(), Endpoint::Workers),
    ];
    for op in SessionOp::CONTROL {
        routes.push((subjects.session_wildcard(op), Endpoint::Session(op)));
    }
    let mut streams = Vec::new();
    for (subject, endpoint) in routes {
        let ep = service
            .endpoint_builder()
            .name(endpoint.name())
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
    tracker.spawn(serve_unplaced(
        scheduler.clone(),
        client.clone(),
        subjects.clone(),
        stop.clone(),
    ));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            next = requests.next() => match next {
                Some((endpoint, request)) => {
                    // A tenant over its create quota is answered here, without a task, a span or
                    // decoding: a flood of creates costs the scheduler as little as it can, so
                    // the other tenants' claims keep their latency.
                    if endpoint == Endpoint::Create
                        && let Some(err) = refuse_early(&scheduler, &request)
                    {
                        let enc = hearth_messages::transport::encoding_of(
                            request.message.headers.as_ref(),
                        );
                        let reply = Reply::error(enc, &err);
                        if let Err(err) =
                            hearth_messages::transport::respond(&client, request, reply).await
                        {
                            tracing::debug!(error = %err, "could not send a reply");
                        }
                        continue;
                    }
                    let scheduler = scheduler.clone();
                    let subjects = subjects.clone();
                    let client = client.clone();
                    tracker.spawn(handle(scheduler, client, subjects, endpoint, request));
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

impl Endpoint {
    /// The endpoint's name (in `$SRV.INFO` and as the span's OpenTelemetry name).
    fn name(self) -> &'static str {
        match self {
            Endpoint::Create => "sessions-create",
            Endpoint::List => "sessions-list",
            Endpoint::Templates => "templates-list",
            Endpoint::TemplateDelete => "templates-delete",
            Endpoint::QuotasGet => "admin-quotas-get",
            Endpoint::QuotasSet => "admin-quotas-set",
            Endpoint::Maintenance => "admin-maintenance",
            Endpoint::Workers => "admin-workers",
            Endpoint::Pools => "pools-status",
            Endpoint::Session(SessionOp::Get) => "sessions-get",
            Endpoint::Session(SessionOp::Keepalive) => "sessions-keepalive",
            Endpoint::Session(SessionOp::Release) => "sessions-release",
            Endpoint::Session(SessionOp::Pause) => "sessions-pause",
            Endpoint::Session(SessionOp::Fork) => "sessions-fork",
            Endpoint::Session(_) => "sessions-snapshot",
        }
    }
}

async fn handle(
    scheduler: Scheduler,
    client: async_nats::Client,
    subjects: Subjects,
    endpoint: Endpoint,
    request: async_nats::service::Request,
) {
    // The request's span: a child of the caller's span when the request carries a `traceparent`,
    // so the jobs it sends to workers (which inject this span's context) join the caller's trace.
    let span = tracing::info_span!(
        "request",
        otel.name = endpoint.name(),
        otel.kind = "server",
        endpoint = endpoint.name(),
        session_id = tracing::field::Empty,
        vm_id = tracing::field::Empty,
        worker_id = tracing::field::Empty,
        template = tracing::field::Empty,
        tenant = tracing::field::Empty,
    );
    let remote = hearth_messages::trace::set_parent(&span, request.message.headers.as_ref());
    let work = async {
        let encoding = hearth_messages::transport::encoding_of(request.message.headers.as_ref());
        let reply = AssertUnwindSafe(dispatch(&scheduler, &subjects, endpoint, &request.message))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!("request handler panicked");
                Reply::error(encoding, &WireError::internal("internal error"))
            });
        // An error reply counts in `$SRV.STATS` (`num_errors`, `last_error`).
        if let Err(err) = hearth_messages::transport::respond(&client, request, reply).await {
            tracing::debug!(error = %err, "could not send a reply");
        }
        if endpoint == Endpoint::Create {
            // The refill starts after the reply.
            scheduler.wake_refill();
        }
    }
    .instrument(span);
    hearth_messages::trace::with_remote(remote, work).await
}

/// Records a session's ids on the current (request) span. A session's VM id is its session id.
fn record_session(result: &Result<Session, WireError>) {
    if let Ok(session) = result {
        let span = tracing::Span::current();
        span.record("session_id", tracing::field::display(&session.session_id));
        span.record("vm_id", tracing::field::display(&session.session_id));
        span.record("worker_id", tracing::field::display(&session.worker_id));
        span.record("template", tracing::field::display(&session.template));
    }
}

async fn dispatch(
    s: &Scheduler,
    subjects: &Subjects,
    endpoint: Endpoint,
    message: &async_nats::Message,
) -> Reply {
    // Who is asking: the account NATS stamped on an imported request (the operator when absent).
    let caller = match Caller::from_headers(message.headers.as_ref()) {
        Ok(caller) => caller,
        Err(err) => {
            let enc = hearth_messages::transport::encoding_of(message.headers.as_ref());
            return Reply::error(enc, &err);
        }
    };
    if let Some(tenant) = caller.tenant() {
        tracing::Span::current().record("tenant", tracing::field::display(tenant));
    }
    let s = &ScopedScheduler { s, caller: &caller };
    match endpoint {
        Endpoint::Create => {
            let (enc, req) = decode_message::<CreateSessionRequest>(message);
            let result = match req {
                Ok(req) => {
                    let span = tracing::Span::current();
                    if let Some(template) = &req.template {
                        span.record("template", tracing::field::display(template));
                    }
                    if let Some(sid) = &req.session_id {
                        span.record("session_id", tracing::field::display(sid));
                    }
                    s.claim_session(req).await
                }
                Err(e) => Err(e),
            };
            record_session(&result);
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
        Endpoint::TemplateDelete => {
            let (enc, req) = decode_message::<DeleteTemplateRequest>(message);
            let name = match subjects.parse_template_delete(&message.subject) {
                Ok(Some(name)) => name,
                Ok(None) => {
                    return Reply::error(
                        enc,
                        &WireError::bad_request("malformed template subject"),
                    );
                }
                Err(e) => return Reply::error(enc, &e.into()),
            };
            tracing::Span::current().record("template", tracing::field::display(&name));
            let result = match req {
                Ok(req) => s.delete_template(&name, req).await,
                Err(e) => Err(e),
            };
            Reply::from_result(enc, &result)
        }
        Endpoint::QuotasGet => {
            let (enc, req) = decode_message::<Empty>(message);
            Reply::from_result(enc, &req.and_then(|_| s.quotas_status()))
        }
        Endpoint::Maintenance => {
            let (enc, req) = decode_message::<Empty>(message);
            Reply::from_result(enc, &req.and_then(|_| s.run_maintenance()))
        }
        Endpoint::Workers => {
            let (enc, req) = decode_message::<Empty>(message);
            Reply::from_result(enc, &req.and_then(|_| s.workers_status()))
        }
        Endpoint::QuotasSet => {
            let (enc, req) = decode_message::<SetQuotaRequest>(message);
            let result = match req {
                Ok(req) => s.set_quota(req).await,
                Err(e) => Err(e),
            };
            Reply::from_result(enc, &result)
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
            let span = tracing::Span::current();
            span.record("session_id", tracing::field::display(&sid));
            span.record("vm_id", tracing::field::display(&sid));
            match op {
                SessionOp::Get => {
                    let (enc, req) = decode_message::<Empty>(message);
                    let result = req.and_then(|_| s.get_session(&sid));
                    record_session(&result);
                    Reply::from_result(enc, &result)
                }
                SessionOp::Keepalive => {
                    let (enc, req) = decode_message::<KeepaliveRequest>(message);
                    let result = match req {
                        Ok(req) => s.keepalive(&sid, req).await,
                        Err(e) => Err(e),
                    };
                    record_session(&result);
                    Reply::from_result(enc, &result)
                }
                SessionOp::Release => {
                    let (enc, req) = decode_message::<Empty>(message);
                    let result = match req {
                        Ok(_) => s.release(&sid).await,
                        Err(e) => Err(e),
                    };
                    record_session(&result);
                    Reply::from_result(enc, &result)
                }
                SessionOp::Pause => {
                    let (enc, req) = decode_message::<hearth_messages::PauseRequest>(message);
                    let result = match req {
                        Ok(req) => s.pause(&sid, req).await,
                        Err(e) => Err(e),
                    };
                    record_session(&result);
                    Reply::from_result(enc, &result)
                }
                SessionOp::Fork => {
                    let (enc, req) = decode_message::<hearth_messages::ForkSessionRequest>(message);
                    let result = match req {
                        Ok(req) => s.fork(&sid, req).await,
                        Err(e) => Err(e),
                    };
                    Reply::from_result(enc, &result)
                }
                SessionOp::Snapshot => {
                    let (enc, req) = decode_message::<SnapshotSessionRequest>(message);
                    let result = match req {
                        Ok(req) => {
                            span.record("template", tracing::field::display(&req.template));
                            s.snapshot_session(&sid, req).await
                        }
                        Err(e) => Err(e),
                    };
                    Reply::from_result(enc, &result)
                }
                _ => Reply::error(enc, &WireError::bad_request("not a scheduler operation")),
            }
        }
    }
}

/// The 429 for a create whose tenant is over its session or rate quota right now (checked without
/// taking a token; the claim itself admits for real).
fn refuse_early(
    scheduler: &Scheduler,
    request: &async_nats::service::Request,
) -> Option<WireError> {
    let caller = Caller::from_headers(request.message.headers.as_ref()).ok()?;
    scheduler.create_refused(caller.tenant()?)
}

/// The scheduler as one caller sees it: every request acts with the caller's rights.
struct ScopedScheduler<'a> {
    s: &'a Scheduler,
    caller: &'a Caller,
}

impl ScopedScheduler<'_> {
    async fn claim_session(&self, req: CreateSessionRequest) -> Result<Session, WireError> {
        self.s.claim_session_as(self.caller, req).await
    }

    fn list_sessions(&self, req: &ListSessionsRequest) -> SessionList {
        self.s.list_sessions_as(self.caller, req)
    }

    fn list_templates(&self) -> TemplateList {
        self.s.list_templates_as(self.caller)
    }

    fn pools_status(&self) -> hearth_messages::PoolsStatus {
        self.s.pools_status_as(self.caller)
    }

    fn get_session(&self, sid: &hearth_messages::SessionId) -> Result<Session, WireError> {
        self.s.get_session_as(self.caller, sid)
    }

    async fn keepalive(
        &self,
        sid: &hearth_messages::SessionId,
        req: KeepaliveRequest,
    ) -> Result<Session, WireError> {
        self.s.keepalive_as(self.caller, sid, req).await
    }

    async fn release(&self, sid: &hearth_messages::SessionId) -> Result<Session, WireError> {
        self.s.release_as(self.caller, sid).await
    }

    async fn pause(
        &self,
        sid: &hearth_messages::SessionId,
        req: hearth_messages::PauseRequest,
    ) -> Result<Session, WireError> {
        self.s.pause_with(self.caller, sid, req).await
    }

    async fn fork(
        &self,
        sid: &hearth_messages::SessionId,
        req: hearth_messages::ForkSessionRequest,
    ) -> Result<hearth_messages::ForkSessionReply, WireError> {
        self.s.fork_as(self.caller, sid, req).await
    }

    async fn snapshot_session(
        &self,
        sid: &hearth_messages::SessionId,
        req: SnapshotSessionRequest,
    ) -> Result<Template, WireError> {
        self.s.snapshot_session_as(self.caller, sid, req).await
    }

    async fn delete_template(
        &self,
        name: &TemplateName,
        req: DeleteTemplateRequest,
    ) -> Result<Template, WireError> {
        self.s.delete_template_as(self.caller, name, req).await
    }

    fn run_maintenance(&self) -> Result<hearth_messages::MaintenanceReport, WireError> {
        self.s.run_maintenance(self.caller)
    }

    fn workers_status(&self) -> Result<hearth_messages::WorkersStatus, WireError> {
        self.s.workers_status(self.caller)
    }

    fn quotas_status(&self) -> Result<QuotasStatus, WireError> {
        self.s.quotas_status(self.caller)
    }

    async fn set_quota(&self, req: SetQuotaRequest) -> Result<QuotasStatus, WireError> {
        self.s.set_quota(self.caller, req).await
    }
}

/// Serves the data plane of unplaced sessions (paused, their worker lost, their state uploaded):
/// no worker subscribes their subjects, so the scheduler does, for as long as they are
/// unplaced. A request resumes the session on another worker, then goes there unchanged (same
/// subject, headers and body) and the worker's answers are relayed back ([`forward`]).
async fn serve_unplaced(
    scheduler: Scheduler,
    client: async_nats::Client,
    subjects: Subjects,
    stop: CancellationToken,
) {
    let mut changes = scheduler.unplaced_changes();
    let mut served: std::collections::HashMap<hearth_messages::SessionId, CancellationToken> =
        std::collections::HashMap::new();
    loop {
        let wanted: std::collections::HashSet<_> =
            scheduler.unplaced_sessions().into_iter().collect();
        served.retain(|sid, cancel| {
            let keep = wanted.contains(sid) && !cancel.is_cancelled();
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for sid in wanted {
            if served.contains_key(&sid) {
                continue;
            }
            let cancel = stop.child_token();
            served.insert(sid.clone(), cancel.clone());
            tokio::spawn(serve_unplaced_session(
                scheduler.clone(),
                client.clone(),
                subjects.clone(),
                sid,
                cancel,
            ));
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            // Level-triggered as well: a subscription that failed is tried again.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// One unplaced session's data-plane subjects, until it is placed, ends or `cancel`.
async fn serve_unplaced_session(
    scheduler: Scheduler,
    client: async_nats::Client,
    subjects: Subjects,
    sid: hearth_messages::SessionId,
    cancel: CancellationToken,
) {
    let mut subs = Vec::with_capacity(SessionOp::DATA.len());
    for op in SessionOp::DATA {
        match client.subscribe(subjects.session(&sid, op)).await {
            Ok(sub) => subs.push(sub),
            Err(err) => {
                tracing::warn!(session_id = %sid, error = %err, "subscribing an unplaced session's data plane");
                cancel.cancel();
                return;
            }
        }
    }
    tracing::info!(session_id = %sid, "serving the data plane of an unplaced session");
    loop {
        let message = {
            let mut all = futures::stream::select_all(subs.iter_mut());
            tokio::select! {
                _ = cancel.cancelled() => break,
                next = all.next() => match next {
                    Some(message) => message,
                    None => break,
                },
            }
        };
        let caller = Caller::from_headers(message.headers.as_ref());
        let placed = match caller {
            Ok(caller) => scheduler.place_as(&caller, &sid).await,
            Err(err) => Err(err),
        };
        match placed {
            Ok(session) if !session.unplaced => {
                // Placed: stop listening, then hand this request and any already delivered
                // here to the worker now serving the session.
                for sub in &mut subs {
                    let _ = sub.unsubscribe().await;
                }
                forward(&client, message).await;
                for sub in &mut subs {
                    while let Ok(Some(queued)) =
                        tokio::time::timeout(Duration::from_millis(200), sub.next()).await
                    {
                        forward(&client, queued).await;
                    }
                }
                cancel.cancel();
                return;
            }
            Ok(_) => {}
            Err(err) => {
                if let Some(reply) = message.reply.clone() {
                    let enc = hearth_messages::transport::encoding_of(message.headers.as_ref());
                    let reply_msg = Reply::error(enc, &err);
                    let _ = client
                        .publish_with_headers(reply, reply_msg.headers, reply_msg.payload)
                        .await;
                }
            }
        }
    }
    cancel.cancel();
}

/// How long a relayed request may go without a message from the worker before the relay gives
/// up (a command's output can pause for as long as it runs).
const RELAY_IDLE: Duration = Duration::from_secs(600);

/// Hands a data-plane request to the worker now serving its session: the same subject, headers
/// (the tenant stamp included) and body, and the worker's answers — every streamed chunk, then
/// the final message — relayed to the requester. (Relayed rather than re-published with the
/// requester's reply subject: NATS reserves a tenant's `_R_.` reply subjects to the server.)
async fn forward(client: &async_nats::Client, message: async_nats::Message) {
    let headers = message.headers.unwrap_or_default();
    let Some(reply) = message.reply else {
        if let Err(err) = client
            .publish_with_headers(message.subject, headers, message.payload)
            .await
        {
            tracing::warn!(error = %err, "forwarding a request to the session's new worker");
        }
        return;
    };
    let inbox = client.new_inbox();
    let mut answers = match client.subscribe(inbox.clone()).await {
        Ok(sub) => sub,
        Err(err) => {
            tracing::warn!(error = %err, "relaying a request to the session's new worker");
            return;
        }
    };
    if let Err(err) = client
        .publish_with_reply_and_headers(message.subject, inbox, headers, message.payload)
        .await
    {
        tracing::warn!(error = %err, "forwarding a request to the session's new worker");
        return;
    }
    let client = client.clone();
    tokio::spawn(async move {
        while let Ok(Some(answer)) = tokio::time::timeout(RELAY_IDLE, answers.next()).await {
            if answer.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                let err =
                    WireError::no_capacity("the session's new worker is not serving it yet", 500);
                let reply_msg = Reply::error(hearth_messages::Encoding::MsgPack, &err);
                let _ = client
                    .publish_with_headers(reply.clone(), reply_msg.headers, reply_msg.payload)
                    .await;
                break;
            }
            let last = answer
                .headers
                .as_ref()
                .and_then(|h| h.get(hearth_messages::data::CHUNK_HEADER))
                .is_none();
            let headers = answer.headers.unwrap_or_default();
            if let Err(err) = client
                .publish_with_headers(reply.clone(), headers, answer.payload)
                .await
            {
                tracing::debug!(error = %err, "relaying an answer");
                break;
            }
            if last {
                break;
            }
        }
        let _ = answers.unsubscribe().await;
    });
}
