"""Kubernetes discovery (issue 22, item 1): a gateway with no static instances serves the Ready
engine pods of a label selector, and keeps serving through churn: pods added, made unready,
deleted, replaced under the same name, and deleted while the watch was away (410 Gone, re-list),
with a steady load of streamed completions of which none fails.

The edge that cannot run here, the Kubernetes API, is a fake speaking the real list/watch
protocol (tests/support/fake_kube.py), reached by the real client (lightkube); the pods' engines
are real simulated engines on 127.0.0.1, each pod naming its port in ``pdgate.io/port``. With
two replicas sharing a real NATS server, both watch and only the leader changes the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod
from support.browser import PageErrors, headless_chromium
from support.fake_kube import FakeKube
from support.fleet import MODEL, engine_flags
from support.procs import PdgateProcess
from support.streams import admin
from support.waiting import wait_until_async

from pdgate.gateway.app import build_gateway
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.server import GatewayServer

pytestmark = pytest.mark.slow

POOL = {"pdgate.io/pool": "engines"}
TOKENS = 24


@dataclass
class Cluster:
    """The fake API server and the simulated engine behind each pod."""

    fake: FakeKube
    kubeconfig: Path
    sim_factory: Callable[..., PdgateProcess]
    engines: dict[str, PdgateProcess] = field(default_factory=dict)

    async def pod(self, name: str, role: str, *, ready: bool = True) -> PdgateProcess:
        """A pod whose engine is a new simulated engine in ``role``."""
        engine = await asyncio.to_thread(self.sim_factory, *engine_flags(role), time_scale=5.0)
        self.engines[name] = engine
        labels = {**POOL, "pdgate.io/role": role, "pdgate.io/engine": "sim"}
        annotations = {"pdgate.io/model": MODEL, "pdgate.io/port": str(engine.port)}
        self.fake.add_pod(name, labels, annotations=annotations, ready=ready)
        return engine

    async def stop_engine(self, engine: PdgateProcess) -> None:
        await asyncio.to_thread(engine.stop)


def _unused(*_: Any) -> Any:
    raise AssertionError("no workload in these tests")


@pytest.fixture
async def cluster(sim_factory, tmp_path: Path) -> AsyncIterator[Cluster]:
    fake = FakeKube(_unused, _unused)
    await fake.start()
    try:
        yield Cluster(fake, fake.kubeconfig(tmp_path / "kubeconfig"), sim_factory)
    finally:
        await fake.close()


def _config(kubeconfig: Path, **extra: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": 0,
            "models": [{"name": MODEL, "max_model_len": 4096}],
            "scrape_interval_s": 0.2,
            "health": {"interval_s": 0.2, "timeout_s": 1.0, "failure_threshold": 2, "cooldown_s": 5},
            "migration": {"interval_s": 0.1},
            "discovery": {
                "kubernetes": {
                    "kubeconfig": str(kubeconfig),
                    "label_selector": "pdgate.io/pool=engines",
                    "unready_grace_s": 0.3,
                    "drain_timeout_s": 10,
                    "backoff_s": [0.05, 0.5],
                }
            },
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def _gateway(config: GatewayConfig) -> AsyncIterator[GatewayServer]:
    server = GatewayServer(build_gateway(config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _serving(server: GatewayServer) -> dict[str, str]:
    """Instance id -> its URL, as the gateway serves them now."""
    assert server.gateway.cluster is not None
    return {i: s.spec.url for i, s in server.gateway.cluster.instances.items()}


def _role(server: GatewayServer, instance: str) -> str | None:
    assert server.gateway.cluster is not None
    state = server.gateway.cluster.instances.get(instance)
    return state.spec.role if state is not None else None


async def _patch_labels(cluster: Cluster, pod: str, labels: dict[str, str]) -> None:
    config = KubeConfig.from_file(cluster.kubeconfig)
    async with AsyncClient(config) as api:
        await api.patch(Pod, pod, {"metadata": {"labels": labels}}, namespace="default")


def _draining(server: GatewayServer, instance: str) -> bool:
    assert server.gateway.cluster is not None
    state = server.gateway.cluster.instances.get(instance)
    return state is not None and state.draining


class Load:
    """Streamed completions, one after another from ``clients`` tasks, until stopped; each checked whole."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        self.done = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(clients)]

    async def _run(self, n: int) -> None:
        while not self._stop.is_set():
            try:
                stream = await self.client.completions.create(
                    model=MODEL,
                    prompt=f"client {n} request {self.done}",
                    max_tokens=TOKENS,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                usage = None
                async for chunk in stream:
                    usage = chunk.usage or usage
                if usage is None or usage.completion_tokens != TOKENS:
                    self.failures.append(f"incomplete: {usage}")
                else:
                    self.done += 1
            except Exception as exc:  # every failure is the test's finding
                self.failures.append(repr(exc))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.client.close()


async def _until(predicate: Callable[[], Any], message: str, timeout: float = 15) -> Any:
    return await wait_until_async(predicate, timeout=timeout, message=message)


async def test_the_fleet_follows_the_pods_through_churn_with_no_request_failing(cluster: Cluster) -> None:
    await cluster.pod("prefill-0", "prefill")
    decode0 = await cluster.pod("decode-0", "decode")
    async with _gateway(_config(cluster.kubeconfig)) as server:
        await _until(lambda: set(_serving(server)) == {"prefill-0", "decode-0"}, "the two pods served")
        assert _serving(server)["decode-0"] == decode0.url
        load = Load(server.url)
        try:
            await _until(lambda: load.done >= 3, "the load under way")

            # a new pod, not Ready yet: kept out until it is
            decode1 = await cluster.pod("decode-1", "decode", ready=False)
            await _until(lambda: load.done >= 6, "more load")
            assert "decode-1" not in _serving(server)
            cluster.fake.set_ready("decode-1", True)
            await _until(lambda: "decode-1" in _serving(server), "the Ready pod joined")

            # unready for longer than the grace: drained; Ready again: undrained
            cluster.fake.set_ready("decode-0", False)
            await _until(lambda: _draining(server, "decode-0"), "the unready pod drained")
            cluster.fake.set_ready("decode-0", True)
            await _until(lambda: not _draining(server, "decode-0"), "the Ready pod undrained")

            # deleted: drained, removed, and only then its engine stops (the kubelet's SIGTERM)
            cluster.fake.terminate_pod("decode-0")
            await _until(lambda: "decode-0" not in _serving(server), "the deleted pod removed")
            cluster.fake.remove_pod("decode-0")
            await cluster.stop_engine(decode0)
            done = load.done
            await _until(lambda: load.done >= done + 3, "load on the pods left")

            # replaced under the same name (a StatefulSet's pod): a new uid and a new engine
            decode0b = await cluster.pod("decode-0", "decode")
            await _until(lambda: _serving(server).get("decode-0") == decode0b.url, "the new decode-0 served")

            # relabelled through the API (a real PATCH): the instance is replaced in its new role
            await _patch_labels(cluster, "decode-0", {"pdgate.io/role": "both"})
            await _until(lambda: _role(server, "decode-0") == "both", "decode-0 serving as both")

            # deleted while the API was away and its history compacted since: the watch from the
            # last resourceVersion gets 410 Gone, and the re-list sees the pod gone
            lists, watches = cluster.fake.lists["pods"], cluster.fake.watches["pods"]
            cluster.fake.outage = 503
            cluster.fake.end_watches()
            cluster.fake.terminate_pod("decode-1")
            cluster.fake.remove_pod("decode-1")
            cluster.fake.compact()
            await _until(lambda: server.gateway.discovery.watcher.last_error is not None, "the API away")
            assert "decode-1" in _serving(server)  # nothing known yet
            cluster.fake.outage = None
            await _until(lambda: "decode-1" not in _serving(server), "the pod deleted while away removed")
            assert cluster.fake.lists["pods"] > lists and cluster.fake.watches["pods"] > watches
            await cluster.stop_engine(decode1)
            done = load.done
            await _until(lambda: load.done >= done + 3, "load after the re-list")
        finally:
            await load.stop()
        assert not load.failures, load.failures[:5]
        assert set(_serving(server)) == {"prefill-0", "decode-0"}
        discovery = server.gateway.discovery
        assert discovery is not None and discovery.status()["problems"] == {}


def _console_card(url: str, profile: Path, name: str) -> tuple[str, list[str]]:
    """The ops console's card ``name`` as headless Chromium shows it, and the page's errors (in a
    thread: the browser is driven synchronously, the gateway serves on the test's loop)."""
    with headless_chromium(profile) as browser:
        page = browser.new_page()
        errors = PageErrors(page)
        page.goto(f"{url}/console?interval_ms=200")
        page.wait_for_selector(f'[data-card="{name}"]', timeout=10_000)
        return page.inner_text(f'[data-card="{name}"]'), errors.errors


def _changes(server: GatewayServer, change: str) -> float:
    sample = server.gateway.metrics.registry.get_sample_value("pdgate_discovery_changes_total", {"change": change})
    return sample or 0.0


async def test_every_replica_watches_and_only_the_leader_changes_the_fleet(cluster: Cluster, nats) -> None:
    """(Until a replica reaches NATS it acts on its own view, as it does for every duty while NATS is
    away: the pods come once both are in sync.)"""
    sharing = {"nats_url": nats.url, "leader_lease_s": 3.0, "load_interval_s": 0.1}
    configs = [_config(cluster.kubeconfig, sharing={**sharing, "replica_id": name}) for name in ("r1", "r2")]
    async with _gateway(configs[0]) as first, _gateway(configs[1]) as second:
        replicas = (first, second)
        await _until(
            lambda: all(r.gateway.leadership is not None and r.gateway.leadership.leader_id for r in replicas),
            "a leader named by both",
        )
        await cluster.pod("prefill-0", "prefill")
        await cluster.pod("decode-0", "decode")
        for r in replicas:
            await _until(lambda r=r: set(_serving(r)) == {"prefill-0", "decode-0"}, "both serve the pods")
        await cluster.pod("decode-1", "decode")
        for r in replicas:
            await _until(lambda r=r: "decode-1" in _serving(r), "both serve the new pod")
        # relabelled: the leader removes and adds it again at once; the follower, still draining
        # the removal, applies the add after it (it does not drop it)
        await _patch_labels(cluster, "decode-1", {"pdgate.io/role": "both"})
        for r in replicas:
            await _until(lambda r=r: _role(r, "decode-1") == "both", "both serve the relabelled pod as both")
        await _patch_labels(cluster, "decode-1", {"pdgate.io/role": "decode"})
        for r in replicas:
            await _until(lambda r=r: _role(r, "decode-1") == "decode", "and back as decode")
        assert all(r.gateway.discovery is not None and r.gateway.discovery.watcher.synced for r in replicas)
        # each pod joined once (decode-1 three times: added, relabelled twice), by the replica
        # leading then (the lease may have moved meanwhile)
        assert _changes(first, "add") + _changes(second, "add") == 5
        leader = next(r for r in replicas if r.gateway.leadership is not None and r.gateway.leadership.is_leader)
        follower = second if leader is first else first

        # unready under the leader: drained on both; the leader stops; Ready again, the new
        # leader undrains it (it followed the pod's state while it did not lead)
        cluster.fake.set_ready("decode-1", False)
        for r in replicas:
            await _until(lambda r=r: _draining(r, "decode-1"), "the unready pod drained on both")
        await leader.stop()
        await _until(lambda: follower.gateway.leadership.is_leader, "the follower leads")
        cluster.fake.set_ready("decode-1", True)
        await _until(lambda: not _draining(follower, "decode-1"), "the new leader undrained the Ready pod")
        assert _changes(follower, "undrain") == 1 and _changes(follower, "drain") == 0
        cluster.fake.terminate_pod("decode-1")
        await _until(lambda: "decode-1" not in _serving(follower), "the new leader removed the deleted pod")
        assert _changes(follower, "remove") == 1


async def test_a_pod_that_cannot_join_is_reported_once_and_a_config_reload_keeps_the_discovered(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.pod("prefill-0", "prefill")
    await cluster.pod("decode-0", "decode")
    cluster.fake.add_pod("odd-0", {**POOL, "pdgate.io/engine": "sim"}, annotations={"pdgate.io/model": MODEL})
    cluster.fake.add_pod(
        "other-model-0",
        {**POOL, "pdgate.io/role": "decode", "pdgate.io/engine": "sim"},
        annotations={"pdgate.io/model": "not-served", "pdgate.io/port": "1"},
    )
    async with _gateway(_config(cluster.kubeconfig)) as server:
        await _until(lambda: set(_serving(server)) == {"prefill-0", "decode-0"}, "the good pods served")
        discovery = server.gateway.discovery
        assert discovery is not None
        await _until(lambda: len(discovery.status()["problems"]) == 2, "both problems reported")
        status, body = await asyncio.to_thread(admin, server.url, "/admin/discovery", method="GET")
        assert status == 200 and body["enabled"] and body["synced"] and body["pods"] == 4, body
        assert sorted(body["managed"]) == ["decode-0", "prefill-0"] and body["last_error"] is None
        problems = body["problems"]
        status, console = await asyncio.to_thread(admin, server.url, "/admin/console/state", method="GET")
        assert status == 200 and console["discovery"] == body
        card, errors = await asyncio.to_thread(_console_card, server.url, tmp_path / "browser", "discovery")
        assert card.split("\n")[:3] == ["Pods discovered", "2", "2 pod(s) cannot join"] and not errors, (card, errors)
        assert "no pdgate.io/role label" in problems["odd-0"]
        assert "not-served" in problems["other-model-0"]
        passes = cluster.fake.watches["pods"]
        cluster.fake.end_watches()  # more passes over the same pods: each problem stays counted once
        await _until(lambda: cluster.fake.watches["pods"] > passes, "a new watch")
        metric = server.gateway.metrics.registry.get_sample_value
        assert metric("pdgate_discovery_problems_total") == 2

        # the admin API leaves discovery's instances to discovery: a DELETE would be undone, a pod_uid is not given
        status, body = await asyncio.to_thread(admin, server.url, "/admin/instances/decode-0", method="DELETE")
        assert status == 409 and "Kubernetes discovery" in body["error"]["message"], body
        forged = {
            "id": "x",
            "url": "http://127.0.0.1:1",
            "kind": "sim",
            "role": "decode",
            "model": MODEL,
            "pod_uid": "u",
        }
        status, body = await asyncio.to_thread(admin, server.url, "/admin/instances", forged)
        assert status == 400 and body["error"]["param"] == "pod_uid", body

        # an operator's drain is the operator's: the pod going unready and Ready again keeps it
        assert (await asyncio.to_thread(admin, server.url, "/admin/instances/decode-0/drain"))[0] in (200, 202)
        cluster.fake.set_ready("decode-0", False)
        await _until(lambda: discovery._unready_since.get("decode-0") is not None, "the pod seen unready")
        cluster.fake.set_ready("decode-0", True)
        await _until(lambda: "decode-0" not in discovery._unready_since, "the pod seen Ready again")
        assert _draining(server, "decode-0") and _changes(server, "undrain") == 0

        # SIGHUP's reload applies the file's instances: the discovered ones are not the file's to remove
        assert server.gateway.fleet is not None
        report = await server.gateway.fleet.apply(_config(cluster.kubeconfig), timeout_s=1)
        assert report.removed == [] and set(_serving(server)) == {"prefill-0", "decode-0"}
        cluster.fake.remove_pod("odd-0")
        await _until(lambda: "odd-0" not in discovery.status()["problems"], "a problem pod gone is forgotten")


async def test_with_endpointslices_readiness_is_the_services(cluster: Cluster) -> None:
    from support.fake_kube import endpoint

    await cluster.pod("prefill-0", "prefill")
    await cluster.pod("decode-0", "decode")
    service = {"kubernetes.io/service-name": "engines"}
    ready = [endpoint("127.0.0.1", pod="prefill-0")]
    cluster.fake.add_endpointslice("engines-a", service, [*ready, endpoint("127.0.0.1", ready=False, pod="decode-0")])
    config = _config(cluster.kubeconfig)
    assert config.discovery.kubernetes is not None
    config.discovery.kubernetes = config.discovery.kubernetes.model_copy(
        update={"readiness": "endpointslices", "service": "engines"}
    )
    async with _gateway(config) as server:
        discovery = server.gateway.discovery
        assert discovery is not None and discovery.slices is not None
        await _until(lambda: discovery.slices.synced and set(_serving(server)) == {"prefill-0"}, "only prefill-0")
        cluster.fake.set_endpoints("engines-a", [*ready, endpoint("127.0.0.1", pod="decode-0")])
        await _until(lambda: "decode-0" in _serving(server), "decode-0 joined when its endpoint was ready")
        # serving but terminating (the pod is being deleted): drained, then removed
        leaving = endpoint("127.0.0.1", ready=False, serving=True, terminating=True, pod="decode-0")
        cluster.fake.set_endpoints("engines-a", [*ready, leaving])
        await _until(lambda: "decode-0" not in _serving(server), "decode-0 left")
        assert _changes(server, "remove") == 1


async def test_in_a_cluster_it_uses_the_pods_service_account_and_its_namespace(
    sim_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No kubeconfig: the service account's token, CA and namespace, and the API server's address
    from KUBERNETES_SERVICE_HOST/PORT, as a pod sees them; the API over HTTPS."""
    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    fake = FakeKube(_unused, _unused, token="in-cluster-token")
    await fake.start(ssl_context=server_context)
    try:
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text("in-cluster-token")
        (account / "namespace").write_text("llm")
        ca.cert_pem.write_to_path(str(account / "ca.crt"))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", fake.url.rsplit(":", 1)[1])
        cluster = Cluster(fake, tmp_path / "unused", sim_factory)
        engine = await asyncio.to_thread(sim_factory, *engine_flags("both"), time_scale=5.0)
        labels = {**POOL, "pdgate.io/role": "both", "pdgate.io/engine": "sim"}
        annotations = {"pdgate.io/model": MODEL, "pdgate.io/port": str(engine.port)}
        fake.add_pod("both-0", labels, annotations=annotations, namespace="llm")
        fake.add_pod("elsewhere-0", labels, annotations=annotations, namespace="default")
        config = _config(cluster.kubeconfig)
        assert config.discovery.kubernetes is not None
        config.discovery.kubernetes = config.discovery.kubernetes.model_copy(
            update={"kubeconfig": None, "service_account_dir": str(account)}
        )
        async with _gateway(config) as server:
            await _until(lambda: set(_serving(server)) == {"both-0"}, "the pod of the gateway's namespace served")
            reply = await openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x").completions.create(
                model=MODEL, prompt="in a cluster", max_tokens=3, extra_body={"ignore_eos": True}
            )
            assert reply.choices[0].finish_reason == "length"
            assert {r.authorization for r in fake.requests} == {"Bearer in-cluster-token"}
    finally:
        await fake.close()
