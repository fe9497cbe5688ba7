"""Ports for test servers that cannot pick their own.

Prefer port 0: every ``pdgate`` server (the gateway, the simulated engine, its SGLang bootstrap
server and its KV-event sockets given as ``tcp://127.0.0.1:*``) binds a free port itself and prints
the one it bound, which the tests read back (``support.procs``). Nothing else can take it between
the choice and the bind, because there is no such moment.

Some ports must be known before the process that binds them starts: a port the *gateway* binds
for KV events the engines connect to, the URLs ``pdgate up`` starts its engines on, a real vLLM's
HTTP and NIXL side-channel ports (vLLM refuses port 0). :func:`reserve_port` picks those so that a
clash is very unlikely, and :func:`retry_on_port_clash` starts again on fresh ports if one happens:

* The port comes from below the kernel's ephemeral range (``ip_local_port_range``, 32768-60999 by
  default), so no socket bound to port 0 and no outgoing connection is ever given it, by this
  process or any other. ``bind(port 0)``-then-close (the usual "free port" trick) hands out
  exactly the ephemeral ports every other process is drawing from at the same moment.
* Each reserved port is locked (``flock`` on a file under the temporary directory) for the life of
  the test process, so two pytest sessions running side by side on one machine never pick the same.
* The port is checked free (a listening bind on all addresses) before it is handed out.

What is left is a process outside the tests binding that exact port between the check and the
child's bind, which :func:`retry_on_port_clash` turns into a retry rather than a failure.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOCK_DIR = Path(tempfile.gettempdir()) / "pdgate-test-ports"
LOWEST = 20000  # well clear of the well-known ports that local services tend to use
CLASH_MARKERS = ("address already in use", "errno 98", "eaddrinuse")

_held: dict[int, int] = {}  # port -> fd of its lock file, open (locked) until this process exits
_random = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """Whether a listening socket can bind ``port`` on every address (so 127.0.0.1 and ``*`` too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen(1)
        except OSError:
            return False
    return True


def _lock(port: int) -> bool:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held[port] = fd
    return True


def reserve_port() -> int:
    """A TCP port nobody else is using or will be handed: see the module doc. Never handed out twice."""
    high = _ephemeral_low() - 1
    for _ in range(1000):
        port = _random.randint(LOWEST, high)
        if port in _held or not _lock(port):
            continue
        if _bindable(port):
            return port
        # taken by something outside the tests: keep it locked (never retried), draw again
    raise RuntimeError(f"no free port in {LOWEST}-{high} after 1000 draws")


def is_port_clash(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or a child's failure with its output) says an address was in use."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in CLASH_MARKERS)


def retry_on_port_clash(start: Callable[[], T], attempts: int = 3) -> T:
    """``start()``, which reserves its ports itself; run again (fresh ports) when a bind found one taken."""
    for attempt in range(attempts):
        try:
            return start()
        except (OSError, RuntimeError) as exc:
            if attempt == attempts - 1 or not is_port_clash(exc):
                raise
    raise AssertionError("unreachable")
