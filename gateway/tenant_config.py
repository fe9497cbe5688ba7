"""The ``tenants`` section of the gateway config: who a request belongs to, and what that tenant may use.

A tenant is named by the request's API key, a header, or its route (``identify_by``, tried in
order; the first that names a configured tenant wins). A request that names none belongs to
``default_tenant`` or, with ``require_tenant``, is refused (403). docs/tenants.md has the rules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Identifier = Literal["api_key", "header", "route"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantConfig(_Strict):
    """One tenant: how it is recognised, its SLO class and priority ceiling, its budgets and its share."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    api_keys: list[str] = Field(default_factory=list, description="bearer keys that name this tenant")
    routes: list[str] = Field(default_factory=list, description="routes that name this tenant, e.g. /v1/embeddings")
    slo_class: str | None = Field(None, description="the SLO class its requests get (a name in slo.classes)")
    max_priority: int | None = Field(
        None,
        description="the highest gateway priority its requests get (their class's or x-priority's); none: any. "
        "The body's priority field goes to the engine unchanged",
    )
    requests_per_minute: float | None = Field(None, gt=0, description="request budget (token bucket; none: no limit)")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="prompt + output token budget (token bucket, output charged as it streams)"
    )
    weight: float = Field(1.0, gt=0, description="its share in the admission queue's fair share, relative to others")


def _default_identifiers() -> list[Identifier]:
    return ["api_key", "header"]


class TenantsConfig(_Strict):
    """Tenants, their budgets and the admission queue's fair share between them (off without tenants)."""

    identify_by: list[Identifier] = Field(
        default_factory=_default_identifiers, description="what names a request's tenant, tried in order"
    )
    header: str = Field("x-pdgate-tenant", description="the header that names a tenant (identify_by: header)")
    default_tenant: str = Field("default", description="the tenant of requests that name none")
    require_tenant: bool = Field(False, description="refuse (403) a request that names no configured tenant")
    fair_share: bool = Field(
        True, description="order the admission queue by each tenant's weighted virtual token counter (VTC)"
    )
    input_token_cost: float = Field(1.0, ge=0, description="VTC: the counter's charge per prompt token")
    output_token_cost: float = Field(2.0, ge=0, description="VTC: the counter's charge per output token")
    charge_interval_s: float = Field(0.25, gt=0, description="how often streaming output is charged to budgets")
    tenants: list[TenantConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> TenantsConfig:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        keys = [k for t in self.tenants for k in t.api_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("an API key may name only one tenant")
        routes = [r for t in self.tenants for r in t.routes]
        if len(set(routes)) != len(routes):
            raise ValueError("a route may name only one tenant")
        self.header = self.header.lower()
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def get(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)
