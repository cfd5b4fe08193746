"""The SDK needs no more than a tenant is allowed: it publishes only Hearth's client requests
(`hearth.v1.sessions.>`, `templates.list`, `pools.status`) and subscribes only to `_INBOX.>`.
The `tenant` user of the test server has exactly those permissions; anything else the SDK did
would be a permissions violation and this test would fail."""

from __future__ import annotations

from typing import List

import nats.errors
import pytest

from hearth_sandbox import AsyncHearth, Chunk, Hearth, NotFound
from stack import TENANT


def test_everything_with_tenant_permissions(url: str) -> None:
    user, password = TENANT
    with Hearth.connect(url, user=user, password=password) as hearth:
        assert hearth.pools.status() and hearth.templates.list()
        with hearth.sessions.create(labels={"test": "tenant"}) as session:
            assert [s.id for s in hearth.sessions.list(labels={"test": "tenant"})] == [session.id]
            assert session.exec("echo tenant").stdout == b"tenant\n"
            chunks: List[Chunk] = list(session.exec_stream("echo streamed"))
            assert b"".join(c.data for c in chunks) == b"streamed\n"
            session.files.write("f.txt", "x")
            assert session.files.read("f.txt") == b"x"
            session.keepalive()
        try:
            hearth.sessions.get("no-such-session")
        except NotFound:
            pass


async def test_async_with_tenant_permissions(url: str) -> None:
    user, password = TENANT
    async with await AsyncHearth.connect(url, user=user, password=password) as hearth:
        async with await hearth.sessions.create() as session:
            assert (await session.exec(["true"])).ok
        # The permissions hold: a worker's internal subject (answered for admin) is refused.
        with pytest.raises(nats.errors.TimeoutError):
            await hearth.nats.request("hearth.v1.workers.w1.jobs", b"{}", timeout=0.5)
