"""Tokenizers: the built-in one is lossless; a local Hugging Face tokenizer drives the engine."""

from __future__ import annotations

import json
import urllib.request

import pytest

from engines.sim.tokenizer import BuiltinTokenizer, HFTokenizer

SAMPLES = [
    "Hello, world! The quick brown fox jumps over 12 lazy dogs.",
    "Ünïcödé ✓ 漢字 and emoji 🚀\n\ttabs  and   SPACES",
    "",
    "x" * 1000,
]


@pytest.mark.parametrize("text", SAMPLES)
def test_builtin_round_trip(text):
    tok = BuiltinTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_builtin_counts_are_word_like_and_generated_tokens_decode_alone():
    tok = BuiltinTokenizer()
    words = "the history of the city begins in antiquity with small settlements".split()
    n = len(tok.encode(" ".join(words)))
    assert len(words) <= n <= 3 * len(words)
    ids = tok.generatable_ids()
    assert tok.eos_token_id not in ids
    sample = ids[:: len(ids) // 50]
    assert "".join(tok.token_text(i) for i in sample) == tok.decode(sample)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [s * 20 for s in SAMPLES[:2]] + ["the history of the city begins in antiquity"] * 50
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("hf-tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def test_hf_tokenizer_directory_is_used_by_the_engine(hf_tokenizer_dir, sim_factory):
    local = HFTokenizer(hf_tokenizer_dir)
    text = "the history of the city"
    assert local.decode(local.encode(text)) == text and local.eos_token_id == 1
    engine = sim_factory("--tokenizer", str(hf_tokenizer_dir))
    req = urllib.request.Request(f"{engine.url}/tokenize", data=json.dumps({"prompt": text}).encode(),
                                 headers={"Content-Type": "application/json"})
    assert json.load(urllib.request.urlopen(req))["tokens"] == local.encode(text)
    body = {"prompt": text, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(f"{engine.url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    out = json.load(urllib.request.urlopen(req))["choices"][0]
    assert len(out["token_ids"]) == 8 and out["text"] == local.decode(out["token_ids"])
