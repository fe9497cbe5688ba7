"""OpenAI's Responses API through the gateway: real engine processes, PD in both protocols, the openai client.

The gateway serves ``/v1/responses`` as a chat completion and re-encodes the answer, so a
Responses answer must hold exactly the text and token counts of the same chat request served by a
colocated engine, streamed or not, and a stream that fails over must still read as one answer.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from support.fleet import MODEL, engine_flags, instance_entry, metric, start_gateway, write_config
from support.procs import PdgateProcess, start_sim
from support.streams import serving

PROMPT = "Write about the gateway that splits prefill from decode, and why it helps long prompts. " * 4
TOKENS = 24


@dataclass
class Fleet:
    gateway: PdgateProcess
    engines: list[PdgateProcess]
    reference: PdgateProcess

    def client(self, url: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url or self.gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module", params=[("vllm", "sim"), ("sglang", "sim-sglang")], ids=["vllm", "sglang"])
def pd_fleet(request, tmp_path_factory) -> Iterator[Fleet]:
    api, kind = request.param
    procs: list[PdgateProcess] = []
    try:
        entries = []
        for role in ("prefill", "decode"):
            proc = start_sim(*engine_flags(role, api))
            procs.append(proc)
            entries.append(instance_entry(proc, role, kind))
        reference = start_sim(*engine_flags("both", api))
        procs.append(reference)
        gateway = start_gateway(write_config(tmp_path_factory.mktemp(api) / "fleet.yaml", entries))
        procs.append(gateway)
        yield Fleet(gateway, procs[:2], reference)
    finally:
        for proc in procs:
            proc.stop()


def reference_chat(fleet: Fleet, prompt: str, tokens: int = TOKENS, **extra: Any):
    """The same request as a chat completion, answered by the colocated engine directly."""
    return fleet.client(fleet.reference.url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
        max_completion_tokens=tokens,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )


def test_responses_through_pd_equal_a_colocated_chat(pd_fleet: Fleet) -> None:
    client = pd_fleet.client()
    for i in range(2):
        prompt = f"Case {i}. {PROMPT}"
        ref = reference_chat(pd_fleet, prompt)
        ref_text = ref.choices[0].message.content
        response = client.responses.create(
            model=MODEL,
            instructions="Be brief.",
            input=prompt,
            max_output_tokens=TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert response.object == "response" and response.id.startswith("resp_")
        assert response.output_text == ref_text
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == TOKENS == ref.usage.completion_tokens
        assert response.usage.input_tokens == ref.usage.prompt_tokens
        assert response.usage.total_tokens == ref.usage.prompt_tokens + TOKENS
        assert response.max_output_tokens == TOKENS and response.instructions == "Be brief."

        events = list(
            client.responses.create(
                model=MODEL,
                input=[
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "input_text", "text": prompt}]},
                ],
                max_output_tokens=TOKENS,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        kinds = [e.type for e in events]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",
        ]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ref_text
        final = events[-1].response
        assert final.id == events[0].response.id and final.output_text == ref_text
        assert final.usage.output_tokens == TOKENS and final.usage.input_tokens == ref.usage.prompt_tokens
        # the same prompt again: the prefill engine's cache holds it, and the client is told so
        assert final.usage.input_tokens_details.cached_tokens > 0 == response.usage.input_tokens_details.cached_tokens
    assert metric(pd_fleet.gateway.url, "pdgate_requests_total", route="/v1/responses", status="200") == 4


def test_the_stream_helper_reads_a_completed_response(pd_fleet: Fleet) -> None:
    """``client.responses.stream`` checks the event order and needs ``response.completed``: an answer
    that ends at the model's own stop (a stop string here) completes."""
    client = pd_fleet.client()
    ref = reference_chat(pd_fleet, PROMPT, tokens=64)
    words = ref.choices[0].message.content.split()
    stop = words[len(words) // 2]
    with client.responses.stream(
        model=MODEL,
        instructions="Be brief.",
        input=PROMPT,
        max_output_tokens=64,
        temperature=0,
        extra_body={"ignore_eos": True, "stop": [stop]},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output_text == "".join(deltas)
    assert ref.choices[0].message.content.startswith(final.output_text)
    assert stop not in final.output_text and 0 < final.usage.output_tokens < 64


def _post(url: str, body: Any, method: str = "POST") -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data if method == "POST" else None, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": MODEL, "input": "hi", "previous_response_id": "resp_1"}, 400, "does not keep"),
        ({"model": MODEL, "input": "hi", "conversation": "conv_1"}, 400, "does not keep"),
        ({"model": MODEL, "input": "hi", "background": True}, 400, "background"),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "f"}]}, 400, "tools"),
        ({"model": MODEL, "input": []}, 400, "empty"),
        ({"model": MODEL, "input": [{"type": "function_call_output", "output": "1"}]}, 400, "only message items"),
        ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file"}]}]}, 400, "not supported"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "text": {"format": "json"}}, 400, "text.format"),
        ({"model": MODEL, "input": "hi", "text": {"format": {"type": "grammar"}}}, 400, "not supported"),
        ({"model": "no-such-model", "input": "hi"}, 404, "does not exist"),
        ({"input": "hi"}, 400, "model"),
    ],
)
def test_bad_responses_requests_get_openai_errors(pd_fleet: Fleet, body: Any, status: int, says: str) -> None:
    code, answer = _post(f"{pd_fleet.gateway.url}/v1/responses", body)
    assert code == status
    assert says in answer["error"]["message"] and answer["error"]["type"]


def test_stored_responses_are_not_found_with_the_reason(pd_fleet: Fleet) -> None:
    for method in ("GET", "DELETE"):
        code, answer = _post(f"{pd_fleet.gateway.url}/v1/responses/resp_123", b"", method=method)
        assert code == 404 and "does not store responses" in answer["error"]["message"]


# ---- failover of a Responses stream (colocated engines: the stream moves by token-id continuation)


def _both_fleet(sim_factory, tmp_path, *, failover: bool) -> tuple[list[PdgateProcess], list[dict], PdgateProcess]:
    engines = [sim_factory(*engine_flags("both"), time_scale=1.0) for _ in range(2 if failover else 1)]
    entries = [instance_entry(e, "both", "sim") for e in engines]
    migration = {"policy": "no-migration", "interval_s": 0.1, "failover": failover, "enabled": failover}
    return engines, entries, start_gateway(write_config(tmp_path / "fleet.yaml", entries, migration=migration))


def _stream(url: str, request_id: str, tokens: int, at: int | None = None, action=None) -> list[Any]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    events = []
    deltas = 0
    for event in client.responses.create(
        model=MODEL,
        input=PROMPT,
        max_output_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": request_id},
    ):
        events.append(event)
        deltas += event.type == "response.output_text.delta"
        if action is not None and deltas == at:
            action()
            action = None
    return events


def test_a_killed_engine_mid_response_fails_over_to_the_same_answer(sim_factory, tmp_path) -> None:
    engines, entries, gateway = _both_fleet(sim_factory, tmp_path, failover=True)
    try:
        reference = _stream(gateway.url, "ref", 120)
        by_id = {entry["id"]: engine for entry, engine in zip(entries, engines)}

        def kill() -> None:
            by_id[serving(gateway.url, "victim")].proc.send_signal(signal.SIGKILL)

        moved = _stream(gateway.url, "victim", 120, at=20, action=kill)
        assert [e.type for e in moved] == [e.type for e in reference]
        assert sum(e.type == "response.created" for e in moved) == 1
        assert moved[-1].response.output_text == reference[-1].response.output_text
        assert moved[-1].response.usage.output_tokens == reference[-1].response.usage.output_tokens == 120
        assert metric(gateway.url, "pdgate_migrations_total", reason="failover", outcome="migrated") == 1
    finally:
        gateway.stop()


def test_a_response_that_cannot_go_on_ends_with_an_error_event(sim_factory, tmp_path) -> None:
    engines, _, gateway = _both_fleet(sim_factory, tmp_path, failover=False)
    try:
        events = _stream(gateway.url, "doomed", 200, at=10, action=lambda: os.kill(engines[0].proc.pid, signal.SIGKILL))
        kinds = [e.type for e in events]
        assert kinds[-2:] == ["error", "response.failed"]
        assert "failed mid-stream" in events[-2].message
        failed = events[-1].response
        assert failed.status == "failed" and failed.error.code == "server_error"
        assert failed.output_text  # what the client got before the break
        assert metric(gateway.url, "pdgate_requests_total", route="/v1/responses", status="502") == 1
    finally:
        gateway.stop()


# ---- the re-encoder alone, on chat chunks as engines write them


def _chat_stream(pieces: list[str], finish: str | None, *, done: bool = True) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    if finish is not None:
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 0}})
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if done else "")
    return text.encode()


def _events(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]


def _encoder():
    from pdgate.gateway.responses_api import ResponsesRequest
    from pdgate.gateway.responses_stream import ResponseBuilder, ResponsesEvents

    return ResponsesEvents(ResponseBuilder(ResponsesRequest(MODEL, True), 1700000000.0))


@pytest.mark.unit
def test_events_split_anywhere_encode_the_same() -> None:
    chat = _chat_stream(["Hel", "lo", " world"], "stop")
    whole = _encoder()
    expected = _events(whole.opening() + whole.feed(chat))
    for cut in (1, 5, 17, len(chat) // 2, len(chat) - 3):
        split = _encoder()
        got = _events(split.opening() + split.feed(chat[:cut]) + split.feed(chat[cut:]))
        # the ids differ per encoder: compare what the client reads
        assert [(e["type"], e.get("delta"), e["sequence_number"]) for e in got] == [
            (e["type"], e.get("delta"), e["sequence_number"]) for e in expected
        ]
    final = expected[-1]["response"]
    assert expected[-1]["type"] == "response.completed" and final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "Hello world"
    assert final["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 10,
    }


@pytest.mark.unit
def test_a_chat_stream_without_done_or_finish_ends_the_response_failed() -> None:
    finished = _encoder()
    data = finished.opening() + finished.feed(_chat_stream(["a"], "length", done=False)) + finished.ended()
    assert _events(data)[-1]["response"]["status"] == "incomplete"
    cut = _encoder()
    data = cut.opening() + cut.feed(_chat_stream(["a"], None, done=False)) + cut.ended()
    assert [e["type"] for e in _events(data)][-2:] == ["error", "response.failed"]
    assert cut.ended() == b""  # closed once
