"""benchmarks/soak.py, the chaos soak: its checker classifies hand-made answers as documented
endings or bugs and counts lost and duplicated tokens; its fault-injecting TCP proxy really cuts
a client's connection mid-stream, blackholes and refuses; its fault schedule is seeded; and a
short CI run (a real sim fleet, two gateway replicas and NATS, faults of every kind) ends with
every request identical or documented, no token lost or duplicated, and no process left."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.scripts import BENCHMARKS, load_benchmark
from support.waiting import wait_until_async

check = load_benchmark("_soak_check")
faults = load_benchmark("_soak_faults")

CI_SECONDS = 25  # of load and faults (faults every 1-2 s); the whole run takes about 40 s on the 2-core box


# ------------------------------------------------------------------------------ the checker
def _chunk(text: str, ids: list[int] | None = None, finish: str | None = None, rid: str = "cmpl-1") -> dict:
    return {"id": rid, "choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}]}


def _usage(prompt: int, completion: int) -> dict:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {"id": "cmpl-1", "choices": [], "usage": usage}


REF_PIECES = [" a", " b", " c", " d"]
REF_IDS = [11, 12, 13, 14]


def _reference() -> object:
    events = [_chunk(p, [i]) for p, i in zip(REF_PIECES, REF_IDS, strict=True)]
    events[-1]["choices"][0]["finish_reason"] = "length"
    return check.streamed_tokens([*events, _usage(5, 4)], chat=False)


def _seen(events: list, *, done: bool = True, ids: bool = True, **kw) -> object:
    seen = check.Seen(0, chat=False, stream=True, want_ids=ids, want_usage=True, start=0.0, end=1.0, replica=0)
    seen.status, seen.events, seen.done = 200, events, done
    for key, value in kw.items():
        setattr(seen, key, value)
    return seen


def _stream(pieces: list[str], ids: list[int], *, finish: bool = True, usage: int | None = None) -> list:
    events = [_chunk(p, [i]) for p, i in zip(pieces, ids, strict=True)]
    if finish:
        events[-1]["choices"][0]["finish_reason"] = "length"
    return [*events, _usage(5, len(ids) if usage is None else usage)]


@pytest.mark.unit
def test_alignment_counts_lost_duplicated_and_different_tokens() -> None:
    assert check.align([1, 2, 3, 4], [1, 2, 3, 4]) == (0, 0, 0)
    assert check.align([1, 2, 4], [1, 2, 3, 4]) == (1, 0, 0)  # one lost
    assert check.align([1, 2, 3, 2, 3, 4], [1, 2, 3, 4]) == (0, 2, 0)  # a failover that repeats two
    assert check.align([1, 2, 9, 4], [1, 2, 3, 4]) == (0, 0, 1)  # one different
    assert check.align([1, 2], [1, 2, 3, 4], partial=True) == (0, 0, 0)  # a cut stream: the tail is not lost
    assert check.align([1, 3], [1, 2, 3, 4], partial=True) == (1, 0, 0)


@pytest.mark.unit
def test_an_answer_equal_to_the_reference_is_identical_and_a_broken_one_is_a_mismatch() -> None:
    ref = _reference()
    assert check.classify(_seen(_stream(REF_PIECES, REF_IDS)), ref, []).kind == "identical"
    # the same, text only (the client did not ask for ids): compared piece by piece
    plain = [{**e, "choices": [{**c, "token_ids": None} for c in e["choices"]]} for e in _stream(REF_PIECES, REF_IDS)]
    assert check.classify(_seen(plain, ids=False), ref, []).kind == "identical"

    lost = check.classify(_seen(_stream([" a", " b", " d"], [11, 12, 14])), ref, [])
    assert (lost.kind, lost.lost, lost.duplicated) == ("mismatch", 1, 0)
    dup = check.classify(_seen(_stream([" a", " b", " b", " c", " d"], [11, 12, 12, 13, 14])), ref, [])
    assert (dup.kind, dup.lost, dup.duplicated) == ("mismatch", 0, 1)
    usage = check.classify(_seen(_stream(REF_PIECES, REF_IDS, usage=5)), ref, [])
    assert usage.kind == "mismatch" and "usage.completion_tokens 5 != 4" in usage.cause
    two_ids = _stream(REF_PIECES, REF_IDS)
    two_ids[2]["id"] = "cmpl-2"
    assert "2 response ids" in check.classify(_seen(two_ids), ref, []).cause
    no_finish = check.classify(_seen(_stream(REF_PIECES, REF_IDS, finish=False)), ref, [])
    assert no_finish.kind == "mismatch" and "finish_reason" in no_finish.cause


@pytest.mark.unit
def test_error_statuses_and_events_are_documented_only_in_their_documented_shape() -> None:
    ref = _reference()
    error = {
        "error": {
            "message": "upstream decode-0 failed mid-stream",
            "type": "upstream_error",
            "param": None,
            "code": None,
        }
    }
    body = json.dumps(error).encode()

    def status(code: int, headers: dict) -> str:
        seen = _seen([], status=code, body=body, headers=headers)
        return check.classify(seen, None, []).kind

    assert status(503, {"retry-after": "1"}) == "error_status"
    assert status(502, {"retry-after": "1"}) == "error_status"
    assert status(429, {"retry-after": "1", "x-pdgate-reject-reason": "queue-full"}) == "error_status"
    assert status(429, {"retry-after": "1"}) == "undocumented"  # no reject reason
    assert status(503, {}) == "undocumented"  # no Retry-After
    assert status(500, {"retry-after": "1"}) == "undocumented"
    assert check.classify(_seen([], status=503, body=b"busy", headers={"retry-after": "1"}), None, []).kind == (
        "undocumented"
    )

    before = _stream(REF_PIECES[:2], REF_IDS[:2], finish=False)[:-1]
    assert check.classify(_seen([*before, error]), ref, []).kind == "error_event"
    assert check.classify(_seen([*before, error], done=False), ref, []).kind == "undocumented"
    assert check.classify(_seen([*before, {"error": "boom"}]), ref, []).kind == "undocumented"
    repeated = _stream([" a", " b", " b"], [11, 12, 12], finish=False)[:-1]
    assert check.classify(_seen([*repeated, error]), ref, []).kind == "mismatch"  # a duplicate before the error
    assert check.classify(_seen(before, done=False), ref, []).kind == "undocumented"  # cut without an error event


@pytest.mark.unit
def test_cuts_hangs_and_refusals_are_classified_by_what_the_replicas_went_through() -> None:
    ref = _reference()
    before = _stream(REF_PIECES[:2], REF_IDS[:2], finish=False)[:-1]
    cut = _seen(before, done=False, cut="ClientPayloadError", start=10.0, end=12.0, replica=1)
    assert check.classify(cut, ref, [(1, 11.0, 13.0)]).kind == "replica_killed"
    assert check.classify(cut, ref, [(0, 11.0, 13.0)]).kind == "undocumented"  # the other replica was killed
    assert check.classify(cut, ref, [(1, 30.0, 31.0)]).kind == "undocumented"  # killed later
    hang = check.classify(_seen(before, done=False, timed_out=True, end=60.0), ref, [])
    assert hang.kind == "hang" and not hang.documented
    refused = _seen([], status=None, refused="ClientConnectorError")
    assert check.classify(refused, None, []).kind == "undocumented"


# ------------------------------------------------------------------------------ the proxy
async def _streaming_server(written: list[int]) -> asyncio.Server:
    """An HTTP server that answers every connection with an endless event stream, one event per 10 ms."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        try:
            while True:
                writer.write(b"data: {}\n\n")
                await writer.drain()
                written.append(1)
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            pass

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def _proxied_stream() -> AsyncIterator[tuple[list[int], faults.FaultProxy]]:
    """A streaming server behind a fault proxy (what it wrote, the proxy); both closed after."""
    written: list[int] = []
    server = await _streaming_server(written)
    proxy = await faults.FaultProxy("engine", 0, server.sockets[0].getsockname()[1]).start()
    try:
        yield written, proxy
    finally:
        await proxy.close()
        server.close()


async def _open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    await reader.readuntil(b"data: {}\n\n")  # the stream is flowing through the proxy
    return reader, writer


async def _read_until_reset(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


@pytest.mark.unit
def test_a_reset_in_the_proxy_cuts_the_clients_stream_mid_way() -> None:
    async def scenario() -> None:
        async with _proxied_stream() as (written, proxy):
            reader, writer = await _open_stream(proxy.listen_port)
            assert len(proxy.mid_stream()) == 1  # an event stream that is moving
            assert proxy.reset_one(random.Random(0))
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(_read_until_reset(reader), 5)
            assert proxy.resets == 1 and not proxy.live()
            writer.close()

    asyncio.run(scenario())


@pytest.mark.unit
def test_a_paused_proxy_holds_the_stream_and_a_downed_one_refuses_connections() -> None:
    async def scenario() -> None:
        async with _proxied_stream() as (written, proxy):
            reader, writer = await _open_stream(proxy.listen_port)

            def delivered() -> int:
                return sum(pipe.bytes_down for pipe in proxy.live())

            proxy.pause()
            held = delivered()
            mark = len(written)
            await wait_until_async(lambda: len(written) >= mark + 5, message="the engine to send 5 more events")
            assert delivered() == held  # the engine kept sending; nothing went on to the client
            proxy.resume()
            await wait_until_async(lambda: delivered() > held, message="the held events to go on")
            assert (await asyncio.wait_for(reader.read(65536), 5)).startswith(b"data: {}")
            writer.close()

            assert await proxy.down() >= 1
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", proxy.listen_port)
            await proxy.up()
            reader, writer = await _open_stream(proxy.listen_port)  # the same port serves again
            writer.close()

    asyncio.run(scenario())


@pytest.mark.unit
def test_the_fault_schedule_is_seeded_and_keeps_to_the_kinds_asked_for() -> None:
    kinds = ("engine_kill", "drain", "conn_reset")
    plan = faults.plan_faults(3, 50, kinds, engines=4, replicas=2, gap_s=(1.0, 2.0))
    assert plan == faults.plan_faults(3, 50, kinds, engines=4, replicas=2, gap_s=(1.0, 2.0))
    assert plan != faults.plan_faults(4, 50, kinds, engines=4, replicas=2, gap_s=(1.0, 2.0))
    assert {p.kind for p in plan} == set(kinds)
    assert all(0 <= p.target < 4 and 1.0 <= p.gap_s <= 2.0 for p in plan)
    assert all(faults.HOLD_S[p.kind][0] <= p.hold_s <= faults.HOLD_S[p.kind][1] for p in plan)


# ------------------------------------------------------------------------------ a CI run
@pytest.mark.slow
def test_a_short_ci_soak_ends_every_request_as_documented_with_no_token_lost(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    run = subprocess.run(
        [
            *(sys.executable, str(BENCHMARKS / "soak.py"), "--ci", "--duration", str(CI_SECONDS)),
            *("--gap", "1,2", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=CI_SECONDS + 240,
    )
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    report = json.loads((out / "soak.json").read_text())
    by_kind = report["faults"]["by_kind"]
    assert len(by_kind) >= 4 and sum(by_kind.values()) >= 6, by_kind  # faults of many kinds really happened
    assert not report["faults"]["failed_to_apply"], tail
    assert report["endings"].get("identical", 0) >= 0.5 * report["requests"], report["endings"]
    assert report["tokens"] == {"lost": 0, "duplicated": 0, "different": 0}, report["bugs"][:5]
    assert not report["bugs"] and not set(report["endings"]) & set(check.BUGS), report["bugs"][:5]
    assert report["processes_left"] == [] and "left running: 0 []" in run.stdout
    assert (out / "soak-resources.png").stat().st_size > 10_000
    assert all(g["fds"]["max"] > 0 for g in report["gateway_resources"].values())
