"""Shared fixtures: real simulated-engine processes on loopback, stopped after use."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.nats import NatsServer, start_nats
from support.procs import PdgateProcess, start_sim


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis's caches (constants, unicode data) in a temporary directory, not a ``.hypothesis``
    in the checkout (the property tests keep no example database either)."""
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
        config._pdgate_hypothesis_dir = tempfile.mkdtemp(prefix="pdgate-hypothesis-")  # type: ignore[attr-defined]
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = config._pdgate_hypothesis_dir  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = getattr(config, "_pdgate_hypothesis_dir", None)
    if directory is not None:
        os.environ.pop("HYPOTHESIS_STORAGE_DIRECTORY", None)
        shutil.rmtree(directory, ignore_errors=True)


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


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    """helm-python-sdk, Helm's own Go engine (tests/test_helm_chart*.py); skips without it, fails in CI."""
    from support.helm_chart import require_helm

    return require_helm()


@pytest.fixture(scope="module")
def chart(helm: ModuleType) -> Iterator[Any]:
    """The chart in deploy/helm/pdgate, loaded by Helm."""
    from support.helm_chart import CHART

    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded
