"""LiveStream: one client stream over engine streams that may end early, fail over or move.

Everything here is what the client of a streamed answer would notice: whole SSE events only,
every token exactly once and in order, one chunk id, usage over the whole answer, nothing lost
when a move fails, and nothing held (leases, tasks, engine requests) once the stream is closed.
The engines are fakes (tests/fakes); the request, cluster, leases, splice and mover are real.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes.engine import expected_text, token_id, token_text
from fakes.fleet import Fleet, Inst, make_fleet
from fakes.sse import chunks_of, event, parse_sse, text_of, usage_of
from fakes.streams import (
    PROMPT,
    assert_one_clean_answer,
    client,
    failover_to,
    gated,
    no_failover,
    open_client,
    parse,
    source_steps,
)
from fakes.tasks import no_leaked_tasks, until  # noqa: F401  (no_leaked_tasks: a fixture)
from fakes.upstream import STALL, FakeUpstreamResponse, Gate, Step

from pdgate.adapters import LiveMigration, UpstreamError
from pdgate.gateway.livestream import Handover, LiveStream, MidStreamFailure

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_leaked_tasks")]


def two_instances() -> Fleet:
    return make_fleet(Inst("d1"), Inst("d2"))


# --------------------------------------------------------------------------------- relaying
async def test_a_stream_is_relayed_intact_whatever_the_reads_cut() -> None:
    fleet = two_instances()
    c = client(fleet, read_size=7)  # reads cut events anywhere, as TCP does
    await c.live.run(no_failover)
    engine_events = parse_sse(c.source.body)
    for chunk in chunks_of(engine_events):  # the gateway asked for ids the client did not: they are hidden
        for choice in chunk["choices"]:
            assert choice["token_ids"] is not None
            choice["token_ids"] = None
    assert c.events() == engine_events
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    assert c.live.trail.token_ids == [token_id(32 + i) for i in range(6)]
    assert c.responder.violations == []
    await c.live.close()
    fleet.assert_idle()


async def test_the_clients_own_token_ids_are_kept() -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=3, return_token_ids=True)
    c = open_client(fleet, routed, source_steps(fleet, routed), proxy)
    await c.live.run(no_failover)
    ids = [ch["token_ids"] for chunk in chunks_of(c.events()) for ch in chunk["choices"]]
    assert ids == [[token_id(32)], [token_id(33)], [token_id(34)]]
    await c.live.close()


# --------------------------------------------------------------------------------- failover
@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"break_after": 3}, id="connection-reset-mid-event"),
        pytest.param({"break_after": 3, "read_size": 11}, id="reset-with-odd-reads"),
        pytest.param({"end_after": 3}, id="clean-end-before-the-answer"),
    ],
)
async def test_failover_gives_every_token_exactly_once_with_one_chunk_id(how: dict[str, Any]) -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=6)
    if "end_after" in how:
        steps = source_steps(fleet, routed)[: how["end_after"]]  # the stream just ends, no finish, no [DONE]
    else:
        steps = source_steps(fleet, routed, **how)
    c = open_client(fleet, routed, steps, proxy)
    await c.live.run(failover_to(c, "d2"))

    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    assert c.responder.violations == []
    (cont,) = fleet["d2"].calls
    assert cont.prompt == [*PROMPT, token_id(32), token_id(33), token_id(34)]  # prompt + what the client had
    assert cont.body["max_tokens"] == 3 and cont.body["stream"] is True
    assert len(c.failover_reasons) == 1
    assert ("reset" in c.failover_reasons[0]) == ("break_after" in how)
    assert c.live.moves == 1 and c.live.instance_id == "d2"
    assert c.source.closed and c.lease.released  # the failed engine's stream and lease are let go at the switch
    await c.live.close()
    fleet.assert_idle()


async def test_a_stream_that_fails_over_twice_still_has_every_token_once() -> None:
    fleet = make_fleet(Inst("d1"), Inst("d2"), Inst("d3"))
    c = client(fleet, max_tokens=8, break_after=2)
    to_d2 = failover_to(c, "d2", break_after=3)  # the first continuation dies too, 3 tokens in
    to_d3 = failover_to(c, "d3")

    async def failover(live: LiveStream, reason: str) -> Handover | None:
        return await (to_d2 if live.moves == 0 else to_d3)(live, reason)

    await c.live.run(failover)
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=8)
    assert [len(fleet[i].calls[0].prompt) for i in ("d2", "d3")] == [34, 37]
    assert c.live.moves == 2 and c.live.instance_id == "d3"
    await c.live.close()
    fleet.assert_idle()


async def test_a_chat_stream_fails_over_as_chat_chunks() -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, kind="chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
    n = len(routed.prompt_ids)
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}

    def delta(content: str, ids: list[int]) -> bytes:
        choice = {"index": 0, "delta": {"content": content}, "finish_reason": None, "token_ids": ids}
        return event({**base, "choices": [choice]})

    steps: list[Step] = [
        event(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        ),
        delta(token_text(n), [token_id(n)]),
        delta(token_text(n + 1), [token_id(n + 1)]),
        UpstreamError("reset"),
    ]
    c = open_client(fleet, routed, steps, proxy)
    await c.live.run(failover_to(c, "d2"))
    events = c.events()
    assert {e["object"] for e in chunks_of(events)} == {"chat.completion.chunk"}
    assert {e["id"] for e in chunks_of(events)} == {"chatcmpl-1"}
    assert text_of(events) == expected_text(n, 5)
    assert usage_of(events)["completion_tokens"] == 5 and usage_of(events)["prompt_tokens"] == n
    assert all(ch.get("token_ids") is None for e in chunks_of(events) for ch in e["choices"])  # not asked for
    assert events[-1] == "[DONE]"
    await c.live.close()
    fleet.assert_idle()


async def test_a_stream_that_breaks_with_nowhere_to_go_leaves_only_whole_events() -> None:
    fleet = two_instances()
    c = client(fleet, break_after=2)

    async def nowhere(live: LiveStream, reason: str) -> Handover | None:
        return None

    with pytest.raises(MidStreamFailure) as failure:
        await c.live.run(nowhere)
    assert failure.value.instance_id == "d1"
    events = c.events()  # parses: no half event reached the client
    assert text_of(events) == expected_text(32, 2) and "[DONE]" not in events
    await c.live.close()
    fleet.assert_idle()


async def test_a_stream_that_lost_only_its_end_is_finished_by_the_gateway() -> None:
    """Every token arrived, then the engine died before its usage and [DONE]: no engine is needed."""
    fleet = two_instances()
    c = client(fleet, max_tokens=4, break_after=4)
    await c.live.run(no_failover)
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=4)
    await c.live.close()


# --------------------------------------------------------------------------- make before break
async def test_freeze_holds_back_what_the_source_sends_and_thaw_releases_it_in_order() -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=6)
    steps, (first_gate, second_gate) = gated(source_steps(fleet, routed), 2, 4)
    c = open_client(fleet, routed, steps, proxy)
    run = asyncio.create_task(c.live.run(no_failover))

    await until(first_gate.reached.is_set, what="the source pauses after two tokens")
    assert c.live.freeze() == 2
    first_gate.open()
    await until(second_gate.reached.is_set, what="two more tokens sent while frozen")
    assert text_of(c.events()) == expected_text(32, 2)  # held back from the client
    assert c.live.generated == 4  # ... though tracked: they are the source's

    c.live.thaw()
    assert text_of(c.events()) == expected_text(32, 4)
    second_gate.open()
    await run
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    await c.live.close()


@pytest.mark.parametrize("failure", ["breaks-before-first-byte", "refused-503", "unreachable"])
async def test_a_move_whose_continuation_fails_leaves_the_clients_stream_intact(failure: str) -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=6)
    steps, (source_gate, later_gate) = gated(source_steps(fleet, routed), 2, 4)
    c = open_client(fleet, routed, steps, proxy)
    target_gate = Gate("target")
    if failure == "breaks-before-first-byte":
        fleet["d2"].then(FakeUpstreamResponse([target_gate, UpstreamError("reset")]))
    elif failure == "refused-503":
        fleet["d2"].then(FakeUpstreamResponse.error(503, "overloaded"))
    else:
        fleet["d2"].then(UpstreamError("connection refused"))
    run = asyncio.create_task(c.live.run(no_failover))
    await until(source_gate.reached.is_set)

    move = asyncio.create_task(proxy.mover.move(c.live, fleet.state("d2"), "balance"))
    c.live.move_task = move
    if failure == "breaks-before-first-byte":
        await until(target_gate.reached.is_set, what="the continuation opened and waits for its first byte")
        assert c.live.frozen
        source_gate.open()  # the source goes on meanwhile: its events are held ...
        await until(later_gate.reached.is_set)
        assert c.live.generated == 4 and text_of(c.events()) == expected_text(32, 2)
        target_gate.open()  # ... and the continuation breaks: they go out

    assert await move is False
    assert not c.live.frozen and not c.live.moving
    source_gate.open()
    await until(later_gate.reached.is_set)
    assert text_of(c.events()) == expected_text(32, 4)
    later_gate.open()
    await run
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    assert c.source.aborted is None and c.live.moves == 0  # the source was never cut
    assert all(r.closed for r in fleet["d2"].responses)  # the failed continuation was let go
    await c.live.close()
    fleet.assert_idle()


async def test_an_answer_that_ends_during_a_move_cancels_the_move_and_loses_nothing() -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=6)
    steps, (source_gate,) = gated(source_steps(fleet, routed), 2)
    c = open_client(fleet, routed, steps, proxy)
    target_gate = Gate("target")
    fleet["d2"].then(FakeUpstreamResponse([target_gate, STALL]))
    run = asyncio.create_task(c.live.run(no_failover))
    await until(source_gate.reached.is_set)
    move = asyncio.create_task(proxy.mover.move(c.live, fleet.state("d2"), "balance"))
    c.live.move_task = move
    await until(target_gate.reached.is_set)

    source_gate.open()  # the source finishes the answer while the client's side is frozen
    await run
    assert move.cancelled()
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    assert fleet["d2"].responses[0].abandoned
    await c.live.close()
    fleet.assert_idle()


async def test_a_move_cuts_the_source_only_once_the_target_streams() -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=8)
    steps, (source_gate,) = gated(source_steps(fleet, routed), 3)
    c = open_client(fleet, routed, steps, proxy)
    run = asyncio.create_task(c.live.run(no_failover))
    await until(source_gate.reached.is_set)

    assert await proxy.mover.move(c.live, fleet.state("d2"), "balance") is True
    assert c.source.aborted == "migrated to d2"
    await run
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=8)
    (cont,) = fleet["d2"].calls
    assert cont.prompt == [*PROMPT, *(token_id(32 + i) for i in range(3))]
    assert c.live.moves == 1 and c.live.instance_id == "d2"
    await c.live.close()
    fleet.assert_idle()


@pytest.mark.parametrize("engine_agrees", [True, False], ids=["kv-moved", "token-mismatch-recomputes"])
async def test_a_live_migration_continues_from_the_moved_kv_once_the_source_ends(engine_agrees: bool) -> None:
    fleet = make_fleet(Inst("d1", live_migration=True), Inst("d2", live_migration=True))
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=6)
    produced = source_steps(fleet, routed)[:3]  # the source engine stops after 3 tokens: it migrated the request
    migrated = Gate("migrated")
    c = open_client(fleet, routed, [*produced, migrated], proxy)
    reported = [token_id(32), token_id(33), token_id(34)] if engine_agrees else [token_id(32)]
    handoff = {"kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "engine-d1"}}
    fleet["d1"].migrations.append(LiveMigration(reported, handoff, downtime_s=0.01, stages=2))
    run = asyncio.create_task(c.live.run(no_failover))
    await until(migrated.reached.is_set)

    move = asyncio.create_task(proxy.mover.move(c.live, fleet.state("d2"), "balance"))
    c.live.move_task = move
    await until(lambda: bool(fleet["d1"].migrate_calls))
    assert not c.live.frozen  # a live move never holds the client's stream back
    migrated.open()  # the source engine ends its stream
    assert await move is True
    await run

    assert fleet["d1"].migrate_calls == [(routed.info.request_id, "d2")]
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    (cont,) = fleet["d2"].calls
    assert cont.prompt == [*PROMPT, token_id(32), token_id(33), token_id(34)]
    assert ("kv_transfer_params" in cont.body) is engine_agrees
    assert c.source.aborted is None  # the engine ended it; the gateway did not have to cut it
    await c.live.close()
    fleet.assert_idle()


# ------------------------------------------------------------------------------------ close
async def test_close_after_a_failover_releases_leases_cancels_tasks_and_aborts_the_continuation() -> None:
    fleet = two_instances()
    c = client(fleet, max_tokens=6, break_after=2)
    prefill_leg = asyncio.create_task(asyncio.Event().wait(), name="concurrent-prefill-leg")
    run = asyncio.create_task(c.live.run(failover_to(c, "d2", tasks=[prefill_leg], stall_after=1)))
    await until(lambda: c.live.moves == 1 and text_of(c.events()) == expected_text(32, 3))

    run.cancel()  # the client went away
    await asyncio.gather(run, return_exceptions=True)
    await c.live.close()
    assert prefill_leg.cancelled()
    (continuation,) = fleet["d2"].responses
    assert continuation.abandoned  # closed before its end: the engine aborts the request
    fleet.assert_idle()


async def test_close_during_a_move_cancels_it_and_frees_the_target() -> None:
    fleet = two_instances()
    proxy = fleet.proxy()
    routed = parse(proxy, max_tokens=6)
    steps, (source_gate,) = gated(source_steps(fleet, routed), 2)
    c = open_client(fleet, routed, steps, proxy)
    fleet["d2"].then(FakeUpstreamResponse([STALL]))  # the target never sends its first byte
    run = asyncio.create_task(c.live.run(no_failover))
    await until(source_gate.reached.is_set)
    move = asyncio.create_task(proxy.mover.move(c.live, fleet.state("d2"), "drain"))
    c.live.move_task = move
    await until(lambda: bool(fleet["d2"].calls) and fleet.state("d2").inflight_requests == 1)

    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await c.live.close()
    assert move.cancelled()
    assert not c.live.moving
    assert fleet["d2"].responses[0].abandoned
    fleet.assert_idle()


async def test_backpressure_follows_the_stream_to_its_new_engine() -> None:
    fleet = two_instances()
    c = client(fleet, max_tokens=6, break_after=2)
    c.responder.client_pauses()
    handed: list[FakeUpstreamResponse] = []
    failover = failover_to(c, "d2")

    async def record(live: LiveStream, reason: str) -> Handover | None:
        handover = await failover(live, reason)
        assert handover is not None
        handed.append(handover.upstream)  # type: ignore[arg-type]
        return handover

    run = asyncio.create_task(c.live.run(record))
    await until(lambda: bool(handed))
    await until(lambda: handed[0].paused, what="the continuation paused for the slow client")
    assert text_of(c.events()) != expected_text(32, 6)
    c.responder.client_resumes()
    await run
    assert_one_clean_answer(c.events(), prompt=32, max_tokens=6)
    await c.live.close()
