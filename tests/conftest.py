"""Shared fixtures: real simulated-engine processes on loopback, stopped after use."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.nats import NatsServer, start_nats
from support.procs import PdgateProcess, start_sim


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., PdgateProcess]]:
    """Start simulated engines with given flags; every one is stopped at teardown."""
    started: list[PdgateProcess] = []

    def factory(*flags: str, **kw) -> PdgateProcess:
        proc = start_sim(*flags, **kw)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def sim_engine() -> Iterator[PdgateProcess]:
    """One colocated vLLM-flavour sim engine shared by a test module."""
    proc = start_sim("--served-model-name", "sim-model", "--max-model-len", "2048")
    yield proc
    proc.stop()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A real NATS server with JetStream for this test (stopped at its end)."""
    server = start_nats(tmp_path)
    yield server
    server.stop()
