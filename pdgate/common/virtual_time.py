"""An asyncio event loop on a virtual clock: for running the gateway's own code against a
simulated fleet faster than real time (``pdgate simulate``, issue 18).

``loop.time()`` is virtual. When no callback is ready, the loop does not wait for its next timer:
it polls for I/O without blocking and, if there is none, moves the clock to that timer at once.
``asyncio.sleep``, ``asyncio.timeout``, ``call_later`` and everything built on them therefore take
no wall time, and a run is deterministic for deterministic code. Real I/O still works (the
selector is real and polled first), and when no timer is set at all the loop blocks on it as
any loop would (a thread's result arriving through ``call_soon_threadsafe``); wall time spent
there is not added to the virtual clock.

Code that reads ``time.monotonic()`` directly does not see the virtual clock: clocks are
injected (``clock=loop.time``).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    """The loop's selector: polls real I/O, then jumps the loop's clock over the wait."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: VirtualClockLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer set: wait for I/O (a thread's answer) as a real loop would
            return super().select(None)
        events = super().select(0)
        if not events and timeout > 0 and self.clock is not None:
            self.clock.advance(timeout)
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose time is virtual and jumps to the next timer when idle."""

    def __init__(self, start: float = 0.0) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.clock = self
        self._virtual_now = start

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (never back)."""
        if seconds > 0:
            self._virtual_now += seconds


def run_virtual(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualClockLoop` (as ``asyncio.run`` does:
    the remaining tasks are cancelled and async generators closed, then the loop is closed)."""
    with asyncio.Runner(loop_factory=lambda: VirtualClockLoop(start)) as runner:
        return runner.run(main)
