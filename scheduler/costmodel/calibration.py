"""Online corrections of the cost model between refits.

The models are refitted every ``cost_model.refit_interval_s``; between two refits a bias would
make every decision that reads them wrong by the same factor. :class:`ScaleCalibration` keeps,
per key, an exponentially weighted mean of ``actual / predicted`` in log space and puts a scale
in force once it has moved; a refit absorbs the bias, so a new model starts the calibration over.
Two are used:

* :class:`StepCalibration`, per decode group: actual TPOT against the predicted step time of the
  batch and context the request actually decoded in (so a batch that grew after placement is not
  mistaken for a model error); applied as :attr:`CostModel.tpot_scale`;
* :class:`LengthCalibration`, per answering model: actual output tokens against the predicted
  median. A model the length model has not seen (or one that grew more verbose) gets its
  verbosity within a few dozen requests instead of at the next refit; applied as
  :attr:`CostModel.length_scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALPHA = 0.1  # weight of the newest observation
MIN_SCALE, MAX_SCALE = 0.5, 3.0
CHANGE = 0.02  # a scale that moved by more than this share is put in force


@dataclass
class ScaleCalibration:
    """Per-key scale factors on a prediction, learnt from completed requests."""

    alpha: float = ALPHA
    min_scale: float = MIN_SCALE
    max_scale: float = MAX_SCALE
    change: float = CHANGE
    _log_scale: dict[str, float] = field(default_factory=dict)
    in_force: dict[str, float] = field(default_factory=dict)  # the scales applied now
    keys_seen: set[str] = field(default_factory=set)  # every key observed (its scale is exported)

    def observe(self, key: str, predicted: float, actual: float) -> bool:
        """One request's actual value against the model's *uncorrected* prediction; True when
        the key's scale moved enough to be put in force."""
        if not (predicted > 0 and actual > 0 and math.isfinite(actual)):
            return False
        self.keys_seen.add(key)
        ratio = math.log(min(self.max_scale, max(self.min_scale, actual / predicted)))
        before = self._log_scale.get(key, 0.0)
        self._log_scale[key] = before + self.alpha * (ratio - before)
        scale = math.exp(self._log_scale[key])
        if abs(scale / self.in_force.get(key, 1.0) - 1.0) > self.change:
            self.in_force[key] = scale
            return True
        return False

    def reset(self) -> None:
        """A new model is in force: its fit includes what the scales corrected."""
        self._log_scale.clear()
        self.in_force.clear()


@dataclass
class StepCalibration(ScaleCalibration):
    """Per decode group: actual TPOT / predicted step time (scales within 0.5-3)."""

    @property
    def groups_seen(self) -> set[str]:
        return self.keys_seen


LENGTH_MIN_SCALE, LENGTH_MAX_SCALE = 0.125, 8.0
LENGTH_CHANGE = 0.05


@dataclass
class LengthCalibration(ScaleCalibration):
    """Per answering model: actual output tokens / the length model's median (scales within 1/8-8)."""

    min_scale: float = LENGTH_MIN_SCALE
    max_scale: float = LENGTH_MAX_SCALE
    change: float = LENGTH_CHANGE

    def observe_output(
        self, model: str, served_median: float, actual: int, max_tokens: int | None, served_scale: float = 1.0
    ) -> bool:
        """One completed request: ``served_median`` is the median it was served with, which
        carried ``served_scale`` (the scale in force *when it was served*: dividing by the one in
        force now would feed the scale's own moves back into it, and it would swing by 10x within
        a burst). A request cut at ``max_tokens``, or whose prediction was, says nothing of the
        model's natural length and is skipped."""
        if max_tokens is not None and (actual >= max_tokens or served_median >= max_tokens):
            return False
        if not served_scale > 0:
            return False
        return self.observe(model, served_median / served_scale, float(actual))
