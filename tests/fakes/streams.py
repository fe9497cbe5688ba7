"""Streamed requests in flight through a real :class:`~pdgate.gateway.livestream.LiveStream`, over fake engines.

:func:`open_client` sets up what the relay hands a LiveStream (headers sent to a
:class:`FakeResponder`, the first engine's scripted stream, a lease on that instance);
:func:`failover_to` is a failover callback that continues the answer elsewhere the way the
gateway's mover does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fakes.engine import SentCall, expected_text
from fakes.fleet import Fleet
from fakes.responder import FakeResponder
from fakes.sse import chunks_of, text_of, usage_of
from fakes.upstream import FakeUpstreamResponse, Gate, Step
from pdgate.gateway.instance_state import Lease
from pdgate.gateway.intake import Routed
from pdgate.gateway.livestream import Handover, LiveStream
from pdgate.gateway.proxy import Proxy
from pdgate.gateway.splice import StreamTrail, continuation_body

PROMPT = list(range(1, 33))  # 32 tokens: the fake model's answer starts at position 32
SOURCE_ID = "cmpl-d1-0"  # the first chunk id fake engine d1 writes

Failover = Callable[[LiveStream, str], Awaitable[Handover | None]]


@dataclass
class Client:
    """One streamed request in flight through a LiveStream (what the relay sets up before ``run``)."""

    fleet: Fleet
    proxy: Proxy
    routed: Routed
    live: LiveStream
    responder: FakeResponder
    source: FakeUpstreamResponse
    lease: Lease
    failover_reasons: list[str] = field(default_factory=list)

    def events(self) -> list[Any]:
        return self.responder.events()


def parse(proxy: Proxy, *, kind: str = "completion", **fields: Any) -> Routed:
    """A client's streamed request, validated by the gateway's real intake (movable: migration is on)."""
    body: dict[str, Any] = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, **fields}
    if kind == "completion":
        body.setdefault("prompt", PROMPT)
    routed = proxy.intake.parse(json.dumps(body).encode(), kind, None)
    assert routed.movable
    return routed


def source_steps(fleet: Fleet, routed: Routed, instance: str = "d1", **faults: Any) -> list[Step]:
    """What engine ``instance`` would send for ``routed`` (its model's answer, with ``faults``)."""
    call = SentCall(instance, routed.path, routed.body, routed.info.request_id, None)
    return list(fleet[instance].model.respond(call, **faults)._steps)


def open_client(fleet: Fleet, routed: Routed, steps: list[Step], proxy: Proxy, instance: str = "d1") -> Client:
    """The stream as the relay hands it to a LiveStream: headers sent, leased on ``instance``."""
    info = routed.info
    lease = fleet.cluster.lease(
        instance, decode_tokens=info.max_tokens, context_tokens=info.prompt_tokens + info.max_tokens
    )
    source = FakeUpstreamResponse(steps, name=f"source-{info.request_id}")
    responder = FakeResponder()
    responder.start(200, content_type="text/event-stream")
    live = LiveStream(
        routed,
        trail=StreamTrail(strip_ids=not routed.want_ids),
        state=fleet.state(instance),
        upstream=source,  # type: ignore[arg-type]
        leases=[lease],
        responder=responder,  # type: ignore[arg-type]
        observe=lambda data: None,
        clock=fleet.clock,
    )
    return Client(fleet, proxy, routed, live, responder, source, lease)


def client(fleet: Fleet, *, proxy: Proxy | None = None, max_tokens: int = 6, **faults: Any) -> Client:
    """A completion of ``max_tokens`` streaming from d1 (its model's answer, with ``faults``)."""
    proxy = proxy or fleet.proxy()
    routed = parse(proxy, max_tokens=max_tokens)
    return open_client(fleet, routed, source_steps(fleet, routed, **faults), proxy)


async def no_failover(live: LiveStream, reason: str) -> Handover | None:
    raise AssertionError(f"no failover expected ({reason})")


def failover_to(c: Client, target: str, *, tasks: list[asyncio.Task[Any]] | None = None, **faults: Any) -> Failover:
    """A failover callback that continues the answer on ``target`` from the tokens the client has,
    as the gateway's mover does (continuation body, a lease, the first piece read)."""

    async def failover(live: LiveStream, reason: str) -> Handover | None:
        c.failover_reasons.append(reason)
        generated = list(live.trail.token_ids)
        body = continuation_body(live.routed.body, live.routed.prompt_ids, generated, live.max_tokens)
        adapter = c.fleet[target]
        if faults:
            adapter.then(lambda call: adapter.model.respond(call, **faults))
        upstream = await adapter.send("/v1/completions", body, f"{live.request_id}-m1", timeout_s=5.0)
        lease = c.fleet.cluster.lease(target, decode_tokens=len(body["prompt"]), context_tokens=len(body["prompt"]))
        first = await upstream.first_chunk()
        return Handover(c.fleet.state(target), upstream, first, len(generated), "recompute", [lease], list(tasks or []))

    return failover


def gated(steps: list[Step], *positions: int) -> tuple[list[Step], list[Gate]]:
    """``steps`` with a gate before each of ``positions`` (indexes into the original steps)."""
    gates = [Gate(f"before-{p}") for p in positions]
    out: list[Step] = []
    for index, step in enumerate(steps):
        for p, gate in zip(positions, gates):
            if p == index:
                out.append(gate)
        out.append(step)
    return out, gates


def assert_one_clean_answer(events: list[Any], *, prompt: int, max_tokens: int, cid: str | None = SOURCE_ID) -> None:
    """Every token once and in order, one chunk id, usage over the whole answer, one [DONE] at the end."""
    assert text_of(events) == expected_text(prompt, max_tokens)
    ids = {c["id"] for c in chunks_of(events)}
    assert len(ids) == 1 and (cid is None or ids == {cid}), ids
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    finishes = [ch["finish_reason"] for c in chunks_of(events) for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["length"]
    got = usage_of(events)
    assert got is not None
    assert (got["prompt_tokens"], got["completion_tokens"], got["total_tokens"]) == (
        prompt,
        max_tokens,
        prompt + max_tokens,
    )
