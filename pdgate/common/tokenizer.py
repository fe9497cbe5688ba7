"""Tokenizers for the simulated engine (and for anything that must count tokens like it).

Two implementations share one small interface:

* :class:`BuiltinTokenizer` needs no files. It is deterministic and lossless: ASCII letter runs
  are split into pieces of at most three letters (lower-case or Capitalised, with or without a
  leading space), single digits with or without a leading space are pieces, and every other
  byte falls back to one byte token. English text comes out at roughly 2 tokens per word, the
  right order of magnitude for a BPE vocabulary, and ``decode(encode(s)) == s`` for every string.
* :class:`HFTokenizer` wraps a local Hugging Face tokenizer directory (``tokenizer.json``) via
  the ``tokenizers`` package, for exact counts with a real model's vocabulary.

Generated text only ever uses "piece" tokens (never byte or special tokens), so each generated
token decodes to a stable string on its own and streams cleanly.
"""

from __future__ import annotations

import json
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdgate.common.chat_template import ChatTemplate, find_chat_template

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"


class Tokenizer(ABC):
    """What the engine (and later the gateway and load generator) needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_token_id: int
    bos_token_id: int | None

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the tokenizer's own post-processing
        (e.g. a BOS token), as vLLM does for text completion prompts."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped."""

    @abstractmethod
    def generatable_ids(self) -> list[int]:
        """Ids the simulated model may emit (excluding EOS): each decodes to stable text alone."""

    @abstractmethod
    def token_text(self, token_id: int) -> str:
        """Text of one generatable token, for incremental (streamed) detokenization."""

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render chat messages to one prompt string ending where the assistant speaks.

        A deliberately simple template (``<role>: content`` lines) shared by the engine and every
        client that needs to count chat tokens the way the engine will. A Hugging Face tokenizer
        with a ``chat_template`` renders that instead.
        """
        lines = []
        for message in messages:
            lines.append(f"{message['role']}: {message_text(message.get('content'))}\n")
        if add_generation_prompt:
            lines.append("assistant:")
        return "".join(lines)


def message_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise ValueError("only text content parts are supported")
    return "".join(parts)


_MAX_PIECE_LETTERS = 3
# One match per token candidate: a letter run cut into pieces of at most three letters (only its
# first piece may carry the leading space), a digit with or without a leading space, or one
# character. A candidate that is not a piece becomes byte tokens.
_PIECE_RE = re.compile(rf" ?[A-Za-z]{{1,{_MAX_PIECE_LETTERS}}}| ?[0-9]|[\s\S]")


def _letter_pieces() -> list[str]:
    lower = string.ascii_lowercase
    words = list(lower)
    words += [a + b for a in lower for b in lower]
    words += [a + b + c for a in lower for b in lower for c in lower]
    capitalised = [w[0].upper() + w[1:] for w in words]
    pieces = []
    for prefix in ("", " "):
        pieces += [prefix + w for w in words]
        pieces += [prefix + w for w in capitalised]
    pieces += [" " + d for d in string.digits]
    return pieces


class BuiltinTokenizer(Tokenizer):
    """Deterministic, file-free tokenizer (see module docstring for its scheme)."""

    name = "pdgate-builtin"

    def __init__(self) -> None:
        specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
        self._specials = specials
        self.bos_token_id = 1
        self.eos_token_id = 2
        self._byte_base = len(specials)
        self._piece_base = self._byte_base + 256
        self._pieces = _letter_pieces()
        self._piece_ids = {p: self._piece_base + i for i, p in enumerate(self._pieces)}
        self._piece_bytes = [p.encode() for p in self._pieces]
        self.vocab_size = self._piece_base + len(self._pieces)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []  # no post-processor: the same ids with or without special tokens
        piece_id = self._piece_ids.get
        base = self._byte_base
        for candidate in _PIECE_RE.findall(text):
            token = piece_id(candidate)
            if token is None:
                ids.extend([base + b for b in candidate.encode()])
            else:
                ids.append(token)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        out = bytearray()
        byte_base, piece_base = self._byte_base, self._piece_base
        for token in token_ids:
            if token >= piece_base:
                out += self._piece_bytes[token - piece_base]
            elif token >= byte_base:
                out.append(token - byte_base)
        return out.decode("utf-8", errors="replace")

    def generatable_ids(self) -> list[int]:
        return list(range(self._piece_base, self.vocab_size))

    def token_text(self, token_id: int) -> str:
        if token_id >= self._piece_base:
            return self._pieces[token_id - self._piece_base]
        return self.decode([token_id])


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (``tokenizer.json`` + optional config)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("a Hugging Face tokenizer needs `pip install tokenizers`") from exc
        directory = Path(path)
        file = directory / "tokenizer.json" if directory.is_dir() else directory
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self._tok = _HFTok.from_file(str(file))
        self.name = str(directory)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(file.parent)
        self.eos_token_id = self._token_id(config.get("eos_token"), ["</s>", "<|endoftext|>", "<eos>"])
        bos = config.get("bos_token")
        self.bos_token_id = self._tok.token_to_id(bos) if isinstance(bos, str) else None
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self._special_ids = {self._tok.token_to_id(s) for s in special}
        self._special_ids.add(self.eos_token_id)
        self._generatable = [i for i in range(self.vocab_size) if i not in self._special_ids and self._stable(i)]
        self._texts: dict[int, str] = {}
        source = find_chat_template(file.parent, config)
        special_tokens = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        }
        self._chat_template = ChatTemplate(source, special_tokens) if source else None

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if self._chat_template is None:
            return super().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)

    def _token_id(self, configured: Any, fallbacks: list[str]) -> int:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for candidate in ([configured] if isinstance(configured, str) else []) + fallbacks:
            token = self._tok.token_to_id(candidate)
            if token is not None:
                return token
        raise ValueError("tokenizer has no recognisable EOS token")

    def _stable(self, token_id: int) -> bool:
        text = self._tok.decode([token_id], skip_special_tokens=True)
        return bool(text) and "\ufffd" not in text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)

    def generatable_ids(self) -> list[int]:
        return list(self._generatable)

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            # decode in context of a neutral left neighbour so leading spaces survive
            text = self._tok.decode([token_id], skip_special_tokens=True)
            self._texts[token_id] = text
        return text


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        data = json.loads(config_file.read_text())
        return data if isinstance(data, dict) else {}
    return {}


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None`` or ``"builtin"`` gives the built-in tokenizer; anything else is a local HF path."""
    if spec in (None, "", "builtin"):
        return BuiltinTokenizer()
    return HFTokenizer(spec)
