"""The cost model in force: latency models plus the output-length model, behind one read-only facade.

A :class:`CostModel` is immutable once built; the gateway swaps in a new one after each refit,
so a decision in progress always sees one consistent version.

The cost model sits below the scheduler's snapshot (``ClusterSnapshot.costs`` holds one), so it
takes instances as :class:`CostedInstance`, which ``pdgate.scheduler.snapshot.InstanceView``
satisfies, rather than importing the snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from pdgate.scheduler.costmodel.latency import LatencyModel
from pdgate.scheduler.costmodel.length_types import LengthPrediction, cap_prediction

if TYPE_CHECKING:
    from pdgate.scheduler.costmodel.features import RequestFeatures
    from pdgate.scheduler.costmodel.output_length import OutputLengthModel

DEFAULT_OUTPUT_TOKENS = 128  # when nothing predicts the output length


class CostedInstance(Protocol):
    """What the cost model needs of an instance (``InstanceView`` fits)."""

    @property
    def cost_group(self) -> str:
        """The instance's latency-model group (instances sharing hardware, model and engine)."""
        ...


@dataclass(frozen=True)
class CostModel:
    latency: LatencyModel
    output: OutputLengthModel
    version: str = "prior"
    # decode group -> factor on its step time: the online correction between refits
    # (:class:`pdgate.scheduler.costmodel.calibration.StepCalibration`)
    tpot_scale: Mapping[str, float] = field(default_factory=dict)
    # answering model -> factor on its predicted output length: the online correction between
    # refits (:class:`pdgate.scheduler.costmodel.calibration.LengthCalibration`)
    length_scale: Mapping[str, float] = field(default_factory=dict)

    def predict_output(self, features: RequestFeatures) -> LengthPrediction:
        """The output-length model's prediction, times the model's online length scale."""
        prediction = self.output.predict(features)
        scale = self.length_scale.get(features.model)
        if scale is None:
            return prediction
        capped = cap_prediction(prediction.median * scale, prediction.high * scale, features.max_tokens)
        return replace(capped, scale=scale)

    def prefill_s(self, instance: CostedInstance, uncached: float, cached: float = 0.0) -> float:
        """Predicted seconds to prefill on ``instance`` when it is idle."""
        return self.latency.costs(instance.cost_group).prefill_s(uncached, cached)

    def decode_step_s(self, instance: CostedInstance, batch: float, context_tokens: float) -> float:
        """Predicted seconds per decode step (the TPOT) of a batch on ``instance``."""
        group = instance.cost_group
        return self.latency.costs(group).decode_step_s(batch, context_tokens) * self.tpot_scale.get(group, 1.0)

    def handoff_s(self, instance: CostedInstance, prompt_tokens: float) -> float:
        """Predicted seconds from sending a decode leg to ``instance`` to its first token: the
        KV transfer and fixed costs, plus the decode steps of the batch it joins
        (:meth:`~scheduler.costmodel.latency.GroupCosts.handoff_steps_s`: the structural
        :func:`~scheduler.costmodel.latency.handoff_steps` times the group's learnt weight)."""
        group = instance.cost_group
        costs = self.latency.costs(group)
        batch = getattr(instance, "decode_inflight", 0) + 1
        context = getattr(instance, "decode_context_tokens", 0) + prompt_tokens
        steps = costs.handoff_steps_s(batch, context) * self.tpot_scale.get(group, 1.0)
        return costs.handoff_s(prompt_tokens) + steps


def expected_output_tokens(prediction: LengthPrediction | None, max_tokens: int) -> float:
    """The median predicted output, or a default capped by ``max_tokens``."""
    if prediction is not None:
        return prediction.median
    return float(min(max_tokens, DEFAULT_OUTPUT_TOKENS)) if max_tokens > 0 else float(DEFAULT_OUTPUT_TOKENS)
