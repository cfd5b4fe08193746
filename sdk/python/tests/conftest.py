"""pytest wiring: the real stack once per test session (see stack.py), and ``async def`` tests
run in a fresh event loop each (no plugin needed)."""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
from typing import Iterator, List, Optional

import pytest

from stack import Stack, temp_root


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout) ends the run like Ctrl-C, so the stack's teardown still runs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Optional[bool]:
    """Runs ``async def`` tests in their own event loop."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**args))
        return True
    return None


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with temp_root("hearth-sdk-") as root:
        stack = Stack(root)
        try:
            stack.start()
            stack.wait_ready()
            yield stack
        finally:
            stack.stop()


@pytest.fixture
def url(stack: Stack) -> str:
    return stack.url


def hearth_threads() -> List[threading.Thread]:
    """The SDK's background threads still alive."""
    return [t for t in threading.enumerate() if t.name == "hearth-sandbox-loop" and t.is_alive()]
