"""The transport under the async client: one NATS connection, one wildcard inbox subscription
that every reply (and every streamed exec chunk) comes back on, the retry loop for idempotent
requests, and the translation of every NATS failure into a :class:`HearthError`.

Why not ``nc.request``: a streamed exec needs several replies per request, and a lost connection
must fail the requests in flight at once (saying whether they were sent) instead of letting them
wait for their timeout. Owning the reply map gives both for the price of nats-py's own mux.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, Optional, Union

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from . import _wire
from .errors import (
    BadRequest,
    HearthError,
    NotFound,
    SessionEnded,
    Timeout,
    Unavailable,
)
from .types import TERMINAL_STATES

log = logging.getLogger("hearth_sandbox")


@dataclass(frozen=True)
class RetryPolicy:
    """How idempotent operations (create, get, list, keepalive, release, files, templates, pools)
    retry 503 (honouring ``retry_after_ms``), 504, client timeouts and no responders.

    ``deadline_s`` bounds the retrying: no new attempt starts once it has passed since the first
    (an attempt already sent still gets its own timeout). ``deadline_s=0`` disables retries.
    Exec is retried only when the caller passes ``retry=True``.
    """

    deadline_s: float = 30.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("deadline_s", "initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds")
            if value < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class Timeouts:
    """Client-side timeouts in seconds (PROTOCOL.md §3, "Timeouts")."""

    #: Control requests (get, list, keepalive, release, templates, pools) and files.
    request_s: float = 10.0
    #: Added to ``wait_ms`` for creates; also the wait assumed when a create names none.
    claim_wait_s: float = 10.0
    #: Beyond an exec's ``timeout_ms``: waiting for the VM's lock and the transfer.
    exec_grace_s: float = 30.0
    #: ``snapshot`` copies the VM's disk.
    snapshot_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("request_s", "claim_wait_s", "exec_grace_s", "snapshot_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds")
            if value <= 0:
                raise ValueError(f"{name} must be > 0")


class _Stream:
    """The replies of one streamed request, buffered until read."""

    __slots__ = ("items", "waiter", "error")

    def __init__(self) -> None:
        self.items: Deque[Msg] = collections.deque()
        self.waiter: Optional[asyncio.Future[None]] = None
        self.error: Optional[HearthError] = None

    def push(self, msg: Msg) -> None:
        self.items.append(msg)
        self._wake()

    def fail(self, error: HearthError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, timeout: float) -> Optional[Msg]:
        """The next message, or ``None`` after ``timeout`` seconds without one."""
        if not self.items and self.error is None:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout)
            except asyncio.TimeoutError:
                return None
            finally:
                self.waiter = None
        if self.items:
            return self.items.popleft()
        assert self.error is not None
        raise self.error


_Entry = Union["asyncio.Future[Msg]", _Stream]


def _expire(future: "asyncio.Future[Msg]", subject: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(
            Timeout(f"no reply within {timeout:g}s", subject=subject, may_have_run=True)
        )


class Transport:
    """A connection to Hearth: subjects, timeouts, retries and the reply mux."""

    def __init__(
        self,
        nc: NatsClient,
        subjects: _wire.Subjects,
        timeouts: Timeouts,
        retry: RetryPolicy,
        owns_connection: bool,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeouts = timeouts
        self.retry = retry
        self.owns_connection = owns_connection
        self._pending: Dict[str, _Entry] = {}
        self._prefix = ""
        self._prefix_len = 0
        self._sub: Optional[Any] = None
        self._next_token = 0
        self._closed = False

    # ---- lifecycle ----

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        self._prefix_len = len(self._prefix)
        self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_msg)

    async def close(self) -> None:
        """Fails whatever is in flight, drops the inbox subscription and, when the connection was
        opened by the SDK, closes it."""
        if self._closed:
            return
        self._closed = True
        self.fail_in_flight(lambda sent: Unavailable("the client was closed", may_have_run=sent))
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._sub = None
        if self.owns_connection:
            await self.nc.close()

    @property
    def in_flight(self) -> int:
        """Requests and streams waiting for replies (for tests: nothing leaks)."""
        return len(self._pending)

    def fail_in_flight(self, make_error: Any) -> None:
        """Fails every request and stream waiting for replies; ``make_error(sent)`` builds the
        exception. Everything pending has been sent (requests register just before publishing,
        and a failed publish unregisters)."""
        for entry in list(self._pending.values()):
            error = make_error(True)
            if isinstance(entry, _Stream):
                entry.fail(error)
            elif not entry.done():
                entry.set_exception(error)

    async def on_disconnected(self) -> None:
        self.fail_in_flight(
            lambda sent: Unavailable(
                "lost the connection to NATS while waiting for the reply"
                + ("; the request had been sent and may have run" if sent else ""),
                may_have_run=sent,
            )
        )

    async def _on_msg(self, msg: Msg) -> None:
        entry = self._pending.get(msg.subject[self._prefix_len:])
        if entry is None:
            return  # a late reply to a request given up on, or a cancelled stream
        if isinstance(entry, _Stream):
            entry.push(msg)
        elif not entry.done():
            entry.set_result(msg)

    # ---- one request ----

    def _token(self) -> str:
        self._next_token += 1
        return str(self._next_token)

    def _check_open(self, subject: str) -> None:
        if self._closed:
            raise Unavailable("the client is closed", subject=subject)
        if not self.nc.is_connected:
            raise Unavailable("not connected to NATS", subject=subject)

    async def _publish(self, subject: str, payload: bytes, token: str) -> None:
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token)
        except nats.errors.MaxPayloadError:
            raise BadRequest(
                f"request of {len(payload)} bytes exceeds the server's max_payload "
                f"({self.nc.max_payload} bytes)",
                subject=subject,
            ) from None
        except (nats.errors.Error, OSError) as err:
            raise Unavailable(f"publish failed: {err!r}", subject=subject) from None

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:
        """Sends one request and returns the reply message; raises :class:`Timeout`,
        :class:`Unavailable` (no responders or connection lost) or a mapped error reply."""
        self._check_open(subject)
        token = self._token()
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            await self._publish(subject, payload, token)
            handle = asyncio.get_running_loop().call_later(
                timeout, _expire, future, subject, timeout
            )
            try:
                msg = await future
            finally:
                handle.cancel()
        finally:
            del self._pending[token]
        headers = msg.headers
        if headers:
            if _wire.is_no_responders(headers, msg.data):
                raise Unavailable("no responders", subject=subject)
            error = _wire.reply_error(subject, headers, msg.data)
            if error is not None:
                raise error
        return msg

    async def open_stream(self, subject: str, payload: bytes) -> "StreamHandle":
        """Publishes a request whose replies are read with :meth:`StreamHandle.next`."""
        self._check_open(subject)
        token = self._token()
        stream = _Stream()
        self._pending[token] = stream
        try:
            await self._publish(subject, payload, token)
        except BaseException:
            del self._pending[token]
            raise
        return StreamHandle(self, token, stream, subject)

    def _drop(self, token: str) -> None:
        self._pending.pop(token, None)

    # ---- retries and explanations ----

    async def call(
        self,
        subject: str,
        body: Dict[str, Any],
        timeout: float,
        *,
        retry: bool,
        deadline_s: Optional[float] = None,
        session_id: Optional[str] = None,
    ) -> Dict[str, Any]:
        """One operation: encode, request, decode. With ``retry``, retries what
        :attr:`HearthError.retried` allows until the deadline. ``session_id`` marks a data-plane
        request: "no responders" then asks the scheduler why (ended, unknown, worker away)."""
        payload = _wire.encode(body)
        if not retry:
            try:
                return _wire.decode(subject, (await self.request(subject, payload, timeout)).data)
            except Unavailable as err:
                if session_id is not None and not err.may_have_run:
                    raise await self.explain(session_id, err) from None
                raise
        budget = self.retry.deadline_s if deadline_s is None else deadline_s
        give_up_at = time.monotonic() + budget
        backoff = self.retry.initial_backoff_s
        attempt = 1
        while True:
            try:
                msg = await self.request(subject, payload, timeout)
                return _wire.decode(subject, msg.data)
            except HearthError as err:
                if session_id is not None and isinstance(err, Unavailable) and not err.may_have_run:
                    err = await self.explain(session_id, err)
                if not err.retried:
                    raise err from None
                if err.retry_after_ms is not None:
                    wait = err.retry_after_ms / 1000
                else:
                    wait = backoff * (0.5 + random.random() / 2)
                    backoff = min(backoff * 2, self.retry.max_backoff_s)
                if time.monotonic() + wait > give_up_at:
                    raise err from None
                log.debug("%s: %s; retry %d in %.3fs", subject, err, attempt, wait)
                attempt += 1
                await asyncio.sleep(wait)

    async def explain(self, session_id: str, err: Unavailable) -> HearthError:
        """Why nobody serves a session's data plane, as the scheduler knows it: unknown
        (:class:`NotFound`), over (:class:`SessionEnded`), or its worker is away (``err``)."""
        try:
            reply = await self.request(
                self.subjects.session(session_id, "get"), _wire.encode({}), self.timeouts.request_s
            )
            session = _wire.decode(err.subject or "", reply.data)
        except NotFound:
            return NotFound(f"session {session_id} does not exist", subject=err.subject)
        except HearthError:
            return err
        state = session.get("state")
        if isinstance(state, str) and state in TERMINAL_STATES:
            return SessionEnded(f"session {session_id} is {state}", state=state,
                                subject=err.subject)
        return Unavailable(
            f"no responders: session {session_id} is {state} but its worker "
            f"{session.get('worker_id')} does not answer (restarting?)",
            subject=err.subject,
        )


class StreamHandle:
    """The replies of one streamed request; :meth:`close` drops them (idempotent)."""

    __slots__ = ("_transport", "_token", "_stream", "subject")

    def __init__(self, transport: Transport, token: str, stream: _Stream, subject: str) -> None:
        self._transport = transport
        self._token = token
        self._stream = stream
        self.subject = subject

    async def next(self, timeout: float) -> Msg:
        msg = await self._stream.next(timeout)
        if msg is None:
            raise Timeout(f"no message within {timeout:g}s", subject=self.subject,
                          may_have_run=True)
        return msg

    def close(self) -> None:
        self._transport._drop(self._token)
