#!/usr/bin/env python3
"""What the SDK costs over hand-written nats-py: ``sessions.create`` + ``exec("true")`` +
``release``, each timed, through three clients in the same run, interleaved cycle by cycle so
they see the same machine and the same pool:

- ``raw``: ``nc.request`` with a msgpack body and the error header check, nothing else (what
  docs/examples/hearth_example.py does, minus retries);
- ``async``: :class:`hearth_sandbox.AsyncHearth`;
- ``sync``: :class:`hearth_sandbox.Hearth` (adds the hop to its loop thread).

Against a running stack (``scripts/up``)::

    python3 sdk/python/bench/bench_sdk.py --url nats://127.0.0.1:4222

or starting ``hearth up`` from the workspace binaries (``scripts/bench-sdk`` does this with the
release build)::

    python3 sdk/python/bench/bench_sdk.py --start --bin-dir target/release

It also times a cheap control request (``pools.status``) through each client, which isolates the
client's own cost from the server's noise. Prints a markdown table of p50/p99 per operation and the SDK's overhead per call
(p50 SDK − p50 raw), and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import msgpack
import nats

from hearth_sandbox import AsyncHearth, Hearth

# `hearth up` on a free port: the same helper the tests use.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stack import hearth_up  # noqa: E402

OPS = ("create", "exec", "release")
Timings = Dict[str, List[float]]


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Raw:
    """The same three operations with bare nats-py."""

    def __init__(self, nc: Any, prefix: str) -> None:
        self.nc = nc
        self.root = f"{prefix}.v1"

    async def request(self, subject: str, body: Dict[str, Any], timeout: float) -> Any:
        msg = await self.nc.request(subject, msgpack.packb(body), timeout=timeout)
        if msg.headers and "Nats-Service-Error-Code" in msg.headers:
            raise RuntimeError(f"{subject}: {msg.headers}")
        return msgpack.unpackb(msg.data)

    async def pools(self) -> None:
        await self.request(f"{self.root}.pools.status", {}, 10)

    async def cycle(self, out: Timings, warm: List[bool]) -> None:
        t0 = time.perf_counter()
        session = await self.request(
            f"{self.root}.sessions.create", {"session_id": uuid.uuid4().hex}, 20
        )
        t1 = time.perf_counter()
        sid = session["session_id"]
        result = await self.request(
            f"{self.root}.sessions.{sid}.exec", {"argv": ["true"], "timeout_ms": 10000}, 40
        )
        assert result["exit_code"] == 0
        t2 = time.perf_counter()
        await self.request(f"{self.root}.sessions.{sid}.release", {}, 10)
        t3 = time.perf_counter()
        record(out, t0, t1, t2, t3)
        warm.append(bool(session["warm"]))


class Sdk:
    def __init__(self, hearth: AsyncHearth) -> None:
        self.hearth = hearth

    async def cycle(self, out: Timings, warm: List[bool]) -> None:
        t0 = time.perf_counter()
        session = await self.hearth.sessions.create()
        t1 = time.perf_counter()
        result = await session.exec(["true"], timeout_ms=10000)
        assert result.exit_code == 0
        t2 = time.perf_counter()
        await session.release()
        t3 = time.perf_counter()
        record(out, t0, t1, t2, t3)
        warm.append(session.info.warm)


def sync_cycle(hearth: Hearth, out: Timings, warm: List[bool]) -> None:
    t0 = time.perf_counter()
    session = hearth.sessions.create()
    t1 = time.perf_counter()
    assert session.exec(["true"], timeout_ms=10000).exit_code == 0
    t2 = time.perf_counter()
    session.release()
    t3 = time.perf_counter()
    record(out, t0, t1, t2, t3)
    warm.append(session.info.warm)


def record(out: Timings, t0: float, t1: float, t2: float, t3: float) -> None:
    out["create"].append((t1 - t0) * 1000)
    out["exec"].append((t2 - t1) * 1000)
    out["release"].append((t3 - t2) * 1000)
    out["cycle"].append((t3 - t0) * 1000)


def run(url: str, prefix: str, cycles: int, warmup: int, requests: int) -> Dict[str, Any]:
    clients = ("raw", "async", "sync")
    timings: Dict[str, Timings] = {c: {k: [] for k in (*OPS, "cycle", "request")}
                                   for c in clients}
    warm: Dict[str, List[bool]] = {c: [] for c in clients}
    sync_client = Hearth.connect(url, prefix=prefix)

    async def main() -> None:
        nc = await nats.connect(url)
        raw = Raw(nc, prefix)
        sdk = Sdk(await AsyncHearth.connect(url, prefix=prefix))
        loop = asyncio.get_running_loop()
        try:
            # The client's own cost, isolated: one cheap control request (pools.status, answered
            # by the scheduler from memory), interleaved.
            for i in range(warmup + requests):
                for client in clients[i % 3:] + clients[: i % 3]:
                    t0 = time.perf_counter()
                    if client == "raw":
                        await raw.pools()
                    elif client == "async":
                        await sdk.hearth.pools.status()
                    else:
                        await loop.run_in_executor(None, sync_client.pools.status)
                    if i >= warmup:
                        timings[client]["request"].append((time.perf_counter() - t0) * 1000)
            for i in range(warmup + cycles):
                # Rotate the order so no client always follows a release (pool refill) first.
                order = clients[i % 3:] + clients[: i % 3]
                for client in order:
                    scratch: Timings = {k: [] for k in (*OPS, "cycle")}
                    seen: List[bool] = []
                    if client == "raw":
                        await raw.cycle(scratch, seen)
                    elif client == "async":
                        await sdk.cycle(scratch, seen)
                    else:
                        # The blocking client from a plain thread, as its users call it.
                        await loop.run_in_executor(None, sync_cycle, sync_client, scratch, seen)
                    if i >= warmup:
                        for k, v in scratch.items():
                            timings[client][k] += v
                        warm[client] += seen
                    await asyncio.sleep(0.002)  # let the pool refill between claims
        finally:
            await sdk.hearth.close()
            await nc.close()

    try:
        asyncio.run(main())
    finally:
        sync_client.close()

    report: Dict[str, Any] = {"cycles": cycles, "requests": requests}
    for client in clients:
        for op in (*OPS, "cycle", "request"):
            report[f"{client}_{op}_p50_ms"] = round(percentile(timings[client][op], 0.5), 3)
            report[f"{client}_{op}_p99_ms"] = round(percentile(timings[client][op], 0.99), 3)
        report[f"{client}_warm_fraction"] = round(statistics.mean(warm[client]), 3)
    for client in ("async", "sync"):
        for op in (*OPS, "request"):
            report[f"{client}_{op}_overhead_ms"] = round(
                report[f"{client}_{op}_p50_ms"] - report[f"raw_{op}_p50_ms"], 3
            )
    return report


def print_table(report: Dict[str, Any]) -> None:
    print(f"\n{report['cycles']} cycles and {report['requests']} control requests per client, "
          "interleaved; p50 (p99) in ms\n")
    print("| op | raw nats-py | SDK async | SDK sync | async overhead | sync overhead |")
    print("|---|---|---|---|---|---|")
    for op in (*OPS, "cycle", "request"):
        cells = [f"{report[f'{c}_{op}_p50_ms']:.3f} ({report[f'{c}_{op}_p99_ms']:.2f})"
                 for c in ("raw", "async", "sync")]
        if op == "cycle":
            over = [f"{report[f'{c}_cycle_p50_ms'] - report['raw_cycle_p50_ms']:+.3f}"
                    for c in ("async", "sync")]
        else:
            over = [f"{report[f'{c}_{op}_overhead_ms']:+.3f}" for c in ("async", "sync")]
        print(f"| {op} | " + " | ".join(cells + over) + " |")
    print(f"\nwarm claims: raw {report['raw_warm_fraction']:.0%}, "
          f"async {report['async_warm_fraction']:.0%}, sync {report['sync_warm_fraction']:.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", help="a running stack's NATS URL")
    parser.add_argument("--start", action="store_true", help="start `hearth up` for the run")
    parser.add_argument("--bin-dir", type=Path,
                        default=Path(os.environ.get("HEARTH_BIN_DIR", "target/release")),
                        help="where the `hearth` binary is (with --start)")
    parser.add_argument("--prefix", default="hearth")
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--requests", type=int, default=2000,
                        help="pools.status requests per client (the client's own cost)")
    parser.add_argument("--pool", type=int, default=8, help="warm pool of `hearth up`")
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    args = parser.parse_args()
    if bool(args.url) == args.start:
        parser.error("give --url or --start")
    if args.start:
        with hearth_up(args.bin_dir.resolve(), args.pool) as url:
            report = run(url, args.prefix, args.cycles, args.warmup, args.requests)
    else:
        report = run(args.url, args.prefix, args.cycles, args.warmup, args.requests)
    if not args.json:
        print_table(report)
    print(json.dumps({"scenario": "sdk", **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
