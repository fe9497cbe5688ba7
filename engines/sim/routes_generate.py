"""OpenAI-compatible generation routes of the simulated engine (completions and chat, SSE or JSON).

:func:`generate` serves one generation call against a :class:`~engines.sim.reply.Reply`, with no
transport objects: the aiohttp handlers here and :func:`engines.sim.local.call_local` both use it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from pdgate.common.block_hash import request_keys
from pdgate.engines.sim.core import RequestOutput
from pdgate.engines.sim.engine import RequestStream
from pdgate.engines.sim.handoff import await_handoff, kv_transfer_params, remote_prefill_from
from pdgate.engines.sim.migration import claim_reservation
from pdgate.engines.sim.migration_state import LiveRequest
from pdgate.engines.sim.output_text import OutputText
from pdgate.engines.sim.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    json_of,
    now_s,
    parse_request,
    read_body,
    usage_dict,
)
from pdgate.engines.sim.reply import Reply
from pdgate.engines.sim.request import RequestStatus, SamplingParams, SimRequest
from pdgate.engines.sim.state import SimState, check_auth

DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_CACHE_SALT_LENGTH = 128
CACHE_SALT_FORBIDDEN_CHARS = frozenset("@/\\\x00")


@dataclass
class Generation:
    """A validated generation request, ready for the engine."""

    kind: str  # "completion" or "chat"
    body: CompletionRequest | ChatCompletionRequest
    request_id: str
    prompt_ids: list[int]
    sim_request: SimRequest
    prefill_leg: bool
    model: str  # the name answers carry: the base model's, or the LoRA adapter's the request named
    live: LiveRequest | None = None  # set while the handler runs (the live-migration index)


def _prepare(state: SimState, kind: str, body: Any, header_id: str | None) -> Generation:
    config = state.config
    model_cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    req = parse_request(model_cls, body)
    req.check_supported()
    adapter = state.resolve_model(req.model)
    cache_salt = _cache_salt(req) if config.api == "vllm" else None
    tok = state.tokenizer
    try:
        if isinstance(req, CompletionRequest):
            if isinstance(req.prompt, str):
                prompt_ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            else:
                prompt_ids = list(cast("list[int]", req.prompt))  # check_supported() refused batched prompts
                if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= tok.vocab_size):
                    raise ApiError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
        else:
            messages = [m.model_dump() for m in req.messages]
            text = tok.apply_chat_template(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                tools=req.tools,
                **(req.chat_template_kwargs or {}),
            )
            prompt_ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
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
    seed = req.seed if req.seed is not None else (None if temperature == 0 else config.seed ^ state.rng.getrandbits(63))
    sampling = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        temperature=temperature,
        seed=seed,
        stop_token_ids=tuple(req.stop_token_ids or ()),
    )
    base = header_id or state.new_id("cmpl" if kind == "completion" else "chatcmpl")
    internal_id = f"{base}-{state.rng.getrandbits(32):08x}"
    prefill_leg = False
    hold_key = None
    if config.api == "vllm" and (req.kv_transfer_params or {}).get("do_remote_decode"):
        prefill_leg, hold_key = True, internal_id
    remote = remote_prefill_from(req, config.api)
    migration = remote is not None and bool(remote.params.get("migration"))
    if migration and config.api == "sglang" and config.role == "prefill":
        raise ApiError(400, "a prefill server cannot continue a migrated request", param="kv_transfer_params")
    if config.api == "sglang" and config.role in ("prefill", "decode") and req.bootstrap_room is None and not migration:
        raise ApiError(
            400, f"bootstrap_room is required by a {config.role} server in disaggregation mode", param="bootstrap_room"
        )
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
        block_keys=request_keys(lora=None if adapter is None else adapter.key, cache_salt=cache_salt),
        lora_id=None if adapter is None else adapter.lora_id,
    )
    if migration:
        assert remote is not None
        origin = remote.params.get("origin_prompt_tokens")
        if isinstance(origin, int) and not isinstance(origin, bool) and 0 < origin <= n_prompt:
            sim_request.length_key_tokens = origin
        reservation = claim_reservation(state, remote.params.get("reservation_id"))
        if reservation is not None:  # freed right before the request's own blocks are allocated
            sim_request.reserved_blocks = reservation.blocks
    model = state.served_model_name if adapter is None else adapter.name
    return Generation(kind, req, base, prompt_ids, sim_request, prefill_leg, model)


def _cache_salt(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The request's ``cache_salt``, checked as vLLM's ``validate_cache_salt`` checks it (400 otherwise)."""
    salt = (req.model_extra or {}).get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        message = "Parameter 'cache_salt' must be a non-empty string if provided."
    elif len(salt) > MAX_CACHE_SALT_LENGTH or any(c in CACHE_SALT_FORBIDDEN_CHARS for c in salt):
        message = "Parameter 'cache_salt' must be at most 128 characters and must not contain '@', '/', '\\\\', or NUL."
    else:
        return salt
    raise ApiError(400, f"{message} (parameter=cache_salt)", param="cache_salt")


async def handle_completions(state: SimState, request: web.Request, reply: Reply) -> None:
    await generate(state, "completion", request.path, request.headers, await read_body(request), reply)


async def handle_chat(state: SimState, request: web.Request, reply: Reply) -> None:
    await generate(state, "chat", request.path, request.headers, await read_body(request), reply)


async def generate(state: SimState, kind: str, path: str, headers: Mapping[str, str], body: Any, reply: Reply) -> None:
    """Serve one ``kind`` ("completion" or "chat") call: validate, run it on the engine, answer through ``reply``.

    ``headers`` are looked up case-insensitively (``X-Request-Id``, ``Authorization``,
    ``traceparent``, ``tracestate``); ``body`` is the parsed JSON (or a
    :class:`~engines.sim.protocol.InvalidJson`). Raises ApiError before the answer started (see
    :func:`engines.sim.reply.respond`). If the calling task is cancelled (the client went away) the
    request is aborted in the engine and its KV freed.
    """
    received_ns = time.time_ns()
    header_id = headers.get("X-Request-Id")
    traceparent, tracestate = headers.get("traceparent"), headers.get("tracestate")
    record = {
        "request_id": header_id,
        "path": path,
        "traceparent": traceparent,
        "tracestate": tracestate,
        "received_at": received_ns / 1e9,
    }
    state.traces.append(record)
    check_auth(state, headers)
    gen = _prepare(state, kind, json_of(body), header_id)
    record["request_id"] = gen.request_id
    stream = state.engine.submit(gen.sim_request)
    gen.live = state.migration.track(gen.request_id, gen.sim_request, gen.prefill_leg)
    if state.tracer is not None:
        state.tracer.begin(
            gen.sim_request,
            request_id=gen.request_id,
            traceparent=traceparent,
            tracestate=tracestate,
            start_ns=received_ns,
            top_p=gen.body.top_p,
        )
    finished = False
    try:
        if gen.body.stream:
            await _stream_response(state, gen, stream, reply)
        else:
            await _full_response(state, gen, stream, reply)
        finished = True
    finally:
        if not finished and not gen.sim_request.status.finished:
            state.engine.abort(gen.sim_request.request_id)  # client went away: free its KV
        state.migration.untrack(gen.live)


def _text_of(state: SimState, gen: Generation) -> OutputText:
    body = gen.body
    return OutputText(
        state.tokenizer, body.stop_strings(), body.include_stop_str_in_output, state.tokenizer.eos_token_id
    )


async def _outputs(
    state: SimState, gen: Generation, stream: RequestStream, text: OutputText
) -> AsyncIterator[tuple[list[int], str, RequestOutput]]:
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
    return usage_dict(
        len(gen.prompt_ids),
        req.num_output_tokens,
        max(0, req.num_cached_tokens),
        state.config.enable_prompt_tokens_details,
    )


async def _full_response(state: SimState, gen: Generation, stream: RequestStream, reply: Reply) -> None:
    text = _text_of(state, gen)
    token_ids: list[int] = []
    last: RequestOutput | None = None
    async for new_ids, _, output in _outputs(state, gen, stream, text):
        token_ids.extend(new_ids)
        last = output
    assert last is not None
    if gen.live is not None:
        gen.live.end_reason = last.finish_reason
    if last.finish_reason == "error":
        raise ApiError(
            500, gen.sim_request.error or "the request failed inside the engine", err_type="InternalServerError"
        )
    await await_handoff(state, gen.sim_request, gen.prefill_leg)
    reason, stop_reason = _finish_fields(last, text)
    body = gen.body
    if reason != "migrated":  # a migrated request goes on elsewhere: text held back for stop strings stays out
        text.flush()
    final_text = text.text[: text.sent]
    created, model = now_s(), gen.model
    if gen.kind == "completion":
        choice: dict[str, Any] = {
            "index": 0,
            "text": final_text,
            "logprobs": None,
            "finish_reason": reason,
            "stop_reason": stop_reason,
        }
        choice["token_ids"] = token_ids if body.return_token_ids else None
        choice["prompt_logprobs"] = None
        choice["prompt_token_ids"] = gen.prompt_ids if body.return_token_ids else None
        payload: dict[str, Any] = {
            "id": gen.request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    else:
        message = {"role": "assistant", "content": final_text, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason}
        choice["token_ids"] = token_ids if body.return_token_ids else None
        payload = {
            "id": gen.request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    payload["service_tier"] = None
    payload["system_fingerprint"] = None
    payload["usage"] = _usage(state, gen)
    if gen.kind == "chat":
        payload["prompt_logprobs"] = None
        payload["prompt_token_ids"] = gen.prompt_ids if body.return_token_ids else None
    payload["kv_transfer_params"] = kv_transfer_params(state, gen.sim_request, gen.prefill_leg)
    await reply.json(200, payload, headers={"X-Request-Id": gen.request_id})


async def _stream_response(state: SimState, gen: Generation, stream: RequestStream, reply: Reply) -> None:
    await reply.start_stream(
        {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": gen.request_id}
    )
    body = gen.body
    created, model = now_s(), gen.model
    is_chat = gen.kind == "chat"
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    text = _text_of(state, gen)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    encode = state.json_encode

    async def send(payload: dict[str, Any]) -> None:
        await reply.write(b"data: " + encode(payload) + b"\n\n")

    first = True
    if is_chat:
        head: dict[str, Any] = {
            "id": gen.request_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
        if body.return_token_ids:
            head["prompt_token_ids"] = gen.prompt_ids
        await send(head)
    live = gen.live
    async for new_ids, delta, output in _outputs(state, gen, stream, text):
        if live is not None and output.finished:
            live.end_reason = output.finish_reason
        if output.finish_reason == "migrated":
            # moved to another engine: every token so far was sent; no finish chunk, usage or [DONE]
            await reply.end()
            return
        if output.finish_reason == "error":
            err = ApiError(
                500, gen.sim_request.error or "the request failed inside the engine", err_type="InternalServerError"
            )
            await send(error_body(err, state.config.api))
            break
        reason, stop_reason = _finish_fields(output, text)
        if reason is not None:
            delta += text.flush()
        if is_chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": delta} if delta or reason is None else {},
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": stop_reason,
            }
            if body.return_token_ids:
                choice["token_ids"] = new_ids
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason}
            choice["prompt_token_ids"] = gen.prompt_ids if (body.return_token_ids and first) else None
            choice["token_ids"] = new_ids if body.return_token_ids else None
        chunk: dict[str, Any] = {
            "id": gen.request_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if continuous:
            chunk["usage"] = _usage(state, gen)
        elif not is_chat:
            chunk["usage"] = None
        await send(chunk)
        first = False
    await await_handoff(state, gen.sim_request, gen.prefill_leg)
    if include_usage:
        usage = {k: v for k, v in _usage(state, gen).items() if v is not None}
        await send(
            {"id": gen.request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
        )
    await reply.write(b"data: [DONE]\n\n")
    await reply.end()
