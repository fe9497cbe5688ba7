"""LoRA adapters of the simulated engine, served as vLLM 0.32 serves them (a sim adapter has no weights).

What vLLM does and this mirrors (``vllm/entrypoints/openai/models/serving.py`` ``OpenAIServingModels``,
``vllm/entrypoints/serve/lora/api_router.py``, ``vllm/v1/core/kv_cache_utils.py``):

* An adapter is a name, the path it was loaded from and an integer id (``lora_int_id``: 1, 2, ...
  in load order; a reload in place keeps its id). ``--lora-modules`` adapters are loaded at start.
* ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` exist only when the environment has
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` = ``1`` or ``true`` (read once, when the app is made).
  Answers: ``200`` with the text ``Success: LoRA adapter 'NAME' added successfully.`` (``removed``
  for unload); ``400 InvalidUserInput`` for a missing name or path, a name that is a served base
  model, or a name already loaded without ``load_inplace``; ``404 NotFoundError`` for unloading an
  unknown name and for a local adapter path that does not exist.
* A request names an adapter in ``model``; its blocks are hashed with ``("lora", name, path)``
  (:class:`pdgate.common.block_hash.LoraAdapter`), so base and adapter prompts never share KV, and
  its KV events carry ``lora_id`` and ``lora_name``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pdgate.common.block_hash import LoraAdapter
from pdgate.engines.sim.protocol import ApiError

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_lora_updating(environ: Mapping[str, str] = os.environ) -> bool:
    """vLLM's ``envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING``: ``1`` or ``true`` (any case, spaces stripped)."""
    return environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


@dataclass(frozen=True)
class ServedAdapter:
    """One loaded adapter: what ``/v1/models`` lists and what its requests' blocks and events carry."""

    name: str
    path: str
    lora_id: int
    base_model_name: str | None = None

    @property
    def key(self) -> LoraAdapter:
        """Its block-hash extra key (name and path, as vLLM 0.32 keys blocks)."""
        return LoraAdapter(self.name, self.path)


def _missing_local_path(path: str) -> bool:
    """A filesystem path (absolute, ``./``, ``../``, ``~``) that does not exist; other strings are hub ids."""
    if not path.startswith(("/", "./", "../", "~")):
        return False
    return not Path(path).expanduser().exists()


class LoraRegistry:
    """The adapters one engine serves, by name; ``base_models`` are the names requests use for no adapter."""

    def __init__(self, base_models: list[str]) -> None:
        self._base_models = list(base_models)
        self._adapters: dict[str, ServedAdapter] = {}
        self._next_id = 1

    @property
    def adapters(self) -> list[ServedAdapter]:
        """Loaded adapters in load order."""
        return list(self._adapters.values())

    def get(self, name: str) -> ServedAdapter | None:
        return self._adapters.get(name)

    def load(
        self, name: str, path: str, *, load_inplace: bool = False, base_model_name: str | None = None
    ) -> ServedAdapter:
        """Load (or with ``load_inplace`` re-point) ``name``; :class:`ApiError` with vLLM's answer when refused."""
        if not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", err_type="InvalidUserInput")
        if name in self._base_models:
            raise ApiError(
                400, f"The lora adapter '{name}' conflicts with a served base model.", err_type="InvalidUserInput"
            )
        previous = self._adapters.get(name)
        if previous is not None and not load_inplace:
            raise ApiError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                err_type="InvalidUserInput",
            )
        if _missing_local_path(path):
            raise ApiError(404, f"Loading lora {name} failed: No adapter found for {path}", err_type="NotFoundError")
        if previous is not None:
            lora_id = previous.lora_id
        else:
            lora_id, self._next_id = self._next_id, self._next_id + 1
        base = base_model_name if base_model_name in self._base_models else None
        adapter = ServedAdapter(name, path, lora_id, base)
        self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> ServedAdapter:
        """Forget ``name``; :class:`ApiError` with vLLM's answer when it is not loaded."""
        if not name:
            raise ApiError(
                400, "'lora_name' needs to be provided to unload a LoRA adapter.", err_type="InvalidUserInput"
            )
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", err_type="NotFoundError")
        return adapter
