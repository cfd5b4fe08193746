//! Sandbox networking for the process provider: none by default, or `egress` through slirp4netns
//! (a user-mode TCP/IP stack) with everything on the host itself blocked.
//!
//! A sandbox always has its own, empty network namespace. [`Egress::attach`] (run by the root
//! worker) gives it a `tap0` backed by slirp4netns, whose sockets live in the host's namespace,
//! and first walls off what the sandbox must never reach through it:
//!
//! - **prohibit routes inside the sandbox's namespace**, installed *before* slirp4netns brings
//!   `tap0` up (so there is no window with an open route): `0.0.0.0/8`, `127.0.0.0/8` (the
//!   namespace's own `lo` still works: the `local` table is consulted first), slirp's gateway
//!   `10.0.2.2` (an alias of the host), `169.254.0.0/16` (link-local, cloud metadata),
//!   `100.100.100.200/32` (Alibaba's metadata), every address of every host interface at attach
//!   time (v4 /32, v6 /128), `fe80::/10`, `fd00:ec2::254/128` and the configured extras. The DNS
//!   alias `10.0.2.3` forwards *any* port to the host's first resolver, so it stays reachable only
//!   when every `nameserver` in `/etc/resolv.conf` is an ordinary outside address; otherwise it
//!   is blocked and slirp4netns runs with `--disable-dns`;
//! - **IPv6 off** in the namespace (`disable_ipv6` on `default`, hence on `tap0`), and slirp4netns
//!   runs without `--enable-ipv6`;
//! - slirp4netns's own `--disable-host-loopback` (so `10.0.2.2` never maps to the host's
//!   loopback, even for a socket bound to `tap0`, which skips a failed route lookup and assumes
//!   the destination is on-link; slirp answers ARP only for its own aliases, so that trick reaches
//!   nothing else), plus `--enable-sandbox --enable-seccomp` to confine slirp4netns itself.
//!
//! The sandbox's processes hold no capability over their namespace (bwrap's `--uid 1000` in a user
//! namespace, `--disable-userns`), so they cannot remove the routes or re-enable IPv6.
//!
//! Lifetime: the tap file descriptor held by slirp4netns keeps the namespace alive, so slirp4netns
//! would never notice the sandbox dying. [`Egress`] therefore supervises it: slirp4netns's stdin is
//! its `--exit-fd` (closed when the [`Egress`] is dropped or the worker dies), a task checks every
//! [`WATCH_INTERVAL`] that the sandbox's namespace still exists and kills slirp4netns when it does
//! not, and the child is `kill_on_drop`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::provider::ProviderError;

/// The interface slirp4netns creates in the sandbox.
const TAP: &str = "tap0";
/// slirp4netns's gateway: an alias of the host.
const SLIRP_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// slirp4netns's DNS alias: forwards to the host's first resolver.
const SLIRP_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// How long slirp4netns may take to bring `tap0` up.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for bwrap's child (the process in the sandbox's namespaces) to appear.
const INIT_PID_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the supervisor checks that the sandbox still exists.
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_millis(200);

pub use crate::provider::NetworkMode;

/// An address block (`10.0.0.0/8`, `fd00::/8`, or a bare address meaning /32 or /128), checked
/// when parsed so a bad entry fails at config load, not at attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`; `None` if the prefix is too long for the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// One address.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// Whether `ip` is inside this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|e| format!("{s:?} is not an address block: {e}"))?;
        match prefix {
            None => Ok(Cidr::host(addr)),
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .and_then(|p| Cidr::new(addr, p))
                .ok_or_else(|| format!("{s:?} has a bad prefix length")),
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Cidr, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The `[process.egress]` table: how egress sandboxes get their network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// The slirp4netns binary (1.x; `--netns-type=path`, `--disable-host-loopback`).
    pub slirp4netns: PathBuf,
    /// MTU of the sandbox's `tap0`; slirp4netns accepts up to 65521, and large values are much
    /// faster than Ethernet's 1500 because slirp copies per packet.
    pub mtu: u32,
    /// Blocks the sandbox must not reach on top of the built-in list (e.g. the datacentre's
    /// private ranges), as `"10.0.0.0/8"`, `"fd00::/8"` or a bare address.
    pub extra_blocked: Vec<Cidr>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            slirp4netns: PathBuf::from("/usr/bin/slirp4netns"),
            mtu: 65520,
            extra_blocked: Vec::new(),
        }
    }
}

/// What [`Egress::attach`] blocked, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Every block with a prohibit route in the sandbox's namespace.
    pub routes: Vec<Cidr>,
    /// Whether slirp's DNS alias `10.0.2.3` is reachable (the host's resolvers are all outside
    /// addresses).
    pub dns: bool,
}

/// A sandbox's slirp4netns, supervised: killed when dropped or stopped, and when the sandbox dies.
#[derive(Debug)]
pub struct Egress {
    slirp_pid: u32,
    target_pid: u32,
    blocked: Blocked,
    /// slirp4netns's `--exit-fd`: closing it makes slirp4netns exit by itself (also when the
    /// worker dies, where `kill_on_drop` cannot help).
    exit_fd: Option<ChildStdin>,
    /// Held while slirp4netns should run: sending on it, or dropping it, ends the supervisor.
    #[cfg_attr(not(test), allow(dead_code))]
    stop: Option<oneshot::Sender<()>>,
    /// Owns the child (`kill_on_drop`); aborted on drop.
    supervisor: Option<JoinHandle<()>>,
}

impl Egress {
    /// Checks that `slirp4netns` (and `nsenter`, `ip`, `sysctl`, which attach also runs) work here.
    pub fn probe(slirp4netns: &Path) -> Result<(), String> {
        let check = |program: &Path, arg: &str| -> Result<(), String> {
            let out = std::process::Command::new(program)
                .arg(arg)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{} {arg} exited with {}: {}",
                    program.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        check(slirp4netns, "--version")?;
        check(Path::new("nsenter"), "--version")?;
        check(Path::new("ip"), "-V")?;
        check(Path::new("sysctl"), "--version")
    }

    /// Gives the network namespace of `target_pid` (a process inside the sandbox, see
    /// [`sandbox_init_pid`]) outbound access, with the host blocked as the module doc says.
    /// Refuses a process in the worker's own namespace. On error nothing keeps running.
    pub async fn attach(target_pid: u32, config: &EgressConfig) -> Result<Egress, ProviderError> {
        let netns_path = PathBuf::from(format!("/proc/{target_pid}/ns/net"));
        let netns = netns_inode(&netns_path).map_err(|e| {
            ProviderError::io(format!("reading the namespace of pid {target_pid}"), e)
        })?;
        let own = netns_inode(Path::new("/proc/self/ns/net"))
            .map_err(|e| ProviderError::io("reading the worker's network namespace", e))?;
        if netns == own {
            return Err(ProviderError::InvalidArgument(format!(
                "pid {target_pid} is in the worker's own network namespace"
            )));
        }

        let host = host_addresses().await?;
        let resolvers = std::fs::read_to_string("/etc/resolv.conf")
            .map(|text| nameservers(&text))
            .unwrap_or_default();
        let blocked = blocklist(&host, &resolvers, &config.extra_blocked);

        // Walls first: nothing is routable through tap0 before these exist.
        let mut batch = String::new();
        for cidr in &blocked.routes {
            batch.push_str(&format!("route add prohibit {cidr}\n"));
        }
        in_netns(target_pid, &["ip", "-batch", "-"], Some(&batch)).await?;
        // `default` is what tap0 inherits when slirp creates it; `all` would also take ::1 from lo.
        in_netns(
            target_pid,
            &["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"],
            None,
        )
        .await?;

        let mut cmd = Command::new(&config.slirp4netns);
        cmd.arg("--configure")
            .arg(format!("--mtu={}", config.mtu))
            .arg("--disable-host-loopback")
            .arg("--enable-sandbox")
            .arg("--enable-seccomp")
            .arg("--exit-fd=0")
            .arg("--ready-fd=1");
        if !blocked.dns {
            cmd.arg("--disable-dns");
        }
        // The path form: the pid form joins the sandbox's user namespace first, which owns
        // nothing over the namespace bwrap made (setns fails with EPERM).
        cmd.arg("--netns-type=path")
            .arg(&netns_path)
            .arg(TAP)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProviderError::Unavailable(format!(
                "{} not found (install slirp4netns for network = \"egress\")",
                config.slirp4netns.display()
            )),
            _ => ProviderError::io(format!("starting {}", config.slirp4netns.display()), e),
        })?;
        let slirp_pid = child.id().unwrap_or_default();
        let exit_fd = child.stdin.take();
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        if let Err(e) = wait_ready(&mut stdout, &mut child).await {
            let _ = child.start_kill();
            let mut log = String::new();
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                BufReader::new(stderr).read_to_string(&mut log),
            )
            .await;
            return Err(match e {
                ProviderError::CommandFailed(msg) => {
                    ProviderError::CommandFailed(format!("{msg}: {}", log.trim()))
                }
                other => other,
            });
        }
        // Belt and braces: the routes are still there and tap0 came up without IPv6.
        let v6 = in_netns(
            target_pid,
            &["sysctl", "-n", &format!("net.ipv6.conf.{TAP}.disable_ipv6")],
            None,
        )
        .await?;
        if v6.trim() != "1" {
            let _ = child.start_kill();
            return Err(ProviderError::CommandFailed(format!(
                "IPv6 is still on for {TAP} in the sandbox (disable_ipv6 = {})",
                v6.trim()
            )));
        }

        let (stop_tx, stop_rx) = oneshot::channel();
        let supervisor = tokio::spawn(supervise(child, stdout, stderr, stop_rx, target_pid, netns));
        debug!(target_pid, slirp_pid, dns = blocked.dns, "egress attached");
        Ok(Egress {
            slirp_pid,
            target_pid,
            blocked,
            exit_fd,
            stop: Some(stop_tx),
            supervisor: Some(supervisor),
        })
    }

    /// slirp4netns's pid (for tests and diagnostics).
    pub fn slirp_pid(&self) -> u32 {
        self.slirp_pid
    }

    /// The sandbox process whose namespace this serves.
    pub fn target_pid(&self) -> u32 {
        self.target_pid
    }

    /// What was blocked at attach.
    pub fn blocked(&self) -> &Blocked {
        &self.blocked
    }

    /// Ends slirp4netns and waits (briefly) until it is reaped. (The provider just drops an
    /// `Egress`; waiting is for tests.)
    #[cfg(test)]
    pub async fn stop(mut self) {
        self.exit_fd.take();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.supervisor.take()
            && tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
        {
            tracing::warn!(
                slirp_pid = self.slirp_pid,
                "slirp4netns did not stop in time"
            );
        }
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        // EOF on --exit-fd makes slirp4netns exit at once; aborting the supervisor drops the
        // child, whose kill_on_drop covers a slirp4netns that ignores it.
        self.exit_fd.take();
        if let Some(task) = self.supervisor.take() {
            task.abort();
        }
    }
}

/// The host pid of the process inside the sandbox's namespaces: bwrap's child (bwrap itself is
/// in the host's). `outer_bwrap_pid` is the pid the worker spawned (setpriv and env `exec` into
/// bwrap, so it is bwrap's). Waits up to [`INIT_PID_TIMEOUT`] for it to appear; `None` if it does
/// not or bwrap is gone.
pub async fn sandbox_init_pid(outer_bwrap_pid: u32) -> Option<u32> {
    let path = format!("/proc/{outer_bwrap_pid}/task/{outer_bwrap_pid}/children");
    let deadline = Instant::now() + INIT_PID_TIMEOUT;
    loop {
        let text = tokio::fs::read_to_string(&path).await.ok()?;
        if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return Some(pid);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for slirp4netns's ready byte: a `1` at the start of a line of its stdout (it also prints
/// a seccomp warning there).
async fn wait_ready(
    stdout: &mut tokio::process::ChildStdout,
    child: &mut Child,
) -> Result<(), ProviderError> {
    let read = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|e| ProviderError::io("reading slirp4netns's ready fd", e))?;
            if n == 0 {
                let status = child.wait().await.ok();
                return Err(ProviderError::CommandFailed(format!(
                    "slirp4netns exited before the network was up ({})",
                    status.map_or_else(|| "status unknown".into(), |s| s.to_string())
                )));
            }
            seen.extend_from_slice(&buf[..n]);
            if seen
                .split(|b| *b == b'\n')
                .any(|line| line.first() == Some(&b'1'))
            {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(READY_TIMEOUT, read)
        .await
        .map_err(|_| {
            ProviderError::Timeout(format!(
                "slirp4netns did not bring {TAP} up within {READY_TIMEOUT:?}"
            ))
        })?
}

/// Owns slirp4netns until asked to stop, until it exits, or until the sandbox's namespace is gone.
async fn supervise(
    mut child: Child,
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    mut stop: oneshot::Receiver<()>,
    target_pid: u32,
    netns: u64,
) {
    let netns_path = PathBuf::from(format!("/proc/{target_pid}/ns/net"));
    let mut out = BufReader::new(stdout).lines();
    let mut err = BufReader::new(stderr).lines();
    let (mut out_open, mut err_open) = (true, true);
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            status = child.wait() => {
                debug!(target_pid, ?status, "slirp4netns exited");
                return;
            }
            line = out.next_line(), if out_open => match line {
                Ok(Some(line)) => debug!(target_pid, "slirp4netns: {line}"),
                _ => out_open = false,
            },
            line = err.next_line(), if err_open => match line {
                Ok(Some(line)) => debug!(target_pid, "slirp4netns: {line}"),
                _ => err_open = false,
            },
            _ = tick.tick() => {
                // A reused pid shows another namespace: that counts as gone too.
                if netns_inode(&netns_path).ok() != Some(netns) {
                    debug!(target_pid, "sandbox gone; stopping slirp4netns");
                    break;
                }
            }
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

fn netns_inode(path: &Path) -> std::io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

/// Runs `argv` as root inside `pid`'s network namespace only (the worker's mounts, so the host's
/// `ip`/`sysctl`), feeding `stdin`; returns stdout.
async fn in_netns(pid: u32, argv: &[&str], stdin: Option<&str>) -> Result<String, ProviderError> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={pid}"))
        .arg("--net")
        .arg("--")
        .args(argv)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("nsenter --target={pid} --net {}", argv.join(" "));
    let mut child = cmd
        .spawn()
        .map_err(|e| ProviderError::io(format!("running {what}"), e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| ProviderError::io(format!("writing to {what}"), e))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| ProviderError::Timeout(format!("{what} did not finish within 10 s")))?
        .map_err(|e| ProviderError::io(format!("running {what}"), e))?;
    if !out.status.success() {
        return Err(ProviderError::CommandFailed(format!(
            "{what} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every address on every interface of the worker's network namespace (`ip -j address show`).
async fn host_addresses() -> Result<Vec<IpAddr>, ProviderError> {
    let out = Command::new("ip")
        .args(["-j", "address", "show"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ProviderError::io("running ip -j address show", e))?;
    if !out.status.success() {
        return Err(ProviderError::CommandFailed(format!(
            "ip -j address show exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_ip_json(&out.stdout)
        .map_err(|e| ProviderError::CommandFailed(format!("cannot read the host's addresses: {e}")))
}

fn parse_ip_json(json: &[u8]) -> Result<Vec<IpAddr>, String> {
    let links: Vec<serde_json::Value> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let mut addrs = Vec::new();
    for link in &links {
        for info in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(addr) = info["local"].as_str().and_then(|a| a.parse().ok()) {
                addrs.push(addr);
            }
        }
    }
    Ok(addrs)
}

/// The `nameserver` lines of a resolv.conf.
fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// The full list of prohibit routes, and whether the DNS alias may stay open.
fn blocklist(host: &[IpAddr], resolvers: &[IpAddr], extra: &[Cidr]) -> Blocked {
    let v4 = |a, b, c, d, p| Cidr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), p).expect("valid");
    let v6 = |s: &str, p| Cidr::new(IpAddr::V6(s.parse::<Ipv6Addr>().expect("valid")), p);
    let mut routes = vec![
        v4(0, 0, 0, 0, 8),
        v4(127, 0, 0, 0, 8),
        Cidr::host(IpAddr::V4(SLIRP_GATEWAY)),
        v4(169, 254, 0, 0, 16),
        v4(100, 100, 100, 200, 32),
        v6("fe80::", 10).expect("valid"),
        v6("fd00:ec2::254", 128).expect("valid"),
    ];
    for addr in host {
        // The v6 loopback is not routable off-host anyway, and `::1/128` in the main table would
        // clash with the namespace's own lo.
        if !addr.is_loopback() {
            routes.push(Cidr::host(*addr));
        }
    }
    routes.extend_from_slice(extra);
    let dns = !resolvers.is_empty()
        && resolvers.iter().all(|r| {
            !r.is_loopback() && !r.is_unspecified() && !routes.iter().any(|c| c.contains(*r))
        });
    if !dns {
        routes.push(Cidr::host(IpAddr::V4(SLIRP_DNS)));
    }
    let mut seen = std::collections::HashSet::new();
    routes.retain(|c| seen.insert(*c));
    Blocked { routes, dns }
}

#[cfg(test)]
mod tests;
