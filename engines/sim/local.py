"""The simulated engine called in-process: the routes a gateway uses, without sockets or HTTP.

:func:`call_local` serves one call against a :class:`~engines.sim.reply.Reply` with the same
logic, answers and error bodies as the HTTP server (:mod:`engines.sim.server`):

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE);
* ``GET /metrics`` (the Prometheus text), ``GET /health``;
* ``POST /sim/migrate`` (a live migration's source), ``POST /sim/migrate/reserve`` and
  ``POST /sim/migrate/release`` (its target);
* ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` where the HTTP server has them
  (:func:`engines.sim.routes_lora.runtime_lora_routes`).

An unknown path is answered 404 and a known one with another method 405, both as error JSON in
the engine's flavour; a body that is not JSON is a 400 as over HTTP. The engine's own peers are
reached through ``state.peers`` (in-process: :class:`~engines.sim.peers.LocalPeerLink`).

A typical in-process engine: ``state = build_state(config, clock=LoopClock())``, ``state.bound_port``
set to the port its peers name it by, ``state.peers = LocalPeerLink(find)``, ``await
state.engine.start()``; at the end :func:`close_local`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import parse_qs

from pdgate.engines.sim.migration_routes import migrate_call, release_answer, reserve_answer
from pdgate.engines.sim.protocol import ApiError, json_of, parse_body
from pdgate.engines.sim.reply import Reply, respond
from pdgate.engines.sim.routes_generate import generate
from pdgate.engines.sim.routes_info import reply_health, reply_metrics
from pdgate.engines.sim.routes_lora import LOAD_PATH, load_adapter, runtime_lora_routes, unload_adapter
from pdgate.engines.sim.state import SimState


class Headers(Mapping[str, str]):
    """Request headers looked up case-insensitively (read-only; a later duplicate name wins)."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._items = {k.lower(): v for k, v in headers.items()}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


async def call_local(
    state: SimState, method: str, path: str, headers: Mapping[str, str], body: bytes, reply: Reply
) -> None:
    """Serve one call to the engine ``state``; the answer goes to ``reply``.

    ``path`` may carry a query string (ignored); ``headers`` may use any case; ``body`` is the raw
    request body (UTF-8 JSON for the POST routes). Returns once the answer is complete: a whole
    body (``reply.json``/``reply.text``), or a stream ended with ``reply.end()``. A stream that is
    cut off without ``end`` means the call failed (an exception propagates) or was cancelled.
    Cancelling the task running this call is the client going away: a generation is aborted in
    the engine (its KV freed); a migration that has not reached its stop-and-copy is abandoned.
    An ApiError becomes the engine's error JSON (:func:`engines.sim.reply.respond`); any other
    exception propagates to the caller.
    """
    route, _, query = path.partition("?")
    await respond(
        reply, state.config.api, lambda r: _dispatch(state, method.upper(), route, query, Headers(headers), body, r)
    )


async def _dispatch(
    state: SimState, method: str, path: str, query: str, headers: Headers, body: bytes, reply: Reply
) -> None:
    match path:
        case "/v1/completions" | "/v1/chat/completions":
            _allow(method, "POST", path)
            kind = "completion" if path == "/v1/completions" else "chat"
            await generate(state, kind, path, headers, parse_body(body), reply)
        case "/metrics":
            _allow(method, "GET", path)
            await reply_metrics(state, reply, parse_qs(query).get("name[]"))
        case "/health":
            _allow(method, "GET", path)
            await reply_health(state, reply)
        case "/sim/migrate":
            _allow(method, "POST", path)
            await migrate_call(state, headers, parse_body(body), reply)
        case "/sim/migrate/reserve":
            _allow(method, "POST", path)
            await reply.json(200, reserve_answer(state, json_of(parse_body(body))))
        case "/sim/migrate/release":
            _allow(method, "POST", path)
            await reply.json(200, release_answer(state, json_of(parse_body(body))))
        case "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" if runtime_lora_routes(state):
            _allow(method, "POST", path)
            serve = load_adapter if path == LOAD_PATH else unload_adapter
            await reply.text(200, serve(state, headers, parse_body(body)))
        case _:
            raise ApiError(404, f"no route {path!r} on the simulated engine (in-process)")


def _allow(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise ApiError(405, f"method {method} is not allowed on {path} (only {allowed})")


async def close_local(state: SimState) -> None:
    """Stop an in-process engine: its migrations and reservation timers, then its step loop and KV pulls."""
    state.migration.close()
    await state.engine.close()
