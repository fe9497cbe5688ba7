"""Fair share between tenants: the virtual token counter (VTC) of Sheng et al., "Fairness in Serving
Large Language Models" (OSDI '24), weighted per tenant.

Each tenant has a counter of the service it received, divided by its weight: ``input_cost`` per
prompt token when a request is dispatched, ``output_cost`` per output token as it streams. When
capacity is short the admission queue serves the tenant with the least counter first (its own
requests in deadline order), so a tenant sending ten times its share waits behind the others
instead of pushing them past their SLOs. A tenant that was idle does not bank credit: when it
joins the queue its counter is lifted to the least counter among the tenants active now (queued
or in flight), as VTC lifts a newly backlogged client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


class VirtualCounters:
    """The tenants' weighted virtual token counters."""

    def __init__(self, weights: Mapping[str, float], *, input_cost: float = 1.0, output_cost: float = 2.0) -> None:
        self.weights = dict(weights)
        self.input_cost = input_cost
        self.output_cost = output_cost
        self.counters: dict[str, float] = {}
        self.active: Counter[str] = Counter()  # tenant -> requests queued or in flight

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def charge(self, tenant: str, *, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add the service ``tenant`` received to its counter (scaled by its weight)."""
        cost = self.input_cost * prompt_tokens + self.output_cost * output_tokens
        if cost:
            self.counters[tenant] = self.counter(tenant) + cost / self.weights.get(tenant, 1.0)

    def joined(self, tenant: str, others_backlogged: Iterable[str]) -> None:
        """``tenant`` has work again: lift its counter to the least of the tenants active now."""
        active = [self.counter(t) for t in others_backlogged if t != tenant]
        active += [self.counter(t) for t, n in self.active.items() if n > 0 and t != tenant]
        if active and self.active[tenant] == 0:
            self.counters[tenant] = max(self.counter(tenant), min(active))

    def started(self, tenant: str) -> None:
        self.active[tenant] += 1

    def ended(self, tenant: str) -> None:
        self.active[tenant] -= 1
        if self.active[tenant] <= 0:
            del self.active[tenant]
