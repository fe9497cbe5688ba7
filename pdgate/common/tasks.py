"""Background tasks that one object owns: started with :meth:`OwnedTasks.spawn`, cancelled and
awaited by :meth:`OwnedTasks.close` (every background task has an owner)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def every(
    interval_s: float, work: Callable[[], Awaitable[object] | object], what: str, log: logging.Logger
) -> None:
    """Call ``work`` (a function or a coroutine function) every ``interval_s`` until cancelled; a
    call that raises is logged as ``<what> round failed`` and the next one runs as planned (a
    bad round must not stop a periodic duty for good)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            result = work()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s round failed", what)


class OwnedTasks:
    """A set of running tasks; a finished task leaves it by itself."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task still running and wait until they are done."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
