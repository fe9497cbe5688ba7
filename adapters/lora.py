"""LoRA adapters on an engine through vLLM's API: listed in ``/v1/models``, loaded at run time.

What vLLM 0.32 does (``vllm/entrypoints/openai/models/serving.py``, ``OpenAIServingModels``;
``vllm/entrypoints/serve/lora/api_router.py``):

* ``GET /v1/models`` lists the base model(s) (``parent`` null), then every adapter the API server
  has registered: ``id`` its name, ``root`` the ``lora_path`` it was loaded from, ``parent`` the
  base model (:func:`adapter_cards`).
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` exists only when the engine runs with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` (else FastAPI's plain 404 ``{"detail": "Not Found"}``).
  It answers ``200`` with a text, ``400`` ``InvalidUserInput`` (no name or path, a base model's
  name, or ``has already been loaded``), ``404`` ``NotFoundError`` (no adapter at the path) or
  ``500`` (the engine could not add it, e.g. without ``--enable-lora``).

A name already loaded counts as loaded (:func:`load_outcome`): two gateway replicas, or two
requests, may load the same adapter at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

LOAD_PATH = "/v1/load_lora_adapter"
MODELS_PATH = "/v1/models"
ALREADY_LOADED = "has already been loaded"


@dataclass(frozen=True)
class AdapterCard:
    """One LoRA adapter an engine serves: its name, the path it was loaded from (vLLM's ``root``,
    also the path in its block-hash extra key) and its base model (``parent``)."""

    name: str
    path: str
    parent: str


class LoraLoadError(Exception):
    """An adapter was not loaded on an instance.

    ``engine_wide``: the engine loads no adapter at run time (the route is missing, or LoRA is
    not enabled), as opposed to a refusal of this adapter (a path it cannot find, a rank too
    large); ``status`` is the engine's HTTP status (None: it could not be reached).
    """

    def __init__(self, message: str, *, status: int | None = None, engine_wide: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.engine_wide = engine_wide


def adapter_cards(data: Any) -> list[AdapterCard]:
    """The adapters of a ``/v1/models`` answer: the cards with a ``parent`` (vLLM lists its base
    models with ``parent`` null); ``ValueError`` for an answer that is not a model list."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError("/v1/models did not answer a model list")
    cards = []
    for card in data["data"]:
        if not isinstance(card, dict):
            continue
        name, root, parent = card.get("id"), card.get("root"), card.get("parent")
        if isinstance(name, str) and isinstance(root, str) and isinstance(parent, str) and name and parent:
            cards.append(AdapterCard(name, root, parent))
    return cards


def load_outcome(status: int, body: bytes, name: str) -> None:
    """Judge the engine's answer to a load of ``name``: return when the adapter is loaded (now or
    before), else raise :class:`LoraLoadError` with the engine's message."""
    if status == 200:
        return
    message, openai_shaped = _error_message(body)
    if status == 400 and ALREADY_LOADED in message:
        return
    if status in (404, 405) and not openai_shaped:
        raise LoraLoadError(
            f"the engine has no {LOAD_PATH} (HTTP {status}): it loads adapters at run time only when started "
            "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1",
            status=status,
            engine_wide=True,
        )
    engine_wide = status >= 500 and "not enabled" in message.lower()
    raise LoraLoadError(
        f"the engine refused to load LoRA adapter {name!r} (HTTP {status}): {message}",
        status=status,
        engine_wide=engine_wide,
    )


def _error_message(body: bytes) -> tuple[str, bool]:
    """An engine's error text, and whether it was OpenAI's error JSON (``{"error": {...}}``)."""
    text = body.decode(errors="replace")[:500]
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return text, False
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", text)), True
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"]), False
    return text, False
