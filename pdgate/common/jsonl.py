"""Reading JSON and JSONL files of records, with errors that say where.

* :func:`json_lines`: the objects of a JSONL file, one per non-blank line;
* :func:`json_objects`: the objects of a JSON array file or of a JSONL file (told apart by the
  first character that is not white space);
* :func:`read_json`: one whole JSON document.

Every malformed file (invalid JSON, not UTF-8, a record that is not an object) raises ``error``
(:class:`JsonFileError` unless the caller names its own ``ValueError`` subclass) with a message
that starts with where: ``PATH:LINE`` in a JSONL file, ``PATH record N`` in a JSON array.
A missing or unreadable file raises ``OSError`` as ``open`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Where = str
"""``PATH:LINE`` (JSONL) or ``PATH record N`` (JSON array)."""


class JsonFileError(ValueError):
    """A JSON or JSONL file that cannot be read as asked (the message starts with where)."""


def json_lines(path: str | Path, *, error: type[ValueError] = JsonFileError) -> Iterator[tuple[Where, dict[str, Any]]]:
    """``("PATH:LINE", object)`` for every non-blank line of a JSONL file, read lazily."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise error(f"{path}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(value, dict):
                    raise error(f"{path}:{number}: expected a JSON object")
                yield f"{path}:{number}", value
        except UnicodeDecodeError as exc:
            raise error(f"{path}: not UTF-8 text ({exc.reason})") from None


def is_json_array(path: str | Path) -> bool:
    """Whether the file's first character that is not white space opens a JSON array."""
    with Path(path).open("rb") as handle:
        return handle.read(4096).lstrip().startswith(b"[")


def json_objects(
    path: str | Path, *, error: type[ValueError] = JsonFileError
) -> Iterator[tuple[Where, dict[str, Any]]]:
    """``(where, object)`` for each object of a JSON array file (``PATH record N``) or of a JSONL
    file (``PATH:LINE``)."""
    path = Path(path)
    if not is_json_array(path):
        yield from json_lines(path, error=error)
        return
    values = read_json(path, error=error)
    if not isinstance(values, list):
        raise error(f"{path}: expected a JSON array of objects")
    for number, value in enumerate(values):
        if not isinstance(value, dict):
            raise error(f"{path} record {number}: expected a JSON object")
        yield f"{path} record {number}", value


def read_json(path: str | Path, *, error: type[ValueError] = JsonFileError) -> Any:
    """The whole JSON document in ``path``."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason})") from None
