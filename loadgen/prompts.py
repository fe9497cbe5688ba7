"""Prompt text of an exact token count, for a given tokenizer.

:class:`PromptBuilder` writes synthetic text out of "words": single tokens whose text is a space
followed by ASCII letters (``" the"``, ``" qzx"``), found once per builder in the tokenizer's
``generatable_ids()``. A word is kept only if it stays one token after another word, so a
space-separated run of words tokenizes back to exactly one token per word for the builtin
tokenizer and for byte-level BPE vocabularies (GPT-2, Llama 3, Qwen). Whatever the tokenizer, every
returned text is checked by re-encoding and fixed up (trimmed or padded) until it has the exact
count; only the builtin tokenizer is trusted without the check, because its scheme makes a
space-prefixed run of at most three letters one token by construction.

Contracts (``count`` is ``len(tokenizer.encode(text, add_special_tokens=False))``):

* ``text(n)`` has ``count == n``.
* ``block_text(id, B)`` has ``count == B``, is the same text for the same ``(id, B)`` and seed, and
  differs for different ids (always for integer ids less than the word-pool size apart; otherwise
  with overwhelming probability). Every block starts with a space-prefixed word and ends in a
  letter, so blocks concatenate without merging tokens across their boundaries: the token ids of
  ``block_text(a) + block_text(b)`` are those of ``a`` followed by those of ``b``. This holds for
  tokenizers whose pre-tokenizer splits before a space (builtin, byte-level BPE, SentencePiece
  with a prefix space only at the start of the text); it is what trace replay relies on.
* ``block_text(id, B, take=m)`` is the first ``m`` tokens of that block (a partial last block).

A tokenizer with fewer than a handful of such words (``clean`` is then false) falls back to raw
token texts: counts stay exact, but blocks may then merge at their boundaries.

A server adds the tokenizer's special tokens (a BOS) to a text completion prompt itself; the counts
here never include them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from pdgate.common.tokenizer import BuiltinTokenizer, Tokenizer, message_text

BlockId = int | str

_MAX_POOL = 8192  # words kept per tokenizer: plenty of variety, bounded set-up cost
_MIN_CLEAN_POOL = 8  # below this the tokenizer has too few clean words: fall back to raw tokens
_FIT_ROUNDS = 64
_LEFT = "x"  # a neighbour word: candidates must stay one token after it


class PromptBuilder:
    """Builds prompt texts of exact token counts for ``tokenizer``; ``seed`` fixes block texts
    and the default random stream of :meth:`text`."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self._rng = random.Random(seed)
        words = _clean_words(tokenizer)
        self.clean = len(words) >= _MIN_CLEAN_POOL
        self._words: list[str] = words if self.clean else _raw_pieces(tokenizer)
        if not self._words:
            raise ValueError(f"tokenizer {tokenizer.name} has no generatable tokens with text")
        # builtin: one token per space-prefixed run of <= 3 ASCII letters, so no need to re-encode
        self._trusted = self.clean and isinstance(tokenizer, BuiltinTokenizer)
        self._offset = random.Random(f"{seed}:offset").randrange(len(self._words))
        self._blocks: dict[tuple[BlockId, int], tuple[str, bool]] = {}  # texts are cached, not words
        self._partials: dict[tuple[BlockId, int, int], str] = {}

    @property
    def pool_size(self) -> int:
        """How many distinct words (or raw token texts) the text is drawn from."""
        return len(self._words)

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> int:
        """Prompt tokens of a chat request as the engine counts them: the rendered chat template
        (with the generation prompt), encoded without extra special tokens as vLLM does for chat.
        A tokenizer object without ``apply_chat_template`` gives the sum of the contents' tokens."""
        render = getattr(self.tokenizer, "apply_chat_template", None)
        if render is None:
            return sum(self.count(message_text(m.get("content"))) for m in messages)
        return self.count(render(list(messages), add_generation_prompt=True))

    def text(self, n: int, rng: random.Random | None = None) -> str:
        """Random text of exactly ``n`` tokens, drawn from ``rng`` (default: the builder's own)."""
        if n < 0:
            raise ValueError("a prompt cannot have a negative length")
        if n == 0:
            return ""
        rng = rng or self._rng
        words = rng.choices(self._words, k=n)
        text = "".join(words)
        return text if self._trusted else self._fit(text, n, rng)

    def block_text(self, block_id: BlockId, block_tokens: int, take: int | None = None) -> str:
        """The text of block ``block_id`` (``block_tokens`` tokens), or its first ``take`` tokens."""
        if block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        text, clean = self._block(block_id, block_tokens)
        if take is None or take == block_tokens:
            return text
        if not 0 <= take <= block_tokens:
            raise ValueError(f"take must be within 0..{block_tokens}, not {take}")
        if take == 0:
            return ""
        key = (block_id, block_tokens, take)
        cached = self._partials.get(key)
        if cached is None:
            rng = random.Random(f"{self.seed}:block:{block_id!r}:{block_tokens}:{take}")
            if clean:
                cached = "".join(self._block_words(block_id, block_tokens)[:take])
                if not self._trusted and self.count(cached) != take:
                    cached = self._fit(cached, take, rng)
            else:
                ids = self.tokenizer.encode(text, add_special_tokens=False)[:take]
                cached = self._fit(self.tokenizer.decode(ids), take, rng)
            self._partials[key] = cached
        return cached

    def _block_words(self, block_id: BlockId, block_tokens: int) -> list[str]:
        """The words a block is drawn as (a pure function of the seed, id and size)."""
        rng = random.Random(f"{self.seed}:block:{block_id!r}:{block_tokens}")
        pool = self._words
        if isinstance(block_id, int) and not isinstance(block_id, bool):
            first = pool[(block_id + self._offset) % len(pool)]  # consecutive ids never share it
        else:
            first = pool[rng.randrange(len(pool))]
        return [first, *rng.choices(pool, k=block_tokens - 1)]

    def _block(self, block_id: BlockId, block_tokens: int) -> tuple[str, bool]:
        """A block's text, and whether it is exactly its words (one token each)."""
        key = (block_id, block_tokens)
        cached = self._blocks.get(key)
        if cached is not None:
            return cached
        text = "".join(self._block_words(block_id, block_tokens))
        result = (text, True)
        if not self._trusted and self.count(text) != block_tokens:
            rng = random.Random(f"{self.seed}:fit:{block_id!r}:{block_tokens}")
            result = (self._fit(text, block_tokens, rng), False)
        self._blocks[key] = result
        return result

    def _fit(self, text: str, n: int, rng: random.Random) -> str:
        """Trim or pad ``text`` until it encodes to exactly ``n`` tokens."""
        tok = self.tokenizer
        for _ in range(_FIT_ROUNDS):
            ids = tok.encode(text, add_special_tokens=False)
            m = len(ids)
            if m == n:
                return text
            if m > n:
                shorter = tok.decode(ids[:n])
                text = shorter if len(shorter) < len(text) else text[:-1]
            else:
                text += "".join(rng.choices(self._words, k=n - m))
        # last resort: single words at a time, then single characters
        for _ in range(4 * n + 16):
            m = self.count(text)
            if m == n:
                return text
            text = text[:-1] if m > n else text + rng.choice(self._words)
        raise ValueError(f"could not build text of exactly {n} tokens with tokenizer {tok.name}")


def _clean_words(tokenizer: Tokenizer) -> list[str]:
    """Space-prefixed ASCII-letter words that are one token even right after another word."""
    ids = tokenizer.generatable_ids()
    random.Random(0).shuffle(ids)
    left = tokenizer.encode(_LEFT, add_special_tokens=False)
    seen: set[str] = set()
    words: list[str] = []
    builtin = isinstance(tokenizer, BuiltinTokenizer)
    for token in ids:
        stem = tokenizer.decode([token]).strip()
        if not stem or not stem.isascii() or not stem.isalpha():
            continue
        word = " " + stem
        if word in seen:
            continue
        seen.add(word)
        if not builtin:
            in_context = tokenizer.encode(_LEFT + word, add_special_tokens=False)
            if len(in_context) != len(left) + 1 or in_context[: len(left)] != left:
                continue
            if len(tokenizer.encode(word, add_special_tokens=False)) != 1:
                continue
        elif len(stem) > 3:
            continue
        words.append(word)
        if len(words) >= _MAX_POOL:
            break
    words.sort()  # independent of the scan order
    return words


def _raw_pieces(tokenizer: Tokenizer) -> list[str]:
    """Fallback material: the decoded text of every generatable token (needs the fix-up loop)."""
    pieces = {tokenizer.decode([t]) for t in tokenizer.generatable_ids()}
    return sorted(p for p in pieces if p and "\ufffd" not in p)
