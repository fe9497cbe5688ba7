"""Tenants on the request path: budgets on arrival, fair-share counters, output charged as it streams.

:class:`TenantService` is the request path's one handle on tenants (:mod:`~pdgate.gateway.tenants`
for naming and budgets, :mod:`~pdgate.gateway.fair_share` for the counters):

* :meth:`TenantService.admit`: before admission, the tenant's budgets take the request and its
  prompt, or refuse it (429, ``x-pdgate-reject-reason: tenant-budget``); a request that is then
  never dispatched (admission refused it, its client left while queued), or that the fleet failed
  (5xx) before any of its answer came, gets them back;
* :meth:`TenantService.started` / :meth:`TenantService.ended`: a dispatched request charges its
  prompt to the tenant's virtual counter, and its output, as it streams (every
  ``tenants.charge_interval_s``, from what has reached the client) and exactly at the end (from the
  usage), to the counter and the token budget.

One background task (the charging round) is owned here; :meth:`TenantService.close` cancels and awaits it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from pdgate.common.tasks import OwnedTasks, every
from pdgate.gateway.admission_queue import TENANT_TAG
from pdgate.gateway.fair_share import VirtualCounters
from pdgate.gateway.intake import Routed
from pdgate.gateway.outcome import output_tokens
from pdgate.gateway.tenant_config import TenantsConfig
from pdgate.gateway.tenants import BudgetExceeded, TenantBudgets, TenantDirectory, TokenBucket

log = logging.getLogger("pdgate.tenants")


class TenantMetrics:
    """Per-tenant series (``pdgate_tenant_*``), on the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pdgate_tenant_requests",
            "Requests per tenant by final HTTP status",
            ["tenant", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "pdgate_tenant_tokens", "Tokens served per tenant (prompt, output)", ["tenant", "kind"], registry=registry
        )
        self.rejections = Counter(
            "pdgate_tenant_budget_rejections",
            "Requests refused because a tenant budget (requests, tokens) was spent",
            ["tenant", "budget"],
            registry=registry,
        )
        self.slo = Counter(
            "pdgate_tenant_slo",
            "Completed requests per tenant by whether they met their SLO",
            ["tenant", "met"],
            registry=registry,
        )
        self.counter = Gauge(
            "pdgate_tenant_virtual_counter",
            "The tenant's weighted virtual token counter (fair share: the least is served first)",
            ["tenant"],
            registry=registry,
        )
        self.budget_level = Gauge(
            "pdgate_tenant_budget_remaining",
            "What the tenant's budget holds now (requests or tokens; negative: output owed)",
            ["tenant", "budget"],
            registry=registry,
        )


@dataclass(eq=False)
class _Running:
    routed: Routed
    tenant: str
    charged_output: int = 0


class TenantService:
    """Budgets, fair-share counters and per-tenant accounting of one gateway (see the module doc)."""

    def __init__(self, config: TenantsConfig, clock: Callable[[], float], registry: CollectorRegistry) -> None:
        self.config = config
        self.clock = clock
        self.directory = TenantDirectory(config)
        self.budgets = TenantBudgets(config, clock)
        self.counters = (
            VirtualCounters(
                {t.name: t.weight for t in config.tenants},
                input_cost=config.input_token_cost,
                output_cost=config.output_token_cost,
            )
            if config.fair_share
            else None
        )
        self.metrics = TenantMetrics(registry)
        self.running: dict[int, _Running] = {}  # dispatched requests whose output is still charged
        self.admitted: set[int] = set()  # requests its budgets took that wait for dispatch
        self._tasks = OwnedTasks()
        for name, buckets in (("requests", self.budgets.requests), ("tokens", self.budgets.tokens)):
            for tenant, bucket in buckets.items():
                self.metrics.budget_level.labels(tenant, name).set_function(self._level_of(bucket))

    def _level_of(self, bucket: TokenBucket) -> Callable[[], float]:
        def level() -> float:
            bucket.refill(self.clock())
            return float(bucket.level)

        return level

    def start(self) -> None:
        self._tasks.spawn(every(self.config.charge_interval_s, self.charge_streams, "tenant charging", log), "tenants")

    async def close(self) -> None:
        await self._tasks.close()

    def _tenant(self, routed: Routed) -> str:
        """The tenant intake named (the default one for a request built without it)."""
        return routed.info.tags.get(TENANT_TAG, self.config.default_tenant)

    def admit(self, routed: Routed) -> None:
        """Take the request and its prompt from its tenant's budgets, or raise 429."""
        tenant = self._tenant(routed)
        try:
            self.budgets.admit(tenant, routed.info.prompt_tokens)
        except BudgetExceeded as err:
            self.metrics.rejections.labels(tenant, err.budget).inc()
            raise
        self.admitted.add(id(routed))

    def started(self, routed: Routed) -> None:
        """A request of the tenant was dispatched: its prompt counts toward the tenant's share."""
        tenant = self._tenant(routed)
        self.admitted.discard(id(routed))
        self.running[id(routed)] = _Running(routed, tenant)
        if self.counters is not None:
            self.counters.started(tenant)
            self.counters.charge(tenant, prompt_tokens=routed.info.prompt_tokens)
            self.metrics.counter.labels(tenant).set(self.counters.counter(tenant))

    def ended(self, routed: Routed, status: int) -> None:
        """The request is over: its output is charged exactly (from the usage), and it is counted."""
        running = self.running.pop(id(routed), None)
        if running is None:  # refused before dispatch (its budget, admission) or gone while queued
            tenant = self._tenant(routed)
            if id(routed) in self.admitted:  # its budgets took it, but nothing was served: given back
                self.admitted.discard(id(routed))
                self.budgets.charge(tenant, requests=-1, prompt_tokens=-routed.info.prompt_tokens)
            self.metrics.requests.labels(tenant, str(status)).inc()
            return
        obs = routed.obs
        if status >= 500 and obs.first_token is None and obs.last_token is None:
            self._give_back(running)  # the fleet failed it before any answer: not the tenant's use
        else:
            self.metrics.tokens.labels(running.tenant, "prompt").inc(routed.info.prompt_tokens)
            self._charge_output(running, output_tokens(routed) or 0)
        tokens = running.charged_output
        if self.counters is not None:
            self.counters.ended(running.tenant)
        self.metrics.requests.labels(running.tenant, str(status)).inc()
        first = obs.first_token if routed.stream else obs.last_token  # a whole answer's first token is its end
        if status == 200 and first is not None:
            tpot = None
            if routed.stream and tokens >= 2 and obs.last_token is not None:
                tpot = (obs.last_token - first) / (tokens - 1)
            met = routed.info.slo.met(first - routed.info.arrival, tpot)
            self.metrics.slo.labels(running.tenant, "true" if met else "false").inc()

    def admit_call(self, headers: Mapping[str, str], route: str) -> str:
        """A pass-through call (embeddings, score, rerank, tokenizer): its tenant, named as for any
        request (403 rules included), and one request taken from its budget (or 429)."""
        tenant = self.directory.identify(headers, route)
        try:
            self.budgets.admit(tenant, 0)
        except BudgetExceeded as err:
            self.metrics.rejections.labels(tenant, err.budget).inc()
            self.metrics.requests.labels(tenant, str(err.status)).inc()
            raise
        return tenant

    def call_ended(self, tenant: str, status: int, prompt_tokens: int) -> None:
        """A pass-through call is over: its input tokens are charged, or its request given back
        when no engine answered it (5xx)."""
        if status >= 500:
            self.budgets.charge(tenant, requests=-1)
        elif prompt_tokens > 0:
            self.budgets.charge(tenant, prompt_tokens=prompt_tokens)
            self.metrics.tokens.labels(tenant, "prompt").inc(prompt_tokens)
        self.metrics.requests.labels(tenant, str(status)).inc()

    def _give_back(self, running: _Running) -> None:
        """Return a dispatched request's request and prompt charge (and its fair-share charge)."""
        prompt = running.routed.info.prompt_tokens
        self.budgets.charge(running.tenant, requests=-1, prompt_tokens=-prompt)
        if self.counters is not None:
            self.counters.charge(running.tenant, prompt_tokens=-prompt)
            self.metrics.counter.labels(running.tenant).set(self.counters.counter(running.tenant))

    def charge_streams(self) -> None:
        """Charge what each running stream has sent since the last round: its events less three (a
        chat stream's role event, the usage event, ``[DONE]``), a count that lags the exact one
        taken at the end by a few tokens at most and never passes it."""
        for running in list(self.running.values()):
            routed = running.routed
            if routed.stream:
                self._charge_output(running, max(running.charged_output, routed.obs.events - 3))

    def _charge_output(self, running: _Running, total: int) -> None:
        delta = total - running.charged_output
        if delta == 0:
            return
        running.charged_output = total
        self.budgets.charge(running.tenant, output_tokens=delta)
        self.metrics.tokens.labels(running.tenant, "output").inc(max(0, delta))
        if self.counters is not None:
            self.counters.charge(running.tenant, output_tokens=delta)
            self.metrics.counter.labels(running.tenant).set(self.counters.counter(running.tenant))
