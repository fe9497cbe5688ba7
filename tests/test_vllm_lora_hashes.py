"""Real vLLM (the CPU build) with LoRA adapters and ``--prefix-caching-hash-algo sha256_cbor``: the block
hashes it publishes in its KV events are :mod:`pdgate.common.block_hash`'s, adapter and cache_salt included.

One engine (``pdgate engine vllm`` with ``--enable-lora --lora-modules a1=PATH``, runtime loading allowed):
two tiny PEFT adapters for the tiny Llama are written by the vLLM environment's own torch/safetensors;
a base-model request, an adapter request, a salted adapter request and one for an adapter loaded at
runtime each publish one ``BlockStored`` whose hashes, ``lora_id``, ``lora_name`` and ``extra_keys``
are checked. Needs ``pdgate engine vllm-setup`` (skips otherwise; fails with ``CI=true``), as
tests/test_vllm_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from support.ports import reserve_port, retry_on_port_clash
from support.waiting import wait_until

from pdgate.common.block_hash import LoraAdapter, block_hashes, to_event_hash
from pdgate.engines.launch.vllm_cpu.install import is_installed, tiny_model_dir, venv_python, vllm_home

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

HOME = vllm_home()
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
out, seed, r = Path(sys.argv[1]), int(sys.argv[2]), 8
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(seed)
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


def _require_vllm() -> None:
    if is_installed(HOME):
        return
    reason = f"no vLLM environment at {HOME} (run `pdgate engine vllm-setup`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the real-vLLM suite: {reason}")
    pytest.skip(reason)


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
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def call(url: str, body: dict | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


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
    _require_vllm()
    tmp = tmp_path_factory.mktemp("vllm-lora")
    adapters = {}
    for seed, name in enumerate(("a1", "a2"), start=1):
        adapters[name] = str(tmp / name)
        subprocess.run([str(venv_python(HOME)), "-c", MAKE_ADAPTER, adapters[name], str(seed)], check=True)
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
        status, answer = call(f"{engine.url}/v1/completions", body)
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
            f"{engine.url}/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": engine.adapters["a2"]}
        )
        assert (status, loaded) == (200, "Success: LoRA adapter 'a2' added successfully.")
        cards = {m["id"]: m for m in call(f"{engine.url}/v1/models")[1]["data"]}
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
