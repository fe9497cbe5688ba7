"""Property tests of pdgate's SSE framing (pdgate/common/sse.py) against the HTML standard's parser.

The oracle is :func:`standard_dispatches`, a line-by-line transcription of the standard's
"interpreting an event stream" (no pdgate code). The properties:

* events written with any line ending (LF, CRLF, CR, mixed per line), any text in their data
  (newlines, any Unicode), comments and other fields, read back through :class:`EventBuffer`
  in chunks cut at any byte (inside a multi-byte UTF-8 character, between the CR and LF of a
  CRLF), give back exactly the data written, ``[DONE]`` included;
* on arbitrary byte streams made of SSE's syntax, pdgate dispatches exactly what the standard
  does, whatever the chunking, and :meth:`EventBuffer.flush` adds what the standard dispatches
  once an empty line ends the stream;
* the relay's cut (:func:`complete_length` through ``splice.complete_events``) forwards the
  stream byte for byte, each piece only whole events, and at every moment exactly the events
  the standard has dispatched by then (nothing held back, nothing early).

``PDGATE_PROPERTY_EXAMPLES`` raises the number of examples (the default keeps this file fast).
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdgate.common.sse import EventBuffer, complete_length, event_data, split_events
from pdgate.gateway.splice import complete_events

pytestmark = pytest.mark.unit

LINE_ENDINGS = (b"\n", b"\r\n", b"\r")
# The pieces arbitrary streams are made of: SSE's syntax, and bytes that must pass through untouched.
SYNTAX = (
    b"data",
    b"data:",
    b"data: ",
    b":",
    b" ",
    b"\n",
    b"\r",
    b"\r\n",
    b"[DONE]",
    b"event: x",
    b"id",
    b"x",
    b"\x00",
    "é".encode(),
    "\u2028".encode(),
    b"{}",
)


def property_settings(default_examples: int) -> settings:
    """Deterministic, no example database written into the repository; more examples on request."""
    examples = int(os.environ.get("PDGATE_PROPERTY_EXAMPLES") or default_examples)
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


# --------------------------------------------------------------------------- the oracle
def standard_dispatches(stream: bytes) -> list[bytes]:
    """The data of each event the HTML standard's EventSource dispatches for ``stream`` (an
    event left open at the end is not dispatched). Line by line, as the standard says."""
    dispatched: list[bytes] = []
    buffer: list[bytes] = []
    for line in re.split(rb"\r\n|\r|\n", stream)[:-1]:  # the last piece has no line ending yet
        if not line:
            if buffer:
                dispatched.append(b"\n".join(buffer))
            buffer = []
        elif line.startswith(b":"):
            continue
        else:
            name, colon, value = line.partition(b":")
            if name == b"data":
                buffer.append(value[1:] if value.startswith(b" ") else value)
    return dispatched


def dispatched_data(events: list[bytes]) -> list[bytes]:
    """The data of pdgate's events, skipping those without a data field (as EventSource does)."""
    return [data for data in map(event_data, events) if data is not None]


# ----------------------------------------------------------------------------- writing
Line = tuple[str, str]  # (field name, or "" for a comment; its value: one line)


@st.composite
def event_lines(draw: st.DrawFn) -> list[Line]:
    """One event: data fields whose text may hold any line break, comments, other fields."""
    lines: list[Line] = []
    for kind in draw(st.lists(st.sampled_from(["data", "comment", "event", "id", "retry"]), min_size=1, max_size=5)):
        if kind == "data":
            text = draw(st.one_of(st.text(), st.sampled_from(["[DONE]", "", " lead", "a\r\nb", "\n", "日本"])))
            lines += [("data", part) for part in re.split(r"\r\n|\r|\n", text)]
        else:
            value = draw(st.text().map(lambda t: re.sub(r"[\r\n]", "", t)))
            lines.append(("" if kind == "comment" else kind, value))
    return lines


def expected_data(events: list[list[Line]]) -> list[bytes]:
    """What each event's data is to its reader: its data lines joined by LF."""
    out = []
    for lines in events:
        values = [value.encode() for name, value in lines if name == "data"]
        if values:
            out.append(b"\n".join(values))
    return out


@st.composite
def written_stream(draw: st.DrawFn, events: list[list[Line]]) -> bytes:
    """``events`` as a server may write them: each line with any of the three line endings, a
    space after the colon or not (when the value does not start with one)."""
    out = bytearray()
    previous = b""
    for lines in events:
        for name, value in [*lines, ("", None)]:  # None: the empty line that ends the event
            if value is None:
                line = b""
            else:
                colon = b": " if value.startswith(" ") or draw(st.booleans()) else b":"
                line = name.encode() + colon + value.encode()
            endings = LINE_ENDINGS
            if previous == b"\r" and not line:
                endings = (b"\r\n", b"\r")  # CR, then an empty line ended by LF, would read as one CRLF
            previous = draw(st.sampled_from(endings))
            out += line + previous
    return bytes(out)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary byte offsets (sometimes at every byte)."""
    if data and draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def read_chunks(chunks: list[bytes]) -> tuple[list[bytes], EventBuffer]:
    """Every event an :class:`EventBuffer` completes over ``chunks``, and the buffer."""
    buffer = EventBuffer()
    events: list[bytes] = []
    for chunk in chunks:
        events += buffer.feed(chunk)
    return events, buffer


arbitrary_streams = st.lists(st.sampled_from(SYNTAX), max_size=40).map(b"".join)


# -------------------------------------------------------------------------- properties
@property_settings(300)
@given(data=st.data(), events=st.lists(event_lines(), max_size=6))
def test_written_events_read_back_the_same_in_any_chunking(data: st.DataObject, events: list[list[Line]]) -> None:
    stream = data.draw(written_stream(events), label="stream")
    expected = expected_data(events)
    assert standard_dispatches(stream) == expected  # the writer is right (by the standard)
    received, buffer = read_chunks(data.draw(chunked(stream), label="chunks"))
    assert dispatched_data(received) == expected
    assert buffer.flush() == []  # every event was closed: nothing left over
    assert dispatched_data(split_events(stream)[0]) == expected
    assert complete_length(stream) == len(stream)


@property_settings(400)
@given(data=st.data(), stream=arbitrary_streams)
def test_arbitrary_streams_dispatch_what_the_standard_does(data: st.DataObject, stream: bytes) -> None:
    received, buffer = read_chunks(data.draw(chunked(stream), label="chunks"))
    assert dispatched_data(received) == standard_dispatches(stream)
    # at the end of the stream, flush adds what an empty line there would have dispatched
    assert dispatched_data(received + buffer.flush()) == standard_dispatches(stream + b"\n\n")


@property_settings(400)
@given(data=st.data(), stream=arbitrary_streams)
def test_the_relays_cut_forwards_exactly_the_dispatched_events_at_every_moment(
    data: st.DataObject, stream: bytes
) -> None:
    """What the relay forwards is the stream as it came, in pieces that each start on an event
    boundary, and holding at every moment exactly the events the standard has dispatched."""
    forwarded: list[bytes] = []
    rest = b""
    arrived = 0
    for chunk in data.draw(chunked(stream), label="chunks"):
        whole, rest = complete_events(rest, chunk)
        arrived += len(chunk)
        if whole:
            forwarded.append(whole)
        assert b"".join(forwarded) + rest == stream[:arrived]  # nothing lost, repeated or changed
        # each piece read by a fresh reader: nothing before it is needed, nothing of it left open
        pieces = [standard_dispatches(piece) for piece in forwarded]
        assert [d for events in pieces for d in events] == standard_dispatches(stream[:arrived])
        assert all(standard_dispatches(piece + b"\n\n") == events for piece, events in zip(forwarded, pieces))
        assert standard_dispatches(rest) == []  # no complete event held back
