"""The client's ``usage`` where the gateway knows better than the engine that answered.

After a PD hand-off the decode engine reports every prompt token whose KV it received as
``prompt_tokens_details.cached_tokens`` (a never-seen 414-token prompt comes back with 413).
Clients and billing read that field as prefix-cache hits, so the gateway puts the prefill
leg's own figure there instead.
"""

from __future__ import annotations

import re
from typing import Any

_DETAILS_KEY = b'"prompt_tokens_details"'
_DETAILS = re.compile(rb'"prompt_tokens_details"\s*:\s*(?:null|\{[^{}]*\})')


def reported_cached_tokens(answer: Any) -> int:
    """The prefix-cache hit an engine reported in a completion's ``usage`` (0 when it reported none:
    vLLM and the simulated engine leave ``prompt_tokens_details`` out for a miss)."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached > 0 else 0


def with_cached_tokens(data: bytes, cached: int) -> bytes:
    """``data`` (a JSON body or SSE events) with every ``prompt_tokens_details`` set to ``cached``
    hits (``null`` for none, as the engines write a miss). Untouched when it has no such field."""
    if _DETAILS_KEY not in data:
        return data
    value = b'"prompt_tokens_details":{"cached_tokens":%d}' % cached if cached > 0 else b'"prompt_tokens_details":null'
    return _DETAILS.sub(value, data)
