"""Incremental detokenization of a generation's output, with stop strings."""

from __future__ import annotations

from pdgate.common.tokenizer import Tokenizer


class OutputText:
    """Incremental detokenization with stop strings (held back while they could still match)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], include_stop: bool, eos_token_id: int) -> None:
        self._tok = tokenizer
        self._stops = stops
        self._include = include_stop
        self._eos = eos_token_id
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stop_hit: str | None = None

    def add(self, token_ids: list[int], *, stop_checks: bool = True) -> str:
        """Append tokens; return the text now safe to send (all of it once a stop matched)."""
        for token in token_ids:
            if token != self._eos:
                self.text += self._tok.token_text(token)
        if self._stops and stop_checks and self.stop_hit is None:
            start = max(0, self.sent - self._hold)
            found = [(idx, stop) for stop in self._stops if (idx := self.text.find(stop, start)) >= 0]
            if found:
                idx, stop = min(found)  # the earliest match wins
                self.stop_hit = stop
                self.text = self.text[: idx + (len(stop) if self._include else 0)]
        limit = len(self.text) if (self.stop_hit or not self._stops) else max(self.sent, len(self.text) - self._hold)
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta

    def flush(self) -> str:
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
