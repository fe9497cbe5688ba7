"""Launch real ``pdgate`` processes for tests and always clean them up."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

READY_RE = re.compile(r"ready: (http://\S+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def start_pdgate(
    *args: str, timeout: float = 30.0, env: dict[str, str] | None = None, cwd: str | None = None
) -> PdgateProcess:
    """Run ``pdgate ARGS`` and wait for its ``ready: URL`` line (``cwd``: run another checkout's code)."""
    cmd = [sys.executable, "-m", "pdgate.cli", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    )
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
    return start_pdgate("engine", "sim", "--port", "0", "--time-scale", str(time_scale), *flags, **kw)
