//! The process provider's configuration (`ProcessConfig`, derived from the worker's settings).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::network::EgressConfig;
use super::sandbox::{Isolation, SandboxConfig};

/// Configuration of the process adapter; deserialisable from the worker's TOML with defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Where VMs, snapshots and staging live. Must be one filesystem (renames are atomic).
    pub root: PathBuf,
    /// The shell that runs `cmd` requests as `<shell> -c <cmd>`.
    pub shell: PathBuf,
    /// Added to every command's environment (under the VM's and the request's own env).
    pub env: BTreeMap<String, String>,
    /// `sandbox` (the default) or `none` (commands run as host processes: an explicit choice).
    pub isolation: Isolation,
    /// The sandbox's tools and host identity.
    pub sandbox: SandboxConfig,
    /// How sandboxes of `network = "egress"` templates reach out.
    pub egress: EgressConfig,
    /// How per-VM limits are enforced: `auto` (cgroups v2 or v1 where writable, else rlimits),
    /// `rlimit`, or `off` (for hosts where something else confines the worker).
    pub limits: LimitsMode,
    /// The `hearth-guest-agent` binary; found next to the worker's executable or on `PATH` when
    /// unset.
    pub agent: Option<PathBuf>,
    /// zstd level for snapshots and backups.
    pub snapshot_compression_level: i32,
    /// Run sandboxes as OCI containers with these settings: the `oci` provider
    /// ([`ProcessProvider::open_oci`](super::ProcessProvider::open_oci)).
    #[serde(skip)]
    pub oci: Option<crate::provider::OciConfig>,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/hearth/process"),
            shell: PathBuf::from("/bin/sh"),
            env: BTreeMap::new(),
            isolation: Isolation::Sandbox,
            sandbox: SandboxConfig::default(),
            egress: EgressConfig::default(),
            limits: LimitsMode::Auto,
            agent: None,
            snapshot_compression_level: 3,
            oci: None,
        }
    }
}

impl ProcessConfig {
    /// Defaults with `root` set.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ..Self::default()
        }
    }
}

/// How per-VM limits are enforced (`limits` in the process provider's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitsMode {
    /// cgroups v2, else v1, where the worker can write them; else rlimits.
    #[default]
    Auto,
    /// Only rlimits (address space).
    Rlimit,
    /// None: something outside Hearth confines the worker and its sandboxes.
    Off,
}
