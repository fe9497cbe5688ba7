"""Process runtime shared by every pdgate server process (engines and gateway)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")


class Server(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on some platforms
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def serve_until_signalled(
    server: S, ready: Callable[[S], None] | None = None, *, on_hangup: Callable[[S], None] | None = None
) -> None:
    """Start ``server``, call ``ready``, run until SIGINT/SIGTERM, then stop it cleanly.
    ``on_hangup``: what SIGHUP does (e.g. read the config again) instead of ending the process.

    The handlers are in place before the server starts: a SIGTERM that comes while it starts, or
    right after its ready line (``ready`` may take a while: a garbage collection), stops it
    cleanly instead of killing the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup, server)
    try:
        await server.start()
        if ready is not None:
            ready(server)
        await stop.wait()
    finally:
        await server.stop()


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for ``endpoint``: ``/v1/traces`` is added when it has no path
    (an OTLP base URL such as ``http://collector:4318``); a URL with a path is used as it is."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1/traces"))
    return endpoint
