"""A model's LoRA section (``models[].lora``): adapters the gateway may load on demand (docs/lora.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ModelLoraConfig(BaseModel):
    """LoRA adapters of one base model.

    Adapters the engines already serve (``--lora-modules``, or loaded by anyone) are found in their
    ``/v1/models`` and routed to without any of this. ``load_on_demand`` lets the gateway load an
    adapter with ``POST /v1/load_lora_adapter`` (vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``)
    on an instance that lacks it, when no instance of the needed role has it or those that do are
    overloaded; the path comes from ``adapters``, else from an instance that serves it (its
    ``root``: it must then be valid on every host).
    """

    model_config = ConfigDict(extra="forbid")

    load_on_demand: bool = Field(
        False, description="load an adapter on an instance that lacks it when placement needs one there"
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="adapter name -> path as the engines must be given it (vLLM's lora_path; it is also part of "
        "the adapter's block hashes); listed in /v1/models and servable before any instance has them",
    )
    load_timeout_s: float = Field(120.0, gt=0, description="the longest one load may take")
    retry_after_s: float = Field(
        60.0,
        gt=0,
        description="after a failed load the instance is not asked to load that adapter (or, when it loads "
        "none at run time, any adapter) for this long",
    )

    @field_validator("adapters")
    @classmethod
    def _named(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not name.strip() or not path.strip():
                raise ValueError("every adapter needs a name and a path")
        return value
