"""The checks CI runs over the code itself: lint, format, types and the layering contracts.

ruff reads the repository as it is. mypy and import-linter resolve ``pdgate.*`` imports, and the
layer folders live at the repository root mapped into the package by setuptools, which neither
tool follows; both therefore run over a tree of links laid out as the installed package is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.layout import link_installed_layout

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in this environment: it is part of the test extra ({path})")
    return str(path)


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``pdgate/`` as it installs: the package root's files and every layer folder, linked."""
    return link_installed_layout(ROOT, tmp_path_factory.mktemp("layout"))


def _report(result: subprocess.CompletedProcess[str], layout: Path | None = None) -> str:
    text = result.stdout + result.stderr
    if layout is not None:  # name the repository's files, not the links
        text = text.replace(str(layout / "pdgate") + "/", "")
    return text[-6000:]


def test_ruff_lint_is_clean() -> None:
    result = _run([_tool("ruff"), "check", "--no-cache", "."], ROOT)
    assert result.returncode == 0, _report(result)


def test_ruff_format_is_clean() -> None:
    result = _run([_tool("ruff"), "format", "--check", "--no-cache", "."], ROOT)
    assert result.returncode == 0, "run `ruff format .`:\n" + _report(result)


def test_types_check(installed_layout: Path) -> None:
    cache = ROOT / ".mypy_cache"
    result = _run(
        [_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), "-p", "pdgate"],
        installed_layout,
        env={**os.environ, "MYPYPATH": str(installed_layout)},
    )
    assert result.returncode == 0, _report(result, installed_layout)


def test_layers_hold(installed_layout: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed_layout), "PYTHONSAFEPATH": "1"}
    result = _run([_tool("lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"], installed_layout, env)
    assert result.returncode == 0, _report(result, installed_layout)
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept is not None and int(kept.group(1)) >= 5, _report(result, installed_layout)
