"""Latency models: the physical prior, and refits from the gateway's request records."""

from __future__ import annotations

import random

import pytest

from pdgate.common.perf_model import StepBatch, load_profile
from pdgate.scheduler.costmodel.latency import (
    GroupCosts,
    LatencyModel,
    LinearCost,
    PriorSpec,
    decode_features,
    handoff_features,
    handoff_steps,
    prefill_features,
    prior_costs,
)

pytestmark = pytest.mark.unit

GROUP = "vllm/m/prefill/default"


@pytest.fixture(scope="module")
def prior() -> LatencyModel:
    return LatencyModel.from_priors({GROUP: PriorSpec(), "scaled": PriorSpec(time_scale=10.0)})


def test_prior_follows_the_engine_profile_and_its_time_scale(prior):
    profile = load_profile("h100-llama-3-8b")
    costs = prior.costs(GROUP)
    for tokens in (512, 2048, 6000):
        truth = profile.step_time(StepBatch(prefill_tokens=tokens, prefill_attn_pairs=tokens * tokens))
        assert costs.prefill_s(tokens) == pytest.approx(truth, rel=0.2)
    for batch in (1, 32, 128):
        truth = profile.step_time(StepBatch(decode_seqs=batch, decode_kv_tokens=batch * 1024))
        assert costs.decode_step_s(batch, batch * 1024) == pytest.approx(truth, rel=0.1)
    assert prior.costs("scaled").prefill_s(2048) == pytest.approx(costs.prefill_s(2048) / 10, rel=1e-6)


def _records(n: int, slow: float, seed: int = 0, handoff_steps_weight: float = 1.0, idle: bool = False) -> list[dict]:
    """Requests as the gateway logs them, on hardware ``slow`` times slower than the prior's,
    whose hand-offs take ``handoff_steps_weight`` times the structural decode steps."""
    rng = random.Random(seed)
    truth = prior_costs(PriorSpec())
    rows = []
    for _ in range(n):
        prompt = rng.randint(100, 6000)
        cached = rng.choice([0, 0, prompt // 2])
        batch, context = rng.randint(1, 64), rng.randint(1, 64) * rng.randint(200, 3000)
        if idle:  # alone in its decode batch: the context is its own prompt
            batch, context = 1, prompt
        noise = lambda: rng.uniform(0.9, 1.1)
        rows.append(
            {
                "prompt_tokens": prompt,
                "output_tokens": 50,
                "timing": {
                    "prefill_s": slow * truth.prefill_s(prompt - cached, cached) * noise(),
                    "handoff_s": slow
                    * (
                        truth.handoff_s(prompt)
                        + handoff_steps_weight * handoff_steps(batch) * truth.decode_step_s(batch, context)
                    )
                    * noise(),
                    "tpot_s": slow * truth.decode_step_s(batch, context) * noise(),
                },
                "placement": {
                    "prefill_group": GROUP,
                    "prefill_idle": True,
                    "prefill_cached_tokens": cached,
                    "decode_group": "decode-group",
                    "split": True,
                    "decode_batch": batch,
                    "decode_context_tokens": context,
                },
            }
        )
    return rows


def test_refit_learns_hardware_twice_as_slow_as_the_prior(prior):
    train, test = _records(200, slow=2.0, seed=1), _records(100, slow=2.0, seed=2)
    before = prior.evaluate(test)
    fitted = prior.refit(train)
    after = fitted.evaluate(test)
    assert before[GROUP]["prefill"]["mape"] > 0.4  # the prior is off by ~2x
    assert after[GROUP]["prefill"]["mape"] < 0.1
    assert after["decode-group"]["decode_step"]["mape"] < 0.1
    assert after["decode-group"]["handoff"]["mape"] < 0.1
    assert after[GROUP]["prefill"]["fitted_on"] == "observations (200)"
    assert fitted.costs("scaled") is prior.costs("scaled")  # groups without data keep their prior


def test_refit_learns_how_many_decode_steps_a_hand_off_takes(prior):
    """Real vLLM's hand-off polls for the remote KV over several steps (about 6, against the
    structural 1.5): the weight on the steps is learnt, so busy decode instances' hand-offs are
    predicted at their length and not as a larger fixed cost."""
    train, test = (
        _records(300, slow=1.0, seed=3, handoff_steps_weight=4.0),
        _records(100, slow=1.0, seed=4, handoff_steps_weight=4.0),
    )
    assert prior.evaluate(test)["decode-group"]["handoff"]["mape"] > 0.5
    fitted = prior.refit(train)
    costs = fitted.costs("decode-group")
    assert costs.handoff_step_weight == pytest.approx(4.0, rel=0.15)
    assert fitted.evaluate(test)["decode-group"]["handoff"]["mape"] < 0.1
    truth = prior_costs(PriorSpec())
    for prompt in (500, 4000):  # the transfer is not inflated by the steps it did not count
        assert costs.handoff_s(prompt) < 1.5 * truth.handoff_s(prompt)


def test_a_model_saved_before_the_step_weight_counts_the_steps_once():
    prior = prior_costs(PriorSpec())
    old = GroupCosts(prior.prefill, prior.decode_step, LinearCost(prior.handoff.coef[:2], 30))
    assert old.handoff_step_weight == 1.0
    assert old.handoff_steps_s(32, 32 * 1000) == prior.handoff_steps_s(32, 32 * 1000)
    assert old.handoff_s(1000) == prior.handoff_s(1000)
    saved = LatencyModel({"decode-group": old, GROUP: old})  # a model saved before, with its old prior
    assert saved.evaluate(_records(20, slow=1.0, seed=6))["decode-group"]["handoff"]["mape"] < 0.2
    refitted = saved.refit(_records(50, slow=1.0, seed=5))
    costs = refitted.costs("decode-group")
    assert len(costs.handoff.coef) == 3 and costs.handoff.n_obs == 50
    assert costs.handoff_step_weight == pytest.approx(1.0, rel=0.25)
    few = saved.refit(_records(3, slow=1.0, seed=7))  # too few to refit: the old prior answers as before
    assert few.costs("decode-group").handoff_steps_s(32, 32 * 1000) == old.handoff_steps_s(32, 32 * 1000)


def test_hand_offs_seen_only_on_an_idle_engine_leave_the_step_weight_near_its_prior(prior):
    """Alone in its batch a hand-off's step is nearly a constant plus a multiple of the prompt, so
    the step weight cannot be told from the transfer: the busy-batch anchors of the prior hold it,
    and the hand-off into a busy batch stays priced as the prior prices it."""
    fitted = prior.refit(_records(300, slow=1.0, seed=8, idle=True)).costs("decode-group")
    assert 0.7 <= fitted.handoff_step_weight <= 1.5
    truth = prior_costs(PriorSpec())
    assert fitted.handoff_steps_s(64, 64 * 1024) == pytest.approx(truth.handoff_steps_s(64, 64 * 1024), rel=0.5)


def test_few_observations_keep_the_prior_and_busy_prefills_are_not_used(prior):
    rows = _records(5, slow=3.0)
    assert prior.refit(rows).costs(GROUP).prefill.coef == prior.costs(GROUP).prefill.coef
    busy = [{**r, "placement": {**r["placement"], "prefill_idle": False}} for r in _records(50, slow=3.0)]
    assert prior.refit(busy).costs(GROUP).prefill.n_obs == 0  # queueing would be mistaken for prefill time


def test_fit_records_without_timings_is_none():
    assert LatencyModel.fit_records([{"prompt_tokens": 10, "output_tokens": 3}]) is None


def test_group_costs_are_their_linear_costs_over_the_features():
    """GroupCosts' prefill, decode step and hand-off are written out for speed: the same floats as
    the LinearCost evaluated on the features (including the clamp at zero)."""
    rng = random.Random(3)
    for _ in range(5000):
        costs = GroupCosts(
            LinearCost(tuple(rng.choice([0.0, -0.0, rng.uniform(-1e-3, 1e-2)]) for _ in range(3))),
            LinearCost(tuple(rng.uniform(-1e-3, 1e-2) for _ in range(3))),
            LinearCost(tuple(rng.uniform(-1e-3, 1e-2) for _ in range(3))),
        )
        uncached, cached = rng.choice([(rng.randint(0, 40_000), rng.randint(0, 40_000)), (rng.random() * 1e4, 0.0)])
        batch, context = rng.randint(0, 300), rng.randint(0, 10**6)
        assert costs.prefill_s(uncached, cached) == costs.prefill(*prefill_features(uncached, cached))
        assert costs.decode_step_s(batch, context) == costs.decode_step(*decode_features(batch, context))
        assert costs.handoff_s(uncached) == costs.handoff(*handoff_features(uncached))
