"""Background processes through the SDK against the real stack: a process outlives the client
that started it and another client reattaches from offset 0; stdin, signals, wait (ended, and
504 while it runs on), kill, a PTY that resizes; bad input; and the blocking API."""

from __future__ import annotations

from typing import List

import pytest

from hearth_sandbox import (
    AsyncHearth,
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Hearth,
    NotFound,
    ProcessChunk,
)


async def test_a_process_outlives_its_client_and_is_reattached(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create() as session:
            # Another client starts a counter and goes away.
            async with await AsyncHearth.connect(url) as other:
                theirs = await other.sessions.get(session.id)
                proc = await theirs.processes.start(
                    "i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.05; done", tag="counter"
                )
            assert [p.tag for p in await session.processes.list()] == ["counter"]
            mine = session.processes.get(proc.process_id)
            seen = ""
            chunks: List[ProcessChunk] = []
            stream = mine.stream(0)
            async for chunk in stream:
                chunks.append(chunk)
                seen += chunk.text
                if "line-5\n" in seen:
                    break
            stream.close()
            assert seen.startswith("line-0\nline-1\n")
            assert chunks[0].offset == 0
            # Reattach where it stopped: nothing missed, nothing repeated.
            again = mine.stream(stream.offset)
            first = await again.__anext__()
            again.close()
            assert first.offset == stream.offset
            info = await mine.kill()
            assert info.process_id == proc.process_id
            ended = await mine.wait(10)
            assert ended.exited and ended.signal == 9


async def test_stdin_signals_and_wait(url: str) -> None:
    async with await AsyncHearth.connect(url) as hearth:
        async with await hearth.sessions.create() as session:
            bc = await session.processes.start("bc -q", stdin=True)
            await bc.write("6*7\n")
            await bc.close_stdin()
            assert (await bc.wait(10)).exit_code == 0
            assert (await bc.output()).data == b"42\n"
            with pytest.raises(Conflict):
                await bc.write("1\n")

            trap = await session.processes.start(
                "trap 'echo got-INT' INT; trap 'echo got-TERM; exit 7' TERM; echo ready; "
                "while :; do sleep 0.05; done"
            )
            text = ""
            async with trap.stream() as stream:
                async for chunk in stream:
                    text += chunk.text
                    if text.endswith("ready\n"):
                        await trap.signal("INT")
                    if text.endswith("got-INT\n"):
                        await trap.signal("SIGTERM")
                assert stream.info is not None and stream.info.exit_code == 7
            assert "got-TERM" in text

            slow = await session.processes.start(["sleep", "30"])
            with pytest.raises(DeadlineExceeded):
                await slow.wait(0.2)
            assert not [p for p in await session.processes.list()
                        if p.process_id == slow.process_id][0].exited
            await slow.kill()
            with pytest.raises(BadRequest):
                await slow.signal("NOPE")
            with pytest.raises(NotFound):
                await session.processes.get("p0-none").wait(0)
            with pytest.raises(Conflict):
                await slow.resize(10, 10)


def test_the_blocking_api_and_a_pty(url: str) -> None:
    with Hearth.connect(url) as hearth:
        with hearth.sessions.create() as session:
            shell = session.processes.start("sh -i", pty=(80, 24))
            shell.write("stty size\n")
            seen = ""
            step = 0
            with shell.stream() as stream:
                for chunk in stream:
                    seen += chunk.text
                    if step == 0 and "24 80" in seen:
                        shell.resize(100, 30)
                        shell.write("stty size\n")
                        step = 1
                    elif step == 1 and "30 100" in seen:
                        shell.write("exit\n")
                        step = 2
            assert stream.info is not None and stream.info.exit_code == 0
            assert [p.pty for p in session.processes.list()] == [True]
