"""A real headless Chromium for tests: Debian's ``chromium`` package, driven by Playwright's Python
client (only its driver: never ``playwright install``, no downloaded browser).

``require_chromium()`` is the precondition: the browser binary and the ``playwright`` package, or a
skip with the reason; under CI (``CI=true``) a missing one fails the test instead (as
:func:`support.vllm.require_vllm`). :func:`headless_chromium` starts one browser with a fresh
profile and always closes it (and Playwright's driver) at the end. :class:`PageErrors` collects a
page's console errors and uncaught exceptions, for a test to assert there were none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Error, Page

CHROMIUM_ENV = "PDGATE_CHROMIUM"  # another Chromium binary than Debian's
DEFAULT_CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--no-sandbox",  # (the tests run as root in containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str | None:
    """``$PDGATE_CHROMIUM`` when set (and nothing else), else Debian's, else a ``chromium`` on the PATH."""
    named = os.environ.get(CHROMIUM_ENV)
    for candidate in [named] if named else [DEFAULT_CHROMIUM, shutil.which("chromium")]:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_chromium() -> str:
    """The Chromium binary to drive; skip (or under CI fail) when it or Playwright is missing."""
    reason = None
    path = chromium_path()
    if path is None:
        reason = "no Chromium (apt-get install chromium, or set PDGATE_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "no Playwright client (pip install playwright; its browsers are not needed)"
    if reason is None:
        assert path is not None
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser tests: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def headless_chromium(profile_dir: Path) -> Iterator[BrowserContext]:
    """One headless Chromium with a fresh profile in ``profile_dir``, closed at the end."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir), executable_path=executable, headless=True, args=list(FLAGS), viewport=VIEWPORT
        )
        try:
            yield context
        finally:
            context.close()  # the browser and every process it started


class PageErrors:
    """A page's console errors and uncaught exceptions, collected from the moment it is attached."""

    def __init__(self, page: Page, allow: Callable[[str], bool] = lambda text: False) -> None:
        self.errors: list[str] = []
        self.allow = allow  # console errors a test expects (e.g. a 401 before a key is given)
        page.on("console", self._console)
        page.on("pageerror", self._exception)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not self.allow(message.text):
            self.errors.append(f"console: {message.text} ({message.location.get('url', '')})")

    def _exception(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error.message}")
