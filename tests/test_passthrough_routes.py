"""Embeddings, score, rerank and the tokenizer routes through the gateway: no PD, the engine's answer as is.

The fleet: a generative model served split (one prefill, one decode engine) and a pooling model
served by two colocated engines (``--runner pooling``), all real simulated-engine processes.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from support.fleet import MODEL, engine_flags, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim

EMBEDDER = "embedder"


@dataclass
class Fleet:
    gateway: PdgateProcess
    generate: list[PdgateProcess]
    pooling: list[PdgateProcess]


def _start(tmp_path, **gateway: Any) -> Fleet:
    procs: list[PdgateProcess] = []
    try:
        generate = [start_sim(*engine_flags(role)) for role in ("prefill", "decode")]
        procs += generate
        pooling_flags = engine_flags("both", extra=("--served-model-name", EMBEDDER, "--runner", "pooling"))
        pooling = [start_sim(*pooling_flags, time_scale=1.0) for _ in range(2)]
        procs += pooling
        entries = [instance_entry(p, role, "sim") for p, role in zip(generate, ("prefill", "decode"))]
        entries += [{**instance_entry(p, "both", "sim"), "model": EMBEDDER} for p in pooling]
        models = [{"name": MODEL, "max_model_len": 4096}, {"name": EMBEDDER, "max_model_len": 4096}]
        gw = start_gateway(write_config(tmp_path / "fleet.yaml", entries, models=models, **gateway))
        return Fleet(gw, generate, pooling)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    fleet = _start(tmp_path_factory.mktemp("passthrough"))
    yield fleet
    for proc in (fleet.gateway, *fleet.generate, *fleet.pooling):
        proc.stop()


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_embeddings_through_the_openai_client_equal_the_engines_own(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.gateway.url}/v1", api_key="unused", max_retries=0)
    texts = ["prefill and decode", "a rerank of documents", "prefill and decode"]
    through = client.embeddings.create(model=EMBEDDER, input=texts)
    direct = openai.OpenAI(base_url=f"{fleet.pooling[0].url}/v1", api_key="unused").embeddings.create(
        model=EMBEDDER, input=texts
    )
    assert [d.embedding for d in through.data] == [d.embedding for d in direct.data]
    assert through.data[0].embedding == through.data[2].embedding and len(through.data[0].embedding) == 32
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens > 0


def test_score_and_rerank_pass_through(fleet: Fleet) -> None:
    url = fleet.gateway.url
    status, score = post(f"{url}/v1/score", {"model": EMBEDDER, "text_1": "decode", "text_2": ["decode", "zebra"]})
    assert status == 200 and [d["index"] for d in score["data"]] == [0, 1]
    assert score["data"][0]["score"] == pytest.approx(1.0)  # the same text: the same unit vector
    status, rerank = post(
        f"{url}/v1/rerank", {"model": EMBEDDER, "query": "decode", "documents": ["zebra", "decode"], "top_n": 1}
    )
    assert status == 200 and [r["index"] for r in rerank["results"]] == [1]


def test_pooling_requests_spread_over_the_colocated_instances_by_load(fleet: Fleet) -> None:
    served = [metric(p.url, "vllm:request_success_total") for p in fleet.pooling]
    long_text = "one two three four five six seven eight " * 200  # ~1600 tokens: a prefill that takes a while
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: post(f"{fleet.gateway.url}/v1/embeddings", {"model": EMBEDDER, "input": long_text}), range(8)
            )
        )
    assert all(status == 200 for status, _ in answers)
    after = [metric(p.url, "vllm:request_success_total") for p in fleet.pooling]
    per_engine = [b - a for a, b in zip(served, after)]
    assert sum(per_engine) == 8 and min(per_engine) >= 2  # the least loaded goes first: both take a share
    # the generative engines saw none of it
    assert metric(fleet.generate[0].url, "vllm:request_success_total") == 0


def test_tokenize_and_detokenize_reach_an_engine_of_the_model(fleet: Fleet) -> None:
    status, tokens = post(f"{fleet.gateway.url}/tokenize", {"model": MODEL, "prompt": "Hello disaggregated world"})
    _, direct = post(f"{fleet.generate[0].url}/tokenize", {"model": MODEL, "prompt": "Hello disaggregated world"})
    assert status == 200 and tokens["tokens"] == direct["tokens"] and tokens["count"] == len(direct["tokens"])
    status, text = post(f"{fleet.gateway.url}/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert status == 200 and "disaggregated" in text["prompt"]


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/embeddings", {"model": MODEL, "input": "x"}, 503, "role both"),  # split-only: no pooling path
        ("/v1/embeddings", {"input": "x"}, 400, "`model` is required"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "does not exist"),
        ("/v1/embeddings", ["not", "an", "object"], 400, "JSON object"),
        ("/tokenize", {"prompt": "x"}, 400, "`model` is required"),  # two models: which one's tokenizer?
        ("/v1/embeddings", {"model": EMBEDDER, "input": 5}, 400, "input"),  # the engine's own 400, as it said
    ],
)
def test_bad_passthrough_requests_get_openai_errors(fleet: Fleet, path, body, status, says) -> None:
    code, answer = post(f"{fleet.gateway.url}{path}", body)
    assert code == status and says in answer["error"]["message"]


def test_a_dead_pooling_engine_is_skipped(tmp_path) -> None:
    fleet = _start(tmp_path, health={"interval_s": 60, "timeout_s": 1.0, "failure_threshold": 1, "cooldown_s": 30})
    try:
        fleet.pooling[0].stop(signal.SIGKILL)  # the gateway has not noticed: its health check is a minute away
        for _ in range(3):
            status, answer = post(f"{fleet.gateway.url}/v1/embeddings", {"model": EMBEDDER, "input": "still here"})
            assert status == 200 and len(answer["data"][0]["embedding"]) == 32
    finally:
        for proc in (fleet.gateway, *fleet.generate, *fleet.pooling):
            proc.stop()


def test_the_tokenizer_routes_need_the_api_key_when_the_gateway_has_keys(tmp_path) -> None:
    fleet = _start(tmp_path, api_keys=["sk-gw"])
    try:
        status, _ = post(f"{fleet.gateway.url}/tokenize", {"model": MODEL, "prompt": "x"})
        assert status == 401
        status, _ = post(
            f"{fleet.gateway.url}/tokenize", {"model": MODEL, "prompt": "x"}, headers={"Authorization": "Bearer sk-gw"}
        )
        assert status == 200
    finally:
        for proc in (fleet.gateway, *fleet.generate, *fleet.pooling):
            proc.stop()


def test_tenants_are_named_budgeted_and_counted_on_the_passthrough_routes(tmp_path) -> None:
    tenants = {
        "identify_by": ["header", "route"],
        "require_tenant": True,
        "tenants": [{"name": "search", "requests_per_minute": 2}, {"name": "tools", "routes": ["/tokenize"]}],
    }
    fleet = _start(tmp_path, tenants=tenants)
    try:
        url = fleet.gateway.url
        status, answer = post(f"{url}/v1/embeddings", {"model": EMBEDDER, "input": "who am I"})
        assert status == 403 and answer["error"]["code"] == "no_tenant"
        named = {"x-pdgate-tenant": "search"}
        status, first = post(f"{url}/v1/embeddings", {"model": EMBEDDER, "input": "two words"}, headers=named)
        assert status == 200
        assert post(f"{url}/v1/rerank", {"model": EMBEDDER, "query": "q", "documents": ["d"]}, headers=named)[0] == 200
        status, refused = post(f"{url}/v1/embeddings", {"model": EMBEDDER, "input": "again"}, headers=named)
        assert status == 429 and refused["error"]["code"] == "tenant-budget"
        assert post(f"{url}/tokenize", {"model": MODEL, "prompt": "x"})[0] == 200  # the route names "tools"
        assert metric(url, "pdgate_tenant_requests_total", tenant="search", status="200") == 2
        assert metric(url, "pdgate_tenant_requests_total", tenant="search", status="429") == 1
        assert metric(url, "pdgate_tenant_requests_total", tenant="tools", status="200") == 1
        prompt = metric(url, "pdgate_tenant_tokens_total", tenant="search", kind="prompt")
        assert prompt > first["usage"]["prompt_tokens"] > 0  # the embeddings' and the rerank's inputs
    finally:
        for proc in (fleet.gateway, *fleet.generate, *fleet.pooling):
            proc.stop()
