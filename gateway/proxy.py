"""The request path's façade: one OpenAI request in, its answer out.

:class:`Proxy` assembles the request path's parts, each in its own module with one job:

* :mod:`~pdgate.gateway.intake`: validate and tokenize the body into a ``Routed`` request;
* :mod:`~pdgate.gateway.exchange`: admission, placement with retries, the answer's legs;
* :mod:`~pdgate.gateway.placement`: the profile handler and profiles over a snapshot;
* :mod:`~pdgate.gateway.pd_legs` and :mod:`~pdgate.gateway.legs`: the PD legs per protocol;
* :mod:`~pdgate.gateway.relay`: the answer to the client, plain or through a movable LiveStream;
* :mod:`~pdgate.gateway.mover`: migration and failover of running streams (the migration
  controller's :class:`~pdgate.gateway.migration.Mover`);
* :mod:`~pdgate.gateway.outcome`: metrics, spans, access log and the cost model's record.

docs/architecture.md follows one request through them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from pdgate.common.http_server import HttpRequest, Responder
from pdgate.common.tokenizer import Tokenizer
from pdgate.gateway.admission import AdmissionController
from pdgate.gateway.answer import Answer
from pdgate.gateway.cluster import Cluster
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.costs import CostModelService
from pdgate.gateway.exchange import CLIENT_CLOSED, Exchange
from pdgate.gateway.intake import RESPONSES_ROUTE, ROUTES, Intake, Routed, request_attributes
from pdgate.gateway.metrics import GatewayMetrics
from pdgate.gateway.migration import MigrationController
from pdgate.gateway.mover import StreamMover
from pdgate.gateway.outcome import OutcomeRecorder
from pdgate.gateway.pd_legs import PdLegs
from pdgate.gateway.placement import Placer
from pdgate.gateway.relay import Relay
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.responses_stream import ResponsesAnswer
from pdgate.gateway.tenant_service import TenantService
from pdgate.gateway.tracing import NO_TRACE, Tracing
from pdgate.scheduler.framework import MigrationPolicy, Profile, ProfileHandler


class Proxy:
    """The request path; one per gateway. Owns the migration controller when a policy is given."""

    def __init__(
        self,
        config: GatewayConfig,
        cluster: Cluster,
        profiles: dict[str, Profile],
        handler: ProfileHandler,
        tokenizers: Mapping[str, Tokenizer],
        metrics: GatewayMetrics,
        *,
        admission: AdmissionController | None = None,
        costs: CostModelService | None = None,
        tracing: Tracing | None = None,
        migration_policy: MigrationPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        tenants: TenantService | None = None,
    ) -> None:
        self.cluster = cluster
        self.wall_clock = wall_clock  # the Responses API's created_at
        self.tracing = tracing
        self.intake = Intake(config, cluster, tokenizers, costs, tracing)
        self.outcome = OutcomeRecorder(config, cluster, metrics, costs)
        self.placer = Placer(cluster, profiles, handler, metrics, costs)
        self.legs = PdLegs(cluster, config.upstream_timeout_s)
        self.mover = StreamMover(config.migration, cluster, self.placer, self.legs, self.outcome, metrics)
        self.migrations = (
            MigrationController(config.migration, cluster, migration_policy, metrics, self.mover)
            if migration_policy is not None
            else None
        )
        self.relay = Relay(cluster, self.outcome, self.mover.failover, self.migrations)
        self.exchange = Exchange(
            self.placer,
            self.legs,
            self.relay,
            self.outcome,
            metrics,
            retries=config.retries,
            admission=admission,
            tenants=tenants,
        )

    async def handle(self, request: HttpRequest, responder: Responder, kind: str) -> None:
        """Serve one request of ``kind`` ("completion", "chat" or "responses": OpenAI's Responses API,
        served as the chat request it stands for); errors propagate as :class:`GatewayError`."""
        route = RESPONSES_ROUTE if kind == "responses" else ROUTES[kind]
        trace = self.tracing.start_request(route, request.headers) if self.tracing is not None else NO_TRACE
        routed: Routed | None = None
        answer: Answer = responder
        header_id = request.headers.get("x-request-id")
        try:
            arrival = self.cluster.clock()
            if kind == "responses":
                routed, responses = self.intake.parse_responses(
                    request.body, header_id, headers=request.headers, arrival=arrival
                )
                answer = ResponsesAnswer(responder, responses, self.wall_clock)
            else:
                routed = self.intake.parse(request.body, kind, header_id, headers=request.headers, arrival=arrival)
            routed.trace = trace
            if trace.enabled:
                trace.validated(request_attributes(routed), routed.prompt_text)
            await self.exchange.serve(routed, answer)
        except GatewayError as err:
            self.outcome.failed(routed, trace, route, err.status, err.code or err.err_type)
            request_id = routed.info.request_id if routed is not None else self.intake.error_id(header_id)
            err.headers.setdefault("X-Request-Id", request_id)
            raise
        except asyncio.CancelledError:
            if routed is None or not routed.obs.saw_done:
                self.outcome.failed(routed, trace, route, CLIENT_CLOSED, "client_disconnected")
            raise
        except Exception as exc:
            self.outcome.failed(routed, trace, route, 500, type(exc).__name__)
            raise
