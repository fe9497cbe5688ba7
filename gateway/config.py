"""The gateway's configuration file (YAML), validated with pydantic; errors name the field."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
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

from pdgate.adapters import ADAPTERS, InstanceSpec
from pdgate.common.block_hash import NON_CRYPTO_HASH_ALGOS, XXHASH_MISSING, HashAlgo, hash_function
from pdgate.common.kv_events import engine_binds
from pdgate.common.tls import ClientTlsFiles, ServerTlsFiles, TlsError, client_context, server_context
from pdgate.common.yamlfile import YamlFileError, read_yaml_mapping
from pdgate.gateway.lora_config import ModelLoraConfig
from pdgate.gateway.planning_config import RoleBalancerConfig, ScalingConfig
from pdgate.gateway.tenant_config import TenantsConfig
from pdgate.scheduler.costmodel.latency import PriorSpec
from pdgate.scheduler.registry import SchedulingConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KvEventsConfig(Strict):
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

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

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


class TlsConfig(Strict):
    """HTTPS on the gateway's own port (docs/tls.md). A file left unset here is read from its
    environment variable; neither set: plain HTTP. SIGHUP reads the certificate and key files
    again (a rotated certificate serves new connections; files that do not load keep the old one)."""

    cert_file: str | None = Field(
        None,
        description="PEM certificate chain the gateway serves HTTPS with, leaf first "
        "(also PDGATE_TLS_CERT_FILE); unset with key_file: plain HTTP",
    )
    key_file: str | None = Field(
        None, description="cert_file's private key, unencrypted PEM (also PDGATE_TLS_KEY_FILE)"
    )
    client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle client certificates are verified against (also PDGATE_TLS_CLIENT_CA_FILE); "
        "clients are asked for one, /v1 still serves clients without one",
    )
    admin_requires_client_cert: bool = Field(
        False,
        description="/admin answers only connections that presented a client certificate signed by "
        "client_ca_file (401 otherwise); admin.api_key, when set, is required as well",
    )

    def files(self, env: Mapping[str, str] = os.environ) -> ServerTlsFiles | None:
        """The files to serve HTTPS with (fields, else their environment variables), or None for
        plain HTTP; ``ValueError`` when they do not make a whole (a cert without its key, admin
        mTLS without a client CA). Messages name where each value came from."""
        cert = _setting(self.cert_file, "tls.cert_file", env, "PDGATE_TLS_CERT_FILE")
        key = _setting(self.key_file, "tls.key_file", env, "PDGATE_TLS_KEY_FILE")
        client_ca = _setting(self.client_ca_file, "tls.client_ca_file", env, "PDGATE_TLS_CLIENT_CA_FILE")
        if cert is not None and key is None:
            raise ValueError(f"{cert[1]} is set but tls.key_file (or PDGATE_TLS_KEY_FILE) is not: give both")
        if key is not None and cert is None:
            raise ValueError(f"{key[1]} is set but tls.cert_file (or PDGATE_TLS_CERT_FILE) is not: give both")
        if cert is None or key is None:  # neither: plain HTTP
            if client_ca is not None or self.admin_requires_client_cert:
                given = client_ca[1] if client_ca is not None else "tls.admin_requires_client_cert"
                raise ValueError(
                    f"{given}: client certificates need HTTPS: set tls.cert_file and tls.key_file "
                    "(or PDGATE_TLS_CERT_FILE and PDGATE_TLS_KEY_FILE)"
                )
            return None
        if self.admin_requires_client_cert and client_ca is None:
            raise ValueError(
                "tls.admin_requires_client_cert needs tls.client_ca_file (or PDGATE_TLS_CLIENT_CA_FILE) "
                "to verify client certificates against"
            )
        return ServerTlsFiles(cert[0], key[0], client_ca[0] if client_ca else None)

    @model_validator(mode="after")
    def _usable(self) -> TlsConfig:
        """The files exist and load (the certificate matches its key, the CA bundle parses)."""
        files = self.files()
        if files is not None:
            try:
                server_context(files)
            except TlsError as exc:
                raise ValueError(str(exc)) from None
        return self


class UpstreamTlsConfig(Strict):
    """How the gateway verifies engines served over ``https://`` URLs (health, scrapes and every
    leg); verification is always on and the URL's host name must match the engine's certificate.
    A file left unset here is read from its environment variable."""

    ca_file: str | None = Field(
        None,
        description="PEM CA bundle engine certificates are verified against (also PDGATE_UPSTREAM_CA_FILE); "
        "unset: the system's trust store",
    )
    cert_file: str | None = Field(
        None,
        description="client certificate chain sent to engines that require one (mTLS; also PDGATE_UPSTREAM_CERT_FILE)",
    )
    key_file: str | None = Field(
        None, description="cert_file's private key, unencrypted PEM (also PDGATE_UPSTREAM_KEY_FILE)"
    )

    def files(self, env: Mapping[str, str] = os.environ) -> ClientTlsFiles:
        """The files, from the fields or else their environment variables."""
        return ClientTlsFiles(
            ca_file=self.ca_file or env.get("PDGATE_UPSTREAM_CA_FILE") or None,
            cert_file=self.cert_file or env.get("PDGATE_UPSTREAM_CERT_FILE") or None,
            key_file=self.key_file or env.get("PDGATE_UPSTREAM_KEY_FILE") or None,
        )

    @model_validator(mode="after")
    def _usable(self) -> UpstreamTlsConfig:
        """The files given exist and load; a client certificate comes with its key."""
        files = self.files()
        if files.configured:
            try:
                client_context(files)
            except TlsError as exc:
                raise ValueError(str(exc)) from None
        return self


def _setting(value: str | None, field: str, env: Mapping[str, str], variable: str) -> tuple[str, str] | None:
    """A file setting and where it came from: the config field, else its environment variable, else None."""
    if value:
        return value, field
    from_env = env.get(variable)
    return (from_env, variable) if from_env else None


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
        description="NATS server with JetStream (also PDGATE_NATS_URL); unset: a single worker shares nothing, "
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
    instances: list[InstanceConfig] = Field(min_length=1)
    scheduling: SchedulingConfig | None = Field(
        None, description="plugins, profiles and the profile handler (default: SLO-aware, pd-split)"
    )
    health: HealthConfig = Field(default_factory=HealthConfig)
    scrape_interval_s: float = Field(1.0, gt=0, description="engine /metrics scrape period")
    stale_after_s: float = Field(5.0, gt=0, description="scraped load older than this is ignored")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
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
        for name in names:
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
