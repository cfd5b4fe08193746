"""The code-interpreter example, run as a user would: against `hearth up` (the one-command
local stack), printing its result."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, _binary
from hearth_sandbox import Hearth

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "code_interpreter.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_code_interpreter_example_against_hearth_up(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="hearth-up-"))
    root.chmod(0o755)
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    log = open(root / "hearth-up.log", "wb")
    up = subprocess.Popen(
        [str(_binary("hearth")), "up", "--data-dir", str(root / "data"), "--nats-port",
         str(port), "--pool", "2", "--metrics-listen", "off"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = False
        while not ready and time.monotonic() < deadline:
            assert up.poll() is None, (root / "hearth-up.log").read_text()
            try:
                with Hearth.connect(url, connect_timeout_s=1, max_reconnect_attempts=0) as h:
                    ready = any(p.template == "default" and p.ready > 0 for p in h.pools.status())
            except Exception:
                pass
            if not ready:
                time.sleep(0.2)
        assert ready, (root / "hearth-up.log").read_text()[-3000:]
        run = subprocess.run(
            [sys.executable, str(EXAMPLE), "--url", url], capture_output=True, text=True,
            timeout=120, env={**os.environ},
        )
        with capsys.disabled():
            print("\n--- examples/code_interpreter.py against hearth up:")
            print(run.stdout, run.stderr, sep="")
        assert run.returncode == 0, run.stderr
        assert '"session_after_close": "released"' in run.stdout
    finally:
        up.terminate()
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
        subprocess.run(
            ["sh", "-c", f"grep -o ' {root}/[^ ]*' /proc/self/mounts | xargs -r -n1 umount -l"],
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)
