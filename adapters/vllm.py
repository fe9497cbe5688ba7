"""vLLM with a KV connector: the sequential ``kv_transfer_params`` hand-off (NixlConnector)."""

from __future__ import annotations

from typing import Any

from pdgate.adapters.base import Capabilities, EngineAdapter, HandoffError


class VllmAdapter(EngineAdapter):
    """vLLM with a KV connector (NixlConnector's ``kv_transfer_params`` protocol)."""

    capabilities = Capabilities(
        pd_protocol="sequential",
        metrics_flavour="vllm",
        kv_events=True,
        flexible_role=True,
        colocates_on_decode=True,
        lora=True,
    )

    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        prefill = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
        prefill.update(
            stream=False,
            max_tokens=1,
            min_tokens=1,  # never EOS on the single prefill token: vLLM only hands off on length
            kv_transfer_params={
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        )
        return prefill

    def handoff_from_prefill(self, reply: dict[str, Any]) -> dict[str, Any]:
        params = reply.get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise HandoffError("the prefill instance returned no kv_transfer_params (is its KV connector configured?)")
        return {"kv_transfer_params": params}
