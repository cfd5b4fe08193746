#!/usr/bin/env python3
"""Hearth wire contract v1: a complete client in Python (nats-py + msgpack).

Creates a session, runs a command, runs a streamed command, writes and reads a file, and releases
the session, printing each step. Exits 0 on success and 1 on any failure.

    pip install nats-py msgpack
    python3 docs/examples/hearth_example.py --url nats://127.0.0.1:4222

See docs/PROTOCOL.md for the contract this implements.
"""

import argparse
import asyncio
import sys
import uuid

import msgpack
import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_TEXT_HEADER = "Nats-Service-Error"
CHUNK_HEADER = "Hearth-Chunk"

# Codes worth retrying later with the same request (see PROTOCOL.md, "Errors").
RETRYABLE_CODES = {429, 503, 504}


class HearthError(Exception):
    """The service answered with an error reply."""

    def __init__(self, subject, code, message, retry_after_ms=None):
        super().__init__(f"{subject}: {code} {message}")
        self.subject = subject
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class NoResponders(Exception):
    """Nobody serves the subject. The request was not delivered, so it is safe to resend."""


class Timeout(Exception):
    """No reply in time. The request may or may not have taken effect."""


def check_error(subject, msg):
    """Raises HearthError if `msg` is an error reply; returns otherwise."""
    headers = msg.headers or {}
    if headers.get("Status") == "503" and not msg.data:
        # A status message from the NATS server itself, not from Hearth.
        raise NoResponders(subject)
    code_text = headers.get(ERROR_CODE_HEADER)
    if code_text is None:
        return
    try:
        code = int(code_text.strip())
    except ValueError:
        code = 500
    message = headers.get(ERROR_TEXT_HEADER, "error")
    retry_after_ms = None
    try:
        body = msgpack.unpackb(msg.data) if msg.data else {}
        if isinstance(body, dict):
            message = body.get("message", message)
            retry_after_ms = body.get("retry_after_ms")
    except Exception:
        pass  # the headers alone are enough
    raise HearthError(subject, code, message, retry_after_ms)


def decode_reply(subject, msg):
    """The reply body as a dict, or the error it carries."""
    check_error(subject, msg)
    return msgpack.unpackb(msg.data) if msg.data else {}


class Hearth:
    """A minimal Hearth client. `prefix` must match the deployment (default `hearth`)."""

    def __init__(self, nc, prefix="hearth", timeout=10.0, exec_grace=30.0):
        self.nc = nc
        self.root = f"{prefix}.v1"
        self.timeout = timeout  # seconds, control requests
        self.exec_grace = exec_grace  # seconds beyond timeout_ms, for the lock wait and transfer

    async def request(self, subject, body, timeout):
        """One request/reply round trip; the decoded reply or an exception."""
        payload = msgpack.packb(body)  # a map with field names; bytes become msgpack bin
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout)
        except NoRespondersError:
            raise NoResponders(subject) from None
        except NatsTimeoutError:
            raise Timeout(f"{subject}: no reply within {timeout}s") from None
        return decode_reply(subject, msg)

    async def request_with_retry(self, subject, body, timeout, attempts=5):
        """For idempotent requests only: retries timeouts, no responders and 429/503/504."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return await self.request(subject, body, timeout)
            except HearthError as err:
                if err.code not in RETRYABLE_CODES or attempt == attempts:
                    raise
                wait = err.retry_after_ms / 1000 if err.retry_after_ms else delay
                print(f"  {err.code} {err.message}; retrying in {wait:.1f}s")
            except (Timeout, NoResponders) as err:
                if attempt == attempts:
                    raise
                wait = delay
                print(f"  {type(err).__name__}: {err}; retrying in {wait:.1f}s")
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)

    # ---- client API (scheduler) ----

    async def create_session(self, template="default", session_id=None, ttl_s=None,
                             idle_timeout_s=None, labels=None, wait_ms=None):
        # The session_id is the idempotency key: choose it once, reuse it on every retry, so a
        # retry after a timeout returns the same session instead of claiming a second one.
        body = {"template": template, "session_id": session_id or uuid.uuid4().hex}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if idle_timeout_s is not None:
            body["idle_timeout_s"] = idle_timeout_s
        if labels:
            body["labels"] = labels
        if wait_ms is not None:
            body["wait_ms"] = wait_ms
        timeout = self.timeout + (wait_ms or 0) / 1000
        return await self.request_with_retry(f"{self.root}.sessions.create", body, timeout)

    async def get_session(self, sid):
        return await self.request_with_retry(f"{self.root}.sessions.{sid}.get", {}, self.timeout)

    async def keepalive(self, sid, ttl_s=None):
        body = {} if ttl_s is None else {"ttl_s": ttl_s}
        return await self.request_with_retry(
            f"{self.root}.sessions.{sid}.keepalive", body, self.timeout)

    async def release(self, sid):
        # Idempotent: releasing a released session returns it again.
        return await self.request_with_retry(
            f"{self.root}.sessions.{sid}.release", {}, self.timeout)

    async def pools_status(self):
        return await self.request_with_retry(f"{self.root}.pools.status", {}, self.timeout)

    # ---- data plane (the worker holding the session's VM) ----

    async def _data_plane(self, sid, op, body, timeout, idempotent):
        subject = f"{self.root}.sessions.{sid}.{op}"
        try:
            if idempotent:
                return await self.request_with_retry(subject, body, timeout, attempts=3)
            return await self.request(subject, body, timeout)
        except NoResponders:
            await self._explain_no_responders(sid, subject)

    async def _explain_no_responders(self, sid, subject):
        # Nothing was delivered. Either the session is over (released, lost) or unknown, or its
        # worker is gone; the scheduler knows which. get raises HearthError 404 if it is unknown.
        session = await self.get_session(sid)
        raise RuntimeError(
            f"{subject}: no responders; session is {session['state']} "
            f"on worker {session['worker_id']}")

    async def exec(self, sid, cmd=None, argv=None, env=None, cwd=None, stdin=None,
                   timeout_ms=60000, max_output_bytes=None):
        """Runs a command and returns the ExecResult dict. NOT retried: see PROTOCOL.md."""
        body = exec_body(cmd, argv, env, cwd, stdin, timeout_ms, max_output_bytes, stream=False)
        timeout = timeout_ms / 1000 + self.exec_grace
        return await self._data_plane(sid, "exec", body, timeout, idempotent=False)

    async def exec_stream(self, sid, on_chunk, cmd=None, argv=None, env=None, cwd=None,
                          stdin=None, timeout_ms=60000, max_output_bytes=None):
        """Runs a command, calling on_chunk(kind, data) for every chunk as it arrives
        (kind is "stdout" or "stderr"); returns the final ExecResult dict."""
        subject = f"{self.root}.sessions.{sid}.exec"
        body = exec_body(cmd, argv, env, cwd, stdin, timeout_ms, max_output_bytes, stream=True)
        # Output may pause for the whole run, so wait up to the whole budget between messages.
        budget = timeout_ms / 1000 + self.exec_grace
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)  # subscribe BEFORE publishing
        try:
            await self.nc.publish(subject, msgpack.packb(body), reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout=budget)
                except NatsTimeoutError:
                    raise Timeout(f"{subject}: no message within {budget}s") from None
                kind = (msg.headers or {}).get(CHUNK_HEADER)
                if kind is not None:
                    on_chunk(kind, msg.data)  # raw bytes, in order per stream
                    continue
                # The one final message: an ExecResult or an error reply. A status 503 from the
                # NATS server here means nobody serves the subject (check_error raises).
                return decode_reply(subject, msg)
        except NoResponders:
            await self._explain_no_responders(sid, subject)
        finally:
            await sub.unsubscribe()

    async def put_file(self, sid, path, data, mode=None):
        body = {"path": path, "data": data}
        if mode is not None:
            body["mode"] = mode
        # Writing the same bytes twice has the same effect, so a retry is safe.
        reply = await self._data_plane(sid, "files.put", body, self.timeout, idempotent=True)
        return reply["size"]

    async def get_file(self, sid, path, max_bytes=None):
        body = {"path": path}
        if max_bytes is not None:
            body["max_bytes"] = max_bytes
        reply = await self._data_plane(sid, "files.get", body, self.timeout, idempotent=True)
        return reply["data"]


def exec_body(cmd, argv, env, cwd, stdin, timeout_ms, max_output_bytes, stream):
    if (cmd is None) == (argv is None):
        raise ValueError("give exactly one of cmd and argv")
    body = {"timeout_ms": timeout_ms, "stream": stream}
    if cmd is not None:
        body["cmd"] = cmd
    else:
        body["argv"] = list(argv)
    if env:
        body["env"] = env
    if cwd is not None:
        body["cwd"] = cwd
    if stdin is not None:
        body["stdin"] = stdin  # bytes (or str)
    if max_output_bytes is not None:
        body["max_output_bytes"] = max_output_bytes
    return body


def show_result(result):
    print(f"  exit_code={result['exit_code']} signal={result.get('signal')} "
          f"timed_out={result.get('timed_out', False)} duration_ms={result.get('duration_ms', 0)}")
    for name in ("stdout", "stderr"):
        data = result.get(name) or b""
        if data:
            print(f"  {name}: {data.decode('utf-8', 'replace')!r}")
        if result.get(f"{name}_truncated"):
            print(f"  ({name} was truncated at max_output_bytes)")


async def run(args):
    async def on_nats_error(err):
        print(f"nats: {err}", file=sys.stderr)

    nc = await nats.connect(args.url, name="hearth-example", connect_timeout=5,
                            max_reconnect_attempts=3, error_cb=on_nats_error)
    hearth = Hearth(nc, prefix=args.prefix)
    sid = None
    try:
        print("pools.status")
        for pool in (await hearth.pools_status()).get("pools", []):
            print(f"  {pool['template']}: ready={pool['ready']} restoring={pool['restoring']} "
                  f"target={pool['target']} claimed={pool['claimed']}")

        print(f"sessions.create template={args.template}")
        session = await hearth.create_session(
            template=args.template, ttl_s=600, idle_timeout_s=120,
            labels={"example": "hearth_example.py"}, wait_ms=args.wait_ms)
        sid = session["session_id"]
        print(f"  session {sid} on worker {session['worker_id']} "
              f"state={session['state']} warm={session['warm']}")

        print("exec (cmd through sh -c)")
        result = await hearth.exec(sid, cmd="echo hello from hearth; echo oops >&2; exit 3",
                                   timeout_ms=10000)
        show_result(result)
        if result["exit_code"] != 3 or b"hello from" not in result["stdout"]:
            raise RuntimeError("unexpected exec result")

        print("exec (argv, with stdin)")
        result = await hearth.exec(sid, argv=["tr", "a-z", "A-Z"], stdin=b"shout\n")
        show_result(result)
        if result["stdout"] != b"SHOUT\n":
            raise RuntimeError("unexpected exec result")

        print("exec (streamed)")
        chunks = []

        def on_chunk(kind, data):
            chunks.append((kind, data))
            print(f"  chunk {kind}: {data.decode('utf-8', 'replace')!r}")

        result = await hearth.exec_stream(
            sid, on_chunk,
            cmd="for i in 1 2 3; do echo line $i; sleep 0.2; done; echo done >&2",
            timeout_ms=10000)
        show_result(result)
        streamed = b"".join(d for k, d in chunks if k == "stdout") + (result.get("stdout") or b"")
        if result["exit_code"] != 0 or streamed != b"line 1\nline 2\nline 3\n":
            raise RuntimeError(f"unexpected streamed output {streamed!r}")

        print("files.put example/data.bin")
        content = b"hello\n\x00\xff binary is fine\n"
        size = await hearth.put_file(sid, "example/data.bin", content, mode=0o600)
        print(f"  wrote {size} bytes")

        print("files.get example/data.bin")
        data = await hearth.get_file(sid, "example/data.bin")
        print(f"  read {len(data)} bytes, identical={data == content}")
        if data != content:
            raise RuntimeError("file round trip changed the bytes")

        print("files.get ../escape (expect 400)")
        try:
            await hearth.get_file(sid, "../etc/passwd")
            raise RuntimeError("a path outside the volume was accepted")
        except HearthError as err:
            print(f"  rejected: {err.code} {err.message}")
            if err.code != 400:
                raise
    finally:
        if sid is not None:
            print(f"sessions.{sid}.release")
            try:
                session = await hearth.release(sid)
                print(f"  state={session['state']}")
            except Exception as err:  # report, but do not hide the original failure
                print(f"  release failed: {err}", file=sys.stderr)
        await nc.drain()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server URL")
    parser.add_argument("--prefix", default="hearth", help="Hearth subject prefix")
    parser.add_argument("--template", default="default", help="template to claim from")
    parser.add_argument("--wait-ms", type=int, default=30000,
                        help="how long create may wait for a cold restore")
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except (HearthError, NoResponders, Timeout, RuntimeError, OSError,
            nats.errors.Error) as err:
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
