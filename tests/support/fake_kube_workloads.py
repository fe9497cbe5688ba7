"""The fake API server's workloads (tests/support/fake_kube.py): ``apps/v1`` and their pods.

:class:`Workloads` serves ``GET|PATCH /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}``
and ``GET|PATCH|PUT .../{name}/scale`` (``autoscaling/v1`` Scale; a PUT whose
``metadata.resourceVersion`` is stale is a 409 Conflict, as on a real server), and is the
controller behind them.

When a workload's replicas change it makes pods (a Deployment's ``{name}-{hash}-{5 chars}``, a
StatefulSet's ``{name}-0``, ``{name}-1``...), which are Pending until the test's ``start_pod(pod)``
hook returns ``(ip, ready)`` (``ready()`` is read for the pod's Ready condition at every read; the
hook may add annotations to ``pod["metadata"]``). Scaling down marks pods deleted
(``metadata.deletionTimestamp``), calls ``stop_pod(pod)`` and then forgets them: a ReplicaSet takes
the pods that do not run or are not ready first, then the lowest
``controller.kubernetes.io/pod-deletion-cost``, then the newest; a StatefulSet its highest
ordinals (all at once, as ``podManagementPolicy: Parallel``). A deleted pod is replaced once it is
gone. Both hooks may be coroutines; every pod whose start hook returned is stopped at
:meth:`Workloads.close`.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import random
from collections.abc import Callable
from typing import Any

from aiohttp import web

from support.fake_kube_objects import KubeObjects, PodKey, running_status
from support.kube_api import ApiFailure, apply_patch, json_response, read_body

PLURALS = {"deployments": "Deployment", "statefulsets": "StatefulSet"}
KIND_PLURALS = {kind: plural for plural, kind in PLURALS.items()}
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes' generated names are made of
APPS_PATH = "/apis/apps/v1/namespaces/{ns}/{plural:deployments|statefulsets}/{name}"

StartPod = Callable[[dict[str, Any]], Any]  # -> (ip, ready) or an awaitable of it
StopPod = Callable[[dict[str, Any]], Any]


class Workloads:
    """Deployments and StatefulSets by ``(namespace, plural, name)``, their pods kept in ``objects``."""

    def __init__(self, objects: KubeObjects, start_pod: StartPod, stop_pod: StopPod) -> None:
        self.objects, self.start_pod, self.stop_pod = objects, start_pod, stop_pod
        self.workloads: dict[tuple[str, str, str], dict[str, Any]] = {}  # (namespace, plural, name) -> object
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started: set[PodKey] = set()  # pods whose start hook returned (stopped at close)
        self._owners: dict[PodKey, tuple[str, str, int]] = {}  # pod -> (workload kind, name, creation order)
        self._created = itertools.count()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("GET", APPS_PATH, self._get_workload)
        app.router.add_route("PATCH", APPS_PATH, self._patch_workload)
        app.router.add_route("GET", APPS_PATH + "/scale", self._get_scale)
        app.router.add_route("PATCH", APPS_PATH + "/scale", self._patch_scale)
        app.router.add_route("PUT", APPS_PATH + "/scale", self._put_scale)

    async def close(self) -> None:
        """Cancel the controller's work, then stop every pod still started."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._started):
            await _call(self.stop_pod, self.objects.pods[key])
        self._started.clear()

    # ---------------------------------------------------------------- objects
    def add(self, plural: str, name: str, replicas: int, labels: dict[str, str], namespace: str) -> None:
        """A Deployment or StatefulSet whose pods carry ``labels``; its pods are made at once."""
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
            "metadata": self.objects.meta(name, namespace, labels) | {"generation": 1},
            "spec": spec,
        }
        self._reconcile(namespace, plural, name)

    def replicas(self, plural: str, name: str, namespace: str) -> int:
        return int(self.workloads[(namespace, plural, name)]["spec"]["replicas"])

    def pods_of(self, name: str, namespace: str) -> list[dict[str, Any]]:
        """The pods a workload made (deleted ones included until they are gone)."""
        return [
            p
            for key, p in self.objects.pods.items()
            if key[0] == namespace and key in self._owners and self._owners[key][1] == name
        ]

    def owns(self, name: str, namespace: str) -> bool:
        """Whether a workload made the pod."""
        return (namespace, name) in self._owners

    def delete(self, pod: dict[str, Any]) -> None:
        """Begin a workload pod's deletion: its stop hook runs, it goes, its workload replaces it."""
        self.objects.begin_deletion(pod)
        self._spawn(self._stop_pod(pod))

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
                self.delete(pod)
            return
        template_hash = format(abs(hash(json.dumps(workload["spec"]["template"], sort_keys=True))) % 16**10, "010x")
        for _ in range(wanted - len(live)):
            suffix = "".join(random.choices(SUFFIX_CHARS, k=5))
            self._create(workload, f"{name}-{template_hash}-{suffix}", {"pod-template-hash": template_hash})
        for pod in sorted(live, key=self._deletion_rank)[: max(0, len(live) - wanted)]:
            self.delete(pod)

    def _deletion_rank(self, pod: dict[str, Any]) -> tuple[int, int, int, int]:
        """The ReplicaSet controller's order: not running, then not ready, then the lowest deletion cost, then the newest."""
        phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(pod["status"]["phase"], 0)
        try:
            cost = int((pod["metadata"].get("annotations") or {}).get(DELETION_COST, "0"))
        except ValueError:
            cost = 0
        return phase, int(self.objects.is_ready(pod)), cost, -self._owner(pod)[2]

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
        pod_meta = self.objects.meta(pod_name, namespace, all_labels)
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
        self.objects.pods[(namespace, pod_name)] = pod
        self._owners[(namespace, pod_name)] = (workload["kind"], meta["name"], next(self._created))
        self.objects.pod_changed(pod, "ADDED")
        self._spawn(self._run_pod(pod))

    async def _run_pod(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        try:
            ip, ready = await _call(self.start_pod, pod)
        except Exception as exc:
            pod["status"] |= {"phase": "Failed", "reason": "StartError", "message": str(exc)}
            self.objects.pod_changed(pod)
            return
        self._started.add(key)
        self.objects.ready[key] = ready
        pod["status"] = running_status(ip)
        self.objects.pod_changed(pod)

    async def _stop_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self._started:
            self._started.discard(key)
            await _call(self.stop_pod, pod)
        if self.objects.pods.get(key) is pod:
            self.objects.gone(pod)
        owned = self._owners.pop(key, None)
        if owned is None:
            return
        owner_kind, owner, _ = owned
        plural = KIND_PLURALS[owner_kind]
        if (meta["namespace"], plural, owner) in self.workloads:
            self._reconcile(meta["namespace"], plural, owner)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _live(self, workload: dict[str, Any]) -> list[dict[str, Any]]:
        meta = workload["metadata"]
        return [
            p
            for p in self.pods_of(meta["name"], meta["namespace"])
            if "deletionTimestamp" not in p["metadata"] and self._owner(p)[0] == workload["kind"]
        ]

    def _owner(self, pod: dict[str, Any]) -> tuple[str, str, int]:
        return self._owners[(pod["metadata"]["namespace"], pod["metadata"]["name"])]

    # ------------------------------------------------------------------ views
    def _with_status(self, workload: dict[str, Any]) -> dict[str, Any]:
        live = self._live(workload)
        ready = sum(1 for p in live if self.objects.is_ready(p))
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

    # ---------------------------------------------------------------- handlers
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

    async def _get_workload(self, request: web.Request) -> web.Response:
        return json_response(self._with_status(self._find(request)))

    async def _patch_workload(self, request: web.Request) -> web.Response:
        workload = self._find(request)
        patched = await apply_patch(request, self._with_status(workload))
        self._set_replicas(workload, patched["spec"].get("replicas"))
        return json_response(self._with_status(workload))

    async def _get_scale(self, request: web.Request) -> web.Response:
        return json_response(self._scale(self._find(request)))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        workload = self._find(request)
        patched = await apply_patch(request, self._scale(workload))
        self._set_replicas(workload, (patched.get("spec") or {}).get("replicas"))
        return json_response(self._scale(workload))

    async def _put_scale(self, request: web.Request) -> web.Response:
        workload = self._find(request)
        body = await read_body(request)
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
        return json_response(self._scale(workload))

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
            self.objects.touch(workload)
            meta = workload["metadata"]
            self._reconcile(meta["namespace"], KIND_PLURALS[workload["kind"]], meta["name"])


async def _call(hook: Callable[..., Any], *args: Any) -> Any:
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
