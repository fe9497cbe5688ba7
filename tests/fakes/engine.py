"""A fake engine behind the real :class:`pdgate.adapters.base.EngineAdapter` interface.

:class:`FakeModel` is a deterministic "language model": the token at context position ``n`` is
``1000 + n`` with the text ``" w<n>"``. A continuation (prompt + the tokens a client already has)
therefore produces exactly the tokens the first engine would have produced next, so a stream
stitched across engines can be checked token by token.

:class:`FakeEngineAdapter` answers :meth:`send` from a script of replies (a response, an
exception to raise, or a function of the call), falling back to its model; every call is
recorded (``calls``; a shared ``log`` keeps the order across instances).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from fakes.sse import DONE, event, split_bytes, usage
from fakes.upstream import STALL, FakeUpstreamResponse, Step
from pdgate.adapters import (
    Capabilities,
    EngineAdapter,
    HandoffError,
    InstanceSpec,
    LiveMigration,
    MigrationError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from pdgate.adapters.base import PdProtocol
from pdgate.adapters.load import EngineLoad

FIRST_TOKEN_ID = 1000


def token_id(position: int) -> int:
    """The fake model's token at context position ``position``."""
    return FIRST_TOKEN_ID + position


def token_text(position: int) -> str:
    return f" w{position}"


def expected_text(prompt_tokens: int, max_tokens: int) -> str:
    """The whole answer the fake model gives a prompt of ``prompt_tokens`` tokens."""
    return "".join(token_text(prompt_tokens + i) for i in range(max_tokens))


@dataclass
class SentCall:
    """One leg as the engine received it."""

    instance: str
    path: str
    body: dict[str, Any]
    request_id: str
    headers: dict[str, str] | None
    response: FakeUpstreamResponse | None = None

    @property
    def prompt(self) -> list[int]:
        prompt = self.body.get("prompt")
        return list(prompt) if isinstance(prompt, list) else []

    @property
    def is_sequential_prefill(self) -> bool:
        params = self.body.get("kv_transfer_params")
        return isinstance(params, dict) and bool(params.get("do_remote_decode"))


@dataclass
class FakeModel:
    """Answers a leg's body the way vLLM (and SGLang) would, deterministically."""

    instance: str
    role: str = "both"
    prefix_hit: int | None = None  # the prefix-cache hit this engine reports (None: a miss, not reported)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def respond(
        self,
        call: SentCall,
        *,
        break_after: int | None = None,
        stall_after: int | None = None,
        read_size: int | None = None,
    ) -> FakeUpstreamResponse:
        """The reply to ``call``; a stream can break (half an event, then a reset) or stall after
        ``break_after``/``stall_after`` token events, and be cut into reads of ``read_size`` bytes."""
        body = call.body
        if call.is_sequential_prefill:
            return FakeUpstreamResponse.json(self._prefill_reply(call))
        if not body.get("stream"):
            if self.role == "prefill":  # a concurrent (SGLang) prefill leg: the answer comes from decode
                return FakeUpstreamResponse.json(self._whole_answer(call, max_tokens=1))
            return FakeUpstreamResponse.json(self._whole_answer(call))
        steps: list[Step] = []
        cut_at = break_after if break_after is not None else stall_after  # (the first events are the tokens)
        for index, payload in enumerate(self._stream_events(call)):
            if index == cut_at:
                if break_after is not None:
                    steps.append(payload[: len(payload) // 2])  # half an event, then the connection dies
                    steps.append(UpstreamError("the engine closed the connection mid-response (reset)"))
                else:
                    steps.append(STALL)
                break
            steps.append(payload)
        if read_size is not None:
            steps = _resplit(steps, read_size)
        return FakeUpstreamResponse(steps, name=f"{self.instance}:{call.request_id}")

    # ------------------------------------------------------------------ inside
    def _cached_reported(self, call: SentCall, prompt_tokens: int) -> int | None:
        params = call.body.get("kv_transfer_params")
        handed_off = (isinstance(params, dict) and params.get("do_remote_prefill")) or (
            "bootstrap_room" in call.body and self.role == "decode"
        )
        if handed_off:
            return max(0, prompt_tokens - 1)  # a decode engine counts every transferred token as cached
        return self.prefix_hit

    def _prefill_reply(self, call: SentCall) -> dict[str, Any]:
        prompt = len(call.prompt)
        answer = self._whole_answer(call, max_tokens=1)
        answer["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": f"engine-{self.instance}",
            "remote_block_ids": list(range((prompt + 15) // 16)),
            "remote_host": "10.0.0.1",
            "remote_port": 5600,
            "request_id": call.request_id,
        }
        return answer

    def _whole_answer(self, call: SentCall, max_tokens: int | None = None) -> dict[str, Any]:
        prompt = len(call.prompt)
        n = int(call.body.get("max_tokens", 16)) if max_tokens is None else max_tokens
        ids = [token_id(prompt + i) for i in range(n)]
        return {
            "id": f"cmpl-{self.instance}-{next(self.ids)}",
            "object": "text_completion",
            "created": 100,
            "model": call.body.get("model", "m"),
            "choices": [
                {
                    "index": 0,
                    "text": "".join(token_text(prompt + i) for i in range(n)),
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_token_ids": None,
                    "token_ids": ids if call.body.get("return_token_ids") else None,
                }
            ],
            "usage": usage(prompt, n, self._cached_reported(call, prompt)),
        }

    def _stream_events(self, call: SentCall) -> list[bytes]:
        body = call.body
        prompt = len(call.prompt)
        n = int(body.get("max_tokens", 16))
        with_ids = bool(body.get("return_token_ids"))
        cid = f"cmpl-{self.instance}-{next(self.ids)}"
        events = []
        for i in range(n):
            position = prompt + i
            chunk = {
                "id": cid,
                "object": "text_completion",
                "created": 100,
                "model": body.get("model", "m"),
                "choices": [
                    {
                        "index": 0,
                        "text": token_text(position),
                        "logprobs": None,
                        "finish_reason": "length" if i == n - 1 else None,
                        "stop_reason": None,
                        "prompt_token_ids": None,
                        "token_ids": [token_id(position)] if with_ids else None,
                    }
                ],
            }
            events.append(event(chunk))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(
                event(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": 100,
                        "model": body.get("model", "m"),
                        "choices": [],
                        "usage": usage(prompt, n, self._cached_reported(call, prompt)),
                    }
                )
            )
        events.append(DONE)
        return events


def _resplit(steps: list[Step], size: int) -> list[Step]:
    """Byte steps joined and cut into reads of ``size`` bytes (other steps stay where they were)."""
    out: list[Step] = []
    run: list[bytes] = []
    for step in [*steps, None]:
        if isinstance(step, bytes):
            run.append(step)
            continue
        out.extend(split_bytes(b"".join(run), size))
        run = []
        if step is not None:
            out.append(step)
    return out


Reply = FakeUpstreamResponse | BaseException | Callable[[SentCall], FakeUpstreamResponse]

_UNUSED_POOL = UpstreamPool()  # the base adapter keeps one; a fake never opens a connection


class FakeEngineAdapter(EngineAdapter):
    """An engine instance the gateway drives through the adapter interface, without any I/O."""

    def __init__(
        self,
        spec: InstanceSpec,
        *,
        protocol: PdProtocol = "sequential",
        live_migration: bool = False,
        model: FakeModel | None = None,
        log: list[SentCall] | None = None,
    ) -> None:
        super().__init__(spec, _UNUSED_POOL)
        self.capabilities = Capabilities(
            pd_protocol=protocol,
            metrics_flavour="sglang" if protocol == "concurrent" else "vllm",
            live_migration=live_migration,
        )
        self.model = model or FakeModel(spec.id, role=spec.role)
        self.script: deque[Reply] = deque()
        self.calls: list[SentCall] = []
        self.log = log
        self.migrations: deque[LiveMigration | BaseException] = deque()
        self.migrate_calls: list[tuple[str, str]] = []
        self.healthy = True
        self._rooms = itertools.count(7_000_000)

    def then(self, *replies: Reply) -> FakeEngineAdapter:
        """Script the next replies (in order); after them the model answers."""
        self.script.extend(replies)
        return self

    @property
    def responses(self) -> list[FakeUpstreamResponse]:
        return [c.response for c in self.calls if c.response is not None]

    # --------------------------------------------------------- the interface
    async def send(
        self,
        path: str,
        body: dict[str, Any],
        request_id: str,
        *,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        call = SentCall(self.spec.id, path, copy.deepcopy(body), request_id, headers)
        self.calls.append(call)
        if self.log is not None:
            self.log.append(call)
        await asyncio.sleep(0)  # the request goes out; the head comes back on a later loop iteration
        reply: Reply = self.script.popleft() if self.script else self.model.respond
        if isinstance(reply, BaseException):
            raise reply
        response = reply if isinstance(reply, FakeUpstreamResponse) else reply(call)
        call.response = response
        return cast(UpstreamResponse, response)

    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.capabilities.pd_protocol != "sequential":
            return super().prefill_body(body)
        prefill = {k: v for k, v in body.items() if k != "stream_options"}
        prefill.update(stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        return prefill

    def handoff_from_prefill(self, reply: dict[str, Any]) -> dict[str, Any]:
        params = reply.get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise HandoffError("the prefill instance returned no kv_transfer_params")
        return {"kv_transfer_params": params}

    def concurrent_fields(self, prefill: EngineAdapter) -> dict[str, Any]:
        if self.capabilities.pd_protocol != "concurrent":
            return super().concurrent_fields(prefill)
        return {
            "bootstrap_host": prefill.spec.host,
            "bootstrap_port": prefill.spec.bootstrap_port,
            "bootstrap_room": next(self._rooms),
        }

    async def live_migrate(self, request_id: str, target: EngineAdapter, *, timeout_s: float) -> LiveMigration:
        self.migrate_calls.append((request_id, target.spec.id))
        await asyncio.sleep(0)
        if not self.migrations:
            raise MigrationError("no live migration scripted")
        outcome = self.migrations.popleft()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def scrape_load(self, now: float, timeout: float = 2.0) -> EngineLoad:
        return EngineLoad(running=0, waiting=0, kv_usage=0.0, scraped_at=now)

    async def check_health(self, timeout: float = 2.0) -> bool:
        return self.healthy
