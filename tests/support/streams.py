"""Streamed completions through a gateway, read chunk by chunk, and the admin API: for tests that
move, drain or remove what serves them."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import openai

from support.fleet import MODEL, get_json
from support.waiting import wait_until

TOKENS = 160
PROMPT = "Tell me a long story about a migrating bird and the engines that served it"


def admin(
    url: str, path: str, body: dict | None = None, method: str = "POST", headers: dict | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(
        f"{url}{path}",
        data=data if method == "POST" else None,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


class Stream:
    """A streamed completion read chunk by chunk, with a hook after the k-th token."""

    def __init__(
        self,
        url: str,
        request_id: str,
        *,
        chat: bool = False,
        tokens: int = TOKENS,
        prompt: str = PROMPT,
        usage: bool = True,
    ) -> None:
        self.url, self.request_id, self.chat = url, request_id, chat
        self.tokens, self.prompt, self.usage_wanted = tokens, prompt, usage
        self.text = ""
        self.events = 0
        self.usage = None
        self.ids: set[str] = set()
        self.finish: list[str] = []

    def run(self, at: int | None = None, action=None) -> Stream:
        api = client(self.url)
        common = {
            "model": MODEL,
            "max_tokens": self.tokens,
            "temperature": 0,
            "stream": True,
            "extra_body": {"ignore_eos": True},
            "extra_headers": {"X-Request-Id": self.request_id},
        }
        if self.usage_wanted:
            common["stream_options"] = {"include_usage": True}
        if self.chat:
            stream = api.chat.completions.create(messages=[{"role": "user", "content": self.prompt}], **common)
        else:
            stream = api.completions.create(prompt=self.prompt, **common)
        for chunk in stream:
            self.ids.add(chunk.id)
            if chunk.usage is not None:
                self.usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content if self.chat else choice.text
                if piece:
                    self.text += piece
                    self.events += 1
                if choice.finish_reason:
                    self.finish.append(choice.finish_reason)
            if at is not None and self.events == at and action is not None:
                action()
                action = None
        return self


def serving(url: str, request_id: str) -> str:
    for inst in get_json(f"{url}/admin/instances")["data"]:
        if any(s["request_id"] == request_id for s in inst["streams"]):
            return inst["id"]
    raise AssertionError(f"{request_id} is not running anywhere")


def generated(url: str, request_id: str, *, on: str) -> int:
    """The tokens the gateway has of stream ``request_id`` while instance ``on`` serves it (-1: it does not)."""
    for inst in get_json(f"{url}/admin/instances")["data"]:
        for s in inst["streams"]:
            if inst["id"] == on and s["request_id"] == request_id and not s["moving"]:
                return s["generated_tokens"]
    return -1


def assert_same(moved: Stream, reference: Stream) -> None:
    assert moved.text == reference.text
    assert moved.events == reference.events == moved.tokens
    assert moved.finish == reference.finish == ["length"]
    assert len(moved.ids) == 1  # one stream from the client's view
    assert moved.usage is not None and reference.usage is not None
    assert moved.usage.completion_tokens == reference.usage.completion_tokens == moved.tokens
    assert moved.usage.prompt_tokens == reference.usage.prompt_tokens
    assert moved.usage.total_tokens == reference.usage.total_tokens


class StreamsInFlight:
    """Streams read in threads at once; ``errors`` collects what any of them raised."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(s,)) for s in streams]
        for thread in self.threads:
            thread.start()

    def _run(self, stream: Stream) -> None:
        try:
            stream.run()
        except BaseException as exc:
            self.errors.append(exc)

    def running_everywhere(self, url: str, min_tokens: int = 5) -> list[dict[str, Any]]:
        """The gateway's instances once every stream runs and has ``min_tokens`` (polled)."""

        def all_streaming() -> list[dict[str, Any]] | None:
            instances = get_json(f"{url}/admin/instances")["data"]
            running = [s for i in instances for s in i["streams"]]
            ready = len(running) == len(self.streams) and all(s["generated_tokens"] >= min_tokens for s in running)
            return instances if ready else None

        return wait_until(all_streaming, message=f"every stream to run and have {min_tokens} tokens")

    def join(self, timeout_s: float = 60.0) -> None:
        for thread in self.threads:
            thread.join(timeout_s)
