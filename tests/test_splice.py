"""The client's side of a stream that moves: complete events only, token ids tracked and hidden,
a continuation's events rewritten into the client's stream with usage over the whole answer."""

from __future__ import annotations

import json

import pytest

from pdgate.gateway.splice import Splice, StreamTrail, continuation_body, pinned_reason

pytestmark = pytest.mark.unit


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def completion_chunk(
    text: str, ids: list[int], *, cid: str = "cmpl-src", finish: str | None = None, usage=None
) -> dict:
    chunk = {
        "id": cid,
        "object": "text_completion",
        "created": 100,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "prompt_token_ids": None,
                "token_ids": ids,
            }
        ],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def decode(data: bytes) -> list:
    out = []
    for part in data.split(b"\n\n"):
        if part.startswith(b"data: "):
            body = part[6:]
            out.append(body.decode() if body == b"[DONE]" else json.loads(body))
    return out


def test_the_trail_forwards_only_complete_events_and_counts_their_tokens():
    trail = StreamTrail(strip_ids=True)
    data = event(completion_chunk("a", [5])) + event(completion_chunk("b", [6, 7]))
    cut = len(data) - 10
    first = trail.feed(data[:cut])
    assert decode(first) == [
        completion_chunk("a", [5]) | {"choices": [completion_chunk("a", [5])["choices"][0] | {"token_ids": None}]}
    ]
    assert trail.token_ids == [5]
    rest = trail.feed(data[cut:])
    assert decode(rest)[0]["choices"][0]["text"] == "b" and decode(rest)[0]["choices"][0]["token_ids"] is None
    assert trail.token_ids == [5, 6, 7]
    assert trail.identity == {"id": "cmpl-src", "created": 100, "model": "m", "object": "text_completion"}
    assert not trail.finished and not trail.done
    trail.feed(event(completion_chunk("", [], finish="length")) + b"data: [DONE]\n\n")
    assert trail.finished and trail.done


def test_the_trail_keeps_ids_a_client_asked_for_and_notices_an_engine_without_them():
    keep = StreamTrail(strip_ids=False)
    out = keep.feed(event(completion_chunk("a", [5])))
    assert decode(out)[0]["choices"][0]["token_ids"] == [5]
    blind = StreamTrail(strip_ids=True)
    chunk = completion_chunk("a", [])
    del chunk["choices"][0]["token_ids"]
    blind.feed(event(chunk))
    assert not blind.tracked


def test_crlf_framed_streams_are_cut_into_whole_events_at_any_read_boundary():
    """An engine (or a proxy in front of it) may frame events with CRLF, as sse-starlette does."""
    crlf = lambda e: e.replace(b"\n", b"\r\n")
    events = [
        crlf(event(completion_chunk("a", [5]))),
        crlf(event(completion_chunk("b", [6, 7]))),
        crlf(event(completion_chunk("", [], finish="length"))),
        b"data: [DONE]\r\n\r\n",
    ]
    data = b"".join(events)
    first_end = len(events[0])
    ends = [sum(map(len, events[:n])) for n in range(len(events) + 1)]
    for cut in range(len(data) + 1):
        trail = StreamTrail(strip_ids=False)
        head, tail = trail.feed(data[:cut]), trail.feed(data[cut:])
        assert head + tail == data, cut  # forwarded as it came, nothing lost or repeated
        # every whole event at once (an event is whole at its empty line's CR: the LF may come later)
        assert len(head) == (cut if cut + 1 in ends else max(e for e in ends if e <= cut)), cut
        assert trail.token_ids == [5, 6, 7] and trail.finished and trail.done, cut
        assert trail.identity == {"id": "cmpl-src", "created": 100, "model": "m", "object": "text_completion"}
    trail = StreamTrail(strip_ids=True)
    assert [c["choices"][0]["token_ids"] for c in decode(trail.feed(data).replace(b"\r\n", b"\n"))[:2]] == [
        None,
        None,
    ]
    # a continuation from such an engine is rewritten into the client's stream all the same
    trail = StreamTrail(strip_ids=True)
    trail.feed(data[:first_end])
    splice = Splice(trail, "completion", prompt_tokens=4, offset=1, want_ids=False)
    more = crlf(event(completion_chunk("c", [8], cid="cmpl-target")) + b": keep-alive\n\n" + b"data: [DONE]\n\n")
    out = b"".join(splice.feed(more[i : i + 5]) for i in range(0, len(more), 5))
    assert out.count(b"\n\n") == 3 and b"\r" not in out
    chunks = decode(out)
    assert chunks[0]["id"] == "cmpl-src" and chunks[0]["choices"][0]["text"] == "c" and chunks[1] == "[DONE]"
    assert b": keep-alive\n\n" in out and trail.token_ids == [5, 8] and trail.done


def test_a_continuation_becomes_the_clients_completion_stream_with_whole_usage():
    trail = StreamTrail(strip_ids=True)
    trail.feed(event(completion_chunk("a", [5])) + event(completion_chunk("b", [6])))
    splice = Splice(trail, "completion", prompt_tokens=10, offset=2, want_ids=False)
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 11},
    }
    data = (
        event(completion_chunk("c", [7], cid="cmpl-target"))
        + event(completion_chunk("d", [8], cid="cmpl-target", finish="length"))
        + event(
            {
                "id": "cmpl-target",
                "object": "text_completion",
                "created": 200,
                "model": "m",
                "choices": [],
                "usage": usage,
            }
        )
        + b"data: [DONE]\n\n"
    )
    out = decode(splice.feed(data[:7]) + splice.feed(data[7:]))
    assert [c["id"] for c in out[:3]] == ["cmpl-src"] * 3 and all(c["created"] == 100 for c in out[:3])
    assert [c["choices"][0]["text"] for c in out[:2]] == ["c", "d"]
    assert all(c["choices"][0]["token_ids"] is None for c in out[:2])
    assert out[1]["choices"][0]["finish_reason"] == "length"
    assert out[2]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 10},
    }
    assert out[3] == "[DONE]"
    assert trail.token_ids == [5, 6, 7, 8] and trail.finished and trail.done


def test_a_continuation_becomes_chat_chunks():
    trail = StreamTrail(strip_ids=False)
    trail.feed(
        event(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 7,
                "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
        )
    )
    splice = Splice(trail, "chat", prompt_tokens=3, offset=0, want_ids=True)
    out = decode(
        splice.feed(
            event(completion_chunk("hi", [9], cid="cmpl-x"))
            + event(completion_chunk("", [], cid="cmpl-x", finish="stop"))
        )
    )
    assert out[0]["object"] == "chat.completion.chunk" and out[0]["id"] == "chatcmpl-1"
    assert out[0]["choices"][0]["delta"] == {"content": "hi"} and out[0]["choices"][0]["token_ids"] == [9]
    assert out[1]["choices"][0]["delta"] == {} and out[1]["choices"][0]["finish_reason"] == "stop"


def test_closing_events_end_an_answer_that_had_every_token():
    trail = StreamTrail(strip_ids=True)
    trail.feed(event(completion_chunk("a", [5, 6])))
    splice = Splice(trail, "completion", prompt_tokens=4, offset=2, want_ids=False)
    out = decode(splice.closing_events("length", include_usage=True))
    assert out[0]["choices"][0]["finish_reason"] == "length"
    assert out[1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert out[2] == "[DONE]" and trail.done


def test_continuation_body_and_what_cannot_move():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 0,
        "max_tokens": 50,
        "min_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n\n"],
        "tools": None,
    }
    cont = continuation_body(body, [1, 2, 3], [7, 8], 50)
    assert cont == {
        "model": "m",
        "temperature": 0,
        "stop": ["\n\n"],
        "prompt": [1, 2, 3, 7, 8],
        "max_tokens": 48,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
        "min_tokens": 3,
    }
    assert pinned_reason(body, True) is None
    assert pinned_reason(body, False) == "not streamed"
    assert pinned_reason({**body, "n": 2}, True) == "uses n"
    assert pinned_reason({**body, "tools": [{"type": "function"}]}, True) == "uses tools"
    assert pinned_reason({**body, "response_format": {"type": "json_object"}}, True) == "uses response_format"
