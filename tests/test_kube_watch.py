"""The Kubernetes list/watch reflector (:class:`KubeWatcher`) against the fake API server: real HTTP,
the real list and watch protocol (resourceVersions, bookmarks, 410 Expired as the watch cache sends
it), lightkube as the client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType
from support.fake_kube import FakeKube, endpoint
from support.ports import reserve_port
from support.waiting import wait_until_async

from pdgate.common.tasks import OwnedTasks
from pdgate.gateway.discovery.kube_watch import KubeWatcher

pytestmark = pytest.mark.unit

TOKEN = "watch-token"
POOL = {"pdgate.io/pool": "engines"}
SELECTOR = "pdgate.io/pool=engines,tier!=test"
FAST = {"backoff_s": (0.01, 0.05), "rng": random.Random(7)}


class Changes:
    """The ``on_change`` callback: counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _no_workloads(pod: dict[str, Any]) -> None:
    raise AssertionError("these tests make bare pods only")


@pytest.fixture
async def fake() -> AsyncIterator[FakeKube]:
    kube = FakeKube(_no_workloads, _no_workloads, token=TOKEN)
    await kube.start()
    try:
        yield kube
    finally:
        await kube.close()


@pytest.fixture
async def clients(tmp_path: Path) -> AsyncIterator[Callable[[Path], AsyncClient]]:
    """lightkube clients by kubeconfig file, made once each (as the gateway caches its own), closed at the end."""
    made: dict[Path, AsyncClient] = {}

    def client(kubeconfig: Path) -> AsyncClient:
        if kubeconfig not in made:
            made[kubeconfig] = AsyncClient(KubeConfig.from_file(kubeconfig).get(), field_manager="test")
        return made[kubeconfig]

    yield client
    for api in made.values():
        await api.close()


@pytest.fixture
def api(fake: FakeKube, clients, tmp_path: Path) -> Callable[[], AsyncClient]:
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    return lambda: clients(kubeconfig)


@pytest.fixture
async def tasks() -> AsyncIterator[OwnedTasks]:
    owned = OwnedTasks()
    try:
        yield owned
    finally:
        await owned.close()


def _watcher(api: Callable[[], AsyncClient], changes: Changes, resource: Any = Pod, **kw: Any) -> KubeWatcher[Any]:
    options: dict[str, Any] = {"namespace": "default", "label_selector": SELECTOR, **FAST, **kw}
    return KubeWatcher(api, resource, on_change=changes, **options)


async def _synced_and_watching(watcher: KubeWatcher[Any], fake: FakeKube) -> None:
    await wait_until_async(lambda: watcher.synced and fake.open_watches == 1, message="synced, one watch open")
    assert watcher.last_error is None


def _watch_queries(fake: FakeKube, plural: str = "pods") -> list[dict[str, str]]:
    seen = [parse_qs(r.query) for r in fake.requests if r.path.endswith(f"/{plural}")]
    return [{k: v[0] for k, v in q.items()} for q in seen if q.get("watch") == ["true"]]


def _ready(pod: Pod) -> str:
    return next(c.status for c in pod.status.conditions if c.type == "Ready")


async def test_it_lists_then_follows_added_modified_and_deleted_through_the_selector(fake, api, tasks) -> None:
    fake.add_pod("p1", POOL, ip="10.0.0.1")
    fake.add_pod("canary", POOL | {"tier": "test"})
    fake.add_pod("other", {"pdgate.io/pool": "batch"})
    changes = Changes()
    watcher = _watcher(api, changes)
    tasks.spawn(watcher.run(), "kube-watch")
    await _synced_and_watching(watcher, fake)
    assert list(watcher.objects) == ["p1"] and watcher.objects["p1"].status.podIP == "10.0.0.1"
    assert changes.count == 1 and watcher.lists == 1 and fake.lists["pods"] == 1
    [query] = _watch_queries(fake)
    assert query["labelSelector"] == SELECTOR and query["allowWatchBookmarks"] == "true"
    assert query["resourceVersion"] == watcher.resource_version and query["timeoutSeconds"] == "240"

    fake.add_pod("p2", POOL, annotations={"pdgate.io/port": "8001"})
    await wait_until_async(lambda: "p2" in watcher.objects)
    assert watcher.objects["p2"].metadata.annotations == {"pdgate.io/port": "8001"}
    # a patch through the API is a MODIFIED; a label that leaves the selector a DELETED, one that enters it an ADDED
    client = api()
    await client.patch(Pod, "p2", {"metadata": {"annotations": {"pdgate.io/port": "8002"}}}, patch_type=PatchType.MERGE)
    await wait_until_async(lambda: watcher.objects["p2"].metadata.annotations == {"pdgate.io/port": "8002"})
    await client.patch(Pod, "p2", {"metadata": {"labels": {"tier": "test"}}}, patch_type=PatchType.MERGE)
    await wait_until_async(lambda: "p2" not in watcher.objects)
    await client.patch(Pod, "canary", {"metadata": {"labels": {"tier": None}}}, patch_type=PatchType.MERGE)
    await wait_until_async(lambda: "canary" in watcher.objects)
    fake.remove_pod("p1")
    await wait_until_async(lambda: "p1" not in watcher.objects)
    assert sorted(watcher.objects) == ["canary"]
    assert watcher.resource_version == fake.resource_version
    assert changes.count == 1 + 5 and watcher.lists == 1 and watcher.watches == 1


async def test_readiness_and_termination_are_seen(fake, api, tasks) -> None:
    fake.add_pod("p1", POOL, ready=False)
    watcher = _watcher(api, Changes())
    tasks.spawn(watcher.run(), "kube-watch")
    await _synced_and_watching(watcher, fake)
    assert _ready(watcher.objects["p1"]) == "False"
    fake.set_ready("p1", True)
    await wait_until_async(lambda: _ready(watcher.objects["p1"]) == "True")
    fake.set_ready("p1", False)
    await wait_until_async(lambda: _ready(watcher.objects["p1"]) == "False")
    fake.terminate_pod("p1")
    await wait_until_async(lambda: watcher.objects["p1"].metadata.deletionTimestamp is not None)
    fake.remove_pod("p1")
    await wait_until_async(lambda: not watcher.objects)
    assert watcher.lists == 1


async def test_a_bookmark_advances_the_resource_version_without_a_change(fake, api, tasks) -> None:
    fake.add_pod("p1", POOL)
    changes = Changes()
    watcher = _watcher(api, changes)
    tasks.spawn(watcher.run(), "kube-watch")
    await _synced_and_watching(watcher, fake)
    listed = watcher.resource_version
    fake.add_pod("elsewhere", {"pdgate.io/pool": "batch"})  # the server moves on; this watch sees nothing
    assert fake.bookmark() == 1
    await wait_until_async(lambda: watcher.resource_version == fake.resource_version != listed)
    assert changes.count == 1 and list(watcher.objects) == ["p1"]
    # the next watch starts from the bookmark, not from the list
    assert fake.end_watches() == 1
    await wait_until_async(lambda: len(_watch_queries(fake)) == 2 and fake.open_watches == 1)
    assert _watch_queries(fake)[1]["resourceVersion"] == fake.resource_version
    assert watcher.lists == 1 and changes.count == 1


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_a_compaction_makes_it_list_again_and_see_what_it_missed(fake, api, tasks, as_http) -> None:
    fake.hub.expired_as_http = as_http  # the watch cache sends an ERROR event; some servers an HTTP 410
    fake.add_pod("p1", POOL)
    fake.add_pod("p2", POOL)
    changes = Changes()
    watcher = _watcher(api, changes)
    tasks.spawn(watcher.run(), "kube-watch")
    await _synced_and_watching(watcher, fake)
    # the API server goes away; while the watcher cannot watch, p1 is deleted and the history compacted
    fake.outage = 503
    fake.end_watches()
    await wait_until_async(lambda: watcher.last_error and "503 ServiceUnavailable" in watcher.last_error)
    fake.remove_pod("p1")
    fake.add_pod("p3", POOL)
    fake.compact()
    seen = changes.count
    fake.outage = None
    await wait_until_async(lambda: sorted(watcher.objects) == ["p2", "p3"], message="the relisted objects")
    assert watcher.lists == 2 and watcher.last_error is None and changes.count > seen
    assert watcher.resource_version == fake.resource_version
    await wait_until_async(lambda: fake.open_watches == 1)
    fake.add_pod("p4", POOL)  # and it watches on from the new list
    await wait_until_async(lambda: "p4" in watcher.objects)
    assert watcher.lists == 2


async def test_an_ended_watch_resumes_from_the_last_resource_version_without_a_list(fake, api, tasks) -> None:
    watcher = _watcher(api, Changes())
    tasks.spawn(watcher.run(), "kube-watch")
    await _synced_and_watching(watcher, fake)
    fake.add_pod("p1", POOL)
    await wait_until_async(lambda: "p1" in watcher.objects)
    after_p1 = watcher.resource_version
    assert fake.end_watches() == 1  # as at an API server's restart
    await wait_until_async(lambda: len(_watch_queries(fake)) == 2 and fake.open_watches == 1)
    assert _watch_queries(fake)[1]["resourceVersion"] == after_p1
    # the server's timeoutSeconds ends each stream too: watched again each time, never listed
    watcher.watch_timeout_s = 1
    assert fake.end_watches() == 1
    await wait_until_async(lambda: watcher.watches >= 5, timeout=10)
    assert [q["timeoutSeconds"] for q in _watch_queries(fake)][:4] == ["240", "240", "1", "1"]
    fake.add_pod("p2", POOL)
    await wait_until_async(lambda: "p2" in watcher.objects)
    assert watcher.lists == 1 and fake.lists["pods"] == 1 and watcher.last_error is None


async def test_the_api_down_is_an_error_it_recovers_from(fake, clients, tmp_path, tasks, caplog) -> None:
    good = fake.kubeconfig(tmp_path / "good")
    nowhere = tmp_path / "nowhere"  # a server that is not there
    nowhere.write_text(good.read_text().replace(fake.url, f"http://127.0.0.1:{reserve_port()}"))
    current = {"kubeconfig": tmp_path / "no-such-kubeconfig"}
    watcher = _watcher(lambda: clients(current["kubeconfig"]), Changes())
    fake.add_pod("p1", POOL)
    with caplog.at_level(logging.WARNING, logger="pdgate.discovery"):
        tasks.spawn(watcher.run(), "kube-watch")
        await wait_until_async(lambda: watcher.last_error and "no-such-kubeconfig" in watcher.last_error)
        current["kubeconfig"] = nowhere
        await wait_until_async(lambda: watcher.last_error and "ConnectError" in watcher.last_error)
        await wait_until_async(lambda: watcher.lists >= 3, message="lists retried")
        assert not watcher.synced and not watcher.objects
        current["kubeconfig"] = good
        await _synced_and_watching(watcher, fake)
        assert list(watcher.objects) == ["p1"]
        # down while watching (503): it keeps what it has, and watches on from where it was once back
        fake.outage = 503
        fake.end_watches()
        await wait_until_async(lambda: watcher.last_error and "503 ServiceUnavailable" in watcher.last_error)
        fake.add_pod("p2", POOL)
        tries = watcher.watches
        await wait_until_async(lambda: watcher.watches >= tries + 3)  # retried while down
        assert list(watcher.objects) == ["p1"]
        lists = watcher.lists
        fake.outage = None
        await wait_until_async(lambda: "p2" in watcher.objects)
        assert watcher.lists == lists and watcher.last_error is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "pdgate.discovery"]
    assert sum("ConnectError" in w for w in warnings) == 1 and sum("503" in w for w in warnings) == 1
    assert any("listed pods in default again" in w for w in warnings)
    assert any("watched pods in default again" in w for w in warnings)


@pytest.mark.parametrize(
    ("selector", "forbidden", "why"),
    [
        ("pdgate.io/pool in (engines", False, "400 BadRequest: unable to parse requirement"),
        (SELECTOR, True, '403 Forbidden: pods is forbidden: User "system:serviceaccount:default:pdgate" cannot list'),
    ],
    ids=["bad-selector", "forbidden"],
)
async def test_a_refusal_is_logged_once_not_per_retry(fake, api, tasks, caplog, selector, forbidden, why) -> None:
    if forbidden:
        fake.forbidden.add("pods")
    watcher = _watcher(api, Changes(), label_selector=selector)
    with caplog.at_level(logging.WARNING, logger="pdgate.discovery"):
        tasks.spawn(watcher.run(), "kube-watch")
        await wait_until_async(lambda: fake.lists["pods"] >= 5, message="five tries")
    assert watcher.last_error is not None and why in watcher.last_error, watcher.last_error
    lines = [r.getMessage() for r in caplog.records if r.name == "pdgate.discovery"]
    assert lines == [f"discovery: {watcher.last_error}"]
    assert not watcher.synced and watcher.watches == 0


async def test_endpointslices_are_watched_the_same_way(fake, api, tasks) -> None:
    engines = {"kubernetes.io/service-name": "engines"}
    fake.add_endpointslice("engines-a", engines, [endpoint("10.0.0.1", pod="e-1")])
    fake.add_endpointslice("batch-a", {"kubernetes.io/service-name": "batch"}, [endpoint("10.0.1.1")])
    changes = Changes()
    watcher = _watcher(api, changes, resource=EndpointSlice, label_selector="kubernetes.io/service-name=engines")
    tasks.spawn(watcher.run(), "kube-watch")
    await _synced_and_watching(watcher, fake)
    [only] = watcher.objects.values()
    assert only.endpoints[0].addresses == ["10.0.0.1"] and only.endpoints[0].targetRef.name == "e-1"
    assert only.ports[0].port == 8000 and fake.lists == {"endpointslices": 1}
    fake.set_endpoints("engines-a", [endpoint("10.0.0.1", ready=False, terminating=True), endpoint("10.0.0.2")])
    await wait_until_async(lambda: len(watcher.objects["engines-a"].endpoints) == 2)
    first = watcher.objects["engines-a"].endpoints[0].conditions
    assert first.ready is False and first.terminating is True
    seen = changes.count
    fake.add_endpointslice("batch-b", {"kubernetes.io/service-name": "batch"}, [])
    assert fake.bookmark() == 1  # a bookmark's object is only metadata.resourceVersion
    await wait_until_async(lambda: watcher.resource_version == fake.resource_version)
    fake.add_endpointslice("engines-b", engines, [endpoint("10.0.0.3")])
    fake.remove_endpointslice("engines-a")
    await wait_until_async(lambda: list(watcher.objects) == ["engines-b"])
    assert changes.count == seen + 2 and watcher.lists == 1 and watcher.last_error is None
    assert _watch_queries(fake, "endpointslices")[0]["labelSelector"] == "kubernetes.io/service-name=engines"


async def test_cancelling_run_ends_it_promptly_and_leaves_nothing_behind(fake, api) -> None:
    fake.add_pod("p1", POOL)
    for phase in ("watching", "backing off"):
        tasks = OwnedTasks()
        watcher = _watcher(api, Changes(), backoff_s=(30.0, 60.0))
        fake.outage = 500 if phase == "backing off" else None
        task = tasks.spawn(watcher.run(), "kube-watch")
        if phase == "watching":
            await _synced_and_watching(watcher, fake)
        else:
            await wait_until_async(lambda w=watcher: w.last_error is not None)  # now asleep for 30 s
        async with asyncio.timeout(2):
            await tasks.close()
        assert task.cancelled() and len(tasks) == 0, phase
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "kube-watch"]
        await wait_until_async(lambda: fake.open_watches == 0, message="the server saw the stream close")


async def test_a_resync_lists_again_and_the_watch_goes_on(fake, api, tasks) -> None:
    fake.add_pod("p1", POOL)
    changes = Changes()
    watcher = _watcher(api, changes, resync_s=0.3)
    tasks.spawn(watcher.run(), "kube-watch")
    await wait_until_async(lambda: watcher.lists >= 3, timeout=5, message="two resyncs")
    await wait_until_async(lambda: fake.open_watches == 1)
    fake.add_pod("p2", POOL)
    await wait_until_async(lambda: "p2" in watcher.objects)
    assert sorted(watcher.objects) == ["p1", "p2"] and watcher.last_error is None and changes.count >= 3


async def test_the_fake_watch_is_what_lightkube_reads(fake, api) -> None:
    """The test edge itself: lightkube's own watch() against the fake (initial ADDEDs, 410 as it raises it)."""
    fake.add_pod("p1", POOL)
    client = api()
    events: list[tuple[str, str]] = []
    async with contextlib.aclosing(client.watch(Pod, namespace="default", labels=POOL, server_timeout=5)) as stream:
        async for kind, pod in stream:
            events.append((kind, pod.metadata.name))
            if kind == "ADDED" and pod.metadata.name == "p1":
                fake.terminate_pod("p1")
            elif kind == "MODIFIED":
                break
    assert events == [("ADDED", "p1"), ("MODIFIED", "p1")]
    fake.compact()
    with pytest.raises(ApiError) as gone:
        async with contextlib.aclosing(client.watch(Pod, namespace="default", resource_version="1")) as stream:
            async for _ in stream:
                pass
    assert (gone.value.status.code, gone.value.status.reason) == (410, "Expired")
    assert gone.value.status.message == f"too old resource version: 1 ({fake.resource_version})"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"namespace": ""}, "namespace: required"),
        ({"watch_timeout_s": 0.5}, "watch_timeout_s must be at least 1"),
        ({"resync_s": -1}, "resync_s must not be negative"),
        ({"backoff_s": (2.0, 1.0)}, "backoff_s must be (first, longest) with 0 < first <= longest"),
    ],
)
def test_bad_parameters_are_refused_clearly(options, message) -> None:
    kw: dict[str, Any] = {"namespace": "default", "label_selector": "", "on_change": Changes()} | options

    def no_client() -> AsyncClient:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=re.escape(message)):
        KubeWatcher(no_client, Pod, **kw)
