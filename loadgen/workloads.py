"""Synthetic workloads: lists of :class:`~loadgen.types.BenchRequest`, reproducible from a seed.

Every generator takes a :class:`~loadgen.prompts.PromptBuilder` (the tokenizer that counts) and a
``seed``; the same builder seed and workload seed give identical requests. Common conventions:

* ``max_tokens`` is the request's output length and ``extra`` is ``{"ignore_eos": True}`` unless
  ``ignore_eos=False``, so the server generates exactly that many tokens.
* ``prompt_tokens``: for completions the exact token count of the prompt text (special tokens such
  as a BOS, which the server adds, not included); for chat the count of the rendered chat template
  (:meth:`PromptBuilder.chat_tokens`), which is what the engine reports as prompt tokens.
* Lengths are given as an ``int`` or a :class:`~loadgen.lengths.LengthDist` (or its string form,
  see :meth:`LengthDist.parse`).
"""

from __future__ import annotations

import random
from typing import Any

from pdgate.loadgen.lengths import LengthDist, LengthSpec
from pdgate.loadgen.prompts import PromptBuilder
from pdgate.loadgen.types import Api, BenchRequest


def _dist(length: LengthSpec) -> LengthDist:
    return LengthDist.parse(length)


def _extra(ignore_eos: bool) -> dict[str, Any]:
    return {"ignore_eos": True} if ignore_eos else {}


def _request(
    index: int,
    api: Api,
    builder: PromptBuilder,
    text: str,
    tokens: int,
    max_tokens: int,
    *,
    ignore_eos: bool,
    system: str | None = None,
    **fields: Any,
) -> BenchRequest:
    """A single-prompt request: ``text`` (of ``tokens`` tokens) after an optional ``system`` text."""
    if api == "chat":
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": text})
        return BenchRequest(
            index=index,
            api="chat",
            max_tokens=max_tokens,
            messages=tuple(messages),
            prompt_tokens=builder.chat_tokens(messages),
            extra=_extra(ignore_eos),
            **fields,
        )
    if api != "completions":
        raise ValueError(f"api must be 'completions' or 'chat', not {api!r}")
    prompt = text if system is None else system + text
    return BenchRequest(
        index=index,
        api="completions",
        max_tokens=max_tokens,
        prompt=prompt,
        prompt_tokens=tokens,
        extra=_extra(ignore_eos),
        **fields,
    )


def synthetic(
    n: int,
    input_dist: LengthSpec,
    output_dist: LengthSpec,
    builder: PromptBuilder,
    seed: int = 0,
    api: Api = "completions",
    *,
    ignore_eos: bool = True,
    slo_class: str = "default",
) -> list[BenchRequest]:
    """``n`` independent requests with random prompts; input (prompt text) and output lengths
    drawn from the distributions."""
    inputs, outputs = _dist(input_dist), _dist(output_dist)
    rng = random.Random(f"synthetic:{seed}")
    requests = []
    for i in range(n):
        n_in, n_out = inputs.sample(rng), outputs.sample(rng)
        requests.append(
            _request(i, api, builder, builder.text(n_in, rng), n_in, n_out, ignore_eos=ignore_eos, slo_class=slo_class)
        )
    return requests


def shared_prefix(
    tenants: int,
    prefix_tokens: int,
    questions_per_tenant: int,
    question_tokens: LengthSpec,
    output_tokens: LengthSpec,
    builder: PromptBuilder,
    seed: int = 0,
    api: Api = "completions",
    *,
    ignore_eos: bool = True,
    slo_class: str = "default",
) -> list[BenchRequest]:
    """``tenants`` system prompts of ``prefix_tokens`` tokens each, each followed by
    ``questions_per_tenant`` different short questions; tenants interleaved in a seeded random
    order. Chat puts the prefix in a system message; completions prepends it to the question, and
    the prompt's tokens are exactly the prefix's followed by the question's."""
    questions, outputs = _dist(question_tokens), _dist(output_tokens)
    rng = random.Random(f"shared_prefix:{seed}")
    prefixes = [
        builder.block_text(f"tenant-{seed}-{t}", prefix_tokens) if prefix_tokens else "" for t in range(tenants)
    ]
    order = [t for t in range(tenants) for _ in range(questions_per_tenant)]
    rng.shuffle(order)
    requests = []
    for i, tenant in enumerate(order):
        n_q, n_out = questions.sample(rng), outputs.sample(rng)
        requests.append(
            _request(
                i,
                api,
                builder,
                builder.text(n_q, rng),
                prefix_tokens + n_q,
                n_out,
                ignore_eos=ignore_eos,
                system=prefixes[tenant] or None,
                slo_class=slo_class,
            )
        )
    return requests


def multi_turn(
    conversations: int,
    turns: int,
    question_tokens: LengthSpec,
    answer_tokens: LengthSpec,
    builder: PromptBuilder,
    seed: int = 0,
    *,
    ignore_eos: bool = True,
    slo_class: str = "default",
) -> list[BenchRequest]:
    """Chat conversations of ``turns`` turns. Turn ``k`` of conversation ``i`` (``session
    "conv-i"``, ``turn=k``) sends the history (the earlier questions, each followed by a synthetic
    assistant answer of that turn's answer length) plus a new question, and asks for an answer of
    that length (``max_tokens``). Requests are ordered turn by turn (every conversation's turn 0,
    then every turn 1, ...), so conversations progress side by side; the runner sends a turn only
    after the session's previous one ends."""
    questions, answers = _dist(question_tokens), _dist(answer_tokens)
    rng = random.Random(f"multi_turn:{seed}")
    plans = []
    for _ in range(conversations):
        plan = []
        for _ in range(turns):
            n_q, n_a = questions.sample(rng), answers.sample(rng)
            plan.append((builder.text(n_q, rng), builder.text(n_a, rng), n_a))
        plans.append(plan)
    requests: list[BenchRequest] = []
    for k in range(turns):
        for c, plan in enumerate(plans):
            messages: list[dict[str, Any]] = []
            for question, answer, _ in plan[:k]:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": plan[k][0]})
            requests.append(
                BenchRequest(
                    index=len(requests),
                    api="chat",
                    max_tokens=plan[k][2],
                    messages=tuple(messages),
                    prompt_tokens=builder.chat_tokens(messages),
                    session=f"conv-{c}",
                    turn=k,
                    slo_class=slo_class,
                    extra=_extra(ignore_eos),
                )
            )
    return requests
