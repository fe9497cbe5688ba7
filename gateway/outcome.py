"""The outcome recorder: what happened to each request, in metrics, spans, logs and the cost model's log.

Called once per request when it ends: :meth:`OutcomeRecorder.completed` for an answer (predicted
vs actual TTFT/TPOT/output length, SLO met, the cost model's training record),
:meth:`OutcomeRecorder.failed` for a request that got no answer; plus the per-response counters
and the circuit breaker's record of a failed leg.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.intake import Routed
from pdgate.gateway.legs import UpstreamFailed
from pdgate.gateway.logs import ACCESS_LOGGER, request_fields
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.tracing import RequestTrace

access_log = logging.getLogger(ACCESS_LOGGER)

_USAGE_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def output_tokens(routed: Routed) -> int | None:
    """The output tokens the client got: from the usage when the engine reported it, else counted."""
    obs = routed.obs
    counts = _USAGE_TOKENS.findall(obs.usage_chunk)  # the last one: continuous usage stats grow per event
    tokens = int(counts[-1]) if counts else obs.output_tokens
    if tokens is None and routed.stream:
        # one SSE event per token, less [DONE], a chat stream's role-only first event
        tokens = max(0, obs.events - 1 - (1 if routed.kind == "chat" else 0))
    return tokens


class OutcomeRecorder:
    """Records request outcomes; one per gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        metrics: GatewayMetrics,
        costs: CostModelService | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.metrics = metrics
        self.costs = costs

    def answered(self, routed: Routed, status: int) -> None:
        """The client got a response with ``status`` (the answer may still be streaming)."""
        routed.obs.status = status
        self.metrics.count(routed.route, routed.info.model, status)

    def leg_failed(self, failure: UpstreamFailed) -> None:
        """A leg failed on an instance: its circuit breaker and the failure counter learn of it."""
        self.cluster.record_failure(failure.instance_id, failure.reason)
        self.metrics.observe_failure(failure.instance_id)

    def completed(self, routed: Routed) -> None:
        """Record predicted vs actual (metrics, span, access log) and hand the request's record to the cost model."""
        obs = routed.obs
        info = routed.info
        tokens = output_tokens(routed)
        timing: dict[str, float | None] = {"queued_s": obs.queued_s, "prefill_s": obs.prefill_s}
        if obs.first_token is not None:
            timing["ttft_s"] = obs.first_token - info.arrival
            if obs.decode_sent is not None and obs.split:
                timing["handoff_s"] = obs.first_token - obs.decode_sent
            if tokens and tokens >= 2 and obs.last_token is not None and obs.last_token > obs.first_token:
                timing["tpot_s"] = (obs.last_token - obs.first_token) / (tokens - 1)
        if obs.last_token is not None:
            timing["e2e_s"] = obs.last_token - info.arrival
        self.metrics.observe_request(info, obs, timing, tokens)
        self._traced_end(routed, timing, tokens)
        if self.costs is not None and routed.features is not None:
            self.costs.observe(self._cost_record(routed, timing, tokens))

    def _cost_record(self, routed: Routed, timing: Mapping[str, float | None], tokens: int | None) -> dict[str, Any]:
        """The cost model's training record of one request (no prompt text unless configured)."""
        obs, info = routed.obs, routed.info
        assert routed.features is not None and self.costs is not None
        slo, current = info.slo, self.costs.current
        record: dict[str, Any] = {
            "v": 1,
            "kind": "pdgate-request",
            "ts": time.time(),
            "request_id": info.request_id,
            **routed.features.to_record(),
        }
        if routed.prompt_text is not None and self.config.cost_model.log_prompt_text:
            record["prompt_text"] = routed.prompt_text
        # one key at a time (the log's key order), rather than through a dict built to be merged
        record["output_tokens"] = tokens
        record["slo"] = {"class": slo.slo_class, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "priority": slo.priority}
        record["timing"] = dict(timing)
        record["placement"] = {
            "prefill": obs.prefill_id,
            "prefill_group": obs.prefill_group,
            "prefill_cached_tokens": obs.prefill_cached,
            "prefill_idle": obs.prefill_idle,
            "decode": obs.decode_id,
            "decode_group": obs.decode_group,
            "split": obs.split,
            "decode_batch": (obs.batch_at_send + obs.batch_at_end) / 2,
            "decode_context_tokens": (obs.context_at_send + obs.context_at_end) / 2,
            "decode_prefill_share": round(obs.decode_prefill_share, 4),
        }
        record["predicted"] = obs.predicted
        # the version that predicted it (a refit may have put another in force since)
        record["cost_model"] = obs.cost_model_version or (current.version if current is not None else None)
        return record

    def _traced_end(self, routed: Routed, timing: Mapping[str, float | None], tokens: int | None) -> None:
        """End the request's span with what happened, and write its access-log line."""
        traced = routed.trace.enabled
        logged = access_log.isEnabledFor(logging.INFO)
        if not traced and not logged:
            return
        obs, info, predicted = routed.obs, routed.info, routed.obs.predicted
        ttft, tpot = timing.get("ttft_s"), timing.get("tpot_s")
        met = info.slo.met(ttft, tpot) if ttft is not None else None
        if traced:
            routed.trace.finish(
                obs.status,
                {
                    "gen_ai.usage.output_tokens": tokens,
                    "pdgate.attempts": obs.attempts,
                    "pdgate.queued_s": obs.queued_s,
                    "pdgate.ttft_s": ttft,
                    "pdgate.tpot_s": tpot,
                    "pdgate.e2e_s": timing.get("e2e_s"),
                    "pdgate.prefill_s": obs.prefill_s,
                    "pdgate.handoff_s": timing.get("handoff_s"),
                    "pdgate.ttft_predicted_s": predicted.get("ttft_s"),
                    "pdgate.tpot_predicted_s": predicted.get("tpot_s"),
                    "pdgate.output_tokens_predicted": predicted.get("output_median"),
                    "pdgate.output_tokens_predicted_high": predicted.get("output_high"),
                    "pdgate.prefill.instance": obs.prefill_id if obs.split else None,
                    "pdgate.decode.instance": obs.decode_id,
                    "pdgate.prefix_hit_tokens": obs.prefill_cached,
                    "pdgate.slo.met": met,
                },
                error=obs.error,
            )
        if logged:
            access_log.info(
                "%s %s %d",
                "POST",
                routed.route,
                obs.status,
                extra={
                    **request_fields(info.request_id, routed.trace.trace_id),
                    "access": {
                        "route": routed.route,
                        "model": info.model,
                        "status": obs.status,
                        "stream": routed.stream,
                        "prefill": obs.prefill_id if obs.split else None,
                        "decode": obs.decode_id,
                        "attempts": obs.attempts,
                        "prompt_tokens": info.prompt_tokens,
                        "output_tokens": tokens,
                        "cached_tokens": obs.cached_tokens,
                        "slo_class": info.slo.slo_class,
                        "slo_met": met,
                        **{k: round(v, 6) for k, v in timing.items() if v is not None},
                    },
                },
            )

    def failed(self, routed: Routed | None, trace: RequestTrace, route: str, status: int, reason: str | None) -> None:
        """A request that got no answer (an error response, or its client went away first)."""
        model = routed.info.model if routed is not None else ""
        self.metrics.count(route, model, status)
        trace.finish(status, {}, error=reason or str(status))
        if access_log.isEnabledFor(logging.INFO):
            request_id = routed.info.request_id if routed is not None else None
            access_log.info(
                "%s %s %d",
                "POST",
                route,
                status,
                extra={
                    **request_fields(request_id, trace.trace_id),
                    "access": {"route": route, "model": model or None, "status": status, "error": reason},
                },
            )
