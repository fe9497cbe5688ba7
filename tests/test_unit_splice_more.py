"""Splice cases tests/test_splice.py leaves out: what passes through untouched, hidden prompt ids,
usage shapes, chat endings, which requests cannot move, and continuation bodies' edge cases."""

from __future__ import annotations

from typing import Any

import pytest
from fakes.sse import DONE, completion_chunk, event, parse_sse

from pdgate.gateway.splice import Splice, StreamTrail, continuation_body, pinned_reason, wants_token_ids

pytestmark = pytest.mark.unit


def trail_with(*chunks: dict[str, Any], strip: bool = True) -> StreamTrail:
    trail = StreamTrail(strip_ids=strip)
    trail.feed(b"".join(event(c) for c in chunks))
    return trail


def test_error_events_and_comments_in_a_continuation_reach_the_client_as_they_came() -> None:
    trail = trail_with(completion_chunk("a", [5]))
    splice = Splice(trail, "completion", prompt_tokens=3, offset=1, want_ids=False)
    error = b'data: {"error":{"message":"engine overloaded","type":"server_error"}}\n\n'
    comment = b": keep-alive\n\n"
    out = splice.feed(comment + error)
    assert out == comment + error
    assert trail.token_ids == [5] and not trail.finished


def test_the_trail_hides_prompt_token_ids_the_client_did_not_ask_for() -> None:
    chunk = completion_chunk("a", [5])
    chunk["choices"][0]["prompt_token_ids"] = [1, 2, 3]
    hidden = parse_sse(StreamTrail(strip_ids=True).feed(event(chunk)))[0]["choices"][0]
    assert hidden["prompt_token_ids"] is None and hidden["token_ids"] is None
    kept = parse_sse(StreamTrail(strip_ids=False).feed(event(chunk)))[0]["choices"][0]
    assert kept["prompt_token_ids"] == [1, 2, 3] and kept["token_ids"] == [5]


def test_a_chat_streams_role_only_first_event_does_not_make_it_untracked() -> None:
    trail = StreamTrail(strip_ids=True)
    role = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
    }
    trail.feed(event(role))
    assert trail.tracked and trail.token_ids == []
    trail.feed(event({**role, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}))
    assert not trail.tracked  # text without token ids: this answer cannot be continued exactly


def test_an_incomplete_event_at_a_cut_never_reaches_the_client_or_the_token_count() -> None:
    trail = StreamTrail(strip_ids=True)
    whole, half = event(completion_chunk("a", [5])), event(completion_chunk("b", [6]))[:30]
    assert parse_sse(trail.feed(whole + half))[0]["choices"][0]["text"] == "a"
    assert trail.token_ids == [5] and trail.partial == half


@pytest.mark.parametrize(
    ("engine_usage", "client_details"),
    [
        pytest.param({"completion_tokens": 2}, "absent", id="no-details"),
        pytest.param({"completion_tokens": 2, "prompt_tokens_details": None}, None, id="null-details"),
        pytest.param(
            {"completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3}},
            {"cached_tokens": 3},
            id="cached-below-the-prompt",
        ),
    ],
)
def test_continuation_usage_counts_the_original_prompt_and_every_output_token(
    engine_usage: dict[str, Any], client_details: Any
) -> None:
    trail = trail_with(completion_chunk("a", [5]), completion_chunk("b", [6]), completion_chunk("c", [7]))
    splice = Splice(trail, "completion", prompt_tokens=10, offset=3, want_ids=False)
    usage_event = {"id": "x", "object": "text_completion", "created": 2, "model": "m", "choices": []}
    (out,) = parse_sse(splice.feed(event({**usage_event, "usage": {"prompt_tokens": 13, **engine_usage}})))
    usage = out["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (10, 5, 15)
    if client_details == "absent":
        assert "prompt_tokens_details" not in usage
    else:
        assert usage["prompt_tokens_details"] == client_details


def test_a_completion_chunks_null_usage_stays_null() -> None:
    trail = trail_with(completion_chunk("a", [5]))
    splice = Splice(trail, "completion", prompt_tokens=3, offset=1, want_ids=True)
    (out,) = parse_sse(splice.feed(event({**completion_chunk("b", [6], cid="cont"), "usage": None})))
    assert out["usage"] is None and out["id"] == "cmpl-src"
    assert out["choices"][0]["token_ids"] == [6] and out["choices"][0]["prompt_token_ids"] is None


def test_a_second_continuation_counts_from_everything_the_client_had() -> None:
    trail = trail_with(completion_chunk("a", [5]))
    first = Splice(trail, "completion", prompt_tokens=4, offset=1, want_ids=False)
    first.feed(event(completion_chunk("b", [6], cid="cont-1")) + event(completion_chunk("c", [7], cid="cont-1")))
    assert trail.token_ids == [5, 6, 7]
    second = Splice(trail, "completion", prompt_tokens=4, offset=len(trail.token_ids), want_ids=False)
    last = completion_chunk("d", [8], cid="cont-2", finish="length")
    usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    events = parse_sse(
        second.feed(event(last) + event({**completion_chunk("", [], cid="cont-2"), "usage": usage}) + DONE)
    )
    assert [e["id"] for e in events[:2]] == ["cmpl-src", "cmpl-src"]
    assert events[1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert trail.token_ids == [5, 6, 7, 8] and trail.finished and trail.done


@pytest.mark.parametrize(("reason", "include_usage"), [("length", True), (None, False), ("stop", False)])
def test_closing_events_of_a_chat_answer(reason: str | None, include_usage: bool) -> None:
    trail = StreamTrail(strip_ids=True)
    trail.feed(
        event(
            {
                "id": "chatcmpl-9",
                "object": "chat.completion.chunk",
                "created": 5,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": "x"}, "token_ids": [4], "finish_reason": None}],
            }
        )
    )
    splice = Splice(trail, "chat", prompt_tokens=6, offset=1, want_ids=False)
    events = parse_sse(splice.closing_events(reason, include_usage))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == "chatcmpl-9" and c["object"] == "chat.completion.chunk" for c in chunks)
    finishes = [c["choices"][0] for c in chunks if c["choices"]]
    assert [f["finish_reason"] for f in finishes] == ([reason] if reason else [])
    assert all(f["delta"] == {} for f in finishes)
    usages = [c["usage"] for c in chunks if "usage" in c]
    assert usages == ([{"prompt_tokens": 6, "total_tokens": 7, "completion_tokens": 1}] if include_usage else [])
    assert trail.finished and trail.done


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 1, "best_of": 1, "logprobs": None, "echo": False, "tools": []}, None),
        ({"logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}}, None),
        ({"logprobs": True}, "uses logprobs"),
        ({"logprobs": 2}, "uses logprobs"),
        ({"top_logprobs": 3}, "uses top_logprobs"),
        ({"best_of": 3}, "uses best_of"),
        ({"echo": True}, "uses echo"),
        ({"prompt_logprobs": 0}, "uses prompt_logprobs"),
        ({"guided_json": {"type": "object"}}, "uses guided_json"),
        ({"guided_choice": ["a", "b"]}, "uses guided_choice"),
        ({"structured_outputs": {"regex": "a+"}}, "uses structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "uses response_format"),
        ({"functions": [{"name": "f"}]}, "uses functions"),
        ({"use_beam_search": True}, "uses use_beam_search"),
        ({"return_tokens_as_token_ids": True}, "uses return_tokens_as_token_ids"),
    ],
)
def test_which_requests_stay_where_they_are(fields: dict[str, Any], reason: str | None) -> None:
    body = {"model": "m", "prompt": "x", "stream": True, **fields}
    assert pinned_reason(body, stream=True) == reason


def test_continuation_bodies_at_the_edges() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "prompt": "hello",
        "max_tokens": 10,
        "min_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": False, "continuous_usage_stats": True},
        "seed": 7,
        "echo": False,
        "suffix": "not kept",
    }
    cont = continuation_body(body, [1, 2], [3, 4, 5], 10)
    assert cont["prompt"] == [1, 2, 3, 4, 5] and cont["max_tokens"] == 7
    assert cont["min_tokens"] == 0  # already produced: nothing more is required
    assert cont["stream_options"] == {"continuous_usage_stats": True}
    assert cont["seed"] == 7 and "suffix" not in cont and "echo" not in cont
    assert cont["return_token_ids"] is True and cont["stream"] is True
    bare = continuation_body({"model": "m", "max_tokens": 4}, [1], [], 4)
    assert "stream_options" not in bare and "min_tokens" not in bare and bare["max_tokens"] == 4
    assert body["prompt"] == "hello"  # the client's body is not changed


def test_wants_token_ids_is_the_clients_own_flag() -> None:
    assert wants_token_ids({"return_token_ids": True})
    assert not wants_token_ids({"return_token_ids": False}) and not wants_token_ids({})


def test_the_trail_reads_loosely_spaced_json_as_it_reads_compact_json() -> None:
    """Engines may write JSON with spaces (and frame events with CRLF): ids are found and hidden,
    a string finish_reason is seen, [DONE] is seen, whatever the spacing and however the reads cut."""
    spaced = (
        b'data: {"id": "c", "choices": [{"text": "a", "finish_reason": null, '
        b'"prompt_token_ids": [1, 2], "token_ids" : [ 5, 6 ]}]}\r\n\r\n'
        b'data: {"id": "c", "choices": [{"text": "b", "finish_reason" : "stop", "token_ids": [7]}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    for cut in range(1, len(spaced), 7):
        trail = StreamTrail(strip_ids=True)
        out = trail.feed(spaced[:cut]) + trail.feed(spaced[cut:])
        assert out == (
            b'data: {"id": "c", "choices": [{"text": "a", "finish_reason": null, '
            b'"prompt_token_ids":null, "token_ids":null}]}\r\n\r\n'
            b'data: {"id": "c", "choices": [{"text": "b", "finish_reason" : "stop", "token_ids":null}]}\r\n\r\n'
            b"data: [DONE]\r\n\r\n"
        )
        assert trail.token_ids == [5, 6, 7] and trail.finished and trail.done and trail.tracked
        assert trail.identity == {"id": "c", "created": None, "model": None, "object": None}
    kept = StreamTrail(strip_ids=False)
    assert kept.feed(spaced) == spaced and kept.token_ids == [5, 6, 7] and kept.finished and kept.done
