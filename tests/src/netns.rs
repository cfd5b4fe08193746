//! A throwaway "remote host" for network tests: a network namespace of the test's own, joined to
//! the host by a veth pair on a random /30 inside 10.250.0.0/16, with a tiny HTTP server (Python's
//! `http.server`) on the namespace side serving one file of known content.
//!
//! This is the only kind of non-loopback target the tests may send traffic to: it exists only on
//! this machine, inside namespaces the test made, and is deleted on drop. Needs root and `ip netns`;
//! [`TestHost::start`] returns `None` (with the reason printed) where they are missing, so tests can
//! skip instead of fail.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

/// Port the HTTP server listens on inside the namespace (the namespace is ours alone).
const HTTP_PORT: u16 = 8080;
/// Name of the file served, and its content.
const FILE_NAME: &str = "hello.txt";

/// A network namespace with an HTTP server reachable from the host's namespace; torn down on drop.
#[derive(Debug)]
pub struct TestHost {
    netns: String,
    host_veth: String,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
    content: String,
    server: Option<Child>,
    _dir: tempfile::TempDir,
}

impl TestHost {
    /// Creates the namespace, the veth pair and the server, and waits until the server answers.
    /// `None` (with the reason on stderr) when not root or `ip netns` does not work here; a failure
    /// after those checks is a panic, since it is a broken environment, not a missing one.
    pub fn start() -> Option<TestHost> {
        if let Some(reason) = unavailable_reason() {
            eprintln!("skipping: no test host ({reason})");
            return None;
        }
        let mut last = None;
        // A clash with another test's random subnet or name only costs a retry.
        for _ in 0..5 {
            match Self::try_start() {
                Ok(host) => return Some(host),
                Err(e) => last = Some(e),
            }
        }
        panic!(
            "cannot start a test host: {:#}",
            last.expect("tried at least once")
        );
    }

    fn try_start() -> Result<TestHost> {
        let seed = random_u32();
        let tag = format!("{:06x}", seed & 0xff_ffff);
        // 10.250.0.0/16 holds 16384 /30s; .1 is the host side, .2 the namespace side.
        let block = (seed >> 8) % 16384;
        let base = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + block * 4;
        let host_addr = Ipv4Addr::from(base + 1);
        let addr = Ipv4Addr::from(base + 2);
        if address_in_use(host_addr)? {
            bail!("{host_addr} is already in use");
        }
        let dir = tempfile::Builder::new()
            .prefix("hearth-testhost-")
            .tempdir()
            .context("creating the served directory")?;
        let content = format!("hearth test host {tag}\n");
        std::fs::write(dir.path().join(FILE_NAME), &content)?;

        let mut host = TestHost {
            netns: format!("hearth-test-{tag}"),
            host_veth: format!("hth{tag}h"),
            host_addr,
            addr,
            content,
            server: None,
            _dir: dir,
        };
        // From here on, Drop cleans up whatever was made.
        let peer = format!("hth{tag}n");
        ip(&["netns", "add", &host.netns])?;
        ip(&[
            "link",
            "add",
            &host.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &host.netns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &host.host_veth,
        ])?;
        ip(&["link", "set", &host.host_veth, "up"])?;
        let ns = host.netns.clone();
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        host.server = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(python3())
                .args(["-m", "http.server", &HTTP_PORT.to_string(), "--bind"])
                .arg(addr.to_string())
                .arg("--directory")
                .arg(host._dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the HTTP server")?,
        );
        host.wait_ready()?;
        Ok(host)
    }

    /// `http://<addr>:8080/hello.txt`.
    pub fn url(&self) -> String {
        format!("http://{}:{HTTP_PORT}/{FILE_NAME}", self.addr)
    }

    /// What [`url`](Self::url) serves.
    pub fn content(&self) -> &str {
        &self.content
    }

    /// The namespace side's address (where the server listens).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host side's address: one of the host's own addresses while this test host lives.
    pub fn host_side_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let target = SocketAddrV4::new(self.addr, HTTP_PORT);
        loop {
            if let Some(server) = self.server.as_mut()
                && let Some(status) = server.try_wait()?
            {
                bail!("the HTTP server exited with {status} before it answered");
            }
            if TcpStream::connect_timeout(&target.into(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the HTTP server on {target} did not answer within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        // Deleting one end of a veth pair deletes both; deleting the namespace would too, but the
        // host end is removed explicitly so nothing depends on the kernel's timing.
        let _ = ip(&["link", "del", &self.host_veth]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// Why a test host cannot be made here, if it cannot.
fn unavailable_reason() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("needs root".into());
    }
    match Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("`ip netns list` exited with {status}")),
        Err(e) => Some(format!("cannot run `ip`: {e}")),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        return Err(anyhow!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn address_in_use(addr: Ipv4Addr) -> Result<bool> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("running ip -o -4 addr show")?;
    let needle = format!(" {addr}/");
    Ok(String::from_utf8_lossy(&out.stdout).contains(&needle))
}

/// Debian's Python (the one under /usr, which sandboxes also see) if present, else `python3`.
fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Enough randomness to keep concurrent tests apart (no RNG crate needed for that).
fn random_u32() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut x = (nanos as u64)
        ^ (u64::from(std::process::id()) << 32)
        ^ u64::from(COUNTER.fetch_add(1, Ordering::Relaxed)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn serves_its_file_and_cleans_up() {
        let Some(host) = TestHost::start() else {
            return;
        };
        let mut stream = TcpStream::connect_timeout(
            &SocketAddrV4::new(host.addr(), HTTP_PORT).into(),
            Duration::from_secs(2),
        )
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET /{FILE_NAME} HTTP/1.0\r\nHost: {}\r\n\r\n",
            host.addr()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        assert!(reply.ends_with(host.content()), "{reply}");

        let netns = host.netns().to_owned();
        let host_addr = host.host_side_addr();
        drop(host);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&netns));
        assert!(!address_in_use(host_addr).unwrap());
    }
}
