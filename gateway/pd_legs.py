"""Opening an answer: the prefill leg per PD protocol, then the leg that answers.

The protocol is the decode instance's adapter capability, never a decision of this module:

* ``sequential`` (vLLM's KV connectors): the prefill leg runs to its end on the prefill
  instance; its reply's ``kv_transfer_params`` go into the decode leg's body.
* ``concurrent`` (SGLang's bootstrap room): both legs are sent at once with the same room; the
  prefill leg's reply is drained in a task, and a failure of it fails the answer.
* colocated: one leg does both.

The prefill leg's own prefix-cache hit (``usage.prompt_tokens_details.cached_tokens``) is
recorded: the decode engine counts every transferred token as cached, so the client's figure
comes from the prefill leg (:func:`pdgate.gateway.usage.with_cached_tokens`).

A request for a LoRA adapter first has it loaded on whichever of its instances lacks it
(:meth:`pdgate.gateway.lora_loader.LoraLoader.ensure`). A load the engine refused answers 503
(``lora_load_failed``, with ``Retry-After``): the refusal is remembered, so the next attempt is
placed where the adapter is, or can be loaded; an engine that did not answer is the leg's failure
on that instance (:class:`UpstreamFailed`: retried elsewhere, counted by its circuit breaker).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pdgate.adapters import HandoffError
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.instance_state import InstanceState, Lease
from pdgate.gateway.intake import Routed
from pdgate.gateway.legs import (
    Opened,
    UpstreamFailed,
    client_error,
    failure_reason,
    raced,
    read_all,
    send_leg,
)
from pdgate.gateway.lora_loader import LoraNotLoaded
from pdgate.gateway.placement import Placement
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.tracing import LORA_ADAPTER_ATTRIBUTE, LORA_LOADED_ATTRIBUTE, NO_LEG, LegTrace
from pdgate.gateway.usage import reported_cached_tokens
from pdgate.scheduler.estimates import decode_context_of, decode_seconds


class PdLegs:
    """Runs the legs of one answer; one per gateway."""

    def __init__(self, cluster: Cluster, upstream_timeout_s: float) -> None:
        self.cluster = cluster
        self.timeout_s = upstream_timeout_s

    async def send(self, state: InstanceState, path: str, body: dict[str, Any], request_id: str, leg: LegTrace) -> Any:
        return await send_leg(state, path, body, request_id, leg, self.timeout_s)

    async def open_answer(self, routed: Routed, placement: Placement, opened: Opened) -> None:
        """Run (sequential) or start (concurrent) the prefill leg, then send the answering leg.

        ``opened`` collects what is in flight as it goes, so that the caller can release it
        whatever happens.
        """
        decode, prefill = placement.decode, placement.prefill
        info = routed.info
        body = routed.body
        protocol = None
        # the decode batch counts the request from now, not from the hand-off: admission and
        # placement of the requests behind it see the streams already bound for each instance
        # (an on-demand LoRA load, below, may take seconds: the instance is not idle meanwhile)
        split = placement.split
        opened.decode_lease = self.cluster.lease(
            decode.spec.id,
            prefill_tokens=0 if split else info.prompt_tokens,
            decode_tokens=info.max_tokens,
            predicted_prefill_s=None if split else routed.obs.predicted.get("prefill_s", 0.0),
            context_tokens=decode_context_of(info),
            tpot_slo=info.slo.tpot_s,
            decode_s=decode_seconds(info, routed.obs.predicted),
        )
        opened.leases.append(opened.decode_lease)
        loaded = await self._ensure_lora(routed, placement) if info.lora is not None else ()
        if prefill is not None and placement.split:
            protocol = decode.adapter.capabilities.pd_protocol
            if protocol == "sequential":
                body = await self._sequential_prefill(routed, prefill, decode, body, prefill.spec.id in loaded)
            elif protocol == "concurrent":
                body = self._start_concurrent_prefill(routed, prefill, decode, body, opened)
            else:
                raise GatewayError(500, f"instance {decode.spec.id} ({decode.spec.kind}) cannot take a PD hand-off")
        obs = routed.obs
        obs.batch_at_send, obs.context_at_send = decode.decode_inflight, decode.decode_context_tokens
        obs.decode_sent = self.cluster.clock()
        opened.leg = answer_span(routed, placement, protocol, decode.spec.id in loaded)
        opened.upstream = await raced(
            send_leg(decode, routed.path, body, info.request_id, opened.leg, self.timeout_s), opened.prefill_task
        )
        self.cluster.record_sent_prompt(decode.spec.id, routed.hashes)

    async def _ensure_lora(self, routed: Routed, placement: Placement) -> list[str]:
        """Have the request's adapter loaded where it runs; the ids of the instances it was loaded on now."""
        info = routed.info
        assert info.lora is not None
        states = [placement.decode]
        if placement.prefill is not None and placement.split:
            states.append(placement.prefill)
        try:
            return await self.cluster.lora_loader.ensure(info.lora.name, info.model, states)
        except LoraNotLoaded as exc:
            if exc.unreachable:
                raise UpstreamFailed(exc.instance_id, exc.reason) from None
            raise GatewayError(
                503,
                f"LoRA adapter '{info.lora.name}' is not available on instance {exc.instance_id}: {exc.reason}",
                err_type="service_unavailable",
                code="lora_load_failed",
                headers={"Retry-After": "1"},
            ) from None

    async def _sequential_prefill(
        self, routed: Routed, prefill: InstanceState, decode: InstanceState, body: dict[str, Any], loaded: bool = False
    ) -> dict[str, Any]:
        """vLLM: prefill to the end, then the decode body with the hand-off the prefill returned."""
        lease = self.cluster.lease(
            prefill.spec.id,
            prefill_tokens=routed.info.prompt_tokens,
            predicted_prefill_s=routed.obs.predicted.get("prefill_s", 0.0),
        )
        leg = prefill_span(routed, prefill, loaded)
        status = None
        try:
            sent = self.cluster.clock()
            resp = await self.send(
                prefill, routed.path, prefill.adapter.prefill_body(body), routed.info.request_id, leg
            )
            status = resp.status
            reply = await read_all(prefill, resp)
            routed.obs.prefill_s = self.cluster.clock() - sent
            if resp.status >= 400:
                raise client_error(resp.status, reply)
            self.cluster.record_sent_prompt(prefill.spec.id, routed.hashes)
            self.cluster.record_success(prefill.spec.id)
            try:
                answer = json.loads(reply)
                handoff = prefill.adapter.handoff_from_prefill(answer)
            except (HandoffError, json.JSONDecodeError) as exc:
                raise UpstreamFailed(prefill.spec.id, str(exc)) from None
            routed.obs.prefill_cached_reported = reported_cached_tokens(answer)
            leg.end(status=status, attributes={"pdgate.prefill_s": routed.obs.prefill_s})
            return decode.adapter.decode_body(body, handoff)
        except BaseException as exc:
            leg.end(status=status, error=failure_reason(exc))
            raise
        finally:
            lease.release()

    def _start_concurrent_prefill(
        self, routed: Routed, prefill: InstanceState, decode: InstanceState, body: dict[str, Any], opened: Opened
    ) -> dict[str, Any]:
        """SGLang: both legs share a bootstrap room; the prefill leg runs in a task ``opened`` owns."""
        try:
            fields = decode.adapter.concurrent_fields(prefill.adapter)
        except HandoffError as exc:
            raise GatewayError(500, str(exc)) from None
        body = {**body, **fields}
        lease = self.cluster.lease(
            prefill.spec.id,
            prefill_tokens=routed.info.prompt_tokens,
            predicted_prefill_s=routed.obs.predicted.get("prefill_s", 0.0),
        )
        opened.leases.append(lease)
        opened.prefill_task = asyncio.create_task(self._concurrent_prefill(routed, prefill, body, lease))
        return body

    async def _concurrent_prefill(
        self, routed: Routed, prefill: InstanceState, body: dict[str, Any], lease: Lease
    ) -> UpstreamFailed | None:
        """SGLang's prefill leg: sent with the decode leg, its answer drained and checked.

        Returns the failure (instead of raising) so the decode leg can be abandoned for it.
        """
        leg = prefill_span(routed, prefill)
        status = error = None
        try:
            prefill_body = {k: v for k, v in body.items() if k != "stream_options"}  # only valid with stream: true
            prefill_body["stream"] = False
            resp = await self.send(prefill, routed.path, prefill_body, routed.info.request_id, leg)
            status = resp.status
            reply = await read_all(prefill, resp)
            if resp.status >= 400:
                failure = UpstreamFailed(prefill.spec.id, f"prefill leg answered HTTP {resp.status}")
                error = failure.reason
                return failure
            try:
                routed.obs.prefill_cached_reported = reported_cached_tokens(json.loads(reply))
            except json.JSONDecodeError:
                pass
            self.cluster.record_sent_prompt(prefill.spec.id, routed.hashes)
            self.cluster.record_success(prefill.spec.id)
            return None
        except UpstreamFailed as failure:
            error = failure.reason
            return failure
        except BaseException as exc:
            error = failure_reason(exc)
            raise
        finally:
            leg.end(status=status, error=error)
            lease.release()


def answer_span(routed: Routed, placement: Placement, protocol: str | None, lora_loaded: bool = False) -> LegTrace:
    """The span of the leg that answers (with a KV-transfer child after a PD hand-off, when streamed)."""
    if not routed.trace.enabled:
        return NO_LEG
    obs, info = routed.obs, routed.info
    predicted = obs.predicted
    attributes = {
        "pdgate.decode.batch_at_send": obs.batch_at_send,
        "pdgate.tpot_predicted_s": predicted.get("tpot_s"),
        "gen_ai.request.max_tokens": info.max_tokens,
        **lora_attributes(routed, lora_loaded),
    }
    if not obs.split:
        attributes.update(
            {
                "gen_ai.usage.input_tokens": info.prompt_tokens,
                "pdgate.prefix_hit_tokens": obs.prefill_cached,
                "pdgate.prefill_predicted_s": predicted.get("prefill_s"),
            }
        )
        return routed.trace.leg("generate", placement.decode, attributes)
    kv = None
    if routed.stream:
        kv = {
            "pdgate.kv.protocol": protocol,
            "pdgate.kv.from": obs.prefill_id,
            "pdgate.kv.to": obs.decode_id,
            "pdgate.kv.tokens": info.prompt_tokens,
            "pdgate.handoff_predicted_s": predicted.get("handoff_s"),
        }
    return routed.trace.leg("decode", placement.decode, attributes, kv_transfer=kv)


def prefill_span(routed: Routed, prefill: InstanceState, lora_loaded: bool = False) -> LegTrace:
    if not routed.trace.enabled:
        return NO_LEG
    obs, predicted = routed.obs, routed.obs.predicted
    return routed.trace.leg(
        "prefill",
        prefill,
        {
            "gen_ai.usage.input_tokens": routed.info.prompt_tokens,
            "pdgate.prefix_hit_tokens": obs.prefill_cached,
            "pdgate.prefill_predicted_s": predicted.get("prefill_s"),
            "pdgate.prefill_wait_predicted_s": predicted.get("wait_s"),
            **lora_attributes(routed, lora_loaded),
        },
    )


def lora_attributes(routed: Routed, loaded: bool) -> dict[str, Any]:
    """A leg's LoRA attributes: the adapter, and whether it was loaded there for this request."""
    lora = routed.info.lora
    if lora is None:
        return {}
    return {LORA_ADAPTER_ATTRIBUTE: lora.name, LORA_LOADED_ATTRIBUTE: loaded}
