"""Versioned cost models on disk.

Layout of a store directory::

    CURRENT            the name of the version in use ("v0003\\n"), replaced atomically
    v0001/             one directory per saved version
        components.joblib   joblib dump of {name: object} (e.g. "output_length", "latency")
        meta.json           created time, version, training data and metrics (caller's meta)
    v0002/ ...

:meth:`ModelStore.save` writes a version into a temporary directory inside the store, renames it
into place (a version directory is therefore always complete) and only then replaces
``CURRENT`` with :func:`os.replace`, so a reader sees either the old or the new version, never a
half-written one. Components are pickles: load only stores you (or your gateway) wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import joblib

CURRENT = "CURRENT"
COMPONENTS_FILE = "components.joblib"
META_FILE = "meta.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in ``meta`` as plain JSON values; anything else is an error."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"meta is not JSON-able: {type(value).__name__}")


class ModelStore:
    """Versioned model directory (see the module docstring); keeps the newest ``keep`` versions."""

    def __init__(self, directory: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep

    def versions(self) -> list[str]:
        """Version directory names, oldest first (``[]`` when the store is missing)."""
        if not self.directory.is_dir():
            return []
        found = [
            (int(m.group(1)), p.name)
            for p in self.directory.iterdir()
            if p.is_dir() and (m := _VERSION_RE.match(p.name))
        ]
        return [name for _, name in sorted(found)]

    def current(self) -> str | None:
        """The version ``CURRENT`` names, else the newest version directory, else ``None``."""
        pointer = self.directory / CURRENT
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            versions = self.versions()
            return versions[-1] if versions else None
        if not _VERSION_RE.match(name):
            raise ValueError(f"{pointer}: does not name a version (got {name[:40]!r})")
        return name

    def save(self, components: dict[str, Any], meta: dict[str, Any]) -> str:
        """Write a new version, point ``CURRENT`` at it, prune old versions; returns its directory.

        ``meta`` must be JSON-able; ``version`` and ``created`` (UNIX time) are added to it.
        """
        if not isinstance(components, dict) or not all(isinstance(k, str) for k in components):
            raise TypeError("components must be a dict with string keys")
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
        try:
            joblib.dump(components, staging / COMPONENTS_FILE)
            while True:
                versions = self.versions()
                number = int(versions[-1][1:]) + 1 if versions else 1
                name = f"v{number:04d}"
                full_meta = dict(meta) | {"version": name, "created": time.time()}
                text = json.dumps(full_meta, indent=2, sort_keys=True, default=_json_default)
                (staging / META_FILE).write_text(text + "\n")
                try:
                    os.rename(staging, self.directory / name)  # fails if a concurrent save took the name
                    break
                except OSError:
                    if not (self.directory / name).exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._point_at(name)
        self._prune(name)
        return str(self.directory / name)

    def load(self, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(components, meta)`` of one version; ``ValueError`` naming the path when it is unusable."""
        if not _VERSION_RE.match(version):
            raise ValueError(f"{self.directory}: {version!r} is not a version name")
        path = self.directory / version
        if not path.is_dir():
            raise ValueError(f"{path}: no such model version")
        meta_path, components_path = path / META_FILE, path / COMPONENTS_FILE
        for required in (meta_path, components_path):
            if not required.is_file():
                raise ValueError(f"{path}: incomplete model version (missing {required.name})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{meta_path}: unreadable model metadata ({exc})") from None
        try:
            components = joblib.load(components_path)
        except Exception as exc:  # a truncated or foreign pickle can raise nearly anything
            detail = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"{components_path}: unreadable model components ({detail})") from None
        if not isinstance(meta, dict) or not isinstance(components, dict):
            raise ValueError(f"{path}: not a pdgate cost model version")
        return components, meta

    def load_current(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(components, meta)`` of the current version; ``None`` when the store is missing or empty."""
        name = self.current()
        if name is None:
            return None
        return self.load(name)

    def _point_at(self, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".current-", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(name + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.directory / CURRENT)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _prune(self, current: str) -> None:
        versions = self.versions()
        for name in versions[: -self.keep]:
            if name != current:
                shutil.rmtree(self.directory / name, ignore_errors=True)
