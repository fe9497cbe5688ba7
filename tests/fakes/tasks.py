"""Asyncio hygiene for unit tests: nothing a test started may outlive it, and polling helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest


def _pending_since(before: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()]


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fails the test when a task it created is still pending at teardown (then cancels it).

    Tasks that end within a few loop iterations (a cancelled task delivering its cancellation)
    are given that chance first.
    """
    before = set(asyncio.all_tasks())
    yield
    for _ in range(20):
        if not _pending_since(before):
            return
        await asyncio.sleep(0)
    left = _pending_since(before)
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    names = ", ".join(f"{t.get_name()} ({t.get_coro()!r})" for t in left)
    pytest.fail(f"{len(left)} task(s) left pending by the test: {names}")


async def until(condition: Callable[[], bool], *, what: str = "condition", steps: int = 2000) -> None:
    """Run the loop until ``condition()`` holds (a bounded number of iterations, no wall time)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not happen within {steps} loop iterations")


async def settle(iterations: int = 50) -> None:
    """Let every runnable task run for a while."""
    for _ in range(iterations):
        await asyncio.sleep(0)
