"""In-tree filters."""

from __future__ import annotations

from typing import Literal

from pdgate.scheduler.framework import Filter, PluginParams
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class HealthFilter(Filter):
    """Keeps instances that are healthy (circuit closed) and not draining."""

    type_name = "health-filter"

    def filter(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> list[InstanceView]:
        return [i for i in candidates if i.available]


class RoleFilterParams(PluginParams):
    role: Literal["prefill", "decode", "both"]


class RoleFilter(Filter):
    """Keeps instances that can serve ``role``.

    ``prefill`` / ``decode``: instances of that role and colocated (``both``) ones;
    ``both``: only colocated instances (a request served in one leg).
    """

    type_name = "role-filter"
    Params = RoleFilterParams

    def filter(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> list[InstanceView]:
        role = self.params.role  # type: ignore[attr-defined]
        if role == "both":
            return [i for i in candidates if i.role == "both"]
        return [i for i in candidates if i.serves(role)]
