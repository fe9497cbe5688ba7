"""Real vLLM (the CPU build) with LoRA adapters and ``--prefix-caching-hash-algo sha256_cbor``: the block
hashes it publishes in its KV events are :mod:`pdgate.common.block_hash`'s, adapter and cache_salt included.

One engine (``pdgate engine vllm`` with ``--enable-lora --lora-modules a1=PATH``, runtime loading allowed):
two tiny PEFT adapters for the tiny Llama are written by the vLLM environment's own torch/safetensors;
a base-model request, an adapter request, a salted adapter request and one for an adapter loaded at
runtime each publish one ``BlockStored`` whose hashes, ``lora_id``, ``lora_name`` and ``extra_keys``
are checked. Then the gateway, in-process in front of the same engine, hashes adapter requests as
the engine does (its algorithm read from the engine's ``vllm:cache_config_info``, the adapter's path
from its ``/v1/models``): the prefix hits its exact index counts for each request equal vLLM's own
``vllm:prefix_cache_hits`` counter, also for an adapter the gateway loads on demand. Needs
``pdgate engine vllm-setup`` (skips otherwise; fails with ``CI=true``), as tests/test_vllm_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import openai
import pytest
import zmq
from support.fleet import call
from support.ports import reserve_port, retry_on_port_clash
from support.vllm import require_vllm, stop_process_group
from support.vllm_engines import counter_total
from support.waiting import wait_until, wait_until_async

from pdgate.common.block_hash import LoraAdapter, block_hashes, to_event_hash
from pdgate.engines.launch.vllm_cpu.install import is_installed, tiny_model_dir, venv_python, vllm_home
from pdgate.gateway.app import build_gateway
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.server import GatewayServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

HOME = vllm_home()
ENGINE_TIMEOUT_S = 60.0  # one call to the real engine (CPU): an adapter load, a completion
MODEL = "tiny"
BLOCK = 32  # a multiple of 32 on CPU
ALGO = "sha256_cbor"
START_TIMEOUT_S = 300.0
PROMPT = list(range(10, 80))  # token ids: two full blocks and a partial one

# a PEFT LoRA for the tiny Llama (hidden 128, 4 heads of 32, 2 KV heads, 2 layers) on q_proj and v_proj
MAKE_ADAPTER = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
r = 8
for out, seed in zip(sys.argv[1::2], sys.argv[2::2]):  # (folder, seed) pairs: one interpreter for all
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(seed))
    tensors = {}
    for layer in range(2):
        for module, rows in (("q_proj", 128), ("v_proj", 64)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[p + ".lora_A.weight"] = (torch.randn(r, 128, generator=g) * 0.01).to(torch.bfloat16)
            tensors[p + ".lora_B.weight"] = (torch.randn(rows, r, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": "tiny", "modules_to_save": None, "inference_mode": True,
    }))
"""


@dataclass
class Engine:
    port: int
    events_port: int
    proc: subprocess.Popen
    log: Path
    adapters: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process_group(self.proc)


def _start(tmp: Path, adapters: dict[str, str]) -> Engine:
    port, events_port = reserve_port(), reserve_port()
    extra = f"--enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules a1={adapters['a1']} "
    extra += f"--prefix-caching-hash-algo {ALGO}"
    args = [
        sys.executable,
        "-m",
        "pdgate.cli",
        "engine",
        "vllm",
        "--model",
        str(tiny_model_dir(HOME)),
        "--served-model-name",
        MODEL,
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--block-size",
        str(BLOCK),
        "--kv-events-endpoint",
        f"tcp://*:{events_port}",  # the engine binds, the test connects
        "--python",
        str(venv_python(HOME)),
        f"--extra-args={extra}",
    ]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    env.pop("PYTHONHASHSEED", None)  # sha256_cbor's fixed seed
    log = tmp / "vllm.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    engine = Engine(port, events_port, proc, log, adapters)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"{engine.url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, START_TIMEOUT_S, interval=0.5, message="vLLM with LoRA healthy")
    except BaseException:
        engine.stop()
        raise
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    require_vllm(HOME, is_installed(HOME))
    tmp = tmp_path_factory.mktemp("vllm-lora")
    adapters = {name: str(tmp / name) for name in ("a1", "a2")}
    pairs = [arg for seed, name in enumerate(adapters, start=1) for arg in (adapters[name], str(seed))]
    subprocess.run([str(venv_python(HOME)), "-c", MAKE_ADAPTER, *pairs], check=True)
    started = retry_on_port_clash(lambda: _start(tmp, adapters))
    try:
        yield started
    finally:
        started.stop()


def test_block_hashes_in_kv_events_are_ours_with_adapter_and_salt(engine: Engine) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{engine.events_port}")

    def receive(quiet_s: float) -> list[dict]:
        events: list[dict] = []
        while sub.poll(int(quiet_s * 1000)):
            _, _, payload = sub.recv_multipart()
            events += [e for e in msgpack.unpackb(payload, raw=False)[1] if e["type"] == "BlockStored"]
        return events

    def next_stored() -> list[dict]:
        got: list[dict] = []

        def arrived() -> bool:
            got.extend(receive(0.5))
            return bool(got)

        wait_until(arrived, timeout=30, interval=0, message="a BlockStored event")
        return got

    def complete(tokens: list[int], model: str, **extra: Any) -> None:
        body = {"model": model, "prompt": tokens, "max_tokens": 1, "temperature": 0, **extra}
        status, answer = call(f"{engine.url}/v1/completions", body, timeout=ENGINE_TIMEOUT_S)
        assert status == 200, answer

    try:
        warm = iter(range(1000))

        def live() -> bool:  # the subscription reaches the PUB asynchronously: until a batch arrives
            start = 500 + 40 * next(warm)
            complete(list(range(start, start + BLOCK)), MODEL)
            return bool(receive(1.0))

        wait_until(live, timeout=60, interval=0, message="a first KV event batch")
        receive(1.0)

        status, loaded = call(
            f"{engine.url}/v1/load_lora_adapter",
            {"lora_name": "a2", "lora_path": engine.adapters["a2"]},
            timeout=ENGINE_TIMEOUT_S,
        )
        assert (status, loaded) == (200, "Success: LoRA adapter 'a2' added successfully.")
        cards = {m["id"]: m for m in call(f"{engine.url}/v1/models", timeout=ENGINE_TIMEOUT_S)[1]["data"]}
        assert (cards["a1"]["root"], cards["a1"]["parent"]) == (engine.adapters["a1"], MODEL)

        cases = [(MODEL, None, None), ("a1", None, 1), ("a1", "s1", 1), (MODEL, "s1", None), ("a2", None, 2)]
        for model, salt, lora_id in cases:
            complete(PROMPT, model, **({"cache_salt": salt} if salt else {}))
            (event,) = next_stored()
            lora = None if lora_id is None else LoraAdapter(model, engine.adapters[model])
            expected = block_hashes(PROMPT, BLOCK, algo=ALGO, lora=lora, cache_salt=salt)
            assert event["block_hashes"] == [to_event_hash(h) for h in expected], (model, salt)
            assert (event["lora_id"], event["lora_name"]) == (lora_id, None if lora is None else model)
            first = [x for x in (None if lora is None else model, salt) if x] or None
            assert event["extra_keys"] == [first, None if lora is None else [model]]
    finally:
        ctx.destroy(linger=0)
    metrics = urllib.request.urlopen(f"{engine.url}/metrics", timeout=10).read().decode()
    assert f'prefix_caching_hash_algo="{ALGO}"' in metrics  # the engine reports its algorithm


def metric(url: str, name: str, **labels: str) -> float:
    """A metric of the engine (another process: a blocking call is fine)."""
    return counter_total(urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode(), name, **labels)


async def fetch(url: str) -> str:
    """A GET of the in-process gateway (on this event loop: never a blocking call)."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, resp.status
        return await resp.text()


async def test_gateway_prefix_hits_for_adapter_requests_equal_vllms_counters(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request by request, the hit tokens the gateway's exact index expected equal the hits vLLM
    counted: the base model's blocks are no use to an adapter, nor an unsalted one to a salted
    request; an adapter the gateway loaded itself (``late``, from the config's path) hashes right too."""
    monkeypatch.delenv(
        "PYTHONHASHSEED", raising=False
    )  # as the engine runs (the gateway would take it for the engine's)
    config = GatewayConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": 0,
            "scrape_interval_s": 0.25,
            "health": {"interval_s": 0.25, "timeout_s": 5.0, "failure_threshold": 3, "cooldown_s": 60},
            "models": [
                {
                    "name": MODEL,
                    "tokenizer": str(tiny_model_dir(HOME)),
                    "max_model_len": 1024,
                    "lora": {"load_on_demand": True, "adapters": {"late": engine.adapters["a2"]}},
                }
            ],
            "instances": [
                {
                    "id": "vllm",
                    "url": engine.url,
                    "kind": "vllm",
                    "role": "both",
                    "model": MODEL,
                    "block_size": BLOCK,
                    "kv_events": {"endpoint": f"tcp://*:{engine.events_port}"},  # its algorithm: as it reports
                }
            ],
        }
    )
    server = GatewayServer(build_gateway(config))
    await server.start()
    try:
        cluster = server.gateway.cluster
        state = cluster.instances["vllm"]
        assert state.exact and state.scheme.algo == ALGO
        cards = {m["id"]: m for m in json.loads(await fetch(f"{server.url}/v1/models"))["data"]}
        assert (cards["a1"]["root"], cards["a1"]["parent"]) == (engine.adapters["a1"], MODEL)
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        tokens = list(range(300, 370))  # two full blocks and a partial one, sent by no other test
        steps = [
            (MODEL, None, 0),
            ("a1", None, 0),
            ("a1", None, 2 * BLOCK),
            ("a1", "s9", 0),
            ("a1", "s9", 2 * BLOCK),
            ("late", None, 0),  # loaded on demand before it runs
            ("late", None, 2 * BLOCK),
            (MODEL, None, 2 * BLOCK),
        ]
        for model, salt, expected in steps:
            blocks = len(cluster.exact_index.blocks("vllm"))
            engine_hits = metric(engine.url, "vllm:prefix_cache_hits_total")
            counted = counter_total(await fetch(f"{server.url}/metrics"), "pdgate_prefix_cache_hit_tokens_total")
            await client.completions.create(
                model=model,
                prompt=tokens,
                max_tokens=1,
                temperature=0,
                extra_body={"cache_salt": salt} if salt else None,
            )
            hits = metric(engine.url, "vllm:prefix_cache_hits_total") - engine_hits
            now = counter_total(await fetch(f"{server.url}/metrics"), "pdgate_prefix_cache_hit_tokens_total")
            expected_by_gateway = now - counted
            assert (hits, expected_by_gateway) == (expected, expected), (model, salt)
            if not expected:  # a new chain: its events reach the gateway's index before the next request
                await wait_until_async(
                    lambda b=blocks: len(cluster.exact_index.blocks("vllm")) >= b + 2,
                    timeout=30,
                    message=f"the blocks of {model} (salt {salt}) in the gateway's exact index",
                )
        loads = counter_total(await fetch(f"{server.url}/metrics"), "pdgate_lora_loads_total", adapter="late")
        assert loads == 1
        assert "late" in {m["id"] for m in call(f"{engine.url}/v1/models", timeout=ENGINE_TIMEOUT_S)[1]["data"]}
    finally:
        await server.stop()
