//! The escape suite: every attack of issue 10, run for real from inside a session of the process
//! provider in its **default** configuration (`ProcessProvider::open(ProcessConfig::new(root))`,
//! no tweaks), each test asserting the attack fails. Where it matters, a test first proves its
//! probe works (the same read, write or connect succeeds on the session's own things), so a probe
//! that silently does nothing cannot pass for a defence. Every probe is bounded in time, and no
//! traffic leaves the loopback or the host's own addresses.
//!
//! The provider root lives under `CARGO_TARGET_TMPDIR`, not `/tmp`, so "not visible" means the
//! sandbox hides it, not that the sandbox's private `/tmp` happens to shadow it.
//!
//! 1. `other_sessions_files_are_unreachable`: session B cannot read A's `secret` by its host path,
//!    list the provider root or reach it through `/proc/1/root`; A reads its own.
//! 2. `worker_state_and_host_secrets_are_unreachable`: the data dir, `vms/`, `snapshots/`, a
//!    journal and a credentials file planted in the root, `/etc/hearth-test-secret-<pid>` and
//!    `/etc/shadow` are neither readable nor listable, and no search finds their contents.
//! 3. `ld_preload_from_the_request_env_never_runs_on_the_host`,
//!    `ld_library_path_from_the_request_env_never_runs_on_the_host`: a constructor compiled with
//!    `cc` runs inside the sandbox (proved by its volume marker) but never on the host, also when
//!    the variable is in the VM's env and the sandbox is started again.
//! 4. `mounts_and_namespaces_are_refused`: remount `/` or `/usr` read-write, mount a tmpfs,
//!    `unshare -Ur`, `unshare -m`, `nsenter -t 1`, and the raw syscalls (also through the x32
//!    syscall bit) all fail, and the system directories stay read-only.
//! 5. `writes_outside_the_volume_never_reach_the_host`: writes to `/usr`, `/etc`, `/`, `/var`,
//!    `/proc/sys` and `/sys` leave nothing on the host (the host's sysctls and host name are
//!    unchanged); the volume is writable.
//! 6. `device_nodes_cannot_be_created`: `mknod c`/`b` and `os.mknod` of a device fail (a FIFO works).
//! 7. `host_network_is_unreachable`: a real nats-server on 127.0.0.1, TCP listeners on 127.0.0.1,
//!    0.0.0.0 and ::1, every local host address, and an abstract unix socket are unreachable and
//!    fail fast; a listener of the session's own is reachable; the host listener accepted nothing.
//! 8. `the_worker_cannot_be_read_or_signalled`: no `/proc/*/environ` visible in the sandbox holds
//!    the test binary's `CARGO*`/`NATS_SERVER_BIN` (the session's own environ is readable);
//!    `kill -9` of every visible pid, of `-1` and of host pid numbers leaves the host's processes
//!    alive, and the VM serves the next exec.
//! 9. `ptrace_and_friends_are_refused`: `PTRACE_ATTACH` on pid 1 and the agent, `PTRACE_TRACEME`,
//!    `process_vm_readv`, `/proc/<agent>/mem`, `pidfd_getfd` of the agent's and of pid 1's file
//!    descriptors (the agent channel), `strace` and `gdb` all fail.
//! 10. `setsid_and_double_forked_children_die_with_the_exec_and_the_vm`: `setsid`, `nohup`,
//!     double-forked sleeps and a pid-hopping forker (fork, parent exits, repeat) are gone by the
//!     next exec, and a sandbox destroyed mid-exec leaves no process of the sandbox's host uid
//!     within 1 s.
//! 11. `fork_storm_is_capped_by_max_processes` (needs the cgroup limits): with `max_processes = 50`
//!     a bounded fork loop gets fewer than 50 processes; the host and the VM are fine afterwards.
//! 12. `memory_hog_is_oom_killed` and `tmpfs_writes_count_against_memory_mib` (need the cgroup
//!     limits): with `memory_mib = 64` a 400 MiB bytearray is killed with `oom_killed`, and 200 MiB
//!     written to the sandbox's tmpfs mounts (`/tmp`, `/dev/shm`, `/`) cannot all be kept; the VM
//!     serves execs afterwards.
//! 13. `disk_quota_is_enforced` (needs the loop-mounted volume): with `disk_mib = 32`, `dd` of
//!     100 MiB fails with "No space left on device", `put_file` of 40 MiB is `NoSpace`, and after a
//!     delete the space is back.
//! 14. `template_snapshot_is_unreachable_and_verified` (the checksum half needs the snapshot
//!     checksums): no session can find or write a snapshot's `volume.tar.zst`; a byte flipped in it
//!     on the host makes the restore fail with a clear corrupt/checksum error and no VM left.
//!     `snapshot_never_packs_host_files_through_a_swapped_symlink`: a session racing regular files
//!     against symlinks to a host file while the worker snapshots its volume never gets the host
//!     file's contents into the snapshot.
//! 15. `bad_env_and_cwd_are_rejected`, `file_ops_through_planted_symlinks_stay_inside`,
//!     `fifos_never_block_file_ops_or_snapshots`: env names with `=`/NUL, values with NUL, escaping
//!     or absolute `cwd` are `InvalidArgument` and the VM still works; `put_file` through a planted
//!     symlink writes nothing outside; a FIFO (planted, or swapped in by a running command) makes
//!     `get_file` fail within seconds, and neither file ops nor a snapshot hang on it.
//! 16. `identity_is_the_vms_own`: the host name is the VM id, not the host's; `/proc/net/dev` shows
//!     only `lo`; uid 1000 inside with no capabilities, `no_new_privs` and a seccomp filter, and the
//!     sandbox's processes run as an unprivileged host uid.
//!
//! Tests skip (with a printed reason) only when not run as root or without bubblewrap.
//!
//! The same suite runs against the `oci` provider (containers run by crun, in its default
//! configuration) from `escape_oci.rs`, which includes this file as a module: [`oci`] tells them
//! apart by the module path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_worker::provider::{
    ExecOutcome, ExecSpec, ProcessConfig, ProcessProvider, ProviderErrorKind, SnapshotId, VmId,
    VmProvider, VmQuery, VmSpec,
};

/// The host uid sandboxes run as in the default configuration (`SandboxConfig::default().uid`).
const SANDBOX_HOST_UID: u32 = 100_000;
/// How long any single probe may run.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether this is the suite's run against the `oci` provider (see the module docs).
fn oci() -> bool {
    module_path!().contains("oci")
}

/// Whether this host can run the suite; prints why not.
fn sandbox_host() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipping: the escape suite needs root (the default sandbox drops to uid 100000)"
        );
        return false;
    }
    if oci() {
        for (bin, package) in [("/usr/bin/crun", "crun"), ("/usr/bin/tini-static", "tini")] {
            if !Path::new(bin).is_file() {
                eprintln!("skipping: {bin} is not installed (apt-get install {package})");
                return false;
            }
        }
        return true;
    }
    if !Path::new("/usr/bin/bwrap").is_file() {
        eprintln!("skipping: bubblewrap (/usr/bin/bwrap) is not installed");
        return false;
    }
    true
}

macro_rules! require_sandbox {
    () => {
        if !sandbox_host() {
            return;
        }
    };
}

struct Setup {
    provider: ProcessProvider,
    dir: tempfile::TempDir,
}

impl Drop for Setup {
    /// A test that failed (or left a VM) must not leave its volume mounted under the target dir.
    fn drop(&mut self) {
        hearth_testkit::unmount_under(self.dir.path());
    }
}

impl Setup {
    /// A provider in the default configuration, its root outside `/tmp`.
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("escape-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let config = ProcessConfig::new(dir.path().join("root"));
        let provider = if oci() {
            ProcessProvider::open_oci(config, hearth_worker::provider::OciConfig::default())
        } else {
            ProcessProvider::open(config)
        }
        .unwrap();
        Self { provider, dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root").canonicalize().unwrap()
    }

    fn volume(&self, vm_id: &VmId) -> PathBuf {
        self.root().join("vms").join(vm_id.as_str()).join("volume")
    }

    async fn vm(&self, id: &str) -> VmId {
        self.vm_with(id, VmSpec::default()).await
    }

    async fn vm_with(&self, id: &str, spec: VmSpec) -> VmId {
        let vm_id = VmId::new(id).unwrap();
        self.provider
            .create_vm_with_spec(&vm_id, &spec)
            .await
            .unwrap();
        vm_id
    }

    async fn sh(&self, vm_id: &VmId, script: &str) -> ExecOutcome {
        self.run(vm_id, ExecSpec::shell(script)).await
    }

    async fn py(&self, vm_id: &VmId, code: &str) -> ExecOutcome {
        self.run(vm_id, ExecSpec::argv(["python3", "-c", code]))
            .await
    }

    async fn run(&self, vm_id: &VmId, spec: ExecSpec) -> ExecOutcome {
        let spec = if spec.timeout > PROBE_TIMEOUT {
            spec.with_timeout(PROBE_TIMEOUT)
        } else {
            spec
        };
        tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(10), async {
            self.provider.exec(vm_id, spec, None).await
        })
        .await
        .expect("the exec outlived its timeout")
        .unwrap()
    }

    /// After an attack that can end the sandbox's agent or init (`kill -9 -1`, the OOM killer):
    /// the process provider serves the next exec from a new sandbox; under `oci` the container
    /// ended, so the VM failed with the runtime's exit code (its session is lost), never
    /// "assumed running".
    async fn still_works_or_lost(&self, vm_id: &VmId) {
        if !oci() {
            return self.still_works(vm_id).await;
        }
        match self
            .provider
            .exec(vm_id, ExecSpec::shell("echo alive"), None)
            .await
        {
            Ok(outcome) => assert_eq!(outcome.stdout, b"alive\n", "{outcome:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ProviderErrorKind::InvalidState, "{e}");
                assert!(
                    e.to_string()
                        .contains("failed: the container exited with code 137"),
                    "{e}"
                );
            }
        }
    }

    /// Proof that the VM still serves execs.
    async fn still_works(&self, vm_id: &VmId) {
        let outcome = self.sh(vm_id, "echo alive").await;
        assert_eq!(outcome.stdout, b"alive\n", "{outcome:?}");
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// stdout and stderr, for assertions and messages.
fn all(outcome: &ExecOutcome) -> String {
    format!("{}{}", text(&outcome.stdout), text(&outcome.stderr))
}

/// A value that appears nowhere unless a test put it there.
fn token(what: &str) -> String {
    format!(
        "hearth-{what}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Removes a host file on drop (files planted outside the test's temp dir).
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Host processes whose command line contains `needle`: (pid, real uid).
fn host_processes(needle: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        if !cmdline.contains(needle) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if status
            .lines()
            .any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead")))
        {
            continue;
        }
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or(u32::MAX);
        found.push((pid, uid));
    }
    found
}

/// The host's own IPv4 addresses, from the kernel's local routing table.
fn host_addresses() -> BTreeSet<String> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last = None;
    let mut found = BTreeSet::new();
    for line in trie.lines() {
        if let Some(addr) = line.trim_start().strip_prefix("|-- ") {
            last = Some(addr.trim().to_owned());
        } else if line.contains("/32 host LOCAL")
            && let Some(addr) = &last
        {
            found.insert(addr.clone());
        }
    }
    found.insert("127.0.0.1".into());
    found
}

// 1 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn other_sessions_files_are_unreachable() {
    require_sandbox!();
    let s = Setup::new();
    let a = s.vm("sess-a").await;
    let b = s.vm("sess-b").await;
    let secret = token("secret");
    let outcome = s
        .sh(
            &a,
            &format!("echo {secret} > secret && cat /workspace/secret"),
        )
        .await;
    assert_eq!(
        text(&outcome.stdout).trim(),
        secret,
        "A reads its own: {outcome:?}"
    );
    let a_secret = s.volume(&a).join("secret");
    assert!(a_secret.is_file(), "the probe's target exists on the host");
    assert!(s.sh(&b, "echo mine > own").await.success());

    let root = s.root();
    let script = format!(
        "cat /workspace/own; cat {a_secret}; cat /proc/1/root{a_secret}; ls {root}; ls {vms}; \
         ls /proc/1/root{vms}; cat {root}/vms/sess-a/volume/secret; \
         find / \\( -path /proc -o -path /usr -o -path /sys \\) -prune -o -name secret -print; true",
        a_secret = a_secret.display(),
        root = root.display(),
        vms = root.join("vms").display(),
    );
    let outcome = s.sh(&b, &script).await;
    let out = all(&outcome);
    assert!(
        text(&outcome.stdout).starts_with("mine\n"),
        "the probe runs: {out}"
    );
    assert!(!out.contains(&secret), "B read A's secret: {out}");
    assert!(
        !text(&outcome.stdout).contains("sess-a"),
        "B listed A: {out}"
    );
    assert!(out.contains("No such file"), "{out}");
}

// 2 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn worker_state_and_host_secrets_are_unreachable() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("nosy").await;
    let root = s.root();
    let journal = token("journal");
    let credential = token("credential");
    let etc_secret = token("etc");
    std::fs::write(root.join("sessions.journal"), &journal).unwrap();
    std::fs::write(root.join("credentials"), &credential).unwrap();
    let etc_path = PathBuf::from(format!("/etc/hearth-test-secret-{}", std::process::id()));
    std::fs::write(&etc_path, &etc_secret).unwrap();
    let _planted = Planted(etc_path.clone());
    s.provider
        .snapshot_vm(&id, &SnapshotId::new("tpl").unwrap())
        .await
        .unwrap();
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();

    let script = format!(
        "cat /etc/passwd | head -1; \
         for f in {root}/sessions.journal {root}/credentials {etc} /etc/shadow \
                  /proc/1/root{root}/credentials {root}/snapshots/tpl/meta.json; do cat $f; done; \
         ls {root} {root}/vms {root}/snapshots {root}/tmp /proc/1/root{root}; \
         grep -rs -e {journal} -e {credential} -e {etc_secret} /etc /workspace /tmp /var /proc/1/root/etc; \
         true",
        root = root.display(),
        etc = etc_path.display(),
    );
    let outcome = s.sh(&id, &script).await;
    let out = all(&outcome);
    assert!(
        out.starts_with("root:x:0:0"),
        "the probe reads files: {out}"
    );
    for leaked in [&journal, &credential, &etc_secret] {
        assert!(!out.contains(leaked.as_str()), "{leaked} leaked: {out}");
    }
    for listed in [
        "sessions.journal",
        "sandbox-etc",
        "nosy",
        "tpl",
        "meta.json",
    ] {
        assert!(
            !text(&outcome.stdout).contains(listed),
            "{listed} listed: {out}"
        );
    }
    for line in shadow.lines().filter(|l| l.len() > 8) {
        assert!(!out.contains(line), "/etc/shadow leaked: {out}");
    }
}

// 3 ------------------------------------------------------------------------------------------

/// Compiles `source` into `out` with `cc`; `None` (printed) when there is no compiler.
fn compile(args: &[&str], libs: &[&str], source: &str, dir: &Path, out: &str) -> Option<PathBuf> {
    let c = dir.join(format!("{out}.c"));
    std::fs::write(&c, source).unwrap();
    let target = dir.join(out);
    let result = Command::new("cc")
        .args(args)
        .arg("-o")
        .arg(&target)
        .arg(&c)
        .args(libs)
        .output();
    match result {
        Ok(o) if o.status.success() => Some(target),
        Ok(o) => panic!("cc failed: {}", text(&o.stderr)),
        Err(e) => {
            eprintln!("skipping: no C compiler (cc: {e})");
            None
        }
    }
}

/// A constructor that appends to `host_marker` (an absolute host path, in a private `/tmp`
/// inside the sandbox) and to `/workspace/<volume_marker>`.
fn evil_source(host_marker: &Path, volume_marker: &str) -> String {
    format!(
        r#"#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
static void mark(const char *path) {{
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {{
        char line[64];
        int n = snprintf(line, sizeof line, "uid=%d pid=%d\n", (int)getuid(), (int)getpid());
        if (n > 0) write(fd, line, (size_t)n);
        close(fd);
    }}
}}
__attribute__((constructor)) static void evil(void) {{
    mark("{host}");
    mark("/workspace/{volume_marker}");
}}
int hearth_evil(void) {{ return 7; }}
"#,
        host = host_marker.display(),
    )
}

#[tokio::test]
async fn ld_preload_from_the_request_env_never_runs_on_the_host() {
    require_sandbox!();
    let s = Setup::new();
    let host_marker = PathBuf::from(format!("/tmp/hearth-escape-{}-preload", std::process::id()));
    let _cleanup = Planted(host_marker.clone());
    let _ = std::fs::remove_file(&host_marker);
    let Some(so) = compile(
        &["-shared", "-fPIC"],
        &[],
        &evil_source(&host_marker, "preload-ran"),
        s.dir.path(),
        "evil.so",
    ) else {
        return;
    };
    let id = s.vm("preload").await;
    s.provider
        .put_file(&id, "evil.so", &std::fs::read(&so).unwrap(), Some(0o755))
        .await
        .unwrap();
    let outcome = s
        .run(
            &id,
            ExecSpec::argv(["true"]).with_env("LD_PRELOAD", "/workspace/evil.so"),
        )
        .await;
    assert!(outcome.success(), "{outcome:?}");
    let ran = s.provider.get_file(&id, "preload-ran", 1000).await;
    assert!(
        ran.is_ok_and(|r| text(&r).starts_with("uid=1000")),
        "the constructor runs inside the sandbox, as uid 1000 (the probe works)"
    );
    assert!(
        !host_marker.exists(),
        "LD_PRELOAD from a request ran on the host: {:?}",
        std::fs::read_to_string(&host_marker)
    );

    // The same through the VM's env, with the sandbox started again (the launcher's own env).
    let vm_env = VmSpec {
        env: [("LD_PRELOAD".to_owned(), "/workspace/evil.so".to_owned())].into(),
        ..VmSpec::default()
    };
    let id2 = s.vm_with("preload-vm-env", vm_env).await;
    s.provider
        .put_file(&id2, "evil.so", &std::fs::read(&so).unwrap(), Some(0o755))
        .await
        .unwrap();
    s.provider.stop_vm(&id2).await.unwrap();
    s.provider.start_vm(&id2).await.unwrap();
    let outcome = s.run(&id2, ExecSpec::argv(["true"])).await;
    assert!(outcome.success(), "{outcome:?}");
    assert!(
        !host_marker.exists(),
        "LD_PRELOAD from a VM's env ran on the host: {:?}",
        std::fs::read_to_string(&host_marker)
    );
}

#[tokio::test]
async fn ld_library_path_from_the_request_env_never_runs_on_the_host() {
    require_sandbox!();
    let s = Setup::new();
    let host_marker = PathBuf::from(format!("/tmp/hearth-escape-{}-libpath", std::process::id()));
    let _cleanup = Planted(host_marker.clone());
    let _ = std::fs::remove_file(&host_marker);
    let Some(lib) = compile(
        &["-shared", "-fPIC", "-Wl,-soname,libhearthevil.so"],
        &[],
        &evil_source(&host_marker, "libpath-ran"),
        s.dir.path(),
        "libhearthevil.so",
    ) else {
        return;
    };
    let dir = s.dir.path().display().to_string();
    let Some(exe) = compile(
        &[],
        &[&format!("-L{dir}"), "-lhearthevil"],
        "int hearth_evil(void); int main(void) { return hearth_evil() == 7 ? 0 : 1; }",
        s.dir.path(),
        "needs-evil",
    ) else {
        return;
    };
    let id = s.vm("libpath").await;
    let p = &s.provider;
    p.put_file(
        &id,
        "lib/libhearthevil.so",
        &std::fs::read(&lib).unwrap(),
        Some(0o755),
    )
    .await
    .unwrap();
    p.put_file(
        &id,
        "needs-evil",
        &std::fs::read(&exe).unwrap(),
        Some(0o755),
    )
    .await
    .unwrap();
    for program in ["./needs-evil", "true"] {
        let outcome = s
            .run(
                &id,
                ExecSpec::argv([program]).with_env("LD_LIBRARY_PATH", "/workspace/lib"),
            )
            .await;
        assert!(outcome.success(), "{program}: {outcome:?}");
    }
    let ran = p.get_file(&id, "libpath-ran", 1000).await;
    assert!(
        ran.is_ok_and(|r| text(&r).starts_with("uid=1000")),
        "the library loads inside the sandbox (the probe works)"
    );
    assert!(
        !host_marker.exists(),
        "LD_LIBRARY_PATH from a request ran on the host: {:?}",
        std::fs::read_to_string(&host_marker)
    );
}

// 4 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn mounts_and_namespaces_are_refused() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("mounter").await;
    assert!(s.sh(&id, "mkdir -p m").await.success());
    for attack in [
        "mount -o remount,rw /",
        "mount -o remount,rw,bind /usr",
        "mount -o remount,rw,bind /etc",
        "mount -t tmpfs none /workspace/m",
        "mount --bind /workspace /usr/local",
        "unshare -Ur true",
        "unshare -m true",
        "unshare -n true",
        "unshare -p -f true",
        "nsenter -t 1 -m -U true",
        "nsenter -t 1 -n true",
    ] {
        let outcome = s.sh(&id, &format!("timeout 5 {attack}")).await;
        assert_ne!(outcome.exit_code, 0, "{attack} succeeded: {outcome:?}");
    }
    // The raw calls, also through the x32 syscall bit (a seccomp filter matching only x86_64
    // numbers would miss them): unshare(CLONE_NEWUSER), unshare(CLONE_NEWNS), mount.
    let code = r#"
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
calls = {"x86_64": (272, 165), "aarch64": (97, 40)}[platform.machine()]
bits = [0, 0x40000000] if platform.machine() == "x86_64" else [0]
for bit in bits:
    for flag in (0x10000000, 0x00020000):
        r = libc.syscall(calls[0] | bit, flag)
        print("unshare", hex(bit), hex(flag), r, ctypes.get_errno())
    r = libc.syscall(calls[1] | bit, b"none", b"/workspace/m", b"tmpfs", 0, None)
    print("mount", hex(bit), r, ctypes.get_errno())
print("pid", os.getpid())
"#;
    let outcome = s.py(&id, code).await;
    let out = text(&outcome.stdout);
    assert!(out.contains("pid "), "the probe runs: {outcome:?}");
    eprintln!("raw calls (name, x32 bit, flags, result, errno):\n{out}");
    for line in out.lines().filter(|l| !l.starts_with("pid")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let result = fields[fields.len() - 2];
        assert_eq!(
            result, "-1",
            "a namespace or mount call succeeded: {line}\n{out}"
        );
    }
    let outcome = s
        .sh(
            &id,
            "touch /usr/hearth-x; mount | grep -c ' /workspace/m ' ; true",
        )
        .await;
    assert!(text(&outcome.stdout).trim() == "0", "{outcome:?}");
    assert!(!Path::new("/usr/hearth-x").exists());
}

// 5 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn writes_outside_the_volume_never_reach_the_host() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("writer").await;
    let name = token("w");
    let host_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap();
    let flipped = if overcommit.trim() == "1" { "0" } else { "1" };
    let targets = [
        format!("/usr/{name}"),
        format!("/usr/bin/{name}"),
        format!("/etc/{name}"),
        format!("/{name}"),
        format!("/var/{name}"),
        format!("/root/{name}"),
        format!("/sys/{name}"),
        format!("/proc/{name}"),
        format!("{}/{name}", s.root().display()),
    ];
    let mut script = String::from("echo inside > /workspace/inside; ");
    for t in &targets {
        script.push_str(&format!("echo x > {t}; mkdir -p {t}.d; "));
    }
    script.push_str(&format!(
        "echo hearth-escaped > /proc/sys/kernel/hostname; \
         echo {flipped} > /proc/sys/vm/overcommit_memory; \
         echo 1 > /proc/sys/kernel/ns_last_pid; \
         echo x > /sys/kernel/uevent_helper; true"
    ));
    let outcome = s.sh(&id, &script).await;
    assert_eq!(
        std::fs::read(s.volume(&id).join("inside")).unwrap(),
        b"inside\n",
        "the volume is writable (the probe works): {outcome:?}"
    );
    for t in &targets {
        let leaked = Path::new(t).exists() || Path::new(&format!("{t}.d")).exists();
        let _ = std::fs::remove_file(t);
        let _ = std::fs::remove_dir(format!("{t}.d"));
        assert!(!leaked, "{t} appeared on the host: {outcome:?}");
    }
    let now = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    if now != host_hostname {
        let _ = std::fs::write("/proc/sys/kernel/hostname", &host_hostname);
    }
    assert_eq!(now, host_hostname, "the host's name changed");
    let now = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap();
    if now != overcommit {
        let _ = std::fs::write("/proc/sys/vm/overcommit_memory", &overcommit);
    }
    assert_eq!(now, overcommit, "a host sysctl changed");
}

// 6 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn device_nodes_cannot_be_created() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("mknod").await;
    let outcome = s.sh(&id, "mknod fifo p && echo fifo-ok").await;
    assert_eq!(
        outcome.stdout, b"fifo-ok\n",
        "mknod itself runs: {outcome:?}"
    );
    for attack in ["mknod null c 1 3", "mknod mem c 1 1", "mknod disk b 8 0"] {
        let outcome = s.sh(&id, attack).await;
        assert_ne!(outcome.exit_code, 0, "{attack}: {outcome:?}");
    }
    let outcome = s
        .py(
            &id,
            "import os, stat\n\
             for name, kind in (('pynull', stat.S_IFCHR), ('pydisk', stat.S_IFBLK)):\n\
             \x20   try:\n\
             \x20       os.mknod(name, kind | 0o666, os.makedev(1, 3)); print('CREATED', name)\n\
             \x20   except OSError as e:\n\
             \x20       print('refused', name, e.errno)\n",
        )
        .await;
    let out = all(&outcome);
    assert!(
        out.contains("refused pynull") && out.contains("refused pydisk"),
        "{out}"
    );
    assert!(!out.contains("CREATED"), "{out}");
    for entry in std::fs::read_dir(s.volume(&id)).unwrap().flatten() {
        use std::os::unix::fs::FileTypeExt;
        let kind = entry.file_type().unwrap();
        assert!(
            !kind.is_char_device() && !kind.is_block_device(),
            "a device node appeared in the volume: {:?}",
            entry.path()
        );
    }
}

// 7 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn host_network_is_unreachable() {
    require_sandbox!();
    let nats = hearth_testkit::NatsServer::builder()
        .without_jetstream()
        .start()
        .unwrap();
    let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lo6 = std::net::TcpListener::bind("[::1]:0").ok();
    let abstract_name = format!("hearth-escape-{}", std::process::id());
    let unix = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    for l in [&any, &lo] {
        l.set_nonblocking(true).unwrap();
    }
    unix.set_nonblocking(true).unwrap();
    let any_port = any.local_addr().unwrap().port();
    let mut targets = vec![
        ("127.0.0.1".to_owned(), nats.port()),
        ("127.0.0.1".to_owned(), lo.local_addr().unwrap().port()),
        ("127.0.0.1".to_owned(), any_port),
    ];
    for addr in host_addresses() {
        targets.push((addr.clone(), any_port));
        targets.push((addr, nats.port()));
    }
    if let Some(l) = &lo6 {
        l.set_nonblocking(true).unwrap();
        targets.push(("::1".to_owned(), l.local_addr().unwrap().port()));
    }
    let list: Vec<String> = targets
        .iter()
        .map(|(h, p)| format!("({h:?}, {p})"))
        .collect();
    let code = format!(
        r#"
import socket, time
own = socket.socket(); own.bind(("127.0.0.1", 0)); own.listen(1)
probe = socket.create_connection(own.getsockname(), timeout=2); print("self-ok")
for host, port in [{targets}]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam); s.settimeout(3); t = time.time()
    try:
        s.connect((host, port)); print("CONNECTED", host, port)
    except OSError as e:
        print("failed", host, port, type(e).__name__, round(time.time() - t, 2))
u = socket.socket(socket.AF_UNIX)
try:
    u.connect("\0{abstract_name}"); print("CONNECTED abstract")
except OSError as e:
    print("failed abstract", e.errno)
"#,
        targets = list.join(", ")
    );
    let started = Instant::now();
    let outcome = s_net_probe(&code).await;
    let out = all(&outcome);
    assert!(out.starts_with("self-ok"), "the probe can connect: {out}");
    assert!(!out.contains("CONNECTED"), "reached the host: {out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("failed")).count(),
        targets.len() + 1,
        "{out}"
    );
    for line in out
        .lines()
        .filter(|l| l.starts_with("failed ") && !l.contains("abstract"))
    {
        let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(secs < 1.0, "a connect hung instead of failing: {line}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    for l in [&any, &lo] {
        assert!(
            l.accept().is_err(),
            "the host listener accepted a connection"
        );
    }
    assert!(
        unix.accept().is_err(),
        "the abstract socket accepted a connection"
    );
}

/// Runs `code` with python3 in a fresh default VM.
async fn s_net_probe(code: &str) -> ExecOutcome {
    let s = Setup::new();
    let id = s.vm("netprobe").await;
    s.py(&id, code).await
}

// 8 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_worker_cannot_be_read_or_signalled() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("killer").await;
    assert!(
        std::env::vars().any(|(k, _)| k.starts_with("CARGO")),
        "the test binary runs under cargo, with CARGO_* in its environment"
    );
    let outcome = s
        .run(
            &id,
            ExecSpec::shell(
                "echo visible $(ls -d /proc/[0-9]* | wc -l); \
                 for f in /proc/self/environ /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done",
            )
            .with_env("PROBE_MARK", "visible-env"),
        )
        .await;
    let out = all(&outcome);
    assert!(
        out.contains("PROBE_MARK=visible-env"),
        "environ is readable: {out}"
    );
    for secret in ["CARGO", "NATS_SERVER_BIN", "RUST_", "HEARTH_"] {
        assert!(!out.contains(secret), "{secret} leaked: {out}");
    }
    let visible: u32 = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("visible "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        visible < 10,
        "own pid namespace: {visible} processes visible"
    );

    // A host process standing in for the worker, and the test process itself.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let targets = format!("{} {} 1", bystander.id(), std::process::id());
    let outcome = s
        .provider
        .exec(
            &id,
            ExecSpec::shell(format!(
                "for p in {targets}; do kill -9 $p; done; \
                 for p in $(ls /proc | grep -E '^[0-9]+$'); do [ $p = $$ ] || kill -9 $p; done; \
                 kill -9 -1; kill -9 $$"
            ))
            .with_timeout(Duration::from_secs(10)),
            None,
        )
        .await;
    // Killing the agent ends the sandbox (an error); otherwise the shell died by its own kill.
    if let Ok(outcome) = &outcome {
        assert_eq!(outcome.signal, Some(9), "{outcome:?}");
    }
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a host process was killed from the sandbox"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    s.still_works_or_lost(&id).await;
}

// 9 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn ptrace_and_friends_are_refused() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("tracer").await;
    let code = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
agent = os.getppid()
def report(what, r):
    print(what, r, ctypes.get_errno())
for pid in (1, agent):
    report(f"ptrace-attach {pid}", libc.ptrace(16, pid, None, None))
    report(f"ptrace-seize {pid}", libc.ptrace(0x4206, pid, None, None))
    buf = ctypes.create_string_buffer(8)
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 8)
    remote = iovec(0x400000, 8)
    report(f"process_vm_readv {pid}", libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
    for name in ("mem", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                f.read(1)
            print(f"OPENED /proc/{pid}/{name}")
        except OSError as e:
            print(f"refused /proc/{pid}/{name} {e.errno}")
    pidfd = libc.syscall(434, pid, 0)
    if pidfd < 0:
        report(f"pidfd_open {pid}", pidfd)
        continue
    for fd in range(0, 16):
        got = libc.syscall(438, pidfd, fd, 0)
        if got >= 0:
            print(f"GOTFD {pid} {fd} -> {os.readlink(f'/proc/self/fd/{got}')}")
child = os.fork()
if child == 0:
    r = libc.ptrace(0, 0, None, None)
    os._exit(0 if r == 0 else 1)
_, status = os.waitpid(child, 0)
print("traceme", os.waitstatus_to_exitcode(status))
print("agent", agent)
"#;
    let outcome = s.py(&id, code).await;
    let out = all(&outcome);
    assert!(out.contains("agent "), "the probe runs: {out}");
    for line in out.lines() {
        if line.starts_with("ptrace") || line.starts_with("process_vm_readv") {
            assert!(line.contains(" -1 "), "{line}\n{out}");
        }
    }
    assert!(out.contains("traceme 1"), "PTRACE_TRACEME worked: {out}");
    let agent: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("agent "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !out.contains(&format!("OPENED /proc/{agent}/")),
        "the agent's memory or environ is readable: {out}"
    );
    assert!(
        !out.contains("GOTFD"),
        "a command took the agent channel: {out}"
    );
    assert!(
        !out.contains("OPENED /proc/1/mem"),
        "pid 1's memory is readable: {out}"
    );

    for (tool, attack) in [
        ("strace", "timeout 5 strace -f true"),
        ("strace", "timeout 5 strace -p 1"),
        (
            "gdb",
            "timeout 10 gdb -batch -nx -p 1 -ex 'info registers rip'",
        ),
    ] {
        if !Path::new("/usr/bin").join(tool).exists() {
            eprintln!("{tool} not installed, not tried");
            continue;
        }
        let outcome = s.sh(&id, attack).await;
        let out = all(&outcome);
        assert!(
            outcome.exit_code != 0 || out.contains("not permitted"),
            "{attack}: {out}"
        );
        assert!(!out.contains("rip "), "{attack} read registers: {out}");
    }
    s.still_works(&id).await;
}

// 10 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn setsid_and_double_forked_children_die_with_the_exec_and_the_vm() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("survivor").await;
    // Durations unique to this run: the host scan below must not see other tests' sleeps.
    let base = 100_000 + (std::process::id() % 50_000) * 10;
    let script = format!(
        "setsid sleep {a} & \
         (setsid sh -c 'sleep {b} &' &) ; \
         sh -c '(sleep {c} &) &'; \
         nohup sleep {d} >/dev/null 2>&1 & \
         python3 -c 'import os,time\nif os.fork()==0:\n os.setsid()\n if os.fork()==0: time.sleep({e})' ; \
         sleep 0.3; ps -eo args | grep -c '^sleep {base_prefix}'",
        a = base,
        b = base + 1,
        c = base + 2,
        d = base + 3,
        e = base + 4,
        base_prefix = base / 10,
    );
    let outcome = s.sh(&id, &script).await;
    assert!(
        text(&outcome.stdout).trim().parse::<u32>().unwrap_or(0) >= 4,
        "the children were running during the exec (the probe works): {outcome:?}"
    );
    let outcome = s
        .sh(
            &id,
            "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; echo",
        )
        .await;
    for n in base..base + 5 {
        assert!(
            !text(&outcome.stdout).contains(&n.to_string()),
            "a child of the previous exec survived: {outcome:?}"
        );
    }

    // A process that keeps changing its pid (fork, parent exits) so a scan-then-kill pass never
    // finds it where it was; bounded to 20 s by itself.
    let hopper = r#"
import os, sys, time
if os.fork() == 0:
    os.setsid()
    end = time.time() + 20
    while time.time() < end:
        if os.fork() != 0:
            os._exit(0)
    os._exit(0)
time.sleep(0.2)
print("hopping")
"#;
    let outcome = s.py(&id, hopper).await;
    assert_eq!(outcome.stdout, b"hopping\n", "{outcome:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcome = s.sh(&id, "ps -eo args | grep -c '^python3' ; true").await;
    assert_eq!(
        text(&outcome.stdout).trim(),
        "0",
        "a pid-hopping child of the previous exec survived it: {outcome:?}"
    );

    // Released mid-exec: nothing of the sandbox survives on the host.
    let long = base + 5;
    let exec = s.provider.exec(
        &id,
        ExecSpec::shell(format!(
            "setsid sleep {long} & (sleep {long} &) ; touch started; sleep {long}"
        ))
        .with_timeout(Duration::from_secs(30)),
        None,
    );
    let started = s.volume(&id).join("started");
    let destroy = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !started.exists() {
            assert!(Instant::now() < deadline, "the exec did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = host_processes(&format!("sleep {long}"));
        assert!(
            before.iter().any(|(_, uid)| *uid == SANDBOX_HOST_UID),
            "the sleeps run as host uid {SANDBOX_HOST_UID} (the probe works): {before:?}"
        );
        s.provider.destroy_vm(&id).await.unwrap();
    };
    let (_, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(exec, destroy)
    })
    .await
    .expect("destroy did not end the exec");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = host_processes(&format!("sleep {long}"));
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes outlived the VM by 1 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// 11 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn fork_storm_is_capped_by_max_processes() {
    require_sandbox!();
    let s = Setup::new();
    let spec = VmSpec {
        max_processes: 50,
        ..VmSpec::default()
    };
    let id = s.vm_with("storm", spec).await;
    // Bounded whatever happens: at most 300 forks, each child sleeps 20 s and is then killed with
    // the exec.
    let code = r#"
import os, time
ok = failed = 0
for i in range(300):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(20)
        os._exit(0)
    ok += 1
visible = len([p for p in os.listdir("/proc") if p.isdigit()])
print(ok, failed, visible)
"#;
    let outcome = s
        .run(
            &id,
            ExecSpec::argv(["python3", "-c", code]).with_timeout(Duration::from_secs(15)),
        )
        .await;
    let out = text(&outcome.stdout);
    let fields: Vec<u32> = out
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fields.len(), 3, "{outcome:?}");
    let (ok, failed, visible) = (fields[0], fields[1], fields[2]);
    assert!(ok > 0, "forks work at all: {out}");
    assert!(
        ok < 50 && failed > 0 && visible <= 50,
        "{ok} forks, {failed} refused, {visible} processes visible under max_processes=50"
    );
    let outcome = s
        .sh(
            &id,
            "timeout 5 sh -c 'while :; do sleep 10 & done'; echo survived",
        )
        .await;
    assert!(text(&outcome.stdout).contains("survived"), "{outcome:?}");
    assert!(
        Command::new("true").status().unwrap().success(),
        "the host forks"
    );
    s.still_works(&id).await;
}

// 12 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_hog_is_oom_killed() {
    require_sandbox!();
    let s = Setup::new();
    let spec = VmSpec {
        memory_mib: 64,
        ..VmSpec::default()
    };
    let id = s.vm_with("hog", spec).await;
    let outcome = s
        .py(&id, "b = bytearray(16 << 20); print('small-ok')")
        .await;
    assert_eq!(outcome.stdout, b"small-ok\n", "python runs: {outcome:?}");
    let outcome = s
        .py(&id, "b = bytearray(400 << 20); print('ALLOCATED')")
        .await;
    assert!(!text(&outcome.stdout).contains("ALLOCATED"), "{outcome:?}");
    assert!(outcome.oom_killed, "oom_killed is reported: {outcome:?}");
    assert!(!outcome.success());
    s.still_works(&id).await;
}

#[tokio::test]
async fn tmpfs_writes_count_against_memory_mib() {
    require_sandbox!();
    let s = Setup::new();
    let spec = VmSpec {
        memory_mib: 64,
        ..VmSpec::default()
    };
    let id = s.vm_with("tmpfs-hog", spec).await;
    // The sandbox's tmpfs mounts are host memory: /tmp, /dev (/dev/shm) and bubblewrap's root.
    let hog = ExecSpec::shell(
        "for d in /tmp /dev/shm /dev /; do \
           dd if=/dev/zero of=$d/hog bs=1M count=200 2>/dev/null; done; \
         du -smc /tmp/hog /dev/shm/hog /dev/hog /hog 2>/dev/null | tail -1",
    )
    .with_timeout(PROBE_TIMEOUT);
    let outcome = match s.provider.exec(&id, hog, None).await {
        Ok(outcome) => outcome,
        // oci: the OOM killer took the container's agent, so the container (and its tmpfs
        // mounts) ended and the VM failed.
        Err(e) if oci() => {
            assert!(
                e.to_string()
                    .contains("failed: the container exited with code"),
                "{e}"
            );
            return s.still_works_or_lost(&id).await;
        }
        Err(e) => panic!("{e}"),
    };
    let kept: u64 = text(&outcome.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        kept <= 64,
        "{kept} MiB of tmpfs files kept by a VM with memory_mib=64: {outcome:?}"
    );
    s.still_works_or_lost(&id).await;
}

// 13 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn disk_quota_is_enforced() {
    require_sandbox!();
    let s = Setup::new();
    let spec = VmSpec {
        disk_mib: 32,
        ..VmSpec::default()
    };
    let id = s.vm_with("quota", spec).await;
    let outcome = s
        .sh(&id, "dd if=/dev/zero of=small bs=1M count=4 && echo ok")
        .await;
    assert!(
        text(&outcome.stdout).contains("ok"),
        "writes work: {outcome:?}"
    );
    let outcome = s.sh(&id, "dd if=/dev/zero of=big bs=1M count=100").await;
    assert_ne!(outcome.exit_code, 0, "{outcome:?}");
    assert!(
        text(&outcome.stderr).contains("No space left on device"),
        "{outcome:?}"
    );
    let err = s
        .provider
        .put_file(&id, "huge", &vec![7u8; 40 << 20], None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ProviderErrorKind::NoSpace, "{err}");
    assert!(s.sh(&id, "rm -f big huge small").await.success());
    let outcome = s
        .sh(&id, "dd if=/dev/zero of=again bs=1M count=8 && echo ok")
        .await;
    assert!(
        text(&outcome.stdout).contains("ok"),
        "space is back: {outcome:?}"
    );
    s.provider
        .put_file(&id, "after", b"fits", None)
        .await
        .unwrap();
    s.still_works(&id).await;
}

// 14 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn template_snapshot_is_unreachable_and_verified() {
    require_sandbox!();
    let s = Setup::new();
    let a = s.vm("template").await;
    // Incompressible content, so a flipped byte lands in stored file data.
    assert!(
        s.sh(
            &a,
            "head -c 262144 /dev/urandom > data && echo template > marker"
        )
        .await
        .success()
    );
    let snap = SnapshotId::new("tpl").unwrap();
    s.provider.snapshot_vm(&a, &snap).await.unwrap();
    let archive = s.root().join("snapshots/tpl/volume.tar.zst");
    let pristine = std::fs::read(&archive).unwrap();

    let script = format!(
        "find / \\( -path /proc -o -path /usr -o -path /sys \\) -prune -o -name 'volume.tar.zst' -print; \
         cat {p} | head -c 4 | od -c; echo x >> {p}; echo x >> /proc/1/root{p}; \
         ls /proc/1/root{snaps}; true",
        p = archive.display(),
        snaps = s.root().join("snapshots").display(),
    );
    for vm in [&a, &s.vm("other").await] {
        let outcome = s.sh(vm, &script).await;
        assert!(
            !text(&outcome.stdout).contains("volume.tar.zst"),
            "the snapshot is visible: {outcome:?}"
        );
        assert!(
            !text(&outcome.stdout).contains("tpl"),
            "the snapshots are listed: {outcome:?}"
        );
    }
    assert_eq!(
        std::fs::read(&archive).unwrap(),
        pristine,
        "a session changed the snapshot"
    );

    // The corruption stand-in: one byte flipped on the host.
    let mut bytes = pristine.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&archive, &bytes).unwrap();
    let restored = VmId::new("from-corrupt").unwrap();
    let spec = VmSpec {
        restore_from: Some(snap.clone()),
        ..VmSpec::default()
    };
    let result = s.provider.create_vm_with_spec(&restored, &spec).await;
    let err = match result {
        Ok(_) => {
            let data = s.provider.get_file(&restored, "data", 1 << 20).await;
            panic!(
                "a corrupted snapshot restored without an error (its data {} the original)",
                if data.is_ok_and(|d| s.volume(&a).join("data").exists()
                    && d != std::fs::read(s.volume(&a).join("data")).unwrap())
                {
                    "differs from"
                } else {
                    "matches"
                }
            );
        }
        Err(err) => err,
    };
    assert!(
        matches!(
            err.kind(),
            ProviderErrorKind::InvalidArgument | ProviderErrorKind::Io
        ),
        "{err}"
    );
    let message = err.to_string().to_lowercase();
    assert!(
        message.contains("corrupt") || message.contains("checksum"),
        "a clear error: {err}"
    );
    assert!(s.provider.get_vm(&restored).await.unwrap().is_none());
    assert!(!s.root().join("vms/from-corrupt").exists());
}

#[tokio::test]
async fn snapshot_never_packs_host_files_through_a_swapped_symlink() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("racer").await;
    let secret = token("hostfile");
    let host_file = s.dir.path().join("host-only-secret");
    std::fs::write(&host_file, &secret).unwrap();
    // Files that regularly are plain files, and partners that are symlinks to the host file;
    // a filler directory so that packing takes a while.
    let setup = format!(
        "mkdir fill && for i in $(seq 1 200); do head -c 32768 /dev/urandom > fill/f$i; done; \
         for n in 0 1 2 3 4 5 6 7; do echo decoy > leak$n; ln -s {} alt$n; done; echo ready",
        host_file.display()
    );
    assert_eq!(s.sh(&id, &setup).await.stdout, b"ready\n");
    // Atomically swaps each leakN with altN (renameat2 RENAME_EXCHANGE), as fast as it can.
    let racer = r#"
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
end = time.time() + 170
while time.time() < end:
    for n in range(8):
        libc.syscall(316, -100, f"leak{n}".encode(), -100, f"alt{n}".encode(), 2)
"#;
    let race = s.provider.exec(
        &id,
        // Outlives the snapshots below on a loaded host; dropped (and killed) when they are done.
        ExecSpec::argv(["python3", "-c", racer]).with_timeout(Duration::from_secs(180)),
        None,
    );
    let snapshots = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut leaked = Vec::new();
        let mut failed = 0;
        for k in 0..12 {
            let snap = SnapshotId::new(format!("race-{k}")).unwrap();
            if s.provider.snapshot_vm(&id, &snap).await.is_err() {
                failed += 1;
                continue;
            }
            let probe = VmId::new(format!("probe-{k}")).unwrap();
            let spec = VmSpec {
                restore_from: Some(snap.clone()),
                ..VmSpec::default()
            };
            s.provider.create_vm_with_spec(&probe, &spec).await.unwrap();
            for n in 0..8 {
                for name in [format!("leak{n}"), format!("alt{n}")] {
                    if let Ok(data) = s.provider.get_file(&probe, &name, 4096).await
                        && text(&data).contains(&secret)
                    {
                        leaked.push(format!("snapshot race-{k}: {name}"));
                    }
                }
            }
            s.provider.destroy_vm(&probe).await.unwrap();
            s.provider.delete_snapshot(&snap).await.unwrap();
        }
        (leaked, failed)
    };
    let (leaked, failed) = tokio::select! {
        result = snapshots => result,
        outcome = race => panic!("the racer ended early: {outcome:?}"),
    };
    eprintln!("{failed} of 12 snapshots failed during the race");
    assert!(
        leaked.is_empty(),
        "the worker packed a host file into a session's snapshot: {leaked:?}"
    );
}

// 15 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_env_and_cwd_are_rejected() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("bad-input").await;
    let bad = [
        ExecSpec::argv(["true"]).with_env("A=B", "v"),
        ExecSpec::argv(["true"]).with_env("A\0B", "v"),
        ExecSpec::argv(["true"]).with_env("", "v"),
        ExecSpec::argv(["true"]).with_env("OK", "v\0w"),
        ExecSpec::argv(["true"]).with_cwd("../.."),
        ExecSpec::argv(["true"]).with_cwd("a/../../.."),
        ExecSpec::argv(["true"]).with_cwd("/etc"),
        ExecSpec::argv(["true"]).with_cwd("/workspace"),
    ];
    for spec in bad {
        let what = format!("{:?} {:?}", spec.env, spec.cwd);
        let err = tokio::time::timeout(PROBE_TIMEOUT, s.provider.exec(&id, spec, None))
            .await
            .unwrap()
            .map(drop)
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ProviderErrorKind::InvalidArgument,
            "{what}: {err}"
        );
    }
    s.still_works(&id).await;
}

#[tokio::test]
async fn file_ops_through_planted_symlinks_stay_inside() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("linker").await;
    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    let sandbox_passwd = std::fs::read(s.root().join("sandbox-etc/passwd")).unwrap();
    let name = format!("hearth-escape-{}", std::process::id());
    let script = format!(
        "ln -s /etc/passwd link && ln -s /etc etcdir && ln -s {vms} vmsdir && ln -s / rootdir",
        vms = s.root().join("vms").display()
    );
    assert!(s.sh(&id, &script).await.success());
    let p = &s.provider;
    // Onto the link itself: the link is replaced (or refused); never the file it names.
    let _ = p.put_file(&id, "link", b"pwned\n", None).await;
    for path in [
        format!("etcdir/{name}"),
        format!("vmsdir/{name}/volume/x"),
        format!("rootdir/tmp/{name}"),
        "etcdir/passwd".to_owned(),
    ] {
        let result = tokio::time::timeout(PROBE_TIMEOUT, p.put_file(&id, &path, b"pwned\n", None))
            .await
            .unwrap();
        assert!(result.is_err(), "put_file {path} went through a symlink");
    }
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), host_passwd);
    assert_eq!(
        std::fs::read(s.root().join("sandbox-etc/passwd")).unwrap(),
        sandbox_passwd
    );
    assert!(!Path::new(&format!("/etc/{name}")).exists());
    assert!(!Path::new(&format!("/tmp/{name}")).exists());
    assert!(!s.root().join("vms").join(&name).exists());
    s.still_works(&id).await;
}

#[tokio::test]
async fn fifos_never_block_file_ops_or_snapshots() {
    require_sandbox!();
    let s = Setup::new();
    let id = s.vm("fifo").await;
    assert!(s.sh(&id, "mkfifo pipe && echo data > file").await.success());
    let p = &s.provider;
    let bound = Duration::from_secs(5);
    let got = tokio::time::timeout(bound, p.get_file(&id, "pipe", 100))
        .await
        .expect("get_file blocked on a FIFO");
    assert!(got.is_err(), "{got:?}");
    tokio::time::timeout(bound, p.put_file(&id, "pipe", b"x", None))
        .await
        .expect("put_file blocked on a FIFO")
        .ok();
    tokio::time::timeout(
        Duration::from_secs(15),
        p.snapshot_vm(&id, &SnapshotId::new("with-fifo").unwrap()),
    )
    .await
    .expect("a snapshot blocked on a FIFO")
    .unwrap();

    // Swapped in while the host reads: a running command exchanges a file and a FIFO.
    assert!(
        s.sh(&id, "mkfifo swapfifo && echo plain > swap")
            .await
            .success()
    );
    let racer = r#"
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
end = time.time() + 4
while time.time() < end:
    libc.syscall(316, -100, b"swap", -100, b"swapfifo", 2)
"#;
    let race = p.exec(
        &id,
        ExecSpec::argv(["python3", "-c", racer]).with_timeout(Duration::from_secs(10)),
        None,
    );
    let reads = async {
        let end = Instant::now() + Duration::from_secs(3);
        let mut results = (0, 0);
        while Instant::now() < end {
            let r = tokio::time::timeout(bound, p.get_file(&id, "swap", 100))
                .await
                .expect("get_file blocked on a swapped-in FIFO");
            match r {
                Ok(data) => {
                    assert_eq!(data, b"plain\n");
                    results.0 += 1;
                }
                Err(_) => results.1 += 1,
            }
        }
        results
    };
    let (outcome, (ok, refused)) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(race, reads) })
            .await
            .expect("the race hung");
    eprintln!("during the swap: {ok} reads, {refused} refused; racer {outcome:?}");
    let started = Instant::now();
    s.still_works(&id).await;
    assert!(started.elapsed() < bound, "the VM lock was held");
    let _ = std::fs::remove_file(s.volume(&id).join("swapfifo"));
}

// 16 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn identity_is_the_vms_own() {
    require_sandbox!();
    let s = Setup::new();
    let vm_name = format!("ident-{}", std::process::id());
    let id = s.vm(&vm_name).await;
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let outcome = s.run(&id, ExecSpec::argv(["hostname"])).await;
    assert_eq!(text(&outcome.stdout).trim(), vm_name, "{outcome:?}");
    assert_ne!(text(&outcome.stdout).trim(), host_name.trim());
    let outcome = s.run(&id, ExecSpec::argv(["cat", "/proc/net/dev"])).await;
    let interfaces: Vec<String> = text(&outcome.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|i| i.trim().to_owned()))
        .collect();
    assert_eq!(interfaces, ["lo"], "{outcome:?}");
    let outcome = s
        .sh(
            &id,
            "id -u; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
        )
        .await;
    let out = text(&outcome.stdout);
    assert!(out.starts_with("1000\n"), "{out}");
    for line in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(out.contains(line), "missing {line:?}: {out}");
    }
    let agents = host_processes("/.hearth/agent");
    assert!(
        !agents.is_empty(),
        "the agent runs on the host's process table"
    );
    for (pid, uid) in agents {
        assert_eq!(uid, SANDBOX_HOST_UID, "agent {pid} runs as host uid {uid}");
    }
}
