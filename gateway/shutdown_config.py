"""The ``shutdown`` section: how a gateway replica ends on SIGTERM (or SIGINT) without failing requests.

1. ``GET /ready`` answers 503 (``"stopping": true``) while the replica goes on serving for
   ``ready_delay_s``, so that load balancers and Kubernetes endpoints stop sending it new
   connections (in Kubernetes the chart's preStop hook waits instead, and this is 0);
2. it stops listening and closes idle keep-alive connections; the requests in flight, streams
   included, get ``grace_s`` to finish; what still runs then is cut;
3. a leader gives up its lease (another replica leads at once), every task is cancelled and
   awaited, and the process exits 0.

``pdgate serve --workers N`` gives each worker the same, and SIGKILLs only those still running
``ready_delay_s + grace_s`` (and a margin) after the SIGTERM.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SHUTDOWN_MARGIN_S = 5.0  # a supervisor's wait beyond a worker's own delay and grace


class ShutdownConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ready_delay_s: float = Field(
        0.0, ge=0, le=3600, description="after SIGTERM, /ready answers 503 this long while the replica still serves"
    )
    grace_s: float = Field(
        30.0, ge=0, le=3600, description="then, for the requests in flight (streams too) to finish; the rest are cut"
    )

    @property
    def total_s(self) -> float:
        """How long a replica may take to end after SIGTERM, a margin included."""
        return self.ready_delay_s + self.grace_s + SHUTDOWN_MARGIN_S
