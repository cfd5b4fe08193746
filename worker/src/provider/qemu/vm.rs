//! One QEMU process and the guest in it, as the qemu provider holds it: the supervised process
//! (`guest::VmmProcess`), its QMP connection (watched: its end is the process's death), its
//! agent link and its console log.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::machine::RunPaths;
use super::qmp::{Qmp, QmpError};
use super::{CONSOLE_PATIENCE, Inner, QemuConfig, console};
use crate::provider::agent::{self, AgentLink, Connector};
use crate::provider::guest::{GuestMachine, VmmProcess};

/// One QEMU process and the guest in it.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(super) vmm: VmmProcess,
    pub(super) run: RunPaths,
    /// Connected at launch, or lazily for a VM adopted after a restart.
    pub(super) qmp: tokio::sync::OnceCell<Qmp>,
    pub(super) agent: AgentLink,
    owner: Weak<Inner>,
}

impl GuestMachine for Machine {
    fn agent(&self) -> &AgentLink {
        &self.agent
    }

    fn vmm(&self) -> &VmmProcess {
        &self.vmm
    }

    fn run_dir(&self) -> &Path {
        &self.run.dir
    }
}

impl Machine {
    pub(super) fn new(vmm: VmmProcess, run: RunPaths, owner: Weak<Inner>) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Machine>| {
            let me = me.clone();
            let poke: agent::Poke = Arc::new(move || {
                let me = me.clone();
                Box::pin(async move {
                    if let Some(machine) = me.upgrade()
                        && let Some(qmp) = machine.qmp.get()
                    {
                        let _ = qmp
                            .execute("query-status", json!({}), Duration::from_secs(1))
                            .await;
                    }
                })
            });
            Self {
                agent: AgentLink::new(Connector::Unix(run.agent()), Some(poke)),
                vmm,
                run,
                qmp: tokio::sync::OnceCell::new(),
                owner,
            }
        })
    }

    /// The QMP connection, made on first use (adopted VMs) and watched for the process's end.
    pub(super) async fn qmp(self: &Arc<Self>, deadline: Instant) -> Result<&Qmp, QmpError> {
        self.qmp
            .get_or_try_init(|| async {
                let qmp = Qmp::connect(&self.run.qmp(), deadline).await?;
                // The deadline is for the handshake; commands get their own timeouts.
                qmp.execute(
                    "migrate-set-parameters",
                    json!({"max-bandwidth": 64u64 << 30}),
                    Duration::from_secs(10),
                )
                .await?;
                tokio::spawn(watch(self.clone(), qmp.closed()));
                Ok(qmp)
            })
            .await
    }

    /// Copies the serial console into the capped `console.log` while the process lives (see
    /// `console.rs`). Holds no reference to the machine.
    pub(super) fn start_console(&self, config: &QemuConfig) {
        if !config.console_log {
            return;
        }
        let vmm = &self.vmm;
        let (dead, detached, reaped) = (
            vmm.dead.clone(),
            vmm.detached.clone(),
            vmm.child.then(|| vmm.reaped.clone()),
        );
        let stop = async move {
            let reaped = async {
                match reaped {
                    Some(token) => token.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = dead.cancelled() => {}
                () = detached.cancelled() => {}
                () = reaped => {}
            }
        };
        tokio::spawn(console::pump(
            self.run.console_socket(),
            self.run.console(),
            config.console_log_max_bytes,
            CONSOLE_PATIENCE,
            stop,
        ));
    }

    /// Lets go of the process without ending it: closes QMP and the agent connection so that the
    /// next provider on this root can adopt it, and stops watching it.
    pub(super) fn detach(&self) {
        self.vmm.detach();
        if let Some(qmp) = self.qmp.get() {
            qmp.detach();
        }
        self.agent.detach();
    }
}

/// Waits for the QMP connection of `machine` to end, then reports the process dead.
async fn watch(machine: Arc<Machine>, closed: CancellationToken) {
    let vmm = &machine.vmm;
    tokio::select! {
        _ = closed.cancelled() => {}
        _ = vmm.detached.cancelled() => return,
    }
    if vmm.child {
        // Give the reaper a moment, so the reason carries the exit status.
        let _ = tokio::time::timeout(Duration::from_millis(500), vmm.reaped.cancelled()).await;
    }
    vmm.dead.cancel();
    if vmm.is_ending() {
        return;
    }
    if let Some(inner) = machine.owner.upgrade() {
        inner.machine_died(&machine);
    }
}

pub(super) fn read_pid(run: &RunPaths) -> Option<i32> {
    std::fs::read_to_string(run.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()
}
