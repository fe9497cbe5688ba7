"""LoRA adapters as the gateway knows them: per instance (what its engine serves, whether it can
load more) and fleet-wide (which base model a name belongs to, its path, the ``/v1/models`` list).

* Each instance's adapters are read from its engine's ``/v1/models`` (:func:`read_adapters`): at
  start, with every health check, and right after the gateway loads one there.
* A request's ``model`` that is no configured model but an adapter known on instances of model
  M (or in M's ``lora.adapters``) is M's request with that adapter (:meth:`LoraCatalog.base_of`).
* Where an adapter is missing, placement may pick an instance that can load it
  (:attr:`InstanceLoras.room`); :class:`pdgate.gateway.lora_loader.LoraLoader` loads it there.

vLLM's own limits (``vllm/lora/worker_manager.py``, ``LRUCacheWorkerLoRAManager``;
``vllm/config/lora.py``): the API server registers any number of adapters; the worker keeps at
most ``--max-cpu-loras`` of them in memory (default ``--max-loras``) and evicts the least
recently used one to load another (reloading it from disk on its next use); a batch holds at
most ``--max-loras`` adapters. The gateway loads on demand only while an instance has fewer than
its ``max_cpu_loras`` adapters registered (:attr:`InstanceLoras.capacity`), so that what it loads
stays in memory instead of pushing out adapters other requests use.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pdgate.adapters import EngineAdapter, InstanceSpec, UpstreamError
from pdgate.adapters.lora import AdapterCard, LoraLoadError
from pdgate.gateway.lora_config import ModelLoraConfig

log = logging.getLogger("pdgate.lora")
NO_ADAPTERS: frozenset[str] = frozenset()


@dataclass(eq=False)
class InstanceLoras:
    """One instance's LoRA adapters: those its engine serves (name -> path) and whether the gateway
    may load more there. ``can_load``: its kind loads adapters at run time (capability ``lora``).

    What snapshots read (``names``, ``room_now``, ``failed_now``) is kept up to date on every change
    and every expiry (:meth:`expire`, called when ``now`` passes ``expires_at``), so that taking an
    instance's view costs three attribute reads.
    """

    can_load: bool
    max_cpu_loras: int | None = None  # configured; else the engine's reported --max-loras
    adapters: dict[str, str] = field(default_factory=dict)
    names: frozenset[str] = NO_ADAPTERS  # the keys of ``adapters``
    reported_max: int | None = None  # vllm:lora_requests_info's max_lora, when seen
    listed: bool = True  # False once the engine answered that it lists no adapters (not asked again)
    refused_until: float = -math.inf  # it loads no adapter at run time: not asked before this time
    failed: dict[str, float] = field(default_factory=dict)  # adapter -> not asked to load it before
    loads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (adapter, outcome) -> loads
    added_at: float = -math.inf  # when the gateway last loaded one here
    loading: set[str] = field(default_factory=set)  # adapters the gateway is loading here now (room they take)
    room_now: int | None = None  # :meth:`room` as of the last change
    failed_now: frozenset[str] = NO_ADAPTERS  # :meth:`failed_names` as of the last change
    expires_at: float = math.inf  # when a refusal or a failure runs out next
    seen: float = -math.inf  # the latest time :meth:`expire` was given

    def __post_init__(self) -> None:
        self._update(self.seen)

    def expire(self, now: float) -> None:
        """Forget the refusals and failures whose time is up (snapshots call it once ``expires_at`` passed)."""
        self.seen = max(self.seen, now)
        self._update(self.seen)

    def report_max(self, max_loras: int) -> None:
        """The engine reported its ``--max-loras``."""
        if max_loras != self.reported_max:
            self.reported_max = max_loras
            self._update(self.seen)

    @property
    def capacity(self) -> int:
        """Adapters the engine keeps in memory: ``max_cpu_loras`` configured, else its reported
        ``--max-loras`` (vLLM's default for ``--max-cpu-loras``), else vLLM's default, 1."""
        return self.max_cpu_loras or self.reported_max or 1

    def room(self, now: float) -> int | None:
        """How many more adapters the gateway may load here before its memory is full (0: full);
        None when it cannot load any at run time (its kind, or a recent refusal)."""
        if not self.can_load or now < self.refused_until:
            return None
        return max(0, self.capacity - len(self.adapters) - len(self.loading - self.names))

    def failed_names(self, now: float) -> frozenset[str]:
        """Adapters whose load failed here lately (not tried here again until their time is up)."""
        if not self.failed:
            return NO_ADAPTERS
        live = frozenset(name for name, until in self.failed.items() if until > now)
        return live if live else NO_ADAPTERS

    def _update(self, now: float) -> None:
        if self.failed:
            self.failed = {name: until for name, until in self.failed.items() if until > now}
        self.room_now = self.room(now)
        self.failed_now = self.failed_names(now)
        pending = [t for t in (self.refused_until, *self.failed.values()) if t > now]
        self.expires_at = min(pending, default=math.inf)

    def listing(self, cards: Iterable[AdapterCard], begun_at: float, instance_id: str) -> None:
        """The engine's ``/v1/models`` answer, asked at ``begun_at``: what it serves from now on (a
        listing asked before the gateway's latest load keeps what that load added)."""
        fresh = {card.name: card.path for card in cards}
        if begun_at <= self.added_at:
            fresh = {**self.adapters, **fresh}
        if fresh != self.adapters:
            log.info("instance %s serves LoRA adapters: %s", instance_id, ", ".join(sorted(fresh)) or "none")
            self._set(fresh)

    def added(self, name: str, path: str, now: float) -> None:
        """The gateway loaded ``name`` from ``path`` here."""
        self.failed.pop(name, None)
        self.added_at = now
        self._set({**self.adapters, name: path})

    def load_begun(self, name: str) -> None:
        """The gateway is loading ``name`` here: its room is taken until :meth:`load_ended`."""
        self.loading.add(name)
        self._update(self.seen)

    def load_ended(self, name: str) -> None:
        self.loading.discard(name)
        self._update(self.seen)

    def load_failed(self, name: str, error: LoraLoadError, until: float) -> None:
        """A load was refused: not asked again (the adapter, or any when ``engine_wide``) before ``until``."""
        if error.engine_wide:
            self.refused_until = until
        else:
            self.failed[name] = until
        self._update(self.seen)

    def _set(self, adapters: dict[str, str]) -> None:
        self.adapters = adapters
        self.names = frozenset(adapters) if adapters else NO_ADAPTERS
        self._update(self.seen)


class LoraHolder(Protocol):
    """An instance as the LoRA code needs it (the cluster's ``InstanceState``)."""

    spec: InstanceSpec
    adapter: EngineAdapter
    lora: InstanceLoras


async def read_adapters(holder: LoraHolder, clock: Callable[[], float], timeout_s: float) -> None:
    """Read the adapters ``holder``'s engine serves (its ``/v1/models``) into ``holder.lora``. An
    engine that lists none this way is not asked again; one that does not answer keeps its list."""
    loras = holder.lora
    if not loras.listed:
        return
    begun = clock()
    try:
        cards = await holder.adapter.list_lora_adapters(timeout_s)
    except (UpstreamError, ValueError) as exc:
        log.debug("instance %s: reading its LoRA adapters failed: %r", holder.spec.id, exc)
        return
    if cards is None:
        loras.listed = False
        return
    loras.listing(cards, begun, holder.spec.id)


class LoraCatalog:
    """Every adapter the gateway knows, over the configured models and the instances' engines.

    ``models``: each configured model's LoRA section, in config order (a name configured under
    several models, or served by instances of several, belongs to the first); ``holders``: the
    fleet's instances now.
    """

    def __init__(self, models: Mapping[str, ModelLoraConfig], holders: Callable[[], Iterable[LoraHolder]]) -> None:
        self.models = dict(models)
        self._holders = holders

    def check_instance(self, spec: InstanceSpec, can_serve: bool) -> None:
        """Say (once, as the instance joins) that an instance whose kind serves no adapters through
        vLLM's API (SGLang) takes no adapter requests of a model that has adapters configured."""
        config = self.models.get(spec.model)
        if not can_serve and config is not None and (config.load_on_demand or config.adapters):
            log.warning(
                "instance %s (%s) takes no requests for %s's LoRA adapters: pdgate serves adapters through "
                "vLLM's API only (docs/lora.md)",
                spec.id,
                spec.kind,
                spec.model,
            )

    def base_of(self, name: str) -> str | None:
        """The configured model whose adapter ``name`` is (None: no adapter of that name; a base
        model's own name is never an adapter)."""
        if name in self.models:
            return None
        for model, config in self.models.items():
            if name in config.adapters:
                return model
        owners = {h.spec.model for h in self._holders() if name in h.lora.names}
        return next((model for model in self.models if model in owners), None)

    def path_of(self, model: str, name: str) -> str | None:
        """Where ``name`` loads from: ``models[].lora.adapters``, else the path an instance of
        ``model`` reports (its ``root``)."""
        config = self.models.get(model)
        if config is not None and name in config.adapters:
            return config.adapters[name]
        return next(
            (h.lora.adapters[name] for h in self._holders() if h.spec.model == model and name in h.lora.names), None
        )

    def loadable(self, model: str, name: str) -> bool:
        """Whether the gateway may load ``name`` on an instance of ``model`` that lacks it."""
        config = self.models.get(model)
        return config is not None and config.load_on_demand and self.path_of(model, name) is not None

    def cards(self) -> list[AdapterCard]:
        """One card per adapter name, its base model the one :meth:`base_of` gives it."""
        seen: dict[str, AdapterCard] = {}
        for model, config in self.models.items():
            for name, path in config.adapters.items():
                if name not in self.models:
                    seen.setdefault(name, AdapterCard(name, path, model))
        for holder in self._holders():
            for name, path in holder.lora.adapters.items():
                if name not in seen and name not in self.models and self.base_of(name) == holder.spec.model:
                    seen[name] = AdapterCard(name, path, holder.spec.model)
        return sorted(seen.values(), key=lambda card: (list(self.models).index(card.parent), card.name))
