"""Background processes (asyncio): ``session.processes`` starts commands that outlive the call
(and this client), and a :class:`AsyncProcess` handle reads, follows, feeds, signals and waits
for one — from any client of the session, so reattaching after a disconnect is following again
from the last offset seen::

    server = await session.processes.start("python3 -m http.server 8000", tag="web")
    async for chunk in server.stream():          # from offset 0: everything still kept
        print(chunk.text, end="")
        if "Serving HTTP" in chunk.text:
            break
    ...
    await server.kill()
    info = await server.wait()

The session's VM keeps each process's output in a bounded ring buffer; what was dropped shows as
a jump in the chunks' offsets and in ``ProcessOutput.first_offset``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union
from types import TracebackType

from . import _wire
from ._core import StreamHandle
from .errors import HearthServerError, Unavailable
from .types import ProcessChunk, ProcessInfo, ProcessOutput

if TYPE_CHECKING:
    from .aio import AsyncSession

__all__ = ["AsyncProcess", "AsyncProcessStream", "AsyncProcesses"]

OFFSET_HEADER = "Hearth-Offset"
#: The server's follow window (and default ``wait``), seconds.
FOLLOW_WINDOW_S = 60.0
MAX_WAIT_S = 3600.0


def start_body(
    command: Union[str, Sequence[str]],
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: bool,
    pty: Optional[Tuple[int, int]],
    timeout_ms: int,
    tag: Optional[str],
) -> Dict[str, Any]:
    """A ProcessStartRequest, checked like an exec's."""
    body = _wire.exec_body(
        command, env=env, cwd=cwd, stdin=None, timeout_ms=1, max_output_bytes=None,
        stream=False,
    )
    body["timeout_ms"] = _wire.check_int(timeout_ms, "timeout_ms", 0, _wire.MAX_TIMEOUT_MS)
    if not isinstance(stdin, bool):
        raise TypeError("stdin must be a bool (write to the process with Process.write)")
    if stdin:
        body["stdin"] = True
    if pty is not None:
        if not isinstance(pty, (tuple, list)) or len(pty) != 2:
            raise TypeError("pty must be (cols, rows)")
        body["pty"] = {
            "cols": _wire.check_int(pty[0], "cols", 1, 4096),
            "rows": _wire.check_int(pty[1], "rows", 1, 4096),
        }
    if tag is not None:
        if not isinstance(tag, str) or len(tag.encode()) > 256:
            raise ValueError("tag must be a str of at most 256 bytes")
        body["tag"] = tag
    return body


class AsyncProcesses:
    """``session.processes``: start, list and find background processes."""

    def __init__(self, session: "AsyncSession") -> None:
        self._session = session

    async def start(
        self,
        command: Union[str, Sequence[str]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: bool = False,
        pty: Optional[Tuple[int, int]] = None,
        timeout_ms: int = 0,
        tag: Optional[str] = None,
    ) -> "AsyncProcess":
        """Starts a background process and returns at once; it runs until it exits, its own
        ``timeout_ms`` (0: none), a signal, or the session's end.

        Args:
            command: A ``str`` runs through ``sh -c``; a list of ``str`` is an argv.
            env, cwd: As for :meth:`AsyncSession.exec`.
            stdin: Keep stdin open for :meth:`AsyncProcess.write` (otherwise ``/dev/null``).
            pty: ``(cols, rows)``: run on a pseudo-terminal of that size (stdin included).
            timeout_ms: Kill it after this long; 0 runs it until the session ends.
            tag: A label of yours, shown by :meth:`list`.

        Raises:
            QuotaExceeded: The session runs as many processes as it may.
            BadRequest: A bad argument (also checked before sending).
        """
        body = start_body(command, env=env, cwd=cwd, stdin=stdin, pty=pty,
                          timeout_ms=timeout_ms, tag=tag)
        reply = await self._session._transport.call(
            self._session._data_subject("processes.start"),
            body,
            self._session._transport.timeouts.request_s,
            retry=False,  # a second start would be a second process
            session_id=self._session.session_id,
        )
        return AsyncProcess(self._session, _str(reply, "process_id"), pid=_int(reply, "pid"))

    async def list(self) -> List[ProcessInfo]:
        """The session's processes, oldest first: running ones and the latest ended ones."""
        reply = await self._session._transport.call(
            self._session._data_subject("processes.list"),
            {},
            self._session._transport.timeouts.request_s,
            retry=True,
            session_id=self._session.session_id,
        )
        procs = reply.get("processes")
        return [ProcessInfo.from_wire(p) for p in procs if isinstance(p, dict)] \
            if isinstance(procs, list) else []

    def get(self, process_id: str) -> "AsyncProcess":
        """A handle on a process by id (e.g. one another client started); nothing is sent."""
        return AsyncProcess(self._session, _wire.check_id(process_id, "process_id"))


class AsyncProcess:
    """A handle on one background process of a session."""

    def __init__(self, session: "AsyncSession", process_id: str, *, pid: int = 0) -> None:
        self._session = session
        self.process_id = process_id
        #: Its pid inside the VM (0 for a handle from :meth:`AsyncProcesses.get`).
        self.pid = pid

    def __repr__(self) -> str:
        return f"AsyncProcess({self.process_id!r}, session={self._session.session_id!r})"

    def _subject(self, op: str) -> str:
        return self._session._data_subject(f"processes.{self.process_id}.{op}")

    async def _call(self, op: str, body: Dict[str, Any], timeout: float,
                    retry: bool = False) -> Dict[str, Any]:
        return await self._session._transport.call(
            self._subject(op), body, timeout, retry=retry,
            session_id=self._session.session_id,
        )

    async def wait(self, timeout_s: float = FOLLOW_WINDOW_S) -> ProcessInfo:
        """Waits up to ``timeout_s`` for the process to end and returns how it ended.

        Raises:
            DeadlineExceeded: It still runs after ``timeout_s`` (it keeps running).
            NotFound: No such process.
        """
        if not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s <= MAX_WAIT_S:
            raise ValueError(f"timeout_s must be in 0..{MAX_WAIT_S:g}")
        reply = await self._call(
            "wait", {"timeout_ms": int(timeout_s * 1000)},
            timeout_s + self._session._transport.timeouts.request_s,
        )
        return ProcessInfo.from_wire(reply)

    async def output(self, offset: int = 0, *, max_bytes: Optional[int] = None) -> ProcessOutput:
        """The output kept from ``offset`` on (one reply; page on from ``next_offset``)."""
        body: Dict[str, Any] = {"offset": _wire.check_int(offset, "offset", 0)}
        if max_bytes is not None:
            body["max_bytes"] = _wire.check_int(max_bytes, "max_bytes", 1)
        reply = await self._call("output", body, self._session._transport.timeouts.request_s,
                                 retry=True)
        return ProcessOutput.from_wire(reply)

    def stream(self, offset: int = 0) -> "AsyncProcessStream":
        """Follows the output from ``offset`` until the process ends: an async iterator of
        :class:`ProcessChunk`; :attr:`AsyncProcessStream.info` holds how it ended. Reattach
        after a disconnect with ``stream(last_chunk.offset + len(last_chunk.data))``."""
        return AsyncProcessStream(self, _wire.check_int(offset, "offset", 0))

    async def write(self, data: _wire.Data) -> int:
        """Writes to the process's stdin (a PTY's terminal input); the bytes written.

        Raises:
            Conflict: It was started without ``stdin``, stdin was closed, or it ended.
            BadRequest: More than the worker's ``max_stdin_bytes`` in one call.
        """
        reply = await self._call("stdin", {"data": _wire.check_data(data, "data")},
                                 self._session._transport.timeouts.request_s)
        return _int(reply, "written")

    async def close_stdin(self) -> None:
        """Closes stdin (end of input); on a PTY, sends the terminal's end-of-file (Ctrl-D)."""
        await self._call("stdin", {"eof": True}, self._session._transport.timeouts.request_s)

    async def signal(self, signal: str) -> ProcessInfo:
        """Sends a signal by name (``TERM``, ``INT``, ``HUP``, ``KILL``, …) to the process's group.

        Raises:
            BadRequest: An unknown signal name.
            Conflict: The process has ended.
        """
        if not isinstance(signal, str):
            raise TypeError("signal must be a name such as 'TERM'")
        reply = await self._call("signal", {"signal": signal},
                                 self._session._transport.timeouts.request_s)
        return ProcessInfo.from_wire(reply)

    async def kill(self) -> ProcessInfo:
        """``signal("KILL")``."""
        return await self.signal("KILL")

    async def resize(self, cols: int, rows: int) -> None:
        """Resizes the process's PTY (its foreground group gets SIGWINCH).

        Raises:
            Conflict: The process has no PTY.
        """
        body = {"cols": _wire.check_int(cols, "cols", 1, 4096),
                "rows": _wire.check_int(rows, "rows", 1, 4096)}
        await self._call("resize", body, self._session._transport.timeouts.request_s)


class AsyncProcessStream:
    """A followed process: an async iterator of :class:`ProcessChunk` (renewing the server's
    follow windows by itself) and an async context manager. :attr:`offset` is where it would
    go on; :attr:`info` is set once the process ended."""

    def __init__(self, process: AsyncProcess, offset: int) -> None:
        self._process = process
        self.offset = offset
        self.info: Optional[ProcessInfo] = None
        self._handle: Optional[StreamHandle] = None
        self._finished = False

    async def _open(self) -> None:
        session = self._process._session
        body = {"offset": self.offset, "follow": True}
        self._handle = await session._transport.open_stream(
            self._process._subject("output"), _wire.encode(body)
        )

    def __aiter__(self) -> "AsyncProcessStream":
        return self

    async def __anext__(self) -> ProcessChunk:
        if self._finished:
            raise StopAsyncIteration
        transport = self._process._session._transport
        budget = FOLLOW_WINDOW_S + transport.timeouts.exec_grace_s
        try:
            while True:
                if self._handle is None:
                    await self._open()
                assert self._handle is not None
                msg = await self._handle.next(budget)
                headers = msg.headers
                kind = headers.get(_wire.CHUNK_HEADER) if headers else None
                if kind is not None and headers is not None:
                    if kind not in ("stdout", "stderr"):
                        raise HearthServerError(f"unknown chunk kind {kind!r}",
                                                subject=self._handle.subject)
                    try:
                        offset = int(headers.get(OFFSET_HEADER, ""))
                    except ValueError:
                        raise HearthServerError("chunk without a Hearth-Offset",
                                                subject=self._handle.subject) from None
                    self.offset = offset + len(msg.data)
                    return ProcessChunk(kind, offset, msg.data)
                subject = self._handle.subject
                self._handle.close()
                self._handle = None
                if _wire.is_no_responders(headers, msg.data):
                    raise await transport.explain(
                        self._process._session.session_id,
                        Unavailable("no responders", subject=subject),
                    )
                error = _wire.reply_error(subject, headers, msg.data)
                if error is not None:
                    raise error
                final = ProcessOutput.from_wire(_wire.decode(subject, msg.data))
                self.offset = final.next_offset
                if final.process.exited:
                    self.info = final.process
                    self.close()
                    raise StopAsyncIteration
                # The window closed with the process still running: open the next one.
        except StopAsyncIteration:
            raise
        except BaseException:
            self.close()
            raise

    async def wait(self) -> ProcessInfo:
        """Reads (and drops) the rest of the output; how the process ended."""
        async for _ in self:
            pass
        assert self.info is not None
        return self.info

    def close(self) -> None:
        """Stops following (the process runs on). Idempotent."""
        self._finished = True
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    async def __aenter__(self) -> "AsyncProcessStream":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _int(wire: Mapping[str, Any], key: str) -> int:
    value = wire.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(wire: Mapping[str, Any], key: str) -> str:
    value = wire.get(key)
    return value if isinstance(value, str) else ""
