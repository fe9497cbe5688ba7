"""The embedded simulated engine: vLLM's or SGLang's protocol, plus simulator capabilities.

Live migration (``POST /sim/migrate`` on the source, see docs/sim-engine.md): the source copies
the request's KV to the target in stages while it keeps decoding, stops it for a last short
copy, ends its stream, and returns the ``kv_transfer_params`` that the target's continuation
carries to take the KV.
"""

from __future__ import annotations

from pdgate.adapters.base import Capabilities, EngineAdapter, LiveMigration, MigrationError
from pdgate.adapters.sglang import SglangAdapter
from pdgate.adapters.vllm import VllmAdapter
from pdgate.common.http_client import UpstreamError


class SimLiveMigration(EngineAdapter):
    """The simulator's live migration API (a real engine with the same API could reuse it)."""

    async def live_migrate(self, request_id: str, target: EngineAdapter, *, timeout_s: float) -> LiveMigration:
        host, port, _ = target.origin
        body = {"request_id": request_id, "target": {"host": host, "port": port}}
        try:
            status, data = await self.call_json(
                "POST", "/sim/migrate", body, request_id=request_id, timeout_s=timeout_s
            )
        except (UpstreamError, ValueError) as exc:
            raise MigrationError(f"live migration call failed: {exc!r}") from None
        if status != 200:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise MigrationError(f"HTTP {status}: {message or data}")
        try:
            return LiveMigration(
                list(data["output_token_ids"]),
                {"kv_transfer_params": data["kv_transfer_params"]},
                float(data.get("downtime_s", 0.0)),
                len(data.get("stages") or ()),
            )
        except (KeyError, TypeError) as exc:
            raise MigrationError(f"malformed /sim/migrate answer: {exc!r}") from None


class SimVllmAdapter(SimLiveMigration, VllmAdapter):
    """The embedded simulated engine speaking vLLM's API."""

    capabilities = Capabilities(
        pd_protocol="sequential",
        metrics_flavour="vllm",
        kv_events=True,
        live_migration=True,
        flexible_role=True,
        colocates_on_decode=True,
        lora=True,
    )


class SimSglangAdapter(SimLiveMigration, SglangAdapter):
    """The embedded simulated engine speaking SGLang's API."""

    capabilities = Capabilities(pd_protocol="concurrent", metrics_flavour="sglang", live_migration=True)
