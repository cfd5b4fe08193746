#!/usr/bin/env python3
"""A code-interpreter tool for any agent loop, on Hearth.

``CodeInterpreter`` gives one conversation one sandbox (a Hearth session, claimed on first use
from the warm pool and released by ``close()`` or ``with``). It exposes:

- ``run_python(code) -> {"stdout", "stderr", "exit_code", "timed_out"}``: the function-calling
  tool. Each call runs the code as a fresh ``python3`` process in the same session, so files
  persist between calls (variables do not: write what you need to a file);
- ``upload(path, data)`` / ``download(path)``: files in, results out;
- ``TOOL_SPEC``: the JSON schema to hand the model, and ``handle_tool_call(name, arguments)``,
  which takes the model's call (arguments as a dict or a JSON string) and returns the JSON string
  to give back.

The ``__main__`` part plays a scripted conversation (no LLM, no network beyond NATS): it uploads
a CSV, asks for a summary, makes the code write a file and downloads it, shows an exception and a
timeout, then prints every tool result as JSON. Run it against ``scripts/up``::

    pip install ./sdk/python
    python3 sdk/python/examples/code_interpreter.py --url nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import json
import sys
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, Type, Union

from hearth_sandbox import Hearth, HearthError, Session

#: What to show the model: the function it may call.
TOOL_SPEC: Dict[str, Any] = {
    "name": "run_python",
    "description": (
        "Run Python 3 code in a private sandbox and return its stdout, stderr and exit code. "
        "Files written in the current directory persist across calls in this conversation; "
        "variables do not. No network access."
    ),
    "parameters": {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "A complete Python program."}},
        "required": ["code"],
    },
}


class CodeInterpreter:
    """One sandbox per conversation; see the module docstring.

    Args:
        hearth: A connected client (share one per process).
        template: The Hearth template to claim from (it must have ``python3``).
        timeout_s: Wall-clock limit of one ``run_python`` call.
        max_output_chars: Output kept per stream for the model (the rest is cut, saying so).
        labels: Labels on the session (e.g. the conversation id) for ``sessions.list``.
    """

    def __init__(
        self,
        hearth: Hearth,
        *,
        template: str = "default",
        timeout_s: float = 30.0,
        max_output_chars: int = 20_000,
        labels: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._hearth = hearth
        self._template = template
        self._timeout_ms = int(timeout_s * 1000)
        self._max_chars = max_output_chars
        self._labels = dict(labels or {})
        self._session: Optional[Session] = None
        self._cells = 0

    @property
    def session(self) -> Session:
        """The conversation's session, claimed on first use."""
        if self._session is None:
            self._session = self._hearth.sessions.create(
                template=self._template,
                labels={"tool": "code_interpreter", **self._labels},
                # Stop the VM when the conversation goes quiet; the next call resumes it.
                idle_timeout_s=300,
                ttl_s=3600,
            )
        return self._session

    def run_python(self, code: str) -> Dict[str, Any]:
        """The tool: runs ``code`` and reports what happened. Never raises for the code's own
        failures (those are in ``stderr`` / ``exit_code``); raises :class:`HearthError` only when
        the sandbox itself failed."""
        if not isinstance(code, str):
            raise TypeError("code must be a str")
        self._cells += 1
        path = f".cells/cell_{self._cells}.py"
        self.session.files.write(path, code)
        result = self.session.exec(
            ["python3", "-u", path],
            timeout_ms=self._timeout_ms,
            max_output_bytes=4 * self._max_chars,
            env={"PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"},
        )
        stderr = self._clip(result.stderr_text, result.stderr_truncated)
        if result.timed_out:
            stderr += f"\n[killed: the code ran longer than {self._timeout_ms // 1000} s]"
        return {
            "stdout": self._clip(result.stdout_text, result.stdout_truncated),
            "stderr": stderr,
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
        }

    def upload(self, path: str, data: Union[bytes, str]) -> int:
        """Puts a file (e.g. the user's attachment) where the code can open it by ``path``."""
        return self.session.files.write(path, data)

    def download(self, path: str) -> bytes:
        """Fetches a file the code wrote."""
        return self.session.files.read(path)

    def handle_tool_call(self, name: str, arguments: Union[str, Mapping[str, Any]]) -> str:
        """Dispatches a model's function call; returns the JSON to send back as the tool result.
        Sandbox failures come back as an ``error`` the model can read, not as an exception."""
        if name != TOOL_SPEC["name"]:
            return json.dumps({"error": f"unknown tool {name!r}"})
        args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
        try:
            return json.dumps(self.run_python(args["code"]))
        except (KeyError, TypeError) as err:
            return json.dumps({"error": f"bad arguments: {err}"})
        except HearthError as err:
            return json.dumps({"error": f"sandbox error: {err}"})

    def close(self) -> None:
        """Releases the sandbox (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            session.release()

    def _clip(self, text: str, truncated: bool) -> str:
        if len(text) > self._max_chars:
            text, truncated = text[: self._max_chars], True
        return text + ("\n[output truncated]" if truncated else "")

    def __enter__(self) -> "CodeInterpreter":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


# ---- a scripted conversation standing in for the model ----

SALES_CSV = "region,units,price\nnorth,12,9.5\nsouth,7,11.0\nnorth,3,9.5\neast,10,8.25\n"

SCRIPT: List[Dict[str, Any]] = [
    {
        "name": "run_python",
        "arguments": json.dumps({"code": (
            "import csv\n"
            "rows = list(csv.DictReader(open('sales.csv')))\n"
            "total = sum(int(r['units']) * float(r['price']) for r in rows)\n"
            "by_region = {}\n"
            "for r in rows:\n"
            "    by_region[r['region']] = by_region.get(r['region'], 0) + int(r['units'])\n"
            "print(f'revenue {total:.2f}')\n"
            "print('units by region', dict(sorted(by_region.items())))\n"
            "open('report.txt', 'w').write(f'revenue={total:.2f}\\n')\n"
        )}),
    },
    {"name": "run_python", "arguments": {"code": "print(open('report.txt').read().strip())"}},
    {"name": "run_python", "arguments": {"code": "1 / 0"}},
    {"name": "run_python", "arguments": {"code": "while True:\n    pass"}},
]


def main() -> int:
    parser = argparse.ArgumentParser(description="Hearth code-interpreter tool, scripted demo")
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server URL(s)")
    parser.add_argument("--prefix", default="hearth", help="Hearth subject prefix")
    parser.add_argument("--template", default="default")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="limit per tool call")
    args = parser.parse_args()

    transcript: List[Dict[str, Any]] = []
    with Hearth.connect(args.url, prefix=args.prefix) as hearth:
        with CodeInterpreter(hearth, template=args.template, timeout_s=args.timeout_s,
                             labels={"conversation": "demo"}) as tool:
            tool.upload("sales.csv", SALES_CSV)
            for call in SCRIPT:
                output = json.loads(tool.handle_tool_call(call["name"], call["arguments"]))
                transcript.append({"call": call["name"], "result": output})
            report = tool.download("report.txt").decode()
            session_id = tool.session.session_id
        state = hearth.sessions.get(session_id).info.state

    print(json.dumps({"tool_calls": transcript, "downloaded_report": report,
                      "session_after_close": state}, indent=2))
    ok = (
        transcript[0]["result"]["stdout"].startswith("revenue 302.00")
        and transcript[1]["result"]["stdout"].strip() == "revenue=302.00"
        and "ZeroDivisionError" in transcript[2]["result"]["stderr"]
        and transcript[3]["result"]["timed_out"]
        and report == "revenue=302.00\n"
        and state == "released"
    )
    print("OK" if ok else "UNEXPECTED RESULT", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
