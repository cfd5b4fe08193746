"""Pause and fork through the SDK against the real stack (process provider): a paused session is
resumed by the next exec with its files, and a fork gives copies with the source's files that
diverge from it."""

from __future__ import annotations

from hearth_sandbox import AsyncHearth, Hearth


async def test_pause_then_exec_resumes(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create(wait_ms=30000) as session:
            await session.files.write("kept.txt", b"kept")
            info = await session.pause()
            assert info.state == "paused" and info.paused_ms
            assert (await session.pause()).state == "paused"
            assert (await session.exec("cat kept.txt")).stdout == b"kept"


def test_fork_copies_files_and_diverges(url: str) -> None:
    with Hearth.connect(url) as hearth:
        with hearth.sessions.create(wait_ms=30000) as source:
            source.files.write("state.txt", b"from the source")
            result = source.fork(2, ttl_s=120, labels={"test": "fork"})
            assert not result.failed, result.failed
            assert len(result.sessions) == 2
            for copy in result.sessions:
                with copy:
                    assert copy.info.labels == {"test": "fork"}
                    assert copy.files.read("state.txt") == b"from the source"
                    copy.files.write("mine.txt", copy.id.encode())
            assert source.exec("test -e mine.txt || echo absent").stdout == b"absent\n"


async def test_pause_upload_is_refused_where_a_pause_stays_in_memory(url: str) -> None:
    # The process provider freezes a paused session in its worker's memory: there is no state
    # another worker could resume, so asking for the upload is a BadRequest, and the session is
    # left as it was.
    from hearth_sandbox import BadRequest

    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create(wait_ms=30000) as session:
            try:
                await session.pause(upload=True)
            except BadRequest as err:
                assert "pause_upload" in str(err)
            else:
                raise AssertionError("upload=True was accepted by a process worker")
            info = await session.pause(upload=False)
            assert info.state == "paused"
            assert not info.pause_uploaded and not info.unplaced
            assert (await session.exec("echo back")).stdout == b"back\n"
