"""The prefix-sharing structure of a workload: how many prompt blocks an unlimited prefix cache
would hit, measured on token ids or declared by a Mooncake trace's hash ids."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pdgate.common.tokenizer import Tokenizer
from pdgate.loadgen.traces.mooncake import MooncakeRecord, mooncake_lengths
from pdgate.loadgen.types import BenchRequest


@dataclass(frozen=True)
class SharingStats:
    """Full blocks over a sequence of prompts and how many an unlimited prefix cache would hit
    (a block hits when the same block, after the same prefix, appeared in an earlier prompt)."""

    requests: int
    blocks: int
    unique_blocks: int
    hit_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def prompt_ids(request: BenchRequest, tokenizer: Tokenizer) -> list[int]:
    """The token ids of a request's prompt as counted in ``prompt_tokens`` (no special tokens
    added; chat: the rendered template)."""
    if request.api == "chat":
        text = tokenizer.apply_chat_template(list(request.messages or ()), add_generation_prompt=True)
    else:
        text = request.prompt or ""
    return tokenizer.encode(text, add_special_tokens=False)


def _sharing(chains: Iterable[Sequence[Any]]) -> SharingStats:
    nodes: dict[tuple[int, Any], int] = {}
    requests = blocks = hits = 0
    for chain in chains:
        requests += 1
        parent = -1
        for block in chain:
            blocks += 1
            key = (parent, block)
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = len(nodes)
            else:
                hits += 1
            parent = node
    return SharingStats(requests, blocks, len(nodes), hits)


def block_sharing(requests: Sequence[BenchRequest], tokenizer: Tokenizer, block_tokens: int) -> SharingStats:
    """Prefix sharing measured on the prompts' token ids, in full blocks of ``block_tokens``
    (as a paged prefix cache sees them)."""

    def chains() -> Iterator[list[tuple[int, ...]]]:
        for request in requests:
            ids = prompt_ids(request, tokenizer)
            yield [tuple(ids[i : i + block_tokens]) for i in range(0, len(ids) - block_tokens + 1, block_tokens)]

    return _sharing(chains())


def trace_sharing(records: Sequence[MooncakeRecord], block_tokens: int = 512) -> SharingStats:
    """Prefix sharing a Mooncake trace declares through its hash ids (full blocks only): what
    :func:`block_sharing` measures on its replay with ``api="completions"`` and no filters."""

    def chains() -> Iterator[Sequence[int]]:
        for record in records:
            full = sum(1 for n in mooncake_lengths(record, block_tokens) if n == block_tokens)
            yield record.hash_ids[:full]

    return _sharing(chains())
