"""The package as it installs, laid out as links to a checkout: ``pdgate/`` with every layer folder.

Tools that resolve ``pdgate.*`` by walking folders (mypy, import-linter) and runs of another
checkout's gateway do not follow setuptools' ``package-dir`` mapping; a tree of links does.
"""

from __future__ import annotations

from pathlib import Path

LAYER_FOLDERS = ("gateway", "scheduler", "adapters", "engines", "loadgen", "configs")


def link_installed_layout(checkout: Path, base: Path) -> Path:
    """Make ``base/pdgate`` link the checkout's package root files and layer folders; returns ``base``
    (the directory to put on ``PYTHONPATH`` or ``MYPYPATH``)."""
    package = base / "pdgate"
    package.mkdir(parents=True)
    for entry in (checkout / "pdgate").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for folder in LAYER_FOLDERS:
        (package / folder).symlink_to(checkout / folder)
    return base
