//! `hearth bench pause`: pause to disk and fork on real microVMs (qemu provider, TCG here), in one
//! run of its own stack:
//! - pause and resume of one session, as lifecycle jobs timed at the worker (`pause_vm`: the state
//!   to disk and QEMU ended; `start_vm`: a new QEMU loads it, clock pushed), p50 over the cycles;
//!   and the first exec on a paused session (resume on touch) against an exec on a running one;
//! - host RAM: the RSS of a stopped session's QEMU (QMP `stop` keeps the guest's memory) against a
//!   paused one (no process: the total RSS of every QEMU drops by its share), and the state bytes
//!   a pause writes;
//! - `sessions.<sid>.fork` of 1, 4 and 16 copies: time until the reply, i.e. every copy restored,
//!   health-checked and recorded;
//! - `pause_upload`: the paused state's upload to the object store (`upload_paused_vm`) and its
//!   restore from there as a worker taking over a lost worker's session does
//!   (`restore_paused_vm`), p50, against the local resume.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hearth_messages::{
    CreateSessionRequest, ExecRequest, ForkSessionRequest, JobOp, JobOutput, SessionId, Subjects,
    VmId,
};
use serde_json::json;

use super::{
    BenchArgs, OwnStack, Report, baseline, connect, destroy_every_vm, median, qemu_image,
    qemu_rss_mib, round3, template_toml, timed_job, wait_ready, wait_template_built,
};

/// Copies per fork, measured in this order.
const FORKS: [u32; 3] = [1, 4, 16];

pub(super) async fn run(args: &BenchArgs, url: Option<&str>) -> Result<Report> {
    if url.is_some() {
        bail!("the pause scenario starts its own stack (it times jobs on its own worker)");
    }
    let image = qemu_image(args)?;
    let cycles = if args.quick { 3 } else { 10 };
    let forks: &[u32] = if args.quick { &FORKS[..2] } else { &FORKS };
    let biggest = forks.iter().copied().max().unwrap_or(1) as usize;
    let stack = OwnStack::start_with(
        hearth_worker::ProviderKind::Qemu,
        &template_toml("default", 2),
        biggest + 6,
        Some(&image),
        None,
        false,
    )
    .await?;
    let client = connect(&stack.url, &Subjects::default()).await?;
    wait_template_built(&client, "default").await?;
    wait_ready(&client, "default", 2).await?;
    let base = baseline(&stack.url, 200).await?;
    let mut sessions = Vec::new();
    for name in ["bench-paused", "bench-stopped"] {
        let sid = SessionId::new(name)?;
        client
            .create_session(&CreateSessionRequest {
                session_id: Some(sid.clone()),
                wait_ms: Some(120_000),
                ..Default::default()
            })
            .await?;
        sessions.push(sid);
    }
    let (paused_sid, stopped_sid) = (&sessions[0], &sessions[1]);
    let vm = |sid: &SessionId| VmId::from(sid.clone());

    // Pause / resume cycles at the worker.
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        let (t, _) = timed_job(
            &client,
            JobOp::PauseVm {
                vm_id: vm(paused_sid),
            },
        )
        .await?;
        pause.push(t.as_secs_f64());
        let (t, _) = timed_job(
            &client,
            JobOp::StartVm {
                vm_id: vm(paused_sid),
            },
        )
        .await?;
        resume.push(t.as_secs_f64());
    }
    // Resume on touch: an exec on a paused session, against one on a running session.
    let (mut touch, mut running) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        timed_job(
            &client,
            JobOp::PauseVm {
                vm_id: vm(paused_sid),
            },
        )
        .await?;
        let t = Instant::now();
        client
            .exec(paused_sid, &ExecRequest::argv(["true"]))
            .await?;
        touch.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        client
            .exec(paused_sid, &ExecRequest::argv(["true"]))
            .await?;
        running.push(t.elapsed().as_secs_f64());
    }

    // Host RAM: a stopped session keeps its QEMU (and the guest's memory); a paused one has none.
    timed_job(
        &client,
        JobOp::StopVm {
            vm_id: vm(stopped_sid),
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = qemu_rss_mib();
    let (_, out) = timed_job(
        &client,
        JobOp::PauseVm {
            vm_id: vm(paused_sid),
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = qemu_rss_mib();
    let freed_mib = before.iter().sum::<f64>() - after.iter().sum::<f64>();
    let processes_ended = before.len().saturating_sub(after.len());
    let stopped_mib = median(after.clone());
    if !matches!(out, JobOutput::Vm { .. }) {
        bail!("pause answered {out:?}");
    }
    let state_mib = paused_state_mib(&stack, paused_sid);

    // Forks of the (running) stopped-then-resumed session.
    client
        .exec(stopped_sid, &ExecRequest::argv(["true"]))
        .await?;
    let mut fork_times = Vec::new();
    for &count in forks {
        let ids: Vec<SessionId> = (0..count)
            .map(|i| SessionId::new(format!("bench-fork-{count}-{i}")))
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        let reply = client
            .fork(
                stopped_sid,
                &ForkSessionRequest {
                    count,
                    session_ids: Some(ids.clone()),
                    ..Default::default()
                },
            )
            .await?;
        let took = t.elapsed().as_secs_f64();
        if !reply.failed.is_empty() {
            bail!(
                "fork of {count}: {} copies failed: {:?}",
                reply.failed.len(),
                reply.failed
            );
        }
        fork_times.push((count, took));
        for id in &ids {
            let _ = client.release(id).await;
        }
    }

    let mut stack = stack;
    stack.scheduler.kill();

    // pause_upload, timed at the worker with the scheduler gone (nothing reconciles meanwhile):
    // the paused session's state uploaded to the object store, then its VM destroyed and
    // brought back from the object as a worker taking over a lost worker's session does
    // (download, checksums, import, resume, data plane served). One worker here: the restore
    // runs where the VM was, which is the same work as on another worker.
    let key = hearth_messages::paused_object_key(None, &vm(paused_sid));
    let (mut upload, mut elsewhere, mut upload_bytes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..cycles {
        let (t, out) = timed_job(
            &client,
            JobOp::UploadPausedVm {
                vm_id: vm(paused_sid),
                key: key.clone(),
            },
        )
        .await?;
        if let JobOutput::Uploaded { bytes } = out {
            upload_bytes = bytes;
        }
        upload.push(t.as_secs_f64());
        timed_job(
            &client,
            JobOp::DestroyVm {
                vm_id: vm(paused_sid),
                backup: false,
                reason: None,
            },
        )
        .await?;
        let (t, _) = timed_job(
            &client,
            JobOp::RestorePausedVm {
                vm_id: vm(paused_sid),
                key: key.clone(),
            },
        )
        .await?;
        elsewhere.push(t.as_secs_f64());
        timed_job(
            &client,
            JobOp::PauseVm {
                vm_id: vm(paused_sid),
            },
        )
        .await?;
    }
    destroy_every_vm(&client).await;

    let mut r = Report::new("pause");
    r.baseline(&base);
    let (pause_s, resume_s) = (median(pause), median(resume));
    r.seconds(
        "pause_p50_s",
        pause_s,
        &format!("pause_vm job: state to disk, qemu ended; {cycles} cycles"),
    );
    r.seconds(
        "resume_p50_s",
        resume_s,
        "start_vm job: new qemu loads the state, clock pushed",
    );
    let (touch_s, running_s) = (median(touch), median(running));
    r.seconds(
        "exec_on_paused_p50_s",
        touch_s,
        "resume on touch + exec `true`",
    );
    r.seconds(
        "exec_on_running_p50_s",
        running_s,
        "exec `true`, same session",
    );
    r.ratio("exec_paused_to_running", touch_s, running_s);
    r.field(
        "stopped_session_rss_mib",
        json!(round3(stopped_mib)),
        Some(format!(
            "{stopped_mib:.0} MiB (median RSS of the QEMUs left: the stopped session's and the pool's)"
        )),
    );
    r.field(
        "paused_session_rss_mib",
        json!(0.0),
        Some(format!(
            "0 MiB ({processes_ended} qemu process ended; {freed_mib:.0} MiB of RSS freed)"
        )),
    );
    if let Some(state_mib) = state_mib {
        r.field(
            "paused_state_mib",
            json!(round3(state_mib)),
            Some(format!("{state_mib:.1} MiB on the worker's disk")),
        );
    }
    let (upload_s, elsewhere_s) = (median(upload), median(elsewhere));
    r.seconds(
        "pause_upload_p50_s",
        upload_s,
        &format!(
            "upload_paused_vm job: state compressed and put in the object store ({:.1} MiB)",
            upload_bytes as f64 / 1048576.0
        ),
    );
    r.seconds(
        "resume_elsewhere_p50_s",
        elsewhere_s,
        "restore_paused_vm job: download, verify, import, resume",
    );
    r.ratio("resume_elsewhere_to_resume", elsewhere_s, resume_s);
    for (count, took) in &fork_times {
        r.seconds(
            &format!("fork_{count}_s"),
            *took,
            &format!("live snapshot + {count} restores, all ready"),
        );
    }
    if let (Some((_, one)), Some((n, most))) = (fork_times.first(), fork_times.last()) {
        r.ratio(&format!("fork_{n}_to_fork_1"), *most, *one);
    }
    Ok(r)
}

/// Size of a paused session's state file under the stack's worker directory, MiB.
fn paused_state_mib(stack: &OwnStack, sid: &SessionId) -> Option<f64> {
    let path = stack
        .dir()
        .join("worker/qemu/vms")
        .join(sid.as_str())
        .join("paused.state");
    std::fs::metadata(path)
        .ok()
        .map(|m| m.len() as f64 / 1048576.0)
}
