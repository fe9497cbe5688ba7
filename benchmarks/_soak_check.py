"""The chaos soak's checker (``benchmarks/soak.py``): what the client saw of each request, the
answer of an uninterrupted reference engine, and the one ending every request gets.

The simulated engine's output is a pure function of the context (and seed), so a request that
completed must equal, token for token, the same request sent once to an engine nothing disturbed:
text (per streamed event), token ids where asked, finish reason and usage. Endings:

* documented: ``identical``; ``error_status`` (429 with ``x-pdgate-reject-reason``, 502 or 503,
  each with ``Retry-After`` and OpenAI's error JSON: docs/api.md); ``error_event`` (a stream that
  ends with the gateway's ``{"error": {...}}`` event and ``[DONE]``); ``replica_killed`` (the
  connection to a gateway replica broke while that replica was being killed);
* bugs: ``mismatch`` (tokens lost, duplicated or different, usage or finish reason wrong, more
  than one stream id), ``hang`` (no end within the client's timeout), ``undocumented`` (any other
  status, a stream cut without an error event, a connection cut with no replica killed, ...).

Tokens received before an error event or a cut must be a prefix of the reference; a
duplicated or different token there makes the ending a ``mismatch``. Not a benchmark itself.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DOCUMENTED_STATUSES = (429, 502, 503)
DOCUMENTED = ("identical", "error_status", "error_event", "replica_killed")
BUGS = ("mismatch", "hang", "undocumented")
KILL_SLACK_S = 1.0  # a replica's connections break at most this long after its kill is logged
# before any byte of the answer: the load balancer tries the next replica
RETRYABLE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
CUT = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)
KEPT_HEADERS = ("retry-after", "x-pdgate-reject-reason", "content-type", "x-request-id")


@dataclass(frozen=True)
class Request:
    """One request of the workload: when it is sent (seconds after the start), what, and how."""

    index: int
    at: float
    chat: bool
    stream: bool
    path: str  # x-pdgate-pd-path: split or colocated
    app: str | None  # x-pdgate-app: the SLO class
    body: dict[str, Any]
    replica: int  # the replica the load balancer tries first
    request_id: str

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    @property
    def headers(self) -> dict[str, str]:
        headers = {"X-Request-Id": self.request_id, "x-pdgate-pd-path": self.path}
        if self.app is not None:
            headers["x-pdgate-app"] = self.app
        return headers


@dataclass
class Seen:
    """What the client saw of one request (times: ``time.monotonic`` seconds)."""

    index: int
    chat: bool
    stream: bool
    want_ids: bool
    want_usage: bool
    start: float
    end: float = 0.0
    replica: int | None = None  # the replica that answered (the last one tried)
    tried: list[int] = field(default_factory=list)
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""  # a whole (non-streamed or error) answer
    events: list[Any] = field(default_factory=list)  # streamed payloads, parsed JSON or raw str
    done: bool = False  # "data: [DONE]" arrived
    first_token: float | None = None
    cut: str | None = None  # the connection broke after the answer started (exception name)
    refused: str | None = None  # no replica took the request (the last error)
    timed_out: bool = False


@dataclass
class Tokens:
    """An answer as tokens: one text piece per streamed token event (a whole answer: one piece)."""

    pieces: list[str]
    ids: list[int] | None
    finish: str | None
    usage: dict[str, Any] | None
    response_ids: set[str]
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class Ending:
    """The one ending of a request."""

    kind: str
    cause: str
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0

    @property
    def documented(self) -> bool:
        return self.kind in DOCUMENTED


# ------------------------------------------------------------------------------ the client
async def send(session: aiohttp.ClientSession, urls: Sequence[str], req: Request, hang_s: float) -> Seen:
    """``req`` as a client behind a load balancer sees it: a connection refused or reset before
    any byte of the answer is tried on the next replica (two rounds); no end in ``hang_s``: a hang."""
    seen = Seen(
        req.index,
        req.chat,
        req.stream,
        want_ids=bool(req.body.get("return_token_ids")),
        want_usage=bool(req.body.get("stream_options")) or not req.stream,
        start=time.monotonic(),
    )
    order = [(req.replica + k) % len(urls) for k in range(len(urls))] * 2
    try:
        async with asyncio.timeout(hang_s):
            for attempt, r in enumerate(order):
                if attempt == len(urls):
                    await asyncio.sleep(0.5)
                seen.tried.append(r)
                seen.replica = r
                try:
                    resp = await session.post(urls[r] + req.route, json=req.body, headers=req.headers)
                except RETRYABLE as exc:
                    seen.refused = f"{type(exc).__name__}: {exc}"[:200]
                    continue
                seen.refused = None
                await _read(resp, seen)
                break
    except TimeoutError:
        seen.timed_out = True
    seen.end = time.monotonic()
    return seen


async def _read(resp: aiohttp.ClientResponse, seen: Seen) -> None:
    seen.status = resp.status
    seen.headers = {k: resp.headers[k] for k in KEPT_HEADERS if k in resp.headers}
    raw = b""
    try:
        async with resp:
            if not seen.stream or resp.status != 200:
                seen.body = await resp.read()
                return
            async for chunk in resp.content.iter_any():
                raw += chunk
                if seen.first_token is None and streamed_tokens(sse_payloads(raw)[0], seen.chat).pieces:
                    seen.first_token = time.monotonic()  # parsed only until the first token is in
    except CUT as exc:
        seen.cut = type(exc).__name__
    finally:
        if seen.stream and resp.status == 200:
            seen.events, seen.done = sse_payloads(raw)


async def replay_reference(
    session: aiohttp.ClientSession, url: str, requests: Sequence[Request], concurrency: int = 16
) -> dict[int, Tokens]:
    """Each request streamed once on the reference engine at ``url`` (token ids and usage asked
    for), as :class:`Tokens`; a request whose replay failed is left out."""
    gate = asyncio.Semaphore(concurrency)
    out: dict[int, Tokens] = {}

    async def one(req: Request) -> None:
        body = {**req.body, "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
        async with gate:
            try:
                async with session.post(url + req.route, json=body, timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    raw, status = await resp.read(), resp.status
            except (aiohttp.ClientError, TimeoutError):
                return
        events, done = sse_payloads(raw)
        if status == 200 and done:
            out[req.index] = streamed_tokens(events, req.chat)

    await asyncio.gather(*(one(r) for r in requests))
    return out


# ------------------------------------------------------------------------------ parsing
def sse_payloads(raw: bytes) -> tuple[list[Any], bool]:
    """The ``data:`` payloads of an SSE byte stream (JSON parsed where it parses) and whether
    ``[DONE]`` came; an unfinished last event is dropped."""
    events: list[Any] = []
    done = False
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        data = b"\n".join(line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:"))
        if not data:
            continue
        if data == b"[DONE]":
            done = True
            continue
        try:
            events.append(json.loads(data))
        except ValueError:
            events.append(data.decode(errors="replace"))
    return events, done


def is_openai_error(payload: Any) -> bool:
    """``{"error": {"message", "type", "param", "code"}}``, as docs/api.md promises."""
    inner = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(inner, dict) and {"message", "type", "param", "code"} <= set(inner)


def streamed_tokens(events: Sequence[Any], chat: bool) -> Tokens:
    pieces: list[str] = []
    ids: list[int] = []
    has_ids = False
    finish = None
    usage = None
    error = None
    response_ids: set[str] = set()
    for event in events:
        if not isinstance(event, dict):
            error = {"unparsed": event}
            continue
        if "error" in event:
            error = event
            continue
        if isinstance(event.get("id"), str):
            response_ids.add(event["id"])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {} if chat else None
            if chat and "role" in delta and not choice.get("token_ids") and not choice.get("finish_reason"):
                continue  # the chat head: the role, no token
            pieces.append((delta.get("content") or "") if chat else (choice.get("text") or ""))
            if choice.get("token_ids") is not None:
                has_ids = True
                ids.extend(choice["token_ids"])
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    return Tokens(pieces, ids if has_ids else None, finish, usage, response_ids, error)


def whole_tokens(body: bytes, chat: bool) -> Tokens:
    data = json.loads(body)
    choice = data["choices"][0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    ids = choice.get("token_ids")
    return Tokens(
        [text or ""],
        list(ids) if ids is not None else None,
        choice.get("finish_reason"),
        data.get("usage"),
        {data.get("id")},
    )


def tokens_of(seen: Seen) -> Tokens:
    return streamed_tokens(seen.events, seen.chat) if seen.stream else whole_tokens(seen.body, seen.chat)


# ------------------------------------------------------------------------------ comparing
def align(got: Sequence[Any], ref: Sequence[Any], partial: bool = False) -> tuple[int, int, int]:
    """(lost, duplicated, mismatched) tokens of ``got`` against ``ref``. ``partial``: ``got`` may
    stop early (a cut stream), so a missing tail is not lost. An inserted run equal to the
    tokens right before or after it is duplicated; other extra or different tokens are mismatched."""
    lost = duplicated = mismatched = 0
    ops = difflib.SequenceMatcher(a=ref, b=got, autojunk=False).get_opcodes()
    for n, (op, i1, i2, j1, j2) in enumerate(ops):
        if op == "delete":
            if not (partial and n == len(ops) - 1 and i2 == len(ref)):
                lost += i2 - i1
        elif op == "insert":
            run, n = list(got[j1:j2]), j2 - j1
            if run in (list(got[max(0, j1 - n) : j1]), list(got[j2 : j2 + n])):  # a repeat of its neighbours
                duplicated += len(run)
            else:
                mismatched += len(run)
        elif op == "replace":
            if partial and n == len(ops) - 1 and i2 == len(ref) and j2 - j1 < i2 - i1:
                mismatched += j2 - j1
            else:
                mismatched += max(i2 - i1, j2 - j1)
    return lost, duplicated, mismatched


def _sequences(got: Tokens, ref: Tokens, stream: bool) -> tuple[list[Any], list[Any]] | None:
    """What to align: token ids where the client has them, else streamed pieces (one per token)."""
    if got.ids is not None and ref.ids is not None:
        return got.ids, ref.ids
    if stream:
        return got.pieces, ref.pieces
    return None  # a whole answer without ids: only its text and counts can be compared


def compare(got: Tokens, ref: Tokens, seen: Seen) -> Ending:
    """A completed answer against the reference."""
    seqs = _sequences(got, ref, seen.stream)
    if seqs is not None:
        lost, duplicated, mismatched = align(*seqs)
    elif got.text == ref.text:
        lost = duplicated = mismatched = 0
    else:
        n_got = (got.usage or {}).get("completion_tokens", 0)
        n_ref = len(ref.pieces)
        lost, duplicated, mismatched = max(0, n_ref - n_got), max(0, n_got - n_ref), int(n_got == n_ref)
    problems = []
    if lost or duplicated or mismatched:
        problems.append(f"tokens: {lost} lost, {duplicated} duplicated, {mismatched} different")
    if got.text != ref.text:
        problems.append("text differs")
    if got.finish != ref.finish:
        problems.append(f"finish_reason {got.finish!r} != {ref.finish!r}")
    if seen.want_usage:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if (got.usage or {}).get(key) != (ref.usage or {}).get(key):
                problems.append(f"usage.{key} {(got.usage or {}).get(key)} != {(ref.usage or {}).get(key)}")
    if len(got.response_ids) > 1:
        problems.append(f"{len(got.response_ids)} response ids in one stream")
    if seen.want_ids != (got.ids is not None):
        problems.append("token_ids " + ("missing" if seen.want_ids else "not asked for but sent"))
    if problems:
        return Ending("mismatch", "; ".join(problems), lost, duplicated, mismatched)
    return Ending("identical", "")


def _prefix_problem(got: Tokens, ref: Tokens | None, seen: Seen) -> Ending | None:
    """A mismatch when the tokens before an error or a cut are not a prefix of the reference."""
    if ref is None or not seen.stream:
        return None
    seqs = _sequences(got, ref, True)
    assert seqs is not None
    _, duplicated, mismatched = align(*seqs, partial=True)
    if duplicated or mismatched:
        return Ending(
            "mismatch", f"before the end: {duplicated} duplicated, {mismatched} different", 0, duplicated, mismatched
        )
    return None


def _status_ending(seen: Seen) -> Ending:
    try:
        payload = json.loads(seen.body)
    except ValueError:
        payload = None
    message = (
        str(payload["error"].get("message"))[:80]
        if is_openai_error(payload)
        else seen.body[:80].decode(errors="replace")
    )
    reason = seen.headers.get("x-pdgate-reject-reason")
    cause = f"{seen.status} {reason or ''}{': ' if reason else ''}{message}".strip()
    missing = []
    if seen.status not in DOCUMENTED_STATUSES:
        missing.append("status not documented")
    if not is_openai_error(payload):
        missing.append("no OpenAI error JSON")
    if seen.status in DOCUMENTED_STATUSES and "retry-after" not in seen.headers:
        missing.append("no Retry-After")
    if seen.status == 429 and reason is None:
        missing.append("no x-pdgate-reject-reason")
    if missing:
        return Ending("undocumented", f"{cause} ({', '.join(missing)})")
    return Ending("error_status", cause)


def replica_killed(seen: Seen, kills: Sequence[tuple[int, float, float]]) -> bool:
    """Whether the replica that held ``seen`` was killed while it ran (``kills``: replica, start, end)."""
    return any(r == seen.replica and seen.start <= start + KILL_SLACK_S and start <= seen.end for r, start, _ in kills)


def classify(seen: Seen, ref: Tokens | None, kills: Sequence[tuple[int, float, float]]) -> Ending:
    """The one ending of ``seen`` (``ref``: the reference answer, needed when the answer began)."""
    if seen.timed_out:
        return Ending(
            "hang", f"no end after {seen.end - seen.start:.0f} s (status {seen.status}, {len(seen.events)} events)"
        )
    if seen.status is None:
        if seen.refused is not None and replica_killed(seen, kills):
            return Ending("replica_killed", f"no replica took it: {seen.refused}")
        return Ending("undocumented", f"no replica took it: {seen.refused}")
    if seen.status != 200:
        return _status_ending(seen)
    try:
        got = tokens_of(seen) if not seen.cut or seen.stream else None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return Ending("undocumented", f"unreadable answer: {type(exc).__name__}: {exc}")
    if ref is None:
        return Ending("undocumented", "no reference answer (the replay failed)")
    if seen.cut is not None:
        bad = _prefix_problem(got, ref, seen) if got is not None else None
        if bad is not None:
            return bad
        if replica_killed(seen, kills):
            return Ending("replica_killed", f"connection cut: {seen.cut}")
        return Ending("undocumented", f"connection cut with no replica killed: {seen.cut}")
    assert got is not None
    if seen.stream and got.error is not None:
        bad = _prefix_problem(got, ref, seen)
        if bad is not None:
            return bad
        inner = got.error.get("error") if isinstance(got.error, dict) else None
        if is_openai_error(got.error) and seen.done and seen.events and seen.events[-1] is got.error:
            return Ending("error_event", f"error event: {inner.get('type')}: {str(inner.get('message'))[:60]}")
        return Ending("undocumented", f"malformed error event: {str(got.error)[:100]}")
    if seen.stream and not seen.done:
        bad = _prefix_problem(got, ref, seen)
        return bad or Ending("undocumented", f"stream ended without [DONE] after {len(got.pieces)} tokens")
    return compare(got, ref, seen)
