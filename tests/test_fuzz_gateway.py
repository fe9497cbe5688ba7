"""Schemathesis fuzzes a real gateway over simulated engines, from the gateway's own /openapi.json.

Valid and invalid requests (the coverage and fuzzing phases, positive and negative data) for every
operation but the admin API's changes to the fleet. Each answer must be a documented status with a
conforming content type, body and headers, never a 5xx, every error in OpenAI's shape, and come
within a few seconds; invalid data must be refused with a 4xx. Afterwards the gateway still
serves, and its asyncio tasks, file descriptors and memory have not grown beyond a small bound
since the warm-up.

Schemathesis runs as its CLI does (its engine, every phase), inside the test: its pytest
integration cannot take a schema from a fixture under pytest 9 (``from_fixture`` reads
``Function._nodeid``, which pytest 9 removed).

Reproducible: a fixed seed (``PDGATE_FUZZ_SEED`` picks another) and no Hypothesis database. The
budget is ``PDGATE_FUZZ_EXAMPLES`` examples per operation in the fuzzing phase (small by default,
for CI); run it longer with ``PDGATE_FUZZ_EXAMPLES=500 pytest tests/test_fuzz_gateway.py``.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.recorder import ScenarioRecorder
from support.fleet import MODEL, call, engine_flags, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim
from support.waiting import wait_until

from pdgate.gateway.openapi import STORED_RESPONSE_ROUTE

FUZZ_EXAMPLES = int(os.environ.get("PDGATE_FUZZ_EXAMPLES", "10"))
FUZZ_SEED = int(os.environ.get("PDGATE_FUZZ_SEED", "21"))
MAX_RESPONSE_S = 5.0  # an answer slower than this counts as a hang
REQUEST_TIMEOUT_S = 10.0
MAX_GENERATED_TOKENS = 4  # generation limits are cut to this, so that valid requests answer fast
LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
TASKS_SLACK = 5
FDS_SLACK = 16
RSS_SLACK_KB = 50 * 1024
# a breaker that opens as in production (3 failures), but closes again soon: one bad answer does not
# turn into a run of 503s for every request after it
HEALTH = {"interval_s": 0.2, "timeout_s": 1.0, "failure_threshold": 3, "cooldown_s": 1.0}


@dataclass(frozen=True)
class Footprint:
    """What a gateway process holds: asyncio tasks (its gauge), open file descriptors, resident memory."""

    tasks: float
    fds: int
    rss_kb: int


@dataclass
class FuzzedGateway:
    gateway: PdgateProcess
    warm: Footprint
    cases: int = 0  # how many requests the fuzzer sent
    failures: list[str] = field(default_factory=list)


def footprint(gateway: PdgateProcess) -> Footprint:
    pid = gateway.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Footprint(metric(gateway.url, "pdgate_event_loop_tasks"), fds, rss)


def settled(gateway: PdgateProcess) -> Footprint | None:
    """The gateway's footprint once no request is in flight on any instance (None before)."""
    now = footprint(gateway)
    return now if metric(gateway.url, "pdgate_instance_inflight_requests") == 0 else None


def warm_up(url: str) -> None:
    """The requests that load every lazy part once: a completion, a chat stream, a response, errors."""
    assert call(f"{url}/v1/completions", {"model": MODEL, "prompt": "warm", "max_tokens": 2})[0] == 200
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    assert call(f"{url}/v1/chat/completions", chat)[0] == 200
    assert call(f"{url}/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2})[0] == 200
    assert call(f"{url}/v1/completions", {"model": MODEL})[0] == 400
    assert call(f"{url}/tokenize", {"prompt": "hi"})[0] == 200
    for path in ("/v1/models", "/ready", "/cost-model", "/admin/instances", "/openapi.json"):
        assert call(f"{url}{path}")[0] == 200, path


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedGateway]:
    """A gateway over two colocated simulated engines, warmed up, with its footprint then."""
    engines: list[PdgateProcess] = []
    try:
        engines += [start_sim(*engine_flags("both")) for _ in range(2)]
        entries = [instance_entry(e, "both", "sim") for e in engines]
        gateway = start_gateway(write_config(tmp_path_factory.mktemp("fuzz") / "fleet.yaml", entries, health=HEALTH))
        try:
            wait_until(lambda: call(f"{gateway.url}/ready")[0] == 200, message="the gateway to be ready")
            warm_up(gateway.url)
            warm = wait_until(lambda: settled(gateway), message="the gateway to settle after the warm-up")
            yield FuzzedGateway(gateway, warm)
        finally:
            gateway.stop()
    finally:
        for engine in engines:
            engine.stop()


# ------------------------------------------------------------------------------ the fuzzer
def fuzz_config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": FUZZ_SEED,
            "request-timeout": REQUEST_TIMEOUT_S,
            "output": {"sanitization": {"enabled": False}},  # failures show the request that made them
            "generation": {
                "mode": "all",
                "max-examples": FUZZ_EXAMPLES,
                "database": "none",
                # the gateway ignores headers and query parameters it does not read, by design
                "allow-extra-parameters": False,
            },
            "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
            "checks": {
                "negative_data_rejection": {"expected-statuses": ["4xx"]},
                "max_response_time": MAX_RESPONSE_S,
                # a valid request may still be refused: a prompt too long, an SLO it cannot meet
                "positive_data_acceptance": {"enabled": False},
                # nothing is created, and no key is configured: nothing for these to check
                "use_after_free": {"enabled": False},
                "ensure_resource_availability": {"enabled": False},
                "ignored_auth": {"enabled": False},
                "missing_required_header": {"enabled": False},
            },
            "operations": [
                {
                    # the engine validates these bodies (the gateway reads only `model`); the simulated
                    # engine's checks are looser than vLLM's
                    "include-tag": "pass-through",
                    "checks": {"negative_data_rejection": {"enabled": False}},
                },
                # any string is a response id: there is no invalid request to make of it
                {"include-path": STORED_RESPONSE_ROUTE, "generation": {"mode": "positive"}},
            ],
        }
    )


def prepare(context: schemathesis.HookContext, case: Case) -> Case:
    """Every generated case, before it is sent: made quick."""
    if isinstance(case.body, dict):
        cut_limits(case.operation.path, case.body)
    return case


def cut_limits(path: str, body: dict[str, Any]) -> None:
    """Cut a body's generation limits (and ``n``) so that valid requests answer fast; a chat or
    response that sets none would generate up to the model's length."""
    for name in (*LIMITS, "n"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_GENERATED_TOKENS:
            body[name] = 1 if name == "n" else MAX_GENERATED_TOKENS
    if path in ("/v1/chat/completions", "/v1/responses") and not any(name in body for name in LIMITS):
        body["max_tokens"] = MAX_GENERATED_TOKENS


@schemathesis.check
def openai_error_body(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case) -> bool | None:
    """Every error answer is OpenAI's error JSON, whatever its status."""
    if response.status_code < 400:
        return None
    error = response.json().get("error")
    assert isinstance(error, dict), f"{response.status_code} without an OpenAI error object: {response.text[:300]}"
    assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), error
    assert "param" in error and "code" in error, error
    return True


@contextlib.contextmanager
def hypothesis_storage(directory: Path) -> Iterator[None]:
    """Hypothesis's own caches (constants, unicode data) in ``directory``, not in the checkout's
    ``.hypothesis`` (and no example database at all: ``database: none``)."""
    set_hypothesis_home_dir(directory)
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)  # back to the default


def fuzz(url: str) -> tuple[int, list[str]]:
    """Run schemathesis against the gateway at ``url``: the requests sent, and each distinct failure."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=fuzz_config())
    schema.config.update(base_url=url)
    schema.hook("map_case")(prepare)
    schema = schema.exclude(tag="admin", method=["POST", "DELETE"])  # they change the fleet on purpose
    cases, failures = 0, {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            cases += len(event.recorder.interactions)
            failures.update(scenario_failures(event.recorder))
        elif isinstance(event, events.NonFatalError):
            failures.setdefault(
                f"{event.label}: {event.info.title}", f"{event.label}: {event.info.title}\n{event.info.message}"
            )
        elif isinstance(event, events.FatalError):
            failures.setdefault("fatal", repr(event.exception))
    return cases, list(failures.values())


def scenario_failures(recorder: ScenarioRecorder) -> dict[str, str]:
    """Each failed check of a scenario once (by operation, check and title), with its reproduction."""
    found: dict[str, str] = {}
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status != Status.FAILURE or check.failure_info is None:
                continue
            failure = check.failure_info.failure
            response = recorder.find_response(case_id=case_id)
            answer = f"{response.status_code} {response.content[:400]!r}" if response is not None else "no answer"
            found[f"{recorder.label} {check.name} {failure.title}"] = (
                f"{recorder.label}: {check.name}: {failure.title}\n{str(failure.message)[:600]}\n"
                f"{check.failure_info.code_sample}\n-> {answer}"
            )
    return found


# ------------------------------------------------------------------------------ the tests
def test_fuzzed_requests_get_documented_answers(fuzzed: FuzzedGateway, tmp_path: Path) -> None:
    with hypothesis_storage(tmp_path):
        fuzzed.cases, fuzzed.failures = fuzz(fuzzed.gateway.url)
    print(f"schemathesis sent {fuzzed.cases} requests; {len(fuzzed.failures)} distinct failures")
    assert fuzzed.cases > 100, f"the fuzzer sent only {fuzzed.cases} requests"
    assert not fuzzed.failures, f"{len(fuzzed.failures)} failures:\n\n" + "\n\n".join(fuzzed.failures)


def test_gateway_is_unharmed_after_fuzzing(fuzzed: FuzzedGateway) -> None:
    if not fuzzed.cases:
        pytest.skip("runs after test_fuzzed_requests_get_documented_answers, on the gateway it fuzzed")
    gateway, warm = fuzzed.gateway, fuzzed.warm
    wait_until(lambda: call(f"{gateway.url}/ready")[0] == 200, message="the gateway to be ready again")
    status, body = call(f"{gateway.url}/v1/completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body

    def back_near_warm() -> Footprint | None:
        now = settled(gateway)
        if now is None or now.tasks > warm.tasks + TASKS_SLACK or now.fds > warm.fds + FDS_SLACK:
            return None
        return now

    # the tasks and descriptors of finished requests are released (streams end, connections close)
    now = wait_until(
        back_near_warm, timeout=15, message=lambda: f"tasks and fds back near {warm}: {footprint(gateway)}"
    )
    assert now.rss_kb - warm.rss_kb < RSS_SLACK_KB, f"RSS grew from {warm.rss_kb} kB to {now.rss_kb} kB"


# ------------------------------------------------------------------------------ what the fuzzer found
# Minimal reproductions of the 5xx the fuzzer (and probing around its findings) found, fixed since:
# each must stay a client error.
FINDINGS = [
    pytest.param(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
        {"response_format": "json"},
        id="stream-with-response_format-not-an-object",
    ),
    pytest.param(
        "/v1/responses",
        {"model": MODEL, "input": "hi", "max_output_tokens": 2, "stream": True},
        {"response_format": True},
        id="responses-stream-with-response_format-true",
    ),
    pytest.param(
        "/detokenize",
        {"model": MODEL},
        {"tokens": [99_999_999]},
        id="detokenize-token-beyond-vocabulary",
    ),
    *(
        pytest.param(
            "/admin/instances",
            {"model": MODEL},
            {"url": url},
            id=f"admin-add-instance-url-{name}",
        )
        for name, url in (("bad-ipv6", "http://[::1"), ("port-out-of-range", "http://127.0.0.1:99999"))
    ),
    pytest.param("/admin/instances", {"model": MODEL, "url": "http://127.0.0.1:1"}, {"id": "x/y"}, id="admin-id-slash"),
    *(  # counts are integers, strictly (as booleans are): true, "3" and 2.0 are refused, not read as 1, 3, 2
        pytest.param(
            "/v1/completions", {"model": MODEL, "prompt": "hi"}, {"max_tokens": value}, id=f"max-tokens-{name}"
        )
        for name, value in (("true", True), ("string", "3"), ("float", 2.0))
    ),
    pytest.param("/detokenize", {"model": MODEL}, {"tokens": [-1]}, id="detokenize-negative-token"),
    pytest.param("/tokenize", {"model": MODEL}, {"messages": {}}, id="tokenize-messages-not-a-list"),
]


@pytest.mark.parametrize(("path", "body", "bad"), FINDINGS)
def test_fuzzer_findings_are_client_errors(fuzzed: FuzzedGateway, path: str, body: dict, bad: dict) -> None:
    status, answer = call(f"{fuzzed.gateway.url}{path}", {**body, **bad})
    assert 400 <= status < 500 and isinstance(answer, dict) and "error" in answer, (status, answer)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"])
def test_error_answers_carry_the_request_id(fuzzed: FuzzedGateway, path: str) -> None:
    """docs/api.md: every answer carries X-Request-Id, refusals too: the client's own when it sent
    a valid one, else one the gateway made."""
    url = f"{fuzzed.gateway.url}{path}"
    for headers, expected in (({"X-Request-Id": "mine-1"}, "mine-1"), ({}, None), ({"X-Request-Id": "bad id"}, None)):
        request = urllib.request.Request(
            url, data=b'{"model": 1}', headers={"Content-Type": "application/json", **headers}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400
        given = refused.value.headers.get("X-Request-Id")
        assert given == expected if expected is not None else given and given != "bad id"
