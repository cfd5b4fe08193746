//! The OCI runtime `config.json` of a Hearth container, hardened by default: a user namespace
//! mapping only the container's user (uid/gid 1000) to one unprivileged host id, no capabilities
//! at all, `noNewPrivileges`, a seccomp deny-list, the image read-only, its own pid, net (no
//! interface but loopback), ipc, uts and mount namespaces, `/proc` with the usual masked and
//! read-only paths, no `/sys`, and nothing of the host but the listed binds.
//!
//! Left out on purpose, because crun/runc cannot apply them on the hosts Hearth targets (see
//! docs/ARCHITECTURE.md): `rlimits` (setrlimit of NOFILE/NPROC is refused in a user namespace
//! there) and a cgroup namespace; limits are Hearth's own cgroups, entered before the runtime.

use serde_json::{Value, json};

use super::INNER_ID;
use super::runtime::RunSpec;

/// Syscalls the default seccomp profile refuses with `EPERM` (the same list the agent's own
/// `--sandbox` filter refuses, so the container is confined before the agent starts). Device
/// nodes are refused by the agent's filter (by argument: FIFOs stay allowed) and by the missing
/// `CAP_MKNOD`.
pub const DENIED_SYSCALLS: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "perf_event_open",
    "userfaultfd",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "acct",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    "fsopen",
    "fsmount",
    "fsconfig",
    "move_mount",
    "open_tree",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "pidfd_getfd",
    "kcmp",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "iopl",
    "ioperm",
];

/// The default `linux.seccomp` object (`[oci] seccomp` replaces it with a file's).
pub fn default_seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{
            "names": DENIED_SYSCALLS,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
        }],
    })
}

/// The `config.json` running `spec`.
pub fn config_json(spec: &RunSpec) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "noexec", "strictatime", "mode=755", "size=65536k"]}),
    ];
    for (dir, size) in &spec.tmpfs {
        let mut options = vec![
            "nosuid".to_owned(),
            "nodev".to_owned(),
            "mode=1777".to_owned(),
        ];
        if *size > 0 {
            options.push(format!("size={size}"));
        }
        mounts.push(
            json!({"destination": dir, "type": "tmpfs", "source": "tmpfs",
                           "options": options}),
        );
    }
    for bind in &spec.binds {
        let mode = if bind.writable { "rw" } else { "ro" };
        mounts.push(json!({
            "destination": bind.container,
            "type": "bind",
            "source": bind.host,
            "options": ["rbind", mode, "nosuid", "nodev"],
        }));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": INNER_ID, "gid": INNER_ID},
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "noNewPrivileges": true,
            "capabilities": {
                "bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []
            },
        },
        "root": {"path": spec.rootfs, "readonly": true},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": INNER_ID, "hostID": spec.host_uid, "size": 1}],
            "gidMappings": [{"containerID": INNER_ID, "hostID": spec.host_gid, "size": 1}],
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "user"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ],
            "seccomp": spec.seccomp,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::runtime::Bind;
    use super::*;

    #[test]
    fn the_config_is_hardened_by_default() {
        let spec = RunSpec {
            uid: "u".into(),
            rootfs: "/cache/x/rootfs".into(),
            hostname: "vm-1".into(),
            args: vec!["/.hearth/init".into()],
            env: vec![],
            cwd: "/workspace".into(),
            binds: vec![
                Bind {
                    host: "/data/vms/a/volume".into(),
                    container: "/workspace".into(),
                    writable: true,
                },
                Bind {
                    host: "/usr/lib/hearth/agent".into(),
                    container: "/.hearth/agent".into(),
                    writable: false,
                },
            ],
            tmpfs: vec![("/tmp".into(), 0)],
            host_uid: 100_000,
            host_gid: 100_001,
            seccomp: default_seccomp(),
            bundle: "/b".into(),
        };
        let c = config_json(&spec);
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["process"]["user"]["uid"], 1000);
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            assert_eq!(c["process"]["capabilities"][set], json!([]), "{set}");
        }
        assert!(c["process"].get("rlimits").is_none());
        let namespaces: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for ns in ["pid", "network", "ipc", "uts", "mount", "user"] {
            assert!(namespaces.contains(&ns), "{ns}");
        }
        assert!(!namespaces.contains(&"cgroup"));
        assert!(
            c["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n.get("path").is_none()),
            "no host namespace is joined"
        );
        assert_eq!(
            c["linux"]["uidMappings"],
            json!([{"containerID": 1000, "hostID": 100000, "size": 1}])
        );
        assert_eq!(c["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        let writable: Vec<&str> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                m["type"] == "bind" && m["options"].as_array().unwrap().contains(&json!("rw"))
            })
            .map(|m| m["source"].as_str().unwrap())
            .collect();
        assert_eq!(writable, ["/data/vms/a/volume"], "one writable bind");
        assert!(
            c["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["destination"] != "/sys"),
            "no /sys"
        );
    }
}
