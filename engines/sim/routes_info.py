"""Informational and operator routes of the simulated engine (models, health, tokenize, metrics, state)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pdgate.engines.sim.protocol import ApiError, new_id, now_s, read_json
from pdgate.engines.sim.reply import Reply
from pdgate.engines.sim.state import SimState

VERSION = "0.1.0-sim"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def handle_models(state: SimState, request: web.Request) -> web.Response:
    """The base model, then every LoRA adapter as vLLM lists it (``id`` its name, ``root`` its path,
    ``parent`` the base model, no ``max_model_len``)."""
    cards = [_model_card(state, state.served_model_name, state.profile.model.name, None, state.max_model_len)]
    for adapter in state.loras.adapters if state.loras is not None else ():
        parent = adapter.base_model_name or state.served_model_name
        cards.append(_model_card(state, adapter.name, adapter.path, parent, None))
    return web.json_response({"object": "list", "data": cards})


def _model_card(state: SimState, name: str, root: str, parent: str | None, max_model_len: int | None) -> dict[str, Any]:
    owned_by = "sglang" if state.config.api == "sglang" else "vllm"
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": now_s(),
        "owned_by": owned_by,
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
    }
    if owned_by == "vllm":
        card["permission"] = [
            {
                "id": new_id("modelperm"),
                "object": "model_permission",
                "created": now_s(),
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ]
    return card


async def handle_health(state: SimState, request: web.Request) -> web.Response:
    return web.Response(status=200)


async def handle_version(state: SimState, request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


async def handle_tokenize(state: SimState, request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    tok = state.tokenizer
    special = body.get("add_special_tokens", "messages" not in body)  # vLLM's defaults: chat False, text True
    if not isinstance(special, bool):
        raise ApiError(400, "'add_special_tokens' must be a boolean", param="add_special_tokens")
    if "messages" in body:
        if not isinstance(body["messages"], list):
            raise ApiError(400, "'messages' must be a list of messages", param="messages")
        try:
            text = tok.apply_chat_template(
                body["messages"], add_generation_prompt=body.get("add_generation_prompt", True) is not False
            )
            tokens = tok.encode(text, add_special_tokens=special)
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(400, f"invalid messages: {exc}", param="messages") from None
    elif isinstance(body.get("prompt"), str):
        tokens = tok.encode(body["prompt"], add_special_tokens=special)
    else:
        raise ApiError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
    strs = [tok.decode([t]) for t in tokens] if body.get("return_token_strs") else None
    return web.json_response(
        {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens, "token_strs": strs}
    )


async def handle_detokenize(state: SimState, request: web.Request) -> web.Response:
    body = await read_json(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
    vocab = state.tokenizer.vocab_size
    outside = [t for t in tokens if not 0 <= t < vocab]
    if outside:  # (as vLLM: a client's bad id is its fault, not the engine's)
        raise ApiError(400, f"token id {outside[0]} is out of vocabulary (0-{vocab - 1})", param="tokens")
    return web.json_response({"prompt": state.tokenizer.decode(tokens)})


async def handle_metrics(state: SimState, request: web.Request, reply: Reply) -> None:
    await reply_metrics(state, reply, request.query.getall("name[]", None))


async def reply_metrics(state: SimState, reply: Reply, names: list[str] | None = None) -> None:
    """``GET /metrics``: the engine's Prometheus text (vLLM's or SGLang's metric names); only the
    series named by ``name[]`` query parameters when there are any, as prometheus_client serves
    it (so vLLM and SGLang too)."""
    await reply.text(200, state.metrics.render(names).decode("utf-8"), METRICS_CONTENT_TYPE)


async def reply_health(state: SimState, reply: Reply) -> None:
    """``GET /health`` in-process: 200 with an empty body (over HTTP: :func:`handle_health`)."""
    await reply.text(200, "")


async def handle_reset_prefix_cache(state: SimState, request: web.Request) -> web.Response:
    if not state.core.kv.reset_prefix_cache():
        raise ApiError(400, "cannot reset the prefix cache while requests hold KV blocks")
    state.engine.flush_events(state.clock.now())  # publish AllBlocksCleared now
    return web.Response(status=200)


async def handle_traces(state: SimState, request: web.Request) -> web.Response:
    """``{"requests": [...]}``: trace headers of the latest generation requests, oldest first."""
    return web.json_response({"requests": list(state.traces)})


async def handle_state(state: SimState, request: web.Request) -> web.Response:
    core, kv = state.core, state.core.kv
    return web.json_response(
        {
            "engine_id": state.engine_id,
            "api": state.config.api,
            "role": state.config.role,
            "profile": state.profile.name,
            "profile_source": state.profile.source,
            "model": state.served_model_name,
            "time_scale": state.config.time_scale,
            "sim_time": state.clock.now(),
            "num_running": core.num_running,
            "num_waiting": core.num_waiting,
            "running": [r.request_id for r in core.running],
            "held_kv": sorted(core.held),
            "kv_pulls_in_flight": state.engine.num_active_pulls,
            "migrations_in_flight": len(state.migration.tasks),
            "migration_reservations": len(state.migration.reservations),
            "num_blocks": kv.num_blocks,
            "num_free_blocks": kv.num_free_blocks,
            "num_cached_blocks": kv.num_cached_blocks,
            "block_size": kv.block_size,
            "kv_cache_usage": kv.usage,
            "kv_bytes_per_token": state.profile.kv_bytes_per_token,
            "prefix_cache_queries": kv.stats.queries,
            "prefix_cache_hits": kv.stats.hits,
            "num_preemptions": core.num_preemptions,
            "steps": state.engine.steps,
            "busy_seconds": state.engine.busy_seconds,
            "lag_total_seconds": state.engine.lag_total,
            "lag_max_seconds": state.engine.lag_max,
            "late_steps": state.engine.late_steps,
            "delivery_jitter_max_seconds": state.engine.jitter_max,
        }
    )


async def handle_get_model_info(state: SimState, request: web.Request) -> web.Response:
    return web.json_response(
        {
            "model_path": state.profile.model.name,
            "tokenizer_path": state.tokenizer.name,
            "is_generation": True,
            "preferred_sampling_params": None,
        }
    )


async def handle_get_server_info(state: SimState, request: web.Request) -> web.Response:
    info = state.config.model_dump()
    info.pop("api_key", None)
    info.update(
        {
            "model_path": state.profile.model.name,
            "disaggregation_mode": {"both": "null"}.get(state.config.role, state.config.role),
            "disaggregation_bootstrap_port": state.config.resolved_bootstrap_port(),
            "max_total_num_tokens": state.core.kv.num_blocks * state.core.kv.block_size,
            "version": VERSION,
        }
    )
    return web.json_response(info)
