"""Loading a request's LoRA adapter on the instances placement chose, where they lack it.

The scheduler only decides (its ``lora-affinity`` filter may keep instances that can load the
adapter); the legs call :meth:`LoraLoader.ensure` before they send anything, so the engines serve
the adapter by the time the request reaches them: both instances of a PD split (vLLM's decode
engine answers 404 for a ``model`` it does not serve, whatever the prefill engine did).

One load per (instance, adapter) runs at a time; requests that need it meanwhile wait for that
one (and one that goes away does not cancel it for the others). A refused load is remembered
(:meth:`InstanceLoras.load_failed`): placement does not pick that instance to load that adapter
(or any, when the engine loads none at run time) for ``lora.retry_after_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from pdgate.adapters.lora import LoraLoadError
from pdgate.gateway.lora import LoraCatalog, LoraHolder, read_adapters

log = logging.getLogger("pdgate.lora")
LISTING_TIMEOUT_S = 5.0


class LoraNotLoaded(Exception):
    """An instance placement chose lacks the request's adapter and it could not be loaded there.

    ``unreachable``: the engine did not answer (the instance failed, not the load); otherwise it
    answered with a refusal, or nothing was asked of it (loading on demand off, no path known).
    """

    def __init__(self, instance_id: str, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{instance_id}: {reason}")
        self.instance_id = instance_id
        self.reason = reason
        self.unreachable = unreachable


class LoraLoader:
    """Loads adapters on demand; one per gateway (the cluster's)."""

    def __init__(self, catalog: LoraCatalog, clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.clock = clock
        self._pending: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def ensure(self, name: str, model: str, holders: Sequence[LoraHolder]) -> list[str]:
        """Make every one of ``holders`` serve adapter ``name`` of ``model``, loading it where it
        is missing; returns the ids of the instances it was loaded on now (usually none).

        Raises :class:`LoraNotLoaded` (for the first instance that failed) when the model's
        ``lora.load_on_demand`` is off, no path is known, or the engine refused.
        """
        missing = [h for h in holders if name not in h.lora.names]
        if not missing:
            return []
        config = self.catalog.models.get(model)
        path = self.catalog.path_of(model, name)
        if config is None or not config.load_on_demand or path is None:
            why = (
                "no path is known for it"
                if config is not None and config.load_on_demand
                else "on-demand loading is off"
            )
            raise LoraNotLoaded(missing[0].spec.id, f"does not serve LoRA adapter {name!r} and {why}")
        outcomes = await asyncio.gather(
            *(self._load(h, name, path, config.load_timeout_s, config.retry_after_s) for h in missing),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [h.spec.id for h in missing]

    async def _load(self, holder: LoraHolder, name: str, path: str, timeout_s: float, retry_s: float) -> None:
        key = (holder.spec.id, name)
        pending = self._pending.get(key)
        if pending is None:
            # its room is taken from now (placement's next snapshot sees it), not when the load starts
            holder.lora.load_begun(name)
            pending = asyncio.ensure_future(self._load_once(holder, name, path, timeout_s, retry_s))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._finished(key, done, holder))
        await asyncio.shield(pending)

    def _finished(self, key: tuple[str, str], done: asyncio.Future[None], holder: LoraHolder) -> None:
        holder.lora.load_ended(key[1])
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone

    async def _load_once(self, holder: LoraHolder, name: str, path: str, timeout_s: float, retry_s: float) -> None:
        loras, instance_id = holder.lora, holder.spec.id
        try:
            await holder.adapter.load_lora_adapter(name, path, timeout_s=timeout_s)
        except LoraLoadError as exc:
            loras.loads[(name, "failed")] += 1
            log.warning("instance %s: LoRA adapter %s not loaded from %s: %s", instance_id, name, path, exc)
            if exc.status is None and not exc.engine_wide:  # the instance failed: its circuit hears of it
                raise LoraNotLoaded(instance_id, str(exc), unreachable=True) from None
            loras.load_failed(name, exc, self.clock() + retry_s)
            raise LoraNotLoaded(instance_id, str(exc)) from None
        loras.added(name, path, self.clock())
        loras.loads[(name, "loaded")] += 1
        log.info("instance %s: loaded LoRA adapter %s from %s", instance_id, name, path)
        await read_adapters(holder, self.clock, LISTING_TIMEOUT_S)  # the engine's own word on what it serves
