"""Configuration of one simulated engine process (flags, YAML file, or both)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdgate.common.block_hash import HashAlgo, hash_function
from pdgate.common.yamlfile import read_yaml_mapping


@dataclass(frozen=True)
class LoraModule:
    """One ``--lora-modules`` entry (vLLM's ``LoRAModulePath``)."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(item: str) -> LoraModule:
    """vLLM's ``LoRAParserAction``: ``name=path`` when the item has a ``=`` and no ``,``, else a JSON object
    with ``name``, ``path`` and optionally ``base_model_name``; ``ValueError`` otherwise."""
    if "=" in item and "," not in item:
        name, path = item.split("=", 1)
        return LoraModule(name, path)
    try:
        data = json.loads(item)
    except json.JSONDecodeError:
        raise ValueError(f"Invalid JSON format for --lora-modules: {item}") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
        raise ValueError(f"Invalid fields for --lora-modules: {item} - give 'name' and 'path' strings")
    unknown = set(data) - {"name", "path", "base_model_name", "is_3d_lora_weight"}
    if unknown:
        raise ValueError(f"Invalid fields for --lora-modules: {item} - unexpected {', '.join(sorted(unknown))}")
    base = data.get("base_model_name")
    return LoraModule(data["name"], data["path"], base if isinstance(base, str) else None)


class SimEngineConfig(BaseModel):
    """Every knob of ``pdgate engine sim``; each field is also a ``--kebab-case`` flag."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8100, ge=0, le=65535, description="HTTP port (0 picks a free one)")
    role: Literal["both", "prefill", "decode"] = Field(
        "both", description="colocated engine, or one side of prefill-decode disaggregation"
    )
    api: Literal["vllm", "sglang"] = Field("vllm", description="whose HTTP API, PD protocol and metric names to speak")
    runner: Literal["generate", "pooling"] = Field(
        "generate",
        description="generate: completions and chat; pooling: embeddings, score and rerank (vLLM's --runner)",
    )
    profile: str | None = Field(
        "h100-llama-3-8b",
        description="calibrated performance profile GPU-MODEL[-tpN]; set to '' to use --model/--gpu/--tp (roofline when no profile matches)",
    )
    model: str | None = Field(None, description="model shape (e.g. llama-3-8b) when no --profile is given")
    gpu: str | None = Field(None, description="GPU (h100, a100, a40) when no --profile is given")
    tp: int = Field(1, ge=1, description="tensor-parallel degree when no --profile is given")
    served_model_name: str | None = Field(None, description="model name clients use (default: the profile's model)")
    time_scale: float = Field(1.0, gt=0, description="run this many times faster than real time (tests use 10-100)")
    tokenizer: str = Field("builtin", description="'builtin' or a local Hugging Face tokenizer directory")
    block_size: int = Field(16, ge=1, description="KV cache block size in tokens")
    num_gpu_blocks: int | None = Field(
        None, ge=1, description="override the KV cache size in blocks (default: from GPU memory)"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of GPU memory for weights + KV cache")
    max_num_seqs: int = Field(256, ge=1, description="maximum running sequences per step")
    max_num_batched_tokens: int = Field(8192, ge=1, description="token budget per step (chunked prefill)")
    max_model_len: int | None = Field(None, ge=2, description="context length limit (default: the model's)")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of identical prefixes")
    prefix_caching_hash_algo: HashAlgo = Field(
        "sha256",
        description="block hash of the prefix cache and its KV events, as vLLM's flag (xxhash*: pip install "
        "'pdgate[xxhash]'; seeded at random per process unless PYTHONHASHSEED is set)",
    )
    enable_lora: bool = Field(False, description="serve LoRA adapters (vLLM API; a simulated adapter has no weights)")
    max_loras: int = Field(1, ge=1, description="most distinct LoRA adapters in one batch (vLLM's --max-loras)")
    lora_modules: list[str] | None = Field(
        None,
        description='adapters served from the start, each name=path or JSON {"name", "path", "base_model_name"}; '
        "more at runtime with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (POST /v1/load_lora_adapter)",
        json_schema_extra={"nargs": "+"},
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="waiting-queue order (priority: lower value first)"
    )
    output_len_median: float = Field(
        180.0, gt=0, description="median of the per-conversation mean natural output length"
    )
    output_len_sigma: float = Field(0.9, ge=0, description="log-normal spread of natural output lengths")
    engine_id: str | None = Field(None, description="KV connector engine id (default: random)")
    kv_link_bandwidth_gbps: float = Field(25.0, gt=0, description="KV transfer bandwidth in GB/s (25 = 200 Gb/s RDMA)")
    kv_link_latency_ms: float = Field(1.0, ge=0, description="fixed cost of one KV transfer in ms")
    kv_load_failure_policy: Literal["fail", "recompute"] = Field(
        "fail", description="decode leg when the KV pull fails"
    )
    kv_hold_timeout_s: float = Field(480.0, gt=0, description="seconds a prefill leg keeps KV for its decode peer")
    bootstrap_port: int | None = Field(
        None, ge=0, le=65535, description="SGLang prefill bootstrap port (default 8998 for an sglang prefill)"
    )
    kv_events_endpoint: str | None = Field(
        None,
        description="ZMQ endpoint for vLLM-format KV events, by vLLM's rule: tcp://*:5557 binds "
        "(every gateway connects), tcp://HOST:5557 connects to the one gateway bound there",
    )
    kv_events_replay_endpoint: str | None = Field(
        None, description="ZMQ ROUTER endpoint (always bound) serving replays of recent KV events, e.g. tcp://*:5558"
    )
    kv_events_topic: str = Field("kv", description="topic frame of KV event messages")
    otlp_traces_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector URL for one 'llm_request' span per request, as vLLM's flag (/v1/traces appended when it has no path)",
    )
    enable_prompt_tokens_details: bool = Field(True, description="report usage.prompt_tokens_details.cached_tokens")
    api_key: str | None = Field(None, description="require this bearer token on /v1 routes")
    seed: int = Field(0, description="seed for sampled (temperature > 0) requests that give none")
    stream_interval: int = Field(
        1,
        ge=1,
        description="streamed tokens sent together, as vLLM's --stream-interval: the first at once, then every N, "
        "the rest with the finish",
    )

    @model_validator(mode="after")
    def _check(self) -> SimEngineConfig:
        if not self.profile and not self.model:
            raise ValueError("give a --profile, or a --model (with optional --gpu, --tp)")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        try:
            hash_function(self.prefix_caching_hash_algo)(b"")  # the xxhash package, when asked for
        except ModuleNotFoundError as exc:
            raise ValueError(str(exc)) from None
        if self.enable_lora and self.api != "vllm":
            raise ValueError("LoRA adapters are simulated for the vLLM API only")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        for module in self.lora_modules or ():
            parse_lora_module(module)  # a ValueError names the bad entry
        return self

    def static_lora_modules(self) -> list[LoraModule]:
        """The adapters of ``lora_modules``, parsed (empty without LoRA)."""
        return [parse_lora_module(m) for m in self.lora_modules or () if m]

    def resolved_engine_id(self) -> str:
        return self.engine_id or str(uuid.uuid4())

    def resolved_bootstrap_port(self) -> int | None:
        if self.api == "sglang" and self.role == "prefill":
            return 8998 if self.bootstrap_port is None else self.bootstrap_port
        return None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> SimEngineConfig:
        data = read_yaml_mapping(path, what="a mapping of engine settings")  # YamlFileError is a ValueError
        data.update(overrides)
        return cls.model_validate(data)
