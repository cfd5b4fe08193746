"""The asyncio API: :class:`AsyncHearth` and the session handle :class:`AsyncSession`.

::

    async with await AsyncHearth.connect("nats://127.0.0.1:4222") as hearth:
        async with await hearth.sessions.create(template="default") as session:
            result = await session.exec("echo hello")
            print(result.stdout_text)
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import posixpath
import ssl
import uuid
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)
from types import TracebackType

import nats
from nats.aio.client import Client as NatsClient

from . import _wire
from ._core import RetryPolicy, StreamHandle, Timeouts, Transport, log
from .errors import (
    BadRequest,
    HearthError,
    HearthServerError,
    InsufficientStorage,
    SessionEnded,
    Unavailable,
    error_for_code,
)
from .processes import AsyncProcesses
from .types import Chunk, ExecResult, PoolStatus, SessionInfo, Template

__all__ = [
    "AsyncExecStream",
    "AsyncForkResult",
    "AsyncFiles",
    "AsyncHearth",
    "AsyncPools",
    "AsyncSession",
    "AsyncSessions",
    "AsyncTemplates",
    "OutputCallback",
]

#: ``on_stdout`` / ``on_stderr``: called with each chunk's bytes; may be a coroutine function.
OutputCallback = Callable[[bytes], Union[None, Awaitable[None]]]

Command = Union[str, Sequence[str]]


def new_session_id() -> str:
    """A fresh idempotency key for a create."""
    return uuid.uuid4().hex


class AsyncHearth:
    """A client of one Hearth deployment over one NATS connection.

    Open it with :meth:`connect` (or wrap a connection you own with :meth:`from_nats`) and close
    it with :meth:`close` or ``async with``. The NATS account you connect as is your tenant: the
    SDK sends requests only to ``<prefix>.v1.*`` and reads replies on its ``_INBOX``.

    Attributes:
        sessions: create, get and list sessions.
        templates: list templates.
        pools: warm pool status.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self.sessions = AsyncSessions(self)
        self.templates = AsyncTemplates(transport)
        self.pools = AsyncPools(transport)

    @classmethod
    async def connect(
        cls,
        servers: Union[str, Sequence[str]] = "nats://127.0.0.1:4222",
        *,
        user: Optional[str] = None,
        password: Optional[str] = None,
        token: Optional[str] = None,
        creds: Optional[Union[str, "os.PathLike[str]"]] = None,
        tls: Optional[ssl.SSLContext] = None,
        tls_hostname: Optional[str] = None,
        prefix: str = "hearth",
        name: str = "hearth-sandbox",
        connect_timeout_s: float = 5.0,
        timeouts: Optional[Timeouts] = None,
        retry: Optional[RetryPolicy] = None,
        max_reconnect_attempts: int = 60,
        inbox_prefix: str = "_INBOX",
    ) -> "AsyncHearth":
        """Connects to NATS and returns a client.

        Args:
            servers: A URL, a comma-separated list of URLs, or a list of URLs
                (``nats://``, ``tls://``; credentials may be in the URL).
            user, password: User/password authentication.
            token: Token authentication.
            creds: A ``.creds`` file (JWT + NKey), e.g. a tenant's.
            tls: An ``ssl.SSLContext`` for TLS (client certificates, private CAs).
            tls_hostname: The server name to verify when it differs from the URL's host.
            prefix: The deployment's subject prefix (``hearth``).
            name: The connection name shown in NATS monitoring.
            connect_timeout_s: How long the first connection may take (all attempts).
            timeouts: Per-operation client timeouts (:class:`Timeouts`).
            retry: Retry policy of idempotent operations (:class:`RetryPolicy`).
            max_reconnect_attempts: Reconnect attempts after a lost connection (0: none,
                -1: forever).
            inbox_prefix: Where replies come back; must match your account's permissions.

        Raises:
            Unavailable: No server could be reached.
            TypeError, ValueError: A bad argument.
        """
        if isinstance(servers, str):
            server_list = [s.strip() for s in servers.split(",") if s.strip()]
        elif isinstance(servers, (list, tuple)) and all(isinstance(s, str) for s in servers):
            server_list = list(servers)
        else:
            raise TypeError("servers must be a URL or a list of URLs")
        if not server_list:
            raise ValueError("no server URL given")
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise TypeError("tls must be an ssl.SSLContext")
        subjects = _wire.Subjects(prefix)  # checks the prefix before connecting
        options: Dict[str, Any] = {}
        if user is not None:
            options["user"], options["password"] = user, password
        if token is not None:
            options["token"] = token
        if creds is not None:
            options["user_credentials"] = os.fspath(creds)
        if tls is not None:
            options["tls"] = tls
        if tls_hostname is not None:
            options["tls_hostname"] = tls_hostname
        holder: List[Transport] = []

        async def on_disconnected() -> None:
            if holder:
                await holder[0].on_disconnected()

        async def on_error(err: Exception) -> None:
            # Refused (re)connects are expected while a server restarts; the rest is news.
            level = logging.DEBUG if isinstance(err, OSError) else logging.WARNING
            log.log(level, "nats: %r", err)

        try:
            # nats-py retries the first connection like a reconnect; bound it as a whole.
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=server_list,
                    name=name,
                    connect_timeout=connect_timeout_s,
                    max_reconnect_attempts=max_reconnect_attempts,
                    reconnect_time_wait=0.5,
                    allow_reconnect=max_reconnect_attempts != 0,
                    disconnected_cb=on_disconnected,
                    closed_cb=on_disconnected,
                    error_cb=on_error,
                    inbox_prefix=inbox_prefix,
                    **options,
                ),
                connect_timeout_s,
            )
        except (nats.errors.Error, OSError, ssl.SSLError, asyncio.TimeoutError) as err:
            raise Unavailable(
                f"cannot connect to {', '.join(server_list)} within {connect_timeout_s:g}s: "
                f"{err!r}"
            ) from None
        transport = Transport(nc, subjects, timeouts or Timeouts(), retry or RetryPolicy(), True)
        holder.append(transport)
        await transport.start()
        return cls(transport)

    @classmethod
    async def from_nats(
        cls,
        nc: NatsClient,
        *,
        prefix: str = "hearth",
        timeouts: Optional[Timeouts] = None,
        retry: Optional[RetryPolicy] = None,
    ) -> "AsyncHearth":
        """A client on a connection you opened and will close yourself. A lost connection is then
        noticed by timeouts only (the SDK cannot hook your connection's callbacks)."""
        if not isinstance(nc, NatsClient):
            raise TypeError("nc must be a nats.aio.client.Client")
        transport = Transport(
            nc, _wire.Subjects(prefix), timeouts or Timeouts(), retry or RetryPolicy(), False
        )
        await transport.start()
        return cls(transport)

    @property
    def nats(self) -> NatsClient:
        """The underlying nats-py connection."""
        return self._transport.nc

    async def close(self) -> None:
        """Closes the client (and the connection, if :meth:`connect` opened it). Requests still
        waiting fail with :class:`Unavailable`. Sessions are not released."""
        await self._transport.close()

    async def __aenter__(self) -> "AsyncHearth":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()


class AsyncSessions:
    """``client.sessions``: create, get and list sessions."""

    def __init__(self, client: AsyncHearth) -> None:
        self._client = client
        self._transport = client._transport

    async def create(
        self,
        template: Optional[str] = None,
        *,
        ttl_s: Optional[int] = None,
        idle_timeout_s: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        wait_ms: Optional[int] = None,
        session_id: Optional[str] = None,
        deadline_s: Optional[float] = None,
    ) -> "AsyncSession":
        """Claims a session: a warm VM from the template's pool, else a cold restore within
        ``wait_ms``.

        The request carries a ``session_id`` (generated unless given) that stays the same across
        retries, so a retry never creates a second session. No capacity (503), deadline (504),
        timeouts and no responders are retried after ``retry_after_ms`` until ``deadline_s``
        (default: the client's :class:`RetryPolicy`).

        Args:
            template: The template to claim from (the server's default: ``default``).
            ttl_s: Lifetime in seconds of running time.
            idle_timeout_s: Seconds without activity after which the VM is stopped (resumed by the
                next exec).
            labels: Free-form labels (at most 64), usable as a filter in :meth:`list`.
            wait_ms: How long the server may spend on a cold restore; 0 = warm or nothing.
            session_id: Your own idempotency key (``[A-Za-z0-9_-]{1,128}``).
            deadline_s: How long to keep retrying.

        Raises:
            NotFound: No such template.
            Conflict: ``session_id`` names a session of another template.
            NoCapacity: Still no capacity at the deadline.
            QuotaExceeded: Your tenant's quota is used up.
        """
        sid = new_session_id() if session_id is None else session_id
        body = _wire.session_body(
            template=template,
            session_id=sid,
            ttl_s=ttl_s,
            idle_timeout_s=idle_timeout_s,
            labels=labels,
            wait_ms=wait_ms,
        )
        timeouts = self._transport.timeouts
        wait_s = timeouts.claim_wait_s if wait_ms is None else wait_ms / 1000
        reply = await self._transport.call(
            self._transport.subjects.create(),
            body,
            timeouts.request_s + wait_s,
            retry=True,
            deadline_s=deadline_s,
        )
        return AsyncSession(self._transport, SessionInfo.from_wire(reply))

    async def get(self, session_id: str) -> "AsyncSession":
        """A handle on an existing session (e.g. one created by another process).

        Raises:
            NotFound: No such session.
        """
        _wire.check_id(session_id, "session_id")
        reply = await self._transport.call(
            self._transport.subjects.session(session_id, "get"),
            {},
            self._transport.timeouts.request_s,
            retry=True,
        )
        return AsyncSession(self._transport, SessionInfo.from_wire(reply))

    async def list(
        self, *, template: Optional[str] = None, labels: Optional[Mapping[str, str]] = None
    ) -> List["AsyncSession"]:
        """Sessions of ``template`` carrying all of ``labels``, oldest first."""
        body: Dict[str, Any] = {}
        if template is not None:
            body["template"] = _wire.check_id(template, "template")
        if labels:
            body["labels"] = _wire.check_labels(labels)
        elif labels is not None:
            _wire.check_labels(labels)
        reply = await self._transport.call(
            self._transport.subjects.list(), body, self._transport.timeouts.request_s, retry=True
        )
        return [
            AsyncSession(self._transport, SessionInfo.from_wire(s))
            for s in reply.get("sessions") or []
            if isinstance(s, dict)
        ]


class AsyncTemplates:
    """``client.templates``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def list(self) -> List[Template]:
        """Every template, by name."""
        reply = await self._transport.call(
            self._transport.subjects.templates(), {}, self._transport.timeouts.request_s,
            retry=True,
        )
        return [Template.from_wire(t) for t in reply.get("templates") or [] if isinstance(t, dict)]


class AsyncPools:
    """``client.pools``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def status(self) -> List[PoolStatus]:
        """Each template's warm pool, by template name."""
        reply = await self._transport.call(
            self._transport.subjects.pools(), {}, self._transport.timeouts.request_s, retry=True
        )
        return [PoolStatus.from_wire(p) for p in reply.get("pools") or [] if isinstance(p, dict)]


class AsyncSession:
    """A handle on one session: run commands, move files, keep it alive, release it.

    ``async with session:`` releases it on exit. ``info`` is the session as last reported by the
    scheduler (refresh it with :meth:`refresh`).
    """

    def __init__(self, transport: Transport, info: SessionInfo) -> None:
        self._transport = transport
        self.info = info
        self.files = AsyncFiles(self)
        #: Background processes: start, list, reattach (:mod:`hearth_sandbox.processes`).
        self.processes = AsyncProcesses(self)

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self.info.session_id

    @property
    def id(self) -> str:
        """Alias of :attr:`session_id`."""
        return self.info.session_id

    def __repr__(self) -> str:
        return f"AsyncSession({self.info.session_id!r}, state={self.info.state!r})"

    def _subject(self, op: str) -> str:
        return self._transport.subjects.session(self.info.session_id, op)

    def _data_subject(self, op: str) -> str:
        """The subject of a data-plane op; fails at once on a session this handle saw end (ended
        is final: nothing would serve it)."""
        if self.info.is_terminal:
            raise SessionEnded(f"session {self.info.session_id} is {self.info.state}",
                               state=self.info.state)
        return self._subject(op)

    async def _control(self, op: str, body: Dict[str, Any], timeout: Optional[float] = None,
                       retry: bool = True) -> Dict[str, Any]:
        return await self._transport.call(
            self._subject(op), body, timeout or self._transport.timeouts.request_s, retry=retry
        )

    async def refresh(self) -> SessionInfo:
        """Fetches the session's current record into :attr:`info` and returns it."""
        self.info = SessionInfo.from_wire(await self._control("get", {}))
        return self.info

    async def keepalive(self, ttl_s: Optional[int] = None) -> SessionInfo:
        """Sets the remaining lifetime to ``ttl_s`` seconds from now (default: its TTL)."""
        body = {} if ttl_s is None else {"ttl_s": _wire.check_int(ttl_s, "ttl_s", 1)}
        self.info = SessionInfo.from_wire(await self._control("keepalive", body))
        return self.info

    async def release(self) -> SessionInfo:
        """Ends the session now and destroys its VM. Releasing twice is fine."""
        self.info = SessionInfo.from_wire(await self._control("release", {}))
        return self.info

    async def pause(self, *, upload: Optional[bool] = None) -> SessionInfo:
        """Pauses the session to disk: its VM's memory, running programs and files are kept and
        the VM ends (no host memory on VM workers). The next exec, file transfer or keepalive
        resumes it where it was. Pausing a paused session is fine.

        ``upload`` (default: the template's ``pause_upload``) also puts the paused state in the
        fleet's object store, so the session survives the loss of its worker (``pause_uploaded``
        in the reply; ``detail`` says why when it was not uploaded). VM providers only: a worker
        that keeps paused sessions in memory answers ``upload=True`` with BadRequest.

        Raises:
            Conflict: A command or file transfer is running in it (retry when it is done), or it
                has ended.
        """
        self.info = SessionInfo.from_wire(
            await self._control(
                "pause",
                {} if upload is None else {"upload": upload},
                self._transport.timeouts.snapshot_s,
            )
        )
        return self.info

    async def fork(
        self,
        count: int,
        *,
        ttl_s: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> "AsyncForkResult":
        """Branches the session into ``count`` new sessions: each sees this session's files (and,
        on VM workers, its memory: programs it runs run on in every copy) as they are now, with
        an identity of its own (host name, machine id, random stream), and diverges from then
        on. The copies' ids are generated here, so the call is retried safely.

        Returns:
            The copies made and, separately, those that could not be made (partial success).

        Raises:
            QuotaExceeded: The copies do not fit the tenant's session quota (nothing was done).
        """
        body: Dict[str, Any] = {
            "count": _wire.check_int(count, "count", 1, 64),
            "session_ids": [new_session_id() for _ in range(count)],
        }
        if ttl_s is not None:
            body["ttl_s"] = _wire.check_int(ttl_s, "ttl_s", 1)
        if labels is not None:
            body["labels"] = _wire.check_labels(labels)
        reply = await self._control("fork", body, self._transport.timeouts.snapshot_s * 2)
        sessions = [
            AsyncSession(self._transport, SessionInfo.from_wire(s))
            for s in reply.get("sessions") or []
            if isinstance(s, dict)
        ]
        failed: List[Tuple[Optional[str], HearthError]] = []
        for f in reply.get("failed") or []:
            if not isinstance(f, dict):
                continue
            raw = f.get("error")
            err: Dict[str, Any] = raw if isinstance(raw, dict) else {}
            code = err.get("code")
            failed.append((
                f.get("session_id") if isinstance(f.get("session_id"), str) else None,
                error_for_code(
                    code if isinstance(code, int) else 500,
                    str(err.get("message", "")),
                    subject=self._subject("fork"),
                    retry_after_ms=err.get("retry_after_ms"),
                ),
            ))
        return AsyncForkResult(sessions, failed)

    async def snapshot(self, template: str, *, min_ready: Optional[int] = None) -> Template:
        """Captures the session's VM as a new template others can create sessions from.

        Not retried (a repeat is a 409 once the template exists).

        Raises:
            Conflict: A template of that name exists.
        """
        body: Dict[str, Any] = {"template": _wire.check_id(template, "template")}
        if min_ready is not None:
            body["min_ready"] = _wire.check_int(min_ready, "min_ready", 0, 2**32 - 1)
        reply = await self._control(
            "snapshot", body, self._transport.timeouts.snapshot_s, retry=False
        )
        return Template.from_wire(reply)

    async def exec(
        self,
        command: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[_wire.Data] = None,
        timeout_ms: int = _wire.DEFAULT_EXEC_TIMEOUT_MS,
        max_output_bytes: Optional[int] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        retry: bool = False,
    ) -> ExecResult:
        """Runs a command and waits for it.

        Args:
            command: A ``str`` runs through ``sh -c`` (pipes, ``$VARS``); a list of ``str`` is an
                argv run directly.
            env: Extra environment variables.
            cwd: Working directory, relative to the session's volume.
            stdin: Bytes (or text) written to the command's stdin.
            timeout_ms: Kill the command after this long (the result says ``timed_out``).
            max_output_bytes: Keep at most this much of each of stdout and stderr (1 MiB).
            on_stdout, on_stderr: Called with output as it is produced (the command is then
                streamed); the result still holds the whole output.
            retry: Retry like idempotent operations (timeouts, 503, 504, no responders). Only for
                commands that are safe to run twice; not with the callbacks.

        Returns:
            The :class:`ExecResult`; a non-zero exit code is a result, not an exception.

        Raises:
            SessionEnded: The session was released or lost.
            Timeout: No reply within ``timeout_ms`` + the exec grace; the command may have run.
            Unavailable: The connection was lost (``may_have_run`` says whether it was sent).
        """
        streamed = on_stdout is not None or on_stderr is not None
        if streamed and retry:
            raise ValueError("retry=True is not available with on_stdout / on_stderr: output "
                             "already delivered cannot be taken back")
        for cb in (on_stdout, on_stderr):
            if cb is not None and not callable(cb):
                raise TypeError("on_stdout / on_stderr must be callable")
        body = _wire.exec_body(
            command,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            stream=streamed,
        )
        if not streamed:
            reply = await self._transport.call(
                self._data_subject("exec"),
                body,
                timeout_ms / 1000 + self._transport.timeouts.exec_grace_s,
                retry=retry,
                session_id=self.info.session_id,
            )
            return ExecResult.from_wire(reply)
        stdout: List[bytes] = []
        stderr: List[bytes] = []
        async with AsyncExecStream(self, body) as stream:
            async for chunk in stream:
                out, cb = (stdout, on_stdout) if chunk.stream == "stdout" else (stderr, on_stderr)
                out.append(chunk.data)
                if cb is not None:
                    done = cb(chunk.data)
                    if inspect.isawaitable(done):
                        await done
        result = stream.result
        return _with_output(result, b"".join(stdout) + result.stdout,
                            b"".join(stderr) + result.stderr)

    def exec_stream(
        self,
        command: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[_wire.Data] = None,
        timeout_ms: int = _wire.DEFAULT_EXEC_TIMEOUT_MS,
        max_output_bytes: Optional[int] = None,
    ) -> "AsyncExecStream":
        """Runs a command, yielding its output as it comes::

            async with session.exec_stream("make test") as stream:
                async for chunk in stream:
                    print(chunk.stream, chunk.text, end="")
            print(stream.result.exit_code)

        The request is sent on entering ``async with`` (or at the first ``async for``). Stopping
        early (``break``, an exception) stops listening and frees everything; the command itself
        runs on until it exits or its ``timeout_ms`` (v1 has no way to cancel it other than
        releasing the session). Arguments as in :meth:`exec`.
        """
        body = _wire.exec_body(
            command,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            stream=True,
        )
        return AsyncExecStream(self, body)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            await self.release()
        except HearthError as err:
            if exc is None:
                raise
            log.warning("releasing %s after an error failed: %s", self.info.session_id, err)


def _with_output(result: ExecResult, stdout: bytes, stderr: bytes) -> ExecResult:
    return dataclasses.replace(result, stdout=stdout, stderr=stderr)


@dataclass
class AsyncForkResult:
    """What :meth:`AsyncSession.fork` made: the copies, and ``(session_id, error)`` for each copy
    that could not be made."""

    sessions: List[AsyncSession]
    failed: List[Tuple[Optional[str], HearthError]]


class AsyncExecStream:
    """A streamed exec: an async iterator of :class:`Chunk` and an async context manager.

    After the last chunk, :attr:`result` holds the :class:`ExecResult` (its ``stdout`` /
    ``stderr`` hold only output that was not streamed, normally nothing).
    """

    def __init__(self, session: AsyncSession, body: Dict[str, Any]) -> None:
        self._session = session
        self._body = body
        self._handle: Optional[StreamHandle] = None
        self._result: Optional[ExecResult] = None
        self._finished = False
        transport = session._transport
        self._budget = body["timeout_ms"] / 1000 + transport.timeouts.exec_grace_s

    @property
    def result(self) -> ExecResult:
        """The final result; only after the stream was read to its end."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: read it to the end first")
        return self._result

    async def start(self) -> None:
        """Sends the request (done for you by ``async with`` or the first ``async for``)."""
        if self._handle is not None or self._finished:
            return
        transport = self._session._transport
        self._handle = await transport.open_stream(
            self._session._data_subject("exec"), _wire.encode(self._body)
        )

    def __aiter__(self) -> "AsyncExecStream":
        return self

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        if self._handle is None:
            await self.start()
        assert self._handle is not None
        try:
            while True:
                msg = await self._handle.next(self._budget)
                headers = msg.headers
                kind = headers.get(_wire.CHUNK_HEADER) if headers else None
                if kind is not None:
                    if kind not in ("stdout", "stderr"):
                        raise HearthServerError(f"unknown chunk kind {kind!r}",
                                                subject=self._handle.subject)
                    if msg.data:
                        return Chunk(kind, msg.data)
                    continue
                self._result = await self._final(msg.headers, msg.data)
                self.close()
                raise StopAsyncIteration
        except StopAsyncIteration:
            raise
        except BaseException:
            self.close()
            raise

    async def _final(self, headers: Optional[Dict[str, str]], data: bytes) -> ExecResult:
        assert self._handle is not None
        subject = self._handle.subject
        if _wire.is_no_responders(headers, data):
            # Nothing was delivered: ask the scheduler why nobody serves the session.
            transport = self._session._transport
            raise await transport.explain(
                self._session.session_id, Unavailable("no responders", subject=subject)
            )
        error = _wire.reply_error(subject, headers, data)
        if error is not None:
            raise error
        return ExecResult.from_wire(_wire.decode(subject, data))

    async def wait(self) -> ExecResult:
        """Reads (and drops) the rest of the output and returns the result."""
        async for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stops listening. Idempotent; chunks that arrive later are dropped."""
        self._finished = True
        if self._handle is not None:
            self._handle.close()

    async def aclose(self) -> None:
        """Same as :meth:`close`, for ``contextlib.aclosing`` and friends."""
        self.close()

    async def __aenter__(self) -> "AsyncExecStream":
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned stream (never closed) must not keep its reply entry.
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()


class AsyncFiles:
    """``session.files``: write and read files in the session's volume.

    Paths are relative to the volume (the directory commands start in). A whole file travels in
    one NATS message when it fits the server's ``max_payload``; larger ones are split into parts
    joined (or read back) by a command in the session, so they need ``sh`` and ``cat`` there.
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._transport = session._transport

    def _part_limit(self) -> int:
        # Room for the request's other fields and framing.
        return max(self._transport.nc.max_payload - 64 * 1024, 64 * 1024)

    async def write(self, path: str, data: _wire.Data, *, mode: Optional[int] = None) -> int:
        """Writes ``data`` (bytes, or text as UTF-8) to ``path``, replacing the file, creating
        parent directories; ``mode`` defaults to ``0o644``. Returns the bytes written.

        Raises:
            BadRequest: A path outside the volume.
            InsufficientStorage: The session's disk quota is full.
        """
        _wire.check_path(path)
        content = _wire.check_data(data, "data")
        if mode is not None:
            _wire.check_mode(mode)
        limit = self._part_limit()
        if len(content) <= limit:
            return await self._put(path, content, mode)
        _check_confined(path)
        parts = []
        for i in range(0, len(content), limit):
            part = f"{path}.hearth-part-{i // limit:05d}"
            await self._put(part, content[i:i + limit], None)
            parts.append(part)
        script = 'out="$1"; mode="$2"; shift 2; cat -- "$@" > "$out" && rm -f -- "$@" ' \
                 '&& chmod "$mode" "$out"'
        result = await self._session.exec(
            ["sh", "-c", script, "sh", path, format(mode if mode is not None else 0o644, "o"),
             *parts],
            timeout_ms=600_000,
            retry=True,  # joining the same parts again gives the same file
        )
        if not result.ok:
            raise _join_error(path, result)
        return len(content)

    async def _put(self, path: str, data: bytes, mode: Optional[int]) -> int:
        body: Dict[str, Any] = {"path": path, "data": data}
        if mode is not None:
            body["mode"] = mode
        reply = await self._transport.call(
            self._session._data_subject("files.put"),
            body,
            self._transport.timeouts.request_s,
            retry=True,  # writing the same bytes again leaves the same file
            session_id=self._session.session_id,
        )
        size = reply.get("size")
        return size if isinstance(size, int) else len(data)

    async def read(self, path: str, *, max_bytes: Optional[int] = None) -> bytes:
        """Reads a whole file.

        Files larger than one NATS message are read through a streamed ``cat`` in the session.

        Raises:
            NotFound: No such file.
            BadRequest: A path outside the volume, a directory, or a file over ``max_bytes``.
        """
        _wire.check_path(path)
        if max_bytes is not None:
            _wire.check_int(max_bytes, "max_bytes", 0)
        limit = self._part_limit()
        body: Dict[str, Any] = {"path": path, "max_bytes": min(limit, max_bytes or limit)}
        try:
            reply = await self._transport.call(
                self._session._data_subject("files.get"),
                body,
                self._transport.timeouts.request_s,
                retry=True,
                session_id=self._session.session_id,
            )
        except BadRequest:
            # Possibly just too large for one message: read it with cat when the caller allows
            # more and the path is one files.get would accept. Anything else fails as it was.
            if (max_bytes is not None and max_bytes <= limit) or not _is_confined(path):
                raise
            result = await self._session.exec(
                ["cat", "--", path],
                max_output_bytes=min(max_bytes or _wire.MAX_OUTPUT_BYTES,
                                     _wire.MAX_OUTPUT_BYTES),
                timeout_ms=600_000,
                on_stdout=_ignore,  # streamed: the output does not fit one message either
            )
            if not result.ok or result.stdout_truncated:
                raise
            return result.stdout
        data = reply.get("data")
        return data if isinstance(data, bytes) else b""

    async def read_text(self, path: str, *, encoding: str = "utf-8") -> str:
        """Reads a file as text."""
        return (await self.read(path)).decode(encoding)


def _ignore(_data: bytes) -> None:
    return None


def _is_confined(path: str) -> bool:
    return not path.startswith("/") and ".." not in posixpath.normpath(path).split("/")


def _check_confined(path: str) -> None:
    if not _is_confined(path):
        raise BadRequest(f"path {path!r} is outside the session's volume")


def _join_error(path: str, result: ExecResult) -> HearthError:
    text = result.stderr_text.strip()
    if "No space left" in text:
        return InsufficientStorage(f"writing {path}: {text}")
    return HearthServerError(f"joining the parts of {path} failed ({result.exit_code}): {text}")
