"""Llumnix-style live migration of a decoding request from one simulated engine to another.

Source side (``POST /sim/migrate``), for a request that is decoding:

1. **Reserve** KV blocks on the target (``POST /sim/migrate/reserve`` there): the blocks the
   request holds now plus a margin of ``min(remaining max_tokens, MARGIN_BLOCKS blocks)`` tokens.
   If that fails for any reason the request is left alone and the caller gets HTTP 502.
2. **Multi-stage copy** while the request keeps decoding: stage 1 copies every full block
   computed so far, each later stage the blocks completed since the previous one; a stage of
   ``b`` blocks takes ``latency + b * block_size * kv_bytes_per_token / bandwidth`` simulated
   seconds. Staging stops once a stage would copy ``<= stop_copy_blocks`` blocks, or after
   ``max_stages`` stages.
3. **Stop-and-copy**: the request is taken out of scheduling (no further token), the remaining
   blocks (the partial last one included) are copied; that stage is the downtime. The request
   then ends with status ``migrated``: its stream ends without a finish chunk, usage or
   ``[DONE]``; its KV blocks are held (like a PD prefill leg's) under the hold key
   ``migrate:<internal id>`` until the target pulls them or ``kv_hold_timeout_s`` passes.

Target side: the continuation (``prompt + output so far``, ``kv_transfer_params`` from the
source's answer, ``migration: true``) is an ordinary generation request whose decode leg pulls
the held KV through ``POST /sim/kv/read`` without spending the transfer time again (the stages
already did), frees its reservation right before its blocks are allocated, recomputes the last
token and decodes on.

This module is the protocol (source: reserve, copy, stop; target: reservations, the KV pull);
:mod:`engines.sim.migration_routes` serves it (over HTTP, and to in-process callers),
:mod:`engines.sim.migration_state` holds the per-engine bookkeeping, and the source reaches its
target through ``state.peers`` (:mod:`engines.sim.peer_link`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from pdgate.engines.sim.engine import KvPullError
from pdgate.engines.sim.handoff import read_held_kv
from pdgate.engines.sim.migration_state import LiveRequest, Reservation
from pdgate.engines.sim.peer_link import PeerError
from pdgate.engines.sim.protocol import ApiError
from pdgate.engines.sim.request import RequestStatus, SimRequest
from pdgate.engines.sim.state import SimState

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0  # wall seconds the source waits for the request's response to be written out
MARGIN_BLOCKS = 2  # reservation headroom for the tokens decoded while the copy runs
HOLD_KEY_PREFIX = "migrate:"


@dataclass(frozen=True)
class MigrateArgs:
    """A validated ``POST /sim/migrate`` body."""

    request_id: str
    host: str
    port: int
    max_stages: int
    stop_copy_blocks: int

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class _Abort(Exception):
    """The migration ends early; ``status`` is the HTTP answer (409 or 502)."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.message = message


# ------------------------------------------------------------------ source
def not_migratable(state: SimState, live: LiveRequest) -> str | None:
    """Why the request cannot be migrated now (None: it can)."""
    req = live.sim_request
    if req.status.finished:
        return f"request {live.request_id!r} already finished ({req.status.value})"
    if live.prefill_leg or req.kv_hold_key is not None:
        return f"request {live.request_id!r} is a PD prefill leg; its KV goes to its decode peer"
    if not state.core.is_decoding(req):
        phase = "prefilling" if req.status is RequestStatus.RUNNING else req.status.value
        return f"request {live.request_id!r} is not decoding yet ({phase})"
    return None


async def migrate(state: SimState, live: LiveRequest, args: MigrateArgs) -> dict[str, Any]:
    """Run one migration of ``live`` to ``args.target``; the source's answer, or ApiError (409/502).

    Every outcome is recorded in ``state.migration``. The caller marked ``live.migrating``.
    """
    req = live.sim_request
    record: dict[str, Any] = {
        "request_id": live.request_id,
        "direction": "out",
        "outcome": "failed",
        "stages": [],
        "downtime_s": None,
        "downtime_wall_s": None,
        "num_output_tokens": None,
        "target": args.target,
        "error": None,
        "at": time.time(),
    }
    reservation_id: str | None = None
    try:
        reservation_id = await _reserve(state, live, args)
        record["reservation_id"] = reservation_id
        result = await _copy_and_stop(state, live, args, reservation_id, record)
    except _Abort as abort:
        live.migrating = False
        if reservation_id is not None:
            await _release_remote(state, args, reservation_id)
        record.update(outcome=abort.outcome, error=abort.message, num_output_tokens=req.num_output_tokens)
        state.migration.record(record)
        raise ApiError(abort.status, abort.message) from None
    record.update(outcome="migrated", num_output_tokens=result["num_output_tokens"])
    state.migration.record(record)
    return result


async def _reserve(state: SimState, live: LiveRequest, args: MigrateArgs) -> str:
    req = live.sim_request
    kv = state.core.kv
    margin = max(0, min(req.sampling.max_tokens - req.num_output_tokens, MARGIN_BLOCKS * kv.block_size))
    num_blocks = kv.blocks_needed(req.num_tokens + margin)
    body = {"num_blocks": num_blocks, "source_engine_id": state.engine_id, "request_id": live.request_id}
    if state.peers is None:
        raise _Abort(
            502, "failed", f"cannot reserve KV blocks on the target {args.target}: the engine has no peer link"
        )
    try:
        reservation_id = (await state.peers.reserve(args.host, args.port, body)).get("reservation_id")
    except PeerError as exc:
        if exc.status is None:
            raise _Abort(502, "failed", f"cannot reserve KV blocks on the target {args.target}: {exc.detail}") from None
        raise _Abort(
            502,
            "failed",
            f"the target {args.target} refused to reserve {num_blocks} KV blocks: HTTP {exc.status}: {exc.text[:300]}",
        ) from None
    except (TimeoutError, ValueError, AttributeError) as exc:
        raise _Abort(502, "failed", f"cannot reserve KV blocks on the target {args.target}: {exc!r}") from None
    if not isinstance(reservation_id, str) or not reservation_id:
        raise _Abort(502, "failed", f"the target {args.target} answered no reservation_id")
    return reservation_id


async def _copy_and_stop(
    state: SimState, live: LiveRequest, args: MigrateArgs, reservation_id: str, record: dict[str, Any]
) -> dict[str, Any]:
    req, core, clock, cfg = live.sim_request, state.core, state.clock, state.config
    block_size = core.kv.block_size
    latency = cfg.kv_link_latency_ms / 1000.0
    per_block = block_size * state.profile.kv_bytes_per_token / (cfg.kv_link_bandwidth_gbps * 1e9)
    stages: list[dict[str, Any]] = record["stages"]

    def check() -> None:
        if live.cancelled:
            raise _Abort(409, "cancelled", "the migration's caller went away before the stop; the request goes on here")
        why = not_migratable(state, live)
        if why is not None:
            raise _Abort(409, "aborted", f"{why}; the migration was abandoned and the request left on this engine")

    # multi-stage copy while the request keeps decoding
    copied = 0
    while len(stages) < args.max_stages:
        check()
        full = req.num_computed_tokens // block_size
        new = full - copied
        if stages and new <= args.stop_copy_blocks:
            break
        seconds = latency + new * per_block
        await clock.sleep_until(clock.now() + seconds)
        stages.append({"blocks": new, "seconds": seconds})
        copied = full
    check()

    # stop-and-copy: no further token; copy what is left, the partial last block included
    wall_start, sim_start = time.monotonic(), clock.now()
    state.engine.pause(req.request_id)
    final_blocks = max(0, core.kv.blocks_needed(req.num_computed_tokens) - copied)
    downtime = latency + final_blocks * per_block
    try:
        await clock.sleep_until(sim_start + downtime)
    except asyncio.CancelledError:
        core.resume(req.request_id)
        raise
    downtime_wall = time.monotonic() - wall_start
    record.update(downtime_s=downtime, downtime_wall_s=downtime_wall, final_blocks=final_blocks)
    if req.status is not RequestStatus.MIGRATING:  # a stop string in tokens still queued, or the client left
        raise _Abort(
            409, "aborted", f"request {live.request_id!r} finished ({req.status.value}) during the stop-and-copy"
        )
    hold_key = f"{HOLD_KEY_PREFIX}{req.request_id}"
    state.engine.finish_migrated(req.request_id, hold_key)
    block_ids = [b.block_id for b in req.blocks]
    outgoing = state.migration.outgoing
    for key in [k for k in outgoing if k not in core.held]:
        del outgoing[key]  # expired holds
    outgoing[hold_key] = {
        "request_id": live.request_id,
        "stages": list(stages),
        "downtime_s": downtime,
        "downtime_wall_s": downtime_wall,
        "num_output_tokens": req.num_output_tokens,
        "source": f"{cfg.host}:{state.bound_port}",
        "source_engine_id": state.engine_id,
    }

    # every token produced so far reaches the client before its response ends
    try:
        await asyncio.wait_for(live.done.wait(), DRAIN_TIMEOUT_S)
    except TimeoutError:
        pass
    if live.done.is_set() and live.end_reason != "migrated":
        _drop_hold(state, hold_key)
        raise _Abort(
            409,
            "aborted",
            f"request {live.request_id!r}'s response ended with {live.end_reason!r} instead of the migration",
        )
    return {
        "request_id": live.request_id,
        "migrated": True,
        "num_prompt_tokens": req.num_prompt_tokens,
        "num_output_tokens": req.num_output_tokens,
        "output_token_ids": list(req.output_token_ids),
        "stages": list(stages),
        "downtime_s": downtime,
        "downtime_wall_s": downtime_wall,
        "kv_transfer_params": {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": state.engine_id,
            "remote_request_id": hold_key,
            "remote_block_ids": block_ids,
            "remote_host": cfg.host,
            "remote_port": state.bound_port,
            "tp_size": state.profile.tp,
            "migration": True,
            "reservation_id": reservation_id,
            # the request's original prompt length: fixes its natural-length draw on the target
            "origin_prompt_tokens": req.length_key_tokens or req.num_prompt_tokens,
        },
    }


def _drop_hold(state: SimState, hold_key: str) -> None:
    state.core.take_held(hold_key)
    state.handoffs.pop(hold_key, None)
    state.migration.outgoing.pop(hold_key, None)
    state.engine.flush_events(state.clock.now())
    state.engine.wake()


async def _release_remote(state: SimState, args: MigrateArgs, reservation_id: str) -> None:
    """Best effort: give the target's reservation back (it expires after kv_hold_timeout_s anyway)."""
    if state.peers is not None:
        await state.peers.release(args.host, args.port, reservation_id)


# ------------------------------------------------------------------ target
def reserve(state: SimState, num_blocks: int, source_engine_id: Any, request_id: Any) -> Reservation:
    """Set ``num_blocks`` KV blocks aside for a request about to migrate here.

    The reservation expires after ``kv_hold_timeout_s`` (simulated) unless claimed or released.
    Raises ApiError 503 on a prefill-role engine, 409 when the blocks are not free.
    """
    if state.config.role == "prefill":
        raise ApiError(503, "a prefill-role engine does not take migrated requests")
    kv = state.core.kv
    blocks: list[Any] = []
    if not kv.allocate(blocks, [], num_blocks * kv.block_size):
        raise ApiError(409, f"not enough free KV blocks: {num_blocks} asked, {kv.num_free_blocks} free")
    state.engine.flush_events(state.clock.now())  # blocks evicted from the prefix cache
    res = Reservation(state.new_id("migres"), blocks, source_engine_id, request_id)
    ttl = state.config.kv_hold_timeout_s
    res.timer = asyncio.get_running_loop().call_later(state.clock.to_wall(ttl), _expire, state, res.reservation_id)
    state.migration.reservations[res.reservation_id] = res
    return res


def release(state: SimState, reservation_id: str) -> bool:
    """Give an unused reservation's blocks back; False when there was no such reservation."""
    res = claim_reservation(state, reservation_id)
    if res is not None:
        _free_blocks(state, res.blocks)
    return res is not None


def claim_reservation(state: SimState, reservation_id: Any) -> Reservation | None:
    """Take a reservation out of the books (its blocks stay allocated); None if unknown or expired."""
    res = state.migration.reservations.pop(reservation_id, None) if isinstance(reservation_id, str) else None
    if res is not None and res.timer is not None:
        res.timer.cancel()
    return res


def _free_blocks(state: SimState, blocks: list[Any]) -> None:
    state.core.kv.free(blocks)
    state.engine.wake()


def _expire(state: SimState, reservation_id: str) -> None:
    res = state.migration.reservations.pop(reservation_id, None)
    if res is None:
        return
    _free_blocks(state, res.blocks)
    state.migration.record(
        {
            "request_id": res.request_id,
            "direction": "in",
            "outcome": "reservation_expired",
            "stages": [],
            "downtime_s": None,
            "downtime_wall_s": None,
            "num_output_tokens": None,
            "source": None,
            "source_engine_id": res.source_engine_id,
            "reservation_id": reservation_id,
            "error": None,
            "at": time.time(),
        }
    )


def is_migration(req: SimRequest) -> bool:
    """Whether a decode leg continues a live migration (its KV comes from the source's hold)."""
    remote = req.remote_prefill
    return remote is not None and bool(remote.params.get("migration"))


async def pull_migrated_kv(state: SimState, req: SimRequest) -> None:
    """Target side: take the source's held KV. No transfer time: the stages already copied it."""
    assert req.remote_prefill is not None
    params = req.remote_prefill.params
    live = state.migration.by_internal.get(req.request_id)
    record: dict[str, Any] = {
        "request_id": live.request_id if live is not None else req.request_id,
        "direction": "in",
        "outcome": "failed",
        "stages": [],
        "downtime_s": None,
        "downtime_wall_s": None,
        "num_output_tokens": None,
        "source": f"{params.get('remote_host')}:{params.get('remote_port')}",
        "source_engine_id": params.get("remote_engine_id"),
        "reservation_id": params.get("reservation_id"),
        "error": None,
        "at": time.time(),
    }
    try:
        data = await read_held_kv(state, params)
        tokens = data.get("token_ids") or []
        common = min(len(tokens), req.num_prompt_tokens)
        if not tokens or tokens[:common] != req.prompt_token_ids[:common]:
            raise KvPullError("the migration source holds KV of a different context")
        # tokens whose KV the source had not computed (the last sampled one) are computed here
        req.num_external_tokens = max(0, min(len(tokens), req.num_prompt_tokens - 1) - req.num_computed_tokens)
    except KvPullError as exc:
        record["error"] = str(exc)
        state.migration.record(record)
        raise
    info = data.get("migration") or {}
    record.update({k: info[k] for k in ("stages", "downtime_s", "downtime_wall_s", "num_output_tokens") if k in info})
    record.update(outcome="migrated", source_request_id=info.get("request_id"), num_kv_tokens=len(tokens))
    state.migration.record(record)
