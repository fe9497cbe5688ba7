"""vLLM's runtime LoRA routes on the simulated engine: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

They exist only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` allows them (:func:`lora_routes`), as in
vLLM; the answers are vLLM's (:mod:`engines.sim.lora`). Without ``--enable-lora`` a load is
vLLM's ``500`` (``LoRA is not enabled. Use --enable-lora to enable LoRA.``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from pdgate.engines.sim.lora import LoraRegistry, runtime_lora_updating
from pdgate.engines.sim.protocol import ApiError, json_of, parse_request, read_body
from pdgate.engines.sim.reply import Reply
from pdgate.engines.sim.state import SimState, check_auth, reply_route

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's ``UnloadLoRAAdapterRequest``."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None


def _registry(state: SimState) -> LoraRegistry:
    if state.loras is None:
        raise ApiError(500, "LoRA is not enabled. Use --enable-lora to enable LoRA.", err_type="InternalServerError")
    return state.loras


def load_adapter(state: SimState, headers: Mapping[str, str], body: Any) -> str:
    """Serve one load; the success text, or :class:`ApiError` with vLLM's answer."""
    check_auth(state, headers)
    req: LoadLoraAdapterRequest = parse_request(LoadLoraAdapterRequest, json_of(body))
    _registry(state).load(req.lora_name, req.lora_path, load_inplace=req.load_inplace)
    return f"Success: LoRA adapter '{req.lora_name}' added successfully."


def unload_adapter(state: SimState, headers: Mapping[str, str], body: Any) -> str:
    """Serve one unload; the success text, or :class:`ApiError` with vLLM's answer."""
    check_auth(state, headers)
    req: UnloadLoraAdapterRequest = parse_request(UnloadLoraAdapterRequest, json_of(body))
    _registry(state).unload(req.lora_name)
    return f"Success: LoRA adapter '{req.lora_name}' removed successfully."


async def handle_load_lora(state: SimState, request: web.Request, reply: Reply) -> None:
    await reply.text(200, load_adapter(state, request.headers, await read_body(request)))


async def handle_unload_lora(state: SimState, request: web.Request, reply: Reply) -> None:
    await reply.text(200, unload_adapter(state, request.headers, await read_body(request)))


def runtime_lora_routes(state: SimState) -> bool:
    """Whether the engine serves the two routes: a vLLM-flavour engine whose environment allows runtime
    LoRA updating (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``), as vLLM decides it; else they are 404s."""
    return state.config.api == "vllm" and runtime_lora_updating()


def lora_routes(state: SimState) -> list[web.RouteDef]:
    """The routes to add to the engine's app (none where :func:`runtime_lora_routes` says no)."""
    if not runtime_lora_routes(state):
        return []
    return [
        web.post(LOAD_PATH, reply_route(handle_load_lora)),
        web.post(UNLOAD_PATH, reply_route(handle_unload_lora)),
    ]
