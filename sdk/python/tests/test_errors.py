"""Every error class, from the real stack where it can be provoked (400, 404, 409, 429, 503,
no responders, ended sessions, client timeouts, a connection lost mid-exec) and from a stub
responder for the codes a healthy stack does not give on demand (500, 504, 507, unknown)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import msgpack
import nats
import pytest

from hearth_sandbox import (
    AsyncHearth,
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Hearth,
    HearthError,
    HearthServerError,
    InsufficientStorage,
    NoCapacity,
    NotFound,
    QuotaExceeded,
    RetryPolicy,
    SessionEnded,
    Timeout,
    Timeouts,
    Unavailable,
)
from stack import MAX_QUEUED_PER_VM
from hearth_sandbox.aio import AsyncSession
from hearth_sandbox.types import SessionInfo


async def test_bad_request_not_found_conflict(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create() as session:
            with pytest.raises(BadRequest) as bad:
                await session.files.read("../etc/passwd")
            assert bad.value.code == 400 and bad.value.message and not bad.value.may_have_run
            with pytest.raises(BadRequest):
                await session.exec("true", cwd="no/such/dir")
            with pytest.raises(NotFound):
                await session.files.read("missing.txt")
            with pytest.raises(Conflict) as conflict:
                await hearth.sessions.create("refill", session_id=session.id)
            assert conflict.value.code == 409
        with pytest.raises(NotFound) as missing:
            await hearth.sessions.get("no-such-session")
        assert missing.value.code == 404 and "no-such-session" in str(missing.value)
        with pytest.raises(NotFound):
            await hearth.sessions.create("no-such-template")


async def test_session_ended(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        session = await hearth.sessions.create()
        elsewhere = await hearth.sessions.get(session.id)  # another handle, still "running"
        await session.release()
        # The handle that released it knows at once.
        with pytest.raises(SessionEnded) as ended:
            await session.exec("true")
        assert ended.value.state == "released" and isinstance(ended.value, NotFound)
        with pytest.raises(SessionEnded):
            await session.files.write("x", b"")
        # Another handle learns it from the service: no responders, then the scheduler says
        # why. (Give the worker a moment to drop its subscription: a request that reaches it
        # while it does is not answered at all today, and would end in Timeout.)
        await asyncio.sleep(0.5)
        with pytest.raises(SessionEnded) as told:
            await elsewhere.exec("true")
        assert told.value.state == "released"
        with pytest.raises(SessionEnded):
            await elsewhere.files.read("x")
        with pytest.raises(SessionEnded):
            await elsewhere.exec_stream("true").wait()
        with pytest.raises(NotFound) as unknown:
            await AsyncSession(hearth._transport, SessionInfo("never-created")).exec("true")
        assert not isinstance(unknown.value, SessionEnded)


async def test_quota_exceeded_carries_retry_after(url: str) -> None:
    """More requests queued on one session than the worker admits: 429, not retried."""
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create() as session:
            outcomes = await asyncio.gather(
                *(session.exec("sleep 0.3") for _ in range(MAX_QUEUED_PER_VM + 2)),
                return_exceptions=True,
            )
            quota = [o for o in outcomes if isinstance(o, QuotaExceeded)]
            assert quota, outcomes
            assert quota[0].code == 429 and quota[0].retry_after_ms is not None
            assert not quota[0].retried


async def test_no_capacity_is_retried_until_the_deadline(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        started = time.monotonic()
        with pytest.raises(NoCapacity) as none:
            await hearth.sessions.create("cold", wait_ms=0, deadline_s=0.5)
        elapsed = time.monotonic() - started
        assert none.value.code == 503 and none.value.retry_after_ms == 100
        assert 0.3 < elapsed < 10, "retried after retry_after_ms until the deadline"
        with pytest.raises(NoCapacity):
            await hearth.sessions.create("cold", wait_ms=0, deadline_s=0)


async def test_client_timeout_may_have_run(url: str) -> None:
    """An exec waiting for its VM's lock past the client's budget."""
    timeouts = Timeouts(exec_grace_s=0.3)
    async with await AsyncHearth.connect(url, timeouts=timeouts) as hearth:
        async with await hearth.sessions.create() as session:
            long = asyncio.ensure_future(session.exec("sleep 1.5", timeout_ms=5000))
            await asyncio.sleep(0.1)
            with pytest.raises(Timeout) as timed_out:
                await session.exec("true", timeout_ms=100)
            assert timed_out.value.may_have_run and isinstance(timed_out.value, DeadlineExceeded)
            assert (await long).ok


async def test_unavailable(url: str) -> None:
    # Nobody serves this prefix: retried until the deadline, then Unavailable.
    retry = RetryPolicy(deadline_s=0.3, initial_backoff_s=0.02)
    async with await AsyncHearth.connect(url, prefix="nobody", retry=retry) as hearth:
        started = time.monotonic()
        with pytest.raises(Unavailable) as unavailable:
            await hearth.sessions.list()
        assert time.monotonic() - started >= 0.15
        assert not unavailable.value.may_have_run
    with pytest.raises(Unavailable):
        await AsyncHearth.connect(f"nats://127.0.0.1:{_free_port()}", connect_timeout_s=0.5,
                                  max_reconnect_attempts=0)


async def test_lost_connection_mid_exec(url: str) -> None:
    """The connection drops while a command runs: Unavailable at once, saying it may have run."""
    proxy = _Proxy(url)
    try:
        async with await AsyncHearth.connect(url) as direct:
            async with await direct.sessions.create() as session:
                hearth = await AsyncHearth.connect(proxy.url, max_reconnect_attempts=0)
                try:
                    remote = await hearth.sessions.get(session.id)
                    running = asyncio.ensure_future(remote.exec("sleep 0.3; touch ran"))
                    await asyncio.sleep(0.1)
                    started = time.monotonic()
                    proxy.cut()
                    with pytest.raises(Unavailable) as lost:
                        await running
                    assert lost.value.may_have_run
                    assert time.monotonic() - started < 10, "failed at once, not at its 90 s timeout"
                    assert hearth._transport.in_flight == 0
                finally:
                    await hearth.close()
                # It did run.
                await asyncio.sleep(0.4)
                assert (await session.exec("ls ran")).ok
    finally:
        proxy.cut()


@pytest.mark.parametrize(
    "code, cls",
    [
        (500, HearthServerError),
        (504, DeadlineExceeded),
        (507, InsufficientStorage),
        (418, HearthServerError),  # a code newer than this SDK: like 500
        (400, BadRequest),
    ],
)
async def test_error_codes_from_a_stub(url: str, code: int, cls: type) -> None:
    async with _Stub(url) as stub:
        retry = RetryPolicy(deadline_s=0.2, initial_backoff_s=0.02)
        async with await AsyncHearth.connect(url, prefix="stub", retry=retry) as hearth:
            session = await hearth.sessions.get(f"e{code}")
            with pytest.raises(HearthError) as raised:
                await session.keepalive()
            assert type(raised.value) is cls
            assert raised.value.code == code and raised.value.message == f"stub says {code}"
            attempts = stub.counts[f"e{code}.keepalive"]
            if code == 504:
                assert attempts > 1, "504 is retried for idempotent requests"
                with pytest.raises(DeadlineExceeded):
                    await session.exec("true")
                assert stub.counts[f"e{code}.exec"] == 1, "exec is not retried"
                with pytest.raises(DeadlineExceeded):
                    await session.exec("true", retry=True)
                assert stub.counts[f"e{code}.exec"] > 2, "unless asked to"
            else:
                assert attempts == 1
            with pytest.raises(cls):
                await session.files.write("f", b"x")


async def test_header_only_error_and_429_with_retry_after(url: str) -> None:
    async with _Stub(url) as stub:
        async with await AsyncHearth.connect(url, prefix="stub") as hearth:
            with pytest.raises(QuotaExceeded) as quota:
                await (await hearth.sessions.get("e429")).keepalive()
            assert quota.value.retry_after_ms == 250 and stub.counts["e429.keepalive"] == 1
            with pytest.raises(NotFound) as raw:
                await (await hearth.sessions.get("h404")).keepalive()
            assert raw.value.message == "header text", "the header's text when the body is not"


def test_wrong_types_fail_before_sending(url: str) -> None:
    with Hearth.connect(url, prefix="spy") as hearth:
        spied: List[str] = []
        nc = hearth.nats

        async def spy() -> Any:
            async def record(msg: Any) -> None:
                spied.append(msg.subject)

            return await nc.subscribe("spy.>", cb=record)

        sub = hearth._run(spy())
        sessions = hearth.sessions
        cases: List[Tuple[Callable[[], object], Type[Exception]]] = [
            (lambda: sessions.create(ttl_s="10"), TypeError),  # type: ignore[arg-type]
            (lambda: sessions.create(ttl_s=0), ValueError),
            (lambda: sessions.create(ttl_s=True), TypeError),
            (lambda: sessions.create(labels={"k": 1}), TypeError),  # type: ignore[dict-item]
            (lambda: sessions.create(template="bad name"), ValueError),
            (lambda: sessions.create(session_id="x" * 129), ValueError),
            (lambda: sessions.create(wait_ms=-1), ValueError),
            (lambda: sessions.get(123), TypeError),  # type: ignore[arg-type]
            (lambda: sessions.list(labels=["x"]), TypeError),  # type: ignore[arg-type]
        ]
        from hearth_sandbox.sync import Session

        handle = Session(hearth, AsyncSession(hearth.aio._transport, SessionInfo("s1")))
        cases += [
            (lambda: handle.exec(b"echo"), TypeError),  # type: ignore[arg-type]
            (lambda: handle.exec([]), TypeError),
            (lambda: handle.exec(["echo", 1]), TypeError),  # type: ignore[list-item]
            (lambda: handle.exec(""), ValueError),
            (lambda: handle.exec("true", timeout_ms=0), ValueError),
            (lambda: handle.exec("true", timeout_ms=1.5), TypeError),  # type: ignore[arg-type]
            (lambda: handle.exec("true", env={"A=B": "c"}), ValueError),
            (lambda: handle.exec("true", stdin=42), TypeError),  # type: ignore[arg-type]
            (lambda: handle.exec("true", max_output_bytes=1 << 40), ValueError),
            (lambda: handle.exec("true", on_stdout="print"), TypeError),  # type: ignore[arg-type]
            (lambda: handle.exec("true", on_stdout=print, retry=True), ValueError),
            (lambda: handle.files.write("", b""), ValueError),
            (lambda: handle.files.write("a", 3), TypeError),  # type: ignore[arg-type]
            (lambda: handle.files.write("a", b"", mode=0o10000), ValueError),
            (lambda: handle.files.read("a\0b"), ValueError),
            (lambda: handle.keepalive(ttl_s=-5), ValueError),
            (lambda: handle.snapshot("no/slash"), ValueError),
        ]
        for call, error in cases:
            with pytest.raises(error):
                call()
        hearth._run(nc.flush())
        hearth._run(sub.unsubscribe())
        assert spied == [], "nothing reached the server"
    with pytest.raises(TypeError):
        Hearth.connect(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Hearth.connect(url, prefix="bad prefix")
    with pytest.raises(ValueError):
        Hearth.connect(url, user="only-user")
    with pytest.raises(ValueError):
        RetryPolicy(deadline_s=-1)


# ---- helpers ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proxy:
    """A TCP forwarder to the NATS server that can cut every connection at once."""

    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.rsplit("/", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.url = f"nats://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: List[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self.closed = True
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class _Stub:
    """Answers ``stub.v1.sessions.<sid>.<op>``: ``get`` with a running session, anything else
    with the error the sid names (``e<code>``: headers and body; ``h<code>``: headers and an
    undecodable body)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: Dict[str, int] = {}
        self.nc: Optional[Any] = None

    async def __aenter__(self) -> "_Stub":
        self.nc = await nats.connect(self.url)
        await self.nc.subscribe("stub.v1.sessions.*.>", cb=self._answer)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.nc is not None
        await self.nc.close()

    async def _answer(self, msg: Any) -> None:
        assert self.nc is not None
        _, _, _, sid, op = msg.subject.split(".", 4)
        key = f"{sid}.{op}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if op == "get":
            await self.nc.publish(msg.reply, msgpack.packb({"session_id": sid, "state": "running"}))
            return
        code = int(sid[1:])
        headers = {"Nats-Service-Error-Code": str(code), "Nats-Service-Error": "header text"}
        if sid.startswith("h"):
            body = b"\xc1"  # never valid MessagePack
        else:
            wire: Dict[str, Any] = {"code": code, "message": f"stub says {code}"}
            if code == 429:
                wire["retry_after_ms"] = 250
            body = msgpack.packb(wire)
        await self.nc.publish(msg.reply, body, headers=headers)
