"""LoRA adapters through the gateway: listed, routed only where loaded, loaded on demand, and
prefix hits counted as the engines count them under each instance's hash scheme.

Real simulated-engine processes on loopback (vLLM's LoRA API: ``--enable-lora``, ``--lora-modules``,
runtime loading with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, ``--prefix-caching-hash-algo``) behind
a ``pdgate serve`` process, driven with the openai client. Where a request ran is read from each
engine's own ``vllm:request_success_total``; what an engine serves from its ``/v1/models``. The
in-process tests at the end cover the filter's rules, the hash schemes and the catalog.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import openai
import pytest
from support.fleet import MODEL, engine_flags, get_json, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess
from support.streams import admin
from support.waiting import wait_until

from pdgate.adapters import UpstreamPool
from pdgate.adapters.load import parse_load, scrape_path
from pdgate.adapters.lora import AdapterCard, LoraLoadError, adapter_cards, load_outcome
from pdgate.common.block_hash import LoraAdapter, block_hashes, to_event_hash
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.hash_schemes import HashScheme, PromptHashes, engine_scheme
from pdgate.gateway.intake import Routed, request_attributes
from pdgate.gateway.lora import InstanceLoras
from pdgate.scheduler.costmodel.latency import LatencyModel, PriorSpec
from pdgate.scheduler.costmodel.model import CostModel
from pdgate.scheduler.plugins.lora import LoraAffinityFilter, LoraAffinityParams
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, LoraTarget, RequestInfo, SloTarget

BLOCK = 16
RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


def prompt(seed: int) -> list[int]:
    """Three full blocks and a partial one, unique per seed (a repeat hits exactly 3 blocks)."""
    return [100 + (seed * 131 + i * 7) % 5000 for i in range(3 * BLOCK + 5)]


def adapter_dir(tmp_path: Path, name: str) -> str:
    path = tmp_path / "adapters" / name
    path.mkdir(parents=True)
    return str(path)


def served(engine: PdgateProcess) -> dict[str, str]:
    """The adapters an engine serves, name -> path, from its own /v1/models."""
    return {m["id"]: m["root"] for m in get_json(f"{engine.url}/v1/models")["data"] if m.get("parent")}


def successes(engine: PdgateProcess) -> float:
    return metric(engine.url, "vllm:request_success_total")


def client(gateway: PdgateProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)


def complete(gateway: PdgateProcess, model: str, tokens: list[int], **extra: Any) -> Any:
    return client(gateway).completions.create(
        model=model, prompt=tokens, max_tokens=2, temperature=0, extra_body=extra or None
    )


def lora_engine(sim_factory, role: str, *modules: str, kv: bool = False, extra: tuple[str, ...] = ()) -> PdgateProcess:
    flags = ["--enable-lora", "--max-loras", "2", *extra]
    if modules:
        flags += ["--lora-modules", *modules]
    return sim_factory(*engine_flags(role, kv_events=kv, extra=tuple(flags)), env=RUNTIME)


def gateway_for(tmp_path: Path, entries: list[dict], lora: dict | None = None) -> PdgateProcess:
    model: dict[str, Any] = {"name": MODEL, "max_model_len": 4096}
    if lora is not None:
        model["lora"] = lora
    return start_gateway(write_config(tmp_path / "gateway.yaml", entries, models=[model]))


def gateway_adapters(gateway: PdgateProcess) -> dict[str, dict]:
    return {m["id"]: m for m in get_json(f"{gateway.url}/v1/models")["data"]}


def test_adapters_are_listed_and_requests_land_only_where_loaded(sim_factory, tmp_path):
    sql = adapter_dir(tmp_path, "sql")
    holder = lora_engine(sim_factory, "both", f"sql={sql}")
    other = lora_engine(sim_factory, "both")
    gateway = gateway_for(tmp_path, [instance_entry(holder, "both", "sim"), instance_entry(other, "both", "sim")])
    try:
        models = get_json(f"{gateway.url}/v1/models")["data"]
        assert [m["id"] for m in models] == [MODEL, "sql"]  # each once
        card = models[1]
        assert (card["root"], card["parent"], card["owned_by"], card["object"]) == (sql, MODEL, "pdgate", "model")

        before = {p.url: successes(p) for p in (holder, other)}
        for seed in range(6):
            assert complete(gateway, "sql", prompt(seed)).model == "sql"  # the engine answers as the adapter
        chat = client(gateway).chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hello"}], max_tokens=2
        )
        assert chat.model == "sql"
        stream = client(gateway).completions.create(
            model="sql", prompt=prompt(9), max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [c for c in stream if c.choices]
        assert chunks[-1].model == "sql" and chunks[-1].choices[0].finish_reason == "length"
        assert successes(holder) - before[holder.url] == 8
        assert successes(other) == before[other.url]  # never where the adapter is not loaded

        with pytest.raises(openai.NotFoundError) as missing:
            complete(gateway, "nope", prompt(1))
        assert missing.value.code == "model_not_found"
        assert "The model `nope` does not exist." in str(missing.value)
    finally:
        gateway.stop()


def test_pd_split_runs_both_legs_where_the_adapter_is_and_loads_it_on_a_decode_instance(sim_factory, tmp_path):
    sql = adapter_dir(tmp_path, "sql")
    p_sql, p_plain = lora_engine(sim_factory, "prefill", f"sql={sql}"), lora_engine(sim_factory, "prefill")
    d_sql, d_plain = lora_engine(sim_factory, "decode", f"sql={sql}"), lora_engine(sim_factory, "decode")
    entries = [instance_entry(e, role, "sim") for e, role in ((p_sql, "prefill"), (p_plain, "prefill"))]
    entries += [instance_entry(e, "decode", "sim") for e in (d_sql, d_plain)]
    gateway = gateway_for(tmp_path, entries, lora={"load_on_demand": True})  # the path: what d_sql reports
    engines = (p_sql, p_plain, d_sql, d_plain)
    try:
        before = {e.url: successes(e) for e in engines}
        for seed in range(4):
            complete(gateway, "sql", prompt(seed))
        done = {e.url: successes(e) - before[e.url] for e in engines}
        assert (done[p_sql.url], done[d_sql.url]) == (4, 4)  # both legs of every request
        assert (done[p_plain.url], done[d_plain.url]) == (0, 0)

        # the only decode instance with the adapter drains: it is loaded on the other one
        d_plain_id = entries[3]["id"]
        assert admin(gateway.url, f"/admin/instances/{entries[2]['id']}/drain")[0] in (200, 202)
        before = {e.url: successes(e) for e in engines}
        assert complete(gateway, "sql", prompt(7)).model == "sql"
        assert served(d_plain) == {"sql": sql}
        assert successes(d_plain) - before[d_plain.url] == 1 and successes(p_sql) - before[p_sql.url] == 1
        assert metric(gateway.url, "pdgate_lora_loads_total", instance=d_plain_id, adapter="sql", outcome="loaded") == 1
        assert metric(gateway.url, "pdgate_instance_lora_adapters", instance=d_plain_id) == 1
    finally:
        gateway.stop()


def test_on_demand_loads_for_a_drained_or_absent_holder_and_a_refused_load_answers_503(sim_factory, tmp_path):
    sql, chat = adapter_dir(tmp_path, "sql"), adapter_dir(tmp_path, "chat")
    holder = lora_engine(sim_factory, "both", f"sql={sql}")
    spare = lora_engine(sim_factory, "both")  # --max-loras 2: room for two adapters
    entries = [instance_entry(holder, "both", "sim"), instance_entry(spare, "both", "sim")]
    lora = {"load_on_demand": True, "adapters": {"chat": chat, "broken": "/nonexistent/adapter"}}
    gateway = gateway_for(tmp_path, entries, lora=lora)
    spare_id = entries[1]["id"]
    try:
        assert list(gateway_adapters(gateway)) == [MODEL, "broken", "chat", "sql"]  # configured ones too
        assert admin(gateway.url, f"/admin/instances/{entries[0]['id']}/drain")[0] in (200, 202)

        assert complete(gateway, "sql", prompt(1)).model == "sql"  # its holder is drained: loaded on the spare
        assert complete(gateway, "chat", prompt(2)).model == "chat"  # no instance had it: loaded from the config
        assert served(spare) == {"sql": sql, "chat": chat}
        for name in ("sql", "chat"):
            assert metric(gateway.url, "pdgate_lora_loads_total", instance=spare_id, adapter=name) == 1

        with pytest.raises(openai.APIStatusError) as refused:  # the engine cannot find it
            complete(gateway, "broken", prompt(3))
        assert refused.value.status_code == 503 and refused.value.code == "lora_load_failed"
        assert "No adapter found" in str(refused.value)
        assert metric(gateway.url, "pdgate_lora_loads_total", adapter="broken", outcome="failed") == 1
        with pytest.raises(openai.APIStatusError) as again:  # not asked again for a while: no instance is left
            complete(gateway, "broken", prompt(3))
        assert again.value.status_code == 503 and "LoRA adapter 'broken'" in str(again.value)
        assert metric(gateway.url, "pdgate_lora_loads_total", adapter="broken") == 1
        assert complete(gateway, "sql", prompt(4)).model == "sql"  # the spare is as healthy as before
    finally:
        gateway.stop()


def _index_blocks(gateway: PdgateProcess, instance_id: str) -> tuple[str, int]:
    described = get_json(f"{gateway.url}/admin/instances/{instance_id}")["prefix_index"]
    return described["index"], described["blocks"]


def test_prefix_hits_equal_the_engines_own_counters_under_sha256_and_sha256_cbor(sim_factory, tmp_path):
    """Each instance's exact index (its KV events) counts the hits its engine counts, request by
    request: an adapter request never hits the base model's blocks, nor a salted one the unsalted."""
    sql = adapter_dir(tmp_path, "sql")
    plain = lora_engine(sim_factory, "both", f"sql={sql}", kv=True)
    cbor = lora_engine(sim_factory, "both", f"sql={sql}", kv=True, extra=("--prefix-caching-hash-algo", "sha256_cbor"))
    entries = [instance_entry(plain, "both", "sim"), instance_entry(cbor, "both", "sim")]  # algorithm as reported
    gateway = gateway_for(tmp_path, entries)
    sequence = [  # (model, salt, expected hit tokens)
        (MODEL, None, 0),
        ("sql", None, 0),  # the base model's blocks are no use to the adapter
        ("sql", None, 3 * BLOCK),
        ("sql", "t1", 0),
        ("sql", "t1", 3 * BLOCK),
        (MODEL, None, 3 * BLOCK),
    ]
    try:
        for n, (engine, entry, other) in enumerate(((plain, entries[0], entries[1]), (cbor, entries[1], entries[0]))):
            wait_until(lambda e=entry: _index_blocks(gateway, e["id"])[0] == "exact", message="an exact index")
            assert admin(gateway.url, f"/admin/instances/{other['id']}/drain")[0] in (200, 202)
            assert admin(gateway.url, f"/admin/instances/{entry['id']}/undrain")[0] == 200
            tokens = prompt(20 + n)
            for model, salt, expected in sequence:
                _, blocks = _index_blocks(gateway, entry["id"])
                engine_hits = metric(engine.url, "vllm:prefix_cache_hits_total")
                counted = metric(gateway.url, "pdgate_prefix_cache_hit_tokens_total", instance=entry["id"])
                reply = complete(gateway, model, tokens, **({"cache_salt": salt} if salt else {}))
                cached = (
                    (reply.usage.prompt_tokens_details.cached_tokens or 0) if reply.usage.prompt_tokens_details else 0
                )
                engine_now = metric(engine.url, "vllm:prefix_cache_hits_total")
                gateway_now = metric(gateway.url, "pdgate_prefix_cache_hit_tokens_total", instance=entry["id"])
                assert (engine_now - engine_hits, gateway_now - counted, cached) == (expected,) * 3, (model, salt)
                if not expected:  # new blocks: wait until the engine's events reached the gateway
                    wait_until(
                        lambda e=entry, b=blocks: _index_blocks(gateway, e["id"])[1] == b + 3,
                        message=f"3 new blocks of {entry['id']} in the exact index",
                    )
    finally:
        gateway.stop()


# --------------------------------------------------------------------------------------- in-process


def _view(instance_id: str, **fields: Any) -> InstanceView:
    return InstanceView(instance_id, f"http://{instance_id}", fields.pop("role", "both"), MODEL, **fields)


def _request(lora: LoraTarget | None, **fields: Any) -> RequestInfo:
    return RequestInfo("r", MODEL, 64, 16, lora=lora, **fields)


@pytest.mark.unit
def test_the_filter_keeps_holders_then_instances_that_can_load_it():
    flt = LoraAffinityFilter("lora", LoraAffinityParams())
    holder = _view("a", loras=frozenset({"sql"}), lora_room=0)
    spare = _view("b", lora_room=1)
    full = _view("c", lora_room=0)
    fixed = _view("d")  # loads nothing at run time
    failed = _view("e", lora_room=2, lora_failed=frozenset({"sql"}))
    everyone = [holder, spare, full, fixed, failed]
    snapshot = ClusterSnapshot(tuple(everyone))
    assert flt.filter(_request(None), snapshot, everyone) == everyone  # no adapter: untouched
    assert flt.filter(_request(LoraTarget("sql")), snapshot, everyone) == [holder]
    assert flt.filter(_request(LoraTarget("sql", loadable=True)), snapshot, everyone) == [holder]
    assert flt.filter(_request(LoraTarget("sql", loadable=True)), snapshot, everyone[1:]) == [spare]
    assert flt.filter(_request(LoraTarget("sql", loadable=True)), snapshot, [full, fixed, failed]) == [full]
    assert flt.filter(_request(LoraTarget("sql")), snapshot, everyone[1:]) == []


@pytest.mark.unit
def test_overloaded_holders_spill_to_an_instance_with_room():
    flt = LoraAffinityFilter("lora", LoraAffinityParams(spill_queue_depth=8))
    busy = _view("a", loras=frozenset({"sql"}), running=8, waiting=4)
    idle = _view("b", lora_room=1, running=1)
    snapshot = ClusterSnapshot((busy, idle))
    target = LoraTarget("sql", loadable=True)
    assert flt.filter(_request(target), snapshot, [busy, idle]) == [idle]  # no cost model: by queue depth
    calm = _view("a", loras=frozenset({"sql"}), running=3)
    assert flt.filter(_request(target), ClusterSnapshot((calm, idle)), [calm, idle]) == [calm]
    # with a cost model and a TTFT SLO: the holder's queue misses it, the idle one meets it even with the load
    costs = CostModel(LatencyModel.from_priors({"g": PriorSpec()}), None)  # type: ignore[arg-type]
    slow = _view("a", loras=frozenset({"sql"}), prefill_wait_s=5.0, cost_group="g")
    fast = _view("b", lora_room=1, cost_group="g")
    costed = ClusterSnapshot((slow, fast), costs=costs)
    assert flt.filter(_request(target, slo=SloTarget(ttft_s=2.0)), costed, [slow, fast]) == [fast]
    assert flt.filter(_request(target, slo=SloTarget(ttft_s=10.0)), costed, [slow, fast]) == [slow]


@pytest.mark.unit
def test_a_prompt_is_hashed_once_per_scheme_and_keyed_per_instance(caplog, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)  # vLLM's default seed rule
    config = GatewayConfig.model_validate(
        {
            "models": [{"name": MODEL}],
            "instances": [
                {
                    "id": "a",
                    "url": "http://127.0.0.1:1",
                    "kind": "sim",
                    "model": MODEL,
                    "kv_events": {"endpoint": "tcp://*:5"},
                },
                {
                    "id": "b",
                    "url": "http://127.0.0.1:2",
                    "kind": "sim",
                    "model": MODEL,
                    "kv_events": {"endpoint": "tcp://*:6"},
                },
                {
                    "id": "c",
                    "url": "http://127.0.0.1:3",
                    "kind": "sim",
                    "model": MODEL,
                    "prefix_caching_hash_algo": "sha256_cbor",
                    "kv_events": {"endpoint": "tcp://*:7"},
                },
            ],
        }
    )
    cluster = Cluster(config, UpstreamPool())  # nothing is sent
    a, b, c = (cluster.instances[i] for i in "abc")
    assert a.scheme is b.scheme and a.exact and c.exact and c.scheme.algo == "sha256_cbor"
    tokens = prompt(1)
    hashes = cluster.prompt_hashes(MODEL, tokens)
    assert len(hashes.chains) == 2  # a and b share one pass
    assert hashes.chain(a.scheme) == [to_event_hash(h) for h in block_hashes(tokens, 16)]
    assert hashes.chain(c.scheme) == [to_event_hash(h) for h in block_hashes(tokens, 16, algo="sha256_cbor")]

    a.lora.listing([AdapterCard("sql", "/a/sql", MODEL)], 0.0, "a")
    c.lora.listing([AdapterCard("sql", "/c/sql", MODEL)], 0.0, "c")
    keyed = cluster.prompt_hashes(MODEL, tokens, lora="sql", cache_salt="s")
    assert cluster.scheme_for(b, keyed) is None  # b does not serve it: nothing of it is cached there
    assert keyed.chain(cluster.scheme_for(a, keyed)) == [  # type: ignore[arg-type]
        to_event_hash(h) for h in block_hashes(tokens, 16, lora=LoraAdapter("sql", "/a/sql"), cache_salt="s")
    ]
    expected_c = block_hashes(tokens, 16, algo="sha256_cbor", lora=LoraAdapter("sql", "/c/sql"), cache_salt="s")
    assert keyed.chain(cluster.scheme_for(c, keyed)) == [to_event_hash(h) for h in expected_c]  # type: ignore[arg-type]
    assert cluster.loras.base_of("sql") == MODEL and cluster.loras.base_of(MODEL) is None
    assert cluster.loras.path_of(MODEL, "sql") == "/a/sql" and not cluster.loras.loadable(MODEL, "sql")

    # an xxhash engine without a known seed: its prefix hits come from the approximate index, said once
    with caplog.at_level(logging.WARNING, logger="pdgate.cluster"):
        cluster._assign_scheme(b, "xxhash")
        cluster._assign_scheme(b, "xxhash")
    assert not b.exact and b.scheme == HashScheme(16)
    assert len([r for r in caplog.records if "approximate index" in r.message]) == 1
    assert "PYTHONHASHSEED" in caplog.records[0].message


@pytest.mark.unit
def test_hash_schemes_follow_vllms_seed_rule(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert engine_scheme(16, None, None)[0] == HashScheme(16)
    assert engine_scheme(32, None, None, "sha256_cbor")[0] == HashScheme(32, "sha256_cbor")
    assert engine_scheme(16, "sha256", None, "sha256_cbor")[0] == HashScheme(16)  # configured wins
    assert engine_scheme(16, None, None, "md5")[0] is None
    scheme, why = engine_scheme(16, "xxhash", None)
    assert scheme is None and "PYTHONHASHSEED" in why
    monkeypatch.setenv("PYTHONHASHSEED", "3")
    assert engine_scheme(16, None, None)[0] == HashScheme(16, seed="3")
    assert engine_scheme(16, None, "7")[0] == HashScheme(16, seed="7")
    hashes = PromptHashes.of(prompt(2), [HashScheme(16), HashScheme(16)])
    assert len(hashes.chains) == 1 and hashes.first_chain() == hashes.chain(HashScheme(16))


@pytest.mark.unit
def test_engine_answers_to_loads_and_listings():
    assert adapter_cards(
        {"data": [{"id": MODEL, "root": "/m", "parent": None}, {"id": "a", "root": "/a", "parent": MODEL}]}
    ) == [AdapterCard("a", "/a", MODEL)]
    with pytest.raises(ValueError):
        adapter_cards({"object": "error"})
    load_outcome(200, b"Success", "a")
    already = {"error": {"message": "The lora adapter 'a' has already been loaded. ...", "type": "InvalidUserInput"}}
    load_outcome(400, json.dumps(already).encode(), "a")  # already there: loaded
    cases = [
        (404, {"detail": "Not Found"}, True),  # no runtime loading route
        (500, {"error": {"message": "LoRA is not enabled. Use --enable-lora to enable LoRA."}}, True),
        (404, {"error": {"message": "Loading lora a failed: No adapter found for /x"}}, False),
    ]
    for status, body, engine_wide in cases:
        with pytest.raises(LoraLoadError) as err:
            load_outcome(status, json.dumps(body).encode(), "a")
        assert (err.value.status, err.value.engine_wide) == (status, engine_wide)


@pytest.mark.unit
def test_instance_room_follows_the_engines_memory_and_refusals():
    loras = InstanceLoras(can_load=True)
    assert loras.room(0.0) == 1  # vLLM's default --max-loras (and so --max-cpu-loras): 1
    loras.reported_max = 3
    loras.listing([AdapterCard("a", "/a", MODEL)], 0.0, "x")
    assert loras.room(0.0) == 2
    loras.load_failed("b", LoraLoadError("no", status=404), 10.0)
    assert loras.failed_names(5.0) == {"b"} and not loras.failed_names(11.0)
    loras.load_failed("c", LoraLoadError("off", status=404, engine_wide=True), 10.0)
    assert loras.room(5.0) is None and loras.room(10.0) == 2
    # what snapshots read is kept current: refused now, and again after the refusal runs out
    assert (loras.room_now, loras.failed_now, loras.expires_at) == (None, {"b"}, 10.0)
    loras.expire(10.0)
    assert (loras.room_now, loras.failed_now, loras.expires_at) == (2, frozenset(), float("inf"))
    loras.added("d", "/d", 20.0)
    loras.listing([AdapterCard("a", "/a", MODEL)], 19.0, "x")  # asked before the load: keeps it
    assert loras.names == {"a", "d"}
    loras.listing([AdapterCard("a", "/a", MODEL)], 21.0, "x")
    assert loras.names == {"a"}
    assert InstanceLoras(can_load=False).room(0.0) is None


@pytest.mark.unit
def test_the_engines_report_of_its_hash_algorithm_and_lora_slots_is_read_from_its_metrics():
    text = "\n".join(
        [
            'vllm:num_requests_running{engine="0",model_name="m"} 1.0',
            'vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",'
            'prefix_caching_hash_algo="sha256_cbor",note="a \\"quoted\\", value"} 1.0',
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e+09',
        ]
    )
    load = parse_load(text, "vllm", 1.0)
    assert (load.running, load.hash_algo, load.max_loras) == (1, "sha256_cbor", 4)
    assert (parse_load("", "vllm", 1.0).hash_algo, parse_load("", "vllm", 1.0).max_loras) == (None, None)
    assert "vllm%3Acache_config_info" in scrape_path("vllm") and "lora_requests_info" in scrape_path("vllm")
    assert "cache_config_info" not in scrape_path("sglang")


@pytest.mark.unit
def test_the_request_span_names_the_adapter():
    info = RequestInfo("r", MODEL, 8, 4, lora=LoraTarget("sql"))
    routed = Routed("completion", "/v1/completions", {}, info, [1] * 8, PromptHashes([1] * 8, "sql"), False)
    assert request_attributes(routed)["pdgate.lora.adapter"] == "sql"
    base = Routed(
        "completion", "/v1/completions", {}, RequestInfo("r", MODEL, 8, 4), [1] * 8, PromptHashes([1] * 8), False
    )
    assert request_attributes(base)["pdgate.lora.adapter"] is None
