"""Server-sent events framing: cutting a byte stream into complete events, and their ``data``.

An SSE stream is lines ended by LF, CRLF or a lone CR (all three are legal and may be mixed);
an empty line ends an event. Servers differ: vLLM and SGLang frame events with ``\\n\\n``,
sse-starlette and other common libraries with ``\\r\\n\\r\\n``.

This runs on every relayed chunk (the gateway) and every received chunk (the load generator), so
a stream without any CR takes a fast path (one ``bytes.rfind`` or ``bytes.split`` after a
``memchr`` for CR); input holding a CR pays for a few more passes of the same kind. A lone CR ends
a line as the standard says, even at the very end of a chunk; when the LF of that CRLF arrives
with the next chunk it reads as an empty line before the next event, which carries nothing.

* :func:`complete_length`: how many leading bytes are complete events (for forwarding as is);
* :func:`split_events`: the complete events (line endings made LF) and the incomplete rest;
* :func:`event_data`: an event's ``data`` (its ``data:`` lines joined by LF), ``None`` without;
* :class:`EventBuffer`: the incremental form of :func:`split_events`, fed chunk by chunk.
"""

from __future__ import annotations

EVENT_END = b"\n\n"
"""What pdgate itself ends the events it writes with."""

_CR = 0x0D  # ``13 in data`` is a plain memchr: several times cheaper than ``b"\r" in data``
_LF = 0x0A


def complete_length(buffer: bytes) -> int:
    """The length of the longest prefix of ``buffer`` that is whole events (0 when none ended).

    ``buffer`` starts where an event may (the stream's start, or a previous cut), so a line ending
    at its very start is an empty line too. ``buffer[:n]`` can be forwarded as it is and
    ``buffer[n:]`` kept for the next chunk.
    """
    if _CR not in buffer:
        end = buffer.rfind(b"\n\n")
        if end >= 0:
            return end + 2
        return 1 if buffer and buffer[0] == _LF else 0
    # Every empty line shows as LF LF, LF CR or CR CR (a CR that a CR follows is a line ending of
    # its own), and each of those pairs is an empty line: the last pair ends the last event. CRLF
    # framing, the usual reason for a CR, first narrows the search to what follows its last one.
    crlf = buffer.rfind(b"\r\n\r\n")
    start = crlf + 3 if crlf >= 0 else 0
    end = max(buffer.rfind(b"\n\n", start), buffer.rfind(b"\n\r", start), buffer.rfind(b"\r\r", start))
    if end < 0 and crlf >= 0:
        return crlf + 4
    if end >= 0:
        end += 2
    elif buffer[0] in (_CR, _LF):
        end = 1
    else:
        return 0
    if buffer[end - 1] == _CR and buffer.startswith(b"\n", end):
        end += 1  # the empty line's CRLF
    return end


def normalize_newlines(text: bytes) -> bytes:
    """``text`` with every CRLF and lone CR line ending made LF."""
    if _CR not in text:
        return text
    text = text.replace(b"\r\n", b"\n")
    return text.replace(b"\r", b"\n") if _CR in text else text


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """``(events, rest)``: the complete events of ``buffer`` and what follows the last of them.

    Each event is its lines joined by LF, without the empty line that ended it (an event may be
    empty, or start with empty lines: they carry nothing). ``rest``, the start of the next event,
    is to be prefixed to the next chunk.
    """
    if _CR not in buffer:  # the common case: LF framing
        events = buffer.split(b"\n\n")
        rest = events.pop()
        return events, rest
    events = normalize_newlines(buffer).split(b"\n\n")
    rest = events.pop()
    if rest and buffer[-1] == _CR:
        rest = rest[:-1] + b"\r"  # it may be the first half of a CRLF: let the next chunk decide
    return events, rest


def event_data(event: bytes) -> bytes | None:
    """The ``data`` of one event from :func:`split_events`: the values of its ``data`` fields
    joined by LF (one space after the colon dropped), or ``None`` when it has no ``data`` field.

    Comments (lines starting with ``:``) and other fields (``event``, ``id``, ``retry``) are
    skipped; a line ``data`` without a colon is a ``data`` field with an empty value.
    """
    if event.startswith(b"data:") and _LF not in event:  # the common case: one data line
        return event[6:] if event.startswith(b" ", 5) else event[5:]
    values = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            values.append(line[6:] if line.startswith(b" ", 5) else line[5:])
        elif line == b"data":
            values.append(b"")
    return b"\n".join(values) if values else None


class EventBuffer:
    """:func:`split_events` over a stream: feed chunks as they arrive, get the events they
    completed; ``rest`` is the start of an event still open."""

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events that ``chunk`` completed (none while an event is still open)."""
        events, self.rest = split_events(self.rest + chunk if self.rest else chunk)
        return events

    def flush(self) -> list[bytes]:
        """At the end of the stream: the last event even though no empty line closed it."""
        if not self.rest.strip():
            self.rest = b""
            return []
        return self.feed(b"\n\n")
