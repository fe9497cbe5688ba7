"""The operator's API under ``/admin``: instances, drain and undrain, moving one request.

* ``GET /admin/instances``: every instance (id, url, role, model, kind, health, circuit, load,
  draining, running requests, the streams the gateway can move, and its prefix index: exact
  or approximate, with the blocks it holds for the instance).
* ``GET /admin/instances/{id}``: one of them.
* ``POST /admin/instances/{id}/drain``: keep new requests off the instance and move every
  running stream away (others finish where they are). ``?wait=true`` answers once it is empty
  (200) or after ``admin.drain_wait_s`` (202, with what is left); otherwise 202 at once.
* ``POST /admin/instances/{id}/undrain``: take new requests again.
* ``POST /admin/instances/{id}/role`` (JSON body ``{"role": "prefill" | "decode" | "both"}``): a
  flex instance serves in that role from the next placement on (``serving`` in its view); its
  streams move away when it leaves the decode role. 409 for an instance that is not flex, or a
  change that leaves its model without a prefill or decode path.
* ``POST /admin/instances`` (JSON body: one instance entry, the config file's fields): serve one
  more instance from now on (201; 400 for a bad entry, 409 for an id in use).
* ``DELETE /admin/instances/{id}``: drain it, then stop serving it (200). ``?timeout_s=`` bounds
  the drain (default ``admin.drain_wait_s``); 409 when it did not finish (the instance stays
  drained) or when the instance is its model's last serving path; ``?force=true`` removes anyway.
* ``GET /admin/plan``: the role balancer's latest plan per model (``enabled`` false when it is off),
  and under ``scaling`` the scaling plan per model (instances per role, the forecast, why, and
  what the actuator did).
* ``GET /admin/discovery``: what Kubernetes discovery sees (``synced``, ``pods``), the instances
  it added (``managed``) and is removing, the pods that cannot join and why (``problems``), and
  the API's last failure; ``enabled`` false without ``discovery.kubernetes``.
* ``GET /admin/console/state``: what the ops console at ``GET /console`` shows
  (:mod:`pdgate.gateway.console`): these instances, the admission queue, the last minutes' SLO
  attainment and goodput, recent migrations and role changes, and the plan.
* ``POST /admin/requests/{request_id}/migrate`` (JSON body ``{"target": id}``, optional): move
  one running stream now; answers whether it moved.

With gateway replicas, every replica answers for the whole gateway: an instance's ``streams``
lists every replica's (``replica`` says which one holds the client's connection), and a move of
another replica's stream is asked of that replica (:mod:`pdgate.gateway.peers`) and answered as
it answers.

Authenticated by ``admin.api_key`` (or ``PDGATE_ADMIN_KEY``) as a bearer token when one is set;
without one, only loopback clients are served (403 for others). With
``tls.admin_requires_client_cert`` the connection must also have presented a client certificate
signed by ``tls.client_ca_file`` (401 otherwise); that certificate then stands in for the
loopback rule, and an admin key, when set, is still required (docs/tls.md).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from pdgate.common.http_server import HttpRequest, Responder
from pdgate.gateway.fleet import FleetChangeError, FleetManager
from pdgate.gateway.requests import GatewayError

if TYPE_CHECKING:
    from pdgate.gateway.cluster import Cluster
    from pdgate.gateway.config import GatewayConfig
    from pdgate.gateway.console import ConsoleState
    from pdgate.gateway.discovery.kube_discovery import KubeDiscovery
    from pdgate.gateway.instance_state import InstanceState
    from pdgate.gateway.migration import MigrationController
    from pdgate.gateway.peers import PeerStreams
    from pdgate.gateway.role_balancing import RoleBalancing
    from pdgate.gateway.scaling import Scaling
    from pdgate.scheduler.role_planner import PoolDemand


class AdminApi:
    """Handles every path under ``/admin/``."""

    def __init__(
        self, config: GatewayConfig, cluster: Cluster, migrations: MigrationController, fleet: FleetManager
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.migrations = migrations
        self.fleet = fleet
        self.peers: PeerStreams | None = None  # the other replicas' streams (sharing)
        self.roles: RoleBalancing | None = None  # the role balancer, when enabled
        self.scaling: Scaling | None = None  # the scaling plan, when enabled
        self.discovery: KubeDiscovery | None = None  # Kubernetes discovery, when configured
        self.console: ConsoleState | None = None  # the ops console's state (set by the app)
        self.replica_id: str | None = None
        key = config.admin_api_key()
        self._key = key.encode() if key else None
        self._requires_client_cert = config.tls.admin_requires_client_cert

    async def __call__(self, request: HttpRequest, responder: Responder) -> None:
        self._authorize(request, responder)
        parts = [unquote(p) for p in request.path.split("/")[2:]]  # after "", "admin"
        method = request.method
        if parts == ["instances"]:
            self._allow(method, "GET", "POST")
            if method == "POST":
                await self._add(request, responder)
                return
            responder.send_json(
                200, {"object": "list", "data": [self._describe(s) for s in self.cluster.instances.values()]}
            )
        elif len(parts) == 2 and parts[0] == "instances":
            self._allow(method, "GET", "DELETE")
            if method == "DELETE":
                await self._remove(parts[1], request, responder)
                return
            responder.send_json(200, self._describe(self._instance(parts[1])))
        elif len(parts) == 3 and parts[0] == "instances" and parts[2] in ("drain", "undrain"):
            self._allow(method, "POST")
            state = self._instance(parts[1])
            if parts[2] == "undrain":
                await self.fleet.undrain(state.spec.id)
                responder.send_json(200, self._describe(state))
                return
            await self._drain(state, request, responder)
        elif len(parts) == 3 and parts[0] == "instances" and parts[2] == "role":
            self._allow(method, "POST")
            await self._set_role(self._instance(parts[1]), request, responder)
        elif parts == ["plan"]:
            self._allow(method, "GET")
            responder.send_json(200, self._plan())
        elif parts == ["discovery"]:
            self._allow(method, "GET")
            responder.send_json(200, self._discovery())
        elif parts == ["console", "state"]:
            self._allow(method, "GET")
            responder.send_json(200, self._console())
        elif len(parts) == 3 and parts[0] == "requests" and parts[2] == "migrate":
            self._allow(method, "POST")
            await self._migrate(parts[1], request, responder)
        else:
            raise GatewayError(404, f"no route {method} {request.path}")

    # ------------------------------------------------------------------ checks
    def _authorize(self, request: HttpRequest, responder: Responder) -> None:
        if self._requires_client_cert:
            self._check_client_cert(responder)
        if self._key is not None:
            supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
            if not hmac.compare_digest(supplied, self._key):
                raise GatewayError(401, "invalid or missing admin key", code="invalid_api_key")
            return
        if self._requires_client_cert:
            return  # the verified client certificate authenticates the caller, wherever it connects from
        host = responder.peer_host
        try:
            loopback = host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise GatewayError(
                403,
                "the admin API answers loopback clients only unless admin.api_key is set",
                err_type="permission_error",
            )

    @staticmethod
    def _check_client_cert(responder: Responder) -> None:
        """401 unless this connection's TLS handshake verified a client certificate (one that
        does not verify never gets this far: its handshake fails)."""
        if responder.peer_certificate is None:
            raise GatewayError(
                401,
                "the admin API requires a client certificate (tls.admin_requires_client_cert): connect over "
                "HTTPS presenting a certificate signed by the gateway's client CA",
                code="client_certificate_required",
            )

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise GatewayError(405, f"method {method} not allowed here", headers={"Allow": ", ".join(allowed)})

    def _instance(self, instance_id: str) -> InstanceState:
        state = self.cluster.instances.get(instance_id)
        if state is None:
            raise GatewayError(
                404,
                f"no instance {instance_id!r}; known: {', '.join(sorted(self.cluster.instances))}",
                param="instance",
                code="instance_not_found",
            )
        return state

    # ------------------------------------------------------------------ views
    def _describe(self, state: InstanceState) -> dict[str, Any]:
        spec = state.spec
        now = self.cluster.clock()
        load = state.load
        fresh = load is not None and now - load.scraped_at <= self.cluster.config.stale_after_s
        streams = self.migrations.on(spec.id)
        return {
            "id": spec.id,
            "url": spec.url,
            "role": spec.role,
            "serving": state.role,
            "model": spec.model,
            "kind": spec.kind,
            "healthy": state.breaker.allows(now),
            "circuit": state.breaker.state,
            "last_error": state.last_error,
            "draining": state.draining,
            "load": {
                "running": load.running if load is not None and fresh else None,
                "waiting": load.waiting if load is not None and fresh else None,
                "kv_usage": load.kv_usage if load is not None and fresh else None,
                "inflight_requests": state.inflight_requests,
                "decode_inflight": state.decode_inflight,
                "prefill_inflight": len(state.prefill_work),
            },
            "running_requests": state.inflight_requests,
            "cluster_running_requests": state.inflight_requests + self._remote_requests(spec.id),
            "streams": [
                {
                    "request_id": s.request_id,
                    "replica": self.replica_id,
                    "generated_tokens": s.generated,
                    "max_tokens": s.max_tokens,
                    "moves": s.moves,
                    "moving": s.moving,
                    "movable": s.trail.tracked,
                }
                for s in streams
            ]
            + [
                {
                    "request_id": r.request_id,
                    "replica": replica,
                    "generated_tokens": r.generated_tokens,
                    "max_tokens": r.max_tokens,
                    "moves": r.migrations,
                    "moving": False,
                    "movable": r.migratable,
                }
                for replica, r in (self.peers.on(spec.id) if self.peers is not None else [])
            ],
            "capabilities": sorted(state.capability_names),
            "prefix_index": self._prefix_index(state),
        }

    def _plan(self) -> dict[str, Any]:
        """The role balancer's latest plan per model: the split, the utilisations it expects, the
        forecast demand it planned for, and the move it made toward it (if any)."""
        plans = self.roles.plans if self.roles is not None else {}
        return {
            "object": "list",
            "enabled": self.roles is not None,
            "data": [
                {
                    "model": model,
                    "prefill": plan.prefill,
                    "decode": plan.decode,
                    "current_prefill": plan.current_prefill,
                    "prefill_utilisation": round(plan.prefill_utilisation, 4),
                    "decode_utilisation": round(plan.decode_utilisation, 4),
                    "forecast": _forecast(plan.demand),
                    "move": {"instance": plan.move[0], "role": plan.move[1]} if plan.move else None,
                    "reason": plan.reason,
                }
                for model, plan in sorted(plans.items())
            ],
            "scaling": self._scaling(),
        }

    def _console(self) -> dict[str, Any]:
        """The ops console's state: these instances and plan, and what :mod:`pdgate.gateway.console` adds."""
        if self.console is None:
            raise GatewayError(404, "this gateway serves no ops console")
        instances = [self._describe(s) for s in self.cluster.instances.values()]
        return self.console.state(instances, self._plan(), self._discovery(), self.replica_id)

    def _discovery(self) -> dict[str, Any]:
        """Kubernetes discovery's state (``enabled`` false without it)."""
        found = self.discovery.status() if self.discovery is not None else {}
        return {"enabled": self.discovery is not None, **found}

    def _scaling(self) -> dict[str, Any]:
        """The scaling plan per model: the instances it wants per role, what runs, the forecast it
        planned for, why, and what the actuator did last."""
        scaling = self.scaling
        if scaling is None:
            return {"enabled": False, "actuator": None, "data": []}
        data = []
        for model, plan in sorted(scaling.plans.items()):
            data.append(
                {
                    "model": model,
                    "instances": {"prefill": plan.prefill, "decode": plan.decode, "both": plan.colocated},
                    "current": dict(plan.current),
                    "streams_per_decode_instance": plan.streams_per_decode,
                    "forecast": _forecast(plan.demand),
                    "reason": plan.reason,
                    "actions": scaling.actions.get(model, []),
                }
            )
        return {"enabled": True, "actuator": scaling.settings.actuator.type, "data": data}

    def _prefix_index(self, state: InstanceState) -> dict[str, Any]:
        """Which prefix index knows the instance's cache (exact: its KV events; approximate: what
        the gateway's replicas sent it) and how many blocks it holds for it."""
        exact = self.cluster.has_kv_events(state)
        index = self.cluster.exact_index if exact else self.cluster.approx_index
        return {"index": "exact" if exact else "approximate", "blocks": len(index.blocks(state.spec.id))}

    def _remote_requests(self, instance_id: str) -> int:
        """Requests other replicas have in flight on the instance (0 without load sharing)."""
        remote = self.cluster.remote.get(instance_id)
        return remote.requests if remote is not None else 0

    # ----------------------------------------------------------------- actions
    async def _drain(self, state: InstanceState, request: HttpRequest, responder: Responder) -> None:
        query = parse_qs(request.query)
        wait = query.get("wait", ["false"])[-1].lower() in ("1", "true", "yes")
        timeout = self._timeout(query)
        await self.fleet.drain(state.spec.id)
        drained = await self.migrations.wait_drained(state.spec.id, timeout) if wait else False
        body = self._describe(state)
        body["drained"] = drained
        responder.send_json(200 if drained else 202, body)

    async def _set_role(self, state: InstanceState, request: HttpRequest, responder: Responder) -> None:
        try:
            data = json.loads(request.body or b"null")
        except (ValueError, RecursionError):  # (a body nested too deep is the client's fault too)
            raise GatewayError(400, 'the body must be JSON: {"role": "prefill" | "decode" | "both"}') from None
        if not isinstance(data, dict) or not isinstance(data.get("role"), str):
            raise GatewayError(400, 'expected {"role": "prefill" | "decode" | "both"}', param="role")
        reason = data.get("reason")
        try:
            await self.fleet.set_role(state.spec.id, data["role"], reason if isinstance(reason, str) else "admin")
        except FleetChangeError as exc:
            raise GatewayError(exc.status, exc.message, param=exc.param) from None
        responder.send_json(200, self._describe(state))

    async def _add(self, request: HttpRequest, responder: Responder) -> None:
        try:
            entry = json.loads(request.body or b"null")
        except (ValueError, RecursionError):  # (a body nested too deep is the client's fault too)
            raise GatewayError(400, "the body must be JSON: one instance entry") from None
        if not isinstance(entry, dict):
            raise GatewayError(400, "the body must be a JSON object: one instance entry (url, model, role, kind, ...)")
        if "pod_uid" in entry:
            raise GatewayError(400, "pod_uid is set by Kubernetes discovery, not by hand", param="pod_uid")
        try:
            state = await self.fleet.add(entry)
        except FleetChangeError as exc:
            raise GatewayError(exc.status, exc.message, param=exc.param) from None
        responder.send_json(201, self._describe(state))

    async def _remove(self, instance_id: str, request: HttpRequest, responder: Responder) -> None:
        query = parse_qs(request.query)
        force = query.get("force", ["false"])[-1].lower() in ("1", "true", "yes")
        timeout = self._timeout(query)
        self._instance(instance_id)
        if self.discovery is not None and instance_id in self.discovery.managed():
            raise GatewayError(
                409,
                f"instance {instance_id!r} is a pod Kubernetes discovery serves: it would join again; drain it "
                "(POST /admin/instances/{id}/drain), or delete or relabel the pod",
            )
        try:
            state = await asyncio.shield(self.fleet.remove(instance_id, timeout_s=timeout, force=force))
        except FleetChangeError as exc:
            raise GatewayError(exc.status, exc.message, param=exc.param) from None
        responder.send_json(200, {"id": instance_id, "removed": True, "url": state.spec.url})

    def _timeout(self, query: dict[str, list[str]]) -> float:
        try:
            timeout = float(query.get("timeout_s", [self.config.admin.drain_wait_s])[-1])
        except (ValueError, RecursionError):  # (a body nested too deep is the client's fault too)
            raise GatewayError(400, "timeout_s must be a number", param="timeout_s") from None
        if not 0 <= timeout <= 3600:
            raise GatewayError(400, "timeout_s must be between 0 and 3600", param="timeout_s")
        return timeout

    async def _migrate(self, request_id: str, request: HttpRequest, responder: Responder) -> None:
        target: str | None = None
        if request.body.strip():
            try:
                data = json.loads(request.body)
            except (ValueError, RecursionError):
                raise GatewayError(400, "the body must be JSON") from None
            if not isinstance(data, dict) or not isinstance(data.get("target", ""), (str, type(None))):
                raise GatewayError(400, 'expected {"target": "<instance id>"}', param="target")
            target = data.get("target")
        local = self.migrations.find(request_id) is not None
        owner = self.peers.owner_of(request_id) if self.peers is not None and not local else None
        if owner is not None and self.peers is not None:
            if target is not None:
                self._instance(target)
            answer = await self.peers.ask_move(owner, request_id, target, "admin")
            if answer is None:
                raise GatewayError(503, f"replica {owner!r}, which serves {request_id!r}, did not answer")
            status, body = answer
            responder.send_json(status, body)
            return
        status, body = await self.migrate(request_id, target, "admin")
        responder.send_json(status, body)

    async def execute_move(self, request_id: str, target: str | None, reason: str) -> tuple[int, dict[str, Any]]:
        """A move another replica asked of this one: :meth:`migrate`, errors as their JSON answer."""
        try:
            return await self.migrate(request_id, target, reason)
        except GatewayError as err:
            return err.status, err.body()

    async def migrate(self, request_id: str, target: str | None, reason: str) -> tuple[int, dict[str, Any]]:
        """Move one of this replica's streams now (to ``target``, or where the policy says)."""
        live = self.migrations.find(request_id)
        if live is None:
            raise GatewayError(
                404,
                f"no running stream {request_id!r} (finished, not streamed, or not movable)",
                param="request_id",
                code="request_not_found",
            )
        if target is not None:
            self._instance(target)
            if target == live.instance_id:
                raise GatewayError(400, f"request {request_id!r} already runs on {target!r}", param="target")
        source = live.instance_id
        task = self.migrations.move(live, target, reason)
        if task is None:
            raise GatewayError(
                409,
                f"request {request_id!r} cannot move now (already moving, finishing, no target, "
                "or too many moves in flight)",
                headers={"Retry-After": "1"},
            )
        try:
            moved = await asyncio.shield(task)  # an admin client that hangs up does not cancel the move
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # this admin request itself was cancelled
            moved = False  # the stream ended meanwhile (its client left): the move was called off
        return 200, {
            "request_id": request_id,
            "migrated": moved,
            "from": source,
            "to": live.move_target if moved else None,
            "generated_tokens": live.generated,
            "replica": self.replica_id,
        }


def _forecast(demand: PoolDemand) -> dict[str, float]:
    return {
        "prefill_work_s_per_s": round(demand.prefill_work_s_per_s, 4),
        "decode_streams": round(demand.decode_streams, 2),
        "context_tokens_per_stream": round(demand.context_tokens_per_stream, 1),
    }
