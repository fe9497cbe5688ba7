"""Wait for a condition by polling it, instead of sleeping for a guessed time.

``wait_until(predicate)`` calls ``predicate`` every ``interval`` seconds until it returns something
truthy and returns that value; after ``timeout`` seconds it raises ``AssertionError`` (so a test
fails with a message saying what it waited for, and the last value seen). ``wait_until_async`` is
the same on an event loop, and also takes a coroutine function as its predicate. ``message``
says what was awaited; a callable is called at the timeout (to show a log as it is by then).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.02


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")


Message = str | Callable[[], str] | None


def _describe(predicate: Callable[..., object], message: Message) -> str:
    if callable(message):
        return message()  # built at the timeout, e.g. to show a child's log as it is then
    return message or getattr(predicate, "__name__", None) or repr(predicate)


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = DEFAULT_INTERVAL_S,
    message: Message = None,
) -> T:
    """Poll ``predicate()`` until it is truthy and return its value; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(_describe(predicate, message), timeout, value)
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T] | Callable[[], Awaitable[T]],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = DEFAULT_INTERVAL_S,
    message: Message = None,
) -> T:
    """:func:`wait_until` on the running loop; ``predicate`` may be a plain or a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(_describe(predicate, message), timeout, value)
        await asyncio.sleep(interval)
