"""Property tests of the stream splice (gateway/splice.py): a streamed answer that moves between
engines any number of times, at any byte, reads to its client as the uninterrupted answer.

An engine here writes its stream as the simulator (and vLLM) does: a chat stream's role event,
one chunk per group of tokens with their ``token_ids`` (the gateway always asks for them), the
finish reason on the last chunk, the usage chunk and ``[DONE]``; with LF, CRLF or CR framing,
compact or spaced JSON, UTF-8 or escaped text. The client's side is driven as
gateway/livestream.py drives it: reads go through :class:`StreamTrail` (or the current
:class:`Splice`); when a stream breaks, a *failover* continues from every token the client has,
a *migration* (make before break) from the tokens it had when it froze, what arrived since
being dropped; an answer whose every token went out ends with :meth:`Splice.closing_events`.
A continuation is another engine's ``/v1/completions`` stream of the remaining tokens, built
with :func:`continuation_body`.

The properties: the client's stream is whole events only, one ``id``/``created``/``model``
(the first engine's whenever any of its events reached the client), a chat stream's role event
once and first, every token's text and id exactly once and in order (ids only when asked for),
the finish reason once at the end, usage over the whole answer (the original prompt, every
output token; on every chunk with continuous usage), one ``[DONE]`` last; and when the client
had the first engine's first token before any move and every move left tokens to generate, the
stream is event for event the uninterrupted one.

A known limitation, left out: a migration that freezes a stream before any of its events reached
the client, and then drops them, drops a chat stream's role event with them (the splice cannot
know that the client never got it); the role is then missing.

Engines are assumed to send each stream's first read before they fail (a stream that breaks
before it is retried by the proxy, not spliced) and migrations start only while the answer can
go on (``MigrationController``: "migratable": not finished, tokens left).

``PDGATE_PROPERTY_EXAMPLES`` raises the number of examples (the default keeps this file fast).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
from fakes.sse import parse_sse
from hypothesis import event as tally
from hypothesis import given, settings
from hypothesis import strategies as st

from pdgate.gateway.splice import Splice, StreamTrail, continuation_body

pytestmark = pytest.mark.unit

SOURCE = {"id": "cmpl-source", "created": 1000, "model": "m"}
FRAMINGS = (b"\n", b"\r\n", b"\r")
# Token texts that look like what the trail and the splice search for
TRICKY_TEXTS = ("data: [DONE]", "[DONE]", "\n\n", "\r\n", '"token_ids":[1]', '"finish_reason":"stop"', "data:", "é")


def property_settings(default_examples: int) -> settings:
    """Deterministic, no example database written into the repository; more examples on request."""
    examples = int(os.environ.get("PDGATE_PROPERTY_EXAMPLES") or default_examples)
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


@dataclass(frozen=True)
class Answer:
    """One request's whole answer, as the model produces it wherever it runs."""

    kind: str  # the client's route: "completion" or "chat"
    prompt_ids: list[int]
    tokens: list[tuple[int, str]]  # (token id, its text)
    groups: list[int]  # how many tokens each chunk carries (their sum: every token)
    finish: str
    max_tokens: int
    include_usage: bool
    continuous: bool  # usage on every chunk (stream_options.continuous_usage_stats)
    want_ids: bool  # the client asked for return_token_ids


@dataclass(frozen=True)
class Style:
    """How one engine writes its stream."""

    framing: bytes
    spaced: bool  # JSON with spaces after its separators
    ascii_only: bool  # non-ASCII text escaped (else raw UTF-8)
    colon_space: bool  # "data: " (else "data:")
    pings: bool  # a comment event after each chunk (as sse-starlette's keep-alives)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    texts = st.one_of(st.text(max_size=3), st.sampled_from(TRICKY_TEXTS))
    size = draw(st.sampled_from(range(1, 11)))  # (evenly: short answers would crowd out longer ones)
    tokens = draw(st.lists(st.tuples(st.integers(0, 150_000), texts), min_size=size, max_size=size))
    groups: list[int] = []
    while sum(groups) < len(tokens):
        groups.append(draw(st.integers(1, len(tokens) - sum(groups))))
    finish = draw(st.sampled_from(["length", "stop"]))
    return Answer(
        kind=draw(st.sampled_from(["completion", "chat"])),
        prompt_ids=draw(st.lists(st.integers(0, 150_000), min_size=1, max_size=6)),
        tokens=tokens,
        groups=groups,
        finish=finish,
        max_tokens=len(tokens) if finish == "length" else len(tokens) + draw(st.integers(1, 5)),
        include_usage=draw(st.booleans()),
        continuous=draw(st.booleans()),
        want_ids=draw(st.booleans()),
    )


styles = st.builds(Style, st.sampled_from(FRAMINGS), st.booleans(), st.booleans(), st.booleans(), st.booleans())


# ------------------------------------------------------------------------------ engines
def engine_stream(
    answer: Answer, *, kind: str, identity: dict[str, Any], prompt: list[int], start: int, style: Style
) -> bytes:
    """The stream an engine writes for ``answer``'s tokens from ``start`` on, after ``prompt``
    (the original prompt, or a continuation's: the prompt and the tokens before ``start``)."""
    chunks: list[dict[str, Any]] = []
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    base = {**identity, "object": obj}

    def usage(done: int, *, final: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + done}
        out["completion_tokens"] = done
        if not final:
            out["prompt_tokens_details"] = None  # (the final usage chunk leaves None values out)
        return out

    if kind == "chat":
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
                "prompt_token_ids": prompt,
            }
        )
    first, done = start, 0
    pieces = _groups_from(answer, start) or [[]]  # nothing left: the model only stops
    for n, group in enumerate(pieces):
        ids = [token_id for token_id, _ in group]
        text = "".join(t for _, t in group)
        reason = answer.finish if n == len(pieces) - 1 else None
        done += len(group)
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text} if text or reason is None else {},
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": None,
                "token_ids": ids,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
            choice["prompt_token_ids"] = prompt if n == 0 else None
            choice["token_ids"] = ids
        chunk: dict[str, Any] = {**base, "choices": [choice]}
        if answer.continuous:
            chunk["usage"] = usage(done, final=False)
        elif kind != "chat":
            chunk["usage"] = None
        chunks.append(chunk)
    if answer.include_usage:
        chunks.append({**base, "choices": [], "usage": usage(len(answer.tokens) - first, final=True)})
    end = style.framing * 2
    data = b"data: " if style.colon_space else b"data:"
    ping = b": ping" + end if style.pings else b""
    encoded = [
        json.dumps(c, separators=None if style.spaced else (",", ":"), ensure_ascii=style.ascii_only).encode()
        for c in chunks
    ]
    return b"".join(data + e + end + ping for e in encoded) + data + b"[DONE]" + end


def _groups_from(answer: Answer, start: int) -> list[list[tuple[int, str]]]:
    """The token groups from token ``start`` on (``start`` is always at a group's start)."""
    out, at = [], 0
    for size in answer.groups:
        if at >= start:
            out.append(answer.tokens[at : at + size])
        at += size
    return out


def source_stream(answer: Answer, style: Style) -> bytes:
    return engine_stream(answer, kind=answer.kind, identity=SOURCE, prompt=answer.prompt_ids, start=0, style=style)


def continuation_stream(answer: Answer, generated: list[int], move: int, style: Style) -> bytes:
    """What the continuation's engine streams: the rest of the answer as a completion, from the
    request :func:`continuation_body` builds."""
    body = {"model": "m", "max_tokens": answer.max_tokens, "stream": True}
    if answer.include_usage or answer.continuous:
        body["stream_options"] = {"include_usage": answer.include_usage, "continuous_usage_stats": answer.continuous}
    request = continuation_body(body, answer.prompt_ids, generated, answer.max_tokens)
    assert request["prompt"] == [*answer.prompt_ids, *generated] and request["return_token_ids"] is True
    assert request["max_tokens"] == answer.max_tokens - len(generated) > 0
    assert [i for i, _ in answer.tokens[: len(generated)]] == generated  # the client's tokens, in order
    identity = {"id": f"cmpl-continuation-{move}", "created": 2000 + move, "model": "m"}
    return engine_stream(
        answer, kind="completion", identity=identity, prompt=request["prompt"], start=len(generated), style=style
    )


# ------------------------------------------------------------------------ the client's side
@st.composite
def offset_in(draw: st.DrawFn, data: bytes) -> int:
    """A byte offset strictly inside ``data``: anywhere, or where an event starts."""
    starts = [m.start() for m in re.finditer(rb"data:|: ping", data) if m.start() > 0]  # (mostly) between events
    anywhere = st.integers(1, len(data) - 1)
    places = [anywhere, anywhere.map(lambda n: len(data) - n)]  # (small numbers come up more often)
    if starts:
        places += [st.sampled_from(starts), st.sampled_from(starts[::-1])]
    return draw(st.one_of(places))


@st.composite
def reads(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` as it is read from the engine's socket: cut at arbitrary bytes."""
    cuts = sorted(set(draw(st.lists(offset_in(data), max_size=6)))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass
class Relay:
    """The client's side of one answer, as gateway/livestream.py keeps it."""

    answer: Answer
    trail: StreamTrail
    splice: Splice | None = None
    moves: int = 0
    first_move_at: int | None = None  # tokens the client had at the first move
    every_move_left_tokens: bool = True
    ended_here: bool = False  # the gateway wrote the answer's end (closing_events)
    dropped_first_event: bool = False  # a migration dropped the answer's first event (held, then cut)

    def feed(self, data: bytes) -> bytes:
        return self.splice.feed(data) if self.splice is not None else self.trail.feed(data)

    def switch(self, tokens: int) -> None:
        """A continuation takes over after the client's first ``tokens`` tokens (LiveStream.switch)."""
        del self.trail.token_ids[tokens:]
        self.trail.finished = False
        self.trail.partial = b""
        self.splice = Splice(self.trail, self.answer.kind, len(self.answer.prompt_ids), tokens, self.answer.want_ids)
        self.moves += 1
        if self.first_move_at is None:
            self.first_move_at = tokens
        self.every_move_left_tokens &= tokens < len(self.answer.tokens)

    def end_here(self) -> bytes:
        """The answer's end, written by the gateway (LiveStream._finish_without_engine)."""
        generated = len(self.trail.token_ids)
        answer = self.answer
        splice = self.splice or Splice(self.trail, answer.kind, len(answer.prompt_ids), generated, answer.want_ids)
        splice.offset = generated
        self.ended_here = True
        return splice.closing_events(None if self.trail.finished else "length", answer.include_usage)


@dataclass
class Leg:
    """What one engine's stream gave the client before it ended or broke."""

    delivered: bytes  # what went out to the client
    held: bytes  # what came after a freeze (a migration's make before break)
    tokens_at_freeze: int
    finished_at_freeze: bool


def relay_leg(relay: Relay, chunks: list[bytes], freeze_at: int) -> Leg:
    """Feed ``chunks`` through the relay; those from ``freeze_at`` on are held back."""
    delivered, held = bytearray(), bytearray()
    tokens, finished = len(relay.trail.token_ids), relay.trail.finished
    for n, chunk in enumerate(chunks):
        if n == freeze_at:
            tokens, finished = len(relay.trail.token_ids), relay.trail.finished
        (held if n >= freeze_at else delivered).extend(relay.feed(chunk))
    if freeze_at >= len(chunks):
        tokens, finished = len(relay.trail.token_ids), relay.trail.finished
    return Leg(bytes(delivered), bytes(held), tokens, finished)


def client_stream(answer: Answer, data: st.DataObject) -> tuple[bytes, Relay]:
    """The bytes the client receives while its answer moves up to three times, and the relay."""
    relay = Relay(answer, StreamTrail(strip_ids=not answer.want_ids))
    client = bytearray()
    stream = source_stream(answer, data.draw(styles, label="source style"))
    for move in range(1, 5):
        breaks = move < 4 and data.draw(st.integers(0, 4), label="breaks") > 0
        # a stream breaks at any byte after its first (one that breaks before it is retried, not spliced)
        end = data.draw(offset_in(stream), label="breaks at") if breaks else len(stream)
        chunks = data.draw(reads(stream[:end]), label="reads")
        migrating = breaks and data.draw(st.booleans(), label="migration")
        freeze_at = data.draw(st.integers(1, len(chunks)), label="freeze before read") if migrating else len(chunks)
        leg = relay_leg(relay, chunks, freeze_at)
        client += leg.delivered
        if relay.trail.done:  # the answer ended: a pending move is cancelled, what was held goes out
            return bytes(client + leg.held), relay
        # a migration starts only while the answer can go on (MigrationController: "migratable")
        if migrating and not leg.finished_at_freeze and leg.tokens_at_freeze < answer.max_tokens:
            tokens = leg.tokens_at_freeze  # what came since is dropped
            relay.dropped_first_event |= bool(leg.held) and not parse_sse(bytes(client))
        else:  # failover: from every token the client has
            client += leg.held
            tokens = len(relay.trail.token_ids)
            if relay.trail.finished or tokens >= answer.max_tokens:  # nothing left to generate
                return bytes(client + relay.end_here()), relay
        relay.switch(tokens)
        stream = continuation_stream(answer, relay.trail.token_ids[:tokens], move, data.draw(styles))
    raise AssertionError("the last stream never breaks: the loop returns before")


# ---------------------------------------------------------------------------- what it reads as
def check_envelope(events: list[Any], answer: Answer) -> list[dict[str, Any]]:
    """One ``[DONE]``, last; one identity and the client's object throughout. Returns the chunks."""
    assert events and events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
    chunks = events[:-1]
    assert all(isinstance(c, dict) for c in chunks)
    identities = {(c["id"], c["created"], c["model"]) for c in chunks}
    assert len(identities) == 1, f"one id, created and model throughout: {identities}"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk" if answer.kind == "chat" else "text_completion"}
    return chunks


def client_view(events: list[Any], answer: Answer) -> dict[str, Any]:
    """What a client makes of its stream, checking on the way what must hold of any stream."""
    chunks = check_envelope(events, answer)
    text, ids, reasons, roles, usages, counts = [], [], [], 0, [], []
    for n, chunk in enumerate(chunks):
        assert chunk.get("prompt_token_ids") in (None, answer.prompt_ids if answer.want_ids else None)
        for choice in chunk["choices"]:
            assert not reasons, "nothing follows the finish reason but the usage"
            if answer.kind == "chat":
                delta = choice["delta"]
                roles += delta.get("role") == "assistant"
                text.append(delta.get("content") or "")
            else:
                text.append(choice["text"])
                assert choice.get("prompt_token_ids") in (None, answer.prompt_ids if answer.want_ids else None)
            if answer.want_ids:
                ids += choice.get("token_ids") or []
            else:
                assert choice.get("token_ids") is None, "token ids the client did not ask for"
            if choice["finish_reason"] is not None:
                reasons.append(choice["finish_reason"])
        usage = chunk.get("usage")
        if usage is None:
            continue
        assert usage["prompt_tokens"] == len(answer.prompt_ids), "the original prompt's length"
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        if chunk["choices"]:  # continuous usage: the output tokens so far
            counts.append(usage["completion_tokens"])
            assert not answer.want_ids or usage["completion_tokens"] == len(ids)
        else:
            assert n == len(chunks) - 1, "the usage chunk is the last"
            usages.append(usage)
    assert counts == sorted(counts) and counts[-1:] in ([], [len(answer.tokens)])
    if answer.kind == "chat":
        assert roles <= 1 and (roles == 0 or chunks[0]["choices"][0]["delta"].get("role") == "assistant")
    return {
        "text": "".join(text),
        "token_ids": ids if answer.want_ids else None,
        "finish_reasons": reasons,
        "usage": [(u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) for u in usages],
        "roles": roles,
    }


def expected_view(answer: Answer) -> dict[str, Any]:
    prompt, output = len(answer.prompt_ids), len(answer.tokens)
    return {
        "text": "".join(t for _, t in answer.tokens),
        "token_ids": [i for i, _ in answer.tokens] if answer.want_ids else None,
        "finish_reasons": [answer.finish],
        "usage": [(prompt, output, prompt + output)] if answer.include_usage else [],
        "roles": 1 if answer.kind == "chat" else 0,
    }


def comparable(events: list[Any], kind: str) -> list[Any]:
    """``events`` with a chat choice's null ``token_ids`` left out (the trail nulls the ids the
    gateway asked for, a continuation's chunks leave the field out: both read as no ids)."""
    if kind != "chat":
        return events
    out = []
    for chunk in events:
        if isinstance(chunk, dict):
            choices = [{k: v for k, v in c.items() if not (k == "token_ids" and v is None)} for c in chunk["choices"]]
            chunk = {**chunk, "choices": choices}
        out.append(chunk)
    return out


# -------------------------------------------------------------------------- properties
@property_settings(400)
@given(answer=answers(), data=st.data())
def test_a_moving_answer_reads_as_the_uninterrupted_one(answer: Answer, data: st.DataObject) -> None:
    received, relay = client_stream(answer, data)
    events = parse_sse(received)  # whole events only: the parse fails on a half event
    tally(f"moves: {relay.moves}")
    tally(f"first move after {'no' if relay.first_move_at == 0 else 'some'} tokens" if relay.moves else "no move")
    tally(f"ended by the gateway: {relay.ended_here}")
    view, expected = client_view(events, answer), expected_view(answer)
    if relay.dropped_first_event:  # a known limitation: see the module doc
        expected["roles"] = view["roles"]
    assert view == expected
    if relay.first_move_at is None or relay.first_move_at > 0:
        assert (events[0]["id"], events[0]["created"]) == (SOURCE["id"], SOURCE["created"])
    if (
        (relay.first_move_at is None or relay.first_move_at > 0)
        and relay.every_move_left_tokens
        and not relay.ended_here
    ):
        uninterrupted = parse_sse(
            StreamTrail(strip_ids=not answer.want_ids).feed(
                source_stream(answer, Style(b"\n", False, True, True, False))
            )
        )
        assert comparable(events, answer.kind) == comparable(uninterrupted, answer.kind)
        tally("compared event for event")
