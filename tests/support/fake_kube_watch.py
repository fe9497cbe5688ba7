"""The fake API server's watch: an event history (etcd's, in small) and the streams that follow it.

Every change to a watchable object is recorded once, at its new ``resourceVersion``, as what
happened to the object (``ADDED``, ``MODIFIED``, ``DELETED``) with its state before and after.
A watch (``GET <list path>?watch=true``) streams newline-delimited ``{"type", "object"}`` events
as the real API server's watch cache does (``staging/src/k8s.io/apiserver/pkg/storage/cacher``):

* from ``resourceVersion=N`` it sends every recorded change after ``N`` and then new ones as they
  happen; without ``resourceVersion`` (or ``0``) it first sends the current objects as ``ADDED``;
* each watch sees changes through its label selector: an object that stops matching is a
  ``DELETED`` (its previous state, at the change's ``resourceVersion``) and one that starts
  matching an ``ADDED``;
* ``N`` older than the compacted history: HTTP 200 and one ``ERROR`` event whose object is a
  ``v1`` Status ``410 Expired`` "too old resource version: N (oldest)", then the end of the stream
  (the watch cache answers this way: errors after authorization fail as a watch event, not as the
  response's status); ``expired_as_http`` answers an HTTP 410 Status instead, as some servers do;
* ``allowWatchBookmarks=true``: :meth:`WatchHub.bookmark` sends a ``BOOKMARK`` whose object holds
  only ``kind``, ``apiVersion`` and ``metadata.resourceVersion``;
* the stream ends after ``timeoutSeconds`` (default one hour), at :meth:`WatchHub.end_all` (as an
  API server restart would), or when the client goes away.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from support.kube_api import ApiFailure, Selector, matches, status_body

DEFAULT_TIMEOUT_S = 3600.0
POLL_S = 0.2  # how often an idle stream checks that its client is still there


@dataclass
class Change:
    """One recorded change: ``obj`` after it (DELETED: its last state), ``prev`` before it (None: created)."""

    rv: int
    plural: str
    namespace: str
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None


@dataclass(eq=False)
class _Stream:
    plural: str
    namespace: str
    selector: Selector
    bookmarks: bool
    kind: str
    api_version: str
    queue: asyncio.Queue[Change | int | None] = field(default_factory=asyncio.Queue)  # a bookmark's RV; None: end


class WatchHub:
    """The history of changes and the open watch streams of one fake API server."""

    def __init__(self) -> None:
        self.history: list[Change] = []
        self.floor = 0  # a watch from a resourceVersion below this one gets 410 (compacted away)
        self.expired_as_http = False
        self.closed = False
        self._last: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> last recorded state
        self._streams: set[_Stream] = set()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def record(self, plural: str, type_: str, obj: dict[str, Any]) -> None:
        """Record that ``obj`` (a full view, ``metadata.resourceVersion`` already the new one) was ADDED/MODIFIED/DELETED."""
        meta = obj["metadata"]
        key = (plural, meta["namespace"], meta["name"])
        prev = self._last.pop(key, None) if type_ == "DELETED" else self._last.get(key)
        if type_ != "DELETED":
            self._last[key] = copy.deepcopy(obj)
        change = Change(int(meta["resourceVersion"]), plural, meta["namespace"], type_, copy.deepcopy(obj), prev)
        self.history.append(change)
        for stream in self._streams:
            if (stream.plural, stream.namespace) == (plural, change.namespace):
                stream.queue.put_nowait(change)

    def compact(self, rv: int) -> None:
        """Forget the history up to ``rv``: a watch from an older resourceVersion gets 410."""
        self.floor = rv
        self.history.clear()

    def bookmark(self, rv: int) -> int:
        """A BOOKMARK at ``rv`` to every stream that asked for bookmarks; how many got one."""
        asked = [s for s in self._streams if s.bookmarks]
        for stream in asked:
            stream.queue.put_nowait(rv)
        return len(asked)

    def end_all(self) -> int:
        """End every open stream (cleanly, as at an API server's restart); how many there were."""
        for stream in self._streams:
            stream.queue.put_nowait(None)
        return len(self._streams)

    def close(self) -> None:
        self.closed = True
        self.end_all()

    async def serve(
        self,
        request: web.Request,
        *,
        plural: str,
        kind: str,
        api_version: str,
        selector: Selector,
        current: Callable[[], list[dict[str, Any]]],
    ) -> web.StreamResponse:
        """Answer one watch request (query already authorized; ``current``: the objects now, full views)."""
        namespace = request.match_info["ns"]
        rv = _resource_version(request.query.get("resourceVersion", ""))
        timeout_s = _timeout(request.query.get("timeoutSeconds", ""))
        bookmarks = request.query.get("allowWatchBookmarks", "") in ("true", "1")
        expired = rv is not None and rv < self.floor
        too_old = f"too old resource version: {rv} ({self.floor})"
        if expired and self.expired_as_http:
            raise ApiFailure(410, "Expired", too_old)
        stream = _Stream(plural, namespace, selector, bookmarks, kind, api_version)
        if not expired and not self.closed:  # registered before the first await: no change is missed or repeated
            if rv is None:
                for obj in current():
                    stream.queue.put_nowait(Change(0, plural, namespace, "ADDED", obj, None))
            else:
                for change in self.history:
                    if change.rv > rv and (change.plural, change.namespace) == (plural, namespace):
                        stream.queue.put_nowait(change)
            self._streams.add(stream)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(request)
            if expired:
                await _send(response, {"type": "ERROR", "object": status_body(410, "Expired", too_old)})
            elif not self.closed:
                await self._follow(request, response, stream, timeout_s)
            await response.write_eof()
        except ConnectionError:  # the client went away
            pass
        finally:
            self._streams.discard(stream)
        return response

    async def _follow(
        self, request: web.Request, response: web.StreamResponse, stream: _Stream, timeout_s: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(stream.queue.get(), min(remaining, POLL_S))
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return
                continue
            if item is None:
                return
            if isinstance(item, int):
                bookmark = {
                    "kind": stream.kind,
                    "apiVersion": stream.api_version,
                    "metadata": {"resourceVersion": str(item)},
                }
                await _send(response, {"type": "BOOKMARK", "object": bookmark})
            elif (event := _seen_as(stream.selector, item)) is not None:
                await _send(response, event)


def _seen_as(selector: Selector, change: Change) -> dict[str, Any] | None:
    """The event a watch with this selector gets for a change, if any (the watch cache's rule)."""
    now = change.type != "DELETED" and matches(selector, change.obj)
    before = change.prev is not None and matches(selector, change.prev)
    if now:
        return {"type": "MODIFIED" if before else "ADDED", "object": change.obj}
    if not before:
        return None
    assert change.prev is not None
    gone = copy.deepcopy(change.obj if change.type == "DELETED" else change.prev)
    gone["metadata"]["resourceVersion"] = str(change.rv)
    return {"type": "DELETED", "object": gone}


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(json.dumps(event).encode() + b"\n")


def _resource_version(text: str) -> int | None:
    if text in ("", "0"):
        return None  # "any": the current objects first, then what changes
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiFailure(400, "BadRequest", f"invalid resource version: {text!r}")
    return value


def _timeout(text: str) -> float:
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiFailure(400, "BadRequest", f"timeoutSeconds: invalid value {text!r}")
    return float(value) if value else DEFAULT_TIMEOUT_S
