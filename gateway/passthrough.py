"""Routes the gateway passes to one engine as they are: pooling (embeddings, score, rerank) and tokenizers.

No prefill-decode split applies to them. A pooling request goes to the least loaded instance of
its model that serves ``both`` roles (a pooling model is not split), a tokenizer request to the
least loaded instance of its model in any role (every engine of a model tokenizes alike). A
request that fails to reach an engine, or that an engine answers 5xx, is tried on the next one
(the calls change nothing on the engine); an engine's 4xx (say, a generative model asked for
embeddings) reaches the client in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Any

from pdgate.common.http_server import HttpRequest, Responder
from pdgate.common.json_codec import JsonError, json_decode
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.instance_state import InstanceState
from pdgate.gateway.intake import answer_id, request_id_of, request_ids
from pdgate.gateway.legs import UpstreamFailed, client_error, read_all, send_leg
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.requests import GatewayError, json_object
from pdgate.gateway.tenant_service import TenantService
from pdgate.gateway.tracing import NO_LEG

POOLING_ROUTES = ("/v1/embeddings", "/v1/score", "/v1/rerank")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")


class PassThrough:
    """Serves the pass-through routes; one per gateway."""

    def __init__(
        self, config: GatewayConfig, cluster: Cluster, metrics: GatewayMetrics, tenants: TenantService | None = None
    ) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.tenants = tenants  # tenants configured: named, counted and budgeted here too
        self.timeout_s = config.upstream_timeout_s
        self.models = [m.name for m in config.models]
        self._ids = request_ids("p")

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        """Answer one pass-through request from the engine chosen for it (every answer, errors
        too, with its ``X-Request-Id``)."""
        header_id = request.headers.get("x-request-id")
        try:
            body = json_object(request.body)
            pooling = request.path in POOLING_ROUTES
            model = self._model(body, required=pooling)
            request_id = request_id_of(header_id, self._ids)
            tenant = self.tenants.admit_call(request.headers, request.path) if self.tenants is not None else None
        except GatewayError as err:
            err.headers.setdefault("X-Request-Id", answer_id(header_id, self._ids))
            raise
        try:
            status, reply, content_type = await self._forward(request.path, body, model, request_id, pooling)
        except GatewayError as err:
            self.metrics.count(request.path, model, err.status)
            if tenant is not None and self.tenants is not None:
                self.tenants.call_ended(tenant, err.status, 0)
            err.headers.setdefault("X-Request-Id", request_id)
            raise
        self.metrics.count(request.path, model, status)
        if tenant is not None and self.tenants is not None:
            self.tenants.call_ended(tenant, status, input_tokens(reply))
        responder.send(status, reply, content_type=content_type, headers={"X-Request-Id": request_id})

    def _model(self, body: dict[str, Any], *, required: bool) -> str:
        model = body.get("model")
        if model is None and not required and len(self.models) == 1:
            return self.models[0]  # as an engine does: its one model when none is named
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "`model` is required (a string naming a served model)", param="model")
        if model not in self.models:
            raise GatewayError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model

    def candidates(self, model: str, pooling: bool) -> list[InstanceState]:
        """The instances that may answer, least loaded first (healthy, not draining; ``both`` for pooling)."""
        now = self.cluster.clock()
        states = [
            s
            for s in self.cluster.for_model(model)
            if s.breaker.allows(now) and not s.draining and (not pooling or s.role == "both")
        ]
        return sorted(states, key=_load_key)

    async def _forward(
        self, path: str, body: dict[str, Any], model: str, request_id: str, pooling: bool
    ) -> tuple[int, bytes, str]:
        states = self.candidates(model, pooling)
        if not states:
            what = "colocated (role both) instance" if pooling else "healthy instance"
            raise GatewayError(503, f"no {what} of `{model}` can serve {path} now", headers={"Retry-After": "1"})
        failures: list[str] = []
        for state in states:
            lease = self.cluster.lease(state.spec.id)
            try:
                reply = await send_leg(state, path, body, request_id, NO_LEG, self.timeout_s)
                data = await read_all(state, reply)
            except UpstreamFailed as failed:
                self.cluster.record_failure(failed.instance_id, failed.reason)
                failures.append(str(failed))
                continue
            finally:
                lease.release()
            if reply.status >= 400:
                raise client_error(reply.status, data)
            self.cluster.record_success(state.spec.id)
            return reply.status, data, reply.headers.get("content-type", "application/json")
        raise GatewayError(
            502, f"no engine answered {path}: " + "; ".join(failures)[:500], headers={"Retry-After": "1"}
        )


def input_tokens(reply: bytes) -> int:
    """The input tokens an engine's answer reports (``usage.prompt_tokens`` or ``total_tokens``; 0 without)."""
    try:
        usage = json_decode(reply).get("usage") or {}
        return int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
    except (JsonError, AttributeError, TypeError, ValueError):
        return 0


def _load_key(state: InstanceState) -> tuple[int, int, float]:
    load = state.load
    return (state.inflight_requests, load.waiting + load.running if load else 0, load.kv_usage if load else 0.0)
