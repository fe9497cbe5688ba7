"""The gateway's configuration file (YAML), validated with pydantic; errors name the field."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pdgate.common.yamlfile import YamlFileError, read_yaml_mapping
from pdgate.gateway.discovery_config import DiscoveryConfig
from pdgate.gateway.instance_config import InstanceConfig
from pdgate.gateway.limits_config import ClientLimitsConfig
from pdgate.gateway.lora_config import ModelLoraConfig
from pdgate.gateway.planning_config import RoleBalancerConfig, ScalingConfig
from pdgate.gateway.shutdown_config import ShutdownConfig
from pdgate.gateway.tenant_config import TenantsConfig
from pdgate.gateway.tls_config import TlsConfig, UpstreamTlsConfig
from pdgate.scheduler.registry import SchedulingConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str
    tokenizer: str = Field(
        "builtin", description="'builtin' (the simulator's) or a local Hugging Face tokenizer directory"
    )
    max_model_len: int = Field(8192, ge=2)
    lora: ModelLoraConfig = Field(
        default_factory=ModelLoraConfig,
        description="LoRA adapters of this base model the gateway may load on demand (docs/lora.md)",
    )


class HealthConfig(Strict):
    interval_s: float = Field(2.0, gt=0, description="active /health check period")
    timeout_s: float = Field(2.0, gt=0)
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open an instance's circuit")
    cooldown_s: float = Field(5.0, gt=0, description="how long an open circuit keeps an instance out")


class SloTargetConfig(Strict):
    ttft_ms: float | None = Field(None, gt=0, description="time to first token limit (none: no TTFT SLO)")
    tpot_ms: float | None = Field(None, gt=0, description="time per output token limit (none: no TPOT SLO)")
    priority: int = Field(0, description="higher is served first when the gateway queues")


class SloClassConfig(SloTargetConfig):
    """An SLO class, chosen by the client's API key, the route, or the app tag header (first match wins)."""

    name: str = Field(min_length=1)
    api_keys: list[str] = Field(default_factory=list)
    routes: list[str] = Field(default_factory=list, description="e.g. /v1/chat/completions")
    apps: list[str] = Field(default_factory=list, description="values of the x-pdgate-app header")


class SloConfig(Strict):
    default: SloTargetConfig = Field(default_factory=lambda: SloTargetConfig(ttft_ms=2000.0, tpot_ms=100.0))
    classes: list[SloClassConfig] = Field(default_factory=list)
    honor_headers: bool = Field(
        True,
        description="x-slo-ttft-ms, x-slo-tpot-ms (or llm-d's x-llm-d-slo-ttft-ms, x-llm-d-slo-tpot-ms) and x-priority override the class",
    )


class AdmissionConfig(Strict):
    enabled: bool = Field(True, description="off: every request is placed at once, whatever its SLO")
    on_infeasible: Literal["reject", "best-effort", "admit"] = Field(
        "reject",
        description="a request that cannot meet its SLO: 429 at once, serve it as best effort, or admit it anyway",
    )
    admitter: str = Field("slo-admitter", description="admitter plugin type")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the admitter's parameters")
    max_queue: int = Field(1024, ge=0, description="requests the gateway may hold per model")
    recheck_ms: float = Field(10.0, gt=0, description="how often a non-empty queue is re-assessed")


class CostModelConfig(Strict):
    dir: str | None = Field(None, description="versioned models and the request log (none: in memory, cold start)")
    log_requests: bool = Field(
        True, description="append every completed request (features, timings) to DIR/requests.jsonl"
    )
    log_prompt_text: bool = Field(False, description="also log the prompt text (off: only hashed n-grams)")
    refit_interval_s: float = Field(30.0, gt=0, description="refit period, in a separate process")
    min_new_samples: int = Field(20, ge=1, description="completed requests needed before a refit")
    max_records: int = Field(50_000, ge=100, description="most recent requests a refit uses")
    max_records_mib: int = Field(
        256, ge=1, description="memory for those records (a long prompt's is ~50 kB): the oldest go first"
    )
    q_high: float = Field(0.9, gt=0.5, lt=1.0, description="the output-length quantile used for SLO risk")
    length_source: Literal["client", "model", "none"] = Field(
        "client",
        description="what the scheduler takes a request's output length to be: client: the length model, "
        "within what the client's sampling fixes (ignore_eos: exactly max_tokens; max_tokens caps, min_tokens "
        "floors); model: the length model alone, blind to those settings (an ablation: how good is the model "
        "where the client's settings would have told); none: no prediction (the scheduler's default length)",
    )


class TracingConfig(Strict):
    """OpenTelemetry tracing (docs/observability.md). Unset fields fall back to the standard
    ``OTEL_*`` environment variables; values set here win over them."""

    enabled: bool | None = Field(
        None,
        description="none: on when OTEL_TRACES_EXPORTER (not 'none') or "
        "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set; OTEL_SDK_DISABLED=true turns it off",
    )
    exporter: Literal["otlp", "console"] | None = Field(
        None, description="none: OTEL_TRACES_EXPORTER, else otlp (HTTP/protobuf)"
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (/v1/traces is added to a URL "
        "without a path); none: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else localhost:4318",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="sent with every export (also OTEL_EXPORTER_OTLP_HEADERS)"
    )
    service_name: str | None = Field(None, description="none: OTEL_SERVICE_NAME, else 'pdgate'")
    sample_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded (a client's sampled "
        "traceparent is followed); none: OTEL_TRACES_SAMPLER, else all",
    )
    propagate_to_engines: bool = Field(
        True, description="send W3C traceparent/tracestate to the engines with every call"
    )
    record_prompt_text: bool = Field(
        False, description="put the prompt's text on the request span (off: never any text)"
    )
    plugin_spans: bool = Field(
        True,
        description="a span per scheduling plugin call; off: an event per call on the "
        "profile's span instead (fewer spans, less CPU per traced request)",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class MigrationConfig(Strict):
    """Moving running requests between instances (Llumnix-style), draining, and mid-stream failover."""

    enabled: bool = Field(
        True,
        description="run the migration controller (policy rounds and drains); off: requests never move "
        "except by failover",
    )
    policy: str = Field("load-balance", description="migration policy plugin type")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the policy's parameters")
    interval_s: float = Field(0.5, gt=0, description="how often the policy looks at the decode instances")
    mechanism: Literal["auto", "live", "pd", "recompute"] = Field(
        "auto",
        description="auto: live where both engines can, else through the PD hand-off (a model with prefill instances), "
        "else recompute on the target",
    )
    max_concurrent: int = Field(4, ge=1, description="moves in flight at once")
    timeout_s: float = Field(
        30.0, gt=0, description="a move not done by then is abandoned (the request stays where it was)"
    )
    failover: bool = Field(True, description="continue a stream on another instance when its engine fails mid-way")
    max_failovers: int = Field(2, ge=0, description="failovers per request")
    stall_timeout_s: float = Field(
        30.0, ge=0, description="a stream with no data for this long counts as failed (0: never)"
    )


class AdminConfig(Strict):
    api_key: str | None = Field(
        None,
        description="required as a bearer token on /admin (also PDGATE_ADMIN_KEY); without one, "
        "/admin answers loopback clients only",
    )
    drain_wait_s: float = Field(
        60.0, gt=0, description="the longest a drain call with ?wait=true waits for the instance to empty"
    )


def has_serving_path(roles: Iterable[str]) -> bool:
    """Whether instances serving in ``roles`` can answer a request: a colocated one, or a prefill
    and a decode one."""
    serving = set(roles)
    return "both" in serving or {"prefill", "decode"} <= serving


class SharingConfig(Strict):
    """State gateway replicas share (docs/gateway.md): the fleet's changes, drains, in-flight load."""

    enabled: bool = Field(
        True, description="false: replicas and workers share nothing (each sees only its own in-flight load)"
    )
    nats_url: str | None = Field(
        None,
        description="NATS server with JetStream, or a cluster's servers comma separated (also PDGATE_NATS_URL); "
        "unset: a single worker shares nothing, "
        "several workers share through a NATS server started as a child",
    )
    replica_id: str | None = Field(None, description="this replica's name (default: host name and process id)")
    load_interval_s: float = Field(
        0.02,
        gt=0,
        description="the shortest time between two publications of a replica's in-flight load (it publishes "
        "when a lease opens or closes, and at least every second)",
    )
    load_expiry_s: float = Field(3.0, gt=0, description="a replica not heard from for this long: its load is dropped")
    leader_lease_s: float = Field(
        3.0, gt=0, description="the leader's lease: a new leader takes over within this long of the old one's death"
    )
    stream_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="copies a NATS cluster keeps of each shared bucket and stream (JetStream replicas): 3 in a "
        "3-server cluster keeps the shared state through the loss of one server; 1 for a single server",
    )

    def url(self) -> str | None:
        if not self.enabled:
            return None
        return self.nats_url or os.environ.get("PDGATE_NATS_URL") or None


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = Field(
        "text", description="json: one object per line, with request_id and trace_id"
    )
    access_log: bool = Field(
        False,
        description="one line per finished request: id, trace id, route, model, status, "
        "instances, timings, tokens (never prompt or completion text)",
    )


class GatewayConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(
        default_factory=list, description="client keys accepted (also PDGATE_API_KEYS, comma-separated)"
    )
    models: list[ModelConfig]
    instances: list[InstanceConfig] = Field(
        default_factory=list, description="the engines served (at least one, unless discovery finds them)"
    )
    scheduling: SchedulingConfig | None = Field(
        None, description="plugins, profiles and the profile handler (default: SLO-aware, pd-split)"
    )
    health: HealthConfig = Field(default_factory=HealthConfig)
    scrape_interval_s: float = Field(1.0, gt=0, description="engine /metrics scrape period")
    stale_after_s: float = Field(5.0, gt=0, description="scraped load older than this is ignored")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="a request body over it: 413")
    limits: ClientLimitsConfig = Field(
        default_factory=ClientLimitsConfig, description="what the gateway accepts from client connections"
    )
    approx_prefix_max_blocks: int = Field(1_000_000, ge=1, description="memory budget of the approximate prefix index")
    retries: int = Field(1, ge=0, le=3, description="retries on another instance before the first token")
    upstream_timeout_s: float = Field(600.0, gt=0)
    slo: SloConfig = Field(default_factory=SloConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    tenants: TenantsConfig = Field(default_factory=TenantsConfig)
    cost_model: CostModelConfig = Field(default_factory=CostModelConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    migration: MigrationConfig = Field(default_factory=MigrationConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    upstream_tls: UpstreamTlsConfig = Field(default_factory=UpstreamTlsConfig)
    sharing: SharingConfig = Field(default_factory=SharingConfig)
    role_balancer: RoleBalancerConfig = Field(default_factory=RoleBalancerConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)

    @model_validator(mode="before")
    @classmethod
    def _tls_sections(cls, data: Any) -> Any:
        """Validate the TLS sections also when the file leaves them out (their files may come from
        the environment), so that their errors name the section."""
        if isinstance(data, dict):
            return {"tls": {}, "upstream_tls": {}, **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        names = {m.name for m in self.models}
        found = self.discovery.enabled or (self.scaling.enabled and self.scaling.actuator.type == "kubernetes")
        if not self.instances and not found:
            raise ValueError(
                "instances: list at least one engine instance (or find them with discovery.kubernetes or the "
                "kubernetes scaling actuator)"
            )
        if self.discovery.enabled and self.scaling.enabled and self.scaling.actuator.type == "kubernetes":
            raise ValueError(
                "discovery.kubernetes and the kubernetes scaling actuator would both add the engine pods: "
                "use one (the actuator's pools find their own pods)"
            )
        by_hand = [i.spec().id for i in self.instances if i.pod_uid is not None]
        if by_hand:
            raise ValueError(f"instances: pod_uid is set by Kubernetes discovery, not in the file ({by_hand})")
        ids = [i.spec().id for i in self.instances]
        duplicates = {i for i in ids if ids.count(i) > 1}
        if duplicates:
            raise ValueError(f"instances: duplicate id(s) {sorted(duplicates)}")
        for n, inst in enumerate(self.instances):
            if inst.model not in names:
                raise ValueError(f"instances[{n}].model: {inst.model!r} is not one of models {sorted(names)}")
        adapters: dict[str, str] = {}
        for m in self.models:
            for adapter in m.lora.adapters:
                if adapter in names or adapter in adapters:
                    other = "a model's name" if adapter in names else f"an adapter of {adapters[adapter]!r}"
                    raise ValueError(f"models: LoRA adapter {adapter!r} of {m.name!r} is also {other}")
                adapters[adapter] = m.name
        classes = {c.name for c in self.slo.classes}
        for tenant in self.tenants.tenants:
            if tenant.slo_class is not None and tenant.slo_class not in classes:
                raise ValueError(
                    f"tenants: {tenant.name!r} names SLO class {tenant.slo_class!r}, not one of slo.classes {sorted(classes)}"
                )
        for name in names if not found else ():  # found at run time: the serving paths come later
            if not has_serving_path(i.start_role for i in self.instances if i.model == name):
                raise ValueError(
                    f"model {name!r} needs a 'both' instance or at least one prefill and one decode instance "
                    "(flex instances count in their serving role)"
                )
        return self

    def admin_api_key(self) -> str | None:
        return self.admin.api_key or os.environ.get("PDGATE_ADMIN_KEY") or None

    def client_api_keys(self) -> list[str]:
        """The keys a client must send one of (none: no key is checked): the gateway's and
        ``PDGATE_API_KEYS``'s, and then every tenant's too."""
        env = [k.strip() for k in os.environ.get("PDGATE_API_KEYS", "").split(",") if k.strip()]
        keys = [*self.api_keys, *env]
        return [*keys, *(k for t in self.tenants.tenants for k in t.api_keys)] if keys else []

    @classmethod
    def load(cls, path: str | Path) -> GatewayConfig:
        try:
            data = read_yaml_mapping(path, empty_ok=False)
        except YamlFileError as exc:
            raise ConfigError(str(exc)) from None
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
        {"name": "lora", "type": "lora-affinity"},
        {"name": "lora-decode", "type": "lora-affinity", "parameters": {"measure": "tpot"}},
        {"name": "ttft", "type": "slo-ttft"},
        {"name": "tpot-fit", "type": "slo-tpot-filter"},
        {"name": "tpot", "type": "slo-tpot"},
        {"name": "prefix", "type": "prefix-affinity"},
        {"name": "kv", "type": "kv-usage"},
        {"name": "pick", "type": "max-score"},
    ],
    "profiles": {
        # prefill: least predicted TTFT (queue wait + uncached prefill); the prefix term keeps a
        # shared prefix on the instance that holds it when the predicted TTFTs are close
        "prefill": [
            {"pluginRef": "healthy"},
            {"pluginRef": "prefill-role"},
            {"pluginRef": "lora"},
            {"pluginRef": "ttft", "weight": 4.0},
            {"pluginRef": "prefix", "weight": 1.0},
            {"pluginRef": "pick"},
        ],
        # decode: among instances that keep the TPOT SLOs of their batch, least predicted TPOT and most prefix
        "decode": [
            {"pluginRef": "healthy"},
            {"pluginRef": "decode-role"},
            {"pluginRef": "lora-decode"},
            {"pluginRef": "tpot-fit"},
            {"pluginRef": "tpot", "weight": 2.0},
            {"pluginRef": "prefix", "weight": 1.0},
            {"pluginRef": "kv", "weight": 0.5},
            {"pluginRef": "pick"},
        ],
        "colocated": [
            {"pluginRef": "healthy"},
            {"pluginRef": "colocated-role"},
            {"pluginRef": "lora"},
            {"pluginRef": "ttft", "weight": 3.0},
            {"pluginRef": "tpot", "weight": 1.0},
            {"pluginRef": "prefix", "weight": 1.0},
            {"pluginRef": "pick"},
        ],
    },
}
