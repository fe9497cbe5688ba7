"""Shared by the benchmark scripts: the host (cores, CPU model, what other processes take of it),
CPU accounting from ``/proc`` (a process, a process tree, the whole host) and child processes
started in their own process groups and always stopped (with every process they started).

Linux only (``/proc``). Not a benchmark itself.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- CPU accounting
def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc_pid_stat(5)


def proc_sched_s(pid: int) -> float:
    """On-CPU time of all threads of a process from schedstat (ns precision), in seconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def host_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole host, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class CpuWindow:
    """CPU of our processes and of everything else on the host over one measured window."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = sorted({*pids, os.getpid()})

    def __enter__(self) -> Self:
        self.before = {p: proc_cpu_s(p) for p in self.pids}
        self.host0 = host_cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        host1 = host_cpu_s()
        self.used = {p: proc_cpu_s(p) - self.before[p] for p in self.pids}
        # everything the host ran that is not one of our processes, in cores
        self.foreign_cores = max(0.0, (host1[0] - self.host0[0]) - sum(self.used.values())) / self.wall
        self.steal_cores = (host1[1] - self.host0[1]) / self.wall


def wait_quiet(limit_s: float, threshold: float = 0.1, window_s: float = 2.0, verbose: bool = True) -> None:
    """Wait (up to ``limit_s``) until other processes use < ``threshold`` cores over ``window_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        with CpuWindow([]) as w:
            time.sleep(window_s)
        if w.foreign_cores < threshold:
            if verbose:
                print(f"host quiet: other processes use {w.foreign_cores:.2f} cores", flush=True)
            return
        if time.monotonic() >= deadline:
            print(
                f"host still busy after {limit_s:g} s (other processes: {w.foreign_cores:.2f} cores); going on",
                flush=True,
            )
            return


def proc_stat(pid: int) -> tuple[str, int, float, int] | None:
    """(command name, parent pid, utime + stime seconds, start time in ticks), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    comm = head.split("(", 1)[1] if "(" in head else "?"
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[19])


def cmdline(pid: int) -> str:
    """The command line of a process ("" if gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def all_processes() -> dict[int, tuple[str, int, float, int]]:
    """Every process this host shows us: pid -> :func:`proc_stat`."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) is not None:
            out[int(name)] = stat
    return out


def process_tree(root: int, procs: dict[int, tuple[str, int, float, int]] | None = None) -> dict[int, str]:
    """``root`` and all its live descendants (whatever session they moved to): pid -> command name."""
    procs = all_processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in out:
            out[pid] = procs[pid][0]
            todo.extend(children.get(pid, []))
    return out


class TreeCpu:
    """The CPU of a process and all its descendants since :meth:`mark`, by command name; every
    process seen is remembered, so :meth:`kill_leftovers` ends those that outlived the root."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}  # pid -> start time (against pid reuse)
        self.base: dict[int, float] = {}

    def sample(self) -> dict[int, tuple[str, float]]:
        """pid -> (command name, CPU seconds) of the live tree."""
        procs = all_processes()
        tree = process_tree(self.root, procs)
        self.seen.update({pid: procs[pid][3] for pid in tree})
        return {pid: (name, procs[pid][2]) for pid, name in tree.items()}

    def mark(self) -> None:
        self.base = {pid: cpu for pid, (_, cpu) in self.sample().items()}

    def used(self) -> dict[str, float]:
        """CPU seconds since :meth:`mark` (processes started since count whole) by part: ``nats``
        (a NATS server), ``refit`` (multiprocessing children: the cost model's refits), ``gateway``."""
        out = {"gateway": 0.0, "refit": 0.0, "nats": 0.0}
        for pid, (name, cpu) in self.sample().items():
            part = "nats" if "nats" in name else "refit" if "multiprocessing" in cmdline(pid) else "gateway"
            out[part] += cpu - self.base.get(pid, 0.0)
        return out

    def kill_leftovers(self) -> None:
        for pid, started in self.seen.items():
            if _running(pid, started):
                _signal(pid, signal.SIGKILL)


# -------------------------------------------------------------------------------- the host
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """Cores, CPU model, kernel, Python and the load average: what a result must be read against."""
    try:
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        load = []
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_1_5_15": load,
    }


def other_load(window_s: float = 2.0, exclude: Iterable[int] = (), top: int = 3) -> dict[str, object]:
    """What the host runs besides us over ``window_s``: busy cores not ours (from /proc/stat,
    so it includes processes this container cannot see), steal, and the busiest visible ones."""
    mine = set(exclude) | {os.getpid()}
    before, host0, t0 = all_processes(), host_cpu_s(), time.perf_counter()
    time.sleep(window_s)
    after, host1, wall = all_processes(), host_cpu_s(), time.perf_counter() - t0
    used = {
        pid: (after[pid][0], (after[pid][2] - before[pid][2]) / wall)
        for pid in after
        if pid in before and after[pid][3] == before[pid][3]
    }
    ours = sum(c for pid, (_, c) in used.items() if pid in mine)
    busiest = sorted(((c, name, pid) for pid, (name, c) in used.items() if pid not in mine and c > 0), reverse=True)
    return {
        "other_cores": round(max(0.0, (host1[0] - host0[0]) / wall - ours), 2),
        "steal_cores": round((host1[1] - host0[1]) / wall, 2),
        "busiest_visible": [f"{name} (pid {pid}) {c:.2f}" for c, name, pid in busiest[:top]],
    }


def describe_host(info: dict[str, object], load: dict[str, object]) -> str:
    busiest = ", ".join(load["busiest_visible"]) or "none visible"  # type: ignore[arg-type]
    return (
        f"host: {info['cores']} cores, {info['cpu_model']}, kernel {info['kernel']}, Python {info['python']}, "
        f"load average {info['loadavg_1_5_15']}\nother load before the start: {load['other_cores']} cores busy "
        f"outside this benchmark (steal {load['steal_cores']}); busiest visible processes: {busiest}"
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, r in enumerate([header, *rows]):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ------------------------------------------------------------------------------ children
READY_RE = re.compile(r"ready: (http://\S+)")
STOP_GRACE_S = 10.0


class Child:
    """A child process in its own process group (its output to ``log``); :meth:`stop` ends the
    group and every descendant seen, also those that moved to sessions of their own."""

    LIVE: list[Child] = []  # every child not yet stopped (stop_all() ends them)

    def __init__(self, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.log = log
        self.url = ""
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.seen: dict[int, int] = {}  # descendants seen: pid -> start time (against pid reuse)
        Child.LIVE.append(self)

    def wait_ready(self, pattern: re.Pattern[str] = READY_RE, timeout: float = 60.0) -> str:
        """Wait for ``pattern`` in the output (group 1, a URL, is kept as :attr:`url`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                self.tree()
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{' '.join(self.cmd[:6])} did not become ready:\n{tail}")

    def tree(self) -> dict[int, str]:
        """This child and its live descendants (pid -> command name); remembers them for :meth:`stop`."""
        procs = all_processes()
        found = process_tree(self.proc.pid, procs)
        self.seen.update({pid: procs[pid][3] for pid in found})
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.tree()
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers of an exited leader
        deadline = time.monotonic() + STOP_GRACE_S
        for sig in (signal.SIGTERM, signal.SIGKILL):  # descendants in sessions of their own
            left = self._left()
            for pid in left:
                _signal(pid, sig)
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = self._left()
            deadline = time.monotonic() + 5
        self._out.close()
        if self in Child.LIVE:
            Child.LIVE.remove(self)

    def _left(self) -> list[int]:
        return [pid for pid, started in self.seen.items() if pid != self.proc.pid and _running(pid, started)]


def _running(pid: int, started: int) -> bool:
    """The process ``pid`` that started at ``started`` still runs (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[19]) == started


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """Stop every :class:`Child` still running, the last started first."""
    for child in reversed(list(Child.LIVE)):
        child.stop()


def stop_children_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so the scripts' ``finally`` stops the children."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
