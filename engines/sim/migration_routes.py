"""Routes of live migration: ``/sim/migrate`` (source), ``/sim/migrate/reserve`` and
``/sim/migrate/release`` (target), ``/sim/migrations`` (records).

They validate the request body and answer; the protocol itself is :mod:`engines.sim.migration`.
:func:`migrate_call`, :func:`reserve_answer` and :func:`release_answer` are transport-neutral:
the aiohttp handlers here, :func:`engines.sim.local.call_local` and the in-process peer link
(:class:`engines.sim.peers.LocalPeerLink`) all call them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from aiohttp import web

from pdgate.engines.sim.migration import MigrateArgs, migrate, not_migratable, release, reserve
from pdgate.engines.sim.protocol import ApiError, json_of, read_body, read_json
from pdgate.engines.sim.reply import Reply
from pdgate.engines.sim.state import SimState, check_auth

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ source
def _parse_migrate(body: Any) -> MigrateArgs:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise ApiError(400, "'request_id' must be a non-empty string", param="request_id")
    target = body.get("target")
    if not isinstance(target, dict):
        raise ApiError(400, '\'target\' must be an object {"host": str, "port": int}', param="target")
    host, port = target.get("host"), target.get("port")
    if not isinstance(host, str) or not host:
        raise ApiError(400, "'target.host' must be a non-empty string", param="target.host")
    if not _is_int(port) or not 0 < port < 65536:
        raise ApiError(400, "'target.port' must be an integer port", param="target.port")
    max_stages = body.get("max_stages", 8)
    if not _is_int(max_stages) or max_stages < 1:
        raise ApiError(400, "'max_stages' must be an integer >= 1", param="max_stages")
    stop_copy_blocks = body.get("stop_copy_blocks", 2)
    if not _is_int(stop_copy_blocks) or stop_copy_blocks < 0:
        raise ApiError(400, "'stop_copy_blocks' must be an integer >= 0", param="stop_copy_blocks")
    return MigrateArgs(rid, host, port, max_stages, stop_copy_blocks)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


async def handle_migrate(state: SimState, request: web.Request, reply: Reply) -> None:
    """``POST /sim/migrate`` on the source engine."""
    await migrate_call(state, request.headers, await read_body(request), reply)


async def migrate_call(state: SimState, headers: Mapping[str, str], body: Any, reply: Reply) -> None:
    """Migrate a request of this engine (``body``: request_id, target, max_stages, stop_copy_blocks).

    Answers 200 with the migration's result, or raises ApiError (400/401/404/409/502). If the
    caller goes away (cancelled) before the stop-and-copy, the request stays on this engine.
    """
    check_auth(state, headers)
    args = _parse_migrate(json_of(body))
    live = state.migration.find(args.request_id)
    if live is None:
        raise ApiError(404, f"no unfinished request with id {args.request_id!r} runs on this engine")
    if live.migrating:
        raise ApiError(409, f"request {args.request_id!r} is already being migrated")
    why = not_migratable(state, live)
    if why is not None:
        raise ApiError(409, why)
    live.migrating = True
    task = asyncio.create_task(migrate(state, live, args), name=f"migrate-{live.sim_request.request_id}")
    state.migration.tasks.add(task)
    task.add_done_callback(_task_done(state))
    try:
        result = await asyncio.shield(task)  # the migration finishes even if our caller goes away
    except asyncio.CancelledError:
        live.cancelled = True  # before the stop: the request keeps running here
        raise
    await reply.json(200, result)


def _task_done(state: SimState) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        state.migration.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), ApiError):
            logger.error("live migration failed", exc_info=task.exception())

    return done


# ------------------------------------------------------------------ target
def reserve_answer(state: SimState, body: Any) -> dict[str, Any]:
    """``/sim/migrate/reserve``: set KV blocks aside for a request about to migrate here (ApiError if not)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    num_blocks = body.get("num_blocks")
    if not _is_int(num_blocks) or num_blocks < 1:
        raise ApiError(400, "'num_blocks' must be an integer >= 1", param="num_blocks")
    res = reserve(state, num_blocks, body.get("source_engine_id"), body.get("request_id"))
    ttl = state.config.kv_hold_timeout_s
    return {"reservation_id": res.reservation_id, "num_blocks": num_blocks, "expires_in_s": ttl}


def release_answer(state: SimState, body: Any) -> dict[str, Any]:
    """``/sim/migrate/release``: the source gives an unused reservation back (ApiError 400 on a bad body)."""
    rid = body.get("reservation_id") if isinstance(body, dict) else None
    if not isinstance(rid, str):
        raise ApiError(400, "'reservation_id' must be a string", param="reservation_id")
    return {"released": release(state, rid)}


async def handle_reserve(state: SimState, request: web.Request) -> web.Response:
    """``POST /sim/migrate/reserve``: set KV blocks aside for a request about to migrate here."""
    return web.json_response(reserve_answer(state, await read_json(request)))


async def handle_release(state: SimState, request: web.Request) -> web.Response:
    """``POST /sim/migrate/release``: the source gives an unused reservation back."""
    return web.json_response(release_answer(state, await read_json(request)))


async def handle_migrations(state: SimState, request: web.Request) -> web.Response:
    """``GET /sim/migrations``: the latest migration records, oldest first."""
    return web.json_response({"migrations": list(state.migration.records)})
