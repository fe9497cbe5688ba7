"""SGLang in disaggregation mode: bootstrap host/port/room, both legs dispatched at once."""

from __future__ import annotations

import random
from typing import Any

from pdgate.adapters.base import Capabilities, EngineAdapter, HandoffError


class SglangAdapter(EngineAdapter):
    """SGLang in disaggregation mode (bootstrap host/port/room, both legs at once)."""

    capabilities = Capabilities(pd_protocol="concurrent", metrics_flavour="sglang")

    def concurrent_fields(self, prefill: EngineAdapter) -> dict[str, Any]:
        if prefill.spec.bootstrap_port is None:
            raise HandoffError(f"prefill instance {prefill.spec.id} has no bootstrap_port configured")
        return {
            "bootstrap_host": prefill.spec.host,
            "bootstrap_port": prefill.spec.bootstrap_port,
            "bootstrap_room": random.getrandbits(63),  # as SGLang's router: uniform in [0, 2**63)
        }
