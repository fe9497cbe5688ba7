"""Reading a YAML file that holds a mapping (configuration files, SLO files; JSON is YAML too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """A YAML file that could not be read as a mapping: missing or unreadable, not YAML, or not a
    mapping at the top level. The message starts with the file's path."""


def read_yaml_mapping(path: str | Path, *, empty_ok: bool = True, what: str = "a mapping") -> dict[str, Any]:
    """The mapping at the top level of the YAML file ``path``.

    An empty file (or one holding only ``null`` or comments) is an empty mapping when
    ``empty_ok``, else an error. Raises :class:`YamlFileError` naming the file for every failure;
    ``what`` names the expected content in the message (``expected a mapping of engine settings``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlFileError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlFileError(f"{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise YamlFileError(f"{path}: not valid YAML: nested too deeply") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise YamlFileError(f"{path}: expected {what} at the top level, found {kind}")
    return data
