"""The request path end to end in-process: Proxy -> Intake -> Exchange -> Placer -> PdLegs -> Relay.

The parts are real and assembled by :class:`~pdgate.gateway.proxy.Proxy` itself over a real
Cluster whose instances' adapters are fakes (tests/fakes/fleet.py documents how); the client is
a :class:`FakeResponder`, and where the client's view of an error matters the request goes
through :class:`~pdgate.gateway.app.GatewayApp`, which turns errors into responses.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
from fakes.engine import expected_text, token_id
from fakes.fleet import Fleet, Inst, completion_request, make_fleet, registry
from fakes.responder import FakeResponder
from fakes.sse import chunks_of, parse_sse, text_of, usage_of
from fakes.streams import assert_one_clean_answer
from fakes.tasks import no_leaked_tasks, until  # noqa: F401  (no_leaked_tasks: a fixture)
from fakes.upstream import FakeUpstreamResponse, Gate

from pdgate.adapters import UpstreamError
from pdgate.common.http_server import HttpRequest
from pdgate.gateway.app import Gateway, GatewayApp
from pdgate.gateway.proxy import Proxy
from pdgate.gateway.requests import GatewayError

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_leaked_tasks")]

REGISTRY = registry()
PROMPT_TOKENS = 32  # completion_request's default prompt
PINNED = {"enabled": False, "failover": False}  # migration config: streams are relayed plainly
MOVABLE: dict[str, Any] = {}  # the default: streams go through a LiveStream


async def serve(proxy: Proxy, request: HttpRequest) -> FakeResponder:
    responder = FakeResponder()
    await proxy.handle(request, responder, "completion")  # type: ignore[arg-type]
    assert responder.violations == []
    return responder


async def serve_app(fleet: Fleet, proxy: Proxy, request: HttpRequest) -> FakeResponder:
    """Through the gateway's HTTP application: what a client gets, errors included."""
    profiles, handler = fleet.profiles()
    gateway = Gateway(
        fleet.config,
        profiles,
        {},
        proxy.outcome.metrics,
        admitter=REGISTRY.create_admitter("always-admit", {}),
        migration_policy=REGISTRY.create_migration_policy("no-migration", {}),
        profile_handler=handler,
    )
    responder = FakeResponder()
    await GatewayApp(gateway, fleet.cluster, proxy)(request, responder)  # type: ignore[arg-type]
    return responder


# -------------------------------------------------------------------------------- colocated
@pytest.mark.parametrize("migration", [MOVABLE, PINNED], ids=["movable", "pinned"])
async def test_a_colocated_request_streams_to_the_client(migration: dict[str, Any]) -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"), migration=migration)
    proxy = fleet.proxy()
    responder = await serve(proxy, completion_request(max_tokens=5, request_id="req-1"))

    assert responder.status == 200 and responder.content_type == "text/event-stream"
    assert responder.headers["X-Request-Id"] == "req-1" and responder.finished
    assert_one_clean_answer(responder.events(), prompt=PROMPT_TOKENS, max_tokens=5, cid="cmpl-c1-0")
    assert all(ch["token_ids"] is None for c in chunks_of(responder.events()) for ch in c["choices"])
    (call,) = fleet.log
    assert call.instance == "c1" and call.request_id == "req-1"
    assert call.body["prompt"] == list(range(1, 33)) and call.body["max_tokens"] == 5
    assert call.body.get("return_token_ids") is (True if migration is MOVABLE else None)
    assert call.response is not None and call.response.complete
    fleet.assert_idle()


async def test_a_relayed_stream_leaves_no_reference_cycle() -> None:
    """Everything a stream used is freed by reference counting when it ends: nothing waits for the
    garbage collector (which, with many streams, costs CPU on every collection)."""
    fleet = make_fleet(Inst("c1"))
    proxy = fleet.proxy()
    await serve(proxy, completion_request(max_tokens=2))  # whatever a first request builds once
    gc.collect()
    gc.disable()
    try:
        responder = await serve(proxy, completion_request(max_tokens=5))
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert responder.finished
    assert not left & {"LiveStream", "StreamTrail", "Routed", "Observation"}, left


async def test_a_colocated_request_answers_whole_when_not_streamed() -> None:
    fleet = make_fleet(Inst("c1"))
    responder = await serve(fleet.proxy(), completion_request(max_tokens=3, stream=False))
    assert responder.status == 200 and responder.content_type == "application/json" and not responder.streaming
    answer = responder.json()
    assert answer["choices"][0]["text"] == expected_text(PROMPT_TOKENS, 3)
    assert answer["usage"]["completion_tokens"] == 3
    fleet.assert_idle()


async def test_an_engines_client_error_is_the_clients_and_is_not_retried() -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"))
    fleet["c1"].then(FakeUpstreamResponse.json({"error": {"message": "max_tokens is too large"}}, status=400))
    proxy = fleet.proxy()
    responder = await serve_app(fleet, proxy, completion_request())
    assert responder.status == 400
    assert responder.json()["error"]["message"] == "max_tokens is too large"
    assert [c.instance for c in fleet.log] == ["c1"]
    assert fleet.state("c1").breaker.failures == 0  # the engine is fine: the request was not
    fleet.assert_idle()


# ---------------------------------------------------------------------------------------- PD
async def test_sequential_pd_sends_the_prefill_then_the_decode_with_its_kv_transfer_params() -> None:
    fleet = make_fleet(Inst("p1", "prefill"), Inst("d1", "decode"))
    responder = await serve(fleet.proxy(), completion_request(max_tokens=4))

    prefill, decode = fleet.log
    assert (prefill.instance, decode.instance) == ("p1", "d1")
    assert prefill.body["stream"] is False and prefill.body["max_tokens"] == 1
    assert prefill.body["kv_transfer_params"] == {"do_remote_decode": True}
    assert "stream_options" not in prefill.body
    assert prefill.response is not None and prefill.response.complete  # read to its end before the decode leg
    handed = decode.body["kv_transfer_params"]
    assert handed["do_remote_prefill"] is True and handed["remote_engine_id"] == "engine-p1"
    assert handed["request_id"] == prefill.request_id == decode.request_id
    assert decode.body["stream"] is True and decode.body["max_tokens"] == 4
    assert decode.body["prompt"] == prefill.body["prompt"] == list(range(1, 33))
    assert_one_clean_answer(responder.events(), prompt=PROMPT_TOKENS, max_tokens=4, cid="cmpl-d1-0")
    fleet.assert_idle()


async def test_a_failed_sequential_prefill_is_retried_on_another_prefill_instance() -> None:
    fleet = make_fleet(Inst("p1", "prefill"), Inst("p2", "prefill"), Inst("d1", "decode"))
    fleet["p1"].then(UpstreamError("connection refused"))
    responder = await serve(fleet.proxy(), completion_request(max_tokens=3))
    assert [c.instance for c in fleet.log] == ["p1", "p2", "d1"]
    assert_one_clean_answer(responder.events(), prompt=PROMPT_TOKENS, max_tokens=3, cid=None)
    assert fleet.state("p1").breaker.failures == 1
    fleet.assert_idle()


def concurrent_pd() -> Fleet:
    return make_fleet(
        Inst("p1", "prefill", "concurrent"), Inst("p2", "prefill", "concurrent"), Inst("d1", "decode", "concurrent")
    )


async def test_concurrent_pd_retries_elsewhere_when_the_prefill_leg_fails_before_the_first_decode_byte() -> None:
    fleet = concurrent_pd()
    prefill_reply = Gate("prefill-reply")
    waiting_for_kv = Gate("decode-first-byte")  # never opens: without its KV the decode leg sends nothing
    fleet["p1"].then(
        FakeUpstreamResponse([prefill_reply, b'{"error": {"message": "prefill crashed"}}'], status=500, name="p1-500")
    )
    fleet["d1"].then(FakeUpstreamResponse([waiting_for_kv], name="decode-waiting-for-kv"))
    task = asyncio.create_task(serve(fleet.proxy(), completion_request(max_tokens=4)))
    await until(waiting_for_kv.reached.is_set, what="the relay waits for the decode leg's first byte")
    prefill_reply.open()  # ... when the prefill leg fails
    responder = await task

    assert sorted(c.instance for c in fleet.log) == ["d1", "d1", "p1", "p2"]
    first_decode, second_decode = fleet["d1"].calls
    (bad,), (good,) = fleet["p1"].calls, fleet["p2"].calls
    assert bad.body["bootstrap_room"] == first_decode.body["bootstrap_room"]  # each attempt's legs share a room
    assert good.body["bootstrap_room"] == second_decode.body["bootstrap_room"] != bad.body["bootstrap_room"]
    assert good.body["bootstrap_port"] == fleet.state("p2").spec.bootstrap_port
    assert good.body["stream"] is False and "stream_options" not in good.body
    assert first_decode.response is not None and first_decode.response.abandoned  # aborted on the decode engine
    assert responder.status == 200
    assert_one_clean_answer(responder.events(), prompt=PROMPT_TOKENS, max_tokens=4, cid=None)
    assert fleet.state("p1").breaker.failures == 1  # the failed instance is recorded (and was excluded)
    assert fleet.state("d1").breaker.failures == 0
    fleet.assert_idle()


async def test_concurrent_pd_retries_when_the_prefill_leg_failed_as_the_decode_leg_answered() -> None:
    fleet = concurrent_pd()
    fleet["p1"].then(UpstreamError("connection reset"))  # fails in the same loop turn as the decode head arrives
    fleet["d1"].then(FakeUpstreamResponse([Gate("decode-first-byte")], name="decode-waiting-for-kv"))
    task = asyncio.create_task(serve(fleet.proxy(), completion_request(max_tokens=4)))
    try:
        await until(task.done, what="the request to be retried on p2", steps=500)
        assert_one_clean_answer(task.result().events(), prompt=PROMPT_TOKENS, max_tokens=4, cid=None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    fleet.assert_idle()


# ------------------------------------------------------------------------- before the first byte
@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(lambda: FakeUpstreamResponse.error(503, "overloaded"), id="http-503"),
        pytest.param(lambda: UpstreamError("connection refused"), id="unreachable"),
        pytest.param(lambda: FakeUpstreamResponse([UpstreamError("reset")]), id="broke-before-first-byte"),
    ],
)
async def test_a_failure_before_the_first_byte_is_retried_on_another_instance(failure: Any) -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"))
    fleet["c1"].then(failure())
    responder = await serve(fleet.proxy(), completion_request(max_tokens=3))
    assert [c.instance for c in fleet.log] == ["c1", "c2"]
    assert_one_clean_answer(responder.events(), prompt=PROMPT_TOKENS, max_tokens=3, cid="cmpl-c2-0")
    assert all(r.closed for r in fleet["c1"].responses)
    fleet.assert_idle()


async def test_when_every_attempt_fails_before_the_first_byte_the_client_gets_502_with_retry_after() -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"), Inst("c3"), retries=1)
    for iid in ("c1", "c2", "c3"):
        fleet[iid].then(FakeUpstreamResponse.error(503, f"{iid} overloaded"))
    proxy = fleet.proxy()
    with pytest.raises(GatewayError) as raised:
        await serve(proxy, completion_request())
    assert raised.value.status == 502 and raised.value.headers["Retry-After"] == "1"
    assert raised.value.headers["X-Request-Id"].startswith("pdgate-")  # the refusal names its request too
    assert [c.instance for c in fleet.log] == ["c1", "c2"]  # 1 + retries attempts, each elsewhere
    assert all(r.closed for r in fleet.adapters["c1"].responses + fleet.adapters["c2"].responses)
    fleet.assert_idle()

    fleet.log.clear()
    for iid in ("c1", "c2"):
        fleet[iid].then(FakeUpstreamResponse.error(503, f"{iid} overloaded"))
    responder = await serve_app(fleet, proxy, completion_request())  # what the client sees
    assert responder.status == 502 and responder.headers.get("Retry-After") == "1"
    assert responder.json()["error"]["type"] == "upstream_error"
    fleet.assert_idle()


# ------------------------------------------------------------------------------ cached tokens
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("protocol", ["sequential", "concurrent"])
@pytest.mark.parametrize("prefill_hit", [16, None], ids=["hit", "miss"])
async def test_after_a_pd_hand_off_the_clients_cached_tokens_are_the_prefill_legs(
    stream: bool, protocol: Any, prefill_hit: int | None
) -> None:
    fleet = make_fleet(Inst("p1", "prefill", protocol, prefix_hit=prefill_hit), Inst("d1", "decode", protocol))
    responder = await serve(fleet.proxy(), completion_request(max_tokens=3, stream=stream))

    decode_call = fleet["d1"].calls[0]
    assert decode_call.response is not None
    engine_usage = (
        usage_of(parse_sse(decode_call.response.body)) if stream else json.loads(decode_call.response.body)["usage"]
    )
    assert engine_usage["prompt_tokens_details"] == {"cached_tokens": PROMPT_TOKENS - 1}  # the transferred KV
    client_usage = usage_of(responder.events()) if stream else responder.json()["usage"]
    expected = {"cached_tokens": prefill_hit} if prefill_hit else None
    assert client_usage["prompt_tokens_details"] == expected
    assert client_usage["prompt_tokens"] == PROMPT_TOKENS and client_usage["completion_tokens"] == 3
    fleet.assert_idle()


async def test_concurrent_pd_whole_answer_waits_for_the_prefill_legs_figure() -> None:
    fleet = make_fleet(Inst("p1", "prefill", "concurrent", prefix_hit=16), Inst("d1", "decode", "concurrent"))
    late = Gate("prefill-reply")

    def slow_prefill(call: Any) -> FakeUpstreamResponse:
        reply = fleet["p1"].model.respond(call)
        return FakeUpstreamResponse([late, *reply._steps], headers=reply.headers)

    fleet["p1"].then(slow_prefill)
    proxy = fleet.proxy()
    task = asyncio.create_task(serve(proxy, completion_request(max_tokens=2, stream=False)))
    await until(lambda: late.reached.is_set() and bool(fleet["d1"].calls) and fleet["d1"].responses[0].complete)
    late.open()  # the prefill leg's HTTP reply arrives after the decode leg's
    responder = await task
    assert responder.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
    fleet.assert_idle()


# --------------------------------------------------------------------------------- mid-stream
async def test_a_movable_stream_whose_engine_dies_fails_over_and_the_client_sees_one_answer() -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"))
    fleet["c1"].then(lambda call: fleet["c1"].model.respond(call, break_after=2, read_size=13))
    proxy = fleet.proxy()
    responder = await serve(proxy, completion_request(max_tokens=6))

    assert_one_clean_answer(responder.events(), prompt=PROMPT_TOKENS, max_tokens=6, cid="cmpl-c1-0")
    first, cont = fleet.log
    assert (first.instance, cont.instance) == ("c1", "c2")
    assert cont.body["prompt"] == [*range(1, 33), token_id(32), token_id(33)]
    assert cont.body["max_tokens"] == 4
    assert first.response is not None and first.response.closed
    fleet.assert_idle()


async def test_an_instance_whose_streams_keep_dying_mid_way_is_taken_out_by_its_circuit_breaker() -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"))
    proxy = fleet.proxy()
    threshold = fleet.config.health.failure_threshold
    for _ in range(threshold):
        fleet["c1"].then(lambda call: fleet["c1"].model.respond(call, break_after=1))
        assert_one_clean_answer((await serve(proxy, completion_request())).events(), prompt=32, max_tokens=4, cid=None)
    assert fleet.state("c1").breaker.state == "open"
    fleet.log.clear()
    await serve(proxy, completion_request())
    assert [c.instance for c in fleet.log] == ["c2"]
    fleet.assert_idle()


def pinned_stream_broken(fleet: Fleet, *, mid_event: bool) -> None:
    """c1's stream: two token events, then (half of the third and) a reset."""

    def reply(call: Any) -> FakeUpstreamResponse:
        steps = list(fleet["c1"].model.respond(call)._steps)
        cut: list[Any] = [steps[0], steps[1]]
        if mid_event:
            cut.append(steps[2][:25])
        return FakeUpstreamResponse([*cut, UpstreamError("reset")])

    fleet["c1"].then(reply)


async def test_a_pinned_stream_whose_engine_dies_ends_with_an_error_event() -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"), migration=PINNED)
    pinned_stream_broken(fleet, mid_event=False)
    responder = await serve(fleet.proxy(), completion_request(max_tokens=6))
    events = responder.events()
    assert responder.status == 200 and responder.finished
    assert text_of(events) == expected_text(PROMPT_TOKENS, 2)
    assert events[-2]["error"]["type"] == "upstream_error" and events[-1] == "[DONE]"
    assert [c.instance for c in fleet.log] == ["c1"]  # too late to retry: the client had tokens
    fleet.assert_idle()


async def test_a_pinned_stream_that_dies_mid_event_still_ends_with_a_parseable_error_event() -> None:
    fleet = make_fleet(Inst("c1"), Inst("c2"), migration=PINNED)
    pinned_stream_broken(fleet, mid_event=True)
    responder = await serve(fleet.proxy(), completion_request(max_tokens=6))
    events = responder.events()
    assert events[-2]["error"]["type"] == "upstream_error" and events[-1] == "[DONE]"
    fleet.assert_idle()


@pytest.mark.parametrize("migration", [MOVABLE, PINNED], ids=["movable", "pinned"])
async def test_a_client_that_goes_away_aborts_the_engine_request_and_frees_its_leases(
    migration: dict[str, Any],
) -> None:
    fleet = make_fleet(Inst("p1", "prefill"), Inst("d1", "decode"), migration=migration)
    gate = Gate("mid-answer")

    def slow(call: Any) -> FakeUpstreamResponse:
        steps = fleet["d1"].model.respond(call)._steps
        return FakeUpstreamResponse([steps[0], steps[1], gate, *list(steps)[2:]])

    fleet["d1"].then(slow)
    responder = FakeResponder()
    task = asyncio.create_task(fleet.proxy().handle(completion_request(max_tokens=6), responder, "completion"))  # type: ignore[arg-type]
    await until(gate.reached.is_set)
    assert fleet.state("d1").inflight_requests == 1
    task.cancel()  # the server cancels the request's task when its client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fleet["d1"].responses[0].abandoned
    fleet.assert_idle()
