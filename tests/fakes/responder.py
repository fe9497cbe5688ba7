"""What the client would receive, with the interface of :class:`pdgate.common.http_server.Responder`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fakes.sse import parse_sse


class FakeResponder:
    """Collects one response: a whole one (:meth:`send`) or a stream (:meth:`start`, :meth:`write`, :meth:`end`).

    Misuse that would corrupt a real client's response (a write before the start or after the end)
    is recorded in ``violations`` rather than raised, since it happens inside sinks; tests assert
    it stays empty. Starting twice raises, as the real one does.
    """

    def __init__(self, *, keep_alive: bool = True) -> None:
        self.keep_alive = keep_alive
        self.started = False
        self.finished = False
        self.streaming = False
        self.paused = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_type = ""
        self.body = bytearray()
        self.writes = 0
        self.violations: list[str] = []
        self.gone = False  # the client went away (client_gone)
        self.flow: tuple[Callable[[], None], Callable[[], None]] | None = None

    # ------------------------------------------------------------- the interface
    @property
    def peer_host(self) -> str | None:
        return "127.0.0.1"

    @property
    def client_gone(self) -> bool:
        return self.gone

    def send(
        self, status: int, body: bytes, *, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        self.status, self.content_type, self.headers = status, content_type, dict(headers or {})
        self.body += body

    def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(data).encode(), headers=headers)

    def start(
        self, status: int, *, content_type: str, headers: dict[str, str] | None = None, first: bytes = b""
    ) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.streaming = True
        self.status, self.content_type, self.headers = status, content_type, dict(headers or {})
        self.body += first

    def write(self, data: bytes) -> None:
        if not self.started:
            self.violations.append(f"write before start: {data[:80]!r}")
        elif self.finished:
            self.violations.append(f"write after end: {data[:80]!r}")
        self.writes += 1
        self.body += data

    def end(self, last: bytes = b"") -> None:
        if self.finished:
            return
        if not self.started:
            self.violations.append("end before start")
        self.finished = True
        self.body += last

    def on_flow(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.flow = (pause, resume)
        if self.paused:
            pause()

    # ------------------------------------------------------------------ for tests
    def client_pauses(self) -> None:
        """The client's socket buffer fills (backpressure)."""
        self.paused = True
        if self.flow is not None:
            self.flow[0]()

    def client_resumes(self) -> None:
        self.paused = False
        if self.flow is not None:
            self.flow[1]()

    def events(self) -> list[Any]:
        """The stream as the client parses it (JSON events, ``"[DONE]"``)."""
        return parse_sse(bytes(self.body))

    def json(self) -> Any:
        return json.loads(bytes(self.body))
