"""The blocking API: :class:`Hearth` and :class:`Session`, the same shape as the asyncio API.

Each :class:`Hearth` runs a private event loop in a background thread (``hearth-sandbox-loop``)
and hands it the async client's coroutines, so callers never run a loop themselves, and the API
works where a loop is already running (Jupyter, an async framework's worker thread)::

    with Hearth.connect("nats://127.0.0.1:4222") as hearth:
        with hearth.sessions.create(template="default") as session:
            print(session.exec("echo hello").stdout_text)

Callbacks (``on_stdout`` / ``on_stderr``) run in the caller's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
import threading
import weakref
from types import TracebackType
from typing import (
    Any,
    Callable,
    Coroutine,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from nats.aio.client import Client as NatsClient

from . import _wire
from ._core import RetryPolicy, Timeouts, log
from .aio import AsyncExecStream, AsyncHearth, AsyncSession, Command, _with_output
from .errors import HearthError
from .processes import FOLLOW_WINDOW_S, AsyncProcess, AsyncProcessStream
from .types import (
    Chunk,
    ExecResult,
    PoolStatus,
    ProcessChunk,
    ProcessInfo,
    ProcessOutput,
    SessionInfo,
    Template,
)

__all__ = [
    "ExecStream",
    "Files",
    "Hearth",
    "Pools",
    "Process",
    "ProcessStream",
    "Processes",
    "Session",
    "Sessions",
    "Templates",
]

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._main, name="hearth-sandbox-loop", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the loop and waits for its outcome in the calling thread."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking Hearth call from inside the SDK's own loop (e.g. from a callback "
                "given to the async API); use the async API there"
            )
        if not self.running:
            coro.close()
            raise RuntimeError("the Hearth client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt: stop waiting on the loop as well
            raise

    def call_soon(self, fn: Callable[[], Any]) -> None:
        if self.running:
            try:
                self.loop.call_soon_threadsafe(fn)
            except RuntimeError:
                pass  # the loop closed meanwhile

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()


class Hearth:
    """A blocking client of one Hearth deployment; see :class:`~hearth_sandbox.AsyncHearth`.

    Attributes:
        sessions: create, get and list sessions.
        templates: list templates.
        pools: warm pool status.
    """

    def __init__(self, runner: _LoopThread, client: AsyncHearth) -> None:
        self._runner = runner
        self._async = client
        # A client dropped without close() still closes its connection and stops its thread.
        self._finalizer = weakref.finalize(self, _shutdown, runner, client)
        self.sessions = Sessions(self)
        self.templates = Templates(self)
        self.pools = Pools(self)

    @classmethod
    def connect(
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
    ) -> "Hearth":
        """Connects to NATS; arguments as in :meth:`AsyncHearth.connect`."""
        runner = _LoopThread()
        try:
            client = runner.run(
                AsyncHearth.connect(
                    servers,
                    user=user,
                    password=password,
                    token=token,
                    creds=creds,
                    tls=tls,
                    tls_hostname=tls_hostname,
                    prefix=prefix,
                    name=name,
                    connect_timeout_s=connect_timeout_s,
                    timeouts=timeouts,
                    retry=retry,
                    max_reconnect_attempts=max_reconnect_attempts,
                    inbox_prefix=inbox_prefix,
                )
            )
        except BaseException:
            runner.stop()
            raise
        return cls(runner, client)

    @property
    def aio(self) -> AsyncHearth:
        """The async client underneath (its coroutines run on this client's own loop only)."""
        return self._async

    @property
    def nats(self) -> NatsClient:
        """The underlying nats-py connection (lives on this client's loop)."""
        return self._async.nats

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        """Closes the connection and stops the background thread. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Hearth":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _shutdown(runner: _LoopThread, client: AsyncHearth) -> None:
    if not runner.running:
        return
    if threading.current_thread() is runner._thread:
        # Collected on its own loop's thread: close there, then stop the loop.
        async def close_then_stop() -> None:
            try:
                await client.close()
            finally:
                runner.loop.stop()

        runner.loop.create_task(close_then_stop())
        return
    try:
        runner.run(client.close())
    finally:
        runner.stop()


class Sessions:
    """``client.sessions``; see :class:`~hearth_sandbox.aio.AsyncSessions`."""

    def __init__(self, client: Hearth) -> None:
        self._client = client

    def create(
        self,
        template: Optional[str] = None,
        *,
        ttl_s: Optional[int] = None,
        idle_timeout_s: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        wait_ms: Optional[int] = None,
        session_id: Optional[str] = None,
        deadline_s: Optional[float] = None,
    ) -> "Session":
        """Claims a session (idempotent by ``session_id``, retried until ``deadline_s``); see
        :meth:`AsyncSessions.create <hearth_sandbox.aio.AsyncSessions.create>`."""
        return Session(
            self._client,
            self._client._run(
                self._client._async.sessions.create(
                    template,
                    ttl_s=ttl_s,
                    idle_timeout_s=idle_timeout_s,
                    labels=labels,
                    wait_ms=wait_ms,
                    session_id=session_id,
                    deadline_s=deadline_s,
                )
            ),
        )

    def get(self, session_id: str) -> "Session":
        """A handle on an existing session. Raises :class:`NotFound` for an unknown id."""
        return Session(self._client, self._client._run(self._client._async.sessions.get(session_id)))

    def list(
        self, *, template: Optional[str] = None, labels: Optional[Mapping[str, str]] = None
    ) -> List["Session"]:
        """Sessions of ``template`` carrying all of ``labels``, oldest first."""
        found = self._client._run(
            self._client._async.sessions.list(template=template, labels=labels)
        )
        return [Session(self._client, s) for s in found]


class Templates:
    """``client.templates``."""

    def __init__(self, client: Hearth) -> None:
        self._client = client

    def list(self) -> List[Template]:
        """Every template, by name."""
        return self._client._run(self._client._async.templates.list())


class Pools:
    """``client.pools``."""

    def __init__(self, client: Hearth) -> None:
        self._client = client

    def status(self) -> List[PoolStatus]:
        """Each template's warm pool, by template name."""
        return self._client._run(self._client._async.pools.status())


class Session:
    """A blocking handle on one session; see :class:`~hearth_sandbox.aio.AsyncSession`.
    ``with session:`` releases it on exit."""

    def __init__(self, client: Hearth, session: AsyncSession) -> None:
        self._client = client
        self._async = session
        self.files = Files(self)
        #: Background processes; see :class:`~hearth_sandbox.processes.AsyncProcesses`.
        self.processes = Processes(self)

    @property
    def info(self) -> SessionInfo:
        """The session as last reported by the scheduler."""
        return self._async.info

    @property
    def session_id(self) -> str:
        return self._async.session_id

    @property
    def id(self) -> str:
        """Alias of :attr:`session_id`."""
        return self._async.session_id

    def __repr__(self) -> str:
        return f"Session({self.info.session_id!r}, state={self.info.state!r})"

    def refresh(self) -> SessionInfo:
        """Fetches the session's current record."""
        return self._client._run(self._async.refresh())

    def keepalive(self, ttl_s: Optional[int] = None) -> SessionInfo:
        """Sets the remaining lifetime to ``ttl_s`` seconds from now (default: its TTL)."""
        return self._client._run(self._async.keepalive(ttl_s))

    def release(self) -> SessionInfo:
        """Ends the session now. Releasing twice is fine."""
        return self._client._run(self._async.release())

    def pause(self, *, upload: Optional[bool] = None) -> SessionInfo:
        """Pauses the session to disk; the next exec, file transfer or keepalive resumes it (see
        :meth:`AsyncSession.pause`)."""
        return self._client._run(self._async.pause(upload=upload))

    def fork(
        self,
        count: int,
        *,
        ttl_s: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> "ForkResult":
        """Branches the session into ``count`` copies (see :meth:`AsyncSession.fork`)."""
        result = self._client._run(self._async.fork(count, ttl_s=ttl_s, labels=labels))
        return ForkResult([Session(self._client, s) for s in result.sessions], result.failed)

    def snapshot(self, template: str, *, min_ready: Optional[int] = None) -> Template:
        """Captures the session as a new template (not retried; 409 if the name exists)."""
        return self._client._run(self._async.snapshot(template, min_ready=min_ready))

    def exec(
        self,
        command: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[_wire.Data] = None,
        timeout_ms: int = _wire.DEFAULT_EXEC_TIMEOUT_MS,
        max_output_bytes: Optional[int] = None,
        on_stdout: Optional[Callable[[bytes], None]] = None,
        on_stderr: Optional[Callable[[bytes], None]] = None,
        retry: bool = False,
    ) -> ExecResult:
        """Runs a command and waits for it; see
        :meth:`AsyncSession.exec <hearth_sandbox.aio.AsyncSession.exec>`. The callbacks run in
        this thread as output arrives."""
        if on_stdout is None and on_stderr is None:
            return self._client._run(
                self._async.exec(
                    command,
                    env=env,
                    cwd=cwd,
                    stdin=stdin,
                    timeout_ms=timeout_ms,
                    max_output_bytes=max_output_bytes,
                    retry=retry,
                )
            )
        if retry:
            raise ValueError("retry=True is not available with on_stdout / on_stderr: output "
                             "already delivered cannot be taken back")
        for cb in (on_stdout, on_stderr):
            if cb is not None and not callable(cb):
                raise TypeError("on_stdout / on_stderr must be callable")
        stdout: List[bytes] = []
        stderr: List[bytes] = []
        with self.exec_stream(
            command,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
        ) as stream:
            for chunk in stream:
                out, cb = (stdout, on_stdout) if chunk.stream == "stdout" else (stderr, on_stderr)
                out.append(chunk.data)
                if cb is not None:
                    cb(chunk.data)
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
    ) -> "ExecStream":
        """Runs a command, yielding its output as it comes::

            with session.exec_stream("make test") as stream:
                for chunk in stream:
                    print(chunk.text, end="")
            print(stream.result.exit_code)
        """
        return ExecStream(
            self._client,
            self._async.exec_stream(
                command,
                env=env,
                cwd=cwd,
                stdin=stdin,
                timeout_ms=timeout_ms,
                max_output_bytes=max_output_bytes,
            ),
        )

    def __enter__(self) -> "Session":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            self.release()
        except HearthError as err:
            if exc is None:
                raise
            log.warning("releasing %s after an error failed: %s", self.session_id, err)


@dataclasses.dataclass
class ForkResult:
    """What :meth:`Session.fork` made: the copies, and ``(session_id, error)`` for each copy that
    could not be made."""

    sessions: List["Session"]
    failed: List[Tuple[Optional[str], HearthError]]


class ExecStream:
    """A streamed exec: an iterator of :class:`Chunk` and a context manager. :attr:`result` is
    set once the stream was read to its end."""

    def __init__(self, client: Hearth, stream: AsyncExecStream) -> None:
        self._client = client
        self._async = stream

    @property
    def result(self) -> ExecResult:
        """The final result (its stdout/stderr hold only output that was not streamed)."""
        return self._async.result

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._client._run(self._async.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def wait(self) -> ExecResult:
        """Reads (and drops) the rest of the output and returns the result."""
        return self._client._run(self._async.wait())

    def close(self) -> None:
        """Stops listening (the command runs on to its end or timeout). Idempotent."""
        self._client._runner.call_soon(self._async.close)

    def __enter__(self) -> "ExecStream":
        self._client._run(self._async.start())
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client._runner.call_soon(self._async.close)


class Files:
    """``session.files``; see :class:`~hearth_sandbox.aio.AsyncFiles`."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._client = session._client

    def write(self, path: str, data: _wire.Data, *, mode: Optional[int] = None) -> int:
        """Writes ``data`` (bytes, or text as UTF-8) to ``path``; returns the bytes written."""
        return self._client._run(self._session._async.files.write(path, data, mode=mode))

    def read(self, path: str, *, max_bytes: Optional[int] = None) -> bytes:
        """Reads a whole file."""
        return self._client._run(self._session._async.files.read(path, max_bytes=max_bytes))

    def read_text(self, path: str, *, encoding: str = "utf-8") -> str:
        """Reads a file as text."""
        return self._client._run(self._session._async.files.read_text(path, encoding=encoding))


class Processes:
    """``session.processes``; see :class:`~hearth_sandbox.processes.AsyncProcesses`."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._client = session._client

    def start(
        self,
        command: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: bool = False,
        pty: Optional[Tuple[int, int]] = None,
        timeout_ms: int = 0,
        tag: Optional[str] = None,
    ) -> "Process":
        """Starts a background process and returns at once (it outlives this client)."""
        started = self._client._run(
            self._session._async.processes.start(
                command, env=env, cwd=cwd, stdin=stdin, pty=pty, timeout_ms=timeout_ms, tag=tag
            )
        )
        return Process(self._client, started)

    def list(self) -> List[ProcessInfo]:
        """The session's processes, oldest first."""
        return self._client._run(self._session._async.processes.list())

    def get(self, process_id: str) -> "Process":
        """A handle on a process by id; nothing is sent."""
        return Process(self._client, self._session._async.processes.get(process_id))


class Process:
    """A blocking handle on one background process; see
    :class:`~hearth_sandbox.processes.AsyncProcess`."""

    def __init__(self, client: Hearth, process: AsyncProcess) -> None:
        self._client = client
        self._async = process

    @property
    def process_id(self) -> str:
        return self._async.process_id

    @property
    def pid(self) -> int:
        return self._async.pid

    def __repr__(self) -> str:
        return f"Process({self.process_id!r})"

    def wait(self, timeout_s: float = FOLLOW_WINDOW_S) -> ProcessInfo:
        """How it ended; :class:`DeadlineExceeded` if it still runs after ``timeout_s``."""
        return self._client._run(self._async.wait(timeout_s))

    def output(self, offset: int = 0, *, max_bytes: Optional[int] = None) -> ProcessOutput:
        """The output kept from ``offset`` on."""
        return self._client._run(self._async.output(offset, max_bytes=max_bytes))

    def stream(self, offset: int = 0) -> "ProcessStream":
        """Follows the output from ``offset`` until the process ends."""
        return ProcessStream(self._client, self._async.stream(offset))

    def write(self, data: _wire.Data) -> int:
        """Writes to its stdin."""
        return self._client._run(self._async.write(data))

    def close_stdin(self) -> None:
        """Closes its stdin (Ctrl-D on a PTY)."""
        self._client._run(self._async.close_stdin())

    def signal(self, signal: str) -> ProcessInfo:
        """Sends a signal by name to its group."""
        return self._client._run(self._async.signal(signal))

    def kill(self) -> ProcessInfo:
        """``signal("KILL")``."""
        return self._client._run(self._async.kill())

    def resize(self, cols: int, rows: int) -> None:
        """Resizes its PTY."""
        self._client._run(self._async.resize(cols, rows))


class ProcessStream:
    """A followed process: an iterator of :class:`ProcessChunk` and a context manager;
    :attr:`info` is set once the process ended."""

    def __init__(self, client: Hearth, stream: AsyncProcessStream) -> None:
        self._client = client
        self._async = stream

    @property
    def info(self) -> Optional[ProcessInfo]:
        """How the process ended, once the stream was read to its end."""
        return self._async.info

    @property
    def offset(self) -> int:
        """Where following would go on (for a later reattach)."""
        return self._async.offset

    def __iter__(self) -> Iterator[ProcessChunk]:
        return self

    def __next__(self) -> ProcessChunk:
        try:
            return self._client._run(self._async.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def wait(self) -> ProcessInfo:
        """Reads (and drops) the rest; how the process ended."""
        return self._client._run(self._async.wait())

    def close(self) -> None:
        """Stops following (the process runs on). Idempotent."""
        self._client._runner.call_soon(self._async.close)

    def __enter__(self) -> "ProcessStream":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
