"""Pooling routes of the simulated engine (``--runner pooling``): embeddings, score and rerank.

A pooling model computes its prompt and returns vectors, not tokens. The simulated engine runs each
input through its scheduler as a one-token prefill (so pooling work costs time and shows in the
engine's load as a real one's does) and answers with a deterministic unit vector per input: the
normalised sum of a pseudo-random vector per token id, so equal texts get equal vectors and texts
sharing words score higher. The answers have vLLM's shapes (``/v1/embeddings``, ``/v1/score``,
``/v1/rerank``); the numbers mean nothing beyond that.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

from aiohttp import web

from pdgate.engines.sim.protocol import ApiError, new_id, now_s, read_json
from pdgate.engines.sim.request import SamplingParams, SimRequest
from pdgate.engines.sim.state import SimState, check_auth

EMBEDDING_DIM = 32


async def handle_embeddings(state: SimState, request: web.Request) -> web.Response:
    body = await _body(state, request)
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "'input' must be a string, a list of strings or token ids", param="input")
    token_lists = [_tokens(state, item, "input") for item in inputs]
    vectors = [await _pool(state, tokens) for tokens in token_lists]
    n_tokens = sum(len(t) for t in token_lists)
    return _list_answer(
        state, "embd", [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)], n_tokens
    )


async def handle_score(state: SimState, request: web.Request) -> web.Response:
    body = await _body(state, request)
    first, second = body.get("text_1"), body.get("text_2")
    lefts = [first] if isinstance(first, str) else first
    rights = [second] if isinstance(second, str) else second
    if not isinstance(lefts, list) or not isinstance(rights, list) or not lefts or not rights:
        raise ApiError(400, "'text_1' and 'text_2' must be strings or lists of strings", param="text_1")
    if len(lefts) == 1:
        lefts = lefts * len(rights)
    if len(lefts) != len(rights):
        raise ApiError(400, "'text_1' must hold one text or as many as 'text_2'", param="text_1")
    scores, n_tokens = await _pair_scores(state, list(zip(lefts, rights)))
    return _list_answer(
        state, "score", [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)], n_tokens
    )


def _list_answer(state: SimState, prefix: str, data: list[dict[str, Any]], n_tokens: int) -> web.Response:
    """vLLM's list answer of the embeddings and score routes."""
    return web.json_response(
        {
            "id": new_id(prefix),
            "object": "list",
            "created": now_s(),
            "model": state.served_model_name,
            "data": data,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0},
        }
    )


async def handle_rerank(state: SimState, request: web.Request) -> web.Response:
    body = await _body(state, request)
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str) or not isinstance(documents, list) or not documents:
        raise ApiError(400, "'query' must be a string and 'documents' a list of strings", param="documents")
    top_n = body.get("top_n") or len(documents)
    scores, n_tokens = await _pair_scores(state, [(query, d) for d in documents])
    ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n]
    return web.json_response(
        {
            "id": new_id("rerank"),
            "model": state.served_model_name,
            "usage": {"total_tokens": n_tokens},
            "results": [{"index": i, "document": {"text": documents[i]}, "relevance_score": scores[i]} for i in ranked],
        }
    )


async def _body(state: SimState, request: web.Request) -> dict[str, Any]:
    check_auth(state, request.headers)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != state.served_model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", err_type="NotFoundError")
    return body


def _tokens(state: SimState, item: Any, param: str) -> list[int]:
    if isinstance(item, str):
        tokens = state.tokenizer.encode(item, add_special_tokens=True)
    elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        tokens = list(item)
    else:
        raise ApiError(400, f"'{param}' holds an item that is neither text nor token ids", param=param)
    if not tokens or len(tokens) > state.max_model_len:
        raise ApiError(400, f"an input of {len(tokens)} tokens does not fit the model", param=param)
    return tokens


async def _pair_scores(state: SimState, pairs: list[tuple[Any, Any]]) -> tuple[list[float], int]:
    scores, n_tokens = [], 0
    for left, right in pairs:
        a, b = _tokens(state, left, "text_1"), _tokens(state, right, "text_2")
        n_tokens += len(a) + len(b)
        u, v = await _pool(state, a), await _pool(state, b)
        scores.append(sum(x * y for x, y in zip(u, v)))
    return scores, n_tokens


async def _pool(state: SimState, tokens: list[int]) -> list[float]:
    """Run ``tokens`` through the engine as a one-token prefill, then return their vector."""
    sim_request = SimRequest(
        request_id=state.new_id("pool"),
        prompt_token_ids=tokens,
        sampling=SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0),
        arrival_time=state.clock.now(),
    )
    finished = False
    try:
        async for output in state.engine.submit(sim_request):
            if output.finished:
                break
        finished = True
    finally:
        if not finished and not sim_request.status.finished:
            state.engine.abort(sim_request.request_id)
    return _vector(tokens)


def _vector(tokens: list[int]) -> list[float]:
    total = [0.0] * EMBEDDING_DIM
    for token in tokens:
        digest = hashlib.blake2b(token.to_bytes(8, "little"), digest_size=EMBEDDING_DIM * 2).digest()
        for i, (raw,) in enumerate(struct.iter_unpack("<h", digest)):
            total[i] += raw / 32768.0
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]
