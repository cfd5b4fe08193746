"""The blocking API against the real stack: every call, streaming, files, context managers,
use inside a running event loop (as in Jupyter), and no thread left behind."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from typing import Iterator, List

import pytest

from conftest import hearth_threads
from hearth_sandbox import (
    Chunk,
    Conflict,
    ExecResult,
    Hearth,
    NotFound,
    Session,
    SessionEnded,
)


@pytest.fixture
def hearth(url: str) -> Iterator[Hearth]:
    client = Hearth.connect(url)
    yield client
    client.close()


def test_control_calls(hearth: Hearth) -> None:
    pools = {p.template: p for p in hearth.pools.status()}
    assert {"default", "cold", "refill"} <= set(pools)
    assert pools["default"].target == 4
    templates = {t.name: t for t in hearth.templates.list()}
    assert templates["default"].snapshot_id is not None
    assert templates["cold"].min_ready == 0

    session = hearth.sessions.create(
        template="default", ttl_s=600, idle_timeout_s=120, labels={"test": "sync-control"}
    )
    try:
        info = session.info
        assert info.state == "running" and info.template == "default"
        assert info.labels == {"test": "sync-control"}
        assert info.isolation is not None and info.isolation.mode == "sandbox"
        assert session.id == session.session_id == info.session_id

        listed = hearth.sessions.list(labels={"test": "sync-control"})
        assert [s.session_id for s in listed] == [session.session_id]
        assert hearth.sessions.list(template="cold", labels={"test": "sync-control"}) == []
        again = hearth.sessions.get(session.session_id)
        assert again.info.created_ms == info.created_ms

        kept = session.keepalive(ttl_s=3000)
        assert kept.expires_ms > info.expires_ms
        assert session.refresh().state == "running"
    finally:
        released = session.release()
    assert released.state == "released"
    assert session.release().state == "released", "release is idempotent"
    assert hearth.sessions.list(labels={"test": "sync-control"}) == [] or all(
        s.info.is_terminal for s in hearth.sessions.list(labels={"test": "sync-control"})
    )


def test_exec_variants(hearth: Hearth) -> None:
    with hearth.sessions.create() as session:
        result = session.exec("echo out; echo err >&2; exit 3")
        assert isinstance(result, ExecResult)
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        assert not result.ok

        result = session.exec(["tr", "a-z", "A-Z"], stdin="shout\n")
        assert result.ok and result.stdout == b"SHOUT\n"

        session.exec("mkdir -p sub")
        result = session.exec('echo "$GREETING" && pwd', env={"GREETING": "hi"}, cwd="sub")
        assert result.stdout_text.splitlines()[0] == "hi"
        assert result.stdout_text.strip().endswith("/sub")

        result = session.exec("sleep 5", timeout_ms=200)
        assert result.timed_out and result.signal is not None and not result.ok

        result = session.exec("head -c 5000 /dev/zero", max_output_bytes=100)
        assert len(result.stdout) == 100 and result.stdout_truncated

        result = session.exec(["definitely-not-a-program"])
        assert result.exit_code == 127


def test_streaming_and_callbacks(hearth: Hearth) -> None:
    with hearth.sessions.create() as session:
        chunks: List[Chunk] = []
        with session.exec_stream(
            "for i in 1 2 3; do echo line $i; sleep 0.1; done; echo done >&2"
        ) as stream:
            for chunk in stream:
                chunks.append(chunk)
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == (
            b"line 1\nline 2\nline 3\n"
        )
        assert [c.text for c in chunks if c.stream == "stderr"] == ["done\n"]
        assert stream.result.exit_code == 0

        out: List[bytes] = []
        err: List[bytes] = []
        callers = set()

        def on_stdout(data: bytes) -> None:
            callers.add(threading.current_thread())
            out.append(data)

        result = session.exec("echo a; sleep 0.1; echo b; echo c >&2", on_stdout=on_stdout,
                              on_stderr=err.append)
        assert b"".join(out) == b"a\nb\n" and b"".join(err) == b"c\n"
        assert result.stdout == b"a\nb\n" and result.stderr == b"c\n", "the whole output"
        assert callers == {threading.current_thread()}, "callbacks run in the caller's thread"


def test_stream_stopped_early_is_cancelled_cleanly(hearth: Hearth) -> None:
    with hearth.sessions.create() as session:
        with session.exec_stream("for i in $(seq 1 20); do echo $i; sleep 0.05; done") as stream:
            first = next(iter(stream))
        assert first.data.startswith(b"1")
        transport = hearth.aio._transport
        # close() runs on the loop thread: a round trip through it orders after the close.
        hearth.pools.status()
        assert transport.in_flight == 0
        # The session is still usable once the abandoned command ends.
        assert session.exec("echo after").stdout == b"after\n"


def test_files_text_binary_and_mode(hearth: Hearth) -> None:
    with hearth.sessions.create() as session:
        assert session.files.write("notes/a.txt", "héllo\n") == len("héllo\n".encode())
        assert session.files.read_text("notes/a.txt") == "héllo\n"
        blob = bytes(range(256)) * 4
        session.files.write("bin/data", blob, mode=0o600)
        assert session.files.read("bin/data") == blob
        assert session.exec(["stat", "-c", "%a", "bin/data"]).stdout == b"600\n"


def test_files_of_10_mb(hearth: Hearth) -> None:
    """Larger than one NATS message (8 MB here): written in parts, read by a streamed cat."""
    with hearth.sessions.create() as session:
        blob = os.urandom(10 * 1024 * 1024)
        assert session.files.write("big.bin", blob, mode=0o640) == len(blob)
        assert session.files.read("big.bin") == blob
        assert session.exec("ls big.bin*; stat -c %a big.bin").stdout == b"big.bin\n640\n"
        text = "0123456789abcdef\n" * (10 * 1024 * 1024 // 17)
        session.files.write("big.txt", text)
        assert session.files.read_text("big.txt") == text


def test_context_manager_releases(hearth: Hearth) -> None:
    with hearth.sessions.create() as session:
        session.exec("true")
    assert session.info.state == "released"
    with pytest.raises(SessionEnded) as ended:
        session.exec("true")
    assert ended.value.state == "released"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with hearth.sessions.create() as failing:
            raise Boom()
    assert failing.refresh().state == "released", "released on the way out of an error too"


def test_idempotent_create(hearth: Hearth) -> None:
    sid = "sync-idem-" + os.urandom(4).hex()
    first = hearth.sessions.create(session_id=sid)
    try:
        second = hearth.sessions.create(session_id=sid)
        assert second.session_id == sid and second.info.created_ms == first.info.created_ms
        with pytest.raises(Conflict):
            hearth.sessions.create(session_id=sid, template="refill")
    finally:
        first.release()


def test_snapshot_makes_a_template(hearth: Hearth) -> None:
    name = "snap-" + os.urandom(3).hex()
    with hearth.sessions.create() as session:
        session.files.write("kept.txt", "from the snapshot")
        template = session.snapshot(name)
        assert template.name == name and template.source_session == session.session_id
        with pytest.raises(Conflict):
            session.snapshot(name)
    assert name in {t.name for t in hearth.templates.list()}
    with hearth.sessions.create(template=name, wait_ms=30000) as restored:
        assert restored.files.read_text("kept.txt") == "from the snapshot"
    with pytest.raises(NotFound):
        hearth.sessions.create(template="no-such-template")


def test_blocking_api_inside_a_running_loop(url: str) -> None:
    """What a Jupyter cell does: a loop is already running in this thread."""

    async def cell() -> bytes:
        assert asyncio.get_running_loop().is_running()
        with Hearth.connect(url) as hearth:
            with hearth.sessions.create() as session:
                return session.exec("echo nested").stdout

    assert asyncio.run(cell()) == b"nested\n"


def test_no_thread_left_behind(url: str) -> None:
    before = len(hearth_threads())
    clients = [Hearth.connect(url) for _ in range(3)]
    assert len(hearth_threads()) == before + 3
    for client in clients:
        client.pools.status()
        client.close()
        client.close()  # idempotent
    assert len(hearth_threads()) == before
    with pytest.raises(RuntimeError):
        clients[0].pools.status()
    # Dropped without close(): the finalizer closes it.
    dropped = Hearth.connect(url)
    dropped.pools.status()
    del dropped
    gc.collect()
    assert len(hearth_threads()) == before


def test_session_handle_types(hearth: Hearth) -> None:
    with hearth.sessions.create() as session:
        assert isinstance(session, Session)
        assert "Session(" in repr(session)
