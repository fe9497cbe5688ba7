"""Latency models: prefill time, decode step time and KV hand-off time, per instance group.

Each quantity is a non-negative linear function of physically meaningful features, so it
extrapolates sanely and can be fitted from a handful of observations:

* **prefill** of ``u`` uncached prompt tokens after ``c`` cached ones (seconds, on an idle instance)::

      prefill(u, c) = p0 + p1 * u + p2 * u * (c + u / 2)        (fixed cost, GEMMs, attention pairs)

* **decode step** with ``B`` sequences attending ``K`` context tokens in all::

      step(B, K) = d0 + d1 * B + d2 * K                          (weights read, per-row work, KV read)

* **hand-off**: from sending the decode leg to its first token::

      handoff = t0 + t1 * prompt_tokens + s * handoff_steps(B) * step(B, K)

  the KV transfer over the link and the fixed costs, then the decode steps of the batch the
  request joins (``B``, ``K`` with it; the batch is known at placement, so
  :meth:`CostModel.handoff_s` adds them): :data:`HANDOFF_STEPS` of them by structure (the wait
  for a step boundary and the first token's step), times ``s``, learnt per group (prior 1).
  The steps are what grows under load: before they were counted, a busy simulated decode
  instance's hand-offs ran 25-70 % over their predictions; real vLLM (CPU build, NixlConnector)
  takes about 6 steps (the remote KV is polled for over a few steps before the first token's),
  which a fixed 1.5 under-predicted by up to 2.5x at load.

A *group* is a set of instances that share hardware, model and engine (``InstanceView.cost_group``).
Until a group has observations the **prior** answers: coefficients fitted to the simulated
engine's calibrated performance profile (or a roofline profile), divided by the engine's time
scale. With observations, the fit is a non-negative least-squares regression (scikit-learn's
``LinearRegression(positive=True)``) on relative error, where the prior enters as a few
weighted pseudo-observations, so a small sample refines rather than replaces it.

Observations come from the gateway's completed-request log (see :mod:`scheduler.costmodel.datasets`):
``timing.prefill_s`` of prefills sent to an idle instance, ``timing.handoff_s`` and
``timing.tpot_s`` with the decode batch the request saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard

import numpy as np

HANDOFF_STEPS = 1.5
"""Decode steps in a hand-off to a busy decode instance besides the transfer: about half a step
waiting for a step boundary, then one for its first token (an idle instance: the one step).
Measured against the simulated engine (``benchmarks/latency_check.py``): 2 over-predicted by
~20 %, 1 (the old idle first step) under-predicted busy instances by 20-70 %."""


def handoff_steps(batch: float) -> float:
    """Decode steps a hand-off into a batch of ``batch`` requests (itself included) takes besides
    the transfer: :data:`HANDOFF_STEPS`, or one when it is alone (an idle engine takes it at once)."""
    return 1.0 if batch <= 1 else HANDOFF_STEPS


PRIOR_WEIGHT = 8.0  # pseudo-observations the prior is worth
BUSY_BATCHES = (16, 64)  # decode batches the prior always speaks for in a refit (see busy_handoff_anchors)
MIN_OBSERVATIONS = 8  # below this a quantity of a group keeps its prior


@dataclass
class LinearCost:
    """``max(0, coef . features)``; ``n_obs`` observations went into the fit (0: prior only)."""

    coef: tuple[float, ...]
    n_obs: int = 0

    def __call__(self, *features: float) -> float:
        total = 0.0
        for c, x in zip(self.coef, features, strict=True):
            total += c * x
        return max(0.0, total)


def prefill_features(uncached: float, cached: float) -> tuple[float, float, float]:
    return (1.0, float(uncached), float(uncached) * (float(cached) + float(uncached) / 2.0))


def decode_features(batch: float, context_tokens: float) -> tuple[float, float, float]:
    return (1.0, float(batch), float(context_tokens))


def handoff_features(prompt_tokens: float, steps_s: float = 0.0) -> tuple[float, float, float]:
    """``(1, prompt tokens, the structural steps' time)``: the last is ``handoff_steps(B) *
    step(B, K)`` of the batch joined (:meth:`GroupCosts.structural_steps_s`)."""
    return (1.0, float(prompt_tokens), float(steps_s))


def with_step_weight(handoff: LinearCost) -> LinearCost:
    """A hand-off cost of a model saved before the step weight was learnt (``t0, t1``), with the
    weight it implied (1); one that has it, unchanged."""
    return handoff if len(handoff.coef) > 2 else LinearCost((*handoff.coef, 1.0), handoff.n_obs)


@dataclass
class GroupCosts:
    """The three models of one instance group."""

    prefill: LinearCost
    decode_step: LinearCost
    handoff: LinearCost

    # The scheduler asks these several times per request: each is its LinearCost over its
    # features written out (the same arithmetic in the same order, so the same float).

    def prefill_s(self, uncached: float, cached: float = 0.0) -> float:
        p0, p1, p2 = self.prefill.coef
        u = float(uncached)
        return max(0.0, p0 + p1 * u + p2 * (u * (float(cached) + u / 2.0)))

    def decode_step_s(self, batch: float, context_tokens: float) -> float:
        d0, d1, d2 = self.decode_step.coef
        return max(0.0, d0 + d1 * float(batch) + d2 * float(context_tokens))

    def handoff_s(self, prompt_tokens: float) -> float:
        """The hand-off's transfer and fixed costs (``t0 + t1 * prompt_tokens``), without its steps."""
        coef = self.handoff.coef
        return max(0.0, coef[0] + coef[1] * float(prompt_tokens))

    @property
    def handoff_step_weight(self) -> float:
        """``s``: the hand-off's decode steps as a multiple of :func:`handoff_steps` (1 for a
        model saved before it was learnt)."""
        coef = self.handoff.coef
        return coef[2] if len(coef) > 2 else 1.0

    def structural_steps_s(self, batch: float, context_tokens: float) -> float:
        """:func:`handoff_steps` of the batch joined, at that batch's step time (``s`` not applied)."""
        return handoff_steps(batch) * self.decode_step_s(batch, context_tokens)

    def handoff_steps_s(self, batch: float, context_tokens: float) -> float:
        """The decode steps a hand-off takes besides its transfer: ``s`` times the structural ones."""
        return self.handoff_step_weight * self.structural_steps_s(batch, context_tokens)


# ------------------------------------------------------------------ priors


@dataclass(frozen=True)
class PriorSpec:
    """Where a group's prior comes from: a simulator profile name (or ``None``: the default one)."""

    profile: str | None = None
    time_scale: float = 1.0
    max_num_batched_tokens: int = 8192
    kv_link_gbps: float = 25.0
    kv_link_latency_s: float = 0.001


DEFAULT_PRIOR_PROFILE = "h100-llama-3-8b"


def _fit_nonneg(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, ...]:
    from sklearn.linear_model import (
        LinearRegression,  # imported lazily: sklearn is slow to import
    )

    model = LinearRegression(positive=True, fit_intercept=False)
    model.fit(x, y, sample_weight=weights)
    return tuple(float(c) for c in model.coef_)


def prior_costs(spec: PriorSpec) -> GroupCosts:
    """Coefficients fitted to the engine profile's step-time function over a grid of batches."""
    from pdgate.common.perf_model import StepBatch, load_profile

    profile = load_profile(spec.profile or DEFAULT_PRIOR_PROFILE)
    scale = 1.0 / spec.time_scale
    budget = spec.max_num_batched_tokens

    def prefill_time(uncached: int, cached: int) -> float:
        done, total = 0, 0.0
        while done < uncached:  # chunked prefill, one chunk per step
            chunk = min(budget, uncached - done)
            before = cached + done
            total += profile.step_time(StepBatch(prefill_tokens=chunk, prefill_attn_pairs=chunk * (before + chunk)))
            done += chunk
        return total

    rows_p, y_p = [], []
    for u in (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
        for c in (0, 1024, 8192):
            rows_p.append(prefill_features(u, c))
            y_p.append(prefill_time(u, c) * scale)
    rows_d, y_d = [], []
    for b in (1, 4, 16, 32, 64, 128, 256):
        for ctx in (256, 1024, 4096):
            rows_d.append(decode_features(b, b * ctx))
            y_d.append(profile.step_time(StepBatch(decode_seqs=b, decode_kv_tokens=b * ctx)) * scale)
    per_token = profile.kv_bytes_per_token / (spec.kv_link_gbps * 1e9)
    handoff = (
        (spec.kv_link_latency_s + 0.002) * scale,  # + a couple of ms of HTTP and scheduling; steps come on top
        per_token * scale,
        1.0,  # the structural steps, as they are
    )
    weights_p = 1.0 / np.asarray(y_p)
    weights_d = 1.0 / np.asarray(y_d)
    return GroupCosts(
        prefill=LinearCost(_fit_nonneg(np.asarray(rows_p), np.asarray(y_p), weights_p)),
        decode_step=LinearCost(_fit_nonneg(np.asarray(rows_d), np.asarray(y_d), weights_d)),
        handoff=LinearCost(handoff),
    )


# -------------------------------------------------------------- the model


class HandoffRow(NamedTuple):
    """One observed hand-off: its prompt, the decode batch and context it joined, its seconds."""

    prompt_tokens: float
    batch: float
    context_tokens: float
    seconds: float


@dataclass
class Observations:
    """Training rows of one group, split by quantity."""

    prefill: list[tuple[tuple[float, ...], float]] = field(default_factory=list)
    decode_step: list[tuple[tuple[float, ...], float]] = field(default_factory=list)
    handoff: list[HandoffRow] = field(default_factory=list)


def observations_of(records: Iterable[Mapping[str, Any]]) -> dict[str, Observations]:
    """Group the usable timing rows of gateway request-log records (see the module doc)."""
    groups: dict[str, Observations] = {}
    for record in records:
        timing = record.get("timing") or {}
        placement = record.get("placement") or {}
        prefill_s = timing.get("prefill_s")
        group = placement.get("prefill_group")
        if _positive(prefill_s) and group and placement.get("prefill_idle"):
            uncached = max(0, int(record.get("prompt_tokens", 0)) - int(placement.get("prefill_cached_tokens") or 0))
            if uncached > 0:
                groups.setdefault(group, Observations()).prefill.append(
                    (prefill_features(uncached, int(placement.get("prefill_cached_tokens") or 0)), float(prefill_s))
                )
        decode_group = placement.get("decode_group")
        handoff_s = timing.get("handoff_s")
        if decode_group and _positive(handoff_s) and placement.get("split"):
            prompt_tokens = int(record.get("prompt_tokens", 0))
            batch, context = placement.get("decode_batch"), placement.get("decode_context_tokens")
            groups.setdefault(decode_group, Observations()).handoff.append(
                HandoffRow(
                    float(prompt_tokens),
                    float(batch or 1),
                    float(context if context is not None else prompt_tokens),
                    float(handoff_s),
                )
            )
        tpot_s = timing.get("tpot_s")
        batch = placement.get("decode_batch")
        context = placement.get("decode_context_tokens")
        if (
            decode_group
            and _positive(tpot_s)
            and batch
            and context is not None
            and int(record.get("output_tokens") or 0) >= 4
        ):
            groups.setdefault(decode_group, Observations()).decode_step.append(
                (decode_features(float(batch), float(context)), step_time_of(float(tpot_s), placement))
            )
    return groups


def step_time_of(tpot_s: float, placement: Mapping[str, Any]) -> float:
    """A request's decode step time from its TPOT: the TPOT less the stalls of the prompts its
    decode instance prefilled meanwhile (``TPOT = step / (1 - prefill share)``), so that colocated
    prompts are not learnt as a slower step."""
    share = placement.get("decode_prefill_share") or 0.0
    if not isinstance(share, int | float) or not 0.0 <= share < 1.0:
        return tpot_s
    return tpot_s * (1.0 - share)


def _positive(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _refit(
    prior: LinearCost, rows: Sequence[tuple[tuple[float, ...], float]], grid: Sequence[tuple[float, ...]]
) -> LinearCost:
    """Non-negative fit on relative error, the prior counting as ``PRIOR_WEIGHT`` observations."""
    if len(rows) < MIN_OBSERVATIONS:
        return LinearCost(prior.coef, prior.n_obs)
    x_obs = np.asarray([r[0] for r in rows], dtype=float)
    y_obs = np.asarray([r[1] for r in rows], dtype=float)
    x_prior = np.asarray(grid, dtype=float)
    y_prior = np.asarray([max(prior(*g), 1e-6) for g in grid])
    x = np.vstack([x_obs, x_prior])
    y = np.concatenate([y_obs, y_prior])
    weights = np.concatenate([np.full(len(y_obs), 1.0), np.full(len(y_prior), PRIOR_WEIGHT / len(y_prior))]) / y
    return LinearCost(_fit_nonneg(x, y, weights), len(rows))


def busy_handoff_anchors(costs: GroupCosts) -> list[tuple[float, ...]]:
    """Prior pseudo-observations of hand-offs into busy batches (16 and 64 requests of 1k tokens,
    on ``costs``' step model), always added to the data's own: a group whose hand-offs were all
    seen on an idle engine (one step, whose time is nearly a constant plus a multiple of the
    prompt) does not tell the step weight from ``t0`` and ``t1``, and without these the fit
    could put it anywhere (0, and the old under-prediction under load; or many times the prior)."""
    return [
        handoff_features(prompt, costs.structural_steps_s(batch, batch * 1024.0))
        for prompt in (256, 2048)
        for batch in BUSY_BATCHES
    ]


def _grid(
    rows: Sequence[tuple[tuple[float, ...], float]],
    make: Callable[..., tuple[float, ...]],
    defaults: Sequence[tuple[float, ...]],
) -> list[tuple[float, ...]]:
    """Prior pseudo-observations placed where the data is (so the prior anchors the same region)."""
    return [r[0] for r in rows[:: max(1, len(rows) // 16)]] if rows else [make(*d) for d in defaults]


@dataclass
class LatencyModel:
    """Per-group latency models with a prior for groups (or quantities) not yet observed."""

    priors: dict[str, GroupCosts] = field(default_factory=dict)
    fitted: dict[str, GroupCosts] = field(default_factory=dict)
    prior_specs: dict[str, PriorSpec] = field(default_factory=dict)

    @classmethod
    def from_priors(cls, specs: Mapping[str, PriorSpec]) -> LatencyModel:
        model = cls(prior_specs=dict(specs))
        cache: dict[PriorSpec, GroupCosts] = {}
        for group, spec in specs.items():
            if spec not in cache:
                cache[spec] = prior_costs(spec)
            model.priors[group] = cache[spec]
        return model

    def costs(self, group: str) -> GroupCosts:
        """The group's models: fitted if any, else its prior, else the default prior."""
        found = self.fitted.get(group) or self.priors.get(group)
        if found is None:
            found = self.priors[group] = prior_costs(self.prior_specs.get(group, PriorSpec()))
        return found

    def with_prior_specs(self, specs: Mapping[str, PriorSpec]) -> LatencyModel:
        """This model, with priors for groups it lacks (a loaded model meeting a new fleet)."""
        missing = {g: s for g, s in specs.items() if g not in self.priors}
        extra = LatencyModel.from_priors(missing)
        return LatencyModel({**self.priors, **extra.priors}, dict(self.fitted), {**self.prior_specs, **missing})

    def refit(self, records: Iterable[Mapping[str, Any]]) -> LatencyModel:
        """A new model fitted on ``records`` (gateway request-log rows), with this one's priors."""
        fitted: dict[str, GroupCosts] = {}
        for group, obs in observations_of(records).items():
            prior = self.priors.get(group) or self.costs(group)
            decode_step = _refit(
                prior.decode_step,
                obs.decode_step,
                _grid(obs.decode_step, decode_features, [(b, b * 1024) for b in (1, 16, 64)])
                + [decode_features(b, b * 1024.0) for b in BUSY_BATCHES],  # where an idle engine's data says nothing
            )
            steps = GroupCosts(prior.prefill, decode_step, prior.handoff)
            handoffs = [  # t0, t1 and s together, the steps at the batch joined on the new step model
                (
                    handoff_features(row.prompt_tokens, steps.structural_steps_s(row.batch, row.context_tokens)),
                    row.seconds,
                )
                for row in obs.handoff
            ]
            fitted[group] = GroupCosts(
                prefill=_refit(
                    prior.prefill,
                    obs.prefill,
                    _grid(obs.prefill, prefill_features, [(u, c) for u in (128, 1024, 4096) for c in (0, 2048)]),
                ),
                decode_step=decode_step,
                handoff=_refit(
                    with_step_weight(prior.handoff),
                    handoffs,
                    _grid(handoffs, handoff_features, [(t, 0.0) for t in (128, 2048, 8192)])
                    + busy_handoff_anchors(steps),
                ),
            )
        return LatencyModel(dict(self.priors), fitted, dict(self.prior_specs))

    @classmethod
    def fit_records(cls, records: Sequence[Mapping[str, Any]]) -> LatencyModel | None:
        """Fit from request-log rows alone (default priors); ``None`` when no row has usable timing."""
        groups = observations_of(records)
        if not groups:
            return None
        return cls().refit(records)

    def evaluate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """MAPE (and n) of each quantity per group against the observed timings in ``records``."""
        report: dict[str, Any] = {}
        for group, obs in observations_of(records).items():
            costs = self.costs(group)
            entry: dict[str, Any] = {}
            handoffs = [  # the transfer and the steps at the batch the request joined
                (costs.handoff_s(row.prompt_tokens) + costs.handoff_steps_s(row.batch, row.context_tokens), row.seconds)
                for row in obs.handoff
            ]
            for name, rows in (
                ("prefill", [(costs.prefill(*x), y) for x, y in obs.prefill]),
                ("decode_step", [(costs.decode_step(*x), y) for x, y in obs.decode_step]),
                ("handoff", handoffs),
            ):
                if rows:
                    errors = [abs(guess - y) / y for guess, y in rows]
                    entry[name] = {
                        "n": len(rows),
                        "mape": round(float(np.mean(errors)), 4),
                        "median_ape": round(float(np.median(errors)), 4),
                        "fitted_on": costs_source(self, group, name),
                    }
            report[group] = entry
        return report

    def describe(self) -> dict[str, Any]:
        """Coefficients and observation counts per group (for /debug and reports)."""
        out: dict[str, Any] = {}
        for group in sorted({*self.priors, *self.fitted}):
            costs = self.costs(group)
            out[group] = {
                name: {"coef": [round(c, 9) for c in getattr(costs, name).coef], "n_obs": getattr(costs, name).n_obs}
                for name in ("prefill", "decode_step", "handoff")
            }
        return out


def costs_source(model: LatencyModel, group: str, quantity: str) -> str:
    fitted = model.fitted.get(group)
    if fitted is not None and getattr(fitted, quantity).n_obs > 0:
        return f"observations ({getattr(fitted, quantity).n_obs})"
    return "prior"
