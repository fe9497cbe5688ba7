"""When requests are sent: arrival processes, seeded and reproducible.

* ``poisson``: exponential gaps with mean ``1/rate``.
* ``gamma``: gamma-distributed gaps with mean ``1/rate`` and shape ``burstiness``
  (``vllm bench serve``'s definition: 1 is Poisson, below 1 burstier, above 1 more regular).
* ``constant``: exactly ``1/rate`` apart.
* ``trace``: the requests' own ``arrival_s``, divided by ``speedup``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from pdgate.loadgen.types import BenchRequest

ArrivalKind = Literal["poisson", "gamma", "constant", "trace"]


def arrival_times(
    kind: ArrivalKind,
    n: int,
    *,
    rate: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    requests: Sequence[BenchRequest] = (),
    speedup: float = 1.0,
) -> list[float]:
    """Send times in seconds from the start, one per request, non-decreasing; the first at 0
    for the synthetic processes (a trace keeps its own offsets)."""
    if kind == "trace":
        if len(requests) < n or any(r.arrival_s is None for r in requests[:n]):
            raise ValueError("trace arrivals need requests with timestamps (arrival_s)")
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        return [float(r.arrival_s) / speedup for r in requests[:n]]  # type: ignore[arg-type]
    if rate is None or rate <= 0:
        raise ValueError(f"{kind} arrivals need a positive rate")
    if n == 0:
        return []
    if kind == "constant":
        return [i / rate for i in range(n)]
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n - 1)
    elif kind == "gamma":
        if burstiness <= 0:
            raise ValueError("burstiness must be positive")
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n - 1)
    else:
        raise ValueError(f"unknown arrival process {kind!r}")
    return [0.0, *np.cumsum(gaps).tolist()]
