"""The client's ``usage`` through a PD hand-off: cached tokens are the prefill leg's prefix-cache hits.

The decode engine counts every prompt token whose KV it received as cached; clients and billing
read ``usage.prompt_tokens_details.cached_tokens`` as prefix-cache hits, so the gateway reports
the prefill engine's own figure, in both PD protocols, streamed and not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
from support.fleet import MODEL, engine_flags, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim

BLOCK = 16


@dataclass
class PdFleet:
    gateway: PdgateProcess
    prefill: PdgateProcess
    decode: PdgateProcess
    api: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key="unused", max_retries=0)

    def prefill_hits(self) -> float:
        """Prompt tokens the prefill engine found in its prefix cache so far (its own counter)."""
        if self.api == "vllm":
            return metric(self.prefill.url, "vllm:prefix_cache_hits_total")
        return metric(self.prefill.url, "sglang:cached_tokens_total")


@pytest.fixture(scope="module", params=[("vllm", "sim-vllm"), ("sglang", "sim-sglang")], ids=["vllm", "sglang"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdFleet]:
    api, kind = request.param
    procs: list[PdgateProcess] = []
    try:
        prefill = start_sim(*engine_flags("prefill", api))
        procs.append(prefill)
        decode = start_sim(*engine_flags("decode", api))
        procs.append(decode)
        entries = [instance_entry(prefill, "prefill", kind), instance_entry(decode, "decode", kind)]
        gateway = start_gateway(write_config(tmp_path_factory.mktemp(api) / "gateway.yaml", entries))
        procs.append(gateway)
        yield PdFleet(gateway, prefill, decode, api)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _cached(usage: object) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return (getattr(details, "cached_tokens", None) or 0) if details is not None else 0


def _prompt(tag: str) -> str:
    return f"{tag}: a prompt no engine has seen before, long enough to fill many KV blocks. " * 12


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_cached_tokens_are_the_prefill_legs_hits(fleet: PdFleet, stream: bool) -> None:
    client = fleet.client()

    def ask(prompt: str) -> tuple[int, int]:
        if stream:
            chunks = list(
                client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=4,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            usage = next(c.usage for c in chunks if c.usage is not None)
        else:
            usage = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4).usage
        assert usage is not None
        return usage.prompt_tokens, _cached(usage)

    prompt = _prompt(f"{fleet.api}-{stream}")
    before = fleet.prefill_hits()
    prompt_tokens, cached = ask(prompt)
    assert prompt_tokens > 8 * BLOCK
    assert cached == 0, "a never-seen prompt found nothing in the prefill engine's cache"
    assert fleet.prefill_hits() == before
    prompt_tokens, cached = ask(prompt)  # the prefill engine now holds the prompt's full blocks
    hits = fleet.prefill_hits() - before
    assert cached == hits > 0
    assert cached <= prompt_tokens - 1
