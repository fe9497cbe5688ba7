"""Clients that leave at every phase of a request leave nothing behind (issue 21, item 2).

A raw socket client (so that it leaves at an exact moment) talks to a real gateway over real
simulated engines: PD (one prefill and one decode engine, vLLM's sequential KV hand-off and
SGLang's concurrent one) and colocated (two engines; admission holds requests while both are
busy; streams move when the admin API says so). It leaves mid-head, mid-body, while queued in
admission, during the prefill leg, after the first token of a stream, mid-decode of a
non-streamed answer, and while its stream is being moved to another engine. Then, polled: no
request in flight on any instance in the gateway's accounts (``/admin/instances``, ``/metrics``)
and none queued; the gateway counted the request as 499 (where it reached its handler); each
engine aborted exactly the legs it had of the request (its abort counter) and is idle: nothing
running, waiting, holding KV for a hand-off, pulling KV or migrating, no KV block in use; and a
normal request still succeeds.

The engines run slowly (``--time-scale 0.05``) with 512-token prefill chunks: a ~3000-token
prompt takes ~1.5 s to prefill, a step at most ~0.25 s, a decode step ~0.1 s, so each phase
lasts long enough to leave in it. Prompts start with their request's id, so that no case finds
another's prompt in a prefix cache. Each fleet is shared by the cases that use it (started by
the first); each case starts from an idle fleet and must leave it idle.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.fleet import MODEL, call, engine_flags, get_json, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim
from support.streams import admin
from support.waiting import wait_until

SLOW = 0.05  # engine time scale: 20x slower than the modelled GPU
CHUNK = "512"  # prefill tokens per step: an abort takes effect within ~0.25 s
LONG_WORDS = 1500  # "word " is two tokens: a ~3000-token prompt, ~1.5 s of prefill at SLOW
MEDIUM_WORDS = 500  # ~1000 tokens, ~0.5 s
LONG_ANSWER = 1000  # output tokens (~100 s at SLOW): more than any case waits for; fits a long prompt
CLEAN_TIMEOUT_S = 15.0
ENGINE_BUSY_KEYS = (
    "running",
    "num_waiting",
    "held_kv",
    "kv_pulls_in_flight",
    "migrations_in_flight",
    "migration_reservations",
    "kv_cache_usage",
)
GATEWAY_BUSY_KEYS = ("inflight_requests", "decode_inflight", "prefill_inflight")
NO_SLO = {"default": {"ttft_ms": None, "tpot_ms": None}}  # best effort: admission never rejects for time
RELAXED_HEALTH = {"interval_s": 1.0, "timeout_s": 5.0, "failure_threshold": 3, "cooldown_s": 1}
FLEETS: dict[str, tuple[tuple[str, ...], str, dict[str, Any]]] = {
    # two colocated engines; admission holds a best-effort request while every engine has more than
    # 50 ms of predicted prefill work; streams move only when the admin API says so, by recomputation
    "colocated": (
        ("both", "both"),
        "vllm",
        {
            "admission": {"parameters": {"best_effort_wait_s": 0.05}},
            "migration": {"policy": "no-migration", "interval_s": 0.1, "mechanism": "recompute"},
        },
    ),
    # one prefill and one decode engine: vLLM's sequential KV hand-off, SGLang's concurrent one
    "pd-vllm": (("prefill", "decode"), "vllm", {}),
    "pd-sglang": (("prefill", "decode"), "sglang", {}),
}


# ---------------------------------------------------------------------------- fleets
@dataclass
class Fleet:
    """A gateway and the simulated engines it serves from, by the gateway's instance ids."""

    gateway: PdgateProcess
    api: str  # the engines' flavour: "vllm" or "sglang"
    engines: dict[str, PdgateProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.gateway.url

    def of_role(self, role: str) -> str:
        """The instance id of the (first) engine of ``role``."""
        return next(i for i in self.engines if i.startswith(f"{role}-"))


@contextlib.contextmanager
def running_fleet(path: Path, roles: tuple[str, ...], api: str, **gateway: Any) -> Iterator[Fleet]:
    """Slow engines of ``roles`` and a gateway over them (best-effort SLOs, unhurried health
    checks); every process is stopped at the end, also when a later one failed to start."""
    kind = "sim-sglang" if api == "sglang" else "sim"
    with contextlib.ExitStack() as stack:
        engines: dict[str, PdgateProcess] = {}
        entries = []
        for role in roles:
            proc = start_sim(*engine_flags(role, api, extra=("--max-num-batched-tokens", CHUNK)), time_scale=SLOW)
            stack.callback(proc.stop)
            entry = instance_entry(proc, role, kind)
            engines[entry["id"]] = proc
            entries.append(entry)
        config = write_config(path, entries, **{"slo": NO_SLO, "health": RELAXED_HEALTH, **gateway})
        gw = start_gateway(config)
        stack.callback(gw.stop)
        yield Fleet(gw, api, engines)


class Fleets:
    """The fleets of :data:`FLEETS`, each started when a case first needs it and kept for the next."""

    def __init__(self, root: Path, stack: contextlib.ExitStack) -> None:
        self.root = root
        self.stack = stack
        self.started: dict[str, Fleet] = {}

    def get(self, name: str) -> Fleet:
        if name not in self.started:
            roles, api, gateway = FLEETS[name]
            self.started[name] = self.stack.enter_context(
                running_fleet(self.root / f"{name}.yaml", roles, api, **gateway)
            )
        return self.started[name]


@pytest.fixture(scope="module")
def fleets(tmp_path_factory) -> Iterator[Fleets]:
    with contextlib.ExitStack() as stack:
        yield Fleets(tmp_path_factory.mktemp("fleets"), stack)


@pytest.fixture
def fleet(request, fleets: Fleets) -> Fleet:
    """The fleet the case names (indirect parametrization), idle before the case starts."""
    chosen = fleets.get(request.param)
    wait_until_nothing_left(chosen)
    return chosen


# ---------------------------------------------------------------------------- the client
def request_bytes(request_id: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 completion request for the gateway, with ``X-Request-Id`` (and ``headers``)."""
    data = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {request_id}\r\n{extra}Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def completion(
    request_id: str, words: int = 8, *, stream: bool = False, max_tokens: int = LONG_ANSWER
) -> dict[str, Any]:
    """A completion body whose prompt (``words`` words after the request's id) no other request shares."""
    prompt = f"{request_id}: " + "word " * words
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


class RawClient:
    """One connection to the gateway that sends exactly what it is given and can leave at any moment."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.received = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes) -> bytes:
        """Read until ``marker`` has arrived (the socket's timeout bounds each read)."""
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the gateway closed the connection before {marker!r}: {self.received[:500]!r}")
            self.received += chunk
        return self.received

    def still_going(self) -> bool:
        """True unless the gateway already answered with an error (then AssertionError, with it)."""
        self.sock.setblocking(False)
        try:
            self.received += self.sock.recv(65536)
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(10)
        if self.received.startswith(b"HTTP/1.1 ") and not self.received.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"the gateway refused the request: {self.received[:500]!r}")
        return True

    def leave(self, *, reset: bool = False) -> None:
        """Close the connection: a FIN, or with ``reset`` a TCP RST (an abortive close)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@contextlib.contextmanager
def raw_client(url: str) -> Iterator[RawClient]:
    client = RawClient(url)
    try:
        yield client
    finally:
        client.sock.close()


# ---------------------------------------------------------------------------- where a request is
def engine_ids(engine: PdgateProcess, request_id: str) -> list[str]:
    """The engine's running requests of ``request_id`` (the engine adds a suffix to the id)."""
    return [rid for rid in get_json(f"{engine.url}/sim/state")["running"] if rid.startswith(f"{request_id}-")]


def running_on(fleet: Fleet, request_id: str, role: str = "") -> str | None:
    """The instance id of the engine (of ``role``, if given) that runs ``request_id`` now."""
    return next((i for i, e in fleet.engines.items() if i.startswith(role) and engine_ids(e, request_id)), None)


def wait_until_running(fleet: Fleet, request_id: str, client: RawClient, role: str = "") -> str:
    """Until ``request_id`` runs on an engine (of ``role``): its instance id. Fails at once if
    ``client`` got an error instead."""
    return wait_until(
        lambda: client.still_going() and running_on(fleet, request_id, role),
        timeout=15,
        message=f"{request_id} to run on an engine {role}",
    )


def wait_until_decoding(fleet: Fleet, request_id: str, client: RawClient, role: str = "", steps: int = 3) -> str:
    """Until ``request_id`` runs on an engine and that engine took ``steps`` steps since (its
    prompt is short and it runs alone: a step after its first is one of its decode steps)."""
    instance_id = wait_until_running(fleet, request_id, client, role)
    engine = fleet.engines[instance_id]
    start = get_json(f"{engine.url}/sim/state")["steps"]

    def decoding() -> bool:
        steps_now = get_json(f"{engine.url}/sim/state")["steps"]
        return client.still_going() and steps_now >= start + steps and bool(engine_ids(engine, request_id))

    wait_until(decoding, timeout=15, message=f"{request_id} to take {steps} decode steps")
    return instance_id


def engine_saw(fleet: Fleet, request_id: str) -> bool:
    """Whether a generation request of ``request_id`` ever reached any engine of the fleet."""
    return any(
        str(record["request_id"]).startswith(f"{request_id}-")
        for engine in fleet.engines.values()
        for record in get_json(f"{engine.url}/sim/traces")["requests"]
    )


# ---------------------------------------------------------------------------- what is left
def leftovers(fleet: Fleet) -> list[str]:
    """Everything still held anywhere in the fleet: the gateway's queue and in-flight accounts,
    the engines' requests, held KV, KV pulls, migrations and KV blocks in use."""
    left = []
    queued = metric(fleet.url, "pdgate_admission_queue_length")
    if queued:
        left.append(f"gateway: {queued:g} request(s) in the admission queue")
    for inst in get_json(f"{fleet.url}/admin/instances")["data"]:
        busy = {key: inst["load"][key] for key in GATEWAY_BUSY_KEYS if inst["load"][key]}
        if busy:
            left.append(f"gateway, on {inst['id']}: {busy}")
        if inst["streams"]:
            left.append(f"gateway, on {inst['id']}: streams {[s['request_id'] for s in inst['streams']]}")
    tokens = metric(fleet.url, "pdgate_instance_inflight_tokens")
    if tokens:
        left.append(f"gateway: {tokens:g} tokens in flight")
    for instance_id, engine in fleet.engines.items():
        state = get_json(f"{engine.url}/sim/state")
        busy = {key: state[key] for key in ENGINE_BUSY_KEYS if state[key]}
        if busy:
            left.append(f"engine {instance_id}: {busy}")
    return left


def wait_until_nothing_left(fleet: Fleet) -> None:
    wait_until(
        lambda: not leftovers(fleet),
        timeout=CLEAN_TIMEOUT_S,
        interval=0.05,
        message=lambda: f"nothing left behind; still there: {leftovers(fleet)}; the gateway's log: {fleet.gateway.log}",
    )


@dataclass(frozen=True)
class Tally:
    """What a fleet counted: requests whose client left first (the gateway's 499s), and the
    requests each engine aborted (by instance id)."""

    closed: float
    aborted: dict[str, float]

    def plus(self, closed: int, aborted: dict[str, int]) -> Tally:
        return Tally(self.closed + closed, {i: n + aborted.get(i, 0) for i, n in self.aborted.items()})


def tally(fleet: Fleet) -> Tally:
    if fleet.api == "sglang":
        name, labels = "sglang:num_aborted_requests_total", {}
    else:
        name, labels = "vllm:request_success_total", {"finished_reason": "abort"}
    return Tally(
        metric(fleet.url, "pdgate_requests_total", status="499"),
        {i: metric(engine.url, name, **labels) for i, engine in fleet.engines.items()},
    )


def assert_still_serves(fleet: Fleet) -> None:
    status, body = call(f"{fleet.url}/v1/completions", completion("after", max_tokens=2), timeout=30)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2


def assert_left_nothing(fleet: Fleet, before: Tally, *, closed: int = 1, aborted: dict[str, int]) -> None:
    """The fleet is idle again; the gateway counted ``closed`` more requests as 499 (0 for one that
    never reached its handler); the engine of each instance id in ``aborted`` aborted that many
    more requests, the others none (so a leg was aborted, not run to its end); and a normal
    request still succeeds."""
    wait_until_nothing_left(fleet)
    expected = before.plus(closed, aborted)
    wait_until(lambda: tally(fleet) == expected, timeout=5, message=lambda: f"{expected} (now {tally(fleet)})")
    assert_still_serves(fleet)
    wait_until_nothing_left(fleet)  # (so the next case starts from an idle fleet)
    assert tally(fleet) == expected


# ---------------------------------------------------------------------------- before the handler
@pytest.mark.parametrize("fleet", ["colocated", "pd-vllm"], indirect=True)
def test_leaving_mid_head_leaves_nothing(fleet: Fleet) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        whole = request_bytes("mid-head", completion("mid-head"))
        client.send(whole[: whole.index(b"X-Request-Id") + 5])  # the request line and half the headers
        client.leave()
    assert_left_nothing(fleet, before, closed=0, aborted={})
    assert not engine_saw(fleet, "mid-head")


@pytest.mark.parametrize("fleet", ["colocated", "pd-vllm"], indirect=True)
def test_leaving_mid_body_leaves_nothing(fleet: Fleet) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        whole = request_bytes("mid-body", completion("mid-body", LONG_WORDS))
        body_at = whole.index(b"\r\n\r\n") + 4
        client.send(whole[: body_at + (len(whole) - body_at) // 2])  # Content-Length announced, half sent
        client.leave()
    assert_left_nothing(fleet, before, closed=0, aborted={})
    assert not engine_saw(fleet, "mid-body")


# ---------------------------------------------------------------------------- colocated
def engine_load(fleet: Fleet) -> dict[str, int]:
    """Requests running or waiting on each engine, by instance id."""
    states = {i: get_json(f"{e.url}/sim/state") for i, e in fleet.engines.items()}
    return {i: state["num_running"] + state["num_waiting"] for i, state in states.items()}


@pytest.mark.parametrize("fleet", ["colocated"], indirect=True)
def test_leaving_while_queued_in_admission_leaves_the_queue(fleet: Fleet) -> None:
    before = tally(fleet)
    per_engine = 3  # ~4.5 s of prefill on each engine, ~3 s of it predicted ahead of a newcomer throughout
    with contextlib.ExitStack() as stack:
        occupiers = [stack.enter_context(raw_client(fleet.url)) for _ in range(per_engine * len(fleet.engines))]
        for n, occupier in enumerate(occupiers):  # with a TTFT SLO of a minute, admission dispatches them at once
            body = completion(f"occupier{n}", LONG_WORDS, stream=True)
            occupier.send(request_bytes(f"occupier{n}", body, {"x-slo-ttft-ms": "60000"}))
        wait_until(
            lambda: all(c.still_going() for c in occupiers) and sum(engine_load(fleet).values()) == len(occupiers),
            timeout=15,
            message=lambda: f"every occupier on an engine (now {engine_load(fleet)})",
        )
        placed = engine_load(fleet)
        queued = stack.enter_context(raw_client(fleet.url))
        queued.send(request_bytes("queued", completion("queued")))  # best effort: it waits for a free engine
        wait_until(
            lambda: metric(fleet.url, "pdgate_admission_queue_length") == 1,
            message=lambda: f"the request to queue (engines: {engine_load(fleet)}, answer: {queued.received[:300]!r})",
        )
        queued.leave()
        wait_until(lambda: metric(fleet.url, "pdgate_admission_queue_length") == 0, message="it left the queue")
        # counted as 499 while the engines are still busy: it left the queue because its client left
        wait_until(lambda: tally(fleet).closed == before.closed + 1, timeout=5, message="the queued one's 499")
        for occupier in occupiers:
            occupier.leave()
    assert_left_nothing(fleet, before, closed=1 + len(occupiers), aborted=placed)  # the occupiers' aborts
    assert not engine_saw(fleet, "queued")  # never dispatched, not even once capacity freed up


@pytest.mark.parametrize("fleet", ["colocated"], indirect=True)
def test_colocated_leaving_mid_prefill_aborts_it(fleet: Fleet) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        client.send(request_bytes("co-prefill", completion("co-prefill", LONG_WORDS, stream=True)))
        instance_id = wait_until_running(fleet, "co-prefill", client)
        client.leave()
    assert_left_nothing(fleet, before, aborted={instance_id: 1})


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("fleet", ["colocated"], indirect=True)
def test_colocated_leaving_mid_stream_aborts_it(fleet: Fleet, reset: bool) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        client.send(request_bytes("co-stream", completion("co-stream", stream=True)))
        client.read_until(b'"text"')  # the first token's event
        instance_id = running_on(fleet, "co-stream")
        client.leave(reset=reset)
    assert instance_id is not None
    assert_left_nothing(fleet, before, aborted={instance_id: 1})


@pytest.mark.parametrize("fleet", ["colocated"], indirect=True)
def test_colocated_leaving_mid_decode_of_a_whole_answer_aborts_it(fleet: Fleet) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        client.send(request_bytes("co-whole", completion("co-whole")))
        instance_id = wait_until_decoding(fleet, "co-whole", client)
        assert client.received == b""  # nothing answered yet
        client.leave()
    assert_left_nothing(fleet, before, aborted={instance_id: 1})


# ---------------------------------------------------------------------------- PD
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("fleet", ["pd-vllm", "pd-sglang"], indirect=True)
def test_pd_leaving_during_the_prefill_leg_aborts_both_legs(fleet: Fleet, stream: bool) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        client.send(request_bytes("pd-prefill", completion("pd-prefill", LONG_WORDS, stream=stream)))
        wait_until_running(fleet, "pd-prefill", client, "prefill")
        client.leave()
    # vLLM sends the decode leg after the prefill leg (so never, here); SGLang sends both at once
    aborted = {fleet.of_role("prefill"): 1, fleet.of_role("decode"): 1 if fleet.api == "sglang" else 0}
    assert_left_nothing(fleet, before, aborted=aborted)


@pytest.mark.parametrize("fleet", ["pd-vllm", "pd-sglang"], indirect=True)
def test_pd_leaving_after_the_first_token_aborts_the_decode_leg(fleet: Fleet) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        client.send(request_bytes("pd-stream", completion("pd-stream", stream=True)))
        client.read_until(b'"text"')
        assert running_on(fleet, "pd-stream", "decode")
        client.leave()
    assert_left_nothing(fleet, before, aborted={fleet.of_role("decode"): 1})  # the prefill leg had ended


@pytest.mark.parametrize("fleet", ["pd-vllm", "pd-sglang"], indirect=True)
def test_pd_leaving_mid_decode_of_a_whole_answer_aborts_the_decode_leg(fleet: Fleet) -> None:
    before = tally(fleet)
    with raw_client(fleet.url) as client:
        client.send(request_bytes("pd-whole", completion("pd-whole")))
        wait_until_decoding(fleet, "pd-whole", client, "decode")
        assert client.received == b""
        client.leave()
    assert_left_nothing(fleet, before, aborted={fleet.of_role("decode"): 1})


# ---------------------------------------------------------------------------- migration
@dataclass
class Move:
    """A stream whose client left while the admin API moved it: where from, where to, and what
    the admin call got (its status and JSON, or what it raised)."""

    source: str
    target: str
    answers: list[tuple[int, Any] | BaseException] = field(default_factory=list)


def leave_during_a_move(fleet: Fleet, request_id: str) -> Move:
    """Stream ``request_id``; after its first token, move it with the admin API and leave while
    the continuation recomputes the prompt on the other engine (~0.5 s)."""
    with raw_client(fleet.url) as client:
        client.send(request_bytes(request_id, completion(request_id, MEDIUM_WORDS, stream=True)))
        client.read_until(b'"text"')
        source = running_on(fleet, request_id)
        assert source is not None
        move = Move(source, next(i for i in fleet.engines if i != source))

        def call_admin() -> None:
            try:
                move.answers.append(admin(fleet.url, f"/admin/requests/{request_id}/migrate"))
            except Exception as exc:  # (the test reports it)
                move.answers.append(exc)

        mover = threading.Thread(target=call_admin)
        mover.start()
        try:
            assert wait_until_running(fleet, f"{request_id}-m1", client) == move.target
            client.leave()
        finally:
            mover.join(30)
    return move


@pytest.mark.parametrize("fleet", ["colocated"], indirect=True)
def test_leaving_during_a_migration_aborts_both_ends_of_the_move(fleet: Fleet) -> None:
    before = tally(fleet)
    move = leave_during_a_move(fleet, "moving")
    assert_left_nothing(fleet, before, aborted={move.source: 1, move.target: 1})


@pytest.mark.parametrize("fleet", ["colocated"], indirect=True)
def test_the_admin_move_of_a_stream_whose_client_left_is_answered(fleet: Fleet) -> None:
    before = tally(fleet)
    move = leave_during_a_move(fleet, "moved-away")
    assert_left_nothing(fleet, before, aborted={move.source: 1, move.target: 1})
    [answer] = move.answers
    assert not isinstance(answer, BaseException), f"the admin call got no answer: {answer!r}"
    status, body = answer
    assert status < 500, body
    assert status != 200 or body["migrated"] is False, body
