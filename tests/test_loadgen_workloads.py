"""Workloads for the load generator: exact prompt lengths, seeded reproducibility, trace replay
(Mooncake block sharing, Azure, prompt datasets) and readable errors for malformed files."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from pdgate.common.tokenizer import BuiltinTokenizer, HFTokenizer, Tokenizer
from pdgate.loadgen import traces
from pdgate.loadgen.lengths import LengthDist
from pdgate.loadgen.prompts import PromptBuilder, _raw_pieces
from pdgate.loadgen.traces import MooncakeRecord
from pdgate.loadgen.workloads import multi_turn, shared_prefix, synthetic

pytestmark = pytest.mark.unit

CORPUS = (
    "the history of the city begins in antiquity with small settlements along the river where "
    "farmers traded grain and fish while merchants built roads bridges markets temples and walls "
    "around a harbour that grew into a port for ships from distant islands carrying wine oil silver "
    "copper wool timber spices and stories about kings queens soldiers poets"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> HFTokenizer:
    """A small byte-level BPE (like GPT-2/Llama 3) with a BOS post-processor and a chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(CORPUS.split(), k=60)) for _ in range(300)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path = tmp_path_factory.mktemp("hf-tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    return HFTokenizer(path)


@pytest.fixture(params=["builtin", "hf"])
def tok(request, hf_tok) -> Tokenizer:
    return BuiltinTokenizer() if request.param == "builtin" else hf_tok


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- prompts ----------------------------------------------------------------------------------


def test_prompt_builder_texts_have_exact_token_counts(tok):
    builder = PromptBuilder(tok, seed=3)
    assert builder.clean and builder.pool_size >= 8
    for n in (0, 1, 2, 3, 7, 64, 513, 2000):
        assert len(ids(tok, builder.text(n))) == n
    assert builder.text(50, random.Random(1)) == builder.text(50, random.Random(1))
    assert builder.text(50, random.Random(1)) != builder.text(50, random.Random(2))


def test_prompt_builder_fixes_up_texts_that_do_not_round_trip(hf_tok):
    """Raw token texts (no clean words) merge and split when re-encoded: the fix-up loop still
    lands on the exact count."""
    builder = PromptBuilder(hf_tok, seed=0)
    builder._words, builder.clean, builder._trusted = _raw_pieces(hf_tok), False, False
    rng = random.Random(5)
    for n in (1, 2, 5, 31, 300):
        for _ in range(3):
            assert len(ids(hf_tok, builder.text(n, rng))) == n
            assert len(ids(hf_tok, builder.block_text(rng.randrange(10**6), n))) == n


def test_block_texts_are_deterministic_distinct_and_concatenate_exactly(tok):
    builder, again, other_seed = PromptBuilder(tok, 1), PromptBuilder(tok, 1), PromptBuilder(tok, 2)
    block = 16
    texts = [builder.block_text(i, block) for i in range(40)]
    assert texts == [again.block_text(i, block) for i in range(40)]
    assert len(set(texts)) == 40 and texts[0] != other_seed.block_text(0, block)
    assert builder.block_text("tenant-a", block) != builder.block_text("tenant-b", block)
    block_ids = [ids(tok, t) for t in texts]
    assert all(len(b) == block for b in block_ids)
    assert len({b[0] for b in block_ids}) == 40  # consecutive ids differ from their first token on
    order = random.Random(0).choices(range(40), k=30)
    assert ids(tok, "".join(texts[i] for i in order)) == [t for i in order for t in block_ids[i]]
    for take in (1, 5, 15):
        part = builder.block_text(7, block, take=take)
        assert ids(tok, part) == block_ids[7][:take]
        assert ids(tok, texts[3] + part) == block_ids[3] + block_ids[7][:take]


# --- length distributions ---------------------------------------------------------------------


def test_length_distributions_parse_and_sample_with_the_right_statistics(tmp_path):
    rng = random.Random(0)
    assert (
        LengthDist.parse("fixed:128").sample(rng)
        == 128
        == LengthDist.parse("128").sample(rng)
        == LengthDist.parse(128).sample(rng)
    )
    uniform = [LengthDist.parse("uniform:64:512").sample(rng) for _ in range(20000)]
    assert min(uniform) == 64 and max(uniform) == 512 and abs(statistics.mean(uniform) - 288) < 5
    lognormal = [LengthDist.parse("lognormal:1024:0.5").sample(rng) for _ in range(40000)]
    assert abs(statistics.mean(lognormal) / 1024 - 1) < 0.03 and min(lognormal) >= 1
    assert 0.4 < statistics.stdev([math.log(x) for x in lognormal]) < 0.6
    assert max(LengthDist.parse("lognormal:1024:1:2000").sample(rng) for _ in range(2000)) == 2000
    (tmp_path / "one.txt").write_text("# lengths\n10\n\n20\n30.0\n")
    (tmp_path / "lens.csv").write_text("id,input,output\na,100,7\nb,200,9\n")
    assert set(LengthDist.parse(f"file:{tmp_path / 'one.txt'}").values) == {10, 20, 30}
    assert LengthDist.parse(f"file:{tmp_path / 'lens.csv'}:output").values == (7, 9)
    assert LengthDist.parse(f"file:{tmp_path / 'lens.csv'}:1").values == (100, 200)
    for bad in ("uniform:9:3", "lognormal:10", "normal:5", "fixed:0", "fixed:2.5"):
        with pytest.raises(ValueError, match="bad length distribution"):
            LengthDist.parse(bad)
    with pytest.raises(ValueError, match="3 columns"):
        LengthDist.parse(f"file:{tmp_path / 'lens.csv'}")
    (tmp_path / "bad.txt").write_text("10\n20\nmany\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: not a number"):
        LengthDist.parse(f"file:{tmp_path / 'bad.txt'}")


# --- workloads --------------------------------------------------------------------------------


def test_synthetic_workloads_are_seeded_and_exact(tok):
    builder = PromptBuilder(tok, 0)
    first = synthetic(30, "uniform:1:300", "lognormal:50:0.3", builder, seed=7)
    assert first == synthetic(30, "uniform:1:300", "lognormal:50:0.3", PromptBuilder(tok, 0), seed=7)
    assert first != synthetic(30, "uniform:1:300", "lognormal:50:0.3", builder, seed=8)
    assert [r.index for r in first] == list(range(30))
    for r in first:
        assert r.api == "completions" and len(ids(tok, r.prompt)) == r.prompt_tokens >= 1
        assert r.max_tokens >= 1 and r.extra == {"ignore_eos": True} and r.arrival_s is None
    assert len({r.prompt_tokens for r in first}) > 10
    chat = synthetic(5, 40, 8, builder, seed=1, api="chat", ignore_eos=False)
    for r in chat:
        assert r.prompt is None and r.messages[0]["role"] == "user" and r.extra == {} and r.max_tokens == 8
        assert len(ids(tok, r.messages[0]["content"])) == 40
        assert r.prompt_tokens == len(ids(tok, tok.apply_chat_template(list(r.messages)))) > 40
        assert r.body("m")["messages"] == list(r.messages)


def test_shared_prefix_tenants_share_exactly_their_system_prompt(tok):
    builder = PromptBuilder(tok, 0)
    reqs = shared_prefix(4, 64, 5, 12, 20, builder, seed=3)
    assert reqs == shared_prefix(4, 64, 5, 12, 20, PromptBuilder(tok, 0), seed=3)
    assert len(reqs) == 20 and all(r.max_tokens == 20 and r.prompt_tokens == 76 for r in reqs)
    token_ids = [ids(tok, r.prompt) for r in reqs]
    assert all(len(t) == 76 for t in token_ids)
    tenants = [tuple(t[:64]) for t in token_ids]
    assert sorted(tenants.count(t) for t in set(tenants)) == [5, 5, 5, 5]
    assert tenants != sorted(tenants, key=tenants.index)  # interleaved, not grouped
    for a in range(len(reqs)):
        for b in range(a):
            shared = common_prefix(token_ids[a], token_ids[b])
            assert shared >= 64 if tenants[a] == tenants[b] else shared < 64
    chat = shared_prefix(3, 32, 2, 8, 4, builder, seed=3, api="chat")
    systems = [r.messages[0]["content"] for r in chat]
    assert [r.messages[0]["role"] for r in chat] == ["system"] * 6 and len(set(systems)) == 3
    assert all(len(ids(tok, s)) == 32 for s in systems)
    assert all(r.prompt_tokens == len(ids(tok, tok.apply_chat_template(list(r.messages)))) for r in chat)


def test_multi_turn_histories_grow_turn_by_turn(tok):
    builder = PromptBuilder(tok, 0)
    reqs = multi_turn(3, 4, 10, 15, builder, seed=2)
    assert reqs == multi_turn(3, 4, 10, 15, PromptBuilder(tok, 0), seed=2)
    assert [(r.session, r.turn) for r in reqs[:4]] == [("conv-0", 0), ("conv-1", 0), ("conv-2", 0), ("conv-0", 1)]
    assert [r.index for r in reqs] == list(range(12))
    by_conv: dict[str, list] = {}
    for r in reqs:
        by_conv.setdefault(r.session, []).append(r)
        assert r.api == "chat" and r.max_tokens == 15 and r.extra == {"ignore_eos": True}
        assert r.prompt_tokens == len(ids(tok, tok.apply_chat_template(list(r.messages))))
    for turns in by_conv.values():
        for k, r in enumerate(turns):
            assert r.turn == k and len(r.messages) == 2 * k + 1
            assert [m["role"] for m in r.messages] == ["user", "assistant"] * k + ["user"]
            assert all(len(ids(tok, m["content"])) == (10 if m["role"] == "user" else 15) for m in r.messages)
            if k:
                assert r.messages[: 2 * k - 1] == turns[k - 1].messages
                assert r.prompt_tokens > turns[k - 1].prompt_tokens + 25
    assert len({r.messages[0]["content"] for r in reqs}) == 3


# --- Mooncake ---------------------------------------------------------------------------------

B = 16
MOONCAKE = [  # timestamp ms, input, output, hash ids (blocks of 16; last may be partial)
    (1000, 2 * B + 5, 7, [1, 2, 3]),
    (1500, 4 * B, 3, [1, 2, 4, 5]),
    (1500, B + 10, 9, [1, 6]),
    (4000, 2 * B, 1, [7, 8]),
    (9000, 2 * B + 5, 2, [1, 2, 3]),
    (9500, 3 * B, 4, [1, 2, 4]),
]


def write_mooncake(path, rows=MOONCAKE):
    path.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_length": n, "output_length": o, "hash_ids": h}) + "\n"
            for t, n, o, h in rows
        )
    )
    return path


def shared_blocks(a: list[int], b: list[int]) -> int:
    return common_prefix(a, b)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_mooncake_replay_reproduces_the_block_sharing_exactly(tok, tmp_path, scale):
    path = write_mooncake(tmp_path / "trace.jsonl")
    reqs = traces.read_mooncake(path, PromptBuilder(tok, 0), block_tokens=B, scale=scale)
    block = round(B * scale)
    assert [r.max_tokens for r in reqs] == [o for _, _, o, _ in MOONCAKE]
    token_ids = [ids(tok, r.prompt) for r in reqs]
    for r, t, (_, n, _, hashes) in zip(reqs, token_ids, MOONCAKE, strict=True):
        expected = n if scale == 1 else block * (len(hashes) - 1) + (block if n % B == 0 else round((n % B) * scale))
        assert r.prompt_tokens == len(t) == expected
    assert token_ids[0] == token_ids[4]
    for a in range(len(reqs)):
        for b in range(a):
            ha, hb = MOONCAKE[a][3], MOONCAKE[b][3]
            if ha == hb:
                continue
            k = shared_blocks(ha, hb)
            shared = common_prefix(token_ids[a], token_ids[b])
            if k < min(len(ha), len(hb)):  # they diverge at block k: exactly k blocks of tokens in common
                assert shared == k * block, (a, b)
            else:  # one is the other's prefix of blocks (same ids, maybe a partial last block)
                assert shared == min(len(token_ids[a]), len(token_ids[b]))
    records = traces.parse_mooncake(path)
    assert traces.block_sharing(reqs, tok, block) == traces.trace_sharing(records, B)
    stats = traces.trace_sharing(records, B)
    assert (stats.blocks, stats.hit_blocks) == (2 + 4 + 1 + 2 + 2 + 3, 2 + 1 + 2 + 3)


def test_mooncake_timestamps_speedup_offset_limit_and_filters(tmp_path):
    path = write_mooncake(tmp_path / "trace.jsonl")
    builder = PromptBuilder(BuiltinTokenizer(), 0)
    reqs = traces.read_mooncake(path, builder, block_tokens=B)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 0.5, 3.0, 8.0, 8.5]
    assert [r.extra for r in reqs] == [{"ignore_eos": True}] * 6
    assert [r.arrival_s for r in traces.read_mooncake(path, builder, block_tokens=B, speedup=2)] == [
        0,
        0.25,
        0.25,
        1.5,
        4,
        4.25,
    ]
    window = traces.read_mooncake(path, builder, block_tokens=B, offset=1, limit=2)
    assert [(r.index, r.arrival_s, r.max_tokens) for r in window] == [(0, 0.0, 3), (1, 0.0, 9)]
    short = traces.read_mooncake(path, builder, block_tokens=B, max_input_tokens=2 * B, min_output_tokens=2)
    assert [r.prompt_tokens for r in short] == [B + 10]
    cut = traces.read_mooncake(path, builder, block_tokens=B, truncate_input_tokens=B + 4)
    assert [r.prompt_tokens for r in cut] == [B + 4] * 6
    full = traces.read_mooncake(path, builder, block_tokens=B)
    assert cut[1].prompt == full[1].prompt[: len(cut[1].prompt)] and cut[0].prompt == cut[1].prompt
    chat = traces.read_mooncake(path, builder, block_tokens=B, api="chat")
    assert chat[0].messages[0]["content"] == full[0].prompt and chat[0].prompt_tokens > full[0].prompt_tokens
    assert traces.read_trace(path, builder, block_tokens=B) == full


def test_mooncake_records_that_do_not_fit_their_blocks_are_rejected(tmp_path):
    path = write_mooncake(tmp_path / "trace.jsonl", [(0, 10, 1, [1]), (5, 40, 1, [1, 2])])
    with pytest.raises(ValueError, match="line 2: input_length 40 does not fit 2 blocks of 16"):
        traces.read_mooncake(path, PromptBuilder(BuiltinTokenizer()), block_tokens=B)
    assert traces.trace_sharing([MooncakeRecord(1, 0, 512 * 3, 1, (1, 2, 3))]).blocks == 3


# --- Azure ------------------------------------------------------------------------------------

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:50.9951690,12,1
2023-11-16 18:16:46.0000001,1200,7
"""


def test_azure_trace_timestamps_lengths_and_seeds(tok, tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text(AZURE)
    builder = PromptBuilder(tok, 0)
    reqs = traces.read_azure(path, builder, seed=1)
    assert [round(r.arrival_s, 7) for r in reqs] == [0.0, 4.314579, 4.314579, 59.3194101]
    assert [(r.prompt_tokens, r.max_tokens) for r in reqs] == [(374, 44), (396, 109), (12, 1), (1200, 7)]
    assert all(len(ids(tok, r.prompt)) == r.prompt_tokens for r in reqs)
    assert reqs == traces.read_azure(path, PromptBuilder(tok, 0), seed=1)
    assert reqs[0].prompt != traces.read_azure(path, builder, seed=2)[0].prompt
    assert traces.detect_format(path) == "azure" and traces.read_trace(path, builder, seed=1) == reqs
    picked = traces.read_azure(path, builder, offset=1, max_input_tokens=400, speedup=10, truncate_input_tokens=1000)
    assert [(r.prompt_tokens, r.arrival_s) for r in picked] == [(396, 0.0), (12, 0.0)]
    assert [r.prompt_tokens for r in traces.read_azure(path, builder, truncate_input_tokens=300)] == [300, 300, 12, 300]


def test_timestamps_parse_robustly():
    base = traces.parse_timestamp("2023-11-16 18:15:46")
    assert traces.parse_timestamp("2023-11-16 18:15:46.6805900") - base == pytest.approx(
        0.68059, abs=1e-6
    )  # float seconds since 1970: ~0.2 us steps
    assert traces.parse_timestamp("2023-11-16T18:15:46.5Z") - base == pytest.approx(0.5)
    assert traces.parse_timestamp("2023-11-16 19:15:46+01:00") == base
    assert traces.parse_timestamp("12.25") == 12.25
    with pytest.raises(ValueError, match="not a timestamp"):
        traces.parse_timestamp("yesterday")


# --- datasets ---------------------------------------------------------------------------------


def test_prompt_datasets_are_detected_and_read(tok, tmp_path):
    builder = PromptBuilder(tok, 0)
    alpaca = tmp_path / "model_outputs.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Name the river.", "output": "The river is old and wide.", "generator": "x"},
                {"instruction": "Translate", "input": "the city", "output": "la ville"},
            ],
            indent=2,
        )
    )
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(
        json.dumps(
            [
                {
                    "id": "a",
                    "conversations": [
                        {"from": "system", "value": "be nice"},
                        {"from": "human", "value": "hello there"},
                        {"from": "gpt", "value": "hi, how can I help with the harbour"},
                        {"from": "human", "value": "later"},
                    ],
                },
                {"id": "b", "conversations": [{"from": "human", "value": "no answer"}]},
                {"id": "c", "conversations": [{"from": "human", "value": "ships?"}, {"from": "gpt", "value": "many"}]},
            ]
        )
    )
    generic = tmp_path / "prompts.jsonl"
    generic.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "the walls of the port", "output_tokens": 33},
                {
                    "messages": [
                        {"role": "system", "content": "short"},
                        {"role": "user", "content": "kings and queens"},
                    ],
                    "output": "wine oil silver",
                },
            ]
        )
        + "\n\n"
    )
    assert [traces.detect_format(p) for p in (alpaca, sharegpt, generic)] == ["alpaca", "sharegpt", "jsonl"]

    reqs = traces.read_trace(alpaca, builder)
    assert [r.prompt for r in reqs] == ["Name the river.", "Translate\n\nthe city"]
    assert [r.max_tokens for r in reqs] == [len(ids(tok, "The river is old and wide.")), len(ids(tok, "la ville"))]
    assert [r.prompt_tokens for r in reqs] == [len(ids(tok, r.prompt)) for r in reqs]
    assert all(r.arrival_s is None and r.extra == {"ignore_eos": True} for r in reqs)

    reqs = traces.read_trace(sharegpt, builder, api="chat")
    assert [r.messages[0]["content"] for r in reqs] == ["hello there", "ships?"]
    assert reqs[0].max_tokens == len(ids(tok, "hi, how can I help with the harbour"))
    assert reqs[0].prompt_tokens == len(ids(tok, tok.apply_chat_template([{"role": "user", "content": "hello there"}])))

    reqs = traces.read_trace(generic, builder, api="chat")
    assert reqs[0].max_tokens == 33 and reqs[1].max_tokens == len(ids(tok, "wine oil silver"))
    assert reqs[1].messages[0] == {"role": "system", "content": "short"}
    as_text = traces.read_dataset(generic, builder)
    assert (
        as_text[1].prompt == tok.apply_chat_template(list(reqs[1].messages))
        and as_text[1].prompt_tokens == reqs[1].prompt_tokens
    )

    assert [r.prompt for r in traces.read_dataset(alpaca, builder, offset=1, limit=5)] == ["Translate\n\nthe city"]
    assert len(traces.read_dataset(alpaca, builder, limit=1)) == 1
    assert [
        r.prompt for r in traces.read_dataset(alpaca, builder, min_input_tokens=len(ids(tok, "Name the river.")) + 1)
    ] == ["Translate\n\nthe city"]
    shuffled = {r.prompt for r in traces.read_dataset(alpaca, builder, shuffle_seed=4)}
    assert shuffled == {"Name the river.", "Translate\n\nthe city"}


def test_malformed_files_name_the_line(tmp_path):
    builder = PromptBuilder(BuiltinTokenizer())
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "output_tokens": 3}\n\n{"prompt": "b", "output_tokens": 3\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        traces.read_trace(bad_json, builder)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "output_tokens": 3}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"missing.jsonl:2: bad jsonl record: no output"):
        traces.read_dataset(missing, builder)
    assert traces.read_dataset(missing, builder, default_output_tokens=9)[1].max_tokens == 9
    mooncake = tmp_path / "mc.jsonl"
    mooncake.write_text(
        '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n'
        '{"timestamp": 1, "input_length": 5, "hash_ids": [2]}\n'
    )
    with pytest.raises(ValueError, match=r"mc.jsonl:2: missing field 'output_length'"):
        traces.read_trace(mooncake, builder)
    azure = tmp_path / "az.csv"
    azure.write_text(AZURE + "2023-11-16 18:17:00.1,many,3\n")
    with pytest.raises(ValueError, match=r"az.csv:6: bad Azure row"):
        traces.read_azure(azure, builder)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]))
    with pytest.raises(ValueError, match=r"alpaca.json record 1: bad alpaca record: the prompt must be a string"):
        traces.read_dataset(alpaca, builder)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match=r"unknown.jsonl:1: unknown record format"):
        traces.read_trace(unknown, builder)
    with pytest.raises(ValueError, match="not a prompt dataset"):
        traces.read_dataset(mooncake, builder)
