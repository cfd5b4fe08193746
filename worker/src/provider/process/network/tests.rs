//! Tests for sandbox networking: config parsing and the block list everywhere; as root, real
//! hardened bwrap sandboxes with slirp4netns attached, attacked from inside. Every probe is bounded
//! by a few seconds and aimed only at loopback, the host's own addresses (which must fail) or a
//! [`TestHost`] the test made.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hearth_testkit::netns::TestHost;
use serde_json::{Value, json};

use super::*;

#[test]
fn network_mode_parses_and_defaults_to_none() {
    #[derive(Deserialize)]
    struct T {
        #[serde(default)]
        network: NetworkMode,
    }
    let t: T = toml::from_str("").unwrap();
    assert_eq!(t.network, NetworkMode::None);
    let t: T = toml::from_str("network = \"egress\"").unwrap();
    assert_eq!(t.network, NetworkMode::Egress);
    assert_eq!(t.network.as_str(), "egress");
    assert!(toml::from_str::<T>("network = \"host\"").is_err());
}

#[test]
fn egress_config_has_defaults_and_rejects_unknown_fields_and_bad_blocks() {
    let c: EgressConfig = toml::from_str("").unwrap();
    assert_eq!(c, EgressConfig::default());
    assert_eq!(c.slirp4netns, PathBuf::from("/usr/bin/slirp4netns"));
    assert_eq!(c.mtu, 65520);
    let c: EgressConfig =
        toml::from_str("mtu = 1500\nextra_blocked = [\"10.0.0.0/8\", \"fd00::1\"]").unwrap();
    assert_eq!(c.extra_blocked[0].to_string(), "10.0.0.0/8");
    assert_eq!(c.extra_blocked[1].to_string(), "fd00::1/128");
    assert!(toml::from_str::<EgressConfig>("mtu = 1500\nport = 1").is_err());
    assert!(toml::from_str::<EgressConfig>("extra_blocked = [\"10.0.0.0/33\"]").is_err());
    assert!(toml::from_str::<EgressConfig>("extra_blocked = [\"example.com\"]").is_err());
}

#[test]
fn cidr_contains() {
    let c: Cidr = "169.254.0.0/16".parse().unwrap();
    assert!(c.contains("169.254.169.254".parse().unwrap()));
    assert!(!c.contains("169.253.0.1".parse().unwrap()));
    assert!(!c.contains("fe80::1".parse().unwrap()));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("8.8.8.8".parse().unwrap()));
    let v6: Cidr = "fe80::/10".parse().unwrap();
    assert!(v6.contains("febf::1".parse().unwrap()));
    assert!(!v6.contains("fec0::1".parse().unwrap()));
}

#[test]
fn blocklist_covers_the_host_and_opens_dns_only_for_outside_resolvers() {
    let host: Vec<IpAddr> = ["127.0.0.1", "192.0.2.2", "fd00::2", "::1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let extra = vec!["10.0.0.0/8".parse().unwrap()];
    let outside = blocklist(&host, &["9.9.9.9".parse().unwrap()], &extra);
    let routes: Vec<String> = outside.routes.iter().map(ToString::to_string).collect();
    for want in [
        "127.0.0.0/8",
        "10.0.2.2/32",
        "169.254.0.0/16",
        "192.0.2.2/32",
        "fd00::2/128",
        "fe80::/10",
        "10.0.0.0/8",
    ] {
        assert!(
            routes.iter().any(|r| r == want),
            "{want} missing: {routes:?}"
        );
    }
    assert!(!routes.iter().any(|r| r == "::1/128"));
    assert!(outside.dns);
    assert!(!routes.iter().any(|r| r == "10.0.2.3/32"));
    // A loopback resolver (systemd-resolved, dnsmasq) or one on the host, a blocked range or
    // none at all closes the DNS alias: it forwards any port, not just 53.
    for resolvers in [
        vec!["127.0.0.53".parse().unwrap()],
        vec!["192.0.2.2".parse().unwrap()],
        vec!["10.1.2.3".parse().unwrap()],
        vec!["9.9.9.9".parse().unwrap(), "::1".parse().unwrap()],
        vec![],
    ] {
        let b = blocklist(&host, &resolvers, &extra);
        assert!(!b.dns, "{resolvers:?}");
        assert!(b.routes.contains(&"10.0.2.3".parse().unwrap()));
    }
}

#[test]
fn reads_nameservers_and_ip_json() {
    let r = nameservers("# x\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nsearch a\n");
    assert_eq!(
        r,
        vec![
            "10.255.255.53".parse::<IpAddr>().unwrap(),
            "fe80::1".parse().unwrap()
        ]
    );
    let json = br#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1"}]},
        {"ifname":"eth0","addr_info":[{"family":"inet","local":"192.0.2.2"},{"family":"inet6","local":"fd00::2"}]}]"#;
    let addrs = parse_ip_json(json).unwrap();
    assert_eq!(addrs.len(), 3);
}

#[tokio::test]
async fn attach_refuses_the_workers_own_namespace() {
    let err = Egress::attach(std::process::id(), &EgressConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProviderError::InvalidArgument(_) | ProviderError::Io { .. }
        ),
        "{err:?}"
    );
}

// ---- real sandboxes (root) ----

/// Why the sandbox tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(str::to_owned))
        });
    if euid.as_deref() != Some("0") {
        return Some("needs root".into());
    }
    for tool in ["/usr/bin/bwrap", "/usr/bin/setpriv", "/usr/bin/python3"] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} missing"));
        }
    }
    Egress::probe(&EgressConfig::default().slirp4netns).err()
}

/// Runs the probe list in `/workspace/probes.json` once `/workspace/go` exists, writes the results
/// to `/workspace/result.json`. Every probe has its own timeout.
const PROBE_PY: &str = r#"
import json, os, socket, subprocess, time, urllib.request
def run(p):
    t = time.monotonic()
    r = {"name": p["name"]}
    try:
        if p["kind"] == "http":
            r["body"] = urllib.request.urlopen(p["url"], timeout=5).read().decode()
            r["ok"] = True
        elif p["kind"] == "tcp":
            fam = socket.AF_INET6 if ":" in p["host"] else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(p.get("timeout", 3))
            if p.get("dev"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, p["dev"].encode())
            s.connect((p["host"], p["port"]))
            s.close()
            r["ok"] = True
        elif p["kind"] == "cmd":
            c = subprocess.run(p["argv"], capture_output=True, timeout=5)
            r["ok"] = c.returncode == 0
            r["err"] = (c.stdout + c.stderr).decode(errors="replace")
    except Exception as e:
        r["ok"] = False
        r["err"] = repr(e)
    r["secs"] = time.monotonic() - t
    return r
probes = json.load(open("probes.json"))
out = [run(p) for p in probes]
json.dump(out, open("result.tmp", "w"))
os.rename("result.tmp", "result.json")
"#;

/// A hardened bwrap sandbox exactly as the process provider starts it, running the probe script
/// when told; killed on drop.
struct Sandbox {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn start() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(100_000), Some(100_000)).unwrap();
        std::fs::write(dir.path().join("probe.py"), PROBE_PY).unwrap();
        let child = Command::new("setpriv")
            .args(["--reuid", "100000", "--regid", "100000", "--clear-groups"])
            .args(["--inh-caps=-all", "--", "env", "-i", "bwrap"])
            .args([
                "--unshare-all",
                "--unshare-user",
                "--uid",
                "1000",
                "--gid",
                "1000",
            ])
            .args(["--disable-userns", "--die-with-parent", "--new-session"])
            .args(["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin"])
            .args([
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
            ])
            .args([
                "--symlink",
                "usr/sbin",
                "/sbin",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
            ])
            .args(["--tmpfs", "/tmp", "--bind"])
            .arg(dir.path())
            .args(["/workspace", "--chdir", "/workspace", "--hostname", "H"])
            .args(["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--"])
            .args([
                "sh",
                "-c",
                "while [ ! -e go ]; do sleep 0.05; done; python3 probe.py; exec sleep 60",
            ])
            .spawn()
            .unwrap();
        Sandbox {
            child: Some(child),
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Runs `probes` inside the sandbox and returns one result object per probe.
    fn probe(&self, probes: &Value) -> Vec<Value> {
        let ws = self.dir.path();
        std::fs::write(ws.join("probes.json"), probes.to_string()).unwrap();
        std::fs::write(ws.join("go"), "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(ws.join("result.json")) {
                return serde_json::from_str(&text).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "the probes did not finish in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // bwrap's init does not die with bwrap (entering its user namespace cleared its
            // parent-death signal): kill it, and the pid namespace with it.
            let pid = child.id();
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            {
                for init in children.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", init]).status();
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(") ").next().map(|rest| !rest.starts_with('Z')))
        .unwrap_or(false)
}

async fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !alive(pid)
}

fn result<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no result {name}: {results:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_the_outside_but_nothing_on_the_host() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    let Some(remote) = TestHost::start() else {
        return;
    };
    // Something on the host that a sandbox must never reach: every address, v4 and v6.
    let listener = TcpListener::bind("[::]:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let sandbox = Sandbox::start();
    let init = sandbox_init_pid(sandbox.pid())
        .await
        .expect("bwrap's child");
    let started = Instant::now();
    let egress = Egress::attach(init, &EgressConfig::default())
        .await
        .unwrap();
    eprintln!(
        "attach took {:?} (blocked {} routes, dns {})",
        started.elapsed(),
        egress.blocked().routes.len(),
        egress.blocked().dns
    );
    assert!(alive(egress.slirp_pid()));

    let host_addrs: Vec<IpAddr> = host_addresses()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| {
            !a.is_loopback() && !matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
        })
        .collect();
    assert!(
        host_addrs
            .iter()
            .any(|a| *a == IpAddr::V4(remote.host_side_addr()))
    );
    let first_v4 = host_addrs.iter().find(|a| a.is_ipv4()).unwrap().to_string();

    let mut probes = vec![
        json!({"name": "remote", "kind": "http", "url": remote.url()}),
        json!({"name": "loopback", "kind": "tcp", "host": "127.0.0.1", "port": port}),
        json!({"name": "gateway", "kind": "tcp", "host": "10.0.2.2", "port": port}),
        json!({"name": "metadata", "kind": "tcp", "host": "169.254.169.254", "port": 80}),
        json!({"name": "metadata-ali", "kind": "tcp", "host": "100.100.100.200", "port": 80}),
        json!({"name": "ll6", "kind": "tcp", "host": "fe80::1", "port": port}),
        // A socket bound to tap0 skips a failed route lookup and tries the destination on-link.
        json!({"name": "dev-gateway", "kind": "tcp", "host": "10.0.2.2", "port": port, "dev": "tap0", "timeout": 4}),
        json!({"name": "dev-host", "kind": "tcp", "host": first_v4, "port": port, "dev": "tap0", "timeout": 4}),
        json!({"name": "route-del", "kind": "cmd", "argv": ["/usr/sbin/ip", "route", "del", "prohibit", "10.0.2.2/32"]}),
        json!({"name": "route-add", "kind": "cmd", "argv": ["/usr/sbin/ip", "route", "add", format!("{first_v4}/32"), "via", "10.0.2.2"]}),
        json!({"name": "flush", "kind": "cmd", "argv": ["/usr/sbin/ip", "route", "flush", "type", "prohibit"]}),
        json!({"name": "ipv6-on", "kind": "cmd", "argv": ["sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/tap0/disable_ipv6"]}),
        json!({"name": "remote-after", "kind": "http", "url": remote.url()}),
    ];
    for (i, addr) in host_addrs.iter().enumerate() {
        probes.push(json!({"name": format!("host-{i}"), "kind": "tcp", "host": addr.to_string(), "port": port}));
    }
    let results = sandbox.probe(&Value::Array(probes));
    eprintln!("{}", serde_json::to_string_pretty(&results).unwrap());

    for name in ["remote", "remote-after"] {
        let r = result(&results, name);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["body"], remote.content(), "{r}");
    }
    let mut refused = vec![
        "loopback".to_string(),
        "gateway".into(),
        "metadata".into(),
        "metadata-ali".into(),
        "ll6".into(),
    ];
    refused.extend((0..host_addrs.len()).map(|i| format!("host-{i}")));
    for name in &refused {
        let r = result(&results, name);
        assert_eq!(r["ok"], false, "{name} was reachable: {r}");
        // An immediate error from the route (or lo), not a hang until the timeout.
        assert!(r["secs"].as_f64().unwrap() < 1.0, "{name} hung: {r}");
    }
    for name in ["dev-gateway", "dev-host"] {
        let r = result(&results, name);
        assert_eq!(r["ok"], false, "{name} was reachable: {r}");
    }
    for name in ["route-del", "route-add", "flush", "ipv6-on"] {
        let r = result(&results, name);
        assert_eq!(r["ok"], false, "{name} succeeded inside the sandbox: {r}");
    }
    // Nothing arrived at the host's listener, and the walls are still up.
    assert!(
        listener
            .accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection reached the host"
    );
    let routes = in_netns(init, &["ip", "route", "show", "type", "prohibit"], None)
        .await
        .unwrap();
    for want in ["10.0.2.2", "169.254.0.0/16", "127.0.0.0/8"] {
        assert!(routes.contains(want), "{want} gone: {routes}");
    }
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_without_egress_reaches_nothing() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    let Some(remote) = TestHost::start() else {
        return;
    };
    let sandbox = Sandbox::start();
    let results = sandbox.probe(&json!([
        {"name": "remote", "kind": "http", "url": remote.url()},
        {"name": "remote-tcp", "kind": "tcp", "host": remote.addr().to_string(), "port": 8080},
    ]));
    for r in &results {
        assert_eq!(r["ok"], false, "reachable without egress: {r}");
        assert!(r["secs"].as_f64().unwrap() < 1.0, "hung: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slirp_ends_with_the_egress_and_with_the_sandbox() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    let config = EgressConfig::default();

    // Dropping the Egress ends slirp4netns.
    let sandbox = Sandbox::start();
    let init = sandbox_init_pid(sandbox.pid()).await.unwrap();
    let egress = Egress::attach(init, &config).await.unwrap();
    let slirp = egress.slirp_pid();
    assert!(alive(slirp));
    drop(egress);
    assert!(
        gone_within(slirp, Duration::from_secs(2)).await,
        "slirp4netns outlived its Egress"
    );

    // stop() ends it too, and waits for it.
    let egress = Egress::attach(init, &config).await;
    // The namespace already has the walls from the first attach: a second attach must say so
    // rather than half-succeed.
    assert!(egress.is_err(), "a second attach to one sandbox succeeded");
    drop(sandbox);

    let sandbox = Sandbox::start();
    let init = sandbox_init_pid(sandbox.pid()).await.unwrap();
    let egress = Egress::attach(init, &config).await.unwrap();
    let slirp = egress.slirp_pid();
    egress.stop().await;
    assert!(!alive(slirp), "stop() returned with slirp4netns running");
    drop(sandbox);

    // Killing the sandbox ends slirp4netns while the Egress is still held.
    let mut sandbox = Sandbox::start();
    let init = sandbox_init_pid(sandbox.pid()).await.unwrap();
    let egress = Egress::attach(init, &config).await.unwrap();
    let slirp = egress.slirp_pid();
    sandbox.kill();
    assert!(
        gone_within(slirp, WATCH_INTERVAL * 5).await,
        "slirp4netns outlived its sandbox"
    );
    drop(egress);
}
