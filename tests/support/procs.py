"""Launch real ``pdgate`` processes for tests and always clean them up."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from support.ports import reserve_port
from support.waiting import wait_until

READY_RE = re.compile(r"ready: (https?://\S+)")
BOOTSTRAP_RE = re.compile(r"sglang bootstrap server on \S+:(\d+)")
KV_EVENTS_RE = re.compile(r"KV events -> (\S+) topic=\S+(?: replay=(\S+))?")


def free_port() -> int:
    """A port for a server that must be told it before it starts: :func:`support.ports.reserve_port`.

    Prefer port 0 where the child supports it: children started here report the ports they bound
    (:attr:`PdgateProcess.url`, :attr:`PdgateProcess.bootstrap_port`, :attr:`PdgateProcess.kv_events`).
    """
    return reserve_port()


@dataclass
class PdgateProcess:
    """A child ``pdgate`` process; ``url`` is what it printed in its ready line."""

    args: list[str]
    proc: subprocess.Popen
    url: str = ""
    output: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    @property
    def log(self) -> str:
        return "".join(self.output)

    def reported(self, pattern: re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """The first line of the child's output matching ``pattern`` (waits for it to be printed)."""

        def find() -> re.Match[str] | None:
            for line in list(self.output):
                match = pattern.search(line)
                if match:
                    return match
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdgate {' '.join(self.args)} exited without printing {pattern.pattern!r}")
            return None

        return wait_until(find, timeout, message=f"pdgate {' '.join(self.args)} to print {pattern.pattern!r}")

    @property
    def port(self) -> int:
        """The HTTP port the child bound (from its ready line)."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def bootstrap_port(self) -> int:
        """The SGLang bootstrap port a simulated prefill engine bound (``--bootstrap-port 0``: a free one)."""
        return int(self.reported(BOOTSTRAP_RE).group(1))

    @property
    def kv_events(self) -> tuple[str, str | None]:
        """The KV-event endpoints a simulated engine bound or connected to: (publisher, replay or None)."""
        match = self.reported(KV_EVENTS_RE)
        return match.group(1), match.group(2)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def start_pdgate(
    *args: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    program: list[str] | None = None,
    replace_env: bool = False,
) -> PdgateProcess:
    """Run ``pdgate ARGS`` and wait for its ``ready: URL`` line (``cwd``: run another checkout's code).

    ``program`` replaces ``python -m pdgate.cli`` (e.g. an installed ``pdgate`` console script);
    ``env`` is added to this process's environment, or is the whole of it with ``replace_env``;
    ``PDGATE_WORKERS`` is 1 unless it says otherwise.
    """
    cmd = [*(program or [sys.executable, "-m", "pdgate.cli"]), *args]
    # one gateway process unless a test asks for workers (the default would be one per core)
    environment = {"PDGATE_WORKERS": "1", **(env if replace_env else {**os.environ, **(env or {})})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, cwd=cwd)
    child = PdgateProcess(list(args), proc)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            child.output.append(line)
            match = READY_RE.search(line)
            if match:
                child.url = match.group(1)
                threading.Thread(target=_drain, args=(child,), daemon=True).start()
                return child
    finally:
        selector.close()
    child.stop()
    raise RuntimeError(f"pdgate {' '.join(args)} did not become ready:\n{''.join(child.output)}")


def _drain(child: PdgateProcess) -> None:
    """Keep reading the child's output so it never blocks on a full pipe."""
    try:
        for line in child.proc.stdout:
            child.output.append(line)
    except (ValueError, OSError):
        pass


def start_sim(*flags: str, time_scale: float = 20.0, **kw) -> PdgateProcess:
    """A simulated engine on a port it picks itself (``--port 0``; ``url`` is what it bound)."""
    return start_pdgate("engine", "sim", "--port", "0", "--time-scale", str(time_scale), *flags, **kw)
