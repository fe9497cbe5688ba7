"""The virtual-clock event loop (groundwork of ``pdgate simulate``, issue 18): timers take no wall
time, their order and the asyncio primitives built on them hold, and real I/O still works."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdgate.common.virtual_time import VirtualClockLoop, run_virtual

pytestmark = pytest.mark.unit


def test_an_hour_of_sleeping_tasks_takes_no_wall_time_and_keeps_its_order():
    async def main() -> tuple[list[tuple[str, float]], float]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []

        async def sleeper(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            seen.append((name, loop.time()))

        await asyncio.gather(sleeper("late", 3600.0), sleeper("early", 0.5), sleeper("mid", 60.0))
        return seen, loop.time()

    wall = time.monotonic()
    seen, end = run_virtual(main(), start=100.0)
    assert time.monotonic() - wall < 1.0
    assert seen == [("early", 100.5), ("mid", 160.0), ("late", 3700.0)] and end == 3700.0


def test_timeouts_and_call_later_follow_the_virtual_clock():
    async def main() -> tuple[bool, list[float]]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        loop.call_later(2.0, lambda: fired.append(loop.time()))
        timed_out = False
        try:
            async with asyncio.timeout(5.0):
                await asyncio.Event().wait()  # never set: only the timeout ends it
        except TimeoutError:
            timed_out = True
        fired.append(loop.time())
        return timed_out, fired

    assert run_virtual(main()) == (True, [2.0, 5.0])


def test_a_threads_answer_and_real_sockets_still_arrive():
    async def main() -> tuple[int, bytes, float]:
        loop = asyncio.get_running_loop()
        answer = await asyncio.to_thread(lambda: 41 + 1)  # no timer set: the loop waits for the thread
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        line = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()
        return answer, line, loop.time()

    answer, line, now = run_virtual(main())
    assert answer == 42 and line == b"ping\n" and now < 1.0  # no timer jumped the clock


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()


def test_the_clock_never_goes_back():
    loop = VirtualClockLoop(start=5.0)
    try:
        loop.advance(-3.0)
        loop.advance(2.5)
        assert loop.time() == 7.5
    finally:
        loop.close()
