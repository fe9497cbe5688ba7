"""Step-loop behaviour of the simulated engine, without HTTP (virtual time: we pass ``now``)."""

from __future__ import annotations

import pytest

from pdgate.common.block_hash import block_hashes, to_event_hash
from pdgate.common.kv_events import BlockRemoved, BlockStored
from pdgate.common.perf_model import load_profile
from pdgate.common.tokenizer import BuiltinTokenizer
from pdgate.engines.sim.core import CoreConfig, EngineCore
from pdgate.engines.sim.generation import ContextHash, LengthModel, TokenGenerator
from pdgate.engines.sim.kv_cache import KVCacheManager
from pdgate.engines.sim.request import RemotePrefill, SamplingParams, SimRequest

pytestmark = pytest.mark.unit

TOKENIZER = BuiltinTokenizer()
PROFILE = load_profile("h100-llama-3-8b")


def make_core(
    *,
    num_blocks: int = 1024,
    block_size: int = 4,
    budget: int = 64,
    max_seqs: int = 16,
    policy: str = "fcfs",
    events: list | None = None,
    median: float = 50.0,
) -> EngineCore:
    kv = KVCacheManager(num_blocks, block_size, event_sink=events.extend if events is not None else None)
    generator = TokenGenerator(TOKENIZER.generatable_ids(), TOKENIZER.eos_token_id, LengthModel(median=median))
    config = CoreConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=4096,
        scheduling_policy=policy,
        kv_hold_timeout=10.0,
    )  # type: ignore[arg-type]
    return EngineCore(config, kv, PROFILE, generator)


def request(
    rid: str,
    prompt: list[int],
    max_tokens: int = 8,
    *,
    t: float = 0.0,
    priority: int = 0,
    ignore_eos: bool = True,
    **kw,
) -> SimRequest:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=0.0)
    return SimRequest(rid, list(prompt), sampling, arrival_time=t, priority=priority, **kw)


def run_to_completion(
    core: EngineCore, now: float = 0.0, max_steps: int = 10_000
) -> tuple[dict[str, list[int]], float]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            return tokens, now
        step = core.schedule(now)
        assert not step.empty, "a step with unfinished requests scheduled nothing"
        now += core.step_time(step)
        for out in core.update(step, now):
            tokens.setdefault(out.request.request_id, []).extend(out.new_token_ids)
    raise AssertionError("did not finish")


def test_generation_is_a_function_of_the_context_so_continuations_match():
    prompt = TOKENIZER.encode("Tell me about the history of Rome in detail.")
    core = make_core()
    core.add_request(request("full", prompt, max_tokens=24))
    full, _ = run_to_completion(core)
    for k in (1, 7, 23):
        resumed = make_core()
        resumed.add_request(request("cont", prompt + full["full"][:k], max_tokens=24 - k))
        rest, _ = run_to_completion(resumed)
        assert full["full"][:k] + rest["cont"] == full["full"]


def test_rolling_context_hash_equals_hash_of_whole_sequence():
    seq = list(range(5, 300, 7))
    incremental = ContextHash.of(seq[:10])
    for t in seq[10:]:
        incremental.append(t)
    assert incremental.value == ContextHash.of(seq).value


def test_natural_eos_ends_requests_with_spread_lengths_unless_ignored():
    core = make_core(median=20.0)
    for i in range(40):
        prompt = TOKENIZER.encode(f"question number {i} about topic {i * 7}")
        core.add_request(request(f"r{i}", prompt, max_tokens=400, ignore_eos=False))
    tokens, _ = run_to_completion(core)
    lengths = sorted(len(v) for v in tokens.values())
    assert all(v[-1] == TOKENIZER.eos_token_id for v in tokens.values() if len(v) < 400)
    assert lengths[0] < 10 and lengths[-1] > 40, lengths  # a real distribution, not a constant
    core = make_core(median=2.0)
    core.add_request(request("long", TOKENIZER.encode("anything"), max_tokens=60, ignore_eos=True))
    tokens, _ = run_to_completion(core)
    assert len(tokens["long"]) == 60


def test_prefix_cache_hit_skips_computed_blocks_and_counts_tokens():
    core = make_core(block_size=4)
    prompt = list(range(100, 140))  # 40 tokens = 10 blocks
    core.add_request(request("a", prompt, max_tokens=2))
    run_to_completion(core)
    core.add_request(request("b", prompt + [7, 8, 9], max_tokens=2))
    step = core.schedule(1.0)
    ((req, num_new),) = step.entries
    assert req.num_cached_tokens == 40 and num_new == 3
    assert core.kv.stats.hits == 40
    # a full-prompt hit still recomputes the last token (vLLM caps hits at num_tokens - 1)
    core2 = make_core(block_size=4)
    core2.add_request(request("a", prompt, max_tokens=1))
    run_to_completion(core2)
    core2.add_request(request("c", prompt, max_tokens=1))
    ((req, num_new),) = core2.schedule(1.0).entries
    assert req.num_cached_tokens == 36 and num_new == 4


def test_chunked_prefill_respects_the_token_budget_and_decodes_share_the_step():
    core = make_core(budget=16)
    core.add_request(request("short", [1, 2, 3], max_tokens=50))
    run_steps = 0
    while not core.running or core.running[0].num_output_tokens == 0:
        step = core.schedule(0.0)
        core.update(step, 0.0)
        run_steps += 1
    core.add_request(request("long", list(range(10, 60)), max_tokens=2))  # 50 tokens: needs 4 chunks
    chunks = []
    for _ in range(4):
        step = core.schedule(0.0)
        sizes = {r.request_id: n for r, n in step.entries}
        assert sum(sizes.values()) <= 16
        assert sizes["short"] == 1  # the running decode is never starved by the prefill
        chunks.append(sizes.get("long", 0))
        assert step.batch.decode_seqs == 1 and step.batch.prefill_tokens == sizes.get("long", 0)
        core.update(step, 0.0)
    assert chunks == [15, 15, 15, 5]


def test_preemption_by_recompute_when_blocks_run_out_then_identical_output():
    prompt_a, prompt_b = list(range(200, 216)), list(range(300, 316))
    reference = make_core()
    reference.add_request(request("a", prompt_a, max_tokens=30))
    reference.add_request(request("b", prompt_b, max_tokens=30))
    expected, _ = run_to_completion(reference)

    core = make_core(num_blocks=14, block_size=4)  # 56 slots: both cannot reach 46 tokens
    core.add_request(request("a", prompt_a, max_tokens=30))
    core.add_request(request("b", prompt_b, max_tokens=30))
    got, _ = run_to_completion(core)
    assert core.num_preemptions >= 1
    assert got["a"] == expected["a"] and got["b"] == expected["b"]
    assert core.kv.num_free_blocks == core.kv.num_blocks  # every block returned


def test_priority_policy_admits_and_keeps_high_priority_first():
    core = make_core(policy="priority", max_seqs=1)
    core.add_request(request("low", [1, 2, 3], max_tokens=3, t=0.0, priority=5))
    core.add_request(request("high", [4, 5, 6], max_tokens=3, t=1.0, priority=-1))
    first = core.schedule(2.0)
    assert [r.request_id for r, _ in first.entries] == ["high"]
    # under memory pressure the lowest priority running request is the one preempted
    core = make_core(policy="priority", num_blocks=20, block_size=4)
    core.add_request(request("vip", list(range(10, 26)), max_tokens=40, priority=0, t=1.0))
    core.add_request(request("bulk", list(range(40, 56)), max_tokens=40, priority=9, t=0.0))
    run_to_completion(core)
    assert core.num_preemptions >= 1
    assert core.requests == {}


def test_abort_frees_blocks_and_emits_no_output():
    core = make_core()
    core.add_request(request("x", list(range(50)), max_tokens=100))
    core.update(core.schedule(0.0), 0.1)
    assert core.kv.num_free_blocks < core.kv.num_blocks
    core.abort("x", 0.2)
    assert core.kv.num_free_blocks == core.kv.num_blocks and not core.has_unfinished()


def test_prefill_leg_holds_kv_until_taken_or_expired():
    core = make_core(block_size=4)
    prompt = list(range(20))
    core.add_request(request("p", prompt, max_tokens=1, kv_hold_key="p"))
    run_to_completion(core)
    assert "p" in core.held and core.kv.num_free_blocks < core.kv.num_blocks
    taken = core.take_held("p")
    assert taken is not None and taken.prompt_token_ids == prompt
    assert core.kv.num_free_blocks == core.kv.num_blocks
    core.add_request(request("q", prompt + [1], max_tokens=1, kv_hold_key="q"))
    _, now = run_to_completion(core)
    core.expire_held(now + 11.0)
    assert core.held == {} and core.kv.num_free_blocks == core.kv.num_blocks


def test_decode_leg_waits_for_remote_kv_and_recomputes_only_the_last_token():
    core = make_core(block_size=4)
    prompt = list(range(30, 70))
    remote = RemotePrefill("nixl", {})
    core.add_request(request("d", prompt, max_tokens=4, remote_prefill=remote))
    step = core.schedule(0.0)
    assert step.empty and [r.request_id for r in step.kv_pulls] == ["d"]
    assert core.schedule(0.0).empty  # still waiting for its KV: nothing to run
    core.finish_remote_kv("d", True, 0.5)
    ((req, num_new),) = core.schedule(0.5).entries
    assert num_new == 1 and req.num_external_tokens == 39 and req.num_cached_tokens == 39
    tokens, _ = run_to_completion(core, 0.5)
    plain = make_core(block_size=4)
    plain.add_request(request("d", prompt, max_tokens=4))
    expected, _ = run_to_completion(plain)
    assert req.output_token_ids == expected["d"] == tokens["d"]


def test_failed_pull_with_recompute_policy_prefills_locally():
    core = make_core(block_size=4)
    core.add_request(request("d", list(range(30, 70)), max_tokens=2, remote_prefill=RemotePrefill("nixl", {})))
    core.schedule(0.0)
    core.finish_remote_kv("d", False, 0.1)
    step = core.schedule(0.1)
    ((req, num_new),) = step.entries
    assert num_new == 40 and req.num_external_tokens == 0
    run_to_completion(core, 0.1)


def test_kv_events_announce_stored_and_evicted_blocks_with_vllm_hashes():
    events: list = []
    core = make_core(num_blocks=8, block_size=4, events=events)
    prompt = list(range(1000, 1012))  # 3 full blocks
    core.add_request(request("a", prompt, max_tokens=1))
    run_to_completion(core)
    stored = [e for e in events if isinstance(e, BlockStored)]
    expected = [to_event_hash(h) for h in block_hashes(prompt, 4)]
    assert [h for e in stored for h in e.block_hashes] == expected
    assert stored[0].parent_block_hash is None and stored[0].token_ids == prompt
    events.clear()
    core.add_request(request("b", list(range(2000, 2032)), max_tokens=1))  # needs all 8 blocks
    run_to_completion(core)
    removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert set(expected) <= removed


@pytest.mark.parametrize("batch_tokens", [1, 64, 512, 2048])
def test_step_time_grows_with_work(batch_tokens):
    core = make_core(budget=4096)
    core.add_request(request("a", list(range(batch_tokens)) or [1], max_tokens=1))
    step = core.schedule(0.0)
    small = make_core(budget=4096)
    small.add_request(request("a", [1], max_tokens=1))
    assert core.step_time(step) >= small.step_time(small.schedule(0.0)) > 0
