"""The ``kubernetes`` fleet actuator against a fake Kubernetes API server (real HTTP, the real REST
protocol, lightkube as the client) whose pods are real simulated engines, behind a gateway in
this process, with the openai client.

Every pod runs on 127.0.0.1, so each gives its engine's port in the ``pdgate.io/port`` annotation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.models.autoscaling_v1 import ScaleSpec
from lightkube.models.core_v1 import PodCondition, PodStatus
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.operators import in_
from lightkube.resources.apps_v1 import Deployment, StatefulSet
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType
from support.fake_kube import DELETION_COST, FakeKube
from support.fleet import MODEL, engine_flags, get_json, instance_entry, metric, pd_engine_pair, write_config
from support.ports import reserve_port
from support.procs import PdgateProcess
from support.streams import PROMPT, Stream, StreamsInFlight, assert_same
from support.waiting import wait_until_async

from pdgate.gateway.actuators.kube_pools import going_pods, marked_leaving
from pdgate.gateway.actuators.kubernetes import KubernetesActuator
from pdgate.gateway.app import build_gateway
from pdgate.gateway.config import GatewayConfig
from pdgate.gateway.fleet import FleetManager
from pdgate.gateway.planning_config import ScalingConfig
from pdgate.gateway.server import GatewayServer
from pdgate.scheduler.role_planner import PoolDemand
from pdgate.scheduler.scaling_planner import ScalePlan

TOKEN = "pdgate-test-token"
DECODE_LABELS = {"app": "sim", "pdgate.io/role": "decode"}
PORT_ANNOTATION = "pdgate.io/port"
STREAM_TOKENS = 300  # long enough to run through two scale-downs (they take a few dozen tokens)
Stopped = tuple[str, bool, str | None]  # a pod stopped: its name, whether the gateway served it then, its deletion cost
MIGRATION = {"policy": "no-migration", "interval_s": 0.1, "mechanism": "recompute"}


@pytest.fixture(scope="module")
def static_engines() -> Iterator[tuple[PdgateProcess, PdgateProcess]]:
    """The gateway's configured prefill and decode engines (a config needs a serving path)."""
    with pd_engine_pair(time_scale=1.0) as engines:
        yield engines


class SimPods:
    """The fake cluster's pods: each a ``pdgate engine sim`` in the role its workload's labels say."""

    def __init__(self, sim_factory: Any) -> None:
        self.sim_factory = sim_factory
        self.procs: dict[str, PdgateProcess] = {}
        self.fleet: FleetManager | None = None
        self.stopped: list[Stopped] = []

    async def start(self, pod: dict[str, Any]) -> tuple[str, Any]:
        role = pod["metadata"]["labels"]["pdgate.io/role"]
        proc = await asyncio.to_thread(self.sim_factory, *engine_flags(role), time_scale=1.0)
        self.procs[pod["metadata"]["name"]] = proc
        pod["metadata"]["annotations"][PORT_ANNOTATION] = str(proc.port)
        return "127.0.0.1", lambda: proc.proc.poll() is None

    async def stop(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        serving = self.fleet is not None and name in self.fleet.cluster.instances
        self.stopped.append((name, serving, pod["metadata"]["annotations"].get(DELETION_COST)))
        proc = self.procs.pop(name, None)
        if proc is not None:
            await asyncio.to_thread(proc.stop)


@pytest.fixture
async def cluster(sim_factory) -> AsyncIterator[tuple[FakeKube, SimPods]]:
    pods = SimPods(sim_factory)
    fake = FakeKube(pods.start, pods.stop, token=TOKEN)
    await fake.start()
    try:
        yield fake, pods
    finally:
        await fake.close()


@pytest.fixture
async def gateway(tmp_path: Path, static_engines) -> AsyncIterator[GatewayServer]:
    prefill, decode = static_engines
    entries = [instance_entry(prefill, "prefill", "sim"), instance_entry(decode, "decode", "sim")]
    config = GatewayConfig.load(write_config(tmp_path / "gateway.yaml", entries, migration=MIGRATION))
    server = GatewayServer(build_gateway(config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _actuator(fleet: FleetManager, kubeconfig: Path, *pools: dict[str, Any]) -> KubernetesActuator:
    params = KubernetesActuator.validate_params(
        {"kubeconfig": str(kubeconfig), "pools": list(pools), "poll_interval_s": 0.1}
    )
    return KubernetesActuator(params, fleet, ScalingConfig(drain_timeout_s=30))


def _pool(kind: str, name: str, role: str = "decode") -> dict[str, Any]:
    return {"model": MODEL, "role": role, "kind": kind, "name": name, "port": 8000, "instance": {"kind": "sim"}}


def _plan(*, prefill: int = 1, decode: int = 1) -> ScalePlan:
    demand = PoolDemand(prefill_work_s_per_s=0.1, decode_streams=1.0, context_tokens_per_stream=500.0)
    return ScalePlan(MODEL, prefill, decode, 0, {"prefill": 1, "decode": decode}, demand, 16, "test")


def _fleet(server: GatewayServer) -> FleetManager:
    assert server.gateway.fleet is not None
    return server.gateway.fleet


async def _admin_instances(server: GatewayServer) -> dict[str, dict[str, Any]]:
    data = await asyncio.to_thread(get_json, f"{server.url}/admin/instances")
    return {i["id"]: i for i in data["data"]}


async def _wait_pods_in_fleet(fake: FakeKube, fleet: FleetManager, workload: str, count: int) -> list[str]:
    def joined() -> list[str] | None:
        names = sorted(p["metadata"]["name"] for p in fake.pods_of(workload))
        return names if len(names) == count and all(n in fleet.cluster.instances for n in names) else None

    return await wait_until_async(joined, timeout=20, message=f"{count} pod(s) of {workload} in the fleet")


async def test_a_scale_up_starts_a_pod_that_joins_and_serves(cluster, gateway, tmp_path) -> None:
    fake, pods = cluster
    fleet = _fleet(gateway)
    fake.deployment("decode", 1, DECODE_LABELS)
    actuator = _actuator(fleet, fake.kubeconfig(tmp_path / "kubeconfig"), _pool("Deployment", "decode"))
    await actuator.start()
    try:
        [first] = await _wait_pods_in_fleet(fake, fleet, "decode", 1)
        assert await actuator.apply(_plan(decode=2)) == ["scaled Deployment/decode from 1 to 2 (decode)"]
        assert fake.replicas("deployments", "decode") == 2
        names = await _wait_pods_in_fleet(fake, fleet, "decode", 2)
        [new] = [n for n in names if n != first]
        listed = await _admin_instances(gateway)
        port = pods.procs[new].port
        assert listed[new]["url"] == f"http://127.0.0.1:{port}" and listed[new]["role"] == "decode"
        assert await actuator.apply(_plan(decode=2)) == []  # already there: nothing to do

        engine = pods.procs[new].url
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as api:

            async def served_by_new() -> bool:
                done = await api.completions.create(
                    model=MODEL, prompt="scaled up", max_tokens=4, extra_body={"ignore_eos": True}
                )
                assert done.usage is not None and done.usage.completion_tokens == 4
                return await asyncio.to_thread(metric, engine, "vllm:request_success_total") > 0

            await wait_until_async(served_by_new, timeout=20, message="a request decoded on the new pod")
        # a pod deleted from outside (kubectl delete pod) leaves the fleet; its replacement joins
        fake.delete_pod(first)
        await wait_until_async(lambda: first not in fleet.cluster.instances, timeout=10)
        replaced = await _wait_pods_in_fleet(fake, fleet, "decode", 2)
        assert first not in replaced and new in replaced
        # the actuator spoke the API as a client does: a bearer token, merge patches on the scale subresource
        scale_patches = [
            r for r in fake.requests if r.method == "PATCH" and r.path.endswith("/deployments/decode/scale")
        ]
        assert scale_patches and all(r.content_type == "application/merge-patch+json" for r in scale_patches)
        assert all(r.authorization == f"Bearer {TOKEN}" for r in fake.requests)
    finally:
        await actuator.close()
    assert not actuator._tasks  # discovery is cancelled and awaited


async def test_b_a_scale_down_drains_the_chosen_pod_before_it_is_deleted(cluster, gateway, tmp_path) -> None:
    fake, pods = cluster
    fleet = _fleet(gateway)
    pods.fleet = fleet
    fake.deployment("decode", 2, DECODE_LABELS)
    actuator = _actuator(fleet, fake.kubeconfig(tmp_path / "kubeconfig"), _pool("Deployment", "decode"))
    await actuator.start()
    try:
        names = await _wait_pods_in_fleet(fake, fleet, "decode", 2)
        static_decode = next(
            i for i, s in fleet.cluster.instances.items() if s.spec.role == "decode" and i not in names
        )
        await fleet.drain(static_decode)  # the streams' decode legs go to the pods

        async def healthy() -> bool:
            listed = await _admin_instances(gateway)
            return all(listed[n]["healthy"] for n in names)

        await wait_until_async(healthy, timeout=10)
        prompts = [f"{PROMPT} (take {i})" for i in range(4)]
        streams = [Stream(gateway.url, f"down-{i}", prompt=p, tokens=STREAM_TOKENS) for i, p in enumerate(prompts)]
        flight = await asyncio.to_thread(StreamsInFlight, streams)
        await asyncio.to_thread(flight.running_everywhere, gateway.url)
        load = {n: fleet.cluster.instances[n].inflight_requests for n in names}
        first, second = sorted(names, key=lambda n: (load[n], n))

        # two pods to one: the one with fewer requests in flight goes (its streams, if any, move to the other)
        assert await actuator.apply(_plan(decode=1)) == [
            f"scaled Deployment/decode from 2 to 1 (decode), drained {first}"
        ]
        assert fake.deleted == [first] and fake.replicas("deployments", "decode") == 1
        assert fleet.cluster.instances[second].inflight_requests == len(streams), load  # all on the one that stays
        # one to none, the configured decode instance serving again: the last pod's streams move there first
        await fleet.undrain(static_decode)
        assert await actuator.apply(_plan(decode=0)) == [
            f"scaled Deployment/decode from 1 to 0 (decode), drained {second}"
        ]
        assert fake.deleted == [first, second] and fake.replicas("deployments", "decode") == 0

        await asyncio.to_thread(flight.join)
        assert not flight.errors
        references = [Stream(gateway.url, f"ref-{i}", prompt=p, tokens=STREAM_TOKENS) for i, p in enumerate(prompts)]
        unmoved = await asyncio.to_thread(StreamsInFlight, references)
        await asyncio.to_thread(unmoved.join)
        assert not unmoved.errors
        for stream, reference in zip(streams, references):  # every stream finished, token for token
            assert_same(stream, reference)
        await wait_until_async(lambda: len(pods.stopped) == 2, timeout=10)
        # each had left the gateway before its pod was deleted, which the ReplicaSet chose by its deletion cost
        assert pods.stopped == [(first, False, "-1000"), (second, False, "-1000")]
        pod_patches = [r for r in fake.requests if r.method == "PATCH" and "/pods/" in r.path]
        assert [r.path.rsplit("/", 1)[1] for r in pod_patches] == [first, second]
        assert all(r.content_type == "application/merge-patch+json" for r in pod_patches)
        listed = await _admin_instances(gateway)
        assert first not in listed and second not in listed and static_decode in listed
        await actuator.discover()  # the pods are gone: discovery has nothing to add back
        assert first not in fleet.cluster.instances and second not in fleet.cluster.instances
    finally:
        await actuator.close()


async def test_c_a_statefulset_scale_down_removes_the_highest_ordinal(cluster, gateway, tmp_path) -> None:
    fake, pods = cluster
    fleet = _fleet(gateway)
    pods.fleet = fleet
    fake.statefulset("decode", 2, DECODE_LABELS)
    actuator = _actuator(fleet, fake.kubeconfig(tmp_path / "kubeconfig"), _pool("StatefulSet", "decode"))
    await actuator.start()
    try:
        assert await _wait_pods_in_fleet(fake, fleet, "decode", 2) == ["decode-0", "decode-1"]
        # both idle: a Deployment's choice would be decode-0 (then by name), a StatefulSet's is its last ordinal
        lines = await actuator.apply(_plan(decode=1))
        assert lines == ["scaled StatefulSet/decode from 2 to 1 (decode), drained decode-1"]
        assert fake.deleted == ["decode-1"] and fake.replicas("statefulsets", "decode") == 1
        await wait_until_async(lambda: pods.stopped, timeout=10)
        assert pods.stopped == [("decode-1", False, None)]  # no deletion cost: a StatefulSet does not read it
        assert "decode-0" in fleet.cluster.instances and "decode-1" not in fleet.cluster.instances
        assert all(DELETION_COST not in p["metadata"]["annotations"] for p in fake.pods_of("decode"))
    finally:
        await actuator.close()


async def test_d_a_refused_drain_leaves_the_replicas_as_they_are(cluster, gateway, tmp_path, caplog) -> None:
    fake, _ = cluster
    fleet = _fleet(gateway)
    fake.deployment("decode", 1, DECODE_LABELS)
    actuator = _actuator(fleet, fake.kubeconfig(tmp_path / "kubeconfig"), _pool("Deployment", "decode"))
    await actuator.start()
    try:
        [only] = await _wait_pods_in_fleet(fake, fleet, "decode", 1)
        static_decode = next(i for i, s in fleet.cluster.instances.items() if s.spec.role == "decode" and i != only)
        await fleet.drain(static_decode)  # the pod is the model's last decode path
        with caplog.at_level(logging.WARNING, logger="pdgate.scaling"):
            [line] = await actuator.apply(_plan(decode=0))
        assert line.startswith(f"kept Deployment/decode at 1 (decode; plan 0): cannot drain pod {only}: ")
        assert "without a serving path" in line
        assert line in caplog.text
        assert fake.replicas("deployments", "decode") == 1 and fake.deleted == []
        assert not fleet.cluster.instances[only].draining  # it goes on serving
        assert DELETION_COST not in fake.pods_of("decode")[0]["metadata"]["annotations"]
        assert not [r for r in fake.requests if r.method == "PATCH"]
        # with another decode path again, the same plan goes through
        await fleet.undrain(static_decode)
        assert await actuator.apply(_plan(decode=0)) == [
            f"scaled Deployment/decode from 1 to 0 (decode), drained {only}"
        ]
        assert fake.deleted == [only]
    finally:
        await actuator.close()


async def test_e_api_failures_are_logged_lines_never_exceptions(cluster, gateway, tmp_path, caplog) -> None:
    fake, _ = cluster
    fleet = _fleet(gateway)
    fake.deployment("decode", 1, DECODE_LABELS)
    closed_port = reserve_port()
    nowhere = tmp_path / "nowhere"
    nowhere.write_text(fake.kubeconfig(tmp_path / "k").read_text().replace(fake.url, f"http://127.0.0.1:{closed_port}"))
    cases = [
        (fake.kubeconfig(tmp_path / "bad-token", token="wrong"), "decode", "401 Unauthorized: Unauthorized"),
        (fake.kubeconfig(tmp_path / "good"), "missing", '404 NotFound: deployments.apps "missing" not found'),
        (nowhere, "decode", "ConnectError"),
        (tmp_path / "no-such-kubeconfig", "decode", "no-such-kubeconfig"),
    ]
    for kubeconfig, name, why in cases:
        actuator = _actuator(fleet, kubeconfig, _pool("Deployment", name))
        await actuator.start()
        try:
            with caplog.at_level(logging.WARNING, logger="pdgate.scaling"):
                [line] = await actuator.apply(_plan(decode=3))
                assert line.startswith(f"failed to scale Deployment/{name} (decode) to 3: ") and why in line, line
                assert line in caplog.text
                await wait_until_async(lambda n=name: f"cannot list the pods of Deployment/{n}" in caplog.text)
        finally:
            await actuator.close()
        caplog.clear()
    assert fake.replicas("deployments", "decode") == 1
    refused = [r for r in fake.requests if r.authorization != f"Bearer {TOKEN}"]
    assert refused and all(r.authorization == "Bearer wrong" for r in refused)
    assert not [r for r in fake.requests if r.method == "PATCH"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("pool", "where"),
    [
        ({"role": "decoder"}, "parameters.pools.0.role"),
        ({"kind": "ReplicaSet"}, "parameters.pools.0.kind"),
        ({"port": 0}, "parameters.pools.0.port"),
        ({"instance": {"url": "http://x:1"}}, "parameters.pools.0: instance.url: set from the pod and the pool"),
        ({"instance": {"kind": "nope"}}, "parameters.pools.0: instance.kind: unknown adapter kind 'nope'"),
        ({"replicas": 3}, "parameters.pools.0.replicas"),
    ],
)
def test_f_a_bad_pool_is_a_config_error_naming_the_field(tmp_path, pool, where) -> None:
    entries = [
        {"id": "p", "url": "http://127.0.0.1:1", "kind": "sim", "role": "prefill", "model": MODEL},
        {"id": "d", "url": "http://127.0.0.1:2", "kind": "sim", "role": "decode", "model": MODEL},
    ]
    good = _pool("Deployment", "decode")

    def build(pools: list[dict[str, Any]], name: str) -> None:
        scaling = {"enabled": True, "actuator": {"type": "kubernetes", "parameters": {"pools": pools}}}
        build_gateway(GatewayConfig.load(write_config(tmp_path / name, entries, scaling=scaling)))

    with pytest.raises(ValueError) as err:  # a ConfigError at load, or a ValueError as the gateway is built
        build([good | pool], "bad.yaml")
    assert f"scaling.actuator.{where}" in str(err.value), str(err.value)
    build([good], "good.yaml")


def _pod(name: str, *, ready: bool = True, deleting: bool = False, cost: str | None = None) -> Pod:
    annotations = {DELETION_COST: cost} if cost is not None else {}
    meta = ObjectMeta(name=name, annotations=annotations, deletionTimestamp=datetime.now(UTC) if deleting else None)
    condition = PodCondition(type="Ready", status="True" if ready else "False")
    return Pod(metadata=meta, status=PodStatus(phase="Running", podIP="10.0.0.1", conditions=[condition]))


@pytest.mark.unit
def test_g_the_pods_a_scale_down_drains_follow_each_controller() -> None:
    inflight = {"d-a": 3, "d-b": 1, "d-c": 1, "d-e": 0}.get  # d-u: not ready; d-x: not in the fleet
    pods = [_pod("d-a"), _pod("d-b"), _pod("d-c"), _pod("d-u", ready=False), _pod("d-x"), _pod("d-e")]
    names = lambda chosen: [p.metadata.name for p in chosen]
    # 6 -> 4: the unready pod is the ReplicaSet's first pick; then one more: a pod the gateway does not serve
    assert names(going_pods("Deployment", pods, 6, 4, [], inflight)) == ["d-x"]
    # 6 -> 2: then the fewest requests in flight, by name among equals
    assert names(going_pods("Deployment", pods, 6, 2, [], inflight)) == ["d-x", "d-e", "d-b"]
    # a pod already drained and marked counts among those going; deleted ones are no longer there
    assert names(going_pods("Deployment", [*pods, _pod("d-z", deleting=True)], 6, 3, ["d-x"], inflight)) == ["d-e"]
    ordinals = [_pod(f"s-{n}") for n in (0, 2, 1, 3)]
    assert names(going_pods("StatefulSet", ordinals, 4, 2, [], lambda _: 0)) == ["s-3", "s-2"]
    assert names(going_pods("StatefulSet", ordinals, 4, 4, [], lambda _: 0)) == []
    assert marked_leaving(_pod("m", cost="-1000")) and not marked_leaving(_pod("m", cost="5"))


@pytest.mark.unit
async def test_h_the_fake_api_server_answers_as_the_real_one(tmp_path) -> None:
    """The test edge itself: lightkube reads and writes it as it would a cluster."""
    ports = iter(range(9000, 9100))

    def start(pod: dict[str, Any]) -> tuple[str, Any]:
        pod["metadata"]["annotations"][PORT_ANNOTATION] = str(next(ports))
        return "10.0.0.7", lambda: True

    fake = FakeKube(start, lambda pod: None, token=TOKEN)
    await fake.start()
    fake.statefulset("prefill", 2, {"app": "sim", "pdgate.io/role": "prefill"})
    fake.deployment("decode", 1, DECODE_LABELS)
    api = AsyncClient(KubeConfig.from_file(fake.kubeconfig(tmp_path / "kubeconfig")).get(), field_manager="test")
    try:
        await wait_until_async(lambda: all(p["status"]["phase"] == "Running" for p in fake.pods.values()))
        workload = await api.get(StatefulSet, "prefill", namespace="default")
        assert workload.spec.selector.matchLabels == {"app": "sim", "pdgate.io/role": "prefill"}
        assert workload.status.replicas == 2 and workload.metadata.uid and workload.metadata.resourceVersion
        selected = [p async for p in api.list(Pod, namespace="default", labels={"pdgate.io/role": in_(["prefill"])})]
        assert [p.metadata.name for p in selected] == ["prefill-0", "prefill-1"]
        assert selected[0].status.podIP == "10.0.0.7" and selected[0].metadata.annotations[PORT_ANNOTATION]
        everything = [p async for p in api.list(Pod, namespace="default", labels={"app": "sim"})]
        assert len(everything) == 3
        scale = await api.get(StatefulSet.Scale, "prefill", namespace="default")
        assert scale.spec.replicas == 2 and scale.status.selector == "app=sim,pdgate.io/role=prefill"
        for patch_type in (PatchType.STRATEGIC, PatchType.APPLY, PatchType.JSON):
            body: Any = {"spec": {"replicas": 3}}
            if patch_type is PatchType.JSON:
                body = [{"op": "replace", "path": "/spec/replicas", "value": 1}]
            await api.patch(StatefulSet.Scale, "prefill", body, namespace="default", patch_type=patch_type)
        assert fake.replicas("statefulsets", "prefill") == 1 and fake.deleted == ["prefill-2", "prefill-1"]
        stale = StatefulSet.Scale(metadata=ObjectMeta(name="prefill", resourceVersion="1"), spec=ScaleSpec(replicas=2))
        with pytest.raises(ApiError) as conflict:
            await api.replace(stale, "prefill", namespace="default")
        assert conflict.value.status.code == 409 and conflict.value.status.reason == "Conflict"
        with pytest.raises(ApiError) as missing:
            await api.get(Deployment.Scale, "nope", namespace="default")
        assert (missing.value.status.code, missing.value.status.reason) == (404, "NotFound")
        assert missing.value.status.message == 'deployments.apps "nope" not found'
    finally:
        await api.close()
        await fake.close()
