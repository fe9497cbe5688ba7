"""The ``limits`` section: what the gateway accepts from its clients' connections.

Each limit protects the gateway (and the engines behind it) from a broken or hostile client;
each hit is counted in ``pdgate_http_limit_hits_total{limit}`` (docs/reliability.md lists them
with what the client sees). The limits hold per gateway process: ``--workers N`` accepts N
times ``max_connections`` on one address.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pdgate.common.http_server import HttpLimits

_DEFAULTS = HttpLimits()


class ClientLimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_header_bytes: int = Field(
        _DEFAULTS.max_header_bytes,
        ge=1024,
        description="request line and headers; over it: 431 and the connection closed",
    )
    max_connections: int = Field(
        _DEFAULTS.max_connections, ge=1, description="open client connections; beyond: 503 with Retry-After, closed"
    )
    request_timeout_s: float = Field(
        _DEFAULTS.request_timeout_s, gt=0, description="for a request's head and body to arrive once begun; 408 after"
    )
    keepalive_timeout_s: float = Field(
        _DEFAULTS.keepalive_timeout_s, gt=0, description="an idle keep-alive connection is closed after this"
    )
    slow_reader_timeout_s: float = Field(
        _DEFAULTS.slow_reader_timeout_s,
        gt=0,
        description="a client that reads none of its response for this long (its socket buffer full, the "
        "engine leg paused meanwhile) is dropped and its request aborted",
    )
    max_write_buffer_bytes: int = Field(
        _DEFAULTS.max_write_buffer_bytes,
        ge=64 * 1024,
        description="response bytes held for one client that is not reading; over it the client is dropped",
    )

    def http_limits(self, max_body_bytes: int) -> HttpLimits:
        return HttpLimits(max_body_bytes=max_body_bytes, **self.model_dump())
