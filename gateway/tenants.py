"""Tenants at the gateway: who sent a request, and whether its budgets let it in.

* :class:`TenantDirectory` names a request's tenant from its API key, a header or its route
  (``tenants.identify_by``, in order).
* :class:`TokenBucket` is one budget: ``capacity`` per minute, refilled continuously. A request
  needs one request token and as many prompt tokens as its prompt (capped at the bucket's size, so
  a prompt larger than the budget still goes when the bucket is full); output tokens are charged
  as they stream, so the level may go below zero and the next requests wait for the refill.
* :class:`TenantBudgets` checks and charges both budgets of every tenant, and folds in what other
  gateway replicas report their tenants used (:class:`~pdgate.gateway.tenant_sharing.TenantSharing`),
  so a budget holds across replicas. Over budget: 429 with ``Retry-After`` (when the bucket will
  hold enough again) and ``x-pdgate-reject-reason: tenant-budget``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pdgate.gateway.requests import GatewayError
from pdgate.gateway.tenant_config import TenantConfig, TenantsConfig

BUDGET_REJECT_REASON = "tenant-budget"


class BudgetExceeded(GatewayError):
    """429: a tenant's ``budget`` ("requests" or "tokens") cannot cover the request now."""

    def __init__(self, tenant: str, budget: str, per_minute: float, wait_s: float) -> None:
        super().__init__(
            429,
            f"tenant {tenant!r} is over its {budget}-per-minute budget ({per_minute:g}); retry in {wait_s:.1f} s",
            code=BUDGET_REJECT_REASON,
            headers={"Retry-After": str(max(1, math.ceil(wait_s))), "x-pdgate-reject-reason": BUDGET_REJECT_REASON},
        )
        self.tenant = tenant
        self.budget = budget


class TenantDirectory:
    """Names the tenant of each request (see the module doc)."""

    def __init__(self, config: TenantsConfig) -> None:
        self.config = config
        self.by_key = {key: t.name for t in config.tenants for key in t.api_keys}
        self.by_route = {route: t.name for t in config.tenants for route in t.routes}
        self.names = {t.name for t in config.tenants}

    def identify(self, headers: Mapping[str, str], route: str) -> str:
        """The tenant of a request with ``headers`` on ``route``; 403 when none is named and one is required."""
        for source in self.config.identify_by:
            name = self._named_by(source, headers, route)
            if name is not None:
                return name
        if self.config.require_tenant:
            raise GatewayError(403, "this gateway serves only its configured tenants; none was named", code="no_tenant")
        return self.config.default_tenant

    def _named_by(self, source: str, headers: Mapping[str, str], route: str) -> str | None:
        if source == "api_key":
            return self.by_key.get(headers.get("authorization", "").removeprefix("Bearer ").strip())
        if source == "header":
            value = headers.get(self.config.header)
            if value is None:
                return None
            if value.strip() not in self.names:
                raise GatewayError(403, f"{self.config.header} names no configured tenant", code="unknown_tenant")
            return value.strip()
        return self.by_route.get(route)


@dataclass
class TokenBucket:
    """A budget of ``per_minute`` units, refilled continuously; it holds at most a minute's worth."""

    per_minute: float
    level: float
    updated_at: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> TokenBucket:
        return cls(per_minute, per_minute, now)

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated_at:
            self.level = min(self.per_minute, self.level + (now - self.updated_at) * self.rate)
            self.updated_at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds ``amount`` (capped at its size); 0 when it does now."""
        self.refill(now)
        need = min(amount, self.per_minute) - self.level
        return max(0.0, need / self.rate)

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` (the level may go negative: output already served is owed)."""
        self.refill(now)
        self.level -= amount


@dataclass
class TenantUsage:
    """What a tenant has used since this gateway started (requests, prompt and output tokens)."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0


class TenantBudgets:
    """The request and token budgets of every tenant, checked on arrival and charged as work is served."""

    def __init__(self, config: TenantsConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.tenants: dict[str, TenantConfig] = {t.name: t for t in config.tenants}
        self.requests: dict[str, TokenBucket] = {}
        self.tokens: dict[str, TokenBucket] = {}
        self.usage: dict[str, TenantUsage] = {}
        now = clock()
        for t in config.tenants:
            if t.requests_per_minute is not None:
                self.requests[t.name] = TokenBucket.full(t.requests_per_minute, now)
            if t.tokens_per_minute is not None:
                self.tokens[t.name] = TokenBucket.full(t.tokens_per_minute, now)

    def usage_of(self, tenant: str) -> TenantUsage:
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = TenantUsage()
        return usage

    def admit(self, tenant: str, prompt_tokens: int) -> None:
        """Charge one request and its prompt to ``tenant``, or raise 429 when a budget cannot cover them."""
        now = self.clock()
        checks = (
            (self.requests.get(tenant), 1.0, "requests"),
            (self.tokens.get(tenant), float(prompt_tokens), "tokens"),
        )
        for bucket, amount, budget in checks:
            if bucket is None:
                continue
            wait = bucket.wait_for(amount, now)
            if wait > 0:
                raise BudgetExceeded(tenant, budget, bucket.per_minute, wait)
        self.charge(tenant, requests=1, prompt_tokens=prompt_tokens)

    def charge(self, tenant: str, *, requests: int = 0, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count work served here for ``tenant`` against its budgets."""
        now = self.clock()
        usage = self.usage_of(tenant)
        usage.requests += requests
        usage.prompt_tokens += prompt_tokens
        usage.output_tokens += output_tokens
        self.charge_remote(tenant, requests, prompt_tokens + output_tokens, now)

    def charge_remote(self, tenant: str, requests: int, tokens: int, now: float | None = None) -> None:
        """Count work served for ``tenant`` (here, or by another replica) against its budgets."""
        now = self.clock() if now is None else now
        if requests and (bucket := self.requests.get(tenant)) is not None:
            bucket.charge(requests, now)
        if tokens and (bucket := self.tokens.get(tenant)) is not None:
            bucket.charge(tokens, now)
