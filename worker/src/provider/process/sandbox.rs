//! The sandbox a process-provider VM lives in: one long-lived process tree per VM, whose first
//! process is the Hearth agent (the same `hearth-guest-agent` that runs inside QEMU guests),
//! reached over a socketpair on its stdin. An exec or a file transfer is one agent message, so
//! isolation costs nothing per command; the sandbox is set up before a VM joins the pool, never on
//! the claim path.
//!
//! Isolation `sandbox` (the default) starts the agent under bubblewrap, hardened:
//! - its own user, pid, ipc, uts, net and cgroup namespaces (`--unshare-all --unshare-user`), no
//!   nested user namespaces (`--disable-userns`), no capabilities, a new session, and it dies with
//!   the worker (`--die-with-parent`);
//! - as uid/gid 1000 inside, mapped to an unprivileged host uid (`sandbox.uid`, via `setpriv`,
//!   when the worker runs as root), so host files owned by root are not the sandbox's;
//! - only the system directories (`/usr` and the `/bin`, `/lib*`, `/sbin` links), a generated
//!   minimal `/etc` with a few read-only host files (certificates, linker cache, time zone), a
//!   fresh `/proc`, a minimal `/dev`, a private `/tmp`: nothing of the worker's data directory,
//!   other volumes, snapshots, credentials or sockets;
//! - the VM's volume read-write at [`WORKSPACE`], whatever the VM is called;
//! - inside, the agent installs a seccomp filter (mount, ptrace, module, bpf, keyctl, namespaces,
//!   device nodes, …) inherited by every command, and kills whatever a command left behind.
//!
//! Isolation `none` starts the agent as a plain host process with the volume as its working
//! directory (an explicit operator choice, logged at start).
//!
//! Resource limits (cgroups) and egress networking are attached by the provider around the launch.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::freeze::{self, Frozen};
use super::limits::SandboxCgroup;
use super::network::Egress;
use crate::provider::agent::{AgentCallError, AgentLink};
use crate::provider::oci::{OciConfig, OciEngine};
use crate::provider::{ProviderError, VmId};

/// Where a VM's volume is mounted inside the sandbox: commands' working directory and `HOME`.
pub const WORKSPACE: &str = "/workspace";
/// Where the agent binary is mounted inside the sandbox.
const AGENT_IN_SANDBOX: &str = "/.hearth/agent";
/// Where the host's loader and the agent's libraries are mounted on an image's root.
const AGENT_LIB_DIR: &str = "/.hearth/lib";
/// The uid and gid commands run as inside the sandbox.
const INNER_ID: u32 = 1000;
/// How long a new agent has to answer its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the agent's stderr logged per sandbox (a chatty or hostile agent cannot flood logs).
const MAX_LOG_LINES: usize = 200;

/// System directories bound read-only (or recreated as symlinks where the host has symlinks).
pub(crate) const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Host files and directories under `/etc` that programs need and that hold no secrets.
pub(crate) const ETC_SHARED: [&str; 14] = [
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "protocols",
    "services",
    "python3",
    "inputrc",
    "gai.conf",
];

/// How commands are isolated from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// The hardened bubblewrap sandbox described in the module docs.
    #[default]
    Sandbox,
    /// Commands run as plain host processes, as the worker's user, in the volume directory.
    None,
}

impl Isolation {
    /// The name reported in heartbeats and sessions.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Sandbox => "sandbox",
            Isolation::None => "none",
        }
    }

    /// Parses `sandbox` or `none`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "sandbox" => Some(Isolation::Sandbox),
            "none" => Some(Isolation::None),
            _ => None,
        }
    }
}

/// The tools and identities of the sandbox (`[process.sandbox]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// bubblewrap.
    pub bwrap: PathBuf,
    /// util-linux `setpriv`, used by a root worker to start bubblewrap as `uid`.
    pub setpriv: PathBuf,
    /// Host uid and gid the sandbox runs as when the worker is root (no host account needed).
    pub uid: u32,
    pub gid: u32,
    /// Further host directories to show read-only at the same path (e.g. `/opt`, `/nix`).
    pub ro_binds: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            setpriv: PathBuf::from("/usr/bin/setpriv"),
            uid: 100_000,
            gid: 100_000,
            ro_binds: Vec::new(),
        }
    }
}

/// Everything needed to start sandboxes, resolved once when the provider opens.
#[derive(Debug)]
pub(crate) struct Launcher {
    isolation: Isolation,
    config: SandboxConfig,
    agent: PathBuf,
    /// The generated `/etc` files (passwd, group, hosts, …), under the provider's root.
    etc_dir: PathBuf,
    /// Whether `setpriv` drops to `config.uid` (the worker is root).
    drop_to_uid: bool,
    /// `bwrap --version`, when sandboxes isolate.
    tool_version: Option<String>,
    /// Sandboxes are OCI containers (the `oci` provider) instead of bubblewrap.
    oci: Option<Arc<OciEngine>>,
    /// The host's loader and the libraries a dynamically linked agent needs (`None` for a static
    /// agent): mounted for the agent alone on an image's root filesystem.
    agent_libs: Option<(PathBuf, Vec<PathBuf>)>,
}

/// What one sandbox is for.
pub(crate) struct LaunchSpec<'a> {
    pub vm_id: &'a VmId,
    /// The volume on the host.
    pub volume: &'a Path,
    /// The VM's cgroup (or rlimits): bubblewrap starts inside it, so everything in the sandbox
    /// is inside the limits from birth. Owned by the sandbox from then on.
    pub limits: Option<SandboxCgroup>,
    /// Size of the private `/tmp` in bytes (0 = the kernel's default).
    pub tmp_bytes: u64,
    /// The root filesystem of the VM's image, if it has one; else the host's system directories.
    pub rootfs: Option<&'a Path>,
}

/// A running sandbox: the agent's process tree and the channel to it.
#[derive(Debug)]
pub(crate) struct Sandbox {
    /// The outermost process (bubblewrap, or the agent itself without isolation); killing it
    /// ends the whole tree.
    child: parking_lot::Mutex<Option<Child>>,
    /// Host pid of `child`.
    pub pid: u32,
    pub link: AgentLink,
    /// The cgroup the sandbox runs in (killed and removed with it).
    limits: Option<SandboxCgroup>,
    /// The sandbox's user-mode network, for egress templates.
    egress: parking_lot::Mutex<Option<Egress>>,
    /// Set while the sandbox is paused: how its processes are frozen.
    frozen: parking_lot::Mutex<Option<Frozen>>,
    /// The OCI container this sandbox is (`oci` provider): removed from the runtime with it.
    container: Option<(Arc<OciEngine>, String)>,
}

impl Sandbox {
    /// Freezes every process of the sandbox (see `freeze.rs`) in a freezer cgroup of the
    /// provider's `scope`; a no-op if frozen. Blocking.
    pub(crate) fn freeze(&self, scope: &str) -> Result<(), ProviderError> {
        let mut frozen = self.frozen.lock();
        if frozen.is_none() {
            let list = || {
                let extra = self
                    .limits
                    .as_ref()
                    .map(SandboxCgroup::pids)
                    .unwrap_or_default();
                freeze::sandbox_pids(self.pid, &extra)
            };
            *frozen = Some(freeze::freeze(scope, &self.pid.to_string(), list)?);
        }
        Ok(())
    }

    /// Lets a frozen sandbox run again; a no-op if not frozen. Blocking.
    pub(crate) fn thaw(&self) {
        if let Some(frozen) = self.frozen.lock().take() {
            freeze::thaw(frozen);
        }
    }

    /// Whether the sandbox is frozen (paused, or a stopped `oci` container).
    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen.lock().is_some()
    }

    /// The agent is gone (killed, crashed, or the sandbox was stopped).
    pub(crate) fn is_dead(&self) -> bool {
        self.link.is_closed()
    }

    /// OOM kills in the sandbox's cgroup so far (0 without a memory cgroup).
    pub(crate) fn oom_kills(&self) -> u64 {
        self.limits.as_ref().map_or(0, SandboxCgroup::oom_kills)
    }

    /// How the sandbox's outermost process ended, if it ended on its own (not killed by
    /// [`kill`](Self::kill)): for the `oci` provider, the runtime's exit code.
    pub(crate) fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether [`kill`](Self::kill) has ended the sandbox.
    pub(crate) fn is_killed(&self) -> bool {
        self.child.lock().is_none()
    }

    /// Gives the sandbox its network (egress templates).
    pub(crate) fn set_egress(&self, egress: Egress) {
        *self.egress.lock() = Some(egress);
    }

    /// Kills the process tree now: SIGKILL to the sandbox's init (the pid namespace dies with
    /// it, taking every process inside) and to the outermost process, and to whatever is left in
    /// the cgroup; ends the sandbox's network. (bubblewrap's `--die-with-parent` does not hold
    /// for the init once it has entered its user namespace: the credential change clears the
    /// parent-death signal, so it is killed by pid here.)
    /// Kills the sandbox; a container's runtime state and bundle are removed on a thread of their
    /// own, whose handle is returned (a worker shutting down waits for it, or a graceful exit
    /// would leave the container behind).
    pub(crate) fn kill(&self) -> Option<std::thread::JoinHandle<()>> {
        // A frozen process does not even die until thawed: killed while frozen (so nothing
        // in it runs again), then thawed.
        if let Some(frozen) = self.frozen.lock().take() {
            freeze::kill_and_thaw(frozen);
        }
        self.egress.lock().take();
        if self.pid > 0
            && let Ok(children) =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
        {
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(limits) = &self.limits {
            // Without isolation, a command may have left the agent's process group.
            limits.kill_all();
        }
        if let Some(mut child) = self.child.lock().take() {
            let _ = child.start_kill();
            // Reaped in the background; bounded by the kill.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = child.wait().await;
                });
            }
        }
        let (engine, uid) = self.container.as_ref()?;
        // The runtime's state and the bundle, off the caller's thread (a few CLI calls).
        let (engine, uid) = (engine.clone(), uid.clone());
        Some(std::thread::spawn(move || engine.cleanup(&uid)))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Launcher {
    /// Resolves the agent binary and checks that sandboxes can be started on this host; with
    /// isolation `sandbox`, starts one (`true`) to prove it. `Unavailable` says what is missing
    /// and how to install it.
    pub(crate) fn open(
        isolation: Isolation,
        config: SandboxConfig,
        agent: Option<&Path>,
        root: &Path,
        oci: Option<&OciConfig>,
    ) -> Result<Self, ProviderError> {
        let agent = find_agent(agent)?;
        let etc_dir = root.join("sandbox-etc");
        write_etc(&etc_dir)
            .map_err(|e| ProviderError::io(format!("cannot write {}", etc_dir.display()), e))?;
        let drop_to_uid = nix::unistd::geteuid().is_root();
        let agent_libs = crate::provider::oci::agent_libraries(&agent);
        let mut launcher = Self {
            isolation,
            config,
            agent,
            etc_dir,
            drop_to_uid,
            tool_version: None,
            oci: None,
            agent_libs,
        };
        if let Some(oci) = oci {
            let ids = launcher.owner().unwrap_or_else(|| {
                (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                )
            });
            let engine = OciEngine::open(oci, root, &launcher.agent, &launcher.etc_dir, ids)?;
            launcher.oci = Some(Arc::new(engine));
        } else if isolation == Isolation::Sandbox {
            let dir = root
                .join("tmp")
                .join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
            let probed = launcher.probe(&dir);
            let _ = std::fs::remove_dir(&dir);
            probed?;
            launcher.tool_version = crate::provider::probe_version(&launcher.config.bwrap).ok();
        }
        Ok(launcher)
    }

    pub(crate) fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Whether sandboxes are OCI containers (the `oci` provider).
    pub(crate) fn is_oci(&self) -> bool {
        self.oci.is_some()
    }

    /// The isolation mode reported in heartbeats: `oci`, `sandbox` or `none`.
    pub(crate) fn mode(&self) -> &'static str {
        if self.is_oci() {
            "oci"
        } else {
            self.isolation.as_str()
        }
    }

    /// `process <crate version>`, with the sandbox tool's own version when it isolates
    /// (`process 0.1.0 (bubblewrap 0.8.0)`).
    pub(crate) fn version(&self) -> String {
        if let Some(oci) = &self.oci {
            return format!("oci {} ({})", env!("CARGO_PKG_VERSION"), oci.version());
        }
        let ours = format!("process {}", env!("CARGO_PKG_VERSION"));
        match &self.tool_version {
            Some(tool) => format!("{ours} ({tool})"),
            None => ours,
        }
    }

    /// The host uid and gid that own sandbox files (volumes are chowned to them).
    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        (self.isolation == Isolation::Sandbox && self.drop_to_uid)
            .then_some((self.config.uid, self.config.gid))
    }

    /// Starts a throwaway sandbox running `true` around the new empty directory `dir`.
    fn probe(&self, dir: &Path) -> Result<(), ProviderError> {
        let install = "install bubblewrap (apt-get install bubblewrap util-linux) or run the worker \
                       with --isolation none to accept running commands unisolated";
        if !self.config.bwrap.is_file() {
            return Err(ProviderError::Unavailable(format!(
                "sandbox isolation needs bubblewrap, not found at {}: {install}",
                self.config.bwrap.display()
            )));
        }
        if self.drop_to_uid && !self.config.setpriv.is_file() {
            return Err(ProviderError::Unavailable(format!(
                "sandbox isolation needs setpriv, not found at {}: {install}",
                self.config.setpriv.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| ProviderError::io("cannot create a probe directory", e))?;
        if let Some((uid, gid)) = self.owner() {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(|e| ProviderError::io("cannot chown the probe directory", e))?;
        }
        let mut argv = self.sandbox_argv(dir, "hearth-probe", 0, None);
        argv.push("/bin/true".into());
        let output = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                ProviderError::Unavailable(format!(
                    "sandbox isolation: cannot run {}: {e}: {install}",
                    argv[0].to_string_lossy()
                ))
            })?;
        if !output.status.success() {
            return Err(ProviderError::Unavailable(format!(
                "sandbox isolation: bubblewrap cannot create the sandbox here ({}): {}",
                String::from_utf8_lossy(&output.stderr).trim(),
                "user namespaces must be allowed (sysctl user.max_user_namespaces > 0, \
                 kernel.unprivileged_userns_clone=1 where it exists)"
            )));
        }
        Ok(())
    }

    /// `[setpriv …] bwrap <flags> --` for a sandbox around `volume`, with the system directories
    /// (and the shared `/etc` files) of `rootfs` (an image's) or of the host.
    fn sandbox_argv(
        &self,
        volume: &Path,
        hostname: &str,
        tmp_bytes: u64,
        rootfs: Option<&Path>,
    ) -> Vec<OsString> {
        let system_root = rootfs.unwrap_or(Path::new("/"));
        let mut argv: Vec<OsString> = Vec::new();
        if self.drop_to_uid {
            argv.push(self.config.setpriv.clone().into());
            argv.extend(
                [
                    format!("--reuid={}", self.config.uid),
                    format!("--regid={}", self.config.gid),
                    "--clear-groups".into(),
                    "--inh-caps=-all".into(),
                    "--".into(),
                ]
                .map(OsString::from),
            );
        }
        argv.push(self.config.bwrap.clone().into());
        let id = INNER_ID.to_string();
        let flags: [&str; 13] = [
            "--unshare-all",
            "--unshare-user",
            "--uid",
            &id,
            "--gid",
            &id,
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--setenv",
            "HOME",
            WORKSPACE,
        ];
        argv.extend(flags.map(OsString::from));
        for dir in SYSTEM_DIRS {
            let path = system_root.join(dir.trim_start_matches('/'));
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(&path) {
                        argv.extend(["--symlink".into(), target.into(), dir.into()]);
                    }
                }
                Ok(m) if m.is_dir() => argv.extend(["--ro-bind".into(), path.into(), dir.into()]),
                _ => {}
            }
        }
        for dir in &self.config.ro_binds {
            argv.extend([
                "--ro-bind-try".into(),
                dir.clone().into(),
                dir.clone().into(),
            ]);
        }
        // A private /etc: generated identity files, then the harmless host files.
        argv.extend(["--tmpfs".into(), "/etc".into()]);
        for name in ETC_GENERATED {
            argv.extend([
                "--ro-bind".into(),
                self.etc_dir.join(name).into(),
                format!("/etc/{name}").into(),
            ]);
        }
        for name in ETC_SHARED {
            let source = system_root.join("etc").join(name);
            // An image's file must not lead out of the image (bubblewrap follows symlinks).
            if rootfs.is_some() && std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_symlink())
            {
                continue;
            }
            let dest = Path::new("/etc").join(name);
            argv.extend(["--ro-bind-try".into(), source.into(), dest.into()]);
        }
        argv.extend(["--remount-ro".into(), "/etc".into()]);
        argv.extend(["--proc", "/proc", "--dev", "/dev", "--dir", "/var"].map(OsString::from));
        if tmp_bytes > 0 {
            argv.extend(["--size".into(), tmp_bytes.to_string().into()]);
        }
        argv.extend(["--tmpfs".into(), "/tmp".into()]);
        argv.extend(["--symlink".into(), "../tmp".into(), "/var/tmp".into()]);
        argv.extend([
            "--bind".into(),
            volume.into(),
            WORKSPACE.into(),
            "--ro-bind".into(),
            self.agent.clone().into(),
            AGENT_IN_SANDBOX.into(),
        ]);
        // On an image's root the host's C library is not there: the agent (alone) gets the
        // host's loader and the libraries it needs.
        if rootfs.is_some()
            && let Some((loader, libs)) = &self.agent_libs
        {
            for lib in std::iter::once(loader).chain(libs) {
                let name = lib.file_name().unwrap_or_default().to_string_lossy();
                argv.extend([
                    "--ro-bind".into(),
                    lib.into(),
                    format!("{AGENT_LIB_DIR}/{name}").into(),
                ]);
            }
        }
        argv.extend([
            "--chdir".into(),
            WORKSPACE.into(),
            "--hostname".into(),
            // sethostname(2) takes at most 64 bytes; ids are ASCII.
            hostname.chars().take(64).collect::<String>().into(),
            "--".into(),
        ]);
        argv
    }

    /// Starts the sandbox of one VM and waits for its agent to answer. Must be called from async
    /// code on a runtime thread, never inside `spawn_blocking`: `--die-with-parent` follows the
    /// spawning thread, and blocking-pool threads exit when idle.
    pub(crate) async fn launch(&self, spec: LaunchSpec<'_>) -> Result<Arc<Sandbox>, ProviderError> {
        let (host_end, agent_end) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ProviderError::io("cannot create the agent channel", e))?;
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(script) = spec.limits.as_ref().map(SandboxCgroup::enter_script) {
            argv.extend([
                "/bin/sh".into(),
                "-c".into(),
                format!("{script} && exec \"$@\"").into(),
                "hearth-sandbox".into(),
            ]);
        }
        let mut container = None;
        let mut command = match self.isolation {
            Isolation::Sandbox if self.oci.is_some() => {
                let engine = self.oci.clone().expect("checked");
                let uid = uuid::Uuid::new_v4().simple().to_string();
                let ids = self.owner().unwrap_or_else(|| {
                    (
                        nix::unistd::geteuid().as_raw(),
                        nix::unistd::getegid().as_raw(),
                    )
                });
                let run = engine.spec(
                    &uid,
                    spec.vm_id.as_str(),
                    spec.volume,
                    spec.rootfs,
                    spec.tmp_bytes,
                    ids,
                    &["--channel", "stdio", "--workdir", WORKSPACE, "--sandbox"],
                );
                argv.extend(engine.runtime.prepare(&run).map_err(|e| {
                    ProviderError::io(format!("cannot write the bundle of vm {}", spec.vm_id), e)
                })?);
                container = Some((engine, uid));
                let mut command = Command::new(&argv[0]);
                command.args(&argv[1..]).current_dir("/");
                command
            }
            Isolation::Sandbox => {
                argv.extend(self.sandbox_argv(
                    spec.volume,
                    spec.vm_id.as_str(),
                    spec.tmp_bytes,
                    spec.rootfs,
                ));
                if spec.rootfs.is_some()
                    && let Some((loader, _)) = &self.agent_libs
                {
                    let name = loader.file_name().unwrap_or_default().to_string_lossy();
                    argv.extend([
                        format!("{AGENT_LIB_DIR}/{name}").into(),
                        "--library-path".into(),
                        AGENT_LIB_DIR.into(),
                    ]);
                }
                argv.extend(
                    [
                        AGENT_IN_SANDBOX,
                        "--channel",
                        "stdio",
                        "--workdir",
                        WORKSPACE,
                        "--sandbox",
                    ]
                    .map(OsString::from),
                );
                let mut command = Command::new(&argv[0]);
                command.args(&argv[1..]).current_dir("/");
                command
            }
            Isolation::None => {
                argv.push(self.agent.clone().into());
                argv.extend(
                    ["--channel", "stdio", "--workdir-from-cwd", "--no-system"].map(OsString::from),
                );
                let mut command = Command::new(&argv[0]);
                command
                    .args(&argv[1..])
                    .current_dir(spec.volume)
                    .process_group(0);
                command
            }
        };
        command
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(agent_end)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| {
            if let Some((engine, uid)) = &container {
                engine.cleanup(uid);
            }
            ProviderError::Unavailable(format!(
                "cannot start the sandbox of vm {}: {e}",
                spec.vm_id
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        if let Some(stderr) = child.stderr.take() {
            let vm_id = spec.vm_id.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                let mut logged = 0;
                while let Ok(Some(line)) = lines.next_line().await {
                    if logged < MAX_LOG_LINES {
                        logged += 1;
                        debug!(%vm_id, line = %line.chars().take(500).collect::<String>(), "sandbox");
                    }
                }
            });
        }
        host_end
            .set_nonblocking(true)
            .map_err(|e| ProviderError::io("cannot set up the agent channel", e))?;
        let stream = tokio::net::UnixStream::from_std(host_end)
            .map_err(|e| ProviderError::io("cannot set up the agent channel", e))?;
        let sandbox = Arc::new(Sandbox {
            child: parking_lot::Mutex::new(Some(child)),
            pid,
            link: AgentLink::attached(stream),
            limits: spec.limits,
            egress: parking_lot::Mutex::new(None),
            frozen: parking_lot::Mutex::new(None),
            container,
        });
        match sandbox.link.ready(Instant::now() + START_TIMEOUT).await {
            Ok(_) => {
                debug!(vm_id = %spec.vm_id, pid, isolation = self.isolation.as_str(), "sandbox started");
                Ok(sandbox)
            }
            Err(e) => {
                let status = sandbox
                    .child
                    .lock()
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                sandbox.kill();
                let how = match (e, status) {
                    (_, Some(status)) => format!("it exited ({status})"),
                    (AgentCallError::Timeout { .. }, None) => {
                        format!("its agent did not answer within {START_TIMEOUT:?}")
                    }
                    (e, None) => e.to_string(),
                };
                Err(ProviderError::Unavailable(format!(
                    "the sandbox of vm {} did not start: {how}",
                    spec.vm_id
                )))
            }
        }
    }
}

/// Files generated into the sandbox's `/etc`.
const ETC_GENERATED: [&str; 5] = ["passwd", "group", "hosts", "nsswitch.conf", "resolv.conf"];

/// Writes the generated `/etc` files (idempotent).
fn write_etc(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let files: BTreeMap<&str, String> = BTreeMap::from([
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/bin/sh\nuser:x:{INNER_ID}:{INNER_ID}:user:{WORKSPACE}:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\nuser:x:{INNER_ID}:\nnogroup:x:65534:\n"),
        ),
        ("hosts", "127.0.0.1 localhost\n::1 localhost\n".into()),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n".into(),
        ),
        // slirp4netns' DNS forwarder (egress sessions); without a network it answers nothing.
        ("resolv.conf", "nameserver 10.0.2.3\n".into()),
    ]);
    for (name, text) in files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text)?;
        }
    }
    Ok(())
}

/// The agent binary: the configured path, `HEARTH_AGENT_BIN`, next to the running executable (or
/// one directory up, for test binaries in `target/*/deps`), or on `PATH`.
fn find_agent(configured: Option<&Path>) -> Result<PathBuf, ProviderError> {
    const NAME: &str = "hearth-guest-agent";
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = configured {
        candidates.push(path.to_path_buf());
    } else {
        if let Some(path) = std::env::var_os("HEARTH_AGENT_BIN") {
            candidates.push(PathBuf::from(path));
        }
        if let Ok(exe) = std::env::current_exe()
            && let Some(dir) = exe.parent()
        {
            candidates.push(dir.join(NAME));
            if let Some(up) = dir.parent() {
                candidates.push(up.join(NAME));
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join(NAME)));
        }
    }
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    match found {
        Some(path) => {
            let path = path.canonicalize().unwrap_or(path);
            info!(agent = %path.display(), "sandbox agent");
            Ok(path)
        }
        None => {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            warn!(looked = ?looked, "sandbox agent not found");
            Err(ProviderError::Unavailable(format!(
                "the process provider needs the {NAME} binary (build it with `cargo build --bin \
                 {NAME}`, install it next to hearth-worker, or set HEARTH_AGENT_BIN); looked at: {}",
                looked.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launcher() -> Launcher {
        Launcher {
            isolation: Isolation::Sandbox,
            config: SandboxConfig::default(),
            agent: PathBuf::from("/opt/agent"),
            etc_dir: PathBuf::from("/r/sandbox-etc"),
            drop_to_uid: true,
            tool_version: None,
            oci: None,
            agent_libs: None,
        }
    }

    #[test]
    fn the_sandbox_binds_only_system_dirs_and_the_volume() {
        let argv = launcher().sandbox_argv(Path::new("/r/vms/a/volume"), &"x".repeat(100), 0, None);
        let argv: Vec<String> = argv.into_iter().map(|a| a.into_string().unwrap()).collect();
        let joined = argv.join(" ");
        assert!(
            joined.starts_with("/usr/bin/setpriv --reuid=100000 --regid=100000"),
            "{joined}"
        );
        for flag in [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--bind /r/vms/a/volume /workspace",
            "--ro-bind /opt/agent /.hearth/agent",
            "--proc /proc",
            "--dev /dev",
            "--tmpfs /tmp",
            "--remount-ro /etc",
        ] {
            assert!(joined.contains(flag), "missing {flag}: {joined}");
        }
        assert!(
            !joined.contains("--ro-bind / /"),
            "never the host's root: {joined}"
        );
        assert!(!joined.contains("--share-net"), "{joined}");
        let writable: Vec<&String> = argv
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && argv[i - 1] == "--bind")
            .map(|(_, a)| a)
            .collect();
        assert_eq!(
            writable,
            [&"/r/vms/a/volume".to_owned()],
            "one writable bind"
        );
        let host = &argv[argv.iter().position(|a| a == "--hostname").unwrap() + 1];
        assert_eq!(host.len(), 64);
        assert_eq!(argv.last().unwrap(), "--");
    }

    #[test]
    fn isolation_names_round_trip() {
        for i in [Isolation::Sandbox, Isolation::None] {
            assert_eq!(Isolation::parse(i.as_str()), Some(i));
        }
        assert_eq!(Isolation::parse("bubblewrap"), None);
    }
}
