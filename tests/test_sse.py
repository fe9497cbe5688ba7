"""SSE framing: every legal line ending (LF, CRLF, CR, mixed) cuts the same events, whichever
way the stream is chunked, and an event's data is read as a browser's EventSource reads it."""

from __future__ import annotations

import re

import pytest

from pdgate.common.sse import EventBuffer, complete_length, event_data, normalize_newlines, split_events

pytestmark = pytest.mark.unit

# The same two events (a comment, an event type, a two-line data field, a data field with no
# space after the colon) in every framing.
LF = b': keep-alive\n\nevent: chunk\ndata: {"a":\ndata: 1}\n\ndata:[DONE]\n\n'
FRAMINGS = {
    "lf": LF,
    "crlf": LF.replace(b"\n", b"\r\n"),
    "cr": LF.replace(b"\n", b"\r"),
    "mixed": b': keep-alive\r\n\nevent: chunk\rdata: {"a":\r\ndata: 1}\n\r\ndata:[DONE]\r\r',
    "crlf-then-lf": b': keep-alive\r\n\r\nevent: chunk\ndata: {"a":\r\ndata: 1}\n\ndata:[DONE]\r\n\n',
}
DATA = [b'{"a":\n1}', b"[DONE]"]


def reference_data(stream: bytes) -> list[bytes]:
    """The data of each dispatched event, parsed line by line as the HTML standard says."""
    out, values = [], []
    lines = re.split(rb"\r\n|\r|\n", stream)
    for line in lines[:-1]:  # the last piece has no line ending yet
        if not line:
            if values:
                out.append(b"\n".join(values))
            values = []
        else:
            name, _, value = line.partition(b":")
            if name == b"data":
                values.append(value[1:] if value.startswith(b" ") else value)
    return out


def data_of(events: list[bytes]) -> list[bytes]:
    return [d for d in map(event_data, events) if d is not None]


def feed_all(chunks: list[bytes]) -> list[bytes]:
    buffer = EventBuffer()
    events: list[bytes] = []
    for chunk in chunks:
        events += buffer.feed(chunk)
    return events


@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_line_ending_gives_the_same_events(framing: str) -> None:
    stream = FRAMINGS[framing]
    assert reference_data(stream) == DATA
    events, rest = split_events(stream)
    assert data_of(events) == DATA and rest.strip(b"\r\n") == b""
    assert complete_length(stream) == len(stream)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_stream_cut_at_any_byte_gives_the_same_events(framing: str) -> None:
    stream = FRAMINGS[framing]
    for cut in range(len(stream) + 1):
        assert data_of(feed_all([stream[:cut], stream[cut:]])) == DATA, cut
    assert data_of(feed_all([stream[i : i + 1] for i in range(len(stream))])) == DATA


@pytest.mark.parametrize("framing", FRAMINGS)
def test_forwarded_prefixes_end_on_event_boundaries(framing: str) -> None:
    """What the gateway forwards of a partial stream is exactly the events dispatched so far."""
    stream = FRAMINGS[framing]
    for cut in range(len(stream) + 1):
        head = stream[:cut]
        n = complete_length(head)
        assert reference_data(head[:n]) == reference_data(head), cut  # every complete event is in the prefix
        assert reference_data(head[:n] + b"\n\n") == reference_data(head), cut  # and no piece of the next one
        rest = head[n:] + stream[cut:]
        assert complete_length(rest) == len(rest), cut  # the rest of the stream: forwarded whole, byte for byte


def test_an_event_is_dispatched_as_soon_as_its_empty_line_ends_even_on_a_lone_cr() -> None:
    buffer = EventBuffer()
    assert buffer.feed(b"data: a\r") == []  # the line may still become CRLF
    assert data_of(buffer.feed(b"\r")) == [b"a"]  # CR CR: an empty line, the event is complete
    assert data_of(buffer.feed(b"\ndata: b\r\n")) == []  # that LF only finished the CRLF
    assert data_of(buffer.feed(b"\r\n")) == [b"b"]
    # a CR whose LF comes in the next chunk is one line ending, not an empty line
    assert data_of(feed_all([b"data: x\r", b"\ndata: y\r\n\r\n"])) == [b"x\ny"]


def test_a_line_ending_at_the_start_is_an_empty_line() -> None:
    """What follows a cut starts a line: the LF of a CRLF cut after its CR goes out on its own."""
    assert complete_length(b"\n") == 1 and complete_length(b"\r\n") == 2 and complete_length(b"\r") == 1
    assert complete_length(b"\ndata: x") == 1 and complete_length(b"data: x\n") == 0


def test_lf_streams_take_the_fast_path_unchanged() -> None:
    stream = b"data: 1\n\ndata: 2\n\ndata: 3"
    assert split_events(stream) == ([b"data: 1", b"data: 2"], b"data: 3")
    assert complete_length(stream) == len(b"data: 1\n\ndata: 2\n\n")
    assert normalize_newlines(stream) is stream


def test_comments_fields_and_data_values() -> None:
    assert event_data(b"data: {}") == b"{}"
    assert event_data(b"data:{}") == b"{}"
    assert event_data(b"data:  two spaces") == b" two spaces"  # only one space is dropped
    assert event_data(b": a comment") is None
    assert event_data(b": ping\nevent: x\nid: 7\nretry: 10") is None
    assert event_data(b"data") == b""
    assert event_data(b"data:") == b""
    assert event_data(b"\ndata: after an empty line") == b"after an empty line"
    assert event_data(b"event: delta\ndata: a\n: note\ndata: b") == b"a\nb"
    assert event_data(b"database: not data") is None


def test_flush_returns_an_event_the_stream_never_closed() -> None:
    buffer = EventBuffer()
    assert buffer.feed(b"data: 1\r\n\r\ndata: 2") == [b"data: 1"]
    assert buffer.flush() == [b"data: 2"]
    assert buffer.flush() == []
    buffer.feed(b"data: 3\r\n\r\n\r\n")
    assert buffer.flush() == []
