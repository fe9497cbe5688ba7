"""Tokenizers: the built-in one is lossless; a local Hugging Face tokenizer drives the engine."""

from __future__ import annotations

import json
import urllib.request

import pytest
import yaml

from pdgate.common.tokenizer import BuiltinTokenizer, HFTokenizer

SAMPLES = [
    "Hello, world! The quick brown fox jumps over 12 lazy dogs.",
    "Ünïcödé ✓ 漢字 and emoji 🚀\n\ttabs  and   SPACES",
    "",
    "x" * 1000,
]


def _builtin_ids_by_the_scheme(tok: BuiltinTokenizer, text: str) -> list[int]:
    """The built-in tokenizer's scheme written out plainly: a letter run (with its leading space)
    is cut into pieces of at most three letters, the space going with the first; a digit with or
    without a leading space is a piece; whatever is not a piece is byte tokens."""
    pieces, ids, i = [], [], 0
    while i < len(text):
        space = 1 if text[i] == " " and i + 1 < len(text) and text[i + 1].isascii() and text[i + 1].isalnum() else 0
        j = i + space
        if j < len(text) and text[j].isascii() and text[j].isalpha():
            end = j
            while end < len(text) and text[end].isascii() and text[end].isalpha():
                end += 1
            pieces.append(text[i : min(j + 3, end)])
            pieces += [text[k : min(k + 3, end)] for k in range(j + 3, end, 3)]
            i = end
        elif j < len(text) and text[j].isascii() and text[j].isdigit():
            pieces.append(text[i : j + 1])
            i = j + 1
        else:
            pieces.append(text[i])
            i += 1
    for piece in pieces:
        token = tok._piece_ids.get(piece)
        ids += [token] if token is not None else [tok._byte_base + b for b in piece.encode()]
    return ids


def test_builtin_encoding_follows_its_scheme():
    tok = BuiltinTokenizer()
    alphabet = "abcXYZ019 ,.\n\tüß漢🚀"
    texts = [*SAMPLES, "Hello, my name is", "HELLO Hello hELLO", " a  b   9 99 x1y2"]
    texts += ["".join(alphabet[(i * 7 + k * k) % len(alphabet)] for k in range(i % 23)) for i in range(300)]
    for text in texts:
        assert tok.encode(text) == _builtin_ids_by_the_scheme(tok, text), text


@pytest.mark.parametrize("text", SAMPLES)
def test_builtin_round_trip(text):
    tok = BuiltinTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_builtin_counts_are_word_like_and_generated_tokens_decode_alone():
    tok = BuiltinTokenizer()
    words = ["the", "history", "of", "the", "city", "begins", "in", "antiquity", "with", "small", "settlements"]
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
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
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
    req = urllib.request.Request(
        f"{engine.url}/tokenize",
        data=json.dumps({"prompt": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert json.load(urllib.request.urlopen(req))["tokens"] == local.encode(text)
    body = {"prompt": text, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(
        f"{engine.url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    out = json.load(urllib.request.urlopen(req))["choices"][0]
    assert len(out["token_ids"]) == 8 and out["text"] == local.decode(out["token_ids"])


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool messages') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def llama_like_dir(hf_tokenizer_dir, tmp_path_factory):
    """The same vocabulary with a BOS post-processor and a Jinja chat template, like a Llama tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from tokenizers import processors

    tok = tokenizers.Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    path = tmp_path_factory.mktemp("llama-like")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    return path


def test_hf_chat_template_is_rendered_like_transformers(llama_like_dir):
    tok = HFTokenizer(llama_like_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the city"}]
    assert tok.apply_chat_template(messages) == "<s>[system] Be brief.\n[user] the city\n[assistant]"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("[user] the city\n")
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, no second one
    with pytest.raises(ValueError, match="no tool messages"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    text = "the history of the city"
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_token_id, *tok.encode(text)]


def test_gateway_tokenizes_like_the_engine_with_special_tokens(llama_like_dir, sim_factory, tmp_path):
    """A text prompt gets BOS at the gateway exactly as the engine would add it itself, so the
    ids the gateway hashes and forwards give the same answer as the text sent directly."""
    openai = pytest.importorskip("openai")
    from support.fleet import MODEL, start_gateway, write_config

    engine = sim_factory("--tokenizer", str(llama_like_dir), "--served-model-name", MODEL)
    config = write_config(
        tmp_path / "gw.yaml", [{"id": "e0", "url": engine.url, "kind": "sim", "role": "both", "model": MODEL}]
    )
    raw = yaml.safe_load(config.read_text())
    raw["models"][0]["tokenizer"] = str(llama_like_dir)
    config.write_text(yaml.safe_dump(raw))
    gateway = start_gateway(config)
    try:
        args = {
            "model": MODEL,
            "prompt": "the history of the city",
            "max_tokens": 6,
            "temperature": 0,
            "extra_body": {"ignore_eos": True, "return_token_ids": True},
        }
        direct = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="x").completions.create(**args)
        via = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x").completions.create(**args)
        assert (
            via.usage.prompt_tokens
            == direct.usage.prompt_tokens
            == len(HFTokenizer(llama_like_dir).encode("the history of the city", add_special_tokens=True))
        )
        assert via.choices[0].text == direct.choices[0].text
        chat = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "the city"}], max_tokens=4
        )
        local = HFTokenizer(llama_like_dir)
        assert chat.usage.prompt_tokens == len(
            local.encode(local.apply_chat_template([{"role": "user", "content": "the city"}]))
        )
    finally:
        gateway.stop()
