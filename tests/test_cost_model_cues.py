"""What a prompt asks for (the cues), the prompt memory, and what they do to the output-length model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from pdgate.scheduler.costmodel.cues import CUE_NAMES, request_cues
from pdgate.scheduler.costmodel.features import RequestFeatures, hash_text, prompt_digest
from pdgate.scheduler.costmodel.length_baselines import evaluate_lengths
from pdgate.scheduler.costmodel.output_length import OutputLengthModel

pytestmark = pytest.mark.unit

WORDS = ["river", "garden", "planet", "engine", "market", "forest", "castle", "winter", "rocket", "island"]


def cue(text: str, name: str, messages=None) -> float:
    return dict(zip(CUE_NAMES, request_cues(text, messages)))[name]


def test_asked_sizes_add_up_in_tokens():
    assert cue("Describe the sea in 100 words.", "asked_size_log") == pytest.approx(math.log1p(130))
    assert cue("List five tips for sleeping well", "asked_size_log") == pytest.approx(math.log1p(5 * 35))
    assert cue("Write a paragraph and three sentences", "asked_size_log") == pytest.approx(math.log1p(120 + 75))
    assert cue("Give me a few examples", "asked_size_log") == pytest.approx(math.log1p(3 * 40))
    assert cue("Tell me about the sea", "asked_size") == 0.0
    assert cue("Describe the sea in 100 words.", "asked_size") == 1.0


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("Summarize this article briefly.", {"summarize", "brief", "long"}),
        ("Translate 'good morning' into French", {"rewrite"}),
        ("What is the capital of France?", {"factual"}),
        ("Fix the function:\n```def f(): pass```", {"rewrite", "code"}),
        ("Compute 12 * 7", {"math"}),
        ("Write a poem about your garden", {"write", "creative", "you"}),
        ("Answer yes or no: is the sky blue?", {"brief"}),
        ("Explain step by step how vaccines work", {"explain", "long"}),
    ],
)
def test_kinds_of_task(text, kinds):
    found = {name.removeprefix("asks_") for name in CUE_NAMES if name.startswith("asks_") and cue(text, name)}
    assert found == kinds


def test_structure_and_conversation_cues():
    assert cue("Why? How? When?", "questions") == 3.0
    assert cue("Do these:\n1. one\n2. two\n3) three", "numbered_parts") == 1.0
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "x" * 400},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": [{"type": "text", "text": "y" * 800}]},
        {"role": "user", "content": "and again?"},
    ]
    assert cue("and again?", "chat_turn_log", history) == pytest.approx(math.log1p(2))
    assert cue("and again?", "previous_answer_log", history) == pytest.approx(math.log1p(600 / 4))
    assert cue("and again?", "chat_turn_log") == 0.0
    assert len(request_cues("")) == len(CUE_NAMES)


def test_only_the_ends_of_a_long_prompt_are_read():
    middle = " ".join(["filler"] * 2000)
    assert cue(f"Read this. {middle} Now write an essay.", "asks_long") == 1.0
    assert cue(f"Read this. {middle} in 500 words {middle} Now reply.", "asked_size") == 0.0


def test_records_carry_cues_and_digest():
    text = "write a poem in 4 lines"
    f = RequestFeatures(9, None, "chat", "m", None, hash_text(text), False, request_cues(text), prompt_digest(text))
    record = json.loads(json.dumps(f.to_record()))
    assert RequestFeatures.from_record(record) == f
    old = {k: v for k, v in record.items() if k not in ("cues", "prompt_digest")}  # a log written before them
    assert RequestFeatures.from_record(old) == replace(f, cues=(), prompt_digest=None)
    with pytest.raises(ValueError, match="cues"):
        RequestFeatures.from_record(record | {"cues": ["x"]})
    with pytest.raises(ValueError, match="prompt_digest"):
        RequestFeatures.from_record(record | {"prompt_digest": -1})
    assert prompt_digest(text) == prompt_digest(text) != prompt_digest(text + " ")


def sized_rows(n: int, seed: int, with_cues: bool) -> list[tuple[RequestFeatures, int]]:
    """Answers as long as the size asked for, in words; each prompt's other words are random."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        size = int(rng.choice([10, 20, 50, 100, 200, 400]))
        text = f"tell me about the {' '.join(rng.choice(WORDS, size=4))} in {size} words"
        output = max(1, round(1.3 * size * rng.lognormal(0, 0.2)))
        cues = request_cues(text) if with_cues else ()
        rows.append((RequestFeatures(12, None, "chat", "m", None, hash_text(text), False, cues), output))
    return rows


def test_cues_carry_an_asked_size_to_prompts_never_seen():
    scores = {}
    for with_cues in (False, True):
        train, test = sized_rows(300, 1, with_cues), sized_rows(200, 2, with_cues)
        model = OutputLengthModel().fit([f for f, _ in train], [y for _, y in train])
        median, high = model.predict_many([f for f, _ in test])
        scores[with_cues] = evaluate_lengths(median, high, np.array([y for _, y in test], float), 0.9)["spearman"]
    # hashed words learn each number as its own word; the cue reads them all as one size
    assert scores[True] > 0.9 and scores[True] > scores[False]


def test_a_prompt_asked_again_is_predicted_from_its_answers():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(200):
        text = f"tell me about {' '.join(rng.choice(WORDS, size=5))} {i}"
        f = RequestFeatures(
            12, None, "chat", "m", None, hash_text(text), False, request_cues(text), prompt_digest(text)
        )
        rows.append((f, max(1, round(60 * rng.lognormal(0, 0.3)))))
    odd_text = "tell me about river garden planet engine market 999"
    odd = RequestFeatures(
        12, None, "chat", "m", None, hash_text(odd_text), False, request_cues(odd_text), prompt_digest(odd_text)
    )
    rows += [(odd, 900)] * 5  # one prompt whose answers always run long
    model = OutputLengthModel().fit([f for f, _ in rows], [y for _, y in rows])
    remembered = model.predict(odd)
    unseen = model.predict(replace(odd, prompt_digest=prompt_digest(odd_text + "!")))
    assert remembered.median > 500 and unseen.median < 200
    assert model.predict_many([odd])[0][0] == pytest.approx(remembered.median)
    assert model.describe()["memory_prompts"] == 201
    del model.__dict__["_memory"]  # a model saved before the memory existed still predicts
    assert model.predict(odd).median == pytest.approx(unseen.median)
