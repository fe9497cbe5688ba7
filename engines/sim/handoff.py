"""Prefill-decode KV hand-off of the simulated engine, in vLLM's and SGLang's protocols.

vLLM (NixlConnector): a prefill leg holds its blocks and returns ``kv_transfer_params``; the
decode leg pulls them through ``POST /sim/kv/read`` on ``remote_host:remote_port`` (the sim's
stand-in for NIXL's side channel). SGLang: both legs carry ``bootstrap_host/port/room``; the
decode leg long-polls ``GET /sim/bootstrap/{room}`` on the prefill's bootstrap port, and the
prefill answers its client only once the KV was taken. Either way the decode side then spends
``latency + bytes / bandwidth`` of simulated time.

The decode side reaches its peer through ``state.peers`` (:mod:`engines.sim.peer_link`); the
peer's side is :func:`take_held_kv` and :func:`take_room_kv`, which the HTTP routes here and the
in-process link (:class:`engines.sim.peers.LocalPeerLink`) both call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from pdgate.engines.sim.engine import KvPullError
from pdgate.engines.sim.peer_link import PeerLink
from pdgate.engines.sim.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    read_json,
)
from pdgate.engines.sim.request import RemotePrefill, RequestStatus, SimRequest
from pdgate.engines.sim.state import SimState


def on_request_finished(state: SimState, req: SimRequest) -> None:
    key = req.kv_hold_key
    if key is not None and key in state.core.held:
        entry = state.handoff(key)
        entry.block_ids = [b.block_id for b in req.blocks]
        entry.ready.set()


async def pull_kv(state: SimState, req: SimRequest) -> None:
    """Decode side: fetch the prompt KV from the prefill peer, then spend the transfer time."""
    remote = req.remote_prefill
    assert remote is not None
    params = remote.params
    if remote.protocol == "nixl":
        data = await read_held_kv(state, params)
    else:
        wait_s = state.clock.to_wall(state.config.kv_hold_timeout_s)
        host, port, room = params["bootstrap_host"], params["bootstrap_port"], params["bootstrap_room"]
        data = await _peers(state).wait_bootstrap_room(host, port, room, wait_s)
    tokens = data.get("token_ids") or []
    if (
        tokens[: req.num_prompt_tokens] != req.prompt_token_ids[: len(tokens)]
        or len(tokens) < req.num_prompt_tokens - 1
    ):
        raise KvPullError("the prefill peer holds KV of a different prompt")
    nbytes = req.num_external_tokens * state.profile.kv_bytes_per_token
    seconds = state.config.kv_link_latency_ms / 1000.0 + nbytes / (state.config.kv_link_bandwidth_gbps * 1e9)
    await state.clock.sleep_until(state.clock.now() + seconds)


async def read_held_kv(state: SimState, params: dict[str, Any]) -> dict[str, Any]:
    """NIXL-style read of the KV a peer holds (``/sim/kv/read`` on ``remote_host:remote_port``)."""
    body = {k: params[k] for k in ("remote_engine_id", "remote_request_id", "remote_block_ids")}
    return await _peers(state).read_kv(params["remote_host"], params["remote_port"], body)


def _peers(state: SimState) -> PeerLink:
    if state.peers is None:
        raise KvPullError("the engine has no link to its peers")
    return state.peers


_NIXL_REQUIRED = ("remote_block_ids", "remote_engine_id", "remote_request_id", "remote_host", "remote_port")


def remote_prefill_from(req: CompletionRequest | ChatCompletionRequest, api: str) -> RemotePrefill | None:
    params = req.kv_transfer_params or {}
    if (
        params.get("migration")
        and params.get("do_remote_prefill")
        and all(params.get(k) not in (None, []) for k in _NIXL_REQUIRED)
    ):
        return RemotePrefill("nixl", dict(params))  # a live migration's continuation, in either API flavour
    if api == "sglang":
        if req.bootstrap_room is None:
            return None
        return RemotePrefill(
            "bootstrap",
            {
                "bootstrap_host": req.bootstrap_host,
                "bootstrap_port": req.bootstrap_port,
                "bootstrap_room": req.bootstrap_room,
            },
        )
    if params.get("do_remote_prefill") and all(params.get(k) not in (None, []) for k in _NIXL_REQUIRED):
        return RemotePrefill("nixl", dict(params))
    return None  # like vLLM: invalid or absent params mean a local prefill


def kv_transfer_params(state: SimState, request: SimRequest, prefill_leg: bool) -> dict[str, Any] | None:
    req = request
    if state.config.api != "vllm" or not prefill_leg or req.kv_hold_key not in state.core.held:
        return None
    entry = state.handoffs.get(req.kv_hold_key)
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": list(entry.block_ids) if entry else [],
        "remote_engine_id": state.engine_id,
        "remote_request_id": req.request_id,
        "remote_host": state.config.host,
        "remote_port": state.bound_port,
        "tp_size": state.profile.tp,
    }


async def await_handoff(state: SimState, request: SimRequest, prefill_leg: bool) -> None:
    """SGLang prefill leg: answer only once the decode peer took the KV."""
    if state.config.api != "sglang" or not prefill_leg:
        return
    key = request.kv_hold_key
    assert key is not None
    if key not in state.core.held:
        return
    entry = state.handoff(key)
    try:
        await asyncio.wait_for(entry.taken.wait(), state.clock.to_wall(state.config.kv_hold_timeout_s))
    except TimeoutError:
        raise ApiError(500, f"no decode peer took the KV of bootstrap room {key.removeprefix('room:')}") from None
    finally:
        state.handoffs.pop(key, None)


def take_held_kv(state: SimState, body: Any) -> dict[str, Any]:
    """Peer side of a KV read: hand the KV held for ``body["remote_request_id"]`` over (once).

    Answers ``{"token_ids", "num_tokens"}`` (plus ``"migration"`` for a migration's hold); raises
    ApiError 400/404 when the body is wrong or nothing is held.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("remote_engine_id") != state.engine_id:
        raise ApiError(404, f"engine id {body.get('remote_engine_id')!r} is not this engine ({state.engine_id})")
    key = str(body.get("remote_request_id"))
    entry = state.handoffs.get(key)
    if entry is not None and body.get("remote_block_ids") != entry.block_ids:
        raise ApiError(400, "remote_block_ids do not match the held request's blocks", param="remote_block_ids")
    held = state.core.take_held(key)
    state.handoffs.pop(key, None)
    if held is None:
        raise ApiError(404, f"no KV is held for request {key!r} (never prefilled here, already pulled, or expired)")
    state.engine.wake()  # the released blocks may admit a waiting request
    if held.status is RequestStatus.FINISHED_MIGRATED:
        # a migrated request: the KV of its whole context but the last sampled token
        computed = held.all_token_ids[: held.num_computed_tokens]
        return {
            "token_ids": computed,
            "num_tokens": len(computed),
            "migration": state.migration.outgoing.pop(key, None),
        }
    return {"token_ids": held.prompt_token_ids, "num_tokens": held.num_prompt_tokens}


async def take_room_kv(state: SimState, room: str, timeout: float) -> dict[str, Any]:
    """Peer side of an SGLang bootstrap: wait up to ``timeout`` wall seconds for ``room``'s prefill, hand its KV over.

    Answers ``{"token_ids", "num_tokens"}``; raises ApiError 404 on a timeout or an expired hold.
    """
    key = f"room:{room}"
    entry = state.handoff(key)
    try:
        await asyncio.wait_for(entry.ready.wait(), timeout)
    except TimeoutError:
        if not entry.taken.is_set():
            state.handoffs.pop(key, None)
        raise ApiError(404, f"bootstrap room {room} was not prefilled here within {timeout:.0f}s") from None
    held = state.core.take_held(key)
    entry.taken.set()
    if held is None:
        raise ApiError(404, f"bootstrap room {room} expired before the decode peer arrived")
    return {"token_ids": held.prompt_token_ids, "num_tokens": held.num_prompt_tokens}


async def handle_kv_read(state: SimState, request: web.Request) -> web.Response:
    """Side channel: a decode peer takes a held prefill's KV (the sim's NIXL read)."""
    return web.json_response(take_held_kv(state, await read_json(request)))


async def handle_bootstrap_room(state: SimState, request: web.Request) -> web.Response:
    """Long-poll until the prefill of ``room`` finished, then hand its KV to the decode peer."""
    room = request.match_info["room"]
    try:
        timeout = float(request.query.get("timeout_s", "60"))
    except ValueError:
        raise ApiError(400, "timeout_s must be a number", param="timeout_s") from None
    return web.json_response(await take_room_kv(state, room, timeout))


async def handle_bootstrap_route(state: SimState, request: web.Request) -> web.Response:
    return web.json_response(
        {
            "attn_tp_size": state.profile.tp,
            "attn_cp_size": 1,
            "dp_size": 1,
            "pp_size": 1,
            "page_size": state.config.block_size,
            "kv_cache_dtype": "auto",
            "follow_bootstrap_room": True,
            "prefill_http_port": state.bound_port,
        }
    )


async def handle_bootstrap_health(state: SimState, request: web.Request) -> web.Response:
    return web.Response(text="OK")
