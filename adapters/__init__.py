"""Engine adapters by kind. ``make_adapter`` builds the right one for an instance spec."""

from __future__ import annotations

from pdgate.adapters.base import (
    Capabilities,
    EngineAdapter,
    HandoffError,
    InstanceSpec,
    LiveMigration,
    MigrationError,
)
from pdgate.adapters.sglang import SglangAdapter
from pdgate.adapters.sim import SimSglangAdapter, SimVllmAdapter
from pdgate.adapters.vllm import VllmAdapter
from pdgate.common.http_client import Upstream, UpstreamError, UpstreamPool, UpstreamReply, UpstreamResponse

__all__ = [
    "ADAPTERS",
    "Capabilities",
    "EngineAdapter",
    "HandoffError",
    "InstanceSpec",
    "LiveMigration",
    "MigrationError",
    "Upstream",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamReply",
    "UpstreamResponse",
    "make_adapter",
]

ADAPTERS: dict[str, type[EngineAdapter]] = {
    "vllm": VllmAdapter,
    "sglang": SglangAdapter,
    "sim": SimVllmAdapter,
    "sim-vllm": SimVllmAdapter,
    "sim-sglang": SimSglangAdapter,
}


def make_adapter(spec: InstanceSpec, pool: Upstream) -> EngineAdapter:
    try:
        cls = ADAPTERS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {spec.kind!r}; known: {', '.join(sorted(ADAPTERS))}") from None
    return cls(spec, pool)
