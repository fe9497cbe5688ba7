"""The real-vLLM suite's precondition: a vLLM environment (``pdgate engine vllm-setup``), or a skip
with the reason; under CI (``CI=true``) a missing environment fails the test instead. And how its
engines are stopped."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest


def require_vllm(home: Path, present: bool) -> None:
    """Go on when ``present`` (the caller's check of the environment at ``home``), else skip or fail."""
    if present:
        return
    reason = f"no vLLM environment at {home} (run `pdgate engine vllm-setup`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the real-vLLM suite: {reason}")
    pytest.skip(reason)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM an engine's process group (vLLM's API server and engine core), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
