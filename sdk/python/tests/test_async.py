"""The asyncio API against the real stack: every call, streaming (iterator and callbacks),
cancellation, files, concurrency (50 sessions from one client), retries on an empty pool that
refills, and nothing left behind (tasks, subscriptions, reply entries)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from typing import List

from stack import Stack
from hearth_sandbox import AsyncHearth, AsyncSession, Chunk, RetryPolicy


async def test_every_call(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        assert {p.template for p in await hearth.pools.status()} >= {"default", "refill"}
        assert "default" in {t.name for t in await hearth.templates.list()}
        session = await hearth.sessions.create(
            "default", ttl_s=600, idle_timeout_s=60, labels={"test": "async-every"}, wait_ms=5000
        )
        async with session:
            assert isinstance(session, AsyncSession) and session.info.state == "running"
            listed = await hearth.sessions.list(template="default", labels={"test": "async-every"})
            assert [s.id for s in listed] == [session.id]
            assert (await hearth.sessions.get(session.id)).info.template == "default"
            assert (await session.keepalive()).state == "running"
            result = await session.exec(["sh", "-c", "echo $0", "argv"])
            assert result.stdout == b"argv\n"
            assert await session.files.write("t.txt", b"\x00\xffbytes") == 7
            assert await session.files.read("t.txt") == b"\x00\xffbytes"
            assert (await session.refresh()).last_used_ms >= session.info.created_ms
            name = "asnap-" + os.urandom(3).hex()
            template = await session.snapshot(name, min_ready=0)
            assert template.name == name and template.source_session == session.id
        assert session.info.state == "released"
        async with await hearth.sessions.create(name, wait_ms=30000) as restored:
            assert await restored.files.read("t.txt") == b"\x00\xffbytes"


async def test_streaming(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create() as session:
            chunks: List[Chunk] = []
            async with session.exec_stream("echo one; sleep 0.1; echo two >&2") as stream:
                async for chunk in stream:
                    chunks.append(chunk)
            assert [(c.stream, c.data) for c in chunks] == [("stdout", b"one\n"),
                                                            ("stderr", b"two\n")]
            assert stream.result.ok

            seen: List[bytes] = []

            async def on_stdout(data: bytes) -> None:  # coroutine callbacks are awaited
                seen.append(data)

            result = await session.exec("printf 'a\\nb\\n'", on_stdout=on_stdout)
            assert b"".join(seen) == b"a\nb\n" == result.stdout

            # wait() drains the rest and returns the result.
            stream = session.exec_stream("echo x; exit 4")
            assert (await stream.wait()).exit_code == 4


async def test_stream_cancelled_cleanly(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        transport = hearth._transport
        async with await hearth.sessions.create() as session:
            # Leaving the block early drops the stream.
            async with session.exec_stream("for i in $(seq 20); do echo $i; sleep 0.05; done") as s:
                async for _chunk in s:
                    break
            assert transport.in_flight == 0

            # So does abandoning the iterator without closing it.
            abandoned = session.exec_stream("for i in $(seq 20); do echo $i; sleep 0.05; done")
            async for _chunk in abandoned:
                break
            assert transport.in_flight == 1
            del abandoned
            gc.collect()
            assert transport.in_flight == 0

            # So does cancelling the task that reads it.
            async def reader() -> None:
                async with session.exec_stream("sleep 0.5; echo late") as stream:
                    async for _chunk in stream:
                        pass

            task = asyncio.ensure_future(reader())
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert transport.in_flight == 0
            # The session works once the abandoned commands are over.
            assert (await session.exec("echo ok")).stdout == b"ok\n"


async def test_files_10_mb(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create() as session:
            blob = os.urandom(10 * 1024 * 1024)
            await session.files.write("big.bin", blob)
            assert await session.files.read("big.bin") == blob
            text = "ünïcode line\n" * 700_000
            await session.files.write("big.txt", text)
            assert await session.files.read_text("big.txt") == text


async def test_fifty_sessions_from_one_client(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        sessions = await asyncio.gather(
            *(hearth.sessions.create(labels={"test": "fifty"}, wait_ms=30000) for _ in range(50))
        )
        try:
            assert len({s.id for s in sessions}) == 50
            results = await asyncio.gather(
                *(s.exec(["echo", str(i)]) for i, s in enumerate(sessions))
            )
            assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(50)]
            assert len(await hearth.sessions.list(labels={"test": "fifty"})) == 50
        finally:
            released = await asyncio.gather(*(s.release() for s in sessions))
        assert {r.state for r in released} == {"released"}


class _RetrySeen(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = asyncio.Event()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "retry" in message:
            self.messages.append(message)
            self.event.set()


async def test_create_retries_until_the_pool_refills(url: str, stack: Stack) -> None:
    """An empty pool answers 503 with retry_after_ms; the SDK retries with the same
    session_id until the scheduler has refilled it. The worker is paused to hold the pool empty
    until a 503 was seen."""
    logger = logging.getLogger("hearth_sandbox")
    seen = _RetrySeen()
    logger.addHandler(seen)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    worker = stack.procs["worker"]
    holders: List[AsyncSession] = []
    async with await AsyncHearth.connect(url, retry=RetryPolicy(deadline_s=20)) as hearth:
        try:
            for _attempt in range(5):
                holders.append(await hearth.sessions.create("refill", wait_ms=0))
                os.kill(worker.pid, signal.SIGSTOP)
                pools = {p.template: p for p in await hearth.pools.status()}
                if pools["refill"].ready == 0:
                    break
                os.kill(worker.pid, signal.SIGCONT)  # refilled already: take that one too
            started = time.monotonic()
            create = asyncio.ensure_future(hearth.sessions.create("refill", wait_ms=0))
            await asyncio.wait_for(seen.event.wait(), 10)
            assert "503" in seen.messages[0]
            os.kill(worker.pid, signal.SIGCONT)
            session = await create
            holders.append(session)
            assert session.info.warm, "served from the refilled pool"
            assert time.monotonic() - started < 15
        finally:
            os.kill(worker.pid, signal.SIGCONT)
            logger.removeHandler(seen)
            logger.setLevel(old_level)
            await asyncio.gather(*(s.release() for s in holders), return_exceptions=True)


async def test_nothing_left_behind(url: str) -> None:
    before = asyncio.all_tasks()
    hearth = await AsyncHearth.connect(url)
    async with await hearth.sessions.create() as session:
        await session.exec("true")
        async with session.exec_stream("echo hi") as stream:
            await stream.wait()
    assert hearth._transport.in_flight == 0
    nc = hearth.nats
    assert len(nc._subs) == 1, "one inbox subscription, whatever was streamed"
    await hearth.close()
    assert nc.is_closed
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set(), "no task outlives the client"
