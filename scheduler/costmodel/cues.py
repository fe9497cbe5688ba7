"""What a prompt asks for: a few dense features of the kind of answer it calls for.

Hashed n-grams (:func:`~scheduler.costmodel.features.hash_text`) learn words one by one, and a
word seen in a handful of training prompts is shrunk to nothing; on prompts unlike the training
ones they carry little. The cues pool many words into one feature each, so what they learn
transfers: an asked-for size ("in 100 words", "five examples", "a paragraph"), brevity or length
words, the kind of task (list, explain, classify, rewrite or translate, summarise, code, creative
writing, arithmetic), how many questions and numbered parts, and for a chat the turn and how long
the previous answers were. On alpaca_eval, leaving prompts out, they lift the within-model
Spearman of the output-length model from 0.41 to 0.48 (docs/slo.md).

The vector's layout (:data:`CUE_NAMES`) is part of the on-disk contract: gateway logs and trained
models hold cue vectors by position, so a change must append names, never reorder them. Only the
first and last :data:`~scheduler.costmodel.features.EDGE_CHARS` characters of a long text are read,
so a cue costs the same for any prompt length (tens of microseconds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CUE_NAMES", "request_cues"]

_EDGE_CHARS = 2000  # as features.EDGE_CHARS (not imported: features imports this module's names)

_NUMBER_WORDS = {
    "a": 1,
    "one": 1,
    "single": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "fifty": 50,
    "hundred": 100,
    "a few": 3,
    "several": 5,
}
# Tokens one unit of an asked-for size takes, roughly (a word ~1.3 tokens, a paragraph ~120).
_UNIT_TOKENS = {
    "word": 1.3,
    "character": 0.3,
    "sentence": 25.0,
    "line": 12.0,
    "paragraph": 120.0,
    "page": 600.0,
    "item": 30.0,
    "bullet": 30.0,
    "point": 30.0,
    "example": 40.0,
    "idea": 30.0,
    "tip": 35.0,
    "step": 35.0,
    "reason": 40.0,
    "question": 20.0,
    "name": 4.0,
    "title": 10.0,
    "verse": 40.0,
    "stanza": 40.0,
    "haiku": 20.0,
    "tweet": 40.0,
}
_UNITS = {unit: tokens for name, tokens in _UNIT_TOKENS.items() for unit in (name, name + "s")}

# Each kind: single words (matched as whole words) and phrases (matched as whole-word runs).
_KINDS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "brief": (
        frozenset(
            {"brief", "briefly", "short", "shortly", "concise", "concisely", "succinct", "tldr", "quick", "quickly"}
        ),
        (
            "one word",
            "one-word",
            "in a word",
            "one sentence",
            "one-sentence",
            "single sentence",
            "yes or no",
            "true or false",
            "tl;dr",
            "in a few words",
        ),
    ),
    "long": (
        frozenset(
            {
                "essay",
                "story",
                "article",
                "blog",
                "detailed",
                "thorough",
                "thoroughly",
                "comprehensive",
                "elaborate",
                "guide",
                "tutorial",
                "report",
                "proposal",
                "script",
                "chapter",
                "plan",
                "itinerary",
                "lesson",
            }
        ),
        ("in detail", "step by step", "step-by-step"),
    ),
    "write": (
        frozenset({"write", "compose", "draft", "create", "generate", "design", "develop"}),
        ("come up with", "make up"),
    ),
    "list": (
        frozenset(
            {
                "list",
                "enumerate",
                "outline",
                "bullet",
                "examples",
                "ideas",
                "ways",
                "tips",
                "suggestions",
                "options",
                "recommendations",
                "steps",
            }
        ),
        (),
    ),
    "explain": (
        frozenset({"explain", "describe", "discuss", "elaborate", "why"}),
        (
            "how does",
            "how do",
            "what are the benefits",
            "what are the differences",
            "what are the advantages",
            "what are the pros",
        ),
    ),
    "factual": (frozenset(), ()),  # by the first word: see _FACTUAL_FIRST
    "classify": (
        frozenset(
            {"classify", "categorize", "categorise", "identify", "choose", "select", "pick", "rate", "label", "detect"}
        ),
        ("which one", "which of", "determine whether", "is it", "true or false", "correct answer"),
    ),
    "rewrite": (
        frozenset(
            {"rewrite", "rephrase", "paraphrase", "correct", "edit", "proofread", "translate", "convert", "reword"}
        ),
        ("fix the", "improve the", "make it more"),
    ),
    "summarize": (
        frozenset({"summarize", "summarise", "summary", "tldr"}),
        ("tl;dr", "main points", "key points", "in short"),
    ),
    "code": (
        frozenset(
            {
                "function",
                "python",
                "javascript",
                "java",
                "sql",
                "code",
                "program",
                "script",
                "regex",
                "html",
                "css",
                "bash",
                "c++",
                "def",
            }
        ),
        ("```",),
    ),
    "creative": (
        frozenset(
            {
                "poem",
                "poetry",
                "song",
                "lyrics",
                "limerick",
                "haiku",
                "joke",
                "riddle",
                "rap",
                "sonnet",
                "slogan",
                "tagline",
                "story",
                "fiction",
            }
        ),
        (),
    ),
    "math": (
        frozenset({"solve", "calculate", "equation", "compute", "probability"}),
        ("sum of",),
    ),
    "you": (frozenset({"you", "your"}), ()),
}
_KIND_TESTS: dict[str, tuple[frozenset[str], tuple[tuple[str, str], ...]]] = {
    kind: (single, tuple((phrase.split()[0], phrase) for phrase in phrases))
    for kind, (single, phrases) in _KINDS.items()
}
"""The kinds with each phrase keyed by its first word (a phrase is looked for only when that word is there)."""
_FACTUAL_FIRST = frozenset(
    {"what", "who", "when", "where", "which", "how", "is", "are", "does", "do", "can", "was", "were", "did"}
)
_ARITHMETIC_RE = re.compile(r"\d\s*[-+*/x×÷^]\s*\d")
_NUMBERED_RE = re.compile(r"(?m)^\s*\d+[.)]")
# Word characters as features.hash_text keeps them, plus the few symbols the cues name (c++, tl;dr, ```).
_WORD_BYTES = bytes(c if (c >= 128 or chr(c).isalnum() or chr(c) in "_+;`'-") else 0x20 for c in range(256))

CUE_NAMES: tuple[str, ...] = (
    "asked_size_log",  # log1p(tokens the asked-for sizes add up to)
    "asked_size",  # 1 when the prompt names a size
    *(f"asks_{kind}" for kind in _KINDS),
    "questions",  # question marks, at most 5
    "lines",  # newlines / 5, at most 4
    "numbered_parts",  # lines starting "1." or "1)", / 3
    "text_chars_log",  # log1p(characters)
    "chat_turn_log",  # log1p(earlier assistant answers in the conversation)
    "previous_answer_log",  # log1p(mean characters of those answers / 4): roughly their tokens
)
"""Names of the cue vector's entries, in order (append only)."""


def request_cues(text: str, messages: Sequence[Mapping[str, Any]] | None = None) -> tuple[float, ...]:
    """The cue vector of a request: ``text`` is what the output-length model reads of the prompt
    (:func:`~scheduler.costmodel.features.chat_text` for a chat), ``messages`` the chat's
    messages when it is one (for the turn and the previous answers)."""
    if len(text) > 2 * _EDGE_CHARS:
        text = text[:_EDGE_CHARS] + "\n" + text[-_EDGE_CHARS:]
    lowered = text.lower()
    words = lowered.encode("utf-8", "surrogatepass").translate(_WORD_BYTES).decode("utf-8", "replace").split()
    vocabulary = set(words)
    padded = " " + " ".join(words) + " "
    asked, named = _asked_size(words)
    out = [math.log1p(min(asked, 20_000.0)), named]
    for kind, (single, phrases) in _KIND_TESTS.items():
        if kind == "factual":
            hit = bool(words) and words[0] in _FACTUAL_FIRST
        elif kind == "math":
            hit = (
                not vocabulary.isdisjoint(single)
                or ("sum" in vocabulary and " sum of " in padded)
                or _ARITHMETIC_RE.search(lowered) is not None
            )
        else:
            hit = (
                not vocabulary.isdisjoint(single)
                or any(first in vocabulary and f" {p} " in padded for first, p in phrases)
                or (kind == "code" and "```" in lowered)
            )
        out.append(1.0 if hit else 0.0)
    out += [
        float(min(lowered.count("?"), 5)),
        min(lowered.count("\n"), 20) / 5.0,
        len(_NUMBERED_RE.findall(lowered)) / 3.0 if "\n" in lowered or lowered[:1].isdigit() else 0.0,
        math.log1p(len(text)),
    ]
    out += _conversation(messages)
    return tuple(out)


def _asked_size(words: list[str]) -> tuple[float, float]:
    """Tokens the sizes a prompt names add up to ("100 words", "five tips", "a paragraph"), and
    1.0 when it names one: a number, or a number word, one or two words before a unit."""
    total = 0.0
    named = 0.0
    for i in [i for i, w in enumerate(words) if w in _UNITS]:
        for back in (1, 2):
            if i - back < 0:
                break
            word = words[i - back]
            if word.isdigit() and len(word) <= 4:
                count = float(word)
            elif word == "few" and i - back - 1 >= 0 and words[i - back - 1] == "a":
                count = 3.0
            elif word in _NUMBER_WORDS:
                count = float(_NUMBER_WORDS[word])
            else:
                continue
            total += count * _UNITS[words[i]]
            named = 1.0
            break
    return total, named


def _conversation(messages: Sequence[Mapping[str, Any]] | None) -> list[float]:
    if not messages:
        return [0.0, 0.0]
    answers = [len(_text_of(m.get("content"))) for m in messages if m.get("role") == "assistant"]
    if not answers:
        return [0.0, 0.0]
    return [math.log1p(len(answers)), math.log1p(sum(answers) / len(answers) / 4.0)]


def _text_of(content: Any) -> str:
    """A message's text: a string, or its text parts (images and audio carry no words)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
