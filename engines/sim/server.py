"""The simulated engine's HTTP server: vLLM's (or SGLang's) API over the step loop.

Routes (both flavours): ``/v1/completions``, ``/v1/chat/completions`` (SSE and JSON),
``/v1/models``, ``/health``, ``/tokenize``, ``/detokenize``, ``/metrics``, ``/version``;
vLLM: ``/reset_prefix_cache``; SGLang: ``/health_generate``, ``/get_model_info``,
``/get_server_info``. Simulator-only routes live under ``/sim/``: ``/sim/state`` (a JSON
snapshot for tests and operators) and ``/sim/kv/read`` (the side channel a decode peer pulls a
held prefill's KV through, the sim's stand-in for NIXL). An SGLang-flavour prefill engine also
serves a bootstrap server on its bootstrap port (``/route``, ``/health``, and the long-poll
``/sim/bootstrap/{room}`` its decode peer waits on).

PD hand-off, vLLM flavour (NixlConnector): a request with ``kv_transfer_params:
{"do_remote_decode": true}`` runs its prefill, samples one token and, when it finished by
length, keeps its blocks and answers with ``kv_transfer_params`` naming them; a request carrying
those params (``do_remote_prefill``) reserves blocks, pulls the KV (time = bytes / link
bandwidth + latency) and continues. SGLang flavour: both legs get ``bootstrap_host/port/room``;
the prefill answers only once its decode peer has taken the KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from engines.sim.config import SimEngineConfig
from engines.sim.core import CoreConfig, EngineCore, RequestOutput
from engines.sim.engine import AsyncSimEngine, KvPullError, RealtimeClock, RequestStream
from engines.sim.generation import LengthModel, TokenGenerator
from engines.sim.kv_cache import KVCacheManager
from engines.sim.kv_events import KvEventPublisher
from engines.sim.metrics import SglangMetrics, SimMetrics, VllmMetrics
from engines.sim.perf_model import EngineProfile, resolve_profile
from engines.sim.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now_s,
    parse_request,
    usage_dict,
)
from engines.sim.request import RemotePrefill, RequestStatus, SamplingParams, SimRequest
from engines.sim.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("pdgate.sim")

VERSION = "0.1.0-sim"
MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_COMPLETION_MAX_TOKENS = 16
SIM_STATE: web.AppKey[SimState] = web.AppKey("sim_state")


# --------------------------------------------------------------------------- state
@dataclass
class Handoff:
    """A finished prefill leg whose KV waits for (or was taken by) its decode peer."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    block_ids: list[int] = field(default_factory=list)


@dataclass
class SimState:
    """Everything one engine process owns; built by :func:`build_state`."""

    config: SimEngineConfig
    tokenizer: Tokenizer
    profile: EngineProfile
    core: EngineCore
    engine: AsyncSimEngine
    metrics: SimMetrics
    clock: RealtimeClock
    engine_id: str
    served_model_name: str
    max_model_len: int
    publisher: KvEventPublisher | None = None
    session: aiohttp.ClientSession | None = None
    handoffs: dict[str, Handoff] = field(default_factory=dict)
    bound_port: int = 0

    def handoff(self, key: str) -> Handoff:
        entry = self.handoffs.get(key)
        if entry is None:
            entry = self.handoffs[key] = Handoff()
        return entry


def build_state(config: SimEngineConfig) -> SimState:
    """Assemble tokenizer, performance profile, KV cache, step loop and metrics (no I/O)."""
    profile = resolve_profile(config.profile or None, model=config.model, gpu=config.gpu, tp=config.tp)
    tokenizer = load_tokenizer(config.tokenizer)
    max_model_len = config.max_model_len or profile.model.max_model_len
    num_blocks = config.num_gpu_blocks or max(
        1, profile.kv_cache_tokens(config.gpu_memory_utilization) // config.block_size
    )
    if num_blocks * config.block_size < max_model_len:
        raise ValueError(
            f"max_model_len {max_model_len} is larger than the KV cache ({num_blocks} blocks x {config.block_size} "
            "tokens): lower max_model_len or give more blocks"
        )
    kv = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
    generator = TokenGenerator(
        tokenizer.generatable_ids(),
        tokenizer.eos_token_id,
        LengthModel(median=config.output_len_median, sigma=config.output_len_sigma),
    )
    core_config = CoreConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        scheduling_policy=config.scheduling_policy,
        kv_hold_timeout=config.kv_hold_timeout_s,
    )
    core = EngineCore(core_config, kv, profile, generator)
    served = config.served_model_name or profile.model.name
    if config.api == "sglang":
        engine_type = {"both": "unified"}.get(config.role, config.role)
        metrics: SimMetrics = SglangMetrics(core, served, engine_type)
    else:
        cache_info = {
            "block_size": str(config.block_size),
            "num_gpu_blocks": str(num_blocks),
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "gpu_memory_utilization": str(config.gpu_memory_utilization),
            "cache_dtype": "auto",
        }
        metrics = VllmMetrics(core, served, cache_info)
    clock = RealtimeClock(config.time_scale)
    state = SimState(
        config=config,
        tokenizer=tokenizer,
        profile=profile,
        core=core,
        engine=None,  # type: ignore[arg-type]  # set just below, it needs the state's puller
        metrics=metrics,
        clock=clock,
        engine_id=config.resolved_engine_id(),
        served_model_name=served,
        max_model_len=max_model_len,
    )
    state.engine = AsyncSimEngine(
        core,
        clock,
        kv_puller=lambda req: _pull_kv(state, req),
        kv_load_failure_policy=config.kv_load_failure_policy,
        observer=metrics,
    )
    core.on_finish(lambda req: _on_request_finished(state, req))
    return state


def _on_request_finished(state: SimState, req: SimRequest) -> None:
    key = req.kv_hold_key
    if key is not None and key in state.core.held:
        entry = state.handoff(key)
        entry.block_ids = [b.block_id for b in req.blocks]
        entry.ready.set()


# ------------------------------------------------------------------ KV transfer
async def _pull_kv(state: SimState, req: SimRequest) -> None:
    """Decode side: fetch the prompt KV from the prefill peer, then spend the transfer time."""
    remote = req.remote_prefill
    assert remote is not None
    session = state.session
    if session is None:
        raise KvPullError("the engine has no HTTP client session")
    params = remote.params
    wait_s = state.clock.to_wall(state.config.kv_hold_timeout_s)
    try:
        if remote.protocol == "nixl":
            url = f"http://{params['remote_host']}:{params['remote_port']}/sim/kv/read"
            body = {k: params[k] for k in ("remote_engine_id", "remote_request_id", "remote_block_ids")}
            request = session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30))
        else:
            url = f"http://{params['bootstrap_host']}:{params['bootstrap_port']}/sim/bootstrap/{params['bootstrap_room']}"
            request = session.get(url, params={"timeout_s": str(wait_s)}, timeout=aiohttp.ClientTimeout(total=wait_s + 30))
        async with request as resp:
            if resp.status != 200:
                raise KvPullError(f"KV pull from {url} failed with HTTP {resp.status}: {(await resp.text())[:200]}")
            data = await resp.json()
    except aiohttp.ClientError as exc:
        raise KvPullError(f"KV pull from the prefill peer failed: {exc!r}") from exc
    tokens = data.get("token_ids") or []
    if tokens[: req.num_prompt_tokens] != req.prompt_token_ids[: len(tokens)] or len(tokens) < req.num_prompt_tokens - 1:
        raise KvPullError("the prefill peer holds KV of a different prompt")
    nbytes = req.num_external_tokens * state.profile.kv_bytes_per_token
    seconds = state.config.kv_link_latency_ms / 1000.0 + nbytes / (state.config.kv_link_bandwidth_gbps * 1e9)
    await state.clock.sleep_until(state.clock.now() + seconds)


def _remote_prefill_from(req: CompletionRequest | ChatCompletionRequest, api: str) -> RemotePrefill | None:
    if api == "sglang":
        if req.bootstrap_room is None:
            return None
        return RemotePrefill("bootstrap", {
            "bootstrap_host": req.bootstrap_host, "bootstrap_port": req.bootstrap_port, "bootstrap_room": req.bootstrap_room,
        })
    params = req.kv_transfer_params or {}
    required = ("remote_block_ids", "remote_engine_id", "remote_request_id", "remote_host", "remote_port")
    if params.get("do_remote_prefill") and all(params.get(k) not in (None, []) for k in required):
        return RemotePrefill("nixl", dict(params))
    return None  # like vLLM: invalid or absent params mean a local prefill


# --------------------------------------------------------------------- helpers
def _json_error(err: ApiError, flavour: str) -> web.Response:
    return web.json_response(error_body(err, flavour), status=err.status)


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def _check_auth(state: SimState, request: web.Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    supplied = request.headers.get("Authorization", "")
    if not secrets.compare_digest(supplied.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "invalid or missing API key", err_type="AuthenticationError")


class OutputText:
    """Incremental detokenization with stop strings (held back while they could still match)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], include_stop: bool, eos_token_id: int) -> None:
        self._tok = tokenizer
        self._stops = stops
        self._include = include_stop
        self._eos = eos_token_id
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stop_hit: str | None = None

    def add(self, token_ids: list[int], *, stop_checks: bool = True) -> str:
        """Append tokens; return the text now safe to send (all of it once a stop matched)."""
        for token in token_ids:
            if token != self._eos:
                self.text += self._tok.token_text(token)
        if self._stops and stop_checks:
            start = max(0, self.sent - self._hold)
            for stop in self._stops:
                idx = self.text.find(stop, start)
                if idx >= 0 and (self.stop_hit is None or idx < len(self.text)):
                    self.stop_hit = stop
                    self.text = self.text[: idx + (len(stop) if self._include else 0)]
                    break
        limit = len(self.text) if (self.stop_hit or not self._stops) else max(self.sent, len(self.text) - self._hold)
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta

    def flush(self) -> str:
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta


@dataclass
class Generation:
    """A validated generation request, ready for the engine."""

    kind: str  # "completion" or "chat"
    body: CompletionRequest | ChatCompletionRequest
    request_id: str
    prompt_ids: list[int]
    sim_request: SimRequest
    prefill_leg: bool


def _prepare(state: SimState, kind: str, body: Any, header_id: str | None) -> Generation:
    config = state.config
    model_cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    req = parse_request(model_cls, body)
    req.check_supported()
    if req.model is not None and req.model != state.served_model_name:
        raise ApiError(404, f"The model `{req.model}` does not exist.", param="model", err_type="NotFoundError")
    tok = state.tokenizer
    try:
        if isinstance(req, CompletionRequest):
            if isinstance(req.prompt, str):
                prompt_ids = tok.encode(req.prompt)
            else:
                prompt_ids = list(req.prompt)
                if any(t < 0 or t >= tok.vocab_size for t in prompt_ids):
                    raise ApiError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
        else:
            messages = [m.model_dump() for m in req.messages]
            prompt_ids = tok.encode(tok.apply_chat_template(messages))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
    n_prompt = len(prompt_ids)
    max_len = state.max_model_len
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if kind == "completion" else max_len - n_prompt
    if n_prompt + max_tokens > max_len or n_prompt >= max_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens" if max_tokens else "prompt",
        )
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    if req.priority != 0 and config.scheduling_policy != "priority":
        raise ApiError(400, "priority is only supported with --scheduling-policy priority", param="priority")
    if req.min_tokens > max_tokens:
        raise ApiError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    seed = req.seed if req.seed is not None else (None if temperature == 0 else config.seed ^ secrets.randbits(63))
    sampling = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        temperature=temperature,
        seed=seed,
        stop_token_ids=tuple(req.stop_token_ids or ()),
    )
    base = header_id or new_id("cmpl" if kind == "completion" else "chatcmpl")
    internal_id = f"{base}-{secrets.token_hex(4)}"
    prefill_leg = False
    hold_key = None
    if config.api == "vllm" and (req.kv_transfer_params or {}).get("do_remote_decode"):
        prefill_leg, hold_key = True, internal_id
    remote = _remote_prefill_from(req, config.api)
    if config.api == "sglang" and config.role in ("prefill", "decode") and req.bootstrap_room is None:
        raise ApiError(400, f"bootstrap_room is required by a {config.role} server in disaggregation mode", param="bootstrap_room")
    if config.api == "sglang" and config.role == "prefill":
        # SGLang's prefill server only prefills: one token, then the KV goes to the room's decoder
        prefill_leg, hold_key, remote = True, f"room:{req.bootstrap_room}", None
        sampling = SamplingParams(max_tokens=1, ignore_eos=True, temperature=temperature, seed=seed)
    sim_request = SimRequest(
        request_id=internal_id,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        arrival_time=state.clock.now(),
        priority=req.priority,
        kv_hold_key=hold_key,
        remote_prefill=remote,
    )
    return Generation(kind, req, base, prompt_ids, sim_request, prefill_leg)


def _kv_transfer_params(state: SimState, gen: Generation) -> dict[str, Any] | None:
    req = gen.sim_request
    if state.config.api != "vllm" or not gen.prefill_leg or req.kv_hold_key not in state.core.held:
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


# ------------------------------------------------------------------- handlers
def _handler(fn: Callable[[SimState, web.Request], Any]) -> Callable[[web.Request], Any]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        try:
            return await fn(state, request)
        except ApiError as err:
            return _json_error(err, state.config.api)

    return wrapped


async def handle_completions(state: SimState, request: web.Request) -> web.StreamResponse:
    return await _generate(state, request, "completion")


async def handle_chat(state: SimState, request: web.Request) -> web.StreamResponse:
    return await _generate(state, request, "chat")


async def _generate(state: SimState, request: web.Request, kind: str) -> web.StreamResponse:
    _check_auth(state, request)
    gen = _prepare(state, kind, await _read_json(request), request.headers.get("X-Request-Id"))
    stream = state.engine.submit(gen.sim_request)
    finished = False
    try:
        if gen.body.stream:
            response = await _stream_response(state, request, gen, stream)
        else:
            response = await _full_response(state, gen, stream)
        finished = True
        return response
    finally:
        if not finished and not gen.sim_request.status.finished:
            state.engine.abort(gen.sim_request.request_id)  # client went away: free its KV


def _text_of(state: SimState, gen: Generation) -> OutputText:
    body = gen.body
    return OutputText(state.tokenizer, body.stop_strings(), body.include_stop_str_in_output, state.tokenizer.eos_token_id)


async def _outputs(state: SimState, gen: Generation, stream: RequestStream, text: OutputText) -> AsyncIterator[tuple[list[int], str, RequestOutput]]:
    """Engine outputs with their text delta; ends the request early when a stop string matches."""
    min_tokens = gen.sim_request.sampling.min_tokens
    async for output in stream:
        checks = gen.sim_request.num_output_tokens > min_tokens
        delta = text.add(output.new_token_ids, stop_checks=checks)
        if text.stop_hit is not None and not output.finished:
            state.engine.abort(gen.sim_request.request_id, RequestStatus.FINISHED_STOPPED)
            output = RequestOutput(output.request, output.new_token_ids, "stop")
            yield output.new_token_ids, delta, output
            return
        yield output.new_token_ids, delta, output
        if output.finished:
            return


def _finish_fields(output: RequestOutput, text: OutputText) -> tuple[str | None, Any]:
    reason = output.finish_reason
    if reason is None:
        return None, None
    req = output.request
    stop_reason: Any = None
    if text.stop_hit is not None:
        stop_reason = text.stop_hit
    elif reason == "stop" and req.output_token_ids and req.output_token_ids[-1] in req.sampling.stop_token_ids:
        stop_reason = req.output_token_ids[-1]
    return reason, stop_reason


def _usage(state: SimState, gen: Generation) -> dict[str, Any]:
    req = gen.sim_request
    return usage_dict(len(gen.prompt_ids), req.num_output_tokens, max(0, req.num_cached_tokens), state.config.enable_prompt_tokens_details)


async def _await_handoff(state: SimState, gen: Generation) -> None:
    """SGLang prefill leg: answer only once the decode peer took the KV."""
    if state.config.api != "sglang" or not gen.prefill_leg:
        return
    key = gen.sim_request.kv_hold_key
    assert key is not None
    if key not in state.core.held:
        return
    entry = state.handoff(key)
    try:
        await asyncio.wait_for(entry.taken.wait(), state.clock.to_wall(state.config.kv_hold_timeout_s))
    except TimeoutError:
        raise ApiError(500, f"no decode peer took the KV of bootstrap room {gen.body.bootstrap_room}") from None
    finally:
        state.handoffs.pop(key, None)


async def _full_response(state: SimState, gen: Generation, stream: RequestStream) -> web.Response:
    text = _text_of(state, gen)
    token_ids: list[int] = []
    last: RequestOutput | None = None
    async for new_ids, _, output in _outputs(state, gen, stream, text):
        token_ids.extend(new_ids)
        last = output
    assert last is not None
    if last.finish_reason == "error":
        raise ApiError(500, gen.sim_request.error or "the request failed inside the engine", err_type="InternalServerError")
    await _await_handoff(state, gen)
    reason, stop_reason = _finish_fields(last, text)
    body = gen.body
    text.flush()
    final_text = text.text
    created, model = now_s(), state.served_model_name
    if gen.kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": final_text, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason}
        choice["token_ids"] = token_ids if body.return_token_ids else None
        choice["prompt_logprobs"] = None
        choice["prompt_token_ids"] = gen.prompt_ids if body.return_token_ids else None
        payload: dict[str, Any] = {"id": gen.request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    else:
        message = {"role": "assistant", "content": final_text, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason}
        choice["token_ids"] = token_ids if body.return_token_ids else None
        payload = {"id": gen.request_id, "object": "chat.completion", "created": created, "model": model, "choices": [choice]}
    payload["service_tier"] = None
    payload["system_fingerprint"] = None
    payload["usage"] = _usage(state, gen)
    if gen.kind == "chat":
        payload["prompt_logprobs"] = None
        payload["prompt_token_ids"] = gen.prompt_ids if body.return_token_ids else None
    payload["kv_transfer_params"] = _kv_transfer_params(state, gen)
    return web.json_response(payload, headers={"X-Request-Id": gen.request_id})


async def _stream_response(state: SimState, request: web.Request, gen: Generation, stream: RequestStream) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": gen.request_id})
    await response.prepare(request)
    body = gen.body
    created, model = now_s(), state.served_model_name
    is_chat = gen.kind == "chat"
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    text = _text_of(state, gen)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    async def send(payload: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    first = True
    if is_chat:
        head: dict[str, Any] = {"id": gen.request_id, "object": obj, "created": created, "model": model,
                                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        if body.return_token_ids:
            head["prompt_token_ids"] = gen.prompt_ids
        await send(head)
    async for new_ids, delta, output in _outputs(state, gen, stream, text):
        if output.finish_reason == "error":
            err = ApiError(500, gen.sim_request.error or "the request failed inside the engine", err_type="InternalServerError")
            await send(error_body(err, state.config.api))
            break
        reason, stop_reason = _finish_fields(output, text)
        if reason is not None:
            delta += text.flush()
        if is_chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": delta} if delta or reason is None else {}, "logprobs": None,
                                      "finish_reason": reason, "stop_reason": stop_reason}
            if body.return_token_ids:
                choice["token_ids"] = new_ids
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason}
            choice["prompt_token_ids"] = gen.prompt_ids if (body.return_token_ids and first) else None
            choice["token_ids"] = new_ids if body.return_token_ids else None
        chunk: dict[str, Any] = {"id": gen.request_id, "object": obj, "created": created, "model": model, "choices": [choice]}
        if continuous:
            chunk["usage"] = _usage(state, gen)
        elif not is_chat:
            chunk["usage"] = None
        await send(chunk)
        first = False
    await _await_handoff(state, gen)
    if include_usage:
        usage = {k: v for k, v in _usage(state, gen).items() if v is not None}
        await send({"id": gen.request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def handle_models(state: SimState, request: web.Request) -> web.Response:
    owned_by = "sglang" if state.config.api == "sglang" else "vllm"
    card: dict[str, Any] = {
        "id": state.served_model_name,
        "object": "model",
        "created": now_s(),
        "owned_by": owned_by,
        "root": state.profile.model.name,
        "parent": None,
        "max_model_len": state.max_model_len,
    }
    if owned_by == "vllm":
        card["permission"] = [{
            "id": new_id("modelperm"), "object": "model_permission", "created": now_s(), "allow_create_engine": False,
            "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False,
        }]
    return web.json_response({"object": "list", "data": [card]})


async def handle_health(state: SimState, request: web.Request) -> web.Response:
    return web.Response(status=200)


async def handle_version(state: SimState, request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


async def handle_tokenize(state: SimState, request: web.Request) -> web.Response:
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    tok = state.tokenizer
    if "messages" in body:
        try:
            tokens = tok.encode(tok.apply_chat_template(body["messages"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(400, f"invalid messages: {exc}", param="messages") from None
    elif isinstance(body.get("prompt"), str):
        tokens = tok.encode(body["prompt"])
    else:
        raise ApiError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
    strs = [tok.decode([t]) for t in tokens] if body.get("return_token_strs") else None
    return web.json_response({"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens, "token_strs": strs})


async def handle_detokenize(state: SimState, request: web.Request) -> web.Response:
    body = await _read_json(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
    return web.json_response({"prompt": state.tokenizer.decode(tokens)})


async def handle_metrics(state: SimState, request: web.Request) -> web.Response:
    return web.Response(body=state.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def handle_reset_prefix_cache(state: SimState, request: web.Request) -> web.Response:
    if not state.core.kv.reset_prefix_cache():
        raise ApiError(400, "cannot reset the prefix cache while requests hold KV blocks")
    state.engine._flush_events(state.clock.now())  # publish AllBlocksCleared now
    return web.Response(status=200)


async def handle_state(state: SimState, request: web.Request) -> web.Response:
    core, kv = state.core, state.core.kv
    return web.json_response({
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
    })


async def handle_kv_read(state: SimState, request: web.Request) -> web.Response:
    """Side channel: a decode peer takes a held prefill's KV (the sim's NIXL read)."""
    body = await _read_json(request)
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
    return web.json_response({"token_ids": held.prompt_token_ids, "num_tokens": held.num_prompt_tokens})


async def handle_get_model_info(state: SimState, request: web.Request) -> web.Response:
    return web.json_response({
        "model_path": state.profile.model.name,
        "tokenizer_path": state.tokenizer.name,
        "is_generation": True,
        "preferred_sampling_params": None,
    })


async def handle_get_server_info(state: SimState, request: web.Request) -> web.Response:
    info = state.config.model_dump()
    info.pop("api_key", None)
    info.update({
        "model_path": state.profile.model.name,
        "disaggregation_mode": {"both": "null"}.get(state.config.role, state.config.role),
        "disaggregation_bootstrap_port": state.config.resolved_bootstrap_port(),
        "max_total_num_tokens": state.core.kv.num_blocks * state.core.kv.block_size,
        "version": VERSION,
    })
    return web.json_response(info)


# ------------------------------------------------------------ bootstrap server
async def handle_bootstrap_room(state: SimState, request: web.Request) -> web.Response:
    """Long-poll until the prefill of ``room`` finished, then hand its KV to the decode peer."""
    room = request.match_info["room"]
    key = f"room:{room}"
    try:
        timeout = float(request.query.get("timeout_s", "60"))
    except ValueError:
        raise ApiError(400, "timeout_s must be a number", param="timeout_s") from None
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
    return web.json_response({"token_ids": held.prompt_token_ids, "num_tokens": held.num_prompt_tokens})


async def handle_bootstrap_route(state: SimState, request: web.Request) -> web.Response:
    return web.json_response({
        "attn_tp_size": state.profile.tp, "attn_cp_size": 1, "dp_size": 1, "pp_size": 1,
        "page_size": state.config.block_size, "kv_cache_dtype": "auto", "follow_bootstrap_room": True,
        "prefill_http_port": state.bound_port,
    })


async def handle_bootstrap_health(state: SimState, request: web.Request) -> web.Response:
    return web.Response(text="OK")


# ----------------------------------------------------------------------- apps
def create_app(state: SimState) -> web.Application:
    """The engine's HTTP application; its cleanup context starts and stops the engine."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIM_STATE] = state
    api = state.config.api
    routes = [
        web.post("/v1/completions", _handler(handle_completions)),
        web.post("/v1/chat/completions", _handler(handle_chat)),
        web.get("/v1/models", _handler(handle_models)),
        web.get("/health", _handler(handle_health)),
        web.get("/version", _handler(handle_version)),
        web.post("/tokenize", _handler(handle_tokenize)),
        web.post("/detokenize", _handler(handle_detokenize)),
        web.get("/metrics", _handler(handle_metrics)),
        web.get("/sim/state", _handler(handle_state)),
        web.post("/sim/kv/read", _handler(handle_kv_read)),
    ]
    if api == "vllm":
        routes.append(web.post("/reset_prefix_cache", _handler(handle_reset_prefix_cache)))
    else:
        routes += [
            web.get("/health_generate", _handler(handle_health)),
            web.get("/get_model_info", _handler(handle_get_model_info)),
            web.get("/get_server_info", _handler(handle_get_server_info)),
            web.post("/flush_cache", _handler(handle_reset_prefix_cache)),
        ]
    app.add_routes(routes)
    app.cleanup_ctx.append(_engine_lifecycle)
    return app


def create_bootstrap_app(state: SimState) -> web.Application:
    app = web.Application()
    app[SIM_STATE] = state
    app.add_routes([
        web.get("/route", _handler(handle_bootstrap_route)),
        web.get("/health", _handler(handle_bootstrap_health)),
        web.get("/sim/bootstrap/{room}", _handler(handle_bootstrap_room)),
    ])
    return app


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[SIM_STATE]
    state.session = aiohttp.ClientSession()
    if state.config.kv_events_endpoint:
        state.publisher = KvEventPublisher(
            state.config.kv_events_endpoint,
            replay_endpoint=state.config.kv_events_replay_endpoint,
            topic=state.config.kv_events_topic,
        )
        await state.publisher.start()
        state.engine._publish = state.publisher.publish
    await state.engine.start()
    try:
        yield
    finally:
        await state.engine.close()
        if state.publisher is not None:
            await state.publisher.close()
        await state.session.close()


class SimServer:
    """Runs one engine's HTTP site (and an SGLang prefill's bootstrap site) on this loop."""

    def __init__(self, config: SimEngineConfig) -> None:
        self.config = config
        self.state = build_state(config)
        self._runners: list[web.AppRunner] = []

    @property
    def port(self) -> int:
        return self.state.bound_port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(create_app(self.state), handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self.state.bound_port = runner.addresses[0][1]
        bootstrap_port = self.config.resolved_bootstrap_port()
        if bootstrap_port is not None:
            boot = web.AppRunner(create_bootstrap_app(self.state), handler_cancellation=True, access_log=None)
            await boot.setup()
            self._runners.append(boot)
            await web.TCPSite(boot, self.config.host, bootstrap_port).start()

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()


async def serve_forever(server: SimServer, *, ready: Callable[[SimServer], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly."""
    await server.start()
    if ready is not None:
        ready(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
