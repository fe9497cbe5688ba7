"""Sending one streamed OpenAI request and timing it from the client's side.

Built on pdgate's lean HTTP/1.1 client (:mod:`pdgate.common.http_client`) so that a single core keeps up
with hundreds of streams per second: response bytes are handled in the socket's callback, stamped
with the monotonic clock there, and parsed as server-sent events without a task switch per chunk
(:mod:`pdgate.common.sse`: events framed with LF, CRLF or CR line endings alike).

A chunk "carries output" when an event in it has non-empty ``choices[].text`` (completions) or
``choices[].delta.content`` (chat). The first such chunk is the first token; output tokens come
from ``usage`` (``stream_options.include_usage``) when the server reports it, else from the
number of output-carrying events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pdgate.common.http_client import Upstream, UpstreamError
from pdgate.common.json_codec import JsonError, json_decode
from pdgate.common.sse import event_data, split_events
from pdgate.loadgen.types import BenchRequest, RequestResult


class Target:
    """An OpenAI-compatible endpoint: pdgate, a vLLM or SGLang server, another router."""

    def __init__(self, name: str, url: str, model: str, *, api_key: str | None = None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target {name}: not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        self.name, self.url, self.model = name, url, model
        self.origin = (parts.hostname, parts.port or (443 if tls else 80), tls)
        base = parts.path.rstrip("/")
        self.base_path = base if base.endswith("/v1") else base + "/v1"
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def path(self, request: BenchRequest) -> str:
        return self.base_path + ("/chat/completions" if request.api == "chat" else "/completions")


class _StreamParser:
    """Consumes the SSE body as it arrives; records the time of each chunk that carried output."""

    __slots__ = ("_clock", "_rest", "_start", "chunk_times", "error", "events", "usage")

    def __init__(self, start: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rest = b""  # the start of an event still open
        self._start = start
        self._clock = clock
        self.chunk_times: list[float] = []
        self.events = 0
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        now = self._clock() - self._start
        events, self._rest = split_events(self._rest + data if self._rest else data)
        carried = False
        for event in events:
            payload = event_data(event)
            if not payload:
                continue
            payload = payload.strip()
            if payload == b"[DONE]" or not payload:
                continue
            carried |= self._event(payload)
        if carried:
            self.chunk_times.append(now)

    def close(self) -> None:
        """The body ended: an event the server did not close with an empty line still counts."""
        if self._rest.strip():
            self.feed(b"\n\n")

    def _event(self, payload: bytes) -> bool:
        try:
            data = json_decode(payload)
        except JsonError:
            self.error = f"malformed event: {payload[:100]!r}"
            return False
        if "error" in data:
            self.error = str(
                data["error"].get("message", data["error"]) if isinstance(data["error"], dict) else data["error"]
            )
        if data.get("usage"):
            self.usage = data["usage"]
        carried = False
        for choice in data.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                self.events += 1
                carried = True
        return carried


async def send(
    pool: Upstream,
    target: Target,
    request: BenchRequest,
    *,
    scheduled_s: float,
    start: float,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> RequestResult:
    """Send ``request`` streamed and time it on ``clock``; never raises for the server's or the network's faults."""
    body = json.dumps(request.body(target.model, stream=True)).encode()
    sent = clock() - start
    result = RequestResult(
        index=request.index,
        target=target.name,
        slo_class=request.slo_class,
        scheduled_s=scheduled_s,
        sent_s=sent,
        end_s=sent,
    )
    parser = _StreamParser(start, clock)
    response = None
    try:
        response = await pool.request(
            target.origin,
            "POST",
            target.path(request),
            body,
            headers={**target.headers, **request.headers} if request.headers else target.headers,
            timeout_s=timeout_s,
        )
        result.status = response.status
        if response.status != 200:
            detail = (await response.read())[:300].decode(errors="replace")
            result.error = f"HTTP {response.status}: {detail}"
        else:
            await response.relay(parser.feed)
            parser.close()
            result.error = parser.error
    except UpstreamError as exc:
        result.error = str(exc)
    finally:
        result.end_s = clock() - start
        if response is not None:
            response.close()
    result.chunk_times = parser.chunk_times
    result.first_token_s = parser.chunk_times[0] if parser.chunk_times else None
    usage = parser.usage or {}
    result.output_tokens = int(usage.get("completion_tokens") or parser.events)
    result.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
    if result.error is None and result.status == 200 and result.output_tokens == 0 and request.max_tokens > 0:
        result.error = "the stream carried no output"
    return result
