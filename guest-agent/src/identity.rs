//! Identity reset and the guest clock: what makes a VM restored from a shared snapshot its own
//! machine. Order matters: the clock first (a restored guest is behind by however long the
//! snapshot sat on disk), then the RNG, then the names.

use std::collections::BTreeMap;
use std::path::Path;

use hearth_messages::agent::{AgentError, AgentErrorKind, Identity};
use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

use crate::rng;

/// The longest host name `sethostname(2)` takes.
pub const MAX_HOSTNAME: usize = 64;

/// The identity state commands see, kept by the agent.
#[derive(Debug, Clone, Default)]
pub struct IdentityState {
    pub session_id: String,
    pub env: BTreeMap<String, String>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::new(AgentErrorKind::Io, format!("{what}: {e}"))
}

/// Sets `CLOCK_REALTIME` to `now_ms`.
pub fn set_clock(now_ms: u64) -> Result<(), AgentError> {
    let spec = TimeSpec::new(
        (now_ms / 1000) as nix::libc::time_t,
        ((now_ms % 1000) * 1_000_000) as nix::libc::c_long,
    );
    clock_settime(ClockId::CLOCK_REALTIME, spec).map_err(|e| io_err("cannot set the clock", e))
}

/// Checks an identity before anything is changed.
pub fn validate(identity: &Identity) -> Result<(), AgentError> {
    let invalid = |m: String| AgentError::new(AgentErrorKind::InvalidArgument, m);
    let h = &identity.hostname;
    if h.is_empty()
        || h.len() > MAX_HOSTNAME
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(format!("invalid hostname {h:?}")));
    }
    let m = &identity.machine_id;
    if m.len() != 32 || !m.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid(format!(
            "machine id must be 32 lowercase hex digits, got {m:?}"
        )));
    }
    if identity
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(invalid("invalid environment variable".into()));
    }
    Ok(())
}

/// Applies `identity`. With `system` false (tests on a host, `--sandbox`), only the files under
/// `etc` (if any) and the returned state change: no clock, RNG or host name.
pub fn apply(
    identity: &Identity,
    system: bool,
    etc: Option<&Path>,
) -> Result<IdentityState, AgentError> {
    validate(identity)?;
    if system {
        set_clock(identity.now_ms)?;
        if !identity.entropy.is_empty() {
            rng::reseed(identity.entropy.as_bytes())
                .map_err(|e| io_err("cannot reseed the kernel rng", e))?;
        }
        nix::unistd::sethostname(&identity.hostname)
            .map_err(|e| io_err("cannot set the hostname", e))?;
    }
    if let Some(etc) = etc {
        write_atomic(
            &etc.join("machine-id"),
            format!("{}\n", identity.machine_id).as_bytes(),
        )?;
        write_atomic(
            &etc.join("hostname"),
            format!("{}\n", identity.hostname).as_bytes(),
        )?;
    }
    Ok(IdentityState {
        session_id: identity.session_id.clone(),
        env: identity.env.clone(),
    })
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create /etc", e))?;
    }
    let tmp = path.with_extension("hearth-tmp");
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| io_err(&format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            hostname: "vm-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            session_id: "vm-1".into(),
            env: BTreeMap::from([("A".into(), "b".into())]),
            entropy: vec![1; 64].into(),
            now_ms: 1,
        }
    }

    #[test]
    fn identity_files_are_written_and_bad_identities_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = apply(&identity(), false, Some(tmp.path())).unwrap();
        assert_eq!(state.session_id, "vm-1");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("machine-id")).unwrap(),
            "0123456789abcdef0123456789abcdef\n"
        );
        let state = apply(&identity(), false, None).unwrap();
        assert_eq!(state.env["A"], "b", "without etc, the env is still kept");
        for bad in [
            Identity {
                hostname: "a b".into(),
                ..identity()
            },
            Identity {
                hostname: "x".repeat(65),
                ..identity()
            },
            Identity {
                machine_id: "XYZ".into(),
                ..identity()
            },
            Identity {
                env: BTreeMap::from([("A=B".into(), "c".into())]),
                ..identity()
            },
        ] {
            assert_eq!(
                apply(&bad, false, Some(tmp.path())).unwrap_err().kind,
                AgentErrorKind::InvalidArgument
            );
        }
    }
}
