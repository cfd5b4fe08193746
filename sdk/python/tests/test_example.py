"""The code-interpreter example, run as a user would: against `hearth up` (the one-command
local stack), printing its result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stack import hearth_up

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "code_interpreter.py"


def test_code_interpreter_example_against_hearth_up(capsys: pytest.CaptureFixture[str]) -> None:
    with hearth_up(pool=2) as url:
        run = subprocess.run(
            [sys.executable, str(EXAMPLE), "--url", url], capture_output=True, text=True,
            timeout=120,
        )
    with capsys.disabled():
        print("\n--- examples/code_interpreter.py against hearth up:")
        print(run.stdout, run.stderr, sep="")
    assert run.returncode == 0, run.stderr
    assert '"session_after_close": "released"' in run.stdout
