"""What the request path writes a client's answer through: the HTTP responder, or a re-encoder in front of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Answer(Protocol):
    """The part of :class:`~pdgate.common.http_server.Responder` the request path uses: a whole
    response (``send``), or a stream (``start``, ``write``, ``end``) with backpressure hooks."""

    @property
    def started(self) -> bool: ...

    def send(
        self, status: int, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None: ...

    def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None: ...

    def start(
        self, status: int, *, content_type: str, headers: dict[str, str] | None = None, first: bytes = b""
    ) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self, last: bytes = b"") -> None: ...

    def on_flow(self, pause: Callable[[], None], resume: Callable[[], None]) -> None: ...
