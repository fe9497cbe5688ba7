"""Request intake: an OpenAI completion or chat body, validated and tokenized into a :class:`Routed`.

Everything the rest of the request path needs is decided here, once: the model, the prompt's
token ids (what the engine will see: chat templates applied, ids hashed into prefix blocks),
the SLO from headers or class, the cost model's output-length prediction, whether the stream
can move (migration, failover), and the request id. Bad input is a :class:`GatewayError` with
OpenAI's error shape (4xx), never a server error.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pdgate.common.tokenizer import Tokenizer
from pdgate.gateway.admission_queue import TENANT_TAG
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig, ModelConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.hash_schemes import PromptHashes
from pdgate.gateway.observation import Observation
from pdgate.gateway.requests import ChatBody, CompletionBody, GatewayError, parse_body, validate_body
from pdgate.gateway.responses_api import ResponsesRequest, chat_request
from pdgate.gateway.slo import APP_HEADER, SloResolver
from pdgate.gateway.splice import pinned_reason, wants_token_ids
from pdgate.gateway.tenants import TenantDirectory
from pdgate.gateway.tracing import LORA_ADAPTER_ATTRIBUTE, NO_TRACE, RequestTrace, Tracing
from pdgate.scheduler.costmodel.cues import request_cues
from pdgate.scheduler.costmodel.features import RequestFeatures, chat_text, hash_text, prompt_digest
from pdgate.scheduler.costmodel.length_types import client_bounds
from pdgate.scheduler.snapshot import LoraTarget, RequestInfo

DEFAULT_COMPLETION_MAX_TOKENS = 16
ROUTES = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
RESPONSES_ROUTE = "/v1/responses"


@dataclass
class Routed:
    """A validated request, ready to place."""

    kind: str  # "completion" | "chat": the engine request it is
    path: str  # the engine route the legs are sent to
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
    route: str = ""  # the client's route (metrics, spans, SLO classes); the engine route when empty

    def __post_init__(self) -> None:
        if not self.route:
            self.route = self.path


class Intake:
    """Turns raw request bodies into :class:`Routed` requests; one per gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        tokenizers: Mapping[str, Tokenizer],
        costs: CostModelService | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.tokenizers = tokenizers
        self.costs = costs
        self.models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self.slo = SloResolver(config.slo)
        self.tenants = TenantDirectory(config.tenants) if config.tenants.enabled else None
        self.keep_text = config.cost_model.log_prompt_text or (
            tracing is not None and tracing.settings.record_prompt_text
        )
        self._ids = request_ids()

    def error_id(self, header_id: str | None) -> str:
        """The ``X-Request-Id`` of an answer refused before the request had one (:func:`answer_id`)."""
        return answer_id(header_id, self._ids)

    def parse(
        self,
        raw: bytes,
        kind: str,
        header_id: str | None,
        *,
        headers: Mapping[str, str] | None = None,
        arrival: float = 0.0,
    ) -> Routed:
        """Validate and tokenize one request body (``kind``: "completion" or "chat")."""
        body, parsed = parse_body(raw, CompletionBody if kind == "completion" else ChatBody)
        return self._routed(body, parsed, kind, ROUTES[kind], header_id, headers or {}, arrival)

    def parse_responses(
        self,
        raw: bytes,
        header_id: str | None,
        *,
        headers: Mapping[str, str] | None = None,
        arrival: float = 0.0,
    ) -> tuple[Routed, ResponsesRequest]:
        """Validate a ``/v1/responses`` body and route it as the chat request it stands for."""
        body, request = chat_request(raw)
        parsed = validate_body(body, ChatBody)
        return self._routed(body, parsed, "chat", RESPONSES_ROUTE, header_id, headers or {}, arrival), request

    def _routed(
        self,
        body: dict[str, Any],
        parsed: Any,
        kind: str,
        route: str,
        header_id: str | None,
        headers: Mapping[str, str],
        arrival: float,
    ) -> Routed:
        model, lora = self._model_of(parsed.model)
        tokenizer = self.tokenizers[model.name]
        if kind == "completion":
            prompt_ids, text, max_tokens = _completion_prompt(parsed, body, tokenizer)
        else:
            prompt_ids, text, max_tokens = _chat_prompt(parsed, tokenizer, model.max_model_len)
        _check_lengths(prompt_ids, max_tokens, model.max_model_len)
        request_id = request_id_of(header_id, self._ids)
        tenant = self.tenants.identify(headers, route) if self.tenants is not None else None
        tenant_config = self.config.tenants.get(tenant) if tenant is not None else None
        slo = self.slo.resolve(
            headers,
            route,
            slo_class=tenant_config.slo_class if tenant_config is not None else None,
            max_priority=tenant_config.max_priority if tenant_config is not None else None,
        )
        salt = body.get("cache_salt")
        hashes = self.cluster.prompt_hashes(
            model.name,
            prompt_ids,
            lora=lora.name if lora is not None else None,
            cache_salt=salt if isinstance(salt, str) and salt else None,
        )
        first_chain = hashes.first_chain()
        tag = headers.get(APP_HEADER)
        features = output = None
        ignore_eos = body.get("ignore_eos") is True
        may_stop = bool(body.get("stop") or body.get("stop_token_ids"))
        source = self.config.cost_model.length_source
        if self.costs is not None and self.costs.current is not None:
            messages = parsed.messages if kind == "chat" else None
            blind = source == "model"  # the model alone: the client's length settings unseen
            features = RequestFeatures(
                len(prompt_ids),
                None if blind else max_tokens,
                kind,
                model.name,
                tag,
                hash_text(text) if text else {},
                ignore_eos and not blind,
                request_cues(text, messages) if text or messages else (),
                prompt_digest(text) if text else None,
            )
            if source != "none":
                output = self.costs.current.predict_output(features)
        if source == "client":
            min_tokens = body.get("min_tokens")
            output = client_bounds(
                output,
                max_tokens,
                ignore_eos=ignore_eos,
                min_tokens=min_tokens if isinstance(min_tokens, int) and not isinstance(min_tokens, bool) else 0,
                may_stop=may_stop,
            )
        info = RequestInfo(
            request_id=request_id,
            model=model.name,
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            block_hashes=tuple(first_chain),
            priority=slo.priority,
            tags=_tags(tag, headers.get(PD_PATH_HEADER), route, tenant),
            slo=slo,
            output=output,
            arrival=arrival,
            lora=lora,
        )
        migration = self.config.migration
        movable = (
            parsed.stream and (migration.failover or migration.enabled) and pinned_reason(body, parsed.stream) is None
        )
        want_ids = wants_token_ids(body)
        if movable:
            body["return_token_ids"] = True  # the ids the client got are where a continuation starts
        return Routed(
            kind,
            ROUTES[kind],
            body,
            info,
            prompt_ids,
            hashes,
            parsed.stream,
            features,
            text if self.keep_text else None,
            movable=movable,
            want_ids=want_ids,
            route=route,
        )

    def _model_of(self, name: str) -> tuple[ModelConfig, LoraTarget | None]:
        """The configured model a request's ``model`` names, and its LoRA adapter when the name is
        an adapter of that model (served by its instances or in its ``lora.adapters``); else 404.
        The body keeps the adapter's name: the engines serve it under that name."""
        model = self.models.get(name)
        if model is not None:
            return model, None
        base = self.cluster.loras.base_of(name)
        if base is None or base not in self.models:
            raise GatewayError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return self.models[base], LoraTarget(name, loadable=self.cluster.loras.loadable(base, name))


PD_PATH_HEADER = "x-pdgate-pd-path"  # colocated | split: the path a pd-paths handler may honour


def _tags(app: str | None, pd_path: str | None, route: str, tenant: str | None) -> dict[str, str]:
    """What a scheduling plugin may read of the request's headers, route and tenant."""
    tags = {"route": route}
    if tenant is not None:
        tags[TENANT_TAG] = tenant
    if app:
        tags["app"] = app
    if pd_path:
        tags["pd_path"] = pd_path.strip().lower()
    return tags


def _completion_prompt(parsed: Any, body: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], str, int]:
    """A completion's prompt ids (the ids we hash are the ids the engine sees), text and max tokens."""
    prompt = parsed.prompt
    text = ""
    if isinstance(prompt, str):
        text = prompt
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=parsed.add_special_tokens)
    else:
        prompt_ids = list(prompt)
    body["prompt"] = prompt_ids
    max_tokens = parsed.max_tokens if parsed.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    return prompt_ids, text, max_tokens


def _chat_prompt(parsed: Any, tokenizer: Tokenizer, max_model_len: int) -> tuple[list[int], str, int]:
    """A chat's prompt ids through the model's chat template, its text (for features) and max tokens."""
    try:
        rendered = tokenizer.apply_chat_template(
            parsed.messages,
            add_generation_prompt=parsed.add_generation_prompt,
            tools=parsed.tools,
            **(parsed.chat_template_kwargs or {}),
        )
        prompt_ids = tokenizer.encode(rendered, add_special_tokens=parsed.add_special_tokens)
        text = chat_text(parsed.messages)
    except (ValueError, KeyError, TypeError) as exc:
        raise GatewayError(400, f"invalid messages: {exc}", param="messages") from None
    limit = parsed.max_completion_tokens if parsed.max_completion_tokens is not None else parsed.max_tokens
    max_tokens = limit if limit is not None else max_model_len - len(prompt_ids)
    return prompt_ids, text, max_tokens


def _check_lengths(prompt_ids: list[int], max_tokens: int, max_model_len: int) -> None:
    if not prompt_ids:
        raise GatewayError(400, "the prompt is empty", param="prompt")
    if len(prompt_ids) + max_tokens > max_model_len or len(prompt_ids) >= max_model_len:
        raise GatewayError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the completion).",
            param="max_tokens",
            code="context_length_exceeded",
        )


def request_ids(tag: str = "") -> Iterator[str]:
    """Request ids unique per gateway process (``tag`` marks a kind of request in them)."""
    prefix = uuid.uuid4().hex[:12]
    return (f"pdgate-{prefix}-{tag}{n}" for n in itertools.count())


def request_id_of(header_id: str | None, ids: Iterator[str]) -> str:
    """The client's ``X-Request-Id`` (400 unless :func:`valid_request_id`), else the next of ``ids``."""
    if header_id is None:
        return next(ids)
    if not valid_request_id(header_id):
        raise GatewayError(400, "X-Request-Id must be 1-256 printable ASCII characters without spaces")
    return header_id


def answer_id(header_id: str | None, ids: Iterator[str]) -> str:
    """The id an error answer carries: the client's ``X-Request-Id`` when it is valid, else a new one."""
    return header_id if header_id is not None and valid_request_id(header_id) else next(ids)


def valid_request_id(value: str) -> bool:
    return 0 < len(value) <= 256 and value.isascii() and value.isprintable() and " " not in value


def request_attributes(routed: Routed) -> dict[str, Any]:
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
        "pdgate.tenant": info.tags.get(TENANT_TAG),
        LORA_ADAPTER_ATTRIBUTE: info.lora.name if info.lora is not None else None,
        "pdgate.output_tokens_predicted": info.output.median if info.output is not None else None,
    }
