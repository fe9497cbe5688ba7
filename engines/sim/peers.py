"""The links one simulated engine reaches its peers through (the contract: :mod:`engines.sim.peer_link`).

:class:`HttpPeerLink` makes the exchanges over HTTP (the engine server's, on its client session);
:class:`LocalPeerLink` calls the peer engine's own logic in-process (``pdgate simulate``: every
engine on one loop, no sockets), answering as the HTTP path would, refusals and unreachable
peers included.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from pdgate.engines.sim.engine import KvPullError
from pdgate.engines.sim.handoff import take_held_kv, take_room_kv
from pdgate.engines.sim.migration_routes import release_answer, reserve_answer
from pdgate.engines.sim.peer_link import PeerError, PeerLink
from pdgate.engines.sim.protocol import ApiError, error_body
from pdgate.engines.sim.state import SimState

__all__ = ["HttpPeerLink", "LocalPeerLink", "PeerError", "PeerLink"]

KV_READ_TIMEOUT_S = 30.0  # wall seconds for a KV read over HTTP
BOOTSTRAP_SLACK_S = 30.0  # wall seconds a bootstrap long-poll may run past its own timeout
RESERVE_TIMEOUT_S = 5.0  # wall seconds the source waits for the target's reservation
RELEASE_TIMEOUT_S = 2.0  # wall seconds for the best-effort release of an unused reservation


class HttpPeerLink:
    """The exchanges over HTTP on the engine's client session (which its owner closes)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def read_kv(self, host: str, port: int, body: dict[str, Any]) -> dict[str, Any]:
        url = f"http://{host}:{port}/sim/kv/read"
        timeout = aiohttp.ClientTimeout(total=KV_READ_TIMEOUT_S)
        return await _fetch_kv(self.session.post(url, json=body, timeout=timeout), url)

    async def wait_bootstrap_room(self, host: str, port: int, room: Any, wait_s: float) -> dict[str, Any]:
        url = f"http://{host}:{port}/sim/bootstrap/{room}"
        timeout = aiohttp.ClientTimeout(total=wait_s + BOOTSTRAP_SLACK_S)
        return await _fetch_kv(self.session.get(url, params={"timeout_s": str(wait_s)}, timeout=timeout), url)

    async def reserve(self, host: str, port: int, body: dict[str, Any]) -> Any:
        url = f"http://{host}:{port}/sim/migrate/reserve"
        try:
            async with self.session.post(
                url, json=body, timeout=aiohttp.ClientTimeout(total=RESERVE_TIMEOUT_S)
            ) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientError as exc:
            raise PeerError(repr(exc)) from exc
        if status != 200:
            raise PeerError(f"HTTP {status}", status, text)
        return json.loads(text)

    async def release(self, host: str, port: int, reservation_id: str) -> None:
        url = f"http://{host}:{port}/sim/migrate/release"
        try:
            async with self.session.post(
                url, json={"reservation_id": reservation_id}, timeout=aiohttp.ClientTimeout(total=RELEASE_TIMEOUT_S)
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            pass


async def _fetch_kv(request: Any, url: str) -> dict[str, Any]:
    try:
        async with request as resp:
            if resp.status != 200:
                raise KvPullError(f"KV pull from {url} failed with HTTP {resp.status}: {(await resp.text())[:200]}")
            return await resp.json()
    except aiohttp.ClientError as exc:
        raise KvPullError(f"KV pull from the prefill peer failed: {exc!r}") from exc


class LocalPeerLink:
    """The exchanges in-process: ``find(host, port)`` gives the peer engine's state (None: nothing there).

    ``find`` must know each engine under the address its peers use: ``(config.host, bound_port)``
    for KV reads and reservations, and an SGLang prefill also under its bootstrap port. The peer's
    own logic answers (:func:`~engines.sim.handoff.take_held_kv`, :func:`~engines.sim.handoff.take_room_kv`,
    :func:`~engines.sim.migration_routes.reserve_answer`, :func:`~engines.sim.migration_routes.release_answer`);
    its refusals and a missing peer fail as they would over HTTP (:class:`KvPullError`,
    :class:`PeerError`), with the same messages but for the missing peer's.
    """

    def __init__(self, find: Callable[[str, int], SimState | None], hop_s: float = 0.0) -> None:
        self._find = find
        self.hop_s = hop_s  # what one exchange takes (the HTTP round trip it stands for)

    async def _hop(self) -> None:
        if self.hop_s > 0:
            await asyncio.sleep(self.hop_s)

    def _peer(self, host: Any, port: Any) -> SimState | None:
        try:
            return self._find(str(host), int(port))
        except (TypeError, ValueError):
            return None

    async def read_kv(self, host: str, port: int, body: dict[str, Any]) -> dict[str, Any]:
        await self._hop()
        peer = self._peer(host, port)
        if peer is None:
            raise KvPullError(f"KV pull from the prefill peer failed: {_unreachable(host, port)!r}")
        try:
            return take_held_kv(peer, body)
        except ApiError as err:
            raise _kv_refused(f"http://{host}:{port}/sim/kv/read", peer, err) from None

    async def wait_bootstrap_room(self, host: str, port: int, room: Any, wait_s: float) -> dict[str, Any]:
        await self._hop()
        peer = self._peer(host, port)
        if peer is None:
            raise KvPullError(f"KV pull from the prefill peer failed: {_unreachable(host, port)!r}")
        try:
            return await take_room_kv(peer, str(room), wait_s)
        except ApiError as err:
            raise _kv_refused(f"http://{host}:{port}/sim/bootstrap/{room}", peer, err) from None

    async def reserve(self, host: str, port: int, body: dict[str, Any]) -> Any:
        await self._hop()
        peer = self._peer(host, port)
        if peer is None:
            raise PeerError(repr(_unreachable(host, port)))
        try:
            return reserve_answer(peer, body)
        except ApiError as err:
            raise PeerError(f"HTTP {err.status}", err.status, _error_text(peer, err)) from None

    async def release(self, host: str, port: int, reservation_id: str) -> None:
        await self._hop()
        peer = self._peer(host, port)
        if peer is None:
            return
        try:
            release_answer(peer, {"reservation_id": reservation_id})
        except ApiError:
            pass


def _unreachable(host: Any, port: Any) -> ConnectionRefusedError:
    return ConnectionRefusedError(f"no engine serves {host}:{port}")


def _error_text(peer: SimState, err: ApiError) -> str:
    """The error body the peer's HTTP route would have answered."""
    return json.dumps(error_body(err, peer.config.api))


def _kv_refused(url: str, peer: SimState, err: ApiError) -> KvPullError:
    return KvPullError(f"KV pull from {url} failed with HTTP {err.status}: {_error_text(peer, err)[:200]}")
