"""One engine call at a time: sending a leg, reading its reply, and what a failed leg means.

A leg is one HTTP request to one engine (a prefill, a decode, a colocated generate, or a
continuation after a move). A leg that fails before anything reached the client is an
:class:`UpstreamFailed`: the exchange retries it elsewhere. :class:`Opened` holds what one
answer has in flight, so whoever opened it can release everything whatever happens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pdgate.adapters import MigrationError, UpstreamError, UpstreamReply
from pdgate.gateway.instance_state import InstanceState, Lease
from pdgate.gateway.requests import GatewayError
from pdgate.gateway.tracing import NO_LEG, LegTrace

T = TypeVar("T")


class UpstreamFailed(Exception):
    """A leg failed before anything reached the client: safe to retry elsewhere."""

    def __init__(self, instance_id: str, reason: str) -> None:
        super().__init__(f"{instance_id}: {reason}")
        self.instance_id = instance_id
        self.reason = reason


@dataclass(eq=False)
class Opened:
    """The legs of one answer in flight; :meth:`close` aborts what is unfinished and releases the leases."""

    decode: InstanceState
    upstream: UpstreamReply | None = None
    prefill_task: asyncio.Task[UpstreamFailed | None] | None = None
    leases: list[Lease] = field(default_factory=list)
    decode_lease: Lease | None = None
    leg: LegTrace = NO_LEG

    async def close(self) -> None:
        if self.prefill_task is not None and not self.prefill_task.done():
            self.prefill_task.cancel()
            await asyncio.gather(self.prefill_task, return_exceptions=True)
        if self.upstream is not None:
            self.upstream.close()  # unless read to its end, this aborts the request on the engine
        for lease in self.leases:
            lease.release()


async def send_leg(
    state: InstanceState, path: str, body: dict[str, Any], request_id: str, leg: LegTrace, timeout_s: float
) -> UpstreamReply:
    """Send one leg (with its trace context); a connection error or 5xx before any byte is an UpstreamFailed."""
    try:
        resp = await state.adapter.send(path, body, request_id, timeout_s=timeout_s, headers=leg.headers)
    except UpstreamError as exc:
        raise UpstreamFailed(state.spec.id, f"connection failed: {exc}") from None
    if resp.status >= 500:
        try:
            detail = (await resp.read())[:300].decode(errors="replace")
        except UpstreamError as exc:
            detail = str(exc)
        finally:
            resp.close()
        raise UpstreamFailed(state.spec.id, f"HTTP {resp.status}: {detail}")
    return resp


async def read_all(state: InstanceState, resp: UpstreamReply) -> bytes:
    """A leg's whole reply; a broken one is an UpstreamFailed (nothing reached the client yet)."""
    try:
        return await resp.read()
    except UpstreamError as exc:
        raise UpstreamFailed(state.spec.id, f"reply broke: {exc}") from None
    finally:
        resp.close()


def raced(awaitable: Awaitable[T], prefill_task: asyncio.Task[UpstreamFailed | None] | None) -> Awaitable[T]:
    """What to await for ``awaitable``: itself without a concurrent prefill leg (no extra coroutine
    on the way of every request), else :func:`racing_prefill`."""
    return awaitable if prefill_task is None else racing_prefill(awaitable, prefill_task)


async def racing_prefill(awaitable: Awaitable[T], prefill_task: asyncio.Task[UpstreamFailed | None] | None) -> T:
    """Await ``awaitable`` unless the concurrent prefill leg fails first (then raise its failure)."""
    if prefill_task is None:
        return await awaitable
    if prefill_task.done() and not prefill_task.cancelled() and (failed := prefill_task.result()) is not None:
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()  # a coroutine never awaited
        raise failed
    work = asyncio.ensure_future(awaitable)
    try:
        while True:
            pending: set[asyncio.Future[Any]] = {work} if prefill_task.done() else {work, prefill_task}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            failure = prefill_task.result()
            if failure is not None:
                raise failure
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed leg or move (spans, logs, metrics)."""
    if isinstance(exc, UpstreamFailed):
        return exc.reason
    if isinstance(exc, GatewayError):
        return exc.code or exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, MigrationError):
        return str(exc)
    return type(exc).__name__


def client_error(status: int, body: bytes) -> GatewayError:
    """An engine's 4xx, in OpenAI's error shape whatever shape the engine used."""
    message = body.decode(errors="replace")[:1000]
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            inner = data["error"] if isinstance(data.get("error"), dict) else data
            message = str(inner.get("message", message))
    except json.JSONDecodeError:
        pass
    return GatewayError(status, message)
