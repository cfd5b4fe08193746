//! Conversions between the provider's types and the wire's.

use std::time::Duration;

use hearth_messages::{ExecRequest, ExecResult};

use crate::config::WorkerConfig;
use crate::provider::{ExecOutcome, ExecSpec, Program, VmState};

impl From<VmState> for hearth_messages::VmState {
    fn from(state: VmState) -> Self {
        match state {
            VmState::Running => hearth_messages::VmState::Running,
            VmState::Stopped => hearth_messages::VmState::Stopped,
            VmState::Paused => hearth_messages::VmState::Paused,
            VmState::Destroyed => hearth_messages::VmState::Destroyed,
        }
    }
}

/// A provider snapshot on the wire; `published`: the fleet's object store holds it.
pub(super) fn snapshot_info(
    info: crate::provider::SnapshotInfo,
    published: bool,
) -> hearth_messages::SnapshotInfo {
    hearth_messages::SnapshotInfo {
        snapshot_id: info.snapshot_id,
        source_vm: info.source_vm,
        template: info.template,
        created_ms: info.created_ms,
        size_bytes: info.size_bytes,
        published,
    }
}

/// The provider's exec spec for a request; a `cmd` runs in the worker's configured shell
/// (`shell`, `shell_args`) when there is one, else in the provider's.
pub(super) fn exec_spec(req: &ExecRequest, config: &WorkerConfig) -> ExecSpec {
    let program = match (&req.argv, &req.cmd) {
        (Some(argv), _) => Program::Argv(argv.clone()),
        (None, Some(cmd)) => match config.shell_argv(cmd) {
            Some(argv) => Program::Argv(argv),
            None => Program::Shell(cmd.clone()),
        },
        (None, None) => Program::Argv(Vec::new()),
    };
    ExecSpec {
        program,
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        stdin: req.stdin.as_ref().map(|b| b.as_bytes().to_vec()),
        timeout: Duration::from_millis(req.timeout_ms()),
        max_output_bytes: req.max_output_bytes() as usize,
    }
}

/// Builds the reply, trimming output so the reply fits the server's max_payload.
pub(super) fn exec_result(outcome: ExecOutcome, budget: usize) -> ExecResult {
    let ExecOutcome {
        exit_code,
        signal,
        mut stdout,
        mut stderr,
        mut stdout_truncated,
        mut stderr_truncated,
        timed_out,
        duration,
        oom_killed,
    } = outcome;
    if stdout.len() + stderr.len() > budget {
        // Share the budget, giving what one stream does not need to the other.
        let half = budget / 2;
        let (out_keep, err_keep) = if stdout.len() <= half {
            (stdout.len(), budget - stdout.len())
        } else if stderr.len() <= half {
            (budget - stderr.len(), stderr.len())
        } else {
            (half, budget - half)
        };
        if stdout.len() > out_keep {
            stdout.truncate(out_keep);
            stdout_truncated = true;
        }
        if stderr.len() > err_keep {
            stderr.truncate(err_keep);
            stderr_truncated = true;
        }
    }
    ExecResult {
        exit_code,
        signal,
        stdout: stdout.into(),
        stderr: stderr.into(),
        stdout_truncated,
        stderr_truncated,
        timed_out,
        duration_ms: duration.as_millis() as u64,
        oom_killed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_output_is_trimmed_to_the_budget_and_flagged() {
        let outcome = ExecOutcome {
            stdout: vec![b'a'; 900],
            stderr: vec![b'b'; 50],
            ..Default::default()
        };
        let r = exec_result(outcome, 500);
        assert_eq!(r.stderr.len(), 50, "the small stream keeps everything");
        assert_eq!(r.stdout.len(), 450);
        assert!(r.stdout_truncated && !r.stderr_truncated);

        let r = exec_result(
            ExecOutcome {
                stdout: vec![0; 10],
                ..Default::default()
            },
            500,
        );
        assert!(!r.stdout_truncated);
    }

    /// What a capture capped at `cap` per stream holds of `len` bytes, and whether it says so.
    fn captured(len: usize, cap: usize) -> (Vec<u8>, bool) {
        (vec![b'x'; len.min(cap)], len > cap)
    }

    #[test]
    fn capping_the_capture_at_the_reply_budget_changes_no_reply() {
        let budget = 1000;
        let max_output = 64 * 1024;
        let lens = [
            0,
            1,
            400,
            499,
            500,
            501,
            999,
            1000,
            1001,
            5000,
            max_output,
            max_output + 1,
        ];
        for &out in &lens {
            for &err in &lens {
                let reply = |cap: usize| {
                    let (stdout, stdout_truncated) = captured(out, cap);
                    let (stderr, stderr_truncated) = captured(err, cap);
                    let r = exec_result(
                        ExecOutcome {
                            stdout,
                            stderr,
                            stdout_truncated,
                            stderr_truncated,
                            ..Default::default()
                        },
                        budget,
                    );
                    (r.stdout, r.stderr, r.stdout_truncated, r.stderr_truncated)
                };
                let full = reply(max_output);
                let capped = reply(max_output.min(budget));
                assert_eq!(full, capped, "stdout {out}, stderr {err}");
                assert!(full.0.len() + full.1.len() <= budget);
                assert_eq!(full.2, full.0.len() < out, "stdout {out}, stderr {err}");
                assert_eq!(full.3, full.1.len() < err, "stdout {out}, stderr {err}");
            }
        }
    }
}
