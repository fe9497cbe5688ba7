"""Behaviour of the simulated engine's performance model (pdgate/common/perf_model.py)."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest

from pdgate.common.perf_model import (
    GPUS,
    MODELS,
    PROFILE_DIR,
    ModelSpec,
    StepBatch,
    available_profiles,
    load_profile,
    resolve_profile,
    roofline_profile,
)

pytestmark = pytest.mark.unit

REQUIRED = (
    "h100-llama-3-8b",
    "h100-llama-2-7b",
    "a100-llama-3-8b",
    "a100-llama-2-7b",
    "h100-llama-2-70b-tp4",
    "a100-llama-3-70b-tp4",
)
MS = 1e-3


def prefill(tokens: int, prior: int = 0) -> StepBatch:
    return StepBatch(prefill_tokens=tokens, prefill_attn_pairs=tokens * (prior + tokens))


def decode(seqs: int, context: int) -> StepBatch:
    return StepBatch(decode_seqs=seqs, decode_kv_tokens=seqs * context)


@pytest.fixture(scope="module")
def h100_8b():
    return load_profile("h100-llama-3-8b")


def test_required_profiles_are_shipped_small_and_calibrated():
    names = available_profiles()
    for name in REQUIRED:
        assert name in names
        profile = load_profile(name)
        assert profile.source.startswith("vidur:")
        assert (PROFILE_DIR / f"{name}.json").stat().st_size < 32_000
    assert load_profile("a100-llama-3-70b-tp4").tp == 4


@pytest.mark.parametrize("name", REQUIRED)
def test_step_time_is_monotonic_in_tokens(name):
    profile = load_profile(name)
    sizes = [1, 2, 3, 7, 16, 50, 128, 300, 1000, 2048, 4096, 5000, 16384, 40000]
    prefills = [profile.step_time(prefill(n)) for n in sizes]
    decodes = [profile.step_time(decode(n, 512)) for n in sizes]
    assert prefills == sorted(prefills) and prefills[0] > 0
    assert decodes == sorted(decodes) and decodes[0] > 0
    # adding decodes to a prefill step never makes it cheaper
    assert profile.step_time(StepBatch(256, 256 * 256, 8, 8 * 900)) >= profile.step_time(prefill(256))


def test_decode_time_grows_with_kv_tokens_attended(h100_8b):
    times = [h100_8b.step_time(decode(32, context)) for context in (16, 256, 1024, 4096, 8192)]
    assert all(a < b for a, b in itertools.pairwise(times))
    assert times[-1] - times[0] > 1 * MS  # 32 x 8k tokens of KV cache is a visible cost


def test_prefill_attention_grows_with_prior_context(h100_8b):
    assert h100_8b.step_time(prefill(1024, prior=4096)) > h100_8b.step_time(prefill(1024, prior=0))


def test_plausible_h100_llama3_8b_times(h100_8b):
    assert 20 * MS <= h100_8b.step_time(prefill(2048)) <= 200 * MS
    assert 6 * MS <= h100_8b.step_time(decode(1, 1024)) <= 15 * MS
    # the A100 is slower on the same work
    a100 = load_profile("a100-llama-3-8b")
    assert a100.step_time(prefill(2048)) > 2 * h100_8b.step_time(prefill(2048))


def test_empty_batch_takes_no_time(h100_8b):
    assert h100_8b.step_time(StepBatch()) == 0.0
    assert sum(h100_8b.breakdown(StepBatch()).values()) == 0.0


def test_breakdown_adds_up_to_step_time(h100_8b):
    batch = StepBatch(prefill_tokens=700, prefill_attn_pairs=700 * 1900, decode_seqs=40, decode_kv_tokens=40 * 3000)
    parts = h100_8b.breakdown(batch)
    assert sum(parts.values()) == pytest.approx(h100_8b.step_time(batch), rel=1e-12)
    assert parts["overhead"] > 0 and parts["prefill_attention"] > 0 and parts["decode_attention"] > 0


def test_kv_bytes_per_token():
    assert MODELS["llama-3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert load_profile("h100-llama-3-8b").kv_bytes_per_token == 131072
    assert MODELS["llama-2-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_kv_cache_capacity(h100_8b):
    tokens = h100_8b.kv_cache_tokens(0.9)
    # 0.9 * 80 GB - 16 GB of weights - activations, at 128 KiB per token: ~450k tokens
    assert 350_000 < tokens < 520_000
    assert h100_8b.kv_cache_tokens(0.5) < tokens
    assert 7.5e9 < MODELS["llama-3-8b"].num_params < 8.5e9
    assert 65e9 < MODELS["llama-2-70b"].num_params < 72e9
    with pytest.raises(ValueError):
        h100_8b.kv_cache_tokens(1.5)


def test_unknown_profile_name_lists_available_ones():
    with pytest.raises(ValueError) as err:
        load_profile("h100-gpt-17")
    assert "h100-gpt-17" in str(err.value) and "h100-llama-3-8b" in str(err.value)


def test_resolve_prefers_calibrated_then_roofline():
    assert resolve_profile("h100-llama-3-8b") is load_profile("h100-llama-3-8b")
    assert resolve_profile(model="llama-3-70b", gpu="a100", tp=4) is load_profile("a100-llama-3-70b-tp4")
    fallback = resolve_profile(model="llama-2-7b", gpu="a40", tp=2)  # not in the data
    assert fallback.source == "roofline" and fallback.tp == 2
    with pytest.raises(ValueError, match="known"):
        resolve_profile(model="no-such-model", gpu="h100")
    with pytest.raises(ValueError):
        resolve_profile()


def test_roofline_fallback_for_an_unknown_shape():
    shape = ModelSpec(
        "toy-13b",
        num_layers=40,
        hidden_size=5120,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=13824,
        vocab_size=32000,
        max_model_len=4096,
    )
    profile = roofline_profile(shape, "h100")
    assert profile.source == "roofline"
    small, big = profile.step_time(prefill(128)), profile.step_time(prefill(4096))
    assert 0 < small < big
    assert profile.step_time(decode(8, 100)) < profile.step_time(decode(8, 4000))
    # bigger model -> slower; more GPUs -> faster per step
    assert roofline_profile("llama-2-70b", "h100", 8).step_time(prefill(2048)) < roofline_profile(
        "llama-2-70b", "h100", 4
    ).step_time(prefill(2048))
    assert profile.step_time(prefill(2048)) > roofline_profile("llama-2-7b", "h100").step_time(prefill(2048))


def test_roofline_agrees_roughly_with_calibration():
    for name in REQUIRED:
        calibrated = load_profile(name)
        roofline = roofline_profile(calibrated.model, calibrated.gpu, calibrated.tp)
        for batch in (prefill(2048), decode(1, 1024), decode(64, 2048)):
            assert 0.7 < roofline.step_time(batch) / calibrated.step_time(batch) < 1.4, (name, batch)


def test_specs_are_immutable_and_gpus_known():
    assert set(GPUS) >= {"h100", "a100", "a40"}
    assert set(MODELS) >= {
        "llama-2-7b",
        "llama-3-8b",
        "llama-2-70b",
        "llama-3-70b",
        "codellama-34b",
        "qwen-72b",
        "internlm-20b",
        "phi-2",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["llama-3-8b"].num_layers = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        MODELS["new"] = MODELS["llama-3-8b"]  # type: ignore[index]


def test_step_time_is_cheap(h100_8b):
    batch = StepBatch(prefill_tokens=512, prefill_attn_pairs=512 * 1024, decode_seqs=37, decode_kv_tokens=37 * 900)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        h100_8b.step_time(batch)
    assert (time.perf_counter() - start) / n < 25e-6  # ~1 us on a laptop; generous for loaded CI machines
