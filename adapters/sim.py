"""The embedded simulated engine: vLLM's or SGLang's protocol, plus simulator capabilities."""

from __future__ import annotations

from adapters.base import Capabilities
from adapters.sglang import SglangAdapter
from adapters.vllm import VllmAdapter


class SimVllmAdapter(VllmAdapter):
    """The embedded simulated engine speaking vLLM's API."""

    capabilities = Capabilities(pd_protocol="sequential", metrics_flavour="vllm", kv_events=True, live_migration=True)


class SimSglangAdapter(SglangAdapter):
    """The embedded simulated engine speaking SGLang's API."""

    capabilities = Capabilities(pd_protocol="concurrent", metrics_flavour="sglang", live_migration=True)
