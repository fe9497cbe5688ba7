"""MigrationController: drains, concurrency, retries, the stall watchdog and its own shutdown.

The controller is real, and so are its policy (the in-tree ``load-balance`` / ``no-migration``
plugins from a registry without entry points), the cluster (fake engines, see fakes.fleet), and
the LiveStreams it moves. The mover is :class:`FakeMover`: it records each move, can hold it
(a gate) or fail it, and on success switches the stream to the target the way a finished move
does (``LiveStream.switch`` with a continuation leased on the target), so that what the
controller sees afterwards is what it would see in the gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest
from fakes.engine import expected_text, token_id
from fakes.fleet import Fleet, Inst, make_fleet
from fakes.sse import text_of
from fakes.streams import (
    Client,
    assert_one_clean_answer,
    failover_to,
    open_client,
    source_steps,
)
from fakes.tasks import no_leaked_tasks, settle, until  # noqa: F401  (no_leaked_tasks: a fixture)
from fakes.upstream import STALL, FakeUpstreamResponse

from pdgate.gateway.instance_state import InstanceState
from pdgate.gateway.livestream import Handover, LiveStream
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.proxy import Proxy
from pdgate.scheduler.framework import MigrationPolicy
from pdgate.scheduler.registry import PluginRegistry

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_leaked_tasks")]

REGISTRY = PluginRegistry(load_entry_points=False)


@dataclass
class Move:
    request_id: str
    source: str
    target: str
    reason: str


class FakeMover:
    """A :class:`~pdgate.gateway.migration.Mover` that records moves; see the module doc."""

    def __init__(self, fleet: Fleet, outcomes: list[bool] | None = None, *, hold: bool = False) -> None:
        self.fleet = fleet
        self.outcomes: deque[bool] = deque(outcomes or [])
        self.gate = asyncio.Event()
        if not hold:
            self.gate.set()
        self.calls: list[Move] = []
        self.active = 0
        self.most_active = 0
        self.cancelled = 0

    async def move(self, live: LiveStream, target: InstanceState, reason: str) -> bool:
        self.calls.append(Move(live.request_id, live.instance_id, target.spec.id, reason))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await self.gate.wait()
            ok = self.outcomes.popleft() if self.outcomes else True
            if ok:
                lease = self.fleet.cluster.lease(target.spec.id, decode_tokens=live.max_tokens - live.generated)
                continuation = FakeUpstreamResponse([STALL], name=f"continuation-{live.request_id}")
                live.switch(Handover(target, continuation, b"", live.generated, "recompute", [lease], reason=reason))  # type: ignore[arg-type]
            return ok
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


def policy(name: str = "no-migration", **params: Any) -> MigrationPolicy:
    return REGISTRY.create_migration_policy(name, params)


def three_decoders(**migration: Any) -> Fleet:
    return make_fleet(Inst("d1"), Inst("d2"), Inst("d3"), migration={"interval_s": 0.05, **migration})


def controller(fleet: Fleet, mover: FakeMover, policy_: MigrationPolicy | None = None) -> MigrationController:
    return MigrationController(fleet.config.migration, fleet.cluster, policy_ or policy(), GatewayMetrics(), mover)


def stream(
    fleet: Fleet,
    proxy: Proxy,
    instance: str,
    *,
    prompt_tokens: int = 64,
    max_tokens: int = 200,
    generated: int = 4,
    request_id: str | None = None,
) -> Client:
    """A streamed answer on ``instance`` whose client already has ``generated`` tokens (not running)."""
    body = {
        "model": "m",
        "prompt": list(range(1, prompt_tokens + 1)),
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    routed = proxy.intake.parse(json.dumps(body).encode(), "completion", request_id)
    c = open_client(fleet, routed, [STALL], proxy, instance=instance)
    for step in source_steps(fleet, routed, instance)[:generated]:
        c.live.sink(step)  # type: ignore[arg-type]
    assert c.live.generated == generated
    return c


def registered(ctl: MigrationController, clients: list[Client]) -> list[Client]:
    for c in clients:
        ctl.register(c.live)
    return clients


async def finish(ctl: MigrationController, clients: list[Client]) -> None:
    """The answers end: unregistered and closed (as the relay does)."""
    for c in clients:
        ctl.unregister(c.live)
        await c.live.close()
    await ctl.close()


# ------------------------------------------------------------------------------------ drains
async def test_a_drain_moves_every_stream_off_the_draining_instance() -> None:
    fleet = three_decoders()
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover)
    on_d1 = registered(ctl, [stream(fleet, proxy, "d1") for _ in range(3)])
    elsewhere = registered(ctl, [stream(fleet, proxy, "d2")])
    assert fleet.state("d1").live_streams == 3

    ctl.drain("d1")
    await until(lambda: ctl.moves_in_flight == 0 and len(mover.calls) == 3)
    assert {m.request_id for m in mover.calls} == {c.live.request_id for c in on_d1}
    assert all(m.source == "d1" and m.target in {"d2", "d3"} and m.reason == "drain" for m in mover.calls)
    assert ctl.on("d1") == [] and ctl.moved == 3
    assert fleet.state("d1").live_streams == 0  # the count follows each stream to its new instance
    assert fleet.state("d2").live_streams + fleet.state("d3").live_streams == 4
    assert await ctl.wait_drained("d1", timeout_s=1.0)  # nothing left there: its leases went with the streams

    ctl.round()  # later rounds find nothing left to move
    await settle()
    assert len(mover.calls) == 3
    await finish(ctl, on_d1 + elsewhere)
    fleet.assert_idle()


async def test_a_drain_never_moves_a_stream_onto_another_draining_instance() -> None:
    fleet = three_decoders()
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover)
    clients = registered(ctl, [stream(fleet, proxy, "d1"), stream(fleet, proxy, "d2")])
    fleet.state("d3").draining = True
    ctl.drain("d1")
    ctl.drain("d2")
    await until(lambda: ctl.moves_in_flight == 0)
    assert [m.target for m in mover.calls] == ["d2"]  # d1's stream: d2 was not draining yet; d2's: nowhere to go
    assert ctl.on("d3") == []
    await finish(ctl, clients)


async def test_moves_respect_max_concurrent_and_the_rest_go_in_later_rounds() -> None:
    fleet = three_decoders(max_concurrent=2)
    proxy = fleet.proxy()
    mover = FakeMover(fleet, hold=True)
    ctl = controller(fleet, mover)
    clients = registered(ctl, [stream(fleet, proxy, "d1") for _ in range(5)])

    ctl.drain("d1")
    await settle()
    assert len(mover.calls) == 2 and ctl.moves_in_flight == 2
    ctl.round()  # no room: nothing more starts
    await settle()
    assert len(mover.calls) == 2
    mover.gate.set()
    rounds = 0
    while ctl.on("d1"):
        await until(lambda: ctl.moves_in_flight == 0)
        ctl.round()
        rounds += 1
        assert rounds < 10
    assert len(mover.calls) == 5 and mover.most_active == 2
    assert len({m.request_id for m in mover.calls}) == 5  # each stream moved once
    await finish(ctl, clients)
    fleet.assert_idle()


@pytest.mark.parametrize("policy_name", ["no-migration", "load-balance"])
async def test_a_failed_drain_move_is_retried_next_round(policy_name: str) -> None:
    fleet = three_decoders()
    proxy = fleet.proxy()
    mover = FakeMover(fleet, outcomes=[False, True])
    ctl = controller(fleet, mover, policy(policy_name))
    clients = registered(ctl, [stream(fleet, proxy, "d1")])

    ctl.drain("d1")
    await until(lambda: ctl.moves_in_flight == 0)
    assert ctl.failed == 1 and ctl.on("d1") == [clients[0].live]  # still where it was
    assert not clients[0].live.moving
    ctl.round()
    await until(lambda: ctl.moves_in_flight == 0)
    assert [m.reason for m in mover.calls] == ["drain", "drain"]
    assert ctl.moved == 1 and ctl.on("d1") == []
    await finish(ctl, clients)


async def test_streams_that_cannot_move_are_left_alone() -> None:
    fleet = three_decoders()
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover)
    done, moving, untracked = registered(ctl, [stream(fleet, proxy, "d1") for _ in range(3)])
    done.live.trail.done = True  # its [DONE] already went out
    moving.live.pending = asyncio.get_running_loop().create_future()  # a move already under way
    untracked.live.trail.tracked = False  # its engine does not report token ids
    ctl.drain("d1")
    await settle()
    assert mover.calls == []
    moving.live.pending = None
    await finish(ctl, [done, moving, untracked])


async def test_a_disabled_controller_drains_nothing_but_still_marks_the_instance() -> None:
    fleet = three_decoders(enabled=False)
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover)
    clients = registered(ctl, [stream(fleet, proxy, "d1")])
    ctl.drain("d1")
    ctl.round()
    await settle()
    assert fleet.state("d1").draining and mover.calls == []
    ctl.undrain("d1")
    assert not fleet.state("d1").draining
    await finish(ctl, clients)


# ----------------------------------------------------------------------------------- balance
async def test_the_policy_balances_long_streams_off_a_loaded_instance() -> None:
    fleet = three_decoders()
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover, policy("load-balance"))
    clients = registered(ctl, [stream(fleet, proxy, "d1", prompt_tokens=2000, max_tokens=500) for _ in range(3)])
    fleet.clock.advance(1.0)  # they have decoded long enough to be worth moving
    ctl.round()
    await until(lambda: ctl.moves_in_flight == 0)
    assert mover.calls and all(m.reason == "balance" and m.source == "d1" for m in mover.calls)
    assert {m.target for m in mover.calls} <= {"d2", "d3"}
    assert len(mover.calls) <= 2  # max_moves_per_round
    await finish(ctl, clients)


async def test_no_migration_plans_no_balance_moves() -> None:
    fleet = three_decoders()
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover, policy("no-migration"))
    clients = registered(ctl, [stream(fleet, proxy, "d1", prompt_tokens=2000, max_tokens=500) for _ in range(3)])
    fleet.clock.advance(1.0)
    ctl.round()
    await settle()
    assert mover.calls == []
    await finish(ctl, clients)


# ------------------------------------------------------------------------------ stall watchdog
async def test_the_stall_watchdog_cuts_a_silent_stream_which_then_fails_over() -> None:
    fleet = three_decoders(stall_timeout_s=5.0)
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover)
    silent = stream(fleet, proxy, "d1", max_tokens=6, generated=2)  # then its engine says nothing more
    lively = stream(fleet, proxy, "d1", max_tokens=6, generated=1)
    registered(ctl, [silent, lively])
    run = asyncio.create_task(silent.live.run(failover_to(silent, "d2")))
    await settle()

    fleet.clock.advance(4.0)
    lively.live.sink(source_steps(fleet, lively.routed)[1])  # one more token: it is not stalled
    fleet.clock.advance(2.0)
    ctl.round()
    assert silent.source.aborted is not None and silent.source.aborted.startswith("stalled: no data for 6.0 s")
    assert lively.source.aborted is None

    await run
    assert silent.failover_reasons == [silent.source.aborted]
    assert silent.live.instance_id == "d2"
    assert_one_clean_answer(silent.events(), prompt=64, max_tokens=6, cid=None)
    assert text_of(silent.events()) == expected_text(64, 6)
    assert fleet["d2"].calls[0].prompt[-2:] == [token_id(64), token_id(65)]
    await finish(ctl, [silent, lively])
    fleet.assert_idle()


async def test_the_watchdog_spares_a_stream_that_is_frozen_for_a_move() -> None:
    fleet = three_decoders(stall_timeout_s=5.0)
    proxy = fleet.proxy()
    ctl = controller(fleet, FakeMover(fleet))
    c = registered(ctl, [stream(fleet, proxy, "d1")])[0]
    c.live.freeze()
    fleet.clock.advance(60.0)
    ctl.round()
    assert c.source.aborted is None and c.live.stall_reason is None
    c.live.thaw()
    await finish(ctl, [c])


async def test_a_zero_stall_timeout_turns_the_watchdog_off() -> None:
    fleet = three_decoders(stall_timeout_s=0)
    proxy = fleet.proxy()
    ctl = controller(fleet, FakeMover(fleet))
    c = registered(ctl, [stream(fleet, proxy, "d1")])[0]
    fleet.clock.advance(3600.0)
    ctl.round()
    assert c.source.aborted is None
    await finish(ctl, [c])


# ------------------------------------------------------------------------------------- close
async def test_close_cancels_and_awaits_the_loop_and_every_move() -> None:
    fleet = three_decoders(max_concurrent=3)
    proxy = fleet.proxy()
    mover = FakeMover(fleet, hold=True)
    ctl = controller(fleet, mover)
    clients = registered(ctl, [stream(fleet, proxy, "d1") for _ in range(3)])
    ctl.start()
    ctl.drain("d1")
    await until(lambda: mover.active == 3)

    await ctl.close()
    assert mover.cancelled == 3 and ctl.moves_in_flight == 0
    assert all(c.live.move_task is not None and c.live.move_task.cancelled() for c in clients)
    assert len(ctl.on("d1")) == 3  # nothing moved
    for c in clients:
        ctl.unregister(c.live)
        await c.live.close()
    fleet.assert_idle()
    # (no_leaked_tasks checks that neither the loop nor a move task is left)


async def test_the_loop_runs_rounds_until_closed() -> None:
    fleet = three_decoders(interval_s=0.001)
    proxy = fleet.proxy()
    mover = FakeMover(fleet)
    ctl = controller(fleet, mover)
    clients = registered(ctl, [stream(fleet, proxy, "d1")])
    fleet.state("d1").draining = True  # marked, not yet drained: the loop's next round moves it
    ctl.start()
    for _ in range(200):
        if mover.calls:
            break
        await asyncio.sleep(0.001)
    assert [m.reason for m in mover.calls] == ["drain"]
    await finish(ctl, clients)
