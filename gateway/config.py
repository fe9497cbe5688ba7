"""The gateway's configuration file (YAML), validated with pydantic; errors name the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from adapters import ADAPTERS, InstanceSpec
from scheduler.registry import SchedulingConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KvEventsConfig(Strict):
    endpoint: str = Field(description="the engine's --kv-events publisher endpoint (tcp://host:port)")
    replay_endpoint: str | None = None
    topic: str = "kv"


class SimLaunch(Strict):
    """How ``pdgate up`` starts a simulated instance: extra ``pdgate engine sim`` settings."""

    profile: str | None = None
    time_scale: float | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="more engine settings, snake_case")


class VllmLaunch(Strict):
    """How ``pdgate up`` starts a real vLLM instance (``pdgate engine vllm``; see its --help)."""

    model_path: str = Field(description="local model directory")
    side_channel_port: int | None = Field(None, description="NIXL side-channel port (prefill/decode; unique per host)")
    cpu_cores: str | None = Field(None, description="taskset core list (CPU builds)")
    device: Literal["cpu", "gpu"] = "cpu"
    python: str | None = Field(None, description="the vLLM environment's interpreter (default: from vllm-setup)")
    max_model_len: int | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="more `pdgate engine vllm` settings, snake_case")


class InstanceConfig(Strict):
    id: str | None = Field(None, description="unique name (default: host:port)")
    url: str = Field(description="base URL of the engine, e.g. http://127.0.0.1:8101")
    kind: str = Field("vllm", description="adapter: " + ", ".join(sorted(ADAPTERS)))
    role: Literal["prefill", "decode", "both"] = "both"
    model: str
    api_key: str | None = Field(None, description="the engine's own key (sent to it, never the client's)")
    api_key_env: str | None = Field(None, description="read the engine's key from this environment variable")
    kv_events: KvEventsConfig | None = None
    bootstrap_port: int | None = Field(None, description="SGLang prefill bootstrap port")
    block_size: int = Field(16, ge=1)
    launch: VllmLaunch | SimLaunch | None = Field(None, description="for `pdgate up`: start this instance (sim or vllm)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in ADAPTERS:
            raise ValueError(f"unknown adapter kind {value!r}; known: {', '.join(sorted(ADAPTERS))}")
        return value

    @model_validator(mode="after")
    def _launchable(self) -> InstanceConfig:
        if isinstance(self.launch, VllmLaunch) and self.kind != "vllm":
            raise ValueError(f"launch.model_path: a vLLM launch section needs kind 'vllm', not {self.kind!r}")
        if isinstance(self.launch, SimLaunch) and not self.kind.startswith("sim"):
            raise ValueError(f"launch: kind {self.kind!r} cannot be launched as a simulated engine "
                             "(a vLLM launch section needs model_path)")
        return self

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
        )


class ModelConfig(Strict):
    name: str
    tokenizer: str = Field("builtin", description="'builtin' (the simulator's) or a local Hugging Face tokenizer directory")
    max_model_len: int = Field(8192, ge=2)


class HealthConfig(Strict):
    interval_s: float = Field(2.0, gt=0, description="active /health check period")
    timeout_s: float = Field(2.0, gt=0)
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open an instance's circuit")
    cooldown_s: float = Field(5.0, gt=0, description="how long an open circuit keeps an instance out")


class GatewayConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="client keys accepted (also PDGATE_API_KEYS, comma-separated)")
    models: list[ModelConfig]
    instances: list[InstanceConfig] = Field(min_length=1)
    scheduling: SchedulingConfig | None = Field(None, description="plugins and profiles (default: prefix + load aware)")
    health: HealthConfig = Field(default_factory=HealthConfig)
    scrape_interval_s: float = Field(1.0, gt=0, description="engine /metrics scrape period")
    stale_after_s: float = Field(5.0, gt=0, description="scraped load older than this is ignored")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    approx_prefix_max_blocks: int = Field(1_000_000, ge=1, description="memory budget of the approximate prefix index")
    retries: int = Field(1, ge=0, le=3, description="retries on another instance before the first token")
    upstream_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        names = {m.name for m in self.models}
        ids = [i.spec().id for i in self.instances]
        duplicates = {i for i in ids if ids.count(i) > 1}
        if duplicates:
            raise ValueError(f"instances: duplicate id(s) {sorted(duplicates)}")
        for n, inst in enumerate(self.instances):
            if inst.model not in names:
                raise ValueError(f"instances[{n}].model: {inst.model!r} is not one of models {sorted(names)}")
        for name in names:
            roles = {i.role for i in self.instances if i.model == name}
            if "both" not in roles and not {"prefill", "decode"} <= roles:
                raise ValueError(f"model {name!r} needs a 'both' instance or at least one prefill and one decode instance")
        return self

    def client_api_keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get("PDGATE_API_KEYS", "").split(",") if k.strip()]
        return [*self.api_keys, *env]

    @classmethod
    def load(cls, path: str | Path) -> GatewayConfig:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(path))) from None


class ConfigError(ValueError):
    """An invalid configuration file; the message names each offending field."""


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


DEFAULT_SCHEDULING: dict[str, Any] = {
    "plugins": [
        {"name": "healthy", "type": "health-filter"},
        {"name": "prefill-role", "type": "role-filter", "parameters": {"role": "prefill"}},
        {"name": "decode-role", "type": "role-filter", "parameters": {"role": "decode"}},
        {"name": "colocated-role", "type": "role-filter", "parameters": {"role": "both"}},
        {"name": "prefix", "type": "prefix-affinity"},
        {"name": "load", "type": "least-loaded"},
        {"name": "kv", "type": "kv-usage"},
        {"name": "pick", "type": "max-score"},
    ],
    "profiles": {
        "prefill": [{"pluginRef": "healthy"}, {"pluginRef": "prefill-role"}, {"pluginRef": "prefix", "weight": 2.0},
                    {"pluginRef": "load", "weight": 1.0}, {"pluginRef": "pick"}],
        "decode": [{"pluginRef": "healthy"}, {"pluginRef": "decode-role"}, {"pluginRef": "load", "weight": 1.0},
                   {"pluginRef": "kv", "weight": 1.0}, {"pluginRef": "pick"}],
        "colocated": [{"pluginRef": "healthy"}, {"pluginRef": "colocated-role"}, {"pluginRef": "prefix", "weight": 2.0},
                      {"pluginRef": "load", "weight": 1.0}, {"pluginRef": "pick"}],
    },
}
