"""A fake Kubernetes API server: real HTTP on loopback, the real REST protocol, a tiny controller.

It serves what a client that scales workloads, lists and watches their pods and EndpointSlices
uses, in the shapes of the Kubernetes API (``apps/v1`` Deployment and StatefulSet,
``autoscaling/v1`` Scale, ``v1`` Pod and PodList, ``discovery.k8s.io/v1`` EndpointSlice, ``v1``
Status for every error), behind a bearer token (anything else: 401):

* the workloads and their scale subresource, and the controller that makes and deletes their
  pods (deletion cost and all): ``tests/support/fake_kube_workloads.py``;
* ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...`` (``=``, ``==``, ``!=``, ``in``, ``notin``,
  ``key``, ``!key``), ``GET|PATCH /api/v1/namespaces/{ns}/pods/{name}`` (metadata: labels and
  annotations; the rest of a pod is not changed by a patch);
* ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices``, listed and watched as pods are;
* patches as ``application/merge-patch+json`` (RFC 7386), ``application/strategic-merge-patch+json``
  (the same merge: these objects' patched fields hold no lists that merge by key),
  ``application/json-patch+json`` (RFC 6902: add, replace, remove, test) and
  ``application/apply-patch+yaml`` (server-side apply approximated as a merge; ``fieldManager``
  required, as the real server does); others 415 (``tests/support/kube_api.py``).

Lists and watches (``tests/support/fake_kube_watch.py``): every change to a pod or an EndpointSlice
takes the next ``resourceVersion`` of one global counter, as etcd's, and is recorded
(``tests/support/fake_kube_objects.py``); a list carries the current one in
``metadata.resourceVersion``; ``?watch=true`` streams the changes after a ``resourceVersion``
through the label selector.

:class:`FakeKube` is the server and every test control: workloads (:meth:`~FakeKube.deployment`,
:meth:`~FakeKube.statefulset`, :meth:`~FakeKube.replicas`, :meth:`~FakeKube.pods_of`,
:meth:`~FakeKube.delete_pod`), bare pods that no workload owns (:meth:`~FakeKube.add_pod`,
:meth:`~FakeKube.set_ready`, :meth:`~FakeKube.terminate_pod`, :meth:`~FakeKube.remove_pod`),
EndpointSlices (:meth:`~FakeKube.add_endpointslice`, :meth:`~FakeKube.set_endpoints`,
:meth:`~FakeKube.remove_endpointslice`), the watch itself (:meth:`~FakeKube.compact`,
:meth:`~FakeKube.bookmark`, :meth:`~FakeKube.end_watches`), an outage (:attr:`~FakeKube.outage`:
every request answered with that status), RBAC refusals (:attr:`~FakeKube.forbidden`: 403 for
those resources) and counters of list and watch requests by resource (:attr:`~FakeKube.lists`,
:attr:`~FakeKube.watches`). :attr:`FakeKube.deleted` lists pods in the order their deletion
began; :attr:`FakeKube.requests` every request seen. A workload pod's readiness read through its
``ready()`` hook is not a recorded change; :meth:`~FakeKube.set_ready` is.
"""

from __future__ import annotations

import functools
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from support.fake_kube_objects import KubeObjects
from support.fake_kube_workloads import DELETION_COST, StartPod, StopPod, Workloads
from support.kube_api import ApiFailure, apply_patch, json_response, matches, parse_selector, status_response

__all__ = ["DELETION_COST", "FakeKube", "SeenRequest", "endpoint"]

OUTAGE_REASONS = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "Timeout"}
LISTED = {  # plural -> (the list path, the object's kind, its apiVersion)
    "pods": ("/api/v1/namespaces/{ns}/pods", "Pod", "v1"),
    "endpointslices": (
        "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
}


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    content_type: str
    authorization: str


class FakeKube(KubeObjects):
    """The server (:meth:`start` / :meth:`close`), its objects and the controller; one namespace or more."""

    def __init__(self, start_pod: StartPod, stop_pod: StopPod, *, token: str = "fake-token") -> None:
        super().__init__()
        self.token = token
        self.requests: list[SeenRequest] = []
        self.lists: Counter[str] = Counter()  # list requests by plural ("pods", "endpointslices"), refused ones too
        self.watches: Counter[str] = Counter()  # watch requests by plural (none while in an outage)
        self.outage: int | None = None  # a status code (500, 503...): every request is answered with it
        self.forbidden: set[str] = set()  # plurals the token may not list or watch (403, as RBAC answers)
        self._controller = Workloads(self, start_pod, stop_pod)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -------------------------------------------------------------- lifecycle
    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on a free loopback port (HTTPS with ``ssl_context``, as an API server in a cluster does)."""
        app = web.Application(middlewares=[self._middleware])
        self._controller.add_routes(app)
        for plural, (path, _, _) in LISTED.items():
            app.router.add_route("GET", path, functools.partial(self._list, plural=plural))
        app.router.add_route("GET", "/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        app.router.add_route("PATCH", "/api/v1/namespaces/{ns}/pods/{name}", self._patch_pod)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        """Stop the server (its watch streams end) and the controller's work, then every pod still started."""
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._controller.close()

    def kubeconfig(self, path: Path, *, token: str | None = None, namespace: str = "default") -> Path:
        """A kubeconfig file for this server (``token``: another one, to be refused)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token if token is not None else self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -------------------------------------------------------------- workloads
    @property
    def workloads(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """(namespace, plural, name) -> the Deployment or StatefulSet."""
        return self._controller.workloads

    def deployment(self, name: str, replicas: int, labels: dict[str, str], namespace: str = "default") -> None:
        self._controller.add("deployments", name, replicas, labels, namespace)

    def statefulset(self, name: str, replicas: int, labels: dict[str, str], namespace: str = "default") -> None:
        self._controller.add("statefulsets", name, replicas, labels, namespace)

    def replicas(self, plural: str, name: str, namespace: str = "default") -> int:
        return self._controller.replicas(plural, name, namespace)

    def pods_of(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        """The pods a workload made (deleted ones included until they are gone)."""
        return self._controller.pods_of(name, namespace)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        """Delete a pod as ``kubectl delete pod`` does (its controller makes a replacement once it is gone)."""
        self._controller.delete(self.pods[(namespace, name)])

    # -------------------------------------------------------------- any pod
    def terminate_pod(self, name: str, namespace: str = "default") -> None:
        """Begin the pod's deletion (``metadata.deletionTimestamp``: MODIFIED). A bare pod stays until
        :meth:`remove_pod`; a workload's pod goes as with :meth:`delete_pod`."""
        pod = self.named_pod(name, namespace)
        if self._controller.owns(name, namespace):
            self._controller.delete(pod)
        else:
            self.begin_deletion(pod)

    def remove_pod(self, name: str, namespace: str = "default") -> None:
        """A bare pod is gone (DELETED)."""
        pod = self.named_pod(name, namespace)
        if self._controller.owns(name, namespace):
            raise ValueError(f"pod {namespace}/{name} belongs to a workload: delete_pod() it")
        self.gone(pod)

    # ---------------------------------------------------------------- handlers
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        self.requests.append(
            SeenRequest(request.method, request.path, request.query_string, request.content_type, auth)
        )
        if self.outage is not None:
            reason = OUTAGE_REASONS.get(self.outage, "InternalError")
            return status_response(self.outage, reason, "the server is currently unable to handle the request")
        if auth != f"Bearer {self.token}":
            return status_response(401, "Unauthorized", "Unauthorized")
        try:
            return await handler(request)
        except ApiFailure as exc:
            return status_response(exc.code, exc.reason, exc.message, exc.details)
        except web.HTTPNotFound:
            return status_response(404, "NotFound", "the server could not find the requested resource")
        except web.HTTPMethodNotAllowed:
            return status_response(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )

    async def _list(self, request: web.Request, plural: str) -> web.StreamResponse:
        """A list (``metadata.resourceVersion``: the current one) or, with ``watch=true``, a watch."""
        ns = request.match_info["ns"]
        _, kind, api_version = LISTED[plural]
        watch = request.query.get("watch", "") in ("true", "1")
        (self.watches if watch else self.lists)[plural] += 1
        if plural in self.forbidden:
            group = api_version.rpartition("/")[0]
            raise ApiFailure(
                403,
                "Forbidden",
                f'{plural}{"." + group if group else ""} is forbidden: User "system:serviceaccount:{ns}:pdgate" '
                f'cannot {"watch" if watch else "list"} resource "{plural}" in API group "{group}" in the namespace "{ns}"',
                {"group": group, "kind": plural},
            )
        selector = parse_selector(request.query.get("labelSelector", ""))  # after authorization, as on a real server
        if watch:
            return await self.hub.serve(
                request,
                plural=plural,
                kind=kind,
                api_version=api_version,
                selector=selector,
                current=lambda: self.current(plural, ns),
            )
        items = [item for item in self.current(plural, ns) if matches(selector, item)]
        for item in items:  # a list's items carry no kind and apiVersion
            item.pop("kind"), item.pop("apiVersion")
        meta = {"resourceVersion": self.resource_version}
        return json_response({"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": items})

    def _pod(self, request: web.Request) -> dict[str, Any]:
        ns, name = request.match_info["ns"], request.match_info["name"]
        pod = self.pods.get((ns, name))
        if pod is None:
            raise ApiFailure(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        return pod

    async def _get_pod(self, request: web.Request) -> web.Response:
        return json_response(self.pod_view(self._pod(request)))

    async def _patch_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        patched = await apply_patch(request, self.pod_view(pod))
        meta = patched.get("metadata") or {}
        for field in ("labels", "annotations"):  # the metadata a patch may change; the rest stays
            value = meta.get(field) or {}
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise ApiFailure(422, "Invalid", f"metadata.{field}: values must be strings")
            pod["metadata"][field] = value
        self.pod_changed(pod)
        return json_response(self.pod_view(pod))


def endpoint(
    ip: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    pod: str | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """One endpoint of an EndpointSlice (``serving`` defaults to ``ready``; ``pod``: its targetRef)."""
    out: dict[str, Any] = {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready if serving is None else serving, "terminating": terminating},
    }
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": namespace}
    return out
