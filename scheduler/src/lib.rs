//! Hearth scheduler: warm pools per template, claim by rename, cold fallback, session lifetimes,
//! placement across workers and durable state in JetStream KV.
//!
//! Entry points: [`run`] (what the `hearth-scheduler` binary calls: leader election, then the
//! service and the core for as long as this process leads), [`core::Scheduler`] (the core, driven
//! directly by logic tests) and [`config::SchedulerConfig`].
//!
//! Code map:
//! - [`config`]: flags + env + TOML into [`config::SchedulerConfig`].
//! - [`core`]: pools, placement, claims, lifetimes, reconcile. No NATS in here.
//! - [`worker_api`]: the [`worker_api::WorkerApi`] / [`worker_api::EventSink`] traits the core acts
//!   through, and their NATS implementations.
//! - [`store`]: records, the [`store::Kv`] trait, in-memory and JetStream KV implementations.
//! - [`service`]: the `hearth-scheduler` micro service (decode, call the core, reply).
//! - [`lease`]: the leader lease.
//! - [`metrics`]: metric names and the Prometheus exporter.
//!
//! Logging, OTLP export and the shutdown signal live in `hearth_messages::telemetry`.

#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod core;
pub mod lease;
pub mod metrics;
pub mod service;
pub mod store;
pub mod worker_api;

use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use hearth_messages::transport::encoding_of;
use hearth_messages::{VmEvent, WorkerStatus};
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, SchedulerArgs, SchedulerConfig, TemplateConfig};
pub use core::Scheduler;
pub use service::SERVICE_NAME;

use store::{NatsKv, Store, StoreError};
use worker_api::{NatsEvents, NatsWorkerApi};

/// Why the scheduler stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// JetStream KV could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The micro service could not start.
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    /// A subscription failed.
    #[error("subscribing: {0}")]
    Subscribe(String),
}

/// Runs the scheduler until `shutdown` resolves: stands by until it holds the leader lease, then
/// loads the state, waits one heartbeat round, serves the client API and acts; steps down if the
/// lease is lost and stands by again. On shutdown it stops taking requests, finishes the ones in
/// flight (within `drain_grace`) and releases the lease.
pub async fn run(
    config: SchedulerConfig,
    client: async_nats::Client,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let cfg = Arc::new(config);
    metrics::register_templates(cfg.templates.iter().map(|t| &t.name));
    metrics::zero_tenants(cfg.tenants.quotas.keys().map(|t| t.as_str()));
    let js = jetstream::new(client.clone());

    let quit = CancellationToken::new();
    let quit_on_signal = {
        let quit = quit.clone();
        async move {
            shutdown.await;
            quit.cancel();
        }
    };
    tokio::pin!(quit_on_signal);
    let work = async {
        ::metrics::gauge!(crate::metrics::SCHEDULER_LEADER).set(0.0);
        // JetStream may not be up yet (the scheduler started first, or NATS is restarting): wait
        // for it, a log line per attempt, instead of exiting.
        let opened = async {
            let kv = hearth_messages::connection::retry("opening the state buckets", || {
                NatsKv::open(&js, &cfg.subjects, cfg.kv_replicas)
            })
            .await;
            let leader_kv = hearth_messages::connection::retry("opening the leader bucket", || {
                lease::open_leader_bucket(&js, &cfg.subjects, cfg.kv_replicas, cfg.lease_ttl)
            })
            .await;
            (kv, leader_kv)
        };
        let (kv, leader_kv) = tokio::select! {
            _ = quit.cancelled() => return Ok(()),
            opened = opened => opened,
        };
        let store = Store::new(Arc::new(kv));
        // One holder value for the life of the process: after a NATS outage the lease it wrote is
        // recognised as its own.
        let holder = lease::LeaseHolder::new(&cfg.scheduler_id);
        loop {
            let Some(lease) =
                lease::Lease::acquire(leader_kv.clone(), &holder, cfg.lease_ttl, &quit).await
            else {
                return Ok(());
            };
            ::metrics::gauge!(crate::metrics::SCHEDULER_LEADER).set(1.0);
            let term = quit.child_token();
            let lost = CancellationToken::new();
            let renew_stop = CancellationToken::new();
            let lease_revision = lease.term();
            let renewer = tokio::spawn(lease.keep(renew_stop.clone(), lost.clone()));
            let result = lead(
                cfg.clone(),
                client.clone(),
                store.clone(),
                Term {
                    end: term.clone(),
                    lost: lost.clone(),
                    lease_revision,
                },
            )
            .await;
            term.cancel();
            renew_stop.cancel();
            ::metrics::gauge!(crate::metrics::SCHEDULER_LEADER).set(0.0);
            if let Ok(Some(lease)) = renewer.await {
                lease.release().await;
            }
            result?;
            if quit.is_cancelled() {
                return Ok(());
            }
            tracing::warn!("no longer the leader; standing by");
        }
    };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        // The signal cancels `quit`; `work` notices and drains, so keep driving it to the end.
        _ = &mut quit_on_signal => {}
    }
    work.await
}

/// One leader term.
struct Term {
    /// Ends the term (shutdown, or the lease lost).
    end: CancellationToken,
    /// Cancelled by the renewer when the lease is lost: stop acting at once.
    lost: CancellationToken,
    /// The term's fencing token, carried by every job.
    lease_revision: u64,
}

/// One leader term: until `term.end` is cancelled. When the lease is lost the core is deposed
/// first: no job is sent or awaited and nothing is written after that, so claims in flight end
/// with 503 and nothing is recorded half.
async fn lead(
    cfg: Arc<SchedulerConfig>,
    client: async_nats::Client,
    store: Store,
    term: Term,
) -> Result<(), RunError> {
    let Term {
        end: term,
        lost,
        lease_revision,
    } = term;
    let subjects = cfg.subjects.clone();
    // Subscribe before loading, so no heartbeat falls between the two.
    let mut heartbeats = client
        .subscribe(subjects.worker_status_all())
        .await
        .map_err(|e| RunError::Subscribe(e.to_string()))?;
    let mut vm_events = client
        .subscribe(subjects.vm_events_all())
        .await
        .map_err(|e| RunError::Subscribe(e.to_string()))?;
    let api =
        NatsWorkerApi::new(client.clone(), subjects.clone()).fenced(lease_revision, lost.clone());
    let scheduler = Scheduler::load(
        cfg.clone(),
        Arc::new(api),
        store,
        Arc::new(NatsEvents::new(client.clone(), subjects.clone())),
    )
    .await?;
    let deposer = {
        let scheduler = scheduler.clone();
        let term = term.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => {
                    scheduler.depose();
                    term.cancel();
                }
                _ = term.cancelled() => {}
            }
        })
    };
    let feeder = {
        let scheduler = scheduler.clone();
        let term = term.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.cancelled() => return,
                    Some(msg) = heartbeats.next() => {
                        // The sender is the worker the subject names, never the body's claim.
                        let Some(from) = subjects.parse_worker_status(&msg.subject) else {
                            tracing::debug!(subject = %msg.subject, "heartbeat on an unexpected subject");
                            continue;
                        };
                        match encoding_of(msg.headers.as_ref()).decode::<WorkerStatus>(&msg.payload) {
                            Ok(status) => { scheduler.on_heartbeat_from(&from, status); }
                            Err(e) => tracing::debug!(subject = %msg.subject, error = %e, "bad heartbeat"),
                        }
                    }
                    Some(msg) = vm_events.next() => {
                        let Some(from) = subjects.parse_vm_events(&msg.subject) else {
                            tracing::debug!(subject = %msg.subject, "vm event on an unexpected subject");
                            continue;
                        };
                        match encoding_of(msg.headers.as_ref()).decode::<VmEvent>(&msg.payload) {
                            Ok(event) => { scheduler.on_vm_event_from(&from, event); }
                            Err(e) => tracing::debug!(subject = %msg.subject, error = %e, "bad vm event"),
                        }
                    }
                    else => return,
                }
            }
        })
    };
    // One heartbeat round before acting, so claims and reconcile see the fleet as it is.
    tokio::select! {
        _ = term.cancelled() => {}
        _ = scheduler.wait_for_workers(cfg.heartbeat_timeout) => {}
    }
    let result = if term.is_cancelled() {
        Ok(())
    } else {
        scheduler.start_background();
        service::serve(
            scheduler.clone(),
            client.clone(),
            cfg.subjects.clone(),
            &cfg.scheduler_id,
            term.clone(),
            cfg.drain_grace,
        )
        .await
        .map_err(RunError::from)
    };
    feeder.abort();
    deposer.abort();
    scheduler.shutdown(cfg.drain_grace).await;
    result
}
