"""The bench client's timings against a real server whatever its SSE line endings: a server that
frames events with CRLF (sse-starlette's default) gets a TTFT before the end and a TPOT per token,
not one chunk at the end of the stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pdgate.loadgen.client import Target
from pdgate.loadgen.runner import LoadConfig, run_load
from pdgate.loadgen.types import BenchRequest

pytestmark = pytest.mark.unit

TOKENS = 6
FIRST_TOKEN_S = 0.05  # the server's prefill
TOKEN_GAP_S = 0.02  # and its time per output token


class PacedServer:
    """An OpenAI-style completions endpoint on loopback streaming ``TOKENS`` tokens, paced, each
    event's lines ended with ``newline``; a comment and a usage chunk as real servers send."""

    def __init__(self, newline: bytes) -> None:
        self.newline = newline
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> PacedServer:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def _event(self, *lines: str) -> bytes:
        return b"".join(line.encode() + self.newline for line in lines) + self.newline

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(self._event(": ping"))
        await asyncio.sleep(FIRST_TOKEN_S)
        for i in range(body["max_tokens"]):
            if i:
                await asyncio.sleep(TOKEN_GAP_S)
            chunk = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]}
            await response.write(self._event("event: completion", "data: " + json.dumps(chunk)))
        usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"], "total_tokens": 3 + body["max_tokens"]}
        await response.write(self._event("data: " + json.dumps({"id": "cmpl-1", "choices": [], "usage": usage})))
        await response.write(self._event("data: [DONE]"))
        await response.write_eof()
        return response


@pytest.fixture(params=[b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[PacedServer]:
    async with PacedServer(request.param) as srv:
        yield srv


async def test_the_client_times_every_token_whatever_the_line_endings(server: PacedServer) -> None:
    requests = [BenchRequest(i, "completions", TOKENS, prompt="hello") for i in range(3)]
    results, _ = await run_load(Target("paced", server.url, "m"), requests, LoadConfig(rate=50, seed=0))
    for r in results:
        assert r.ok, r.error
        assert r.output_tokens == TOKENS and r.prompt_tokens == 3
        assert len(r.chunk_times) == TOKENS  # one timed chunk per token, as the server paced them
        assert r.ttft_s is not None and FIRST_TOKEN_S <= r.ttft_s < r.e2e_s
        assert r.e2e_s - r.ttft_s >= 0.8 * (TOKENS - 1) * TOKEN_GAP_S  # the decode time is not folded into TTFT
        assert r.tpot_s is not None and r.tpot_s >= 0.8 * TOKEN_GAP_S
        assert len(r.inter_chunk_s) == TOKENS - 1 and all(gap > 0 for gap in r.inter_chunk_s)
