"""The chaos soak's faults (``benchmarks/soak.py``): a fault-injecting TCP proxy that stands in
front of each engine's ports, a seeded schedule of faults, and the injector that carries the
schedule out against the running fleet and logs every fault with its start and end.

Not a benchmark itself. Linux only (signals, ``SO_LINGER``).
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

CHUNK = 65536
ACTIVE_S = 0.5  # a connection that carried bytes towards the client this recently is "mid-stream"
REBIND_TRIES = 40


# ------------------------------------------------------------------------------ the proxy
@dataclass(eq=False)
class _Pipe:
    """One proxied connection: the client's side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    bytes_down: int = 0  # upstream -> client
    last_down: float = 0.0
    streaming: bool = False  # the response now on its way is a server-sent event stream

    def saw_down(self, data: bytes, now: float) -> None:
        """Note ``data`` on its way to the client (a response head says whether it streams)."""
        if data.startswith(b"HTTP/"):
            self.streaming = b"text/event-stream" in data[:2048]
        self.bytes_down += len(data)
        self.last_down = now

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with a TCP RST (``SO_LINGER`` 0), as a crashed peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy on a fixed local port in front of one upstream port, which faults on demand.

    * :meth:`reset_one` / :meth:`reset_all`: RST a live connection (one mid-stream if any), or all;
      both the client and the upstream side see the reset.
    * :meth:`pause` / :meth:`resume`: a blackhole: nothing is forwarded either way (bytes already
      read are held and delivered on resume; the rest waits in the kernel), new connections wait.
    * :meth:`down` / :meth:`up`: stop listening (clients get "connection refused") and reset every
      connection, as when the process behind dies; listen again, optionally at a new upstream port.

    Counters: ``accepted``, ``resets`` (connections reset by a fault).
    """

    def __init__(self, name: str, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.accepted = 0
        self.resets = 0
        self._pipes: set[_Pipe] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle
    async def start(self) -> FaultProxy:
        """Listen on ``listen_port`` (0: a free one, kept from then on)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.listen_port, reuse_address=True)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and end every connection (no RST: an orderly end of the run)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._flowing.set()
        for pipe in list(self._pipes):
            for writer in pipe.writers():
                writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def down(self) -> int:
        """Stop listening and reset every connection; returns how many were reset."""
        if self._server is not None:
            self._server.close()
            self._server = None
        return self.reset_all()

    async def up(self, target_port: int | None = None) -> None:
        """Listen again on the same port (retried while the port is still taken), at ``target_port``."""
        if target_port is not None:
            self.target_port = target_port
        if self._server is not None:
            return
        for _ in range(REBIND_TRIES):
            try:
                await self.start()
                return
            except OSError:
                await asyncio.sleep(0.25)
        raise RuntimeError(f"proxy {self.name}: port {self.listen_port} stayed taken")

    # ---- faults
    def live(self) -> list[_Pipe]:
        return [p for p in self._pipes if not p.client.is_closing()]

    def mid_stream(self, now: float | None = None) -> list[_Pipe]:
        """Connections relaying an event stream that moved within the last ``ACTIVE_S`` seconds."""
        now = time.monotonic() if now is None else now
        return [p for p in self.live() if p.streaming and now - p.last_down <= ACTIVE_S]

    def reset_one(self, rng: random.Random) -> bool:
        """RST one connection, mid-stream if one is; False when there is none."""
        candidates = sorted(self.mid_stream(), key=id) or sorted(self.live(), key=id)
        if not candidates:
            return False
        self._reset(rng.choice(candidates))
        return True

    def reset_all(self) -> int:
        pipes = self.live()
        for pipe in pipes:
            self._reset(pipe)
        return len(pipes)

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def _reset(self, pipe: _Pipe) -> None:
        self.resets += 1
        for writer in pipe.writers():
            abort_with_reset(writer)
        self._pipes.discard(pipe)

    # ---- forwarding
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
            except OSError:
                abort_with_reset(writer)  # nothing behind: the client sees its connection reset
                return
            pipe.upstream = up_writer
            down = asyncio.ensure_future(self._pump(up_reader, writer, pipe))
            try:
                await self._pump(reader, up_writer, None)
                await down
            finally:
                down.cancel()
        except asyncio.CancelledError:
            pass  # the event loop is closing (the run ends or was interrupted): the connection just ends
        finally:
            self._pipes.discard(pipe)
            self._tasks.discard(task)  # type: ignore[arg-type]
            for w in pipe.writers():
                if not w.is_closing():
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: _Pipe | None) -> None:
        """Copy ``reader`` to ``writer`` until EOF or an error; ``pipe``: count bytes towards the client."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                if pipe is not None:
                    pipe.saw_down(data, time.monotonic())
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except (ConnectionError, OSError):
            if not writer.is_closing():
                abort_with_reset(writer)  # pass a reset on as a reset


# ------------------------------------------------------------------------------ the schedule
KINDS = (
    "engine_kill",  # SIGKILL an engine, then start it again behind the same address
    "engine_stop",  # SIGSTOP an engine for a few seconds, then SIGCONT
    "conn_reset",  # RST engine connections in the proxy (one mid-stream, or all of an engine's streaming now)
    "engine_stall",  # blackhole an engine's proxy for a few seconds
    "kv_stall",  # hold an engine's KV-event stream (its proxy paused) for a few seconds
    "drain",  # POST /admin/instances/{id}/drain on a replica, then undrain
    "replica_kill",  # SIGKILL a gateway replica, then start it again on its port
    "nats_kill",  # SIGKILL the NATS server, then start it again (same port and store)
)
WEIGHTS = {
    "engine_kill": 2,
    "engine_stop": 2,
    "conn_reset": 3,
    "engine_stall": 1,
    "kv_stall": 1,
    "drain": 2,
    "replica_kill": 1,
    "nats_kill": 1,
}
HOLD_S = {  # (shortest, longest) seconds a fault lasts before it is undone
    "engine_kill": (0.5, 2.0),
    "engine_stop": (2.0, 6.0),
    "conn_reset": (0.0, 0.0),
    "engine_stall": (2.0, 5.0),
    "kv_stall": (3.0, 8.0),
    "drain": (2.0, 6.0),
    "replica_kill": (0.5, 2.0),
    "nats_kill": (2.0, 5.0),
}


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the schedule: what, against which engine or replica, held how long, and the
    pause before it (all seconds)."""

    kind: str
    target: int
    hold_s: float
    gap_s: float
    every: bool = False  # conn_reset: every connection of the engine, not one


def plan_faults(
    seed: int, count: int, kinds: Sequence[str], engines: int, replicas: int, gap_s: tuple[float, float]
) -> list[PlannedFault]:
    """The first ``count`` faults of the seeded schedule (the same for the same arguments)."""
    rng = random.Random(f"soak-faults-{seed}")
    weights = [WEIGHTS[k] for k in kinds]
    out = []
    for _ in range(count):
        kind = rng.choices(list(kinds), weights)[0]
        lo, hi = HOLD_S[kind]
        target = (
            rng.randrange(replicas) if kind == "replica_kill" else 0 if kind == "nats_kill" else rng.randrange(engines)
        )
        out.append(
            PlannedFault(
                kind,
                target,
                round(rng.uniform(lo, hi), 3),
                round(rng.uniform(*gap_s), 3),
                every=kind == "conn_reset" and rng.random() < 0.3,
            )
        )
    return out


@dataclass
class Fault:
    """A fault as it happened: wall times (``time.monotonic``) of its start and end, what it hit."""

    kind: str
    target: str
    start: float
    end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def overlaps(self, start: float, end: float) -> bool:
        return self.start <= end and (self.end if self.end is not None else float("inf")) >= start


class FleetControl(Protocol):
    """What the injector needs of the fleet (``soak.py``'s Fleet)."""

    def engine_names(self) -> list[str]: ...

    def replica_names(self) -> list[str]: ...

    def engine_proxy(self, i: int) -> FaultProxy: ...

    def kv_proxies(self, i: int) -> list[FaultProxy]: ...

    async def kill_engine(self, i: int) -> None: ...

    async def restart_engine(self, i: int) -> None: ...

    def signal_engine(self, i: int, sig: int) -> None: ...

    async def admin(self, replica: int, path: str) -> int: ...

    async def kill_replica(self, j: int) -> None: ...

    async def restart_replica(self, j: int) -> None: ...

    async def kill_nats(self) -> None: ...

    async def restart_nats(self) -> None: ...


class Injector:
    """Carries out a fault schedule, one fault at a time (never two engines down at once), until
    :meth:`stop`; every fault is undone before the next and logged in :attr:`faults`."""

    def __init__(
        self,
        fleet: FleetControl,
        schedule: Sequence[PlannedFault],
        seed: int,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = print,
    ) -> None:
        self.fleet = fleet
        self.schedule = schedule
        self.rng = random.Random(f"soak-injector-{seed}")
        self.clock = clock
        self.log = log
        self.faults: list[Fault] = []
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """No new fault after the one in progress (which is still undone)."""
        self._stopping.set()

    async def run(self) -> list[Fault]:
        for planned in self.schedule:
            try:
                await asyncio.wait_for(self._stopping.wait(), planned.gap_s)
                break
            except TimeoutError:
                pass
            fault = Fault(planned.kind, self._target_name(planned), self.clock())
            self.faults.append(fault)
            try:
                await self._apply(planned, fault)
            except Exception as exc:  # a fault that could not be carried out is logged, not fatal
                fault.detail["failed"] = f"{type(exc).__name__}: {exc}"
            fault.end = self.clock()
            self.log(
                f"  fault {len(self.faults)}: {fault.kind} {fault.target} {fault.end - fault.start:.1f} s {fault.detail}"
            )
        return self.faults

    def _target_name(self, planned: PlannedFault) -> str:
        if planned.kind == "replica_kill":
            return self.fleet.replica_names()[planned.target]
        if planned.kind == "nats_kill":
            return "nats"
        return self.fleet.engine_names()[planned.target]

    async def _apply(self, p: PlannedFault, fault: Fault) -> None:
        fleet, i = self.fleet, p.target
        if p.kind == "engine_kill":
            await fleet.kill_engine(i)
            await asyncio.sleep(p.hold_s)
            await fleet.restart_engine(i)
        elif p.kind == "engine_stop":
            fleet.signal_engine(i, signal.SIGSTOP)
            try:
                await asyncio.sleep(p.hold_s)
            finally:
                fleet.signal_engine(i, signal.SIGCONT)
        elif p.kind == "conn_reset":
            i = self._streaming_engine(i)
            fault.target = fleet.engine_names()[i]
            proxy = fleet.engine_proxy(i)
            fault.detail["mid_stream"] = len(proxy.mid_stream())
            fault.detail["reset"] = proxy.reset_all() if p.every else int(proxy.reset_one(self.rng))
        elif p.kind == "engine_stall":
            await self._paused([fleet.engine_proxy(i)], p.hold_s)
        elif p.kind == "kv_stall":
            await self._paused(fleet.kv_proxies(i), p.hold_s)
        elif p.kind == "drain":
            name = fleet.engine_names()[i]
            replica = self.rng.randrange(len(fleet.replica_names()))
            fault.detail["drain"] = await fleet.admin(replica, f"/admin/instances/{name}/drain")
            try:
                await asyncio.sleep(p.hold_s)
            finally:
                fault.detail["undrain"] = await fleet.admin(replica, f"/admin/instances/{name}/undrain")
        elif p.kind == "replica_kill":
            await fleet.kill_replica(i)
            await asyncio.sleep(p.hold_s)
            await fleet.restart_replica(i)
        elif p.kind == "nats_kill":
            await fleet.kill_nats()
            await asyncio.sleep(p.hold_s)
            await fleet.restart_nats()
        else:
            raise ValueError(f"unknown fault kind {p.kind!r}")

    def _streaming_engine(self, planned: int) -> int:
        """``planned``, or when no stream runs through it, an engine (drawn) through which one does."""
        count = len(self.fleet.engine_names())
        if self.fleet.engine_proxy(planned).mid_stream():
            return planned
        streaming = [k for k in range(count) if self.fleet.engine_proxy(k).mid_stream()]
        return self.rng.choice(streaming) if streaming else planned

    async def _paused(self, proxies: Sequence[FaultProxy], seconds: float) -> None:
        for proxy in proxies:
            proxy.pause()
        try:
            await asyncio.sleep(seconds)
        finally:
            for proxy in proxies:
                proxy.resume()
