"""Output-length model, request features, datasets and the model store (no network, seconds)."""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import joblib
import numpy as np
import pytest

from pdgate.common.tokenizer import load_tokenizer
from pdgate.scheduler.costmodel.datasets import LabeledRequest, read_dataset, split_holdout
from pdgate.scheduler.costmodel.features import RequestFeatures, _bigram_hashes, chat_text, hash_text, text_words
from pdgate.scheduler.costmodel.output_length import (
    GlobalMeanBaseline,
    LengthPrediction,
    OutputLengthModel,
    PromptLengthBaseline,
    evaluate_lengths,
)
from pdgate.scheduler.costmodel.store import ModelStore

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path("/work/shared/data/alpaca_eval/results")
FILLER = [
    "river",
    "mountain",
    "paper",
    "window",
    "garden",
    "coffee",
    "planet",
    "music",
    "engine",
    "yellow",
    "silver",
    "market",
    "bridge",
    "forest",
    "doctor",
    "camera",
    "letter",
    "island",
    "winter",
    "button",
    "pencil",
    "rocket",
    "castle",
]


def synthetic_rows(n: int, seed: int) -> list[tuple[RequestFeatures, int]]:
    """Output length set by the prompt's words (essay ~400, yes/no ~5, else ~60) and its length."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        kind = rng.choice(["essay", "yesno", "other"])
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 60))))
        if kind == "essay":
            text, base = f"write an essay about {' '.join(words)}", 400
        elif kind == "yesno":
            text, base = f"answer yes or no: is the {' '.join(words)} real?", 5
        else:
            text, base = f"tell me about the {' '.join(words)}", 60
        prompt_tokens = 2 * (len(words) + 5)
        output = base * (prompt_tokens / 40) ** 0.4 * rng.lognormal(0, 0.35)
        max_tokens = int(rng.choice([256, 1024])) if rng.random() < 0.3 else None
        output = max(1, round(output))
        if max_tokens is not None:
            output = min(output, max_tokens)
        rows.append((RequestFeatures(prompt_tokens, max_tokens, "chat", "sim-model", None, hash_text(text)), output))
    return rows


@pytest.fixture(scope="module")
def synthetic() -> tuple[list[RequestFeatures], list[int], list[RequestFeatures], np.ndarray]:
    train = synthetic_rows(700, seed=1)
    test = synthetic_rows(400, seed=2)
    return ([f for f, _ in train], [y for _, y in train], [f for f, _ in test], np.array([y for _, y in test]))


@pytest.fixture(scope="module")
def fitted(synthetic) -> OutputLengthModel:
    features, outputs, _, _ = synthetic
    return OutputLengthModel().fit(features, outputs)


# --- features ---------------------------------------------------------------------------------


def test_hash_text_is_pinned_and_normalised():
    # the index scheme is an on-disk contract (gateway logs, trained models): these values must not change
    assert hash_text("Hello") == {zlib.crc32(b"hello") % (1 << 14): 1.0}
    assert hash_text("hello, world!") == {
        4419: pytest.approx(3**-0.5),
        9862: pytest.approx(3**-0.5),
        10929: pytest.approx(3**-0.5),
    }
    assert hash_text("") == {} and hash_text("!?.") == {}
    repeated = hash_text("a a a b")
    assert len(repeated) == 4  # a, b, "a a", "a b"
    assert sum(v * v for v in repeated.values()) == pytest.approx(1.0)
    assert max(repeated, key=repeated.get) == zlib.crc32(b"a") % (1 << 14)  # 1 + ln 3 is the largest weight
    assert all(0 <= i < 64 for i in hash_text("some words here", n_features=64))


def _hash_text_with_numpy(text: str, n_features: int) -> dict[int, float]:
    """The documented scheme with numpy all the way (what hash_text computes for long texts; short
    ones take plain integers, which must give the same indices, weights and order)."""
    words = text_words(text)
    if not words:
        return {}
    unigrams = np.fromiter(map(zlib.crc32, words), np.uint64, len(words))
    index = np.concatenate((unigrams, _bigram_hashes(unigrams))) % np.uint64(n_features)
    keys, counts = np.unique(index, return_counts=True)
    if len(keys) == len(index):
        return dict.fromkeys(keys.tolist(), 1.0 / len(keys) ** 0.5)
    weights = 1.0 + np.log(counts.astype(float))
    weights *= 1.0 / float(weights @ weights) ** 0.5
    return dict(zip(keys.tolist(), weights.tolist(), strict=True))


def test_hash_text_of_short_texts_is_the_numpy_schemes_exactly():
    rng = np.random.default_rng(7)
    vocab = ["a", "b", "hello", "World", "naïve", "日本語", "x_y", "42", "the", "the"] + [f"w{i}" for i in range(40)]
    for _ in range(300):
        n = int(rng.integers(1, 60))
        text = " ".join(str(w) for w in rng.choice(vocab[: int(rng.integers(2, len(vocab)))], n))
        for n_features in (1, 7, 64, 1 << 14, 1 << 20):
            ours = hash_text(text, n_features)
            assert list(ours.items()) == list(_hash_text_with_numpy(text, n_features).items()), text


def test_feature_records_hold_tuples_json_writes_as_pairs():
    features = RequestFeatures(10, 5, "chat", "m", "app", hash_text("hello world, hello again"))
    record = features.to_record()
    assert json.loads(json.dumps(record))["text_hash"] == [[i, w] for i, w in features.text_hash.items()]
    assert RequestFeatures.from_record(record) == features
    assert RequestFeatures.from_record(json.loads(json.dumps(record))) == features
    gc.collect()
    gc.collect()
    assert not gc.is_tracked(record)  # nothing in it can be part of a cycle: the collector lets it be


def test_hash_text_is_stable_across_processes():
    text = "Write an essay about the history of the Roman empire, please."
    code = (
        "import json; from scheduler.costmodel.features import hash_text; "
        f"print(json.dumps(sorted(hash_text({text!r}).items())))"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    theirs = {int(i): v for i, v in json.loads(out.stdout)}
    assert theirs == pytest.approx(hash_text(text))


def test_hash_text_reads_only_the_ends_of_long_texts():
    middle = " ".join(["filler"] * 5000)
    long_text = "START instruction " + middle + " final question END"
    h = hash_text(long_text)
    assert zlib.crc32(b"start") % (1 << 14) in h and zlib.crc32(b"end") % (1 << 14) in h
    assert hash_text("x " * 3000 + "unique_marker " + "y " * 3000).get(zlib.crc32(b"unique_marker") % (1 << 14)) is None


def test_chat_text_puts_the_last_user_message_first():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "second "},
                {"type": "image_url", "image_url": {}},
                {"type": "text", "text": "question"},
            ],
        },
    ]
    assert chat_text(messages) == "second question\nBe brief."
    assert chat_text([{"role": "assistant", "content": "hi"}]) == "hi"


def test_request_features_record_round_trip():
    f = RequestFeatures(123, 256, "chat", "m", "app-1", hash_text("write a poem"))
    record = json.loads(json.dumps(f.to_record()))
    assert isinstance(record["text_hash"], list) and all(len(p) == 2 for p in record["text_hash"])
    assert RequestFeatures.from_record(record) == f
    bare = RequestFeatures(5, None, "completion", "m", None, {})
    assert RequestFeatures.from_record(bare.to_record()) == bare
    with pytest.raises(ValueError, match="endpoint"):
        RequestFeatures.from_record(record | {"endpoint": "embeddings"})
    with pytest.raises(ValueError, match="text_hash"):
        RequestFeatures.from_record(record | {"text_hash": [[1, 2, 3]]})


# --- output length ----------------------------------------------------------------------------


def test_model_beats_both_baselines_on_held_out_data(synthetic, fitted):
    features, outputs, test_features, actual = synthetic
    results = {}
    for name, predictor in (
        ("model", fitted),
        ("global_mean", GlobalMeanBaseline().fit(features, outputs)),
        ("prompt_length", PromptLengthBaseline().fit(features, outputs)),
    ):
        median, high = predictor.predict_many(test_features)
        results[name] = evaluate_lengths(median, high, actual, 0.9)
    model = results["model"]
    for name in ("global_mean", "prompt_length"):
        assert model["spearman"] > (results[name]["spearman"] or 0.0) + 0.2, results
        assert model["mae"] < 0.8 * results[name]["mae"], results
    assert model["spearman"] > 0.85 and model["within_2x"] > 0.85, model
    assert 0.8 <= model["coverage_high"] <= 0.97, model
    assert fitted.n_train == len(outputs) and fitted.q_high == 0.9 and fitted.trained_at is not None


def test_predictions_are_ordered_and_capped(synthetic, fitted):
    _, _, test_features, _ = synthetic
    median, high = fitted.predict_many(test_features)
    assert np.all(median >= 1) and np.all(high >= median)
    for f, m, h in zip(test_features, median, high):
        if f.max_tokens is not None:
            assert m <= f.max_tokens and h <= f.max_tokens
    essay = RequestFeatures(40, 16, "chat", "sim-model", None, hash_text("write an essay about the river"))
    capped = fitted.predict(essay)
    assert capped == LengthPrediction(16.0, 16.0)
    uncapped = fitted.predict(RequestFeatures(40, None, "chat", "sim-model", None, essay.text_hash))
    yes_no = hash_text("answer yes or no: is it real?")
    short = fitted.predict(RequestFeatures(40, None, "chat", "sim-model", None, yes_no))
    assert uncapped.median > 150 and short.median < 20 and uncapped.high > uncapped.median


def test_predict_matches_predict_many_and_survives_pickling(synthetic, fitted, tmp_path):
    _, _, test_features, _ = synthetic
    median, high = fitted.predict_many(test_features[:50])
    single = [fitted.predict(f) for f in test_features[:50]]
    assert median == pytest.approx([p.median for p in single]) and high == pytest.approx([p.high for p in single])
    joblib.dump(fitted, tmp_path / "m.joblib")
    loaded = joblib.load(tmp_path / "m.joblib")
    assert loaded.predict(test_features[0]) == fitted.predict(test_features[0])
    unknown = RequestFeatures(10, None, "completion", "never-seen", "new-tag", {1 << 20: 1.0, 3: 0.5})
    assert loaded.predict(unknown).median >= 1  # unknown model, tag and out-of-range hash index are ignored


def test_prior_and_small_data_fallbacks():
    prior = OutputLengthModel.prior(default_median=100, default_high=400)
    f = RequestFeatures(10, None, "chat", "m", None, {})
    assert prior.predict(f) == LengthPrediction(100.0, 400.0)
    assert prior.predict(RequestFeatures(10, 50, "chat", "m", None, {})) == LengthPrediction(50.0, 50.0)
    assert prior.predict_many([f])[0].tolist() == [100.0]
    small = OutputLengthModel().fit([f] * 10, list(range(1, 11)))
    assert small.kind == "empirical" and small.predict(f) == LengthPrediction(5.5, pytest.approx(9.1))
    with pytest.raises(ValueError, match=">= 1"):
        OutputLengthModel().fit([f, f], [0, 3])


def test_model_uses_model_name_and_prompt_length_without_text():
    rng = np.random.default_rng(0)
    features, outputs = [], []
    for _ in range(400):
        model = str(rng.choice(["terse", "verbose"]))
        tokens = int(rng.integers(10, 2000))
        base = 20 if model == "terse" else 300
        features.append(RequestFeatures(tokens, None, "completion", model, None, {}))
        outputs.append(max(1, int(base * (tokens / 100) ** 0.3 * rng.lognormal(0, 0.2))))
    m = OutputLengthModel().fit(features, outputs)
    terse = m.predict(RequestFeatures(100, None, "completion", "terse", None, {}))
    verbose = m.predict(RequestFeatures(100, None, "completion", "verbose", None, {}))
    longer = m.predict(RequestFeatures(1500, None, "completion", "verbose", None, {}))
    assert 12 < terse.median < 32 and 200 < verbose.median < 420 and longer.median > verbose.median


def test_evaluate_lengths_known_values():
    median, high, actual = np.array([10.0, 20, 30, 40]), np.array([20.0, 20, 60, 50]), np.array([10.0, 50, 31, 45])
    out = evaluate_lengths(median, high, actual, 0.9)
    assert out["n"] == 4 and out["mae"] == pytest.approx((0 + 30 + 1 + 5) / 4)
    assert out["within_2x"] == 0.75 and out["coverage_high"] == 0.75
    assert out["spearman"] == pytest.approx(0.4) and out["kendall"] == pytest.approx(1 / 3)
    constant = evaluate_lengths(np.full(3, 5.0), np.full(3, 9.0), np.array([1.0, 5, 9]), 0.9)
    assert constant["spearman"] is None and constant["kendall"] is None
    json.dumps(constant, allow_nan=False)


# --- datasets ---------------------------------------------------------------------------------


def gateway_row(i: int, **overrides) -> dict:
    row = {
        "v": 1,
        "kind": "pdgate-request",
        "ts": 1.0 + i,
        "request_id": f"r{i}",
        "model": "m",
        "endpoint": "chat",
        "tag": None,
        "prompt_tokens": 100 + i,
        "max_tokens": 512,
        "text_hash": [[5, 0.6], [9, 0.8]],
        "output_tokens": 40 + i,
        "finish_reason": "stop",
        "timing": {"ttft_s": 0.1},
        "placement": {},
        "predicted": {},
    }
    return row | overrides


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_generic_alpaca_and_gateway_rows(tmp_path):
    tok = load_tokenizer("builtin")
    generic = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"prompt": "Say hello", "output": "Hello there friend", "model": "a", "max_tokens": 64, "tag": "t"},
            {"messages": [{"role": "user", "content": "hi"}], "output_tokens": 7},
            {"prompt": [1, 2, 3, 4], "output_tokens": 3},
            {"prompt": "empty answer", "output": ""},
        ],
    )
    rows = read_dataset(generic, tok)
    assert len(rows) == 3  # the empty output is skipped
    first = rows[0].features
    assert first.endpoint == "completion" and first.model == "a" and first.max_tokens == 64 and first.tag == "t"
    assert first.prompt_tokens == len(tok.encode("Say hello")) and first.text_hash == hash_text("Say hello")
    assert rows[0].output_tokens == len(tok.encode("Hello there friend"))
    chat = rows[1].features
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat.endpoint == "chat" and chat.prompt_tokens == len(tok.encode(rendered)) and rows[1].output_tokens == 7
    assert rows[2].features.prompt_tokens == 4 and rows[2].features.text_hash == {}

    alpaca = tmp_path / "model_outputs.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Name a color.", "input": "", "output": "Blue.", "generator": "g1"},
                {"instruction": "Translate", "input": "bonjour", "output": "hello", "generator": "g1"},
            ]
        )
    )
    arows = read_dataset(alpaca, tok)
    assert [r.features.model for r in arows] == ["g1", "g1"] and arows[0].features.endpoint == "chat"
    assert arows[1].features.text_hash == hash_text("Translate\n\nbonjour")

    log = write_jsonl(
        tmp_path / "requests.jsonl",
        [gateway_row(0), gateway_row(1, output_tokens=0), gateway_row(2, output_tokens=None), gateway_row(3)],
    )
    grows = read_dataset(log, tok)
    assert [r.record["request_id"] for r in grows] == ["r0", "r3"]
    assert grows[0].features == RequestFeatures(100, 512, "chat", "m", None, {5: 0.6, 9: 0.8})
    assert grows[0].record["timing"] == {"ttft_s": 0.1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "x", "output_tokens": 3}\n{"foo": 1}\n', r"bad\.jsonl:2: unknown row format"),
        ('{"prompt": "x", "output_tokens": "many"}\n', r"bad\.jsonl:1: output_tokens"),
        ('{"prompt": "x"\n', r"bad\.jsonl:1: invalid JSON"),
        ('[{"instruction": "x", "output": "y"}, 3]', r"bad\.jsonl record 1: expected a JSON object"),
        (json.dumps(gateway_row(0, prompt_tokens=-1)) + "\n", r"bad\.jsonl:1: prompt_tokens"),
        (json.dumps(gateway_row(0, v=2)) + "\n", r"bad\.jsonl:1: unsupported pdgate-request log version"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_dataset(path, load_tokenizer("builtin"))


def test_split_holdout_keeps_each_prompt_on_one_side():
    rows = []
    for generator in ("g1", "g2", "g3"):
        for p in range(40):
            record = {"instruction": f"prompt number {p}", "output": "x", "generator": generator}
            features = RequestFeatures(5, None, "chat", generator, None, hash_text(record["instruction"]))
            rows.append(LabeledRequest(features, p + 1, record))
    train, test = split_holdout(rows, 0.25, seed=3)
    train_prompts = {r.record["instruction"] for r in train}
    test_prompts = {r.record["instruction"] for r in test}
    assert not train_prompts & test_prompts and len(test_prompts) == 10 and len(test) == 30
    again = split_holdout(list(reversed(rows)), 0.25, seed=3)
    assert {r.record["instruction"] for r in again[1]} == test_prompts  # independent of row order
    assert split_holdout(rows, 0.25, seed=4)[1] != test
    assert split_holdout(rows, 0.0)[1] == []


@pytest.mark.skipif(not ALPACA.is_dir(), reason="alpaca_eval results are not present under /work/shared/data")
def test_real_alpaca_file_reads_and_splits_by_instruction():
    files = sorted(ALPACA.glob("*/model_outputs.json"))[:2]
    tok = load_tokenizer("builtin")
    rows = [r for path in files for r in read_dataset(path, tok)]
    assert len(rows) > 1500 and len({r.features.model for r in rows}) == 2
    train, test = split_holdout(rows, 0.2)
    assert not {r.record["instruction"] for r in train} & {r.record["instruction"] for r in test}


# --- store ------------------------------------------------------------------------------------


def test_store_versions_current_and_keep(tmp_path):
    store = ModelStore(tmp_path / "models", keep=2)
    assert store.load_current() is None and store.versions() == []
    dirs = [store.save({"output_length": OutputLengthModel.prior(10 + i, 100)}, {"n_train": i}) for i in range(3)]
    assert [Path(d).name for d in dirs] == ["v0001", "v0002", "v0003"]
    assert store.versions() == ["v0002", "v0003"]  # keep=2 pruned v0001
    assert (tmp_path / "models" / "CURRENT").read_text().strip() == "v0003"
    components, meta = store.load_current()
    assert meta["version"] == "v0003" and meta["n_train"] == 2 and "created" in meta
    f = RequestFeatures(1, None, "chat", "m", None, {})
    assert components["output_length"].predict(f).median == 12
    assert store.load("v0002")[1]["n_train"] == 1
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no staging left


def test_store_failed_save_leaves_current_alone(tmp_path):
    store = ModelStore(tmp_path)
    store.save({"a": 1}, {})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        store.save({"bad": lambda: None}, {})
    assert store.versions() == ["v0001"] and store.current() == "v0001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_store_rejects_incomplete_or_corrupt_versions(tmp_path):
    store = ModelStore(tmp_path)
    store.save({"a": 1}, {})
    (tmp_path / "v0002").mkdir()
    (tmp_path / "CURRENT").write_text("v0002\n")
    with pytest.raises(ValueError, match=r"v0002: incomplete model version \(missing meta.json\)"):
        store.load_current()
    (tmp_path / "v0002" / "meta.json").write_text("{}")
    (tmp_path / "v0002" / "components.joblib").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"components.joblib: unreadable model components"):
        store.load_current()
    (tmp_path / "CURRENT").write_text("../../etc\n")
    with pytest.raises(ValueError, match="does not name a version"):
        store.load_current()
    (tmp_path / "CURRENT").unlink()  # no pointer: the newest version directory
    assert store.current() == "v0002"
