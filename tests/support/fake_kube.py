"""A fake Kubernetes API server: real HTTP on loopback, the real REST protocol, a tiny controller.

It serves what a client that scales workloads and lists their pods uses, in the shapes of the
Kubernetes API (``apps/v1`` Deployment and StatefulSet, ``autoscaling/v1`` Scale, ``v1`` Pod and
PodList, ``v1`` Status for every error), behind a bearer token (anything else: 401):

* ``GET|PATCH /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}``, and
  ``GET|PATCH|PUT .../{name}/scale``; a PUT whose ``metadata.resourceVersion`` is stale is a 409
  Conflict, as on a real server;
* ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...`` (``=``, ``==``, ``!=``, ``in``, ``notin``,
  ``key``, ``!key``), ``GET|PATCH /api/v1/namespaces/{ns}/pods/{name}`` (metadata: labels and
  annotations; the rest of a pod is not changed by a patch);
* patches as ``application/merge-patch+json`` (RFC 7386), ``application/strategic-merge-patch+json``
  (the same merge: these objects' patched fields hold no lists that merge by key),
  ``application/json-patch+json`` (RFC 6902: add, replace, remove, test) and
  ``application/apply-patch+yaml`` (server-side apply approximated as a merge; ``fieldManager``
  required, as the real server does); others 415.

The controller: when a workload's replicas change it makes pods (a Deployment's
``{name}-{hash}-{5 chars}``, a StatefulSet's ``{name}-0``, ``{name}-1``...), which are Pending until
the test's ``start_pod(pod)`` hook returns ``(ip, ready)`` (``ready()`` is read for the pod's Ready
condition at every read; the hook may add annotations to ``pod["metadata"]``). Scaling down marks
pods deleted (``metadata.deletionTimestamp``), calls ``stop_pod(pod)`` and then forgets them: a
ReplicaSet takes the pods that do not run or are not ready first, then the lowest
``controller.kubernetes.io/pod-deletion-cost``, then the newest; a StatefulSet its highest
ordinals (all at once, as ``podManagementPolicy: Parallel``). Both hooks may be coroutines.
:attr:`FakeKube.deleted` lists pods in the order their deletion began; :attr:`FakeKube.requests`
every request seen.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

PLURALS = {"deployments": "Deployment", "statefulsets": "StatefulSet"}
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes' generated names are made of
PATCH_TYPES = (
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
)

StartPod = Callable[[dict[str, Any]], Any]  # -> (ip, ready) or an awaitable of it
StopPod = Callable[[dict[str, Any]], Any]


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    content_type: str
    authorization: str


class ApiFailure(Exception):
    """Answered as a v1 Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return _json(body, code)


def _json(obj: Any, status: int = 200) -> web.Response:
    # exactly application/json, as the API server answers (clients compare the header)
    return web.Response(body=json.dumps(obj).encode(), status=status, headers={"Content-Type": "application/json"})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, replace, remove, test)."""
    doc = copy.deepcopy(target)
    if not isinstance(ops, list):
        raise ApiFailure(400, "BadRequest", "a JSON patch is a list of operations")
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op.get("path", "")).split("/")[1:]]
        if not parts:
            raise ApiFailure(422, "Invalid", "a JSON patch path names a field")
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last, kind = parts[-1], op.get("op")
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, op["value"]) if kind == "add" else parent.__setitem__(index, op["value"])
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            parent.pop(int(last) if isinstance(parent, list) else last)
        elif kind == "test":
            value = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if value != op.get("value"):
                raise ApiFailure(422, "Invalid", f"the test of {op['path']} failed")
        else:
            raise ApiFailure(422, "Invalid", f"unknown JSON patch operation {kind!r}")
    return doc


def parse_selector(text: str) -> list[Callable[[dict[str, str]], bool]]:
    """A label selector in the query-parameter syntax, as predicates over a pod's labels."""
    terms = [t.strip() for t in re.split(r",(?![^(]*\))", text) if t.strip()]
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in terms:
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if op == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*([^=!\s]*)", term):
            key, op, value = match.groups()
            if op == "!=":
                tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := re.fullmatch(r"!\s*([^=!\s]+)", term):
            tests.append(lambda labels, k=match.group(1): k not in labels)
        elif re.fullmatch(r"[^=!\s()]+", term):
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise ApiFailure(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return tests


class FakeKube:
    """The server (:meth:`start` / :meth:`close`), its objects and the controller; one namespace or more."""

    def __init__(self, start_pod: StartPod, stop_pod: StopPod, *, token: str = "fake-token") -> None:
        self.start_pod, self.stop_pod, self.token = start_pod, stop_pod, token
        self.workloads: dict[tuple[str, str, str], dict[str, Any]] = {}  # (namespace, plural, name) -> object
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> pod
        self.ready: dict[tuple[str, str], Callable[[], bool]] = {}
        self.deleted: list[str] = []
        self.requests: list[SeenRequest] = []
        self._versions = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started: set[tuple[str, str]] = set()  # pods whose start hook returned (stopped at close)
        self._owners: dict[tuple[str, str], tuple[str, str, int]] = {}  # pod -> (workload kind, name, creation order)
        self._created = itertools.count()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        apps = "/apis/apps/v1/namespaces/{ns}/{plural:deployments|statefulsets}/{name}"
        app.router.add_route("GET", apps, self._get_workload)
        app.router.add_route("PATCH", apps, self._patch_workload)
        app.router.add_route("GET", apps + "/scale", self._get_scale)
        app.router.add_route("PATCH", apps + "/scale", self._patch_scale)
        app.router.add_route("PUT", apps + "/scale", self._put_scale)
        app.router.add_route("GET", "/api/v1/namespaces/{ns}/pods", self._list_pods)
        app.router.add_route("GET", "/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        app.router.add_route("PATCH", "/api/v1/namespaces/{ns}/pods/{name}", self._patch_pod)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        """Stop the server and the controller's work, then every pod still started."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._started):
            await _call(self.stop_pod, self.pods[key])
        self._started.clear()

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

    # ---------------------------------------------------------------- objects
    def deployment(self, name: str, replicas: int, labels: dict[str, str], namespace: str = "default") -> None:
        self._workload("deployments", name, replicas, labels, namespace)

    def statefulset(self, name: str, replicas: int, labels: dict[str, str], namespace: str = "default") -> None:
        self._workload("statefulsets", name, replicas, labels, namespace)

    def replicas(self, plural: str, name: str, namespace: str = "default") -> int:
        return int(self.workloads[(namespace, plural, name)]["spec"]["replicas"])

    def pods_of(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        """The pods a workload made (deleted ones included until they are gone)."""
        return [p for key, p in self.pods.items() if key[0] == namespace and self._owners[key][1] == name]

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        """Delete a pod as ``kubectl delete pod`` does (its controller makes a replacement once it is gone)."""
        self._delete(self.pods[(namespace, name)])

    def _workload(self, plural: str, name: str, replicas: int, labels: dict[str, str], namespace: str) -> None:
        kind = PLURALS[plural]
        spec: dict[str, Any] = {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"containers": [{"name": "engine", "image": "pdgate:sim"}]},
            },
        }
        if kind == "StatefulSet":
            spec |= {"serviceName": name, "podManagementPolicy": "Parallel"}
        else:
            spec["strategy"] = {"type": "RollingUpdate"}
        self.workloads[(namespace, plural, name)] = {
            "kind": kind,
            "apiVersion": "apps/v1",
            "metadata": self._meta(name, namespace, labels) | {"generation": 1},
            "spec": spec,
        }
        self._reconcile(namespace, plural, name)

    def _meta(self, name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": str(next(self._versions)),
            "creationTimestamp": _now(),
            "labels": dict(labels),
        }

    def _touch(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def _find(self, request: web.Request) -> dict[str, Any]:
        ns, plural, name = request.match_info["ns"], request.match_info["plural"], request.match_info["name"]
        workload = self.workloads.get((ns, plural, name))
        if workload is None:
            raise ApiFailure(
                404,
                "NotFound",
                f'{plural}.apps "{name}" not found',
                {"name": name, "group": "apps", "kind": plural},
            )
        return workload

    def _live(self, workload: dict[str, Any]) -> list[dict[str, Any]]:
        meta = workload["metadata"]
        return [
            p
            for p in self.pods_of(meta["name"], meta["namespace"])
            if "deletionTimestamp" not in p["metadata"] and self._owner(p)[0] == workload["kind"]
        ]

    def _owner(self, pod: dict[str, Any]) -> tuple[str, str, int]:
        return self._owners[(pod["metadata"]["namespace"], pod["metadata"]["name"])]

    def _ready(self, pod: dict[str, Any]) -> bool:
        ready = self.ready.get((pod["metadata"]["namespace"], pod["metadata"]["name"]))
        return pod["status"]["phase"] == "Running" and ready is not None and bool(ready())

    def _with_status(self, workload: dict[str, Any]) -> dict[str, Any]:
        live = self._live(workload)
        ready = sum(1 for p in live if self._ready(p))
        out = copy.deepcopy(workload)
        out["status"] = {
            "observedGeneration": workload["metadata"]["generation"],
            "replicas": len(live),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": len(live),
        }
        if workload["kind"] == "StatefulSet":
            out["status"]["currentReplicas"] = len(live)
        return out

    def _scale(self, workload: dict[str, Any]) -> dict[str, Any]:
        meta = workload["metadata"]
        labels = workload["spec"]["selector"]["matchLabels"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
            "spec": {"replicas": workload["spec"]["replicas"]},
            "status": {
                "replicas": len(self._live(workload)),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
            },
        }

    def _pod_view(self, pod: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(pod)
        meta = out["metadata"]
        if out["status"]["phase"] == "Running":
            ready = "True" if self._ready(pod) else "False"
            out["status"]["conditions"] = [
                {"type": "Initialized", "status": "True", "lastTransitionTime": meta["creationTimestamp"]},
                {"type": "Ready", "status": ready, "lastTransitionTime": out["status"]["startTime"]},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": out["status"]["startTime"]},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": meta["creationTimestamp"]},
            ]
        return out

    # ------------------------------------------------------------- controller
    def _reconcile(self, namespace: str, plural: str, name: str) -> None:
        workload = self.workloads[(namespace, plural, name)]
        wanted = int(workload["spec"]["replicas"])
        live = self._live(workload)
        if workload["kind"] == "StatefulSet":
            taken = {p["metadata"]["name"] for p in self.pods_of(name, namespace)}
            for n in range(wanted):
                if f"{name}-{n}" not in taken:  # a pod still terminating is recreated once gone
                    self._create(workload, f"{name}-{n}", {"apps.kubernetes.io/pod-index": str(n)})
            extra = [p for p in live if int(p["metadata"]["name"].rsplit("-", 1)[1]) >= wanted]
            for pod in sorted(extra, key=lambda p: int(p["metadata"]["name"].rsplit("-", 1)[1]), reverse=True):
                self._delete(pod)
            return
        template_hash = format(abs(hash(json.dumps(workload["spec"]["template"], sort_keys=True))) % 16**10, "010x")
        for _ in range(wanted - len(live)):
            suffix = "".join(random.choices(SUFFIX_CHARS, k=5))
            self._create(workload, f"{name}-{template_hash}-{suffix}", {"pod-template-hash": template_hash})
        for pod in sorted(live, key=self._deletion_rank)[: max(0, len(live) - wanted)]:
            self._delete(pod)

    def _deletion_rank(self, pod: dict[str, Any]) -> tuple[int, int, int, int]:
        """The ReplicaSet controller's order: not running, then not ready, then the lowest deletion cost, then the newest."""
        phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(pod["status"]["phase"], 0)
        try:
            cost = int((pod["metadata"].get("annotations") or {}).get(DELETION_COST, "0"))
        except ValueError:
            cost = 0
        return phase, int(self._ready(pod)), cost, -self._owner(pod)[2]

    def _create(self, workload: dict[str, Any], pod_name: str, labels: dict[str, str]) -> None:
        meta = workload["metadata"]
        namespace = meta["namespace"]
        template = workload["spec"]["template"]
        all_labels = {**template["metadata"]["labels"], **labels}
        if workload["kind"] == "StatefulSet":
            all_labels["statefulset.kubernetes.io/pod-name"] = pod_name
            owner = {"kind": "StatefulSet", "name": meta["name"]}
        else:
            owner = {"kind": "ReplicaSet", "name": pod_name.rsplit("-", 1)[0]}
        pod_meta = self._meta(pod_name, namespace, all_labels)
        pod_meta |= {
            "annotations": {},
            "ownerReferences": [
                {"apiVersion": "apps/v1", **owner, "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
            ],
        }
        if workload["kind"] == "Deployment":
            pod_meta["generateName"] = pod_name[: -len(pod_name.rsplit("-", 1)[1])]
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": pod_meta,
            "spec": copy.deepcopy(template["spec"]) | {"nodeName": "fake-node"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]},
        }
        self.pods[(namespace, pod_name)] = pod
        self._owners[(namespace, pod_name)] = (workload["kind"], meta["name"], next(self._created))
        self._spawn(self._run_pod(pod))

    async def _run_pod(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        try:
            ip, ready = await _call(self.start_pod, pod)
        except Exception as exc:
            pod["status"] |= {"phase": "Failed", "reason": "StartError", "message": str(exc)}
            self._touch(pod)
            return
        self._started.add(key)
        self.ready[key] = ready
        pod["status"] = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": _now(),
            "qosClass": "BestEffort",
        }
        self._touch(pod)

    def _delete(self, pod: dict[str, Any]) -> None:
        pod["metadata"] |= {"deletionTimestamp": _now(), "deletionGracePeriodSeconds": 30}
        self._touch(pod)
        self.deleted.append(pod["metadata"]["name"])
        self._spawn(self._stop_pod(pod))

    async def _stop_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self._started:
            self._started.discard(key)
            await _call(self.stop_pod, pod)
        owner_kind, owner, _ = self._owners.pop(key)
        self.pods.pop(key, None)
        self.ready.pop(key, None)
        plural = {"Deployment": "deployments", "StatefulSet": "statefulsets"}[owner_kind]
        if (meta["namespace"], plural, owner) in self.workloads:
            self._reconcile(meta["namespace"], plural, owner)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- handlers
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        self.requests.append(
            SeenRequest(request.method, request.path, request.query_string, request.content_type, auth)
        )
        if auth != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        try:
            return await handler(request)
        except ApiFailure as exc:
            return _status(exc.code, exc.reason, exc.message, exc.details)
        except web.HTTPNotFound:
            return _status(404, "NotFound", "the server could not find the requested resource")
        except web.HTTPMethodNotAllowed:
            return _status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def _get_workload(self, request: web.Request) -> web.Response:
        return _json(self._with_status(self._find(request)))

    async def _patch_workload(self, request: web.Request) -> web.Response:
        workload = self._find(request)
        patched = await _patched(request, self._with_status(workload))
        self._set_replicas(workload, patched["spec"].get("replicas"))
        return _json(self._with_status(workload))

    async def _get_scale(self, request: web.Request) -> web.Response:
        return _json(self._scale(self._find(request)))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        workload = self._find(request)
        patched = await _patched(request, self._scale(workload))
        self._set_replicas(workload, (patched.get("spec") or {}).get("replicas"))
        return _json(self._scale(workload))

    async def _put_scale(self, request: web.Request) -> web.Response:
        workload = self._find(request)
        body = await _body(request)
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != workload["metadata"]["resourceVersion"]:
            plural, name = request.match_info["plural"], request.match_info["name"]
            raise ApiFailure(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {plural}.apps "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": name, "group": "apps", "kind": plural},
            )
        self._set_replicas(workload, (body.get("spec") or {}).get("replicas"))
        return _json(self._scale(workload))

    def _set_replicas(self, workload: dict[str, Any], replicas: Any) -> None:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiFailure(
                422,
                "Invalid",
                f'{workload["kind"]}.apps "{workload["metadata"]["name"]}" is invalid: spec.replicas: Invalid value: '
                f"{json.dumps(replicas)}: must be greater than or equal to 0",
            )
        if replicas != workload["spec"]["replicas"]:
            workload["spec"]["replicas"] = replicas
            workload["metadata"]["generation"] += 1
            self._touch(workload)
            meta = workload["metadata"]
            plural = {"Deployment": "deployments", "StatefulSet": "statefulsets"}[workload["kind"]]
            self._reconcile(meta["namespace"], plural, meta["name"])

    async def _list_pods(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        tests = parse_selector(request.query.get("labelSelector", ""))
        items = [
            self._pod_view(p)
            for (pod_ns, _), p in sorted(self.pods.items())
            if pod_ns == ns and all(test(p["metadata"]["labels"]) for test in tests)
        ]
        for item in items:  # a list's items carry no kind and apiVersion
            item.pop("kind"), item.pop("apiVersion")
        version = str(next(self._versions))
        return _json({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": version}, "items": items})

    def _pod(self, request: web.Request) -> dict[str, Any]:
        ns, name = request.match_info["ns"], request.match_info["name"]
        pod = self.pods.get((ns, name))
        if pod is None:
            raise ApiFailure(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        return pod

    async def _get_pod(self, request: web.Request) -> web.Response:
        return _json(self._pod_view(self._pod(request)))

    async def _patch_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        patched = await _patched(request, self._pod_view(pod))
        meta = patched.get("metadata") or {}
        for field in ("labels", "annotations"):  # the metadata a patch may change; the rest stays
            value = meta.get(field) or {}
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise ApiFailure(422, "Invalid", f"metadata.{field}: values must be strings")
            pod["metadata"][field] = value
        self._touch(pod)
        return _json(self._pod_view(pod))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise ApiFailure(400, "BadRequest", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiFailure(400, "BadRequest", "the body is not an object")
    return body


async def _patched(request: web.Request, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` with the request's patch applied, by its content type."""
    kind = request.content_type
    raw = await request.read()
    if kind not in PATCH_TYPES:
        raise ApiFailure(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {kind}")
    if kind == "application/apply-patch+yaml":
        if not request.query.get("fieldManager"):
            raise ApiFailure(400, "BadRequest", "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value")
        try:
            patch = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ApiFailure(400, "BadRequest", "the body is not YAML") from None
    else:
        try:
            patch = json.loads(raw)
        except ValueError:
            raise ApiFailure(400, "BadRequest", "the body is not JSON") from None
    if kind == "application/json-patch+json":
        result = json_patch(current, patch)
    elif isinstance(patch, dict):
        result = merge_patch(current, patch)
    else:
        raise ApiFailure(400, "BadRequest", "a merge patch is an object")
    if not isinstance(result, dict):
        raise ApiFailure(422, "Invalid", "the patched object is not an object")
    return result


async def _call(hook: Callable[..., Any], *args: Any) -> Any:
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
