"""Real vLLM CPU engines for the tests (tests/test_vllm_e2e.py): started with ``pdgate engine vllm`` as
separate process groups, waited for, read through their Prometheus metrics, and stopped; plus the
client calls, gateway configuration and admin calls the tests make against them.

Every engine serves the tiny model of the vLLM environment (``pdgate engine vllm-setup``) as
:data:`MODEL` with vLLM's CPU block size, greedy and deterministic: the same prompt gives the same
token ids on any engine, which is what the tests compare.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from pdgate.engines.launch.vllm_cpu.install import tiny_model_dir, vllm_home
from pdgate.gateway.config import GatewayConfig
from support.ports import reserve_port
from support.vllm import stop_process_group
from support.waiting import wait_until

MODEL = "tiny"
BLOCK = 128  # vLLM's CPU block size
START_TIMEOUT_S = 300.0
HOME = vllm_home()

WORDS = (
    "the cache block token prefill decode request router server engine model prompt stream latency memory "
    "queue worker batch tensor layer hidden vector score policy route load balance python rust kernel thread "
    "socket metric event hash prefix transfer remote local greedy alpha beta gamma delta river mountain"
).split()


def prompt_text(seed: int, words: int) -> str:
    """A deterministic prompt of ``words`` words; the same seed with fewer words is its prefix."""
    return " ".join(WORDS[(seed * 7 + i * i * 3 + i) % len(WORDS)] for i in range(words))


@dataclass
class Engine:
    """One running vLLM server: its HTTP port, process (group leader) and log file."""

    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return {
            (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples carrying ``labels`` (0 when none)."""
        want = tuple(sorted(labels.items()))
        return sum(v for (n, lab), v in self.metrics().items() if n == name and all(p in lab for p in want))

    def stop(self) -> None:
        stop_process_group(self.proc)


def start_engine(
    name: str, role: str, core: str, tmp: Path, *, kv_ports: tuple[int, int] | None = None, otlp: str | None = None
) -> Engine:
    """Start ``pdgate engine vllm --role ROLE`` pinned to ``core``, logging to ``tmp/NAME.log``.

    ``kv_ports``: the (events, replay) ports a gateway binds for this engine's KV events; ``otlp``: a
    collector for its request spans. Every role but ``both`` gets its own NIXL side-channel port.
    """
    port = reserve_port()  # vLLM takes no port 0: chosen outside the ephemeral range (support.ports)
    args = [
        sys.executable,
        "-m",
        "pdgate.cli",
        "engine",
        "vllm",
        "--role",
        role,
        "--model",
        str(tiny_model_dir(HOME)),
        "--served-model-name",
        MODEL,
        "--port",
        str(port),
        "--cpu-cores",
        core,
        "--max-model-len",
        "1024",
        "--python",
        str(HOME / "venv" / "bin" / "python"),
        "--extra-args=--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens, as fleets report
    ]
    if role != "both":
        args += ["--side-channel-port", str(reserve_port())]
    if kv_ports is not None:
        args += [
            "--kv-events-endpoint",
            f"tcp://127.0.0.1:{kv_ports[0]}",
            "--kv-events-replay-endpoint",
            f"tcp://127.0.0.1:{kv_ports[1]}",
        ]
    env = dict(os.environ)
    if otlp is not None:
        args += ["--otlp-traces-endpoint", otlp]
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export spans within 0.2 s (default 5 s)
    log = tmp / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return Engine(name, port, proc, log)


def wait_healthy(engines: list[Engine]) -> None:
    """Wait until every engine answers ``/health``; an engine that exits first fails with its log's tail."""
    pending = list(engines)

    def all_healthy() -> bool:
        for engine in list(pending):
            if engine.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM {engine.name} exited ({engine.proc.returncode}):\n{engine.log.read_text()[-3000:]}"
                )
            try:
                if urllib.request.urlopen(f"{engine.url}/health", timeout=2).status == 200:
                    pending.remove(engine)
            except OSError:
                pass
        return not pending

    wait_until(all_healthy, START_TIMEOUT_S, interval=0.5, message=lambda: f"vLLM {[e.name for e in pending]} healthy")


def gateway_config(instances: list[dict[str, Any]], **extra: Any) -> GatewayConfig:
    """An in-process gateway on a free port for :data:`MODEL` in front of ``instances``, quick to notice
    load and health changes."""
    return GatewayConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": 0,
            "scrape_interval_s": 0.25,
            "health": {"interval_s": 0.25, "timeout_s": 2.0, "failure_threshold": 1, "cooldown_s": 60},
            "models": [{"name": MODEL, "tokenizer": str(tiny_model_dir(HOME)), "max_model_len": 1024}],
            "instances": instances,
            **extra,
        }
    )


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


async def complete(url: str, prompt: str, max_tokens: int, **extra: Any) -> Any:
    """A greedy completion of exactly ``max_tokens`` tokens, with the prompt's and the output's token ids."""
    return await client(url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra},
    )


async def admin(url: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    """POST ``body`` to a gateway admin endpoint: the status and the JSON answer, errors included."""

    def call() -> tuple[int, Any]:
        req = urllib.request.Request(
            f"{url}{path}",
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    return await asyncio.to_thread(call)


async def stream_with(
    url: str, prompt: str, max_tokens: int, request_id: str, at: int, action: Callable[[], Awaitable[None]] | None
) -> tuple[list[int], Any, set[str]]:
    """A greedy streamed completion whose token ids are collected; ``action`` runs after ``at`` tokens.

    Returns the token ids, the final usage and the set of chunk ids (one id: one response to the client).
    """
    stream = await client(url).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
        extra_headers={"X-Request-Id": request_id},
    )
    ids: list[int] = []
    usage, chunk_ids = None, set()
    async for chunk in stream:
        chunk_ids.add(chunk.id)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            ids += list(getattr(choice, "token_ids", None) or [])
        if action is not None and len(ids) >= at:
            await action()
            action = None
    return ids, usage, chunk_ids


async def gateway_metrics(url: str) -> str:
    """The gateway's ``/metrics`` text."""
    return await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode())


def counter_total(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` of a ``/metrics`` text summed over the samples carrying ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def migration_count(text: str, **labels: str) -> float:
    """``pdgate_migrations_total`` summed over the samples carrying ``labels``."""
    return counter_total(text, "pdgate_migrations_total", **labels)
