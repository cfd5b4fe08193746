"""The SDK as a tenant of a real multi-account deployment: nats-server runs
``deploy/nats/single.conf`` (the service account exports Hearth's API, accounts ``tenant-a`` and
``tenant-b`` import it). The SDK needs no tenant argument: the account is the tenant. Tenant B
cannot see or touch tenant A's session (404 everywhere), and A works as always."""

from __future__ import annotations

from typing import Iterator

import msgpack
import nats
import pytest

from hearth_sandbox import AsyncHearth, Hearth, NotFound
from stack import Stack, account_password, temp_root


@pytest.fixture(scope="module")
def accounts_url() -> Iterator[str]:
    with temp_root("hearth-sdk-accounts-") as root:
        stack = Stack(root, accounts=True)
        try:
            stack.start()
            stack.wait_ready()
            yield stack.url
        finally:
            stack.stop()


def login(url: str, user: str) -> Hearth:
    return Hearth.connect(url, user=user, password=account_password(user))


def test_tenants_are_isolated_through_the_account_imports(accounts_url: str) -> None:
    with login(accounts_url, "tenant-a") as a, login(accounts_url, "tenant-b") as b:
        with a.sessions.create(labels={"who": "a"}) as session:
            session.files.write("secret.txt", "secret-a")
            assert session.exec("cat secret.txt").stdout == b"secret-a"
            assert [s.id for s in a.sessions.list(labels={"who": "a"})] == [session.id]
            # B: nothing to see, nothing to touch.
            assert b.sessions.list() == []
            with pytest.raises(NotFound):
                b.sessions.get(session.id)
            assert "default" in [t.name for t in b.templates.list()]


async def test_async_tenant_flow_and_the_data_plane_refuses_others(accounts_url: str) -> None:
    async with await AsyncHearth.connect(
        accounts_url, user="tenant-b", password=account_password("tenant-b")
    ) as b:
        async with await b.sessions.create() as session:
            result = await session.exec(["echo", "from-b"])
            assert result.stdout == b"from-b\n"
            # Tenant A, raw, straight at the worker's data plane of B's session: 404.
            nc = await nats.connect(
                accounts_url, user="tenant-a", password=account_password("tenant-a")
            )
            try:
                reply = await nc.request(
                    f"hearth.v1.sessions.{session.id}.exec",
                    msgpack.packb({"argv": ["true"]}),
                    timeout=5,
                )
                assert (reply.headers or {}).get("Nats-Service-Error-Code") == "404"
            finally:
                await nc.close()
