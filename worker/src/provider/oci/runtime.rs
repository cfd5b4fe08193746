//! The container runtime seam: everything the `oci` provider asks of a container runtime, keyed by
//! a Hearth **uid** (one per sandbox, never reused, independent of the VM's id so a rename does not
//! touch the container). Containers are named `hearth-<uid>`; anything else a runtime lists is not
//! ours and is ignored. `kill` and `remove` are idempotent (a container already gone is fine), so
//! reconcile after a crash is "list, then remove every `hearth-` container no VM owns".
//!
//! Backends: [`Bundle`] drives an OCI runtime CLI (`crun`, `runc`) directly — Hearth writes the
//! bundle's `config.json` — and is what the provider runs here; [`Engine`] drives a container
//! engine CLI (`podman`, `docker`, Apple's `container`) with the same spec turned into flags;
//! [`FakeRuntime`] is in memory, for tests of the seam's users. `list` output is parsed
//! tolerantly: a JSON array or one object per line, `id`/`name`/`Names`/`configuration.id`,
//! `status`/`State`, exit codes from `ExitCode`/`exitCode` or a `Status` like `Exited (3) …`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Prefix of every container Hearth starts.
pub const NAME_PREFIX: &str = "hearth-";

/// The runtime-side name of the container with Hearth uid `uid`.
pub fn container_name(uid: &str) -> String {
    format!("{NAME_PREFIX}{uid}")
}

/// A runtime call that failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot run {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bin} {action} failed: {stderr}")]
    Command {
        bin: String,
        action: String,
        stderr: String,
    },
    #[error("cannot parse the output of {bin} list: {detail}")]
    Parse { bin: String, detail: String },
}

/// Observed liveness of a container: there is no "assumed running".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Running,
    /// Frozen (cgroup freezer) or created and not started.
    Paused,
    Exited {
        exit_code: i32,
    },
}

/// One container of ours the runtime knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub uid: String,
    pub state: InstanceState,
}

/// A bind mount into the container: host path, container path, writable or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    pub container: String,
    pub writable: bool,
}

/// What to run, independent of the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub uid: String,
    /// The root filesystem (mounted read-only).
    pub rootfs: PathBuf,
    pub hostname: String,
    /// The container's first process (an init that runs the agent).
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// Bind mounts (the volume, the agent and its loader), in order.
    pub binds: Vec<Bind>,
    /// Directories that get a fresh tmpfs (with size in bytes, 0 = the kernel's default).
    pub tmpfs: Vec<(String, u64)>,
    /// The host uid/gid the container's user (uid/gid [`INNER_ID`](super::INNER_ID)) maps to.
    pub host_uid: u32,
    pub host_gid: u32,
    /// The OCI `linux.seccomp` object.
    pub seccomp: serde_json::Value,
    /// Where a bundle runtime writes `config.json` (a directory of its own).
    pub bundle: PathBuf,
}

/// The seam. Calls are short CLI invocations; callers run them off the async threads.
pub trait ContainerRuntime: Send + Sync + std::fmt::Debug {
    /// `crun`, `runc`, `podman`, …
    fn name(&self) -> &str;
    /// Prepares `spec` (a bundle runtime writes `config.json`) and returns the argv that runs the
    /// container in the foreground, its stdin/stdout/stderr those of the argv's process.
    fn prepare(&self, spec: &RunSpec) -> std::io::Result<Vec<OsString>>;
    /// SIGKILLs the container `uid` (nothing if it is gone).
    fn kill(&self, uid: &str) -> Result<(), RuntimeError>;
    /// Removes the container `uid` and its runtime state (nothing if it is gone).
    fn remove(&self, uid: &str) -> Result<(), RuntimeError>;
    /// Every container of ours the runtime tracks.
    fn list(&self) -> Result<Vec<Instance>, RuntimeError>;
    /// The runtime's version line.
    fn version(&self) -> Result<String, RuntimeError>;
}

/// Removes every container of ours that `keep` does not name (reconcile after a restart: sandboxes
/// die with the worker, so at open nothing is kept). Returns the uids removed.
pub fn remove_orphans(
    runtime: &dyn ContainerRuntime,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, RuntimeError> {
    let mut removed = Vec::new();
    for instance in runtime.list()? {
        if keep(&instance.uid) {
            continue;
        }
        runtime.kill(&instance.uid)?;
        runtime.remove(&instance.uid)?;
        removed.push(instance.uid);
    }
    Ok(removed)
}

/// Runs `bin args…`, returning stdout; a non-zero exit is `RuntimeError::Command`.
fn output(bin: &Path, args: &[&str], action: &str) -> Result<String, RuntimeError> {
    let out = Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| RuntimeError::Spawn {
            bin: bin.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(RuntimeError::Command {
            bin: bin.display().to_string(),
            action: action.into(),
            stderr: crate::provider::tail_lossy(&out.stderr, 500),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a failed kill/remove only says the container is not there.
fn is_gone(e: &RuntimeError) -> bool {
    match e {
        RuntimeError::Command { stderr, .. } => {
            let s = stderr.to_ascii_lowercase();
            s.contains("does not exist")
                || s.contains("no such")
                || s.contains("not found")
                || s.contains("not running")
                || s.contains("container not running")
        }
        _ => false,
    }
}

fn idempotent(result: Result<String, RuntimeError>) -> Result<(), RuntimeError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_gone(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// An OCI runtime CLI (`crun`, `runc`) driven directly: Hearth writes the bundle.
#[derive(Debug)]
pub struct Bundle {
    bin: PathBuf,
    /// The runtime's state directory (`--root`): ours alone, so `list` sees only our containers.
    state_dir: PathBuf,
    /// `umount` cgroup v2's hybrid mount in a private mount namespace before `run` (crun refuses
    /// hybrid cgroup hosts otherwise): `Some(unshare)` on such hosts.
    unshare_for_hybrid: Option<PathBuf>,
}

impl Bundle {
    pub fn new(bin: PathBuf, state_dir: PathBuf, unshare_for_hybrid: Option<PathBuf>) -> Self {
        Self {
            bin,
            state_dir,
            unshare_for_hybrid,
        }
    }

    fn global(&self) -> Vec<String> {
        let mut args = vec![
            "--root".to_owned(),
            self.state_dir.to_string_lossy().into_owned(),
        ];
        if self.name() == "crun" {
            // Limits are Hearth's own cgroups, entered before the runtime starts.
            args.push("--cgroup-manager=disabled".into());
        }
        args
    }

    fn call(&self, args: &[&str], action: &str) -> Result<String, RuntimeError> {
        let mut all: Vec<String> = self.global();
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        output(&self.bin, &all, action)
    }
}

impl ContainerRuntime for Bundle {
    fn name(&self) -> &str {
        self.bin
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("runtime")
    }

    fn prepare(&self, spec: &RunSpec) -> std::io::Result<Vec<OsString>> {
        std::fs::create_dir_all(&spec.bundle)?;
        let config = super::bundle::config_json(spec);
        std::fs::write(
            spec.bundle.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(unshare) = &self.unshare_for_hybrid {
            argv.extend(
                [
                    unshare.as_os_str(),
                    "--mount".as_ref(),
                    "--propagation".as_ref(),
                    "private".as_ref(),
                    "--".as_ref(),
                    "/bin/sh".as_ref(),
                    "-c".as_ref(),
                    "umount /sys/fs/cgroup/unified 2>/dev/null; exec \"$@\"".as_ref(),
                    "hearth-oci".as_ref(),
                ]
                .map(OsString::from),
            );
        }
        argv.push(self.bin.clone().into());
        argv.extend(self.global().into_iter().map(OsString::from));
        argv.extend(["run".into(), "--bundle".into(), spec.bundle.clone().into()]);
        argv.push(container_name(&spec.uid).into());
        Ok(argv)
    }

    fn kill(&self, uid: &str) -> Result<(), RuntimeError> {
        idempotent(self.call(&["kill", &container_name(uid), "KILL"], "kill"))
    }

    fn remove(&self, uid: &str) -> Result<(), RuntimeError> {
        idempotent(self.call(&["delete", "--force", &container_name(uid)], "delete"))
    }

    fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let raw = self.call(&["list", "--format", "json"], "list")?;
        parse_list(&raw).map_err(|detail| RuntimeError::Parse {
            bin: self.bin.display().to_string(),
            detail,
        })
    }

    fn version(&self) -> Result<String, RuntimeError> {
        let out = output(&self.bin, &["--version"], "--version")?;
        Ok(out.lines().next().unwrap_or_default().trim().to_owned())
    }
}

/// Which container engine CLI an [`Engine`] drives; the commands differ in a few words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Podman,
    Docker,
    /// Apple's `container` (macOS).
    AppleContainer,
}

/// A container engine CLI. The root filesystem is passed as `--rootfs` (podman) or must have
/// been loaded as an image whose reference is the rootfs path's file name (docker, container).
#[derive(Debug)]
pub struct Engine {
    kind: EngineKind,
    bin: PathBuf,
}

impl Engine {
    pub fn new(kind: EngineKind, bin: PathBuf) -> Self {
        Self { kind, bin }
    }

    fn list_args(&self) -> &'static [&'static str] {
        match self.kind {
            EngineKind::Podman => &["ps", "--all", "--format", "json"],
            EngineKind::Docker => &["ps", "--all", "--no-trunc", "--format", "{{json .}}"],
            EngineKind::AppleContainer => &["list", "--all", "--format", "json"],
        }
    }
}

impl ContainerRuntime for Engine {
    fn name(&self) -> &str {
        match self.kind {
            EngineKind::Podman => "podman",
            EngineKind::Docker => "docker",
            EngineKind::AppleContainer => "container",
        }
    }

    fn prepare(&self, spec: &RunSpec) -> std::io::Result<Vec<OsString>> {
        let mut argv: Vec<String> = vec![
            self.bin.to_string_lossy().into_owned(),
            "run".into(),
            "--rm".into(),
            "--interactive".into(),
            "--name".into(),
            container_name(&spec.uid),
            "--hostname".into(),
            spec.hostname.clone(),
            "--network".into(),
            "none".into(),
            "--read-only".into(),
            "--workdir".into(),
            spec.cwd.clone(),
            "--user".into(),
            format!("{0}:{0}", super::INNER_ID),
        ];
        if self.kind != EngineKind::AppleContainer {
            argv.extend([
                "--cap-drop".into(),
                "ALL".into(),
                "--security-opt".into(),
                "no-new-privileges".into(),
            ]);
        }
        for env in &spec.env {
            argv.extend(["--env".into(), env.clone()]);
        }
        for bind in &spec.binds {
            let mode = if bind.writable { "rw" } else { "ro" };
            argv.extend([
                "--volume".into(),
                format!("{}:{}:{mode}", bind.host.display(), bind.container),
            ]);
        }
        for (dir, size) in &spec.tmpfs {
            let opt = if *size > 0 {
                format!("{dir}:size={size}")
            } else {
                dir.clone()
            };
            argv.extend(["--tmpfs".into(), opt]);
        }
        match self.kind {
            EngineKind::Podman => {
                argv.extend(["--rootfs".into(), spec.rootfs.to_string_lossy().into()]);
            }
            EngineKind::Docker | EngineKind::AppleContainer => argv.push(
                spec.rootfs
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        }
        argv.extend(spec.args.iter().cloned());
        Ok(argv.into_iter().map(OsString::from).collect())
    }

    fn kill(&self, uid: &str) -> Result<(), RuntimeError> {
        let action = if self.kind == EngineKind::AppleContainer {
            "stop"
        } else {
            "kill"
        };
        idempotent(output(&self.bin, &[action, &container_name(uid)], action))
    }

    fn remove(&self, uid: &str) -> Result<(), RuntimeError> {
        let action = if self.kind == EngineKind::AppleContainer {
            "delete"
        } else {
            "rm"
        };
        idempotent(output(
            &self.bin,
            &[action, "--force", &container_name(uid)],
            action,
        ))
    }

    fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let raw = output(&self.bin, self.list_args(), "list")?;
        parse_list(&raw).map_err(|detail| RuntimeError::Parse {
            bin: self.bin.display().to_string(),
            detail,
        })
    }

    fn version(&self) -> Result<String, RuntimeError> {
        let out = output(&self.bin, &["--version"], "--version")?;
        Ok(out.lines().next().unwrap_or_default().trim().to_owned())
    }
}

/// The first string among `keys` (descending into `a.b` paths and taking an array's first
/// element, as in `Names: [..]`).
fn field_str<'a>(entry: &'a serde_json::Value, keys: &[&str]) -> Option<&'a str> {
    for key in keys {
        let mut value = Some(entry);
        for part in key.split('.') {
            value = value.and_then(|v| v.get(part));
        }
        match value {
            Some(serde_json::Value::String(s)) => return Some(s),
            Some(serde_json::Value::Array(a)) => {
                if let Some(serde_json::Value::String(s)) = a.first() {
                    return Some(s);
                }
            }
            _ => {}
        }
    }
    None
}

/// The exit code of a stopped container: a number field, or `Exited (N) …` in a status text.
fn exit_code(entry: &serde_json::Value) -> i32 {
    for key in ["ExitCode", "exitCode", "exit_code", "status.exitCode"] {
        let mut value = Some(entry);
        for part in key.split('.') {
            value = value.and_then(|v| v.get(part));
        }
        if let Some(code) = value.and_then(serde_json::Value::as_i64) {
            return code as i32;
        }
    }
    field_str(entry, &["Status", "status"])
        .and_then(|s| s.split_once('('))
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(code, _)| code.trim().parse().ok())
        .unwrap_or(0)
}

/// Parses `list` output of any supported runtime into our instances (see the module docs).
/// Entries without the `hearth-` prefix are not ours and are left out.
pub fn parse_list(raw: &str) -> Result<Vec<Instance>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<serde_json::Value> = match serde_json::from_str(raw) {
        Ok(serde_json::Value::Array(entries)) => entries,
        Ok(serde_json::Value::Null) => Vec::new(),
        Ok(single @ serde_json::Value::Object(_)) => vec![single],
        Ok(other) => return Err(format!("expected a list, got {other}")),
        // docker: one JSON object per line.
        Err(_) => raw
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
    };
    let mut out: HashMap<String, Instance> = HashMap::new();
    for entry in &entries {
        let Some(name) = field_str(
            entry,
            &["id", "name", "names", "Names", "Name", "configuration.id"],
        ) else {
            continue;
        };
        let Some(uid) = name.trim_start_matches('/').strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let status = field_str(entry, &["status", "State", "state", "status.state"])
            .unwrap_or("unknown")
            .to_ascii_lowercase();
        let state = match status.as_str() {
            "running" => InstanceState::Running,
            "paused" | "created" | "creating" => InstanceState::Paused,
            s if s.starts_with("up") => InstanceState::Running,
            _ => InstanceState::Exited {
                exit_code: exit_code(entry),
            },
        };
        out.insert(
            uid.to_owned(),
            Instance {
                uid: uid.to_owned(),
                state,
            },
        );
    }
    let mut list: Vec<Instance> = out.into_values().collect();
    list.sort_by(|a, b| a.uid.cmp(&b.uid));
    Ok(list)
}

/// An in-memory runtime for tests of the seam's users; `set_exited` simulates a death.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    instances: parking_lot::Mutex<HashMap<String, Instance>>,
}

impl FakeRuntime {
    pub fn set_exited(&self, uid: &str, exit_code: i32) {
        if let Some(instance) = self.instances.lock().get_mut(uid) {
            instance.state = InstanceState::Exited { exit_code };
        }
    }
}

impl ContainerRuntime for FakeRuntime {
    fn name(&self) -> &str {
        "fake"
    }

    fn prepare(&self, spec: &RunSpec) -> std::io::Result<Vec<OsString>> {
        self.instances.lock().insert(
            spec.uid.clone(),
            Instance {
                uid: spec.uid.clone(),
                state: InstanceState::Running,
            },
        );
        Ok(spec.args.iter().map(OsString::from).collect())
    }

    fn kill(&self, uid: &str) -> Result<(), RuntimeError> {
        self.set_exited(uid, 137);
        Ok(())
    }

    fn remove(&self, uid: &str) -> Result<(), RuntimeError> {
        self.instances.lock().remove(uid);
        Ok(())
    }

    fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let mut list: Vec<Instance> = self.instances.lock().values().cloned().collect();
        list.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(list)
    }

    fn version(&self) -> Result<String, RuntimeError> {
        Ok("fake-runtime 1.0".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output recorded from the real CLIs (trimmed to the fields that matter, names changed).
    const CRUN_LIST: &str = r#"[
    {
        "id": "hearth-0a1b",
        "pid": 7571,
        "status": "running",
        "bundle": "/var/lib/hearth/oci/bundles/0a1b",
        "created": "2026-11-26T19:44:27.788404Z",
        "owner": "root"
    },
    {
        "id": "someone-elses",
        "pid": 12,
        "status": "running",
        "bundle": "/srv/x",
        "created": "2026-11-26T19:44:27.788404Z",
        "owner": "root"
    },
    {
        "id": "hearth-dead",
        "pid": 0,
        "status": "stopped",
        "bundle": "/var/lib/hearth/oci/bundles/dead",
        "created": "2026-11-26T19:40:00.000000Z",
        "owner": "root"
    }
]"#;
    const CRUN_EMPTY: &str = "[\n\n]\n";
    const RUNC_NULL: &str = "null\n";
    const PODMAN_PS: &str = r#"[
  {"AutoRemove": true, "Command": ["/.hearth/init"], "ExitCode": 0, "Exited": false,
   "Id": "5f3c0e1d", "Image": "", "Names": ["hearth-p1"], "Pid": 4242, "State": "running",
   "Status": "Up 3 seconds"},
  {"AutoRemove": false, "ExitCode": 3, "Exited": true, "Id": "77aa", "Names": ["hearth-p2"],
   "State": "exited", "Status": "Exited (3) 2 minutes ago"},
  {"ExitCode": 0, "Id": "99bb", "Names": ["web"], "State": "running"}
]"#;
    const DOCKER_PS: &str = concat!(
        r#"{"Command":"\"/.hearth/init\"","ID":"1c2d","Image":"abc","Names":"hearth-d1","State":"running","Status":"Up 5 minutes"}"#,
        "\n",
        r#"{"Command":"\"sh\"","ID":"3e4f","Image":"abc","Names":"hearth-d2","State":"exited","Status":"Exited (137) 1 second ago"}"#,
        "\n",
        r#"{"Command":"\"nginx\"","ID":"5a6b","Image":"nginx","Names":"nginx","State":"running","Status":"Up 2 days"}"#,
        "\n"
    );
    const APPLE_LIST: &str = r#"[
  {"configuration": {"id": "hearth-a1", "image": {"reference": "x"}}, "status": "running"},
  {"configuration": {"id": "hearth-a2"}, "status": "stopped", "exitCode": 9},
  {"configuration": {"id": "buildkit"}, "status": "running"}
]"#;

    fn states(raw: &str) -> Vec<(String, InstanceState)> {
        parse_list(raw)
            .unwrap()
            .into_iter()
            .map(|i| (i.uid, i.state))
            .collect()
    }

    #[test]
    fn crun_and_runc_lists_parse_and_foreign_containers_are_ignored() {
        assert_eq!(
            states(CRUN_LIST),
            [
                ("0a1b".to_owned(), InstanceState::Running),
                ("dead".to_owned(), InstanceState::Exited { exit_code: 0 }),
            ]
        );
        assert!(states(CRUN_EMPTY).is_empty());
        assert!(states(RUNC_NULL).is_empty());
        assert!(states("").is_empty());
    }

    #[test]
    fn engine_lists_parse_with_their_exit_codes() {
        assert_eq!(
            states(PODMAN_PS),
            [
                ("p1".to_owned(), InstanceState::Running),
                ("p2".to_owned(), InstanceState::Exited { exit_code: 3 }),
            ]
        );
        assert_eq!(
            states(DOCKER_PS),
            [
                ("d1".to_owned(), InstanceState::Running),
                ("d2".to_owned(), InstanceState::Exited { exit_code: 137 }),
            ]
        );
        assert_eq!(
            states(APPLE_LIST),
            [
                ("a1".to_owned(), InstanceState::Running),
                ("a2".to_owned(), InstanceState::Exited { exit_code: 9 }),
            ]
        );
    }

    #[test]
    fn garbage_list_output_is_an_error_not_an_empty_list() {
        assert!(parse_list("{not json").is_err());
        assert!(parse_list("42").is_err());
    }

    fn spec(uid: &str) -> RunSpec {
        RunSpec {
            uid: uid.into(),
            rootfs: "/cache/abc/rootfs".into(),
            hostname: "vm".into(),
            args: vec!["/.hearth/init".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/workspace".into(),
            binds: vec![Bind {
                host: "/vol".into(),
                container: "/workspace".into(),
                writable: true,
            }],
            tmpfs: vec![("/tmp".into(), 1 << 20)],
            host_uid: 100_000,
            host_gid: 100_000,
            seccomp: serde_json::json!({}),
            bundle: "/b".into(),
        }
    }

    #[test]
    fn reconcile_removes_every_container_of_ours_that_is_not_kept() {
        let rt = FakeRuntime::default();
        for uid in ["keep", "orphan", "dead"] {
            rt.prepare(&spec(uid)).unwrap();
        }
        rt.set_exited("dead", 3);
        assert_eq!(
            rt.list().unwrap()[0].state,
            InstanceState::Exited { exit_code: 3 }
        );
        let removed = remove_orphans(&rt, &|uid| uid == "keep").unwrap();
        assert_eq!(removed, ["dead", "orphan"]);
        let left: Vec<String> = rt.list().unwrap().into_iter().map(|i| i.uid).collect();
        assert_eq!(left, ["keep"]);
        // Idempotent: removing what is gone is fine.
        rt.remove("orphan").unwrap();
        assert_eq!(remove_orphans(&rt, &|uid| uid == "keep").unwrap().len(), 0);
    }

    #[test]
    fn podman_runs_the_same_hardened_spec_as_flags() {
        let argv = Engine::new(EngineKind::Podman, "/usr/bin/podman".into())
            .prepare(&spec("u1"))
            .unwrap();
        let joined = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        for flag in [
            "run --rm --interactive --name hearth-u1",
            "--network none",
            "--read-only",
            "--cap-drop ALL",
            "--security-opt no-new-privileges",
            "--user 1000:1000",
            "--volume /vol:/workspace:rw",
            "--tmpfs /tmp:size=1048576",
            "--rootfs /cache/abc/rootfs /.hearth/init",
        ] {
            assert!(joined.contains(flag), "missing {flag}: {joined}");
        }
    }
}
