"""The v1 wire contract (docs/PROTOCOL.md): subjects, request bodies checked before anything is
sent, and replies turned into data or the mapped exception."""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import msgpack

from .errors import BadRequest, HearthError, HearthServerError, error_for_code

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_TEXT_HEADER = "Nats-Service-Error"
CHUNK_HEADER = "Hearth-Chunk"
#: The NATS server's own header on a status message ("503" with no body: no responders).
STATUS_HEADER = "Status"

#: Exec limits (PROTOCOL.md §10).
MAX_TIMEOUT_MS = 86_400_000
MAX_OUTPUT_BYTES = 64 << 20
DEFAULT_EXEC_TIMEOUT_MS = 60_000
MAX_PATH_BYTES = 4096
MAX_LABELS = 64

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\Z")

Data = Union[bytes, bytearray, memoryview, str]


class Subjects:
    """Every subject the SDK uses: the ``<prefix>.v1.*`` request subjects, nothing else (replies
    come back on the connection's ``_INBOX``), so tenant credentials are enough."""

    __slots__ = ("root",)

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        if not _PREFIX.match(prefix):
            raise ValueError(f"prefix {prefix!r} must be dot-separated tokens of [A-Za-z0-9_-]")
        self.root = f"{prefix}.v1"

    def create(self) -> str:
        return f"{self.root}.sessions.create"

    def list(self) -> str:
        return f"{self.root}.sessions.list"

    def session(self, session_id: str, op: str) -> str:
        return f"{self.root}.sessions.{session_id}.{op}"

    def templates(self) -> str:
        return f"{self.root}.templates.list"

    def pools(self) -> str:
        return f"{self.root}.pools.status"


# ---- argument checks: TypeError / ValueError before anything is sent ----


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not _ID.match(value):
        raise ValueError(f"{what} {value!r} must be 1-128 characters of [A-Za-z0-9_-]")
    return value


def check_int(value: Any, what: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be {bound}, got {value}")
    return value


def check_str_map(value: Any, what: str) -> Dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of str to str, not {type(value).__name__}")
    out: Dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise TypeError(f"{what} must map str to str; {key!r}: {val!r} does not")
        out[key] = val
    return out


def check_labels(value: Any) -> Dict[str, str]:
    labels = check_str_map(value, "labels")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, val in labels.items():
        if not 1 <= len(key.encode()) <= 256 or len(val.encode()) > 256:
            raise ValueError(f"label {key!r}: keys are 1-256 bytes, values at most 256")
    return labels


def check_path(value: Any, what: str = "path") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or len(value.encode()) > MAX_PATH_BYTES or "\0" in value:
        raise ValueError(f"{what} must be 1-{MAX_PATH_BYTES} bytes without NUL, got {value!r}")
    return value


def check_data(value: Any, what: str) -> bytes:
    """bytes for a byte field; ``str`` is sent as its UTF-8 bytes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def session_body(
    *,
    template: Optional[str],
    session_id: str,
    ttl_s: Optional[int],
    idle_timeout_s: Optional[int],
    labels: Optional[Mapping[str, str]],
    wait_ms: Optional[int],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"session_id": check_id(session_id, "session_id")}
    if template is not None:
        body["template"] = check_id(template, "template")
    if ttl_s is not None:
        body["ttl_s"] = check_int(ttl_s, "ttl_s", 1)
    if idle_timeout_s is not None:
        body["idle_timeout_s"] = check_int(idle_timeout_s, "idle_timeout_s", 1)
    if labels:
        body["labels"] = check_labels(labels)
    elif labels is not None:
        check_labels(labels)
    if wait_ms is not None:
        body["wait_ms"] = check_int(wait_ms, "wait_ms", 0)
    return body


def exec_body(
    command: Union[str, Sequence[str]],
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Optional[Data],
    timeout_ms: int,
    max_output_bytes: Optional[int],
    stream: bool,
) -> Dict[str, Any]:
    """An ExecRequest: a ``str`` runs through ``sh -c``, a sequence of ``str`` is an argv."""
    body: Dict[str, Any] = {}
    if isinstance(command, str):
        if not command:
            raise ValueError("the command is empty")
        body["cmd"] = command
    elif isinstance(command, (list, tuple)):
        argv = list(command)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError("argv must be a non-empty list of str")
        if not argv[0]:
            raise ValueError("argv[0] is empty")
        body["argv"] = argv
    else:
        raise TypeError(
            f"command must be a str (run by sh -c) or a list of str (argv), "
            f"not {type(command).__name__}"
        )
    if env:
        env = check_str_map(env, "env")
        for name in env:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"env name {name!r} must be non-empty, without '=' or NUL")
        body["env"] = env
    elif env is not None:
        check_str_map(env, "env")
    if cwd is not None:
        body["cwd"] = check_path(cwd, "cwd")
    if stdin is not None:
        body["stdin"] = check_data(stdin, "stdin")
    body["timeout_ms"] = check_int(timeout_ms, "timeout_ms", 1, MAX_TIMEOUT_MS)
    if max_output_bytes is not None:
        body["max_output_bytes"] = check_int(
            max_output_bytes, "max_output_bytes", 0, MAX_OUTPUT_BYTES
        )
    if stream:
        body["stream"] = True
    return body


def check_mode(mode: Any) -> int:
    return check_int(mode, "mode", 0, 0o7777)


# ---- replies ----

_packb = msgpack.Packer().pack


def encode(body: Mapping[str, Any]) -> bytes:
    data: bytes = _packb(body)
    return data


def is_no_responders(headers: Optional[Dict[str, str]], data: bytes) -> bool:
    return bool(headers) and not data and headers.get(STATUS_HEADER) == "503"  # type: ignore[union-attr]


def reply_error(subject: str, headers: Optional[Dict[str, str]], data: bytes) -> Optional[HearthError]:
    """The exception an error reply carries, or ``None`` for a normal reply. A reply is an error
    exactly when it has the ``Nats-Service-Error-Code`` header."""
    if not headers:
        return None
    code_text = headers.get(ERROR_CODE_HEADER)
    if code_text is None:
        return None
    try:
        code = int(code_text.strip())
    except ValueError:
        code = 500
    message = headers.get(ERROR_TEXT_HEADER, "error")
    retry_after_ms: Optional[int] = None
    try:
        body = msgpack.unpackb(data) if data else None
    except Exception:  # the headers alone are enough
        body = None
    if isinstance(body, dict):
        text = body.get("message")
        if isinstance(text, str) and text:
            message = text
        retry = body.get("retry_after_ms")
        if isinstance(retry, int) and not isinstance(retry, bool):
            retry_after_ms = retry
    return error_for_code(code, message, subject=subject, retry_after_ms=retry_after_ms)


def decode(subject: str, data: bytes) -> Dict[str, Any]:
    """A normal reply body as a dict (an empty body is ``{}``)."""
    if not data:
        return {}
    try:
        body = msgpack.unpackb(data)
    except Exception as err:
        raise HearthServerError(f"undecodable reply: {err}", subject=subject) from None
    if not isinstance(body, dict):
        raise HearthServerError(f"undecodable reply: not a map but {type(body).__name__}",
                                subject=subject)
    return body
