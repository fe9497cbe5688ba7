"""The fake API server's objects (tests/support/fake_kube.py): pods, EndpointSlices, their versions.

:class:`KubeObjects` holds the pods and EndpointSlices by ``(namespace, name)`` and the one global
``resourceVersion`` counter, as etcd's: every change to a pod or an EndpointSlice (created,
patched, started, readiness set, deletion begun, gone) takes the next one and is recorded in the
watch history (:class:`~support.fake_kube_watch.WatchHub`). A pod as a read returns it
(:meth:`~KubeObjects.pod_view`) carries the conditions of its phase and its current readiness.

The test controls here need no workload: bare pods (:meth:`~KubeObjects.add_pod`,
:meth:`~KubeObjects.set_ready`), EndpointSlices (:meth:`~KubeObjects.add_endpointslice`,
:meth:`~KubeObjects.set_endpoints`, :meth:`~KubeObjects.remove_endpointslice`) and the watch
itself (:meth:`~KubeObjects.compact`, :meth:`~KubeObjects.bookmark`,
:meth:`~KubeObjects.end_watches`).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any

from support.fake_kube_watch import WatchHub
from support.kube_api import now

PodKey = tuple[str, str]  # (namespace, name)


class KubeObjects:
    """Pods and EndpointSlices by ``(namespace, name)``, each change at the next ``resourceVersion``."""

    def __init__(self) -> None:
        self.pods: dict[PodKey, dict[str, Any]] = {}
        self.ready: dict[PodKey, Callable[[], bool]] = {}  # read for the pod's Ready condition at every read
        self.slices: dict[PodKey, dict[str, Any]] = {}  # (namespace, name) -> EndpointSlice
        self.deleted: list[str] = []  # pod names, in the order their deletion began
        self.hub = WatchHub()
        self._rv = 1  # the last resourceVersion given (etcd starts at revision 1)

    # ------------------------------------------------------------ bare pods
    def add_pod(
        self,
        name: str,
        labels: dict[str, str],
        *,
        annotations: dict[str, str] | None = None,
        ready: bool = True,
        ip: str = "127.0.0.1",
        namespace: str = "default",
    ) -> dict[str, Any]:
        """A running pod with an IP and a Ready condition that no workload owns (ADDED); as a read returns it."""
        if (namespace, name) in self.pods:
            raise ValueError(f"pod {namespace}/{name} already exists")
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": self.meta(name, namespace, labels) | {"annotations": dict(annotations or {})},
            "spec": {"nodeName": "fake-node", "containers": [{"name": "engine", "image": "pdgate:sim"}]},
            "status": running_status(ip),
        }
        self.pods[(namespace, name)] = pod
        self.ready[(namespace, name)] = lambda: ready
        self.pod_changed(pod, "ADDED")
        return self.pod_view(pod)

    def set_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        """The pod's Ready condition from now on (MODIFIED when that changes it)."""
        pod = self.named_pod(name, namespace)
        was = self.is_ready(pod)
        self.ready[(namespace, name)] = lambda: ready
        if self.is_ready(pod) != was:
            self.pod_changed(pod)

    # ------------------------------------------------------- EndpointSlices
    def add_endpointslice(
        self,
        name: str,
        labels: dict[str, str],
        endpoints: list[dict[str, Any]],
        *,
        ports: list[dict[str, Any]] | None = None,
        namespace: str = "default",
    ) -> dict[str, Any]:
        """An IPv4 EndpointSlice (ADDED); ``endpoints`` as ``fake_kube.endpoint`` makes them; ports: http 8000."""
        if (namespace, name) in self.slices:
            raise ValueError(f"endpointslice {namespace}/{name} already exists")
        eps = {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": self.meta(name, namespace, labels),
            "addressType": "IPv4",
            "endpoints": copy.deepcopy(endpoints),
            "ports": copy.deepcopy(ports) if ports is not None else [{"name": "http", "port": 8000, "protocol": "TCP"}],
        }
        self.slices[(namespace, name)] = eps
        self.hub.record("endpointslices", "ADDED", eps)
        return copy.deepcopy(eps)

    def set_endpoints(
        self,
        name: str,
        endpoints: list[dict[str, Any]],
        *,
        labels: dict[str, str] | None = None,
        namespace: str = "default",
    ) -> None:
        """Replace an EndpointSlice's endpoints (and labels, if given): MODIFIED."""
        eps = self._slice(name, namespace)
        eps["endpoints"] = copy.deepcopy(endpoints)
        if labels is not None:
            eps["metadata"]["labels"] = dict(labels)
        self.touch(eps)
        self.hub.record("endpointslices", "MODIFIED", eps)

    def remove_endpointslice(self, name: str, namespace: str = "default") -> None:
        """The EndpointSlice is gone (DELETED)."""
        eps = self._slice(name, namespace)
        self.touch(eps)
        self.hub.record("endpointslices", "DELETED", eps)
        del self.slices[(namespace, name)]

    # ---------------------------------------------------------------- watches
    def compact(self) -> None:
        """Drop the history: a watch from any resourceVersion before now gets 410 Expired."""
        self.hub.compact(self._rv)

    def bookmark(self) -> int:
        """A BOOKMARK at the current resourceVersion to every watch that asked for them; how many."""
        return self.hub.bookmark(self._rv)

    def end_watches(self) -> int:
        """Close every open watch stream, as an API server's restart would; how many there were."""
        return self.hub.end_all()

    @property
    def open_watches(self) -> int:
        return self.hub.open_streams

    @property
    def resource_version(self) -> str:
        """The current resourceVersion (the last change's)."""
        return str(self._rv)

    # ------------------------------------------- for the server and the controller
    def meta(self, name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
        """A new object's metadata, at the next resourceVersion."""
        return {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": self._next_rv(),
            "creationTimestamp": now(),
            "labels": dict(labels),
        }

    def touch(self, obj: dict[str, Any]) -> None:
        """The object changed: the next resourceVersion."""
        obj["metadata"]["resourceVersion"] = self._next_rv()

    def pod_changed(self, pod: dict[str, Any], type_: str = "MODIFIED") -> None:
        """A new resourceVersion for the pod (ADDED: it has one) and the change recorded for watches."""
        if type_ != "ADDED":
            self.touch(pod)
        self.hub.record("pods", type_, self.pod_view(pod))

    def begin_deletion(self, pod: dict[str, Any]) -> None:
        """``metadata.deletionTimestamp`` set (MODIFIED), the pod listed in :attr:`deleted`."""
        pod["metadata"] |= {"deletionTimestamp": now(), "deletionGracePeriodSeconds": 30}
        self.pod_changed(pod)
        self.deleted.append(pod["metadata"]["name"])

    def gone(self, pod: dict[str, Any]) -> None:
        """The pod is gone (DELETED)."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        self.touch(pod)
        self.hub.record("pods", "DELETED", self.pod_view(pod))
        self.pods.pop(key, None)
        self.ready.pop(key, None)

    def named_pod(self, name: str, namespace: str) -> dict[str, Any]:
        """The pod, else ValueError (a test's mistake, not an API answer)."""
        pod = self.pods.get((namespace, name))
        if pod is None:
            raise ValueError(f"no pod {namespace}/{name}")
        return pod

    def is_ready(self, pod: dict[str, Any]) -> bool:
        ready = self.ready.get((pod["metadata"]["namespace"], pod["metadata"]["name"]))
        return pod["status"]["phase"] == "Running" and ready is not None and bool(ready())

    def pod_view(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod as a read returns it: a running pod's conditions say whether it is ready now."""
        out = copy.deepcopy(pod)
        meta = out["metadata"]
        if out["status"]["phase"] == "Running":
            ready = "True" if self.is_ready(pod) else "False"
            out["status"]["conditions"] = [
                {"type": "Initialized", "status": "True", "lastTransitionTime": meta["creationTimestamp"]},
                {"type": "Ready", "status": ready, "lastTransitionTime": out["status"]["startTime"]},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": out["status"]["startTime"]},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": meta["creationTimestamp"]},
            ]
        return out

    def current(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        """Every object of a kind (``pods``, ``endpointslices``) in a namespace, as a read returns it, by name."""
        if plural == "pods":
            return [self.pod_view(p) for (ns, _), p in sorted(self.pods.items()) if ns == namespace]
        return [copy.deepcopy(s) for (ns, _), s in sorted(self.slices.items()) if ns == namespace]

    def _slice(self, name: str, namespace: str) -> dict[str, Any]:
        eps = self.slices.get((namespace, name))
        if eps is None:
            raise ValueError(f"no endpointslice {namespace}/{name}")
        return eps

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)


def running_status(ip: str) -> dict[str, Any]:
    """A running pod's ``status`` (its conditions are added as it is read)."""
    return {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now(),
        "qosClass": "BestEffort",
    }
