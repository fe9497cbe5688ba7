"""Runs an :class:`~engines.sim.core.EngineCore` in (scaled) real time on an asyncio loop.

The engine owns one background task, the step loop, plus one task per in-flight KV pull; all
are cancelled and awaited by :meth:`AsyncSimEngine.close`. Requests are submitted with
:meth:`AsyncSimEngine.submit` and their outputs read from the returned :class:`RequestStream`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pdgate.common.kv_events import KvCacheEvent
from pdgate.engines.sim.core import EngineCore, RequestOutput, ScheduledStep
from pdgate.engines.sim.request import RequestStatus, SimRequest

SLEEP_SPLIT_S = 0.001


class Clock(Protocol):
    """Simulated time. ``now`` is in simulated seconds."""

    def now(self) -> float: ...

    async def sleep_until(self, t: float) -> None: ...

    def to_wall(self, sim_seconds: float) -> float: ...


class RealtimeClock:
    """Simulated time running ``time_scale`` times faster than the wall clock."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = time_scale
        self._origin = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._origin) * self.time_scale

    async def sleep_until(self, t: float) -> None:
        """Wake as close to ``t`` as the loop allows.

        libuv computes a timer's wait from the loop time cached when the timer was armed, so work
        done after arming (writing the previous step's tokens) makes it fire late; sleeping to
        1 ms before ``t`` and then the remainder, computed afresh, absorbs that.
        """
        delay = (t - self.now()) / self.time_scale
        if delay > SLEEP_SPLIT_S:
            await asyncio.sleep(delay - SLEEP_SPLIT_S)
            delay = (t - self.now()) / self.time_scale
        await asyncio.sleep(max(0.0, delay))

    def to_wall(self, sim_seconds: float) -> float:
        return sim_seconds / self.time_scale


class LoopClock:
    """Simulated time is the running event loop's time (``loop.time()``), one second per second.

    On a virtual-time loop (:mod:`pdgate.common.virtual_time`) an engine on this clock takes no
    wall time and, for deterministic callers, runs deterministically; every engine and the
    gateway on that loop share one timeline. ``to_wall`` is the identity: the loop's timeouts
    are already in its own time.
    """

    time_scale = 1.0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))

    def to_wall(self, sim_seconds: float) -> float:
        return sim_seconds


class EngineObserver(Protocol):
    """Receives what the step loop did (metrics)."""

    def on_step(self, step: ScheduledStep, outputs: list[RequestOutput], now: float) -> None: ...

    def on_finished(self, request: SimRequest, now: float) -> None: ...


class KvPullError(Exception):
    """The decode leg could not obtain the prompt's KV from its prefill peer."""


KvPuller = Callable[[SimRequest], Awaitable[None]]
LATE_STEP_THRESHOLD = 0.001  # wall seconds: tokens delivered later than this after their step's end are "late"
MAX_CATCHUP_WALL_S = 0.02  # wake-ups up to this late are absorbed; beyond it simulated time is lost


@dataclass(eq=False)
class RequestStream:
    """Outputs of one request, in order; the last one has a ``finish_reason``.

    With a ``stream_interval`` of N > 1 (vLLM's ``--stream-interval``) the tokens of several
    steps go out together: the first token at once, then whenever N are waiting, and the rest
    with the finish."""

    request: SimRequest
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    stream_interval: int = 1
    pending: list[int] = field(default_factory=list)  # tokens not sent yet (stream_interval > 1)
    sent_any: bool = False

    def put(self, output: RequestOutput) -> None:
        """One step's output, sent now or held back as ``stream_interval`` says."""
        if self.stream_interval <= 1:
            self.queue.put_nowait(output)
            return
        self.pending.extend(output.new_token_ids)
        if output.finished or not self.sent_any or len(self.pending) >= self.stream_interval:
            self.queue.put_nowait(RequestOutput(output.request, self.pending, output.finish_reason))
            self.pending = []
            self.sent_any = True

    def flush(self) -> None:
        """Send the tokens held back (before an end that carries none: a migration's)."""
        if self.pending:
            self.queue.put_nowait(RequestOutput(self.request, self.pending))
            self.pending = []

    async def __aiter__(self):
        while True:
            output = await self.queue.get()
            yield output
            if output.finished:
                return


class AsyncSimEngine:
    """Drives the step loop: schedule, sleep for the step's modelled time, commit, deliver."""

    def __init__(
        self,
        core: EngineCore,
        clock: Clock,
        *,
        kv_puller: KvPuller | None = None,
        kv_load_failure_policy: str = "fail",
        observer: EngineObserver | None = None,
        stream_interval: int = 1,
        publish_events: Callable[[float, list[KvCacheEvent]], None] | None = None,
    ) -> None:
        self.core = core
        self.clock = clock
        self._kv_puller = kv_puller
        self._failure_policy = kv_load_failure_policy
        self._observer = observer
        self.stream_interval = stream_interval
        self._publish = publish_events
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._pending_events: list[KvCacheEvent] = []
        core.kv.event_sink = self._pending_events.extend
        self.steps = 0
        self.busy_seconds = 0.0
        self.lag_total = 0.0  # simulated seconds lost because the host could not keep up
        self.lag_max = 0.0
        self.late_steps = 0  # steps whose tokens went out more than LATE_STEP_THRESHOLD late
        self.jitter_max = 0.0  # the latest delivery of a step's tokens, simulated seconds

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="sim-engine-step-loop")

    async def close(self) -> None:
        tasks = list(self._pulls.values())
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pulls.clear()
        self._loop_task = None

    # --------------------------------------------------------------- requests
    def submit(self, request: SimRequest) -> RequestStream:
        self.core.add_request(request)
        stream = RequestStream(request, stream_interval=self.stream_interval)
        self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """Stop a request (client disconnected, stop string matched); frees its KV blocks."""
        pull = self._pulls.pop(request_id, None)
        if pull is not None:
            pull.cancel()
        now = self.clock.now()
        req = self.core.abort(request_id, now, status)
        stream = self._streams.pop(request_id, None)
        if req is not None:
            if self._observer is not None:
                self._observer.on_finished(req, now)
            if stream is not None:
                stream.queue.put_nowait(RequestOutput(req, [], status.value))
        self.flush_events(now)
        self._wake.set()

    def pause(self, request_id: str) -> SimRequest | None:
        """Stop scheduling a decoding request (live migration); see :meth:`EngineCore.pause`."""
        req = self.core.pause(request_id)
        self._wake.set()
        return req

    def finish_migrated(self, request_id: str, hold_key: str) -> SimRequest | None:
        """End a paused request as migrated: its stream gets a ``"migrated"`` end, its KV is held."""
        now = self.clock.now()
        req = self.core.finish_migrated(request_id, hold_key, now)
        if req is not None:
            stream = self._streams.pop(request_id, None)
            if self._observer is not None:
                self._observer.on_finished(req, now)
            if stream is not None:
                stream.flush()  # every token produced here goes out before the stream ends
                stream.queue.put_nowait(RequestOutput(req, [], RequestStatus.FINISHED_MIGRATED.value))
        self.flush_events(now)
        self._wake.set()  # the idle wait re-reads the next hold expiry
        return req

    def wake(self) -> None:
        """Make the step loop look at the queues again (blocks were freed outside a step)."""
        self._wake.set()

    def set_event_publisher(self, publish: Callable[[float, list[KvCacheEvent]], None]) -> None:
        self._publish = publish

    @property
    def num_active_pulls(self) -> int:
        return len(self._pulls)

    # -------------------------------------------------------------- step loop
    async def _run(self) -> None:
        core, clock = self.core, self.clock
        cursor: float | None = None  # planned end of the previous step while the engine stays busy
        while True:
            if not core.has_unfinished():
                cursor = None
                await self._idle_wait()
                continue
            now = clock.now()
            if cursor is not None:
                behind = now - cursor
                if behind <= MAX_CATCHUP_WALL_S * self.clock_scale:
                    now = cursor  # a timer fired a little late: keep the modelled timeline exact
                else:
                    self._account_lag(behind)  # the host could not keep up: simulated time was lost
            step = core.schedule(now)
            for req in step.kv_pulls:
                self._start_pull(req)
            if step.empty:
                cursor = None
                await self._idle_wait()
                continue
            duration = core.step_time(step)
            planned = now + duration
            await clock.sleep_until(planned)
            await asyncio.sleep(0)  # let handlers run even when steps take no wall time
            self._account_step(duration, clock.now() - planned)
            outputs = core.update(step, planned)
            cursor = planned
            if self._observer is not None:
                self._observer.on_step(step, outputs, planned)
            self._deliver(outputs, planned)
            self.flush_events(planned)

    def _account_step(self, duration: float, late: float) -> None:
        """Step statistics; ``late`` is how much after its modelled end a step's tokens went out."""
        self.steps += 1
        self.busy_seconds += duration
        self.jitter_max = max(self.jitter_max, late)
        if late > LATE_STEP_THRESHOLD * self.clock_scale:
            self.late_steps += 1

    def _account_lag(self, behind: float) -> None:
        """Simulated time lost because the host CPU fell behind (a distorted run)."""
        self.lag_total += behind
        self.lag_max = max(self.lag_max, behind)

    @property
    def clock_scale(self) -> float:
        return getattr(self.clock, "time_scale", 1.0)

    async def _idle_wait(self) -> None:
        self._wake.clear()
        expiry = self.core.next_hold_expiry()
        timeout = None if expiry is None else max(0.0, self.clock.to_wall(expiry - self.clock.now()))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        if expiry is not None:
            self.core.expire_held(self.clock.now())
            self.flush_events(self.clock.now())

    def _deliver(self, outputs: list[RequestOutput], now: float) -> None:
        for output in outputs:
            rid = output.request.request_id
            stream = self._streams.get(rid)
            if output.finished:
                self._streams.pop(rid, None)
                if self._observer is not None:
                    self._observer.on_finished(output.request, now)
            if stream is not None:
                stream.put(output)

    def flush_events(self, now: float) -> None:
        """Publish KV events collected since the last flush (no-op without a publisher)."""
        if self._pending_events:
            events = list(self._pending_events)
            self._pending_events.clear()
            if self._publish is not None:
                self._publish(now, events)

    # ---------------------------------------------------------------- KV pulls
    def _start_pull(self, req: SimRequest) -> None:
        task = asyncio.create_task(self._pull(req), name=f"kv-pull-{req.request_id}")
        self._pulls[req.request_id] = task

    async def _pull(self, req: SimRequest) -> None:
        ok = False
        error = "no KV transfer path is configured on this engine"
        try:
            if self._kv_puller is not None:
                await self._kv_puller(req)
                ok = True
        except KvPullError as exc:
            error = str(exc)
        except (TimeoutError, OSError) as exc:
            error = f"KV transfer failed: {exc!r}"
        finally:
            self._pulls.pop(req.request_id, None)
        now = self.clock.now()
        if ok or self._failure_policy == "recompute":
            self.core.finish_remote_kv(req.request_id, ok, now)
        else:
            failed = self.core.fail_request(req.request_id, error, now)
            stream = self._streams.pop(req.request_id, None)
            if failed is not None:
                if self._observer is not None:
                    self._observer.on_finished(failed, now)
                if stream is not None:
                    stream.queue.put_nowait(RequestOutput(failed, [], RequestStatus.FINISHED_ERROR.value))
        self.flush_events(now)
        self._wake.set()
