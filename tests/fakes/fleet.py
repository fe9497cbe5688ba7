"""A real :class:`~pdgate.gateway.cluster.Cluster` (and :class:`~pdgate.gateway.proxy.Proxy`) over fake engines.

The cluster is built from a real :class:`GatewayConfig` the way the gateway builds it. Its
constructor makes each instance's adapter from an upstream pool; here a fresh one, never
used: every instance's adapter is then
replaced by a :class:`FakeEngineAdapter` with the same spec, before anything reads it. The
cluster is never started (no monitor task, no scrapes, no KV-event subscriptions) and its clock
is a :class:`FakeClock`.

Placement runs the real profile handler (``pd-split``) and real filters and picker; one scorer is
the test's own plugin, :class:`PreferOrder`, so that which instance a profile picks first is
known (the order the instances are declared in, unless given).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from fakes.clock import FakeClock
from fakes.engine import FakeEngineAdapter, FakeModel, SentCall
from pdgate.adapters import UpstreamPool
from pdgate.adapters.base import PdProtocol
from pdgate.common.http_server import HttpRequest
from pdgate.common.tokenizer import load_tokenizer
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.instance_state import InstanceState
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.proxy import Proxy
from pdgate.scheduler.framework import MigrationPolicy, PluginParams, Profile, ProfileHandler, Scorer
from pdgate.scheduler.registry import HandlerSpec, PluginRegistry
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo

MODEL = "m"


class PreferOrderParams(PluginParams):
    order: list[str] = Field(default_factory=list)


class PreferOrder(Scorer):
    """Scores instances by a fixed order of ids (first best); ids not listed score 0."""

    type_name = "test-prefer-order"
    Params = PreferOrderParams

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        order: list[str] = self.params.order  # type: ignore[attr-defined]
        n = len(order)
        return {c.id: (1.0 - order.index(c.id) / n) if c.id in order else 0.0 for c in candidates}


def registry() -> PluginRegistry:
    """The in-tree plugins (no entry points) plus :class:`PreferOrder`."""
    reg = PluginRegistry(load_entry_points=False)
    reg.register(PreferOrder)
    return reg


def scheduling(order: Sequence[str]) -> dict[str, Any]:
    prefer = [{"pluginRef": "prefer", "weight": 1.0}, {"pluginRef": "pick"}]
    return {
        "plugins": [
            {"name": "healthy", "type": "health-filter"},
            {"name": "prefill-role", "type": "role-filter", "parameters": {"role": "prefill"}},
            {"name": "decode-role", "type": "role-filter", "parameters": {"role": "decode"}},
            {"name": "colocated-role", "type": "role-filter", "parameters": {"role": "both"}},
            {"name": "prefer", "type": "test-prefer-order", "parameters": {"order": list(order)}},
            {"name": "pick", "type": "max-score"},
        ],
        "profiles": {
            "prefill": [{"pluginRef": "healthy"}, {"pluginRef": "prefill-role"}, *prefer],
            "decode": [{"pluginRef": "healthy"}, {"pluginRef": "decode-role"}, *prefer],
            "colocated": [{"pluginRef": "healthy"}, {"pluginRef": "colocated-role"}, *prefer],
        },
    }


@dataclass(frozen=True)
class Inst:
    """One instance of a test fleet."""

    id: str
    role: str = "both"  # prefill | decode | both
    protocol: PdProtocol = "sequential"
    live_migration: bool = False
    prefix_hit: int | None = None  # the prefix-cache hit its engine reports


@dataclass
class Fleet:
    config: GatewayConfig
    cluster: Cluster
    clock: FakeClock
    adapters: dict[str, FakeEngineAdapter]
    log: list[SentCall] = field(default_factory=list)  # every leg sent, in order, across instances
    order: list[str] = field(default_factory=list)

    def __getitem__(self, instance_id: str) -> FakeEngineAdapter:
        return self.adapters[instance_id]

    def state(self, instance_id: str) -> InstanceState:
        return self.cluster.instances[instance_id]

    def profiles(self) -> tuple[dict[str, Profile], ProfileHandler]:
        reg = registry()
        profiles = reg.build(scheduling(self.order))
        return profiles, reg.create_profile_handler(HandlerSpec(), profiles)

    def proxy(self, *, migration_policy: MigrationPolicy | None = None) -> Proxy:
        """The gateway's request path over this fleet, assembled as the gateway does (no admission,
        no cost model, no tracing)."""
        profiles, handler = self.profiles()
        tokenizers = {MODEL: load_tokenizer("builtin")}
        return Proxy(
            self.config,
            self.cluster,
            profiles,
            handler,
            tokenizers,
            GatewayMetrics(),
            migration_policy=migration_policy,
        )

    def leftovers(self) -> dict[str, dict[str, Any]]:
        """In-flight accounting still held per instance (empty: every lease was released)."""
        out = {}
        for iid, s in self.cluster.instances.items():
            held = {
                "requests": s.inflight_requests,
                "prefill_tokens": s.inflight_prefill_tokens,
                "decode_tokens": s.inflight_decode_tokens,
                "decode_batch": s.decode_inflight,
                "context_tokens": s.decode_context_tokens,
                "prefill_queue": len(s.prefill_work),
                "tpot_slos": sum(s.tpot_slos.values()),
            }
            held = {k: v for k, v in held.items() if v}
            if held:
                out[iid] = held
        return out

    def assert_idle(self) -> None:
        assert self.leftovers() == {}, f"leases left held: {self.leftovers()}"


def make_fleet(
    *instances: Inst,
    retries: int = 1,
    migration: Mapping[str, Any] | None = None,
    order: Collection[str] | None = None,
    clock: FakeClock | None = None,
) -> Fleet:
    """A cluster of fake engines serving model ``m`` (see the module doc)."""
    clock = clock or FakeClock()
    config = GatewayConfig.model_validate(
        {
            "models": [{"name": MODEL, "max_model_len": 4096}],
            "instances": [
                {
                    "id": inst.id,
                    "url": f"http://127.0.0.1:{8100 + n}",
                    "kind": "sim-sglang" if inst.protocol == "concurrent" else "sim",
                    "role": inst.role,
                    "model": MODEL,
                    "bootstrap_port": 9100 + n if inst.role == "prefill" and inst.protocol == "concurrent" else None,
                }
                for n, inst in enumerate(instances)
            ],
            "retries": retries,
            "upstream_timeout_s": 30.0,
            "migration": dict(migration or {}),
        }
    )
    cluster = Cluster(config, UpstreamPool(), clock=clock)
    fleet = Fleet(config, cluster, clock, {}, order=list(order) if order is not None else [i.id for i in instances])
    for inst in instances:
        state = cluster.instances[inst.id]
        adapter = FakeEngineAdapter(
            state.spec,
            protocol=inst.protocol,
            live_migration=inst.live_migration,
            model=FakeModel(inst.id, role=inst.role, prefix_hit=inst.prefix_hit),
            log=fleet.log,
        )
        state.adapter = adapter
        fleet.adapters[inst.id] = adapter
    return fleet


def completion_request(
    *,
    prompt: list[int] | None = None,
    max_tokens: int = 4,
    stream: bool = True,
    include_usage: bool = True,
    request_id: str | None = None,
    **fields: Any,
) -> HttpRequest:
    """A client's ``POST /v1/completions`` as the HTTP server hands it to the gateway."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt if prompt is not None else list(range(1, 33)),
        "max_tokens": max_tokens,
        "stream": stream,
        **fields,
    }
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"content-type": "application/json"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return HttpRequest("POST", "/v1/completions", "", headers, json.dumps(body).encode(), True)
