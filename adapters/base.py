"""The one interface the gateway drives engines through; all engine-specific detail lives below it.

An adapter turns a placement into HTTP calls on one engine instance:

* colocated: one request to a ``both`` instance (:meth:`EngineAdapter.send`);
* PD, ``sequential`` hand-off (vLLM KV connectors): :meth:`EngineAdapter.prefill_body`, send it
  to the prefill instance, :meth:`EngineAdapter.handoff_from_prefill` on its JSON reply, then
  :meth:`EngineAdapter.decode_body` for the decode instance;
* PD, ``concurrent`` hand-off (SGLang bootstrap): :meth:`EngineAdapter.concurrent_fields` are
  added to the same body, which goes to both instances at once; the answer streams from decode.

Aborting is closing the upstream connection: vLLM, SGLang and the simulated engine abort a
request whose client went away. Load is scraped from ``/metrics`` under the engine's own names.
Every exchange with the engine (legs, scrapes, health checks, migrations) goes through the
adapter's :class:`~pdgate.common.http_client.Upstream`: the HTTP pool, or ``pdgate simulate``'s
in-memory transport.
"""

from __future__ import annotations

import json
from abc import ABC
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pdgate.adapters.load import EngineLoad, parse_load, scrape_path
from pdgate.adapters.lora import LOAD_PATH, MODELS_PATH, AdapterCard, LoraLoadError, adapter_cards, load_outcome
from pdgate.common.http_client import Upstream, UpstreamError, UpstreamReply
from pdgate.common.json_codec import json_encoder

PdProtocol = Literal["sequential", "concurrent", "none"]


@dataclass(frozen=True)
class Capabilities:
    """What an engine kind can do; the gateway asks, it never checks the kind by name."""

    pd_protocol: PdProtocol
    metrics_flavour: Literal["vllm", "sglang"]
    token_ids_in: bool = True  # accepts prompts as token-id lists
    token_ids_out: bool = True  # "return_token_ids": true
    kv_events: bool = False  # publishes vLLM-format KV events
    live_migration: bool = False
    abort_on_disconnect: bool = True
    # one instance takes either leg of a split request, or a whole one, as each request's own
    # parameters say (vLLM's NixlConnector with kv_role kv_both): its role may change while it serves
    flexible_role: bool = False
    # a decode instance also serves a whole request (prefills it itself) sent without hand-off
    # parameters (vLLM's kv_consumer does; SGLang's decode server needs a bootstrap room)
    colocates_on_decode: bool = False
    # LoRA adapters through vLLM's API: named by ``model``, listed in /v1/models, loaded at run time
    # with POST /v1/load_lora_adapter (SGLang names them ``base:adapter`` and has its own routes)
    lora: bool = False


@dataclass(frozen=True)
class InstanceSpec:
    """How to reach one engine instance (built from the gateway's fleet config)."""

    id: str
    url: str
    kind: str
    role: Literal["prefill", "decode", "both", "flex"]
    model: str
    api_key: str | None = None
    bootstrap_port: int | None = None  # SGLang prefill
    block_size: int = 16
    kv_events_endpoint: str | None = None
    hash_algo: str | None = None  # its --prefix-caching-hash-algo (None: as it reports, else vLLM's default)
    hash_seed: str | None = None  # the PYTHONHASHSEED it runs with (None: vLLM's default rule)
    max_cpu_loras: int | None = None  # LoRA adapters it keeps in memory (None: as it reports, else 1)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"


class HandoffError(Exception):
    """The prefill leg did not produce what the decode leg needs."""


class MigrationError(Exception):
    """A live migration did not happen; the request goes on where it was."""


@dataclass(frozen=True)
class LiveMigration:
    """A request an engine stopped after copying its KV to another instance (Llumnix-style).

    ``output_token_ids``: every token the source produced (and wrote to the request's stream)
    before it stopped; ``handoff``: the fields the target's continuation body carries to pick the
    copied KV up; ``downtime_s``: the engine's stop-and-copy time (engine seconds).
    """

    output_token_ids: list[int]
    handoff: dict[str, Any]
    downtime_s: float
    stages: int


class EngineAdapter(ABC):
    """Base adapter for OpenAI-compatible engines over HTTP."""

    capabilities: Capabilities

    def __init__(self, spec: InstanceSpec, pool: Upstream) -> None:
        self.spec = spec
        self.pool = pool
        url = urlsplit(spec.url)
        tls = url.scheme == "https"
        self.origin = (url.hostname or "127.0.0.1", url.port or (443 if tls else 80), tls)
        self.base_path = url.path.rstrip("/")
        self._encode = json_encoder()

    # ------------------------------------------------------------ transport
    def headers(self, request_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Headers for an upstream call: the instance's own key (never the client's), the id."""
        headers = {"X-Request-Id": request_id}
        if self.spec.api_key:
            headers["Authorization"] = f"Bearer {self.spec.api_key}"
        if extra:
            headers.update(extra)
        return headers

    def send(
        self,
        path: str,
        body: dict[str, Any],
        request_id: str,
        *,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> Awaitable[UpstreamReply]:
        """POST ``body`` as JSON to ``path``; the caller awaits the response, then reads (or relays)
        and closes it. (The pool's request itself is what is awaited: no coroutine of its own.)

        Raises :class:`pdgate.common.http_client.UpstreamError` when the engine cannot be reached or
        fails to answer.
        """
        all_headers = self.headers(request_id, headers)
        all_headers["Content-Type"] = "application/json"
        return self.pool.request(
            self.origin,
            "POST",
            self.base_path + path,
            self._encode(body),
            headers=all_headers,
            timeout_s=timeout_s,
        )

    # ---------------------------------------------------------------- PD legs
    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        raise HandoffError(f"{self.spec.kind} has no sequential PD hand-off")

    def handoff_from_prefill(self, reply: dict[str, Any]) -> dict[str, Any]:
        raise HandoffError(f"{self.spec.kind} has no sequential PD hand-off")

    def decode_body(self, body: dict[str, Any], handoff: dict[str, Any]) -> dict[str, Any]:
        return {**body, **handoff}

    def concurrent_fields(self, prefill: EngineAdapter) -> dict[str, Any]:
        raise HandoffError(f"{self.spec.kind} has no concurrent PD hand-off")

    # ------------------------------------------------------------- migration
    async def live_migrate(self, request_id: str, target: EngineAdapter, *, timeout_s: float) -> LiveMigration:
        """Move the running request ``request_id`` to ``target`` while it decodes (only engines
        whose capabilities say ``live_migration``). Raises :class:`MigrationError` when the
        request stays on this instance."""
        raise MigrationError(f"{self.spec.kind} has no live migration")

    # ------------------------------------------------------------ monitoring
    async def call(
        self, method: str, path: str, body: Any = None, *, request_id: str, timeout_s: float
    ) -> tuple[int, bytes]:
        """One whole exchange off the request path (scrape, health, migration): status and body.
        Raises :class:`UpstreamError` when the engine cannot be reached or does not answer in time."""
        headers = self.headers(request_id)
        data = b""
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = self._encode(body)
        resp = await self.pool.request(
            self.origin, method, self.base_path + path, data, headers=headers, timeout_s=timeout_s
        )
        try:
            return resp.status, await resp.read()
        finally:
            resp.close()

    async def call_json(
        self, method: str, path: str, body: Any = None, *, request_id: str, timeout_s: float
    ) -> tuple[int, Any]:
        """:meth:`call` with the answer parsed as JSON (``ValueError`` when it is not JSON)."""
        status, data = await self.call(method, path, body, request_id=request_id, timeout_s=timeout_s)
        return status, json.loads(data)

    async def scrape_load(self, now: float, timeout: float = 2.0) -> EngineLoad:
        """The engine's load from its ``/metrics``; raises :class:`UpstreamError` or ``ValueError``."""
        path = scrape_path(self.capabilities.metrics_flavour)
        status, data = await self.call("GET", path, request_id="scrape", timeout_s=timeout)
        if status != 200:
            raise UpstreamError(f"/metrics answered HTTP {status}")
        return parse_load(data.decode("utf-8", errors="replace"), self.capabilities.metrics_flavour, now)

    async def list_lora_adapters(self, timeout: float = 2.0) -> list[AdapterCard] | None:
        """The LoRA adapters the engine serves now (its ``/v1/models``); None when it lists none
        this way (no ``lora`` capability, or no such route). Raises :class:`UpstreamError` or
        ``ValueError`` (an answer that is not a model list)."""
        if not self.capabilities.lora:
            return None
        status, data = await self.call("GET", MODELS_PATH, request_id="lora-list", timeout_s=timeout)
        if status == 404:
            return None
        if status != 200:
            raise UpstreamError(f"{MODELS_PATH} answered HTTP {status}")
        return adapter_cards(json.loads(data))

    async def load_lora_adapter(self, name: str, path: str, *, timeout_s: float) -> None:
        """Load the adapter ``name`` from ``path`` (vLLM's ``POST /v1/load_lora_adapter``); returns
        once the engine serves it (also when it already did). Raises :class:`LoraLoadError`."""
        if not self.capabilities.lora:
            raise LoraLoadError(f"{self.spec.kind} instances do not load LoRA adapters at run time", engine_wide=True)
        body = {"lora_name": name, "lora_path": path}
        try:
            status, data = await self.call("POST", LOAD_PATH, body, request_id=f"lora-load-{name}", timeout_s=timeout_s)
        except UpstreamError as exc:
            raise LoraLoadError(f"loading LoRA adapter {name!r} failed: {exc}") from None
        load_outcome(status, data, name)

    async def check_health(self, timeout: float = 2.0) -> bool:
        try:
            status, _ = await self.call("GET", "/health", request_id="health", timeout_s=timeout)
        except UpstreamError:
            return False
        return status == 200
