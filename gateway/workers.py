"""``--workers N``: N gateway processes serving one address, each a full replica.

Each worker is ``pdgate serve --workers 1`` on the same host and port with SO_REUSEPORT (the
kernel spreads the connections over them) and its own replica id; they share the fleet's state
through NATS as replicas on several hosts do (:mod:`pdgate.gateway.sharing`). The supervisor
(:class:`WorkerPool`, the process the operator started) serves nothing itself:

* it reserves the port (``--port 0`` picks one free port for all workers) and starts the
  workers in their own sessions, each told to end with it (``PR_SET_PDEATHSIG``);
* it waits for every worker's ready line, then prints one banner for the gateway;
* a worker that dies is started again (after 1 s, up to 30 s between tries while it keeps dying);
* SIGHUP is passed to every worker (each reads the config again); SIGINT/SIGTERM stop them all
  (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdgate.common.children import die_with_parent
from pdgate.common.tasks import OwnedTasks

log = logging.getLogger("pdgate.workers")

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0  # the default wait for the workers to end after SIGTERM (the config's shutdown.total_s)
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
WORKERS_ENV = "PDGATE_WORKERS"
_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """``PDGATE_WORKERS`` when set, else the number of cores this process may run on."""
    configured = os.environ.get(WORKERS_ENV)
    if configured:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def end_with_parent(parent_pid: int) -> None:
    """Have the kernel stop this process (SIGTERM) when its supervisor dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    banner: list[str] = field(default_factory=list)


class WorkerPool:
    """Starts, watches and stops the worker processes (``command(index)`` is each one's argv)."""

    def __init__(
        self,
        count: int,
        host: str,
        port: int,
        command: Callable[[int, int], Sequence[str]],
        *,
        env: dict[str, str] | None = None,
        scheme: str = "http",
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.count = count
        self.stop_grace_s = stop_grace_s  # after SIGTERM, before SIGKILL
        self.host = host
        self.port = port
        self.scheme = scheme  # https when the workers serve TLS
        self.command = command  # (worker index, port) -> argv
        self.env = {**os.environ, **(env or {})}
        self.workers = [_Worker(i) for i in range(count)]
        self._tasks = OwnedTasks()
        self._stopping = False
        self._reservation: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    async def start(self) -> None:
        """Start every worker and return once all serve; one that cannot start stops them all."""
        self._reservation = _reserve(self.host, self.port)
        self.port = self._reservation.getsockname()[1]
        try:
            await asyncio.gather(*(self._spawn(w) for w in self.workers))
        except BaseException:
            await self.stop()
            raise
        finally:
            self._reservation.close()  # every worker listens now; the port stays theirs
            self._reservation = None
        for worker in self.workers:
            self._tasks.spawn(self._watch(worker), f"worker-{worker.index}")

    def reload(self) -> None:
        """SIGHUP: every worker reads its config again."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    async def stop(self) -> None:
        self._stopping = True
        await self._tasks.close()
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=self.stop_grace_s)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))

    # ---------------------------------------------------------------- internals
    async def _spawn(self, worker: _Worker) -> None:
        argv = list(self.command(worker.index, self.port))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, env=self.env, start_new_session=True, preexec_fn=die_with_parent()
        )
        worker.proc = proc
        assert proc.stdout is not None
        worker.banner = []
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        code = await proc.wait()
                        raise RuntimeError(f"worker {worker.index} exited with status {code} before it served")
                    text = line.decode(errors="replace").rstrip("\n")
                    worker.banner.append(text)
                    if text.startswith("pdgate gateway ready:"):
                        break
        except TimeoutError:
            raise RuntimeError(f"worker {worker.index} did not serve within {READY_TIMEOUT_S:.0f} s") from None
        self._tasks.spawn(_echo(proc.stdout), f"worker-{worker.index}-output")

    async def _watch(self, worker: _Worker) -> None:
        delay = RESTART_MIN_S
        while not self._stopping:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._stopping:
                return
            log.error(
                "gateway worker %d (pid %d) exited with status %s; starting it again",
                worker.index,
                worker.proc.pid,
                code,
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn(worker)
                worker.restarts += 1
                delay = RESTART_MIN_S
            except (RuntimeError, OSError) as exc:
                log.error("gateway worker %d did not start again: %s", worker.index, exc)
                delay = min(delay * 2, RESTART_MAX_S)


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: ``port`` (or a free one for 0) for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _echo(stream: asyncio.StreamReader) -> None:
    """A worker's further standard output, passed on to ours."""
    while line := await stream.readline():
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()
