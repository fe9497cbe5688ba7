"""How the engine answers a call, independent of the transport that carried it.

A route writes its answer through a :class:`Reply`: either one whole body (:meth:`Reply.json`,
:meth:`Reply.text`) or a stream (:meth:`Reply.start_stream`, then :meth:`Reply.write` for each
piece, then :meth:`Reply.end`). :class:`AiohttpReply` turns that into aiohttp responses for the
HTTP server; :class:`MemoryReply` keeps it in memory for in-process callers
(:func:`engines.sim.local.call_local`) and tests. :func:`respond` is the one place where an
:class:`~engines.sim.protocol.ApiError` becomes the engine's error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from pdgate.engines.sim.protocol import ApiError, error_body

logger = logging.getLogger(__name__)

TEXT_PLAIN = "text/plain; charset=utf-8"


class Reply(Protocol):
    """The answer to one call. Exactly one of: one ``json``/``text``, or ``start_stream``, ``write``* and ``end``.

    A streamed answer always has status 200. A stream may also stop without :meth:`end` when the
    route fails mid-stream or its caller is cancelled (the client went away).
    """

    async def json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        """The whole answer: ``payload`` as a JSON body."""
        ...

    async def text(
        self,
        status: int,
        text: str,
        content_type: str = TEXT_PLAIN,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The whole answer: ``text`` (UTF-8) with its content type."""
        ...

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        """Begin a status-200 streamed answer (SSE: ``headers`` name ``text/event-stream``)."""
        ...

    async def write(self, data: bytes) -> None:
        """One piece of a started stream (an SSE event, ``data: ...\\n\\n``)."""
        ...

    async def end(self) -> None:
        """The end of a started stream."""
        ...


async def respond(reply: Reply, api: str, handler: Callable[[Reply], Awaitable[None]]) -> None:
    """Run ``handler(reply)``; an ApiError it raises becomes the error JSON of the ``api`` flavour.

    An error raised before the answer started is answered as ``(err.status, error_body(err, api))``;
    one raised after a stream started ends that stream (the status line is gone by then). Other
    exceptions, and cancellation, propagate.
    """
    tracked = _Tracked(reply)
    try:
        await handler(tracked)
    except ApiError as err:
        if not tracked.started:
            await reply.json(err.status, error_body(err, api))
        elif tracked.streaming:
            logger.warning("a streamed answer failed after it started: %s", err.message)
            tracked.streaming = False
            await reply.end()


class _Tracked:
    """A Reply that remembers whether its answer started (for :func:`respond`)."""

    def __init__(self, inner: Reply) -> None:
        self._inner = inner
        self.started = False
        self.streaming = False

    async def json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self.started = True
        await self._inner.json(status, payload, headers)

    async def text(
        self, status: int, text: str, content_type: str = TEXT_PLAIN, headers: Mapping[str, str] | None = None
    ) -> None:
        self.started = True
        await self._inner.text(status, text, content_type, headers)

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        self.started = self.streaming = True
        await self._inner.start_stream(headers)

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def end(self) -> None:
        self.streaming = False
        await self._inner.end()


class AiohttpReply:
    """A Reply over aiohttp: the route wrapper returns :attr:`response` to aiohttp when done."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    async def json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self.response = web.json_response(payload, status=status, headers=headers)

    async def text(
        self, status: int, text: str, content_type: str = TEXT_PLAIN, headers: Mapping[str, str] | None = None
    ) -> None:
        self.response = web.Response(
            body=text.encode("utf-8"), status=status, headers={**(headers or {}), "Content-Type": content_type}
        )

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        self.response = web.StreamResponse(headers=headers)
        await self.response.prepare(self._request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None, "write() before start_stream()"
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None, "end() before start_stream()"
        await self.response.write_eof()


class MemoryReply:
    """A Reply kept in memory: status, headers, content type, and the body or the stream's pieces.

    :attr:`done` is set once the answer is complete: a whole body, or a stream's :meth:`end`. A
    stream that stops without :meth:`end` (the route failed, or the task running the call was
    cancelled) never sets it: wait on the call itself.
    """

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.content_type: str | None = None
        self.streamed = False
        self.ended = False
        self.chunks: list[bytes] = []  # a stream's pieces as written; a whole body is one piece
        self.done = asyncio.Event()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json_body(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    async def json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._whole(status, json.dumps(payload).encode(), "application/json; charset=utf-8", headers)

    async def text(
        self, status: int, text: str, content_type: str = TEXT_PLAIN, headers: Mapping[str, str] | None = None
    ) -> None:
        self._whole(status, text.encode("utf-8"), content_type, headers)

    def _whole(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None) -> None:
        self.status, self.content_type, self.chunks = status, content_type, [body]
        self.headers = dict(headers or {})
        self.done.set()

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        self.status, self.streamed = 200, True
        self.headers = dict(headers)
        self.content_type = self.headers.get("Content-Type")

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)

    async def end(self) -> None:
        self.ended = True
        self.done.set()
