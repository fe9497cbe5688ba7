"""A scripted engine reply with the interface of :class:`pdgate.common.http_client.UpstreamResponse`.

The script is a sequence of steps, consumed in order by whoever reads the body:

* ``bytes``: one read's worth of body (what one ``data_received`` would hand on);
* an exception (an :class:`UpstreamError`): the connection fails there;
* a :class:`Gate`: the body pauses until the test opens it;
* :data:`STALL`: the body pauses for good (only :meth:`abort` ends the wait, as a real stalled
  connection only ends when the gateway cuts it).

Like the real response: :meth:`relay` calls its sink synchronously with each piece and returns at
the end of the body; :meth:`abort` fails whoever waits with an :class:`UpstreamError`; :meth:`close`
stops the delivery (and, mid-body, is how the engine learns the request was abandoned).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from pdgate.common.http_client import UpstreamError


@dataclass(eq=False)
class Gate:
    """A pause in a scripted body; :meth:`open` lets the body go on."""

    name: str = "gate"
    event: asyncio.Event = field(default_factory=asyncio.Event)
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # the reader is waiting here

    def open(self) -> None:
        self.event.set()


class _Stall:
    def __repr__(self) -> str:
        return "STALL"


STALL: Final = _Stall()

Step = bytes | BaseException | Gate | _Stall


class FakeUpstreamResponse:
    """One scripted response: ``status``, ``headers`` and a body delivered step by step."""

    def __init__(
        self,
        steps: Iterable[Step] = (),
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        name: str = "",
    ) -> None:
        self.status = status
        self.headers = headers if headers is not None else {"content-type": "text/event-stream"}
        self.name = name
        self._steps: deque[Step] = deque(steps)
        self.delivered: list[bytes] = []  # every piece that left this response, in order
        self.complete = False  # the body was read to its end
        self.closed = False
        self.aborted: str | None = None  # the reason given to abort()
        self.paused = False
        self.pause_calls = 0
        self._woken: asyncio.Event | None = None  # abort/resume wake a waiting reader

    # ------------------------------------------------------------------ builders
    @classmethod
    def json(cls, payload: Any, *, status: int = 200) -> FakeUpstreamResponse:
        return cls(
            [json.dumps(payload).encode()], status=status, headers={"content-type": "application/json"}, name="json"
        )

    @classmethod
    def error(cls, status: int, message: str = "engine error") -> FakeUpstreamResponse:
        body = {"error": {"message": message, "type": "server_error", "code": status}}
        return cls.json(body, status=status)

    # ------------------------------------------------------------- the interface
    async def first_chunk(self) -> bytes:
        """The first piece of body (``b""`` for an empty one)."""
        piece = await self._next()
        return b"" if piece is None else piece

    async def relay(self, sink: Callable[[bytes], None]) -> None:
        """Hand every further piece to ``sink`` (synchronously, as ``data_received`` would)."""
        while True:
            piece = await self._next()
            if piece is None:
                return
            sink(piece)

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        out = []
        while (piece := await self._next()) is not None:
            out.append(piece)
        return b"".join(out)

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        self.paused = False
        self._wake()

    def abort(self, reason: str) -> None:
        """Fail whoever waits on this response with ``reason`` and close it."""
        if self.aborted is None and not self.complete:
            self.aborted = reason
        self._wake()
        self.close()

    def close(self) -> None:
        """Release the connection; unless the body was read to its end, the engine sees an abort."""
        self.closed = True

    # ---------------------------------------------------------------- for tests
    @property
    def abandoned(self) -> bool:
        """The gateway let go of this response before its end (the engine would abort the request)."""
        return self.closed and not self.complete

    @property
    def body(self) -> bytes:
        return b"".join(self.delivered)

    def __repr__(self) -> str:
        return f"FakeUpstreamResponse({self.name or self.status}, left={len(self._steps)}, closed={self.closed})"

    # ----------------------------------------------------------------- inside
    def _wake(self) -> None:
        if self._woken is not None:
            self._woken.set()

    def _check(self) -> None:
        if self.aborted is not None:
            raise UpstreamError(self.aborted)

    async def _wait(self, until: Callable[[], bool], also: asyncio.Event | None = None) -> None:
        """Wait until ``until()`` holds, re-checking whenever woken (or ``also`` is set); an abort raises."""
        while not until():
            self._check()
            woken = self._woken = asyncio.Event()
            waits = [asyncio.ensure_future(woken.wait())]
            if also is not None:
                waits.append(asyncio.ensure_future(also.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                self._woken = None
        self._check()

    async def _next(self) -> bytes | None:
        """The next piece of body; None at its end."""
        await asyncio.sleep(0)  # another read: other tasks run in between, as with a real socket
        while True:
            self._check()
            if self.closed:  # a closed response delivers nothing more; the reader waits (as the real one does)
                await self._wait(lambda: False)
            if self.paused:
                await self._wait(lambda: not self.paused)
            if not self._steps:
                self.complete = True
                return None
            step = self._steps.popleft()
            if isinstance(step, bytes):
                self.delivered.append(step)
                return step
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, Gate):
                step.reached.set()
                gate = step.event
                await self._wait(gate.is_set, also=gate)
                continue
            await self._wait(lambda: False)  # STALL: only an abort ends it
