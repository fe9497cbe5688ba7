"""The gateway's logs: plain text or one JSON object per line, with request and trace ids.

A log call about a request passes ``extra=request_fields(request_id, trace_id)``; the access log
(``logging.access_log``) adds the request's outcome under ``extra={"access": {...}}``. Neither
ever carries prompt or completion text.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from pdgate.gateway.config import LoggingConfig

ACCESS_LOGGER = "pdgate.access"
REQUEST_FIELDS = ("request_id", "trace_id")


def request_fields(request_id: str | None, trace_id: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call about one request (trace id only when the request is traced)."""
    return {"request_id": request_id, "trace_id": trace_id}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id"?, "trace_id"?, ...access fields, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value...`` (request fields and access fields appended)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [(n, getattr(record, n, None)) for n in REQUEST_FIELDS]
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            pairs += list(access.items())
        extra = " ".join(f"{k}={v}" for k, v in pairs if v is not None)
        return f"{line} {extra}" if extra else line


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``config.level`` and above to ``stream`` (stderr) in ``config.format``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if config.access_log else logging.WARNING)
    return handler
