"""The ``instances`` entries of the gateway config: one engine each, how to reach it, and how ``pdgate up`` starts it."""

from __future__ import annotations

import os
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdgate.adapters import ADAPTERS, InstanceSpec
from pdgate.common.block_hash import NON_CRYPTO_HASH_ALGOS, XXHASH_MISSING, HashAlgo, hash_function
from pdgate.common.kv_events import engine_binds
from pdgate.scheduler.costmodel.latency import PriorSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KvEventsConfig(_Strict):
    """An engine's KV-event publisher, written exactly as the engine is given it (vLLM's and SGLang's
    ``--kv-events-config`` ``endpoint`` / ``replay_endpoint`` / ``topic``; ``pdgate up`` passes these).

    Who binds follows the engines' own rule (:func:`pdgate.common.kv_events.engine_binds`):

    * ``tcp://*:PORT`` (the default form): the engine binds PORT and every gateway replica connects
      to ``<host of the instance's url>:PORT``, so any number of replicas receive its events;
    * ``tcp://HOST:PORT``: the engine connects to HOST, where one gateway process binds PORT
      (a single gateway only: a second one cannot bind it, one on another host never hears it).

    The replay ROUTER is always bound by the engine; a wildcard host there (``*``, ``0.0.0.0``,
    ``[::]``) is reached at the instance's host too. Details: docs/gateway.md, "KV events: who binds".
    """

    endpoint: str = Field(
        description="the engine's KV-event publisher endpoint: tcp://*:PORT (the engine binds, every gateway "
        "connects to the instance's host) or tcp://GATEWAY_HOST:PORT (the engine connects, one gateway binds)"
    )
    replay_endpoint: str | None = Field(
        None, description="the engine's replay endpoint, always bound by the engine, e.g. tcp://*:PORT"
    )
    topic: str = Field("kv", description="the topic the engine publishes on")

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _reachable(cls, value: str | None) -> str | None:
        """A tcp endpoint with a fixed port, or ipc: the gateway must know where the socket is."""
        if value is None:
            return value
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("tcp", "ipc"):
            raise ValueError(f"{value!r} is not a ZMQ endpoint a gateway can reach (tcp://*:PORT or ipc://PATH)")
        if scheme == "tcp":
            _, colon, port = rest.rpartition(":")
            if not colon or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r}: give a fixed port (tcp://*:PORT), gateways must know where to connect")
        return value

    @field_validator("endpoint")
    @classmethod
    def _not_any_address(cls, value: str) -> str:
        """``tcp://0.0.0.0:P`` reads like "the engine binds", but without a ``*`` the engines connect."""
        if value.startswith("tcp://0.0.0.0:"):
            port = value.rsplit(":", 1)[1]
            raise ValueError(
                f"{value!r}: without a '*' vLLM and SGLang connect instead of binding; write tcp://*:{port} "
                "for the engine to bind (every gateway connects), or the gateway's own address for it to bind"
            )
        return value

    @property
    def engine_binds(self) -> bool:
        """Whether the engine binds its publisher (any number of gateways connect) or connects to one gateway."""
        return engine_binds(self.endpoint)


class SimLaunch(_Strict):
    """How ``pdgate up`` starts a simulated instance: extra ``pdgate engine sim`` settings."""

    profile: str | None = None
    time_scale: float | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="more engine settings, snake_case")


class VllmLaunch(_Strict):
    """How ``pdgate up`` starts a real vLLM instance (``pdgate engine vllm``; see its --help)."""

    model_path: str = Field(description="local model directory")
    side_channel_port: int | None = Field(None, description="NIXL side-channel port (prefill/decode; unique per host)")
    cpu_cores: str | None = Field(None, description="taskset core list (CPU builds)")
    device: Literal["cpu", "gpu"] = "cpu"
    python: str | None = Field(None, description="the vLLM environment's interpreter (default: from vllm-setup)")
    max_model_len: int | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="more `pdgate engine vllm` settings, snake_case")


class InstanceConfig(_Strict):
    id: str | None = Field(None, description="unique name (default: host:port)")
    url: str = Field(description="base URL of the engine, e.g. http://127.0.0.1:8101")
    kind: str = Field("vllm", description="adapter: " + ", ".join(sorted(ADAPTERS)))
    role: Literal["prefill", "decode", "both", "flex"] = Field(
        "both",
        description="prefill, decode, both (colocated), or flex: takes either leg or a whole request, "
        "and serves in the role it is given at run time (vLLM kv_both; the sim)",
    )
    serving: Literal["prefill", "decode", "both"] | None = Field(
        None, description="flex only: the role it serves in at start (default both)"
    )
    model: str
    api_key: str | None = Field(None, description="the engine's own key (sent to it, never the client's)")
    api_key_env: str | None = Field(None, description="read the engine's key from this environment variable")
    kv_events: KvEventsConfig | None = None
    bootstrap_port: int | None = Field(None, description="SGLang prefill bootstrap port")
    block_size: int = Field(16, ge=1)
    prefix_caching_hash_algo: HashAlgo | None = Field(
        None,
        description="the engine's --prefix-caching-hash-algo (none: what it reports in vllm:cache_config_info, "
        "else vLLM's default sha256); the exact prefix index hashes prompts as the engine does",
    )
    hash_seed: str | None = Field(
        None,
        description="the PYTHONHASHSEED the engine runs with (none: the gateway's own PYTHONHASHSEED when set, "
        "else vLLM's default seed; xxhash engines need it, or their prefix hits are approximate)",
    )
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="LoRA adapters the engine keeps in memory (vLLM's --max-cpu-loras); the gateway loads adapters "
        "on demand there only while fewer are registered (none: its reported --max-loras, else 1)",
    )
    cost_group: str | None = Field(
        None,
        description="instances with equal hardware, model and engine share latency models "
        "(default: kind, model, role and sim profile)",
    )
    cost_profile: str | None = Field(
        None,
        description="simulator profile whose step times are the latency prior "
        "(default: the sim launch profile, else h100-llama-3-8b)",
    )
    launch: VllmLaunch | SimLaunch | None = Field(
        None, description="for `pdgate up`: start this instance (sim or vllm)"
    )
    pod_uid: str | None = Field(
        None,
        description="set by Kubernetes discovery, never by hand: the uid of the pod this instance is; discovery "
        "drains and removes it when that pod goes, and a config reload leaves it alone",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
        except ValueError as exc:
            raise ValueError(f"is not a usable URL: {exc}") from None
        if not parts.hostname:
            raise ValueError("names no host")
        return value.rstrip("/")

    @field_validator("id")
    @classmethod
    def _id_in_a_path(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or not value.isprintable()):
            raise ValueError("must be non-empty printable text without '/' (it is a path segment of /admin)")
        return value

    @field_validator("hash_seed", mode="before")
    @classmethod
    def _seed_text(cls, value: Any) -> Any:
        """``hash_seed: 0`` in YAML is an int; the engine reads PYTHONHASHSEED as the string."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("prefix_caching_hash_algo")
    @classmethod
    def _algo_usable(cls, value: str | None) -> str | None:
        if value in NON_CRYPTO_HASH_ALGOS:
            try:
                hash_function(value)(b"")
            except ModuleNotFoundError:
                raise ValueError(XXHASH_MISSING) from None
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in ADAPTERS:
            raise ValueError(f"unknown adapter kind {value!r}; known: {', '.join(sorted(ADAPTERS))}")
        return value

    @model_validator(mode="after")
    def _flexible(self) -> InstanceConfig:
        if self.role == "flex" and not ADAPTERS[self.kind].capabilities.flexible_role:
            raise ValueError(
                f"role: kind {self.kind!r} cannot change roles while it serves (SGLang fixes the role at launch); "
                "use prefill, decode or both"
            )
        if self.serving is not None and self.role != "flex":
            raise ValueError("serving: only a flex instance has a serving role apart from its role")
        return self

    @property
    def start_role(self) -> Literal["prefill", "decode", "both"]:
        """The role the instance serves in when the gateway starts (a flex one's ``serving``)."""
        if self.role == "flex":
            return self.serving or "both"
        return self.role

    @model_validator(mode="after")
    def _launchable(self) -> InstanceConfig:
        if isinstance(self.launch, VllmLaunch) and self.kind != "vllm":
            raise ValueError(f"launch.model_path: a vLLM launch section needs kind 'vllm', not {self.kind!r}")
        if isinstance(self.launch, SimLaunch) and not self.kind.startswith("sim"):
            raise ValueError(
                f"launch: kind {self.kind!r} cannot be launched as a simulated engine "
                "(a vLLM launch section needs model_path)"
            )
        return self

    def cost_key(self) -> str:
        """The latency-model group of this instance (see ``cost_group``)."""
        if self.cost_group:
            return self.cost_group
        profile = (
            self.cost_profile or (self.launch.profile if isinstance(self.launch, SimLaunch) else None) or "default"
        )
        scale = self.launch.time_scale if isinstance(self.launch, SimLaunch) and self.launch.time_scale else None
        return f"{self.kind}/{self.model}/{self.role}/{profile}" + (f"/x{scale:g}" if scale else "")

    def prior_spec(self) -> PriorSpec:
        sim = self.launch if isinstance(self.launch, SimLaunch) else None
        return PriorSpec(
            profile=self.cost_profile or (sim.profile if sim else None),
            time_scale=(sim.time_scale if sim and sim.time_scale else 1.0),
        )

    def spec(self) -> InstanceSpec:
        key = self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
        return InstanceSpec(
            id=self.id or self.url.split("://", 1)[1],
            url=self.url,
            kind=self.kind,
            role=self.role,
            model=self.model,
            api_key=key,
            bootstrap_port=self.bootstrap_port,
            block_size=self.block_size,
            kv_events_endpoint=self.kv_events.endpoint if self.kv_events else None,
            hash_algo=self.prefix_caching_hash_algo,
            hash_seed=self.hash_seed,
            max_cpu_loras=self.max_cpu_loras,
        )
