"""Serving one OpenAI request: validate, tokenize, place, drive the legs, relay the stream.

Placement runs the scheduling profiles on an immutable snapshot: ``prefill`` then ``decode``
for a model with PD instances, ``colocated`` otherwise. Execution depends only on the adapters'
capabilities: a sequential hand-off (vLLM ``kv_transfer_params``: prefill, then decode with the
returned params), a concurrent one (SGLang bootstrap room: both legs at once, the answer from
decode), or one colocated leg. A leg that fails before the first byte reaches the client is
retried once on other instances; the client's disconnect closes every upstream connection,
which aborts the request on the engines. In-flight accounting is released at the end of the
stream, not at response headers.

Every request gets a :class:`gateway.tracing.RequestTrace` (the empty one when tracing is off):
its spans are opened and closed here, and each engine call carries its leg's ``traceparent``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pdgate.adapters import HandoffError, MigrationError, UpstreamError, UpstreamResponse
from pdgate.common.http_server import HttpRequest, Responder
from pdgate.common.tokenizer import Tokenizer
from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.cluster import Cluster, InstanceState, Lease, PromptHashes
from pdgate.gateway.config import GatewayConfig, ModelConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.livestream import Handover, LiveStream, MidStreamFailure
from pdgate.gateway.logs import ACCESS_LOGGER, request_fields
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.requests import ChatBody, CompletionBody, GatewayError, parse_body
from pdgate.gateway.slo import APP_HEADER, SloResolver
from pdgate.gateway.splice import (
    StreamTrail,
    continuation_body,
    pinned_reason,
    wants_token_ids,
)
from pdgate.gateway.tracing import NO_LEG, NO_TRACE, LegTrace, RequestTrace, Tracing
from pdgate.scheduler.costmodel.features import RequestFeatures, chat_text, hash_text
from pdgate.scheduler.estimates import decode_context_of, tpot_estimate
from pdgate.scheduler.framework import Decision, Profile, run_profile
from pdgate.scheduler.snapshot import ClusterSnapshot, RequestInfo

log = logging.getLogger("pdgate.proxy")
access_log = logging.getLogger(ACCESS_LOGGER)

DEFAULT_COMPLETION_MAX_TOKENS = 16
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # the status recorded for a request whose client went away (nginx's convention)
ROUTES = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
_USAGE_KEY = b'"completion_tokens"'
_USAGE_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


class UpstreamFailed(Exception):
    """A leg failed before anything reached the client: safe to retry elsewhere."""

    def __init__(self, instance_id: str, reason: str) -> None:
        super().__init__(f"{instance_id}: {reason}")
        self.instance_id = instance_id
        self.reason = reason


@dataclass
class Observation:
    """What the gateway predicted for a request and what then happened (seconds, monotonic clock)."""

    queued_s: float = 0.0
    prefill_id: str | None = None
    prefill_group: str | None = None
    prefill_cached: int = 0
    prefill_idle: bool = False
    decode_id: str | None = None
    decode_group: str | None = None
    split: bool = False
    batch_at_send: int = 0
    context_at_send: int = 0
    predicted: dict[str, float] = field(default_factory=dict)
    prefill_s: float | None = None
    decode_sent: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    events: int = 0
    usage_chunk: bytes = b""  # the piece of the answer that carried the usage (output tokens), if any
    batch_at_end: int = 0
    context_at_end: int = 0
    saw_done: bool = False  # the stream's [DONE] went out (a client may hang up right after it)
    moves: int = 0  # times the stream moved to another instance (migration, failover)
    output_tokens: int | None = None  # counted from the token ids the client got (streams that can move)
    status: int = 0  # the HTTP status the client got
    error: str | None = None  # why the answer failed after it started (mid-stream)
    attempts: int = 1


@dataclass
class Routed:
    """A validated request, ready to place."""

    kind: str  # "completion" | "chat"
    path: str
    body: dict[str, Any]
    info: RequestInfo
    prompt_ids: list[int]
    hashes: PromptHashes
    stream: bool
    features: RequestFeatures | None = None
    prompt_text: str | None = None  # for the request log and span only when configured (never otherwise)
    obs: Observation = field(default_factory=Observation)
    trace: RequestTrace = NO_TRACE
    movable: bool = False  # a stream that can continue on another instance (migration, failover)
    want_ids: bool = False  # the client asked for token ids itself


@dataclass(eq=False)
class Opened:
    """The legs of one answer in flight; :meth:`close` aborts what is unfinished and releases the leases."""

    decode: InstanceState
    upstream: UpstreamResponse | None = None
    prefill_task: asyncio.Task[UpstreamFailed | None] | None = None
    leases: list[Lease] = field(default_factory=list)
    decode_lease: Lease | None = None
    leg: LegTrace = NO_LEG

    async def close(self) -> None:
        if self.prefill_task is not None and not self.prefill_task.done():
            self.prefill_task.cancel()
            await asyncio.gather(self.prefill_task, return_exceptions=True)
        if self.upstream is not None:
            self.upstream.close()  # unless read to its end, this aborts the request on the engine
        for lease in self.leases:
            lease.release()


@dataclass
class Placement:
    decode: InstanceState  # the instance that streams the answer (colocated: the only one)
    prefill: InstanceState | None
    decisions: list[Decision]


class Proxy:
    """The request path; one per gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        profiles: dict[str, Profile],
        tokenizers: dict[str, Tokenizer],
        metrics: GatewayMetrics,
        *,
        admission: AdmissionController | None = None,
        costs: CostModelService | None = None,
        tracing: Tracing | None = None,
        migrations: MigrationController | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.profiles = profiles
        self.tokenizers = tokenizers
        self.models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self.metrics = metrics
        self.admission = admission
        self.costs = costs
        self.tracing = tracing
        self.slo = SloResolver(config.slo)
        self.migrations = migrations
        if migrations is not None:
            migrations.mover = self.move
        prefix = uuid.uuid4().hex[:12]
        self._ids = (f"pdgate-{prefix}-{n}" for n in itertools.count())  # unique per gateway process

    # --------------------------------------------------------------- entry
    async def handle(self, request: HttpRequest, responder: Responder, kind: str) -> None:
        route = ROUTES[kind]
        trace = self.tracing.start_request(route, request.headers) if self.tracing is not None else NO_TRACE
        routed: Routed | None = None
        try:
            routed = self._validate(
                request.body,
                kind,
                request.headers.get("x-request-id"),
                headers=request.headers,
                arrival=self.cluster.clock(),
            )
            routed.trace = trace
            if trace.enabled:
                trace.validated(_request_attributes(routed), routed.prompt_text)
            await self._serve(routed, responder)
        except GatewayError as err:
            self._failed(routed, trace, route, err.status, err.code or err.err_type)
            raise
        except asyncio.CancelledError:
            if routed is None or not routed.obs.saw_done:
                self._failed(routed, trace, route, CLIENT_CLOSED, "client_disconnected")
            raise
        except Exception as exc:
            self._failed(routed, trace, route, 500, type(exc).__name__)
            raise

    async def _serve(self, routed: Routed, responder: Responder) -> None:
        """Admit, place and execute ``routed``, retrying a leg that failed before the first byte."""
        trace = routed.trace
        snapshot = None  # admitted at once: the snapshot admission judged on is still current
        if self.admission is not None:
            trace.admission_started()
            try:
                info, outcome = await self.admission.admit(routed.info, self._snapshot_for(routed))
            except GatewayError as err:
                trace.admission_rejected(
                    err.status, err.headers.get("x-pdgate-reject-reason") or err.code or err.message
                )
                raise
            trace.admitted(outcome)
            routed.info = info
            routed.obs.queued_s = outcome.queued_s
            snapshot = outcome.snapshot
        excluded: set[str] = set()
        last_error = "no instance could serve the request"
        attempts = 1 + self.config.retries
        for attempt in range(1, attempts + 1):
            placement = self._place(routed, excluded, snapshot, attempt)
            snapshot = None
            try:
                await self._execute(responder, routed, placement)
                self._completed(routed)
                return
            except asyncio.CancelledError:
                if routed.obs.saw_done:  # the client read the whole answer and hung up first
                    self._completed(routed)
                raise
            except UpstreamFailed as failure:
                excluded.add(failure.instance_id)
                self._record_failure(failure)
                self.metrics.retries.labels(model=routed.info.model).inc()
                if attempt < attempts:
                    trace.retry(attempt + 1, failure.instance_id, failure.reason)
                last_error = str(failure)
        raise GatewayError(502, f"upstream failed: {last_error}", headers={"Retry-After": RETRY_AFTER_S})

    def _record_failure(self, failure: UpstreamFailed) -> None:
        self.cluster.record_failure(failure.instance_id, failure.reason)
        self.metrics.observe_failure(failure.instance_id)

    def _snapshot_for(self, routed: Routed):
        costs = self.costs
        return lambda info: self.cluster.snapshot(
            info.model, routed.hashes, costs.current if costs is not None else None
        )

    # ---------------------------------------------------------- validation
    def _validate(
        self,
        raw: bytes,
        kind: str,
        header_id: str | None,
        *,
        headers: Mapping[str, str] | None = None,
        arrival: float = 0.0,
    ) -> Routed:
        headers = headers or {}
        body, parsed = parse_body(raw, CompletionBody if kind == "completion" else ChatBody)
        model = self.models.get(parsed.model)
        if model is None:
            raise GatewayError(
                404, f"The model `{parsed.model}` does not exist.", param="model", code="model_not_found"
            )
        tokenizer = self.tokenizers[model.name]
        text = ""
        if kind == "completion":
            prompt = parsed.prompt
            if isinstance(prompt, str):
                text = prompt
                prompt_ids = tokenizer.encode(prompt, add_special_tokens=parsed.add_special_tokens)
            else:
                prompt_ids = list(prompt)
            body["prompt"] = prompt_ids  # the ids we hash are the ids the engine sees
            max_tokens = parsed.max_tokens if parsed.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        else:
            try:
                text = tokenizer.apply_chat_template(
                    parsed.messages,
                    add_generation_prompt=parsed.add_generation_prompt,
                    tools=parsed.tools,
                    **(parsed.chat_template_kwargs or {}),
                )
                prompt_ids = tokenizer.encode(text, add_special_tokens=parsed.add_special_tokens)
                text = chat_text(parsed.messages)
            except (ValueError, KeyError, TypeError) as exc:
                raise GatewayError(400, f"invalid messages: {exc}", param="messages") from None
            limit = parsed.max_completion_tokens if parsed.max_completion_tokens is not None else parsed.max_tokens
            max_tokens = limit if limit is not None else model.max_model_len - len(prompt_ids)
        if not prompt_ids:
            raise GatewayError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) + max_tokens > model.max_model_len or len(prompt_ids) >= model.max_model_len:
            raise GatewayError(
                400,
                f"This model's maximum context length is {model.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if header_id is not None and not _valid_request_id(header_id):
            raise GatewayError(400, "X-Request-Id must be 1-256 printable ASCII characters without spaces")
        request_id = header_id or next(self._ids)
        path = ROUTES[kind]
        slo = self.slo.resolve(headers, path)
        states = self.cluster.for_model(model.name)
        hashes = PromptHashes.of(prompt_ids, (s.spec.block_size for s in states))
        first_chain = next(iter(hashes.by_block_size.values()), [])
        tag = headers.get(APP_HEADER)
        features = output = None
        if self.costs is not None and self.costs.current is not None:
            features = RequestFeatures(
                len(prompt_ids), max_tokens, kind, model.name, tag, hash_text(text) if text else {}
            )
            output = self.costs.current.output.predict(features)
        info = RequestInfo(
            request_id=request_id,
            model=model.name,
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            block_hashes=tuple(first_chain),
            priority=slo.priority,
            tags={"app": tag} if tag else {},
            slo=slo,
            output=output,
            arrival=arrival,
        )
        movable = False
        want_ids = wants_token_ids(body)
        migration = self.config.migration
        if parsed.stream and (migration.failover or migration.enabled) and pinned_reason(body, parsed.stream) is None:
            movable = True
            body["return_token_ids"] = True  # the ids the client got are where a continuation starts
        keep = self.config.cost_model.log_prompt_text or (
            self.tracing is not None and self.tracing.settings.record_prompt_text
        )
        keep_text = text if keep else None
        return Routed(
            kind,
            path,
            body,
            info,
            prompt_ids,
            hashes,
            parsed.stream,
            features,
            keep_text,
            movable=movable,
            want_ids=want_ids,
        )

    # ----------------------------------------------------------- placement
    def _place(
        self, routed: Routed, excluded: set[str], snapshot: ClusterSnapshot | None = None, attempt: int = 1
    ) -> Placement:
        started = time.perf_counter()
        model = routed.info.model
        if snapshot is None:
            snapshot = self._snapshot_for(routed)(routed.info)
        candidates = [i for i in snapshot.instances if i.id not in excluded]
        if self.cluster.has_pd(model):
            prefill = self._decide("prefill", routed, snapshot, candidates)
            decode = self._decide(
                "decode", routed, snapshot, [c for c in candidates if c.id != prefill.instance_id] or candidates
            )
            placement = Placement(
                self.cluster.instances[decode.instance_id],
                self.cluster.instances[prefill.instance_id],
                [prefill, decode],
            )
        else:
            only = self._decide("colocated", routed, snapshot, candidates)
            placement = Placement(self.cluster.instances[only.instance_id], None, [only])
        for decision in placement.decisions:
            for plugin in self.profiles[decision.profile].plugins:
                plugin.on_sent(routed.info, decision.instance, decision.profile)
        self._predict(routed, placement, snapshot)
        routed.obs.attempts = attempt
        if routed.trace.enabled:
            routed.trace.scheduled(
                attempt,
                started,
                time.perf_counter(),
                placement.decisions,
                {
                    "pdgate.excluded": sorted(excluded),
                    "pdgate.prefill.instance": routed.obs.prefill_id if routed.obs.split else None,
                    "pdgate.decode.instance": routed.obs.decode_id,
                    "pdgate.prefix_hit_tokens": routed.obs.prefill_cached,
                    "pdgate.ttft_predicted_s": routed.obs.predicted.get("ttft_s"),
                },
            )
        return placement

    def _predict(self, routed: Routed, placement: Placement, snapshot: ClusterSnapshot) -> None:
        """Record where the request goes and what the cost model expects there (reset per attempt)."""
        info = routed.info
        obs = routed.obs = Observation(queued_s=routed.obs.queued_s)
        first = placement.prefill or placement.decode
        first_view = snapshot.by_id(first.spec.id)
        decode_view = snapshot.by_id(placement.decode.spec.id)
        obs.prefill_id, obs.prefill_group = first.spec.id, first.cost_group
        obs.decode_id, obs.decode_group = placement.decode.spec.id, placement.decode.cost_group
        obs.split = placement.prefill is not None and placement.prefill is not placement.decode
        obs.prefill_cached = min(snapshot.prefix_hit_tokens.get(first.spec.id, 0), max(0, info.prompt_tokens - 1))
        obs.prefill_idle = first_view is not None and first_view.prefill_inflight == 0
        self.metrics.observe_prefix(first.spec.id, info.prompt_tokens, obs.prefill_cached)
        costs = snapshot.costs
        if costs is None or first_view is None or decode_view is None:
            return
        predicted = obs.predicted
        predicted["prefill_s"] = costs.prefill_s(
            first_view, info.prompt_tokens - obs.prefill_cached, obs.prefill_cached
        )
        predicted["wait_s"] = first_view.prefill_wait_s
        predicted["handoff_s"] = costs.handoff_s(decode_view, info.prompt_tokens) if obs.split else 0.0
        predicted["ttft_s"] = obs.queued_s + predicted["wait_s"] + predicted["prefill_s"] + predicted["handoff_s"]
        predicted["tpot_s"] = tpot_estimate(info, decode_view, costs)
        if info.output is not None:
            predicted["output_median"] = info.output.median
            predicted["output_high"] = info.output.high

    def _decide(self, profile_name: str, routed: Routed, snapshot: ClusterSnapshot, candidates: list) -> Decision:
        decision = run_profile(self.profiles[profile_name], routed.info, snapshot, candidates)
        for plugin, seconds in decision.plugin_seconds.items():
            self.metrics.observe_plugin(profile_name, plugin, seconds)
        if decision.instance is None:
            reason = (
                f"filter '{decision.rejected_by}' left no instance" if decision.rejected_by else "no candidate instance"
            )
            raise GatewayError(
                503,
                f"no healthy instance can serve model '{routed.info.model}' ({profile_name}: {reason})",
                err_type="service_unavailable",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        return decision

    # ----------------------------------------------------------- execution
    async def _execute(self, responder: Responder, routed: Routed, placement: Placement) -> None:
        opened = Opened(placement.decode)
        try:
            await self._open_answer(routed, placement, opened)
            assert opened.upstream is not None
            await self._relay(
                responder,
                routed,
                placement.decode,
                opened.upstream,
                opened.prefill_task,
                opened.decode_lease,
                opened.leg,
            )
            obs = routed.obs
            obs.batch_at_end, obs.context_at_end = (
                placement.decode.decode_inflight,
                placement.decode.decode_context_tokens,
            )
            if opened.prefill_task is not None and (failure := await opened.prefill_task) is not None:
                self._record_failure(failure)
            self.cluster.record_success(obs.decode_id or placement.decode.spec.id)
            opened.leg.end(status=opened.upstream.status, error=obs.error)
        except BaseException as exc:
            opened.leg.end(
                status=opened.upstream.status if opened.upstream is not None else None, error=_failure_reason(exc)
            )
            raise
        finally:
            await opened.close()

    async def _open_answer(self, routed: Routed, placement: Placement, opened: Opened) -> None:
        """Run (sequential) or start (concurrent) the prefill leg, then send the answering leg.

        ``opened`` collects what is in flight as it goes, so that the caller can release it
        whatever happens.
        """
        decode, prefill = placement.decode, placement.prefill
        info = routed.info
        body = routed.body
        protocol = None
        if prefill is not None and prefill is not decode:
            protocol = decode.adapter.capabilities.pd_protocol
            if protocol == "sequential":
                body = await self._sequential_prefill(routed, prefill, decode, opened.leases, body)
            elif protocol == "concurrent":
                try:
                    fields = decode.adapter.concurrent_fields(prefill.adapter)
                except HandoffError as exc:
                    raise GatewayError(500, str(exc)) from None
                body = {**body, **fields}
                opened.leases.append(
                    self.cluster.lease(
                        prefill.spec.id,
                        prefill_tokens=info.prompt_tokens,
                        predicted_prefill_s=routed.obs.predicted.get("prefill_s", 0.0),
                    )
                )
                opened.prefill_task = asyncio.create_task(
                    self._concurrent_prefill(routed, prefill, body, opened.leases[-1])
                )
            else:
                raise GatewayError(500, f"instance {decode.spec.id} ({decode.spec.kind}) cannot take a PD hand-off")
        split = prefill is not None and prefill is not decode
        opened.decode_lease = self.cluster.lease(
            decode.spec.id,
            prefill_tokens=0 if split else info.prompt_tokens,
            decode_tokens=info.max_tokens,
            predicted_prefill_s=None if split else routed.obs.predicted.get("prefill_s", 0.0),
            context_tokens=decode_context_of(info),
            tpot_slo=info.slo.tpot_s,
        )
        opened.leases.append(opened.decode_lease)
        obs = routed.obs
        obs.batch_at_send, obs.context_at_send = decode.decode_inflight, decode.decode_context_tokens
        obs.decode_sent = self.cluster.clock()
        opened.leg = self._decode_leg(routed, placement, protocol)
        opened.upstream = await self._racing_prefill(
            self._open(decode, routed.path, body, info.request_id, opened.leg), opened.prefill_task
        )
        self.cluster.record_sent_prompt(decode.spec.id, routed.hashes)

    # ------------------------------------------------------------ migration
    def _mechanism(self, source: InstanceState, target: InstanceState) -> str:
        """How a running request moves from ``source`` to ``target`` (``migration.mechanism``, or auto)."""
        forced = self.config.migration.mechanism
        live = (
            source.adapter.capabilities.live_migration
            and target.adapter.capabilities.live_migration
            and source.spec.kind == target.spec.kind
        )
        pd = self.cluster.has_pd(source.spec.model) and target.adapter.capabilities.pd_protocol != "none"
        if forced == "live" and live or forced == "pd" and pd or forced == "recompute":
            return forced
        return "live" if live else "pd" if pd else "recompute"

    async def move(self, live: LiveStream, target: InstanceState, reason: str) -> bool:
        """Move a running stream to ``target`` (the migration controller's mover); False: it stayed.

        Live (engines that can): the source copies the KV while decoding, stops, and ends its
        stream; the continuation picks the KV up on the target. Otherwise make-before-break:
        freeze the client's side, open the continuation on the target (through a prefill
        instance for a PD model, else recomputed there), and cut the source only once the
        target's first token is in.
        """
        source = live.state
        mechanism = self._mechanism(source, target)
        model = live.model
        span = live.routed.trace.migration(
            {
                "pdgate.migration.reason": reason,
                "pdgate.migration.mechanism": mechanism,
                "pdgate.migration.from": source.spec.id,
                "pdgate.migration.to": target.spec.id,
                "pdgate.migration.tokens": live.generated,
            }
        )
        pending: asyncio.Future[Handover | None] = asyncio.get_running_loop().create_future()
        live.pending = pending
        handover: Handover | None = None
        error = None
        try:
            async with asyncio.timeout(self.config.migration.timeout_s):
                if mechanism == "live":
                    handover = await self._live_handover(live, source, target)
                else:
                    live.freeze()
                    handover = await self._continuation(
                        live, target=target, exclude={source.spec.id}, mechanism=mechanism
                    )
        except (UpstreamFailed, MigrationError, GatewayError, TimeoutError) as exc:
            error = _failure_reason(exc)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        finally:
            if handover is None:
                if not pending.done():
                    pending.set_result(None)
                if live.pending is pending and not live.source_ended.is_set():
                    live.pending = None
                    live.thaw()  # the source carries on; what it sent meanwhile goes out now
                self.metrics.observe_migration(model, reason, mechanism, "failed")
                span.end(error=error or "failed")
                log.info(
                    "migration of %s from %s to %s (%s, %s) failed: %s",
                    live.request_id,
                    source.spec.id,
                    target.spec.id,
                    reason,
                    mechanism,
                    error,
                )
        if handover is None:
            return False
        handover.reason = reason
        handover.leg = span
        if pending.done():  # the answer ended first (the stream cancelled this move)
            handover.discard("the answer ended first")
            return False
        pending.set_result(handover)
        if mechanism != "live":
            live.abort_source(f"migrated to {target.spec.id}")
        self.metrics.observe_migration(model, reason, mechanism, "migrated")
        log.info(
            "migrated %s from %s to %s (%s, %s) after %d tokens",
            live.request_id,
            source.spec.id,
            target.spec.id,
            reason,
            mechanism,
            handover.tokens,
        )
        return True

    async def _live_handover(self, live: LiveStream, source: InstanceState, target: InstanceState) -> Handover:
        """Live migration: the source moves the KV and ends its stream; then the target continues."""
        moved = await source.adapter.live_migrate(
            live.upstream_id, target.adapter, timeout_s=self.config.migration.timeout_s
        )
        live.source_released = True
        await live.source_ended.wait()  # every token the source produced has reached the client
        handoff = moved.handoff
        produced = live.trail.token_ids[live.splice.offset :] if live.splice is not None else live.trail.token_ids
        if produced != moved.output_token_ids:  # (after an earlier move the engine made only the tokens since)
            log.warning(
                "live migration of %s: the engine reports %d tokens, the client got %d; recomputing",
                live.request_id,
                len(moved.output_token_ids),
                live.generated,
            )
            handoff = None
        return await self._continuation(
            live, target=target, exclude={source.spec.id}, mechanism="live", handoff=handoff
        )

    async def _failover(self, live: LiveStream, reason: str) -> Handover | None:
        """The stream's engine failed mid-answer: continue from the client's last token elsewhere."""
        failed = live.state.spec.id
        if not live.source_released:  # (a live migration's source ended the stream on purpose)
            self._record_failure(UpstreamFailed(failed, reason))
            live.failed_instances.add(failed)
        live.source_released = False
        migration = self.config.migration
        model = live.model
        if not migration.failover or live.failovers >= migration.max_failovers or not live.trail.tracked:
            self.metrics.observe_migration(model, "failover", "none", "failed")
            return None
        live.failovers += 1
        span = live.routed.trace.migration(
            {
                "pdgate.migration.reason": "failover",
                "pdgate.migration.from": failed,
                "pdgate.migration.error": reason,
                "pdgate.migration.tokens": live.generated,
            }
        )
        try:
            async with asyncio.timeout(migration.timeout_s):
                handover = await self._continuation(
                    live, target=None, exclude=set(live.failed_instances), mechanism="failover"
                )
        except (UpstreamFailed, GatewayError, TimeoutError) as exc:
            self.metrics.observe_migration(model, "failover", "recompute", "failed")
            span.end(error=_failure_reason(exc))
            if isinstance(exc, UpstreamFailed):
                self._record_failure(exc)
            return None
        handover.reason = "failover"
        handover.leg = span
        self.metrics.observe_migration(model, "failover", handover.mechanism, "migrated")
        log.warning(
            "failed %s over from %s to %s after %d tokens (%s)",
            live.request_id,
            failed,
            handover.state.spec.id,
            handover.tokens,
            reason,
            extra=request_fields(live.request_id, live.routed.trace.trace_id),
        )
        return handover

    async def _continuation(
        self,
        live: LiveStream,
        *,
        target: InstanceState | None,
        exclude: set[str],
        mechanism: str,
        handoff: dict[str, Any] | None = None,
    ) -> Handover:
        """Open the rest of ``live``'s answer (from the tokens its client has) and read its first piece.

        ``target`` None: the scheduling profiles place it (failover); ``handoff``: fields that
        make the target take KV a live migration copied.
        """
        routed = live.routed
        info = routed.info
        generated = list(live.trail.token_ids)
        k = len(generated)
        body = continuation_body(routed.body, routed.prompt_ids, generated, info.max_tokens)
        if handoff:
            body.update(handoff)
        context = [*routed.prompt_ids, *generated]
        request_id = f"{info.request_id}-m{live.moves + 1}"
        hashes = PromptHashes.of(context, (s.spec.block_size for s in self.cluster.for_model(info.model)))
        cont_info = dataclasses.replace(
            info,
            request_id=request_id,
            prompt_tokens=len(context),
            max_tokens=info.max_tokens - k,
            output=None,
            block_hashes=tuple(next(iter(hashes.by_block_size.values()), [])),
        )
        cont = Routed("completion", ROUTES["completion"], body, cont_info, context, hashes, True, trace=routed.trace)
        snapshot = self._snapshot_for(cont)(cont_info)
        if target is None:
            placement = self._place(cont, exclude, snapshot, attempt=routed.obs.attempts)
            mechanism = (
                "pd" if placement.prefill is not None and placement.prefill is not placement.decode else "recompute"
            )
        else:
            prefill = None
            if mechanism == "pd":
                prefill = self._prefill_for(
                    cont, snapshot, exclude, routed.obs.prefill_id if routed.obs.split else None
                )
            placement = Placement(target, prefill, [])
            self._predict(cont, placement, snapshot)
        opened = Opened(placement.decode)
        try:
            await self._open_answer(cont, placement, opened)
            assert opened.upstream is not None
            if opened.upstream.status >= 400:
                detail = (await self._read_all(placement.decode, opened.upstream))[:300].decode(errors="replace")
                raise UpstreamFailed(
                    placement.decode.spec.id, f"continuation refused: HTTP {opened.upstream.status}: {detail}"
                )
            try:
                first = await self._racing_prefill(opened.upstream.first_chunk(), opened.prefill_task)
            except UpstreamError as exc:
                raise UpstreamFailed(
                    placement.decode.spec.id, f"continuation broke before its first byte: {exc}"
                ) from None
        except BaseException as exc:
            opened.leg.end(error=_failure_reason(exc))
            await opened.close()
            raise
        opened.leg.first_token()
        if opened.decode_lease is not None and not cont.obs.split:
            opened.decode_lease.prefill_done()  # recomputed on the target: its prompt is done, decoding goes on
        tasks = [opened.prefill_task] if opened.prefill_task is not None else []
        return Handover(
            placement.decode,
            opened.upstream,
            first,
            k,
            mechanism,
            opened.leases,
            tasks,
            request_id=request_id,
            decode_leg=opened.leg,
        )

    def _prefill_for(
        self, cont: Routed, snapshot: ClusterSnapshot, exclude: set[str], preferred: str | None
    ) -> InstanceState:
        """The prefill instance of a PD-path move: the request's own prefill instance when it can
        (its prefix cache holds the prompt), else the prefill profile's choice."""
        view = snapshot.by_id(preferred) if preferred is not None else None
        if (
            view is not None
            and view.healthy
            and not view.draining
            and view.serves("prefill")
            and view.id not in exclude
        ):
            return self.cluster.instances[view.id]
        decision = self._decide("prefill", cont, snapshot, [i for i in snapshot.instances if i.id not in exclude])
        return self.cluster.instances[decision.instance_id]

    def _decode_leg(self, routed: Routed, placement: Placement, protocol: str | None) -> LegTrace:
        """The span of the leg that answers (with a KV-transfer child after a PD hand-off, when streamed)."""
        if not routed.trace.enabled:
            return NO_LEG
        obs, info = routed.obs, routed.info
        predicted = obs.predicted
        attributes = {
            "pdgate.decode.batch_at_send": obs.batch_at_send,
            "pdgate.tpot_predicted_s": predicted.get("tpot_s"),
            "gen_ai.request.max_tokens": info.max_tokens,
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

    def _prefill_leg(self, routed: Routed, prefill: InstanceState) -> LegTrace:
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
            },
        )

    async def _open(
        self, state: InstanceState, path: str, body: dict[str, Any], request_id: str, leg: LegTrace
    ) -> UpstreamResponse:
        """Send one leg (with its trace context); a connection error or 5xx before any byte is an UpstreamFailed."""
        try:
            resp = await state.adapter.send(
                path, body, request_id, timeout_s=self.config.upstream_timeout_s, headers=leg.headers
            )
        except UpstreamError as exc:
            raise UpstreamFailed(state.spec.id, f"connection failed: {exc}") from None
        if resp.status >= 500:
            try:
                detail = (await resp.read())[:300].decode(errors="replace")
            except UpstreamError as exc:
                detail = str(exc)
            finally:
                resp.close()
            raise UpstreamFailed(state.spec.id, f"HTTP {resp.status}: {detail}")
        return resp

    @staticmethod
    async def _read_all(state: InstanceState, resp: UpstreamResponse) -> bytes:
        """A leg's whole reply; a broken one is an UpstreamFailed (nothing reached the client yet)."""
        try:
            return await resp.read()
        except UpstreamError as exc:
            raise UpstreamFailed(state.spec.id, f"reply broke: {exc}") from None
        finally:
            resp.close()

    async def _sequential_prefill(
        self, routed: Routed, prefill: InstanceState, decode: InstanceState, leases: list[Lease], body: dict[str, Any]
    ) -> dict[str, Any]:
        lease = self.cluster.lease(
            prefill.spec.id,
            prefill_tokens=routed.info.prompt_tokens,
            predicted_prefill_s=routed.obs.predicted.get("prefill_s", 0.0),
        )
        leg = self._prefill_leg(routed, prefill)
        status = None
        try:
            sent = self.cluster.clock()
            resp = await self._open(
                prefill, routed.path, prefill.adapter.prefill_body(body), routed.info.request_id, leg
            )
            status = resp.status
            reply = await self._read_all(prefill, resp)
            routed.obs.prefill_s = self.cluster.clock() - sent
            if resp.status >= 400:
                raise _client_error(resp.status, reply)
            self.cluster.record_sent_prompt(prefill.spec.id, routed.hashes)
            self.cluster.record_success(prefill.spec.id)
            try:
                handoff = prefill.adapter.handoff_from_prefill(json.loads(reply))
            except (HandoffError, json.JSONDecodeError) as exc:
                raise UpstreamFailed(prefill.spec.id, str(exc)) from None
            leg.end(status=status, **{"pdgate.prefill_s": routed.obs.prefill_s})
            return decode.adapter.decode_body(body, handoff)
        except BaseException as exc:
            leg.end(status=status, error=_failure_reason(exc))
            raise
        finally:
            lease.release()

    async def _concurrent_prefill(
        self, routed: Routed, prefill: InstanceState, body: dict[str, Any], lease: Lease
    ) -> UpstreamFailed | None:
        """SGLang's prefill leg: sent with the decode leg, its answer drained and checked.

        Returns the failure (instead of raising) so the decode leg can be abandoned for it.
        """
        leg = self._prefill_leg(routed, prefill)
        status = error = None
        try:
            prefill_body = {k: v for k, v in body.items() if k != "stream_options"}  # only valid with stream: true
            prefill_body["stream"] = False
            resp = await self._open(prefill, routed.path, prefill_body, routed.info.request_id, leg)
            status = resp.status
            await self._read_all(prefill, resp)
            if resp.status >= 400:
                failure = UpstreamFailed(prefill.spec.id, f"prefill leg answered HTTP {resp.status}")
                error = failure.reason
                return failure
            self.cluster.record_sent_prompt(prefill.spec.id, routed.hashes)
            self.cluster.record_success(prefill.spec.id)
            return None
        except UpstreamFailed as failure:
            error = failure.reason
            return failure
        except BaseException as exc:
            error = _failure_reason(exc)
            raise
        finally:
            leg.end(status=status, error=error)
            lease.release()

    @staticmethod
    async def _racing_prefill(awaitable: Any, prefill_task: asyncio.Task | None) -> Any:
        """Await ``awaitable`` unless the concurrent prefill leg fails first (then raise its failure)."""
        if prefill_task is None:
            return await awaitable
        work = asyncio.ensure_future(awaitable)
        try:
            while True:
                pending = {work} if prefill_task.done() else {work, prefill_task}
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if work.done():
                    return work.result()
                failure = prefill_task.result()
                if failure is not None:
                    raise failure
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)

    async def _relay(
        self,
        responder: Responder,
        routed: Routed,
        decode: InstanceState,
        upstream: UpstreamResponse,
        prefill_task: asyncio.Task | None = None,
        lease: Lease | None = None,
        leg: LegTrace | None = None,
    ) -> None:
        """Answer the client from the decode leg: whole, or relayed chunk by chunk as it arrives.

        Nothing is sent to the client before the first piece of the answer is in, so a leg that
        fails before it is still retried elsewhere.
        """
        headers = {"X-Request-Id": routed.info.request_id}
        if upstream.status >= 400:
            raise _client_error(upstream.status, await self._read_all(decode, upstream))
        obs = routed.obs
        clock = self.cluster.clock
        if not routed.stream:
            data = await self._racing_prefill(self._read_all(decode, upstream), prefill_task)
            obs.last_token = clock()
            obs.usage_chunk = data
            responder.send(
                upstream.status,
                data,
                content_type=upstream.headers.get("content-type", "application/json"),
                headers=headers,
            )
            self._answered(routed, upstream.status)
            return
        try:
            first = await self._racing_prefill(upstream.first_chunk(), prefill_task)
        except UpstreamError as exc:
            raise UpstreamFailed(decode.spec.id, f"stream broke before the first byte: {exc}") from None
        obs.first_token = obs.last_token = clock()
        if leg is not None:
            leg.first_token()
        trail = StreamTrail(strip_ids=not routed.want_ids) if routed.movable else None
        if trail is not None:
            first = trail.feed(first)
        obs.events = first.count(b"data: ")
        if _USAGE_KEY in first:
            obs.usage_chunk = first
        if lease is not None and not obs.split:
            lease.prefill_done()  # colocated: the prompt is computed, the rest is decoding
        responder.start(
            upstream.status,
            content_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
            first=first,
        )
        responder.on_flow(upstream.pause_reading, upstream.resume_reading)
        if trail is not None:
            await self._relay_movable(responder, routed, decode, upstream, trail, lease, leg)
            return
        write = responder.write
        observe = _observer(obs, clock, lambda: decode)

        def sink(data: bytes) -> None:
            observe(data)
            write(data)

        try:
            await upstream.relay(sink)
        except UpstreamError as exc:
            self._broke_mid_stream(responder, routed, decode.spec.id, str(exc))
            return
        responder.end()
        self._answered(routed, upstream.status)

    async def _relay_movable(
        self,
        responder: Responder,
        routed: Routed,
        decode: InstanceState,
        upstream: UpstreamResponse,
        trail: StreamTrail,
        lease: Lease | None,
        leg: LegTrace | None,
    ) -> None:
        """Relay a stream that can move: through a LiveStream, which fails it over or migrates it."""
        obs = routed.obs
        clock = self.cluster.clock
        live: LiveStream | None = None
        observe = _observer(obs, clock, lambda: live.state if live is not None else decode)
        live = LiveStream(
            routed,
            trail=trail,
            state=decode,
            upstream=upstream,
            leases=[lease] if lease is not None else [],
            responder=responder,
            observe=observe,
            clock=clock,
        )
        live.first_leg = leg
        if self.migrations is not None:
            self.migrations.register(live)
        try:
            await live.run(self._failover)
        except MidStreamFailure as failure:
            self._broke_mid_stream(responder, routed, failure.instance_id, failure.reason)
            return
        finally:
            if self.migrations is not None:
                self.migrations.unregister(live)
            obs.moves = live.moves
            obs.output_tokens = len(trail.token_ids) if trail.tracked else None
            await live.close()
        responder.end()
        self._answered(routed, upstream.status)

    def _broke_mid_stream(self, responder: Responder, routed: Routed, instance_id: str, reason: str) -> None:
        """The answer broke after it started and cannot go on: an error event ends the stream."""
        log.warning(
            "stream from %s broke mid-way: %s",
            instance_id,
            reason,
            extra=request_fields(routed.info.request_id, routed.trace.trace_id),
        )
        error = {
            "error": {
                "message": f"upstream {instance_id} failed mid-stream",
                "type": "upstream_error",
                "param": None,
                "code": None,
            }
        }
        responder.end(b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n")
        routed.obs.error = "upstream_failed_mid_stream"
        self._answered(routed, 502)

    def _answered(self, routed: Routed, status: int) -> None:
        routed.obs.status = status
        self.metrics.count(routed.path, routed.info.model, status)

    # ------------------------------------------------------------- learning
    def _completed(self, routed: Routed) -> None:
        """Record predicted vs actual (metrics) and hand the request's record to the cost model."""
        obs = routed.obs
        info = routed.info
        counts = _USAGE_TOKENS.findall(obs.usage_chunk)  # the last one: continuous usage stats grow per event
        tokens = int(counts[-1]) if counts else obs.output_tokens
        if tokens is None and routed.stream:
            # one SSE event per token, less [DONE], a chat stream's role-only first event
            tokens = max(0, obs.events - 1 - (1 if routed.kind == "chat" else 0))
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
        if self.costs is None or routed.features is None:
            return
        record: dict[str, Any] = {
            "v": 1,
            "kind": "pdgate-request",
            "ts": time.time(),
            "request_id": info.request_id,
            **routed.features.to_record(),
        }
        if routed.prompt_text is not None and self.config.cost_model.log_prompt_text:
            record["prompt_text"] = routed.prompt_text
        record.update(
            {
                "output_tokens": tokens,
                "slo": {
                    "class": info.slo.slo_class,
                    "ttft_s": info.slo.ttft_s,
                    "tpot_s": info.slo.tpot_s,
                    "priority": info.slo.priority,
                },
                "timing": timing,
                "placement": {
                    "prefill": obs.prefill_id,
                    "prefill_group": obs.prefill_group,
                    "prefill_cached_tokens": obs.prefill_cached,
                    "prefill_idle": obs.prefill_idle,
                    "decode": obs.decode_id,
                    "decode_group": obs.decode_group,
                    "split": obs.split,
                    "decode_batch": (obs.batch_at_send + obs.batch_at_end) / 2,
                    "decode_context_tokens": (obs.context_at_send + obs.context_at_end) / 2,
                },
                "predicted": obs.predicted,
                "cost_model": self.costs.current.version if self.costs.current is not None else None,
            }
        )
        self.costs.observe(record)

    def _traced_end(self, routed: Routed, timing: Mapping[str, float | None], tokens: int | None) -> None:
        """End the request's span with what happened, and write its access-log line."""
        obs, info, predicted = routed.obs, routed.info, routed.obs.predicted
        ttft, tpot = timing.get("ttft_s"), timing.get("tpot_s")
        met = info.slo.met(ttft, tpot) if ttft is not None else None
        if routed.trace.enabled:
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
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %d",
                "POST",
                routed.path,
                obs.status,
                extra={
                    **request_fields(info.request_id, routed.trace.trace_id),
                    "access": {
                        "route": routed.path,
                        "model": info.model,
                        "status": obs.status,
                        "stream": routed.stream,
                        "prefill": obs.prefill_id if obs.split else None,
                        "decode": obs.decode_id,
                        "attempts": obs.attempts,
                        "prompt_tokens": info.prompt_tokens,
                        "output_tokens": tokens,
                        "cached_tokens": obs.prefill_cached,
                        "slo_class": info.slo.slo_class,
                        "slo_met": met,
                        **{k: round(v, 6) for k, v in timing.items() if v is not None},
                    },
                },
            )

    def _failed(self, routed: Routed | None, trace: RequestTrace, route: str, status: int, reason: str | None) -> None:
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


def _request_attributes(routed: Routed) -> dict[str, Any]:
    """The request span's attributes known once the request is parsed (no text)."""
    info, slo = routed.info, routed.info.slo
    return {
        "gen_ai.operation.name": "text_completion" if routed.kind == "completion" else "chat",
        "gen_ai.request.model": info.model,
        "gen_ai.request.max_tokens": info.max_tokens,
        "gen_ai.usage.input_tokens": info.prompt_tokens,
        "pdgate.request_id": info.request_id,
        "pdgate.stream": routed.stream,
        "pdgate.slo.class": slo.slo_class,
        "pdgate.slo.ttft_s": slo.ttft_s,
        "pdgate.slo.tpot_s": slo.tpot_s,
        "pdgate.priority": slo.priority,
        "pdgate.app": info.tags.get("app"),
        "pdgate.output_tokens_predicted": info.output.median if info.output is not None else None,
    }


def _observer(
    obs: Observation, clock: Callable[[], float], instance: Callable[[], InstanceState]
) -> Callable[[bytes], None]:
    """What the proxy notes of each piece of a stream that reaches the client (``instance``: the
    one answering now)."""

    def observe(data: bytes) -> None:
        obs.events += data.count(b"data: ")
        obs.last_token = clock()
        if _USAGE_KEY in data:  # the usage chunk and [DONE] may arrive in separate reads
            obs.usage_chunk = data
        if b"data: [DONE]" in data:
            obs.saw_done = True
            state = instance()
            obs.batch_at_end, obs.context_at_end = state.decode_inflight, state.decode_context_tokens

    return observe


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, UpstreamFailed):
        return exc.reason
    if isinstance(exc, GatewayError):
        return exc.code or exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, MigrationError):
        return str(exc)
    return type(exc).__name__


def _client_error(status: int, body: bytes) -> GatewayError:
    """An engine's 4xx, in OpenAI's error shape whatever shape the engine used."""
    message = body.decode(errors="replace")[:1000]
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            inner = data.get("error") if isinstance(data.get("error"), dict) else data
            message = str(inner.get("message", message))
    except json.JSONDecodeError:
        pass
    return GatewayError(status, message)


def _valid_request_id(value: str) -> bool:
    return 0 < len(value) <= 256 and value.isascii() and value.isprintable() and " " not in value
