"""Which SLO a request has: its class (by API key, route or app tag), then the request's headers.

Headers (when ``slo.honor_headers``): ``x-slo-ttft-ms``, ``x-slo-tpot-ms`` (a positive number,
or ``none`` to lift the limit) and ``x-priority`` (an integer, higher is served first). The
Gateway API Inference Extension's names (llm-d's ``x-llm-d-slo-ttft-ms``,
``x-llm-d-slo-tpot-ms``, of which pdgate's are the older aliases) are read the same way; both
names of one limit with different values are a 400. A bad value is the client's fault: 400 in
OpenAI's error shape. The class is chosen by the first
configured class whose ``api_keys``, ``routes`` or ``apps`` (header ``x-pdgate-app``) match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pdgate.gateway.config import SloClassConfig, SloConfig, SloTargetConfig
from pdgate.gateway.requests import GatewayError
from pdgate.scheduler.snapshot import SloTarget

APP_HEADER = "x-pdgate-app"
MAX_PRIORITY = 1_000_000
TTFT_HEADERS = ("x-slo-ttft-ms", "x-llm-d-slo-ttft-ms")
TPOT_HEADERS = ("x-slo-tpot-ms", "x-llm-d-slo-tpot-ms")


class SloResolver:
    def __init__(self, config: SloConfig) -> None:
        self.config = config
        self._default = _target(config.default, "default")
        self._classes = [(c, _target(c, c.name)) for c in config.classes]
        self._named = {c.name: target for c, target in self._classes}

    def resolve(
        self, headers: Mapping[str, str], route: str, *, slo_class: str | None = None, max_priority: int | None = None
    ) -> SloTarget:
        """The request's SLO: ``slo_class`` (a tenant's) or the class that matches, then its headers;
        ``max_priority`` caps the priority it may ask for."""
        target = self._named.get(slo_class) if slo_class is not None else None
        target = target or self._class_target(headers, route)
        if max_priority is not None and target.priority > max_priority:
            target = SloTarget(target.ttft_s, target.tpot_s, max_priority, target.slo_class)
        if not self.config.honor_headers:
            return target
        ttft, tpot, priority = target.ttft_s, target.tpot_s, target.priority
        ttft = _header_limit(headers, TTFT_HEADERS, ttft)
        tpot = _header_limit(headers, TPOT_HEADERS, tpot)
        if (raw := headers.get("x-priority")) is not None:
            try:
                priority = int(raw.strip())
            except ValueError:
                raise GatewayError(400, f"x-priority must be an integer, got {raw[:40]!r}") from None
            if abs(priority) > MAX_PRIORITY:
                raise GatewayError(400, f"x-priority must be within ±{MAX_PRIORITY}")
            if max_priority is not None:
                priority = min(priority, max_priority)
        if (ttft, tpot, priority) == (target.ttft_s, target.tpot_s, target.priority):
            return target
        return SloTarget(ttft, tpot, priority, target.slo_class)

    def _class_target(self, headers: Mapping[str, str], route: str) -> SloTarget:
        if not self._classes:
            return self._default
        key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        app = headers.get(APP_HEADER)
        for cls, target in self._classes:
            if _matches(cls, key, route, app):
                return target
        return self._default


def _matches(cls: SloClassConfig, key: str, route: str, app: str | None) -> bool:
    return bool(key and key in cls.api_keys) or route in cls.routes or (app is not None and app in cls.apps)


def _target(config: SloTargetConfig, name: str) -> SloTarget:
    return SloTarget(
        ttft_s=config.ttft_ms / 1000.0 if config.ttft_ms is not None else None,
        tpot_s=config.tpot_ms / 1000.0 if config.tpot_ms is not None else None,
        priority=config.priority,
        slo_class=name,
    )


def _header_limit(headers: Mapping[str, str], names: tuple[str, ...], default: float | None) -> float | None:
    """The limit the request sent under one of ``names`` (``default`` when none); 400 when a value
    is bad or two names carry different limits."""
    sent = [(name, raw, _limit(raw, name)) for name in names if (raw := headers.get(name)) is not None]
    if not sent:
        return default
    if len({limit for _, _, limit in sent}) > 1:
        listed = ", ".join(f"{name}: {raw[:40]!r}" for name, raw, _ in sent)
        raise GatewayError(400, f"conflicting SLO headers ({listed}): send one of them")
    return sent[0][2]


def _limit(raw: str, header: str) -> float | None:
    text = raw.strip().lower()
    if text in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise GatewayError(
            400, f"{header} must be a positive number of milliseconds or 'none', got {raw[:40]!r}"
        ) from None
    if not math.isfinite(value) or value <= 0 or value > 86_400_000:
        raise GatewayError(400, f"{header} must be a positive number of milliseconds (at most a day), got {raw[:40]!r}")
    return value / 1000.0
