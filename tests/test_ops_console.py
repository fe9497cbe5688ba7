"""The ops console (issue 22, item 4): the page at ``/console`` in a real headless Chromium over a
real ``pdgate up`` of simulated engines, checked by what an operator sees in the page's DOM; and
its bounded history and event ring (:mod:`pdgate.gateway.recent`) with an injected clock."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jsonschema_rs
import pytest
from support.browser import PageErrors, headless_chromium, require_chromium

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page
from support.fleet import MODEL, get_json
from support.ports import reserve_port, retry_on_port_clash
from support.procs import PdgateProcess, start_pdgate
from support.streams import admin, client
from support.waiting import wait_until

from pdgate.gateway.recent import EventLog, RequestHistory

T = TypeVar("T")
ADMIN_KEY = "console-test-key"
PAGE_POLL_MS = 250  # how often the page asks the gateway (every second unless told)
POLL = 0.05  # how often the tests read the page

# what the operator sees: every instance row's cells, by the data-field they show
ROWS_JS = """() => Object.fromEntries([...document.querySelectorAll('#instances tr[data-instance]')].map(tr =>
  [tr.dataset.instance, Object.fromEntries([...tr.querySelectorAll('[data-field]')].map(
    td => [td.dataset.field, td.textContent.replace(/\\s+/g, ' ').trim()]))]))"""
EVENTS_JS = """() => [...document.querySelectorAll('#events li[data-kind]')].map(li =>
  ({kind: li.dataset.kind, text: li.textContent.replace(/\\s+/g, ' ').trim()}))"""
CARDS_JS = """() => Object.fromEntries([...document.querySelectorAll('#summary [data-card]')].map(card =>
  [card.dataset.card, card.querySelector('.value').textContent.trim()]))"""


# ------------------------------------------------------------------------------ fleets and pages
@dataclass
class Fleet:
    """A running ``pdgate up``: its process, its config's instances and the engines' pids."""

    up: PdgateProcess
    instances: list[dict[str, Any]]
    pids: list[int]

    @property
    def url(self) -> str:
        return self.up.url


def write_config(path: Path, instances: list[dict[str, Any]], **gateway: Any) -> Path:
    config = {"host": "127.0.0.1", "port": 0, "models": [{"name": MODEL}], "instances": instances, **gateway}
    path.write_text(json.dumps(config))  # (JSON is YAML)
    return path


def start_up(folder: Path, instances: list[dict[str, Any]], **gateway: Any) -> Fleet:
    """``pdgate up`` over simulated engines it starts, each on a port chosen first."""

    def start() -> Fleet:
        entries = [
            {"url": f"http://127.0.0.1:{reserve_port()}", "kind": "sim", "model": MODEL, **entry} for entry in instances
        ]
        up = start_pdgate("up", "--config", str(write_config(folder / "fleet.yaml", entries, **gateway)), timeout=60)
        pids = [int(line.split("(pid ")[1].rstrip(")\n")) for line in up.output if "(pid " in line]
        return Fleet(up, entries, pids)

    return retry_on_port_clash(start)


def stop_up(fleet: Fleet) -> None:
    """Stop ``pdgate up`` and make sure every engine it started is gone (they die with it)."""
    fleet.up.stop(signal.SIGTERM)
    try:
        wait_until(lambda: not any(alive(pid) for pid in fleet.pids), timeout=15, message="the engines to stop")
    finally:
        for pid in fleet.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False


def rows(page) -> dict[str, dict[str, str]]:
    return page.evaluate(ROWS_JS)


def cards_of(page) -> dict[str, str]:
    return page.evaluate(CARDS_JS)


def events(page) -> list[dict[str, str]]:
    return page.evaluate(EVENTS_JS)


def shown(page, what: str, read: Callable[[Any], T], holds: Callable[[T], object] = bool, timeout: float = 10.0) -> T:
    """What ``read(page)`` finds in the page once ``holds`` it (the page keeps polling the gateway)."""

    def check() -> tuple[T] | None:
        value = read(page)
        return (value,) if holds(value) else None

    return wait_until(check, timeout=timeout, interval=POLL, message=what)[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One prefill, one decode and one flex (serving decode) sim engine behind ``pdgate up``, with
    the role balancer planning (never moving: a long dwell) and drains moving streams."""
    fleet = start_up(
        tmp_path_factory.mktemp("console"),
        [
            {"id": "prefill-0", "role": "prefill", "launch": {"time_scale": 1}},
            {"id": "decode-0", "role": "decode", "launch": {"time_scale": 1}},
            {"id": "flex-0", "role": "flex", "serving": "decode", "launch": {"time_scale": 1}},
        ],
        scrape_interval_s=0.2,
        migration={"policy": "no-migration", "interval_s": 0.1},
        role_balancer={"enabled": True, "interval_s": 0.3, "min_dwell_s": 3600},
    )
    try:
        yield fleet
    finally:
        stop_up(fleet)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """One headless Chromium for the module; each test opens its own tab (its own sessionStorage)."""
    require_chromium()
    with headless_chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    tab = browser.new_page()
    try:
        yield tab
    finally:
        tab.close()


class LongStream:
    """A streamed completion read in a thread until :meth:`close` (the client hangs up)."""

    def __init__(self, url: str) -> None:
        self.tokens = 0
        self._stop = threading.Event()
        self._stream = client(url).completions.create(
            model=MODEL, prompt="a long answer", max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for _ in self._stream:
            self.tokens += 1
            if self._stop.is_set():
                break

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._stream.close()


# ------------------------------------------------------------------------------ the page
def test_console_shows_the_fleet_live_and_follows_a_drain_and_a_role_change(fleet: Fleet, page: Page):
    url = fleet.url
    errors = PageErrors(page)
    page.goto(f"{url}/console?interval_ms={PAGE_POLL_MS}")

    # every instance, with its role and health
    seen = shown(
        page,
        "the three instances, healthy",
        rows,
        lambda r: len(r) == 3 and all(i["status"] == "healthy" for i in r.values()),
    )
    assert seen["prefill-0"]["role"] == "prefill" and seen["decode-0"]["role"] == "decode"
    assert seen["flex-0"]["role"] == "flex serving decode"
    assert all(row["inflight"] == "0 / 0" and row["streams"] == "0" for row in seen.values()), seen
    assert cards_of(page)["instances"] == "3 / 3"

    # load: a long stream shows on the instance that decodes it, a few requests in the history
    stream = LongStream(url)
    try:
        wait_until(lambda: stream.tokens > 0, message="the stream's first token")
        holder = wait_until(
            lambda: next((i["id"] for i in get_json(f"{url}/admin/instances")["data"] if i["streams"]), None),
            message="the instance that decodes the stream",
        )
        loaded = shown(page, f"the stream on {holder}", rows, lambda r: r[holder]["streams"] == "1")
        assert loaded[holder]["inflight"].endswith("/ 1"), loaded[holder]
        api = client(url)
        for i in range(3):
            # (ignore_eos: the simulated engine may end an answer at its first token otherwise)
            answer = api.completions.create(
                model=MODEL, prompt=f"short {i}", max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert answer.usage is not None and answer.usage.completion_tokens == 4
        for _ in api.completions.create(
            model=MODEL, prompt="short streamed", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        ):
            pass
        cards = shown(page, "4 requests finished", cards_of, lambda c: int(c["finished"]) >= 4)
        assert cards["attainment"].endswith("%"), cards  # the streamed one had an SLO verdict

        # draining the holder: the page says so, and its stream moves away (an event)
        assert admin(url, f"/admin/instances/{holder}/drain")[0] in (200, 202)
        drained = shown(page, f"{holder} draining", rows, lambda r: "draining" in r[holder]["status"])
        assert all("draining" not in row["status"] for i, row in drained.items() if i != holder), drained
        moved = shown(page, "the drain's migration", lambda p: [e for e in events(p) if "(drain)" in e["text"]])
        assert moved[0]["kind"] == "migration" and f"{holder} →" in moved[0]["text"], moved
    finally:
        stream.close()
    shown(page, "the stream gone", rows, lambda r: all(row["streams"] == "0" for row in r.values()))

    # undrain, then a flex instance changes role: both show up
    assert admin(url, f"/admin/instances/{holder}/undrain")[0] == 200
    shown(page, f"{holder} serving again", rows, lambda r: "draining" not in r[holder]["status"])
    assert admin(url, "/admin/instances/flex-0/role", {"role": "prefill"})[0] == 200
    shown(page, "flex-0 serving prefill", rows, lambda r: r["flex-0"]["role"] == "flex serving prefill")
    changed = shown(page, "the role change", lambda p: [e for e in events(p) if e["kind"] == "role"])
    assert "flex-0 decode → prefill (admin)" in changed[0]["text"], changed

    # the role balancer's plan
    split = shown(
        page,
        "the balancer's plan",
        lambda p: p.locator(f'#plan tr[data-model="{MODEL}"] [data-field="split"]').all_inner_texts(),
    )
    assert re.fullmatch(r"\d+ / \d+", split[0]), split
    assert "off" in page.inner_text("#scaling")  # no scaling plan configured

    assert errors.errors == []


def test_console_state_conforms_to_the_served_document(fleet: Fleet):
    document = get_json(f"{fleet.url}/openapi.json")
    schema = {"$ref": "#/components/schemas/ConsoleState", "components": document["components"]}
    state = get_json(f"{fleet.url}/admin/console/state")
    jsonschema_rs.validator_for(schema).validate(state)
    assert {i["id"] for i in state["instances"]} == {"prefill-0", "decode-0", "flex-0"}
    page = urllib.request.urlopen(f"{fleet.url}/console", timeout=10)
    assert (
        page.headers["Content-Type"].startswith("text/html")
        and "script-src 'self'" in page.headers["Content-Security-Policy"]
    )


def test_console_asks_for_the_admin_key_once_and_then_works(fleet: Fleet, page: Page, tmp_path):
    """A second gateway over the same engines, its admin API behind a key."""
    instances = [{k: v for k, v in entry.items() if k not in ("launch", "serving")} for entry in fleet.instances]
    config = write_config(tmp_path / "keyed.yaml", instances, admin={"api_key": ADMIN_KEY})
    gateway = start_pdgate("serve", "--config", str(config))
    try:
        errors = PageErrors(page, allow=lambda text: "401" in text)  # the answers before the key is given
        page.goto(f"{gateway.url}/console?interval_ms={PAGE_POLL_MS}")
        page.wait_for_selector("#auth:not([hidden])", timeout=10_000)
        assert page.inner_text("#status") == "admin key needed" and rows(page) == {}

        page.fill("#token", "not-the-key")
        page.click("#token-submit")
        shown(page, "the wrong key refused", lambda p: p.inner_text("#auth-message"), lambda t: "refused" in t)
        assert rows(page) == {}

        page.fill("#token", ADMIN_KEY)
        page.click("#token-submit")
        seen = shown(page, "the instances", rows, lambda r: len(r) == 3)
        assert seen["decode-0"]["role"] == "decode" and seen["decode-0"]["status"] == "healthy", seen
        assert page.locator("#auth").is_hidden()

        page.reload()  # the key is kept for the tab (sessionStorage): not asked again
        shown(page, "the instances after a reload", rows, lambda r: len(r) == 3)
        assert page.locator("#auth").is_hidden()
        assert errors.errors == []
    finally:
        gateway.stop()


# ------------------------------------------------------------------------------ history and events
class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_request_history_buckets_attainment_and_goodput_over_the_window():
    clock = FakeClock(1000.0)
    history = RequestHistory(bucket_s=10, span_s=60, clock=clock)
    history.finished(True)
    history.finished(False)
    history.finished(None)  # not streamed: finished, no SLO verdict
    history.rejected()
    clock.now = 1015.0  # the next bucket, half gone
    history.finished(True)
    view = history.view()
    assert view["bucket_s"] == 10 and view["span_s"] == 60 and len(view["buckets"]) == 6
    first, current = view["buckets"][-2], view["buckets"][-1]
    assert (first["start"], first["finished"], first["judged"], first["met"], first["rejected"]) == (1000, 3, 2, 1, 1)
    assert first["attainment"] == 0.5 and first["goodput_rps"] == 0.1
    assert current["seconds"] == 5 and current["goodput_rps"] == 0.2  # one met in the 5 s gone so far
    assert [b["finished"] for b in view["buckets"][:-2]] == [0, 0, 0, 0]  # empty buckets shown (time axis)
    assert all(b["attainment"] is None for b in view["buckets"][:-2])
    total = view["total"]
    assert (total["finished"], total["judged"], total["met"], total["rejected"]) == (4, 3, 2, 1)
    assert total["seconds"] == 55

    clock.now = 1065.0  # the first bucket left the window
    total = history.view()["total"]
    assert (total["finished"], total["met"]) == (1, 1)
    clock.now = 2000.0  # everything did
    assert history.view()["total"]["finished"] == 0


@pytest.mark.unit
def test_request_history_stays_bounded_and_survives_a_clock_stepping_back():
    clock = FakeClock(0.0)
    history = RequestHistory(bucket_s=1, span_s=5, clock=clock)
    for second in range(1000):
        clock.now = float(second)
        history.finished(True)
    assert len(history._buckets) == 5
    clock.now = 990.0  # wall clock stepped back: counted in the newest bucket, nothing lost or raised
    history.finished(True)
    clock.now = 999.5
    assert history.view()["buckets"][-1]["finished"] == 2
    with pytest.raises(ValueError):
        RequestHistory(bucket_s=0)
    with pytest.raises(ValueError):
        RequestHistory(bucket_s=10, span_s=5)


@pytest.mark.unit
def test_event_log_keeps_the_latest_events_newest_first():
    clock = FakeClock(50.0)
    log = EventLog(capacity=3, clock=clock)
    for i in range(5):
        clock.now = 50.0 + i
        log.add("migration", (f"src-{i}", f"dst-{i}"), "drain", f"r{i} src-{i} → dst-{i}", ok=i != 4)
    recent = log.recent()
    assert [e["detail"].split()[0] for e in recent] == ["r4", "r3", "r2"] and log.recorded == 5
    assert recent[0] == {
        "time": 54.0,
        "kind": "migration",
        "instances": ["src-4", "dst-4"],
        "reason": "drain",
        "detail": "r4 src-4 → dst-4",
        "ok": False,
    }
    with pytest.raises(ValueError):
        EventLog(capacity=0)
