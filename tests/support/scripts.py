"""Load a benchmark script (benchmarks/ is not a package) as a module, for tests of its parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported under the module name ``name`` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_run_left_no_process(stdout: str) -> int:
    """A benchmark run that printed ``logs: DIR`` left no engine or gateway of its own running;
    removes DIR. Returns how many gateway configs the run wrote."""
    import shutil
    import subprocess

    import yaml

    logs = Path(next(line for line in stdout.splitlines() if line.startswith("logs: "))[6:])
    try:
        configs = [yaml.safe_load(p.read_text()) for p in logs.rglob("gateway.yaml")]
        marks = [str(logs)] + [f"--port {inst['url'].rsplit(':', 1)[1]} " for c in configs for inst in c["instances"]]
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        leftovers = [line for line in ps.splitlines() if "pdgate.cli" in line and any(m in line + " " for m in marks)]
        assert not leftovers, leftovers
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return len(configs)
