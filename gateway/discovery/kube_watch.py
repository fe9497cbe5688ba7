"""Kubernetes list/watch: a local copy of the objects that match a label selector, kept current.

:class:`KubeWatcher` is a reflector in the sense of client-go's ``tools/cache/reflector.go``. It
lists the objects of one kind (a lightkube resource class: ``Pod``, ``EndpointSlice``) in one
namespace through a label selector, then watches from the list's ``resourceVersion``:

* ADDED and MODIFIED store the object, DELETED drops it, each followed by ``on_change()``; a
  BOOKMARK (asked for with ``allowWatchBookmarks``) only advances :attr:`~KubeWatcher.resource_version`;
* a stream that ends (the server's ``timeoutSeconds``, an API server restart) is watched again
  from the last resourceVersion, without a list;
* ``410 Gone``, as the response's status or, as the API server's watch cache sends it, as an
  ERROR event carrying a ``v1`` Status 410, means the events after that resourceVersion were
  compacted away: it lists again, and the list replaces :attr:`~KubeWatcher.objects` whole, so
  what was deleted meanwhile is gone from it too;
* any other failure (no connection, 401/403, a bad selector, 5xx, a bad kubeconfig raised by
  ``api``) is logged on ``pdgate.discovery`` once per distinct message, kept in
  :attr:`~KubeWatcher.last_error` and retried after an exponential backoff with jitter between
  ``backoff_s`` (first, longest): a watch from the last resourceVersion, or a list if none;
* ``resync_s > 0``: a full list every ``resync_s`` seconds (the watch then goes on from it), a
  guard against a missed event.

It does not use lightkube's ``watch()``: that cannot ask for bookmarks, its decoder fails on an
EndpointSlice bookmark (whose object has only ``metadata.resourceVersion``, not the fields the
model requires), and it re-watches internally where this class must count and bound each watch.
The requests are still lightkube's (its generic client's ``prepare_request``: URL, namespace,
authentication, TLS), and so are the decoders.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import httpx2
import msgspec
from lightkube import ApiError, AsyncClient
from lightkube.core import decoders
from lightkube.core.generic_client import BasicRequest, GenericAsyncClient
from lightkube.core.resource import NamespacedResource, api_info

log = logging.getLogger("pdgate.discovery")

R = TypeVar("R", bound=NamespacedResource)

GONE = 410
CONNECT_TIMEOUT_S = 10.0
READ_GRACE_S = 30.0  # a stream silent this long past its timeoutSeconds is a dead connection
SHORT_WATCH_S = 1.0  # a stream that ends sooner without an event: wait backoff_s[0] before the next
MAX_DOUBLINGS = 30


class _Meta(msgspec.Struct):
    resourceVersion: str | None = None


class _Partial(msgspec.Struct):
    """Only an object's resourceVersion (a bookmark's object has nothing else)."""

    metadata: _Meta = msgspec.field(default_factory=_Meta)


class _Expired(Exception):
    """410: the resourceVersion a watch started from was compacted away; list again."""


class _HttpFailure(Exception):
    """An HTTP error whose body is not a ``v1`` Status (a proxy's answer, say)."""


class KubeWatcher(Generic[R]):
    """The objects of ``resource`` in ``namespace`` matching ``label_selector``, kept current by list/watch.

    ``api`` returns the (cached) lightkube client, and may raise; ``label_selector`` is passed
    verbatim as ``labelSelector`` (``""``: everything); ``on_change`` is called, never awaited,
    after each list and each applied event (it must be cheap: set an event, say). ``rng`` draws the
    backoff's jitter. :meth:`run` lists and watches until cancelled.
    """

    def __init__(
        self,
        api: Callable[[], AsyncClient],
        resource: type[R],
        *,
        namespace: str,
        label_selector: str,
        on_change: Callable[[], None],
        watch_timeout_s: float = 240.0,
        resync_s: float = 0.0,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        rng: random.Random | None = None,
    ) -> None:
        if not namespace:
            raise ValueError("namespace: required")
        if watch_timeout_s < 1:
            raise ValueError(f"watch_timeout_s must be at least 1 (got {watch_timeout_s})")
        if resync_s < 0:
            raise ValueError(f"resync_s must not be negative (got {resync_s})")
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise ValueError(f"backoff_s must be (first, longest) with 0 < first <= longest (got {backoff_s})")
        self._api = api
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.resync_s = resync_s
        self.backoff_s = backoff_s
        self.objects: dict[str, R] = {}  # name -> latest object
        self.synced = False  # True after the first successful list
        self.resource_version: str | None = None  # the last one seen (list, event or bookmark)
        self.lists = 0
        self.watches = 0
        self.last_error: str | None = None  # the last failure; None once a list or watch succeeds
        self._rng = rng if rng is not None else random.Random()
        self._failures = 0  # in a row: the backoff's exponent
        self._expired = 0  # 410s in a row without an event in between
        self._logged: str | None = None
        self._listed_at: float | None = None  # loop time of the last list

    @property
    def kind(self) -> str:
        """The resource's plural (``pods``, ``endpointslices``), for logs."""
        return str(api_info(self.resource).plural)

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """List, then watch for ever; only cancellation ends it (no failure does)."""
        relist = True
        while True:
            step = "list" if relist or self.resource_version is None else "watch"
            try:
                if step == "list":
                    await self._list()
                    relist = False
                else:
                    relist = await self._watch()
            except _Expired as exc:
                relist = True
                self._expired += 1
                log.info("discovery: %s in %s: %s; listing again", self.kind, self.namespace, exc)
                if self._expired > 1:  # even a fresh list's resourceVersion is too old: do not spin
                    await asyncio.sleep(self._delay(self._expired - 1))
            except Exception as exc:  # cancellation is not an Exception: it ends run()
                self._failed(step, exc)
                await asyncio.sleep(self._delay(self._failures))

    async def _list(self) -> None:
        client = self._client()
        selector = {"labelSelector": self.label_selector or None}
        request = client.prepare_request("list", res=self.resource, namespace=self.namespace, params=selector)
        self.lists += 1
        response = await client.send(client.build_adapter_request(request))
        _raise_for_status(response)
        _, version, items = client.handle_response("list", response, request)
        if not version:
            raise ValueError("the list carries no metadata.resourceVersion")
        fresh = {name: obj for obj in items if (name := _meta(obj, "name"))}
        self.objects.clear()
        self.objects.update(fresh)
        self.resource_version = version
        self.synced = True
        self._listed_at = asyncio.get_running_loop().time()
        self._recovered("listed")
        self._changed()

    async def _watch(self) -> bool:
        """One watch request followed to its end; True when a resync's list is due."""
        loop = asyncio.get_running_loop()
        budget = None
        if self.resync_s > 0 and self._listed_at is not None:
            budget = self._listed_at + self.resync_s - loop.time()
            if budget <= 0:
                return True
        client = self._client()
        timeout_s = max(1, round(self.watch_timeout_s))
        params = {
            "labelSelector": self.label_selector or None,
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        request = client.prepare_request("list", res=self.resource, namespace=self.namespace, watch=True, params=params)
        request.timeout = httpx2.Timeout(CONNECT_TIMEOUT_S, read=timeout_s + READ_GRACE_S)
        self.watches += 1
        started = loop.time()
        scope = asyncio.timeout(budget)
        try:
            async with scope:
                events = await self._stream(client, request)
        except TimeoutError:
            if scope.expired():
                return True
            raise
        self._expired = 0
        if events == 0 and loop.time() - started < SHORT_WATCH_S:
            await asyncio.sleep(self.backoff_s[0])  # a server that ends every watch at once is not hammered
        return False

    async def _stream(self, client: GenericAsyncClient, request: BasicRequest) -> int:
        """The events of one watch stream applied; how many changed :attr:`objects`."""
        response = await client.send(client.build_adapter_request(request), stream=True)
        try:
            if response.is_error:
                await response.aread()
                _raise_for_status(response)
            self._recovered("watched")
            applied = 0
            async for line in response.aiter_lines():
                if line.strip():
                    applied += self._apply(line)
            return applied
        finally:
            await response.aclose()

    def _apply(self, line: str) -> int:
        event = decoders.decode_watch_event(line.encode())
        if event.type == "ERROR":
            status = decoders.decode_status(event.object)
            if status.code == GONE:
                raise _Expired(f"410 {status.reason}: {status.message}")
            raise ApiError(status=status)
        if event.type == "BOOKMARK":
            version = msgspec.json.decode(event.object, type=_Partial).metadata.resourceVersion
            if version:
                self.resource_version = version
            return 0
        if event.type not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f"unknown watch event type {event.type!r}")
        obj = decoders.decode_object(event.object, self.resource)
        name = _meta(obj, "name")
        if not name:
            raise ValueError(f"a {event.type} event's object has no metadata.name")
        if event.type == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self.resource_version = _meta(obj, "resourceVersion") or self.resource_version
        self._expired = 0
        self._changed()
        return 1

    # ------------------------------------------------------------- helpers
    def _client(self) -> GenericAsyncClient:
        # lightkube's generic client: its prepare_request takes the parameters watch() lacks
        return self._api()._client

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:
            log.exception("discovery: the change callback of %s in %s failed", self.kind, self.namespace)

    def _failed(self, step: str, exc: Exception) -> None:
        self._failures += 1
        line = f"cannot {step} {self.kind} in {self.namespace} (labelSelector {self.label_selector!r}): {why(exc)}"
        self.last_error = line
        if line != self._logged:
            log.warning("discovery: %s", line)
            self._logged = line

    def _recovered(self, done: str) -> None:
        self._failures = 0
        if self.last_error is not None:
            log.warning("discovery: %s %s in %s again", done, self.kind, self.namespace)
        self.last_error = None
        self._logged = None

    def _delay(self, failures: int) -> float:
        """The backoff after ``failures`` in a row: doubling from the first delay, at most the longest."""
        first, longest = self.backoff_s
        base = min(longest, first * 2.0 ** min(max(failures - 1, 0), MAX_DOUBLINGS))
        return min(longest, base * (1.0 + 0.25 * self._rng.random()))


def _raise_for_status(response: httpx2.Response) -> None:
    """An error response (its body read) as an ApiError, :class:`_Expired` for 410, or an HTTP failure."""
    if not response.is_error:
        return
    try:
        status = decoders.decode_status(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        status = None
    message = status.message if status is not None and status.message else response.reason_phrase
    if response.status_code == GONE:
        raise _Expired(f"410 {status.reason if status is not None else 'Gone'}: {message}")
    if status is not None and status.code:
        raise ApiError(status=status)
    raise _HttpFailure(f"{response.status_code} {response.reason_phrase}")


def _meta(obj: Any, field: str) -> str | None:
    metadata = getattr(obj, "metadata", None)
    value = getattr(metadata, field, None) if metadata is not None else None
    return str(value) if value else None


def why(exc: BaseException) -> str:
    """A failure as a line: an API error as ``403 Forbidden: message``; others by type and text."""
    if isinstance(exc, ApiError):
        status = exc.status
        return f"{status.code} {status.reason}: {status.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["KubeWatcher", "why"]
