"""Online correction of the decode step model between refits.

The latency fits are refitted every ``cost_model.refit_interval_s``; between two refits a bias
in the decode step model (a host running slower than its profile, a batch shape the fit has not
seen) would make every TPOT-based decision wrong by the same factor. :class:`StepCalibration`
keeps, per decode group, an exponentially weighted mean of ``actual TPOT / predicted step time``
(in log space; the prediction taken at the batch and context the request actually decoded in,
so a batch that grew after placement is not mistaken for a model error) and the gateway applies
it as :attr:`CostModel.tpot_scale`. A refit absorbs the bias, so a new model starts the
calibration over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALPHA = 0.1  # weight of the newest observation
MIN_SCALE, MAX_SCALE = 0.5, 3.0
CHANGE = 0.02  # a scale that moved by more than this share is put in force


@dataclass
class StepCalibration:
    """Per-group decode-step scale factors, learnt from completed requests."""

    alpha: float = ALPHA
    _log_scale: dict[str, float] = field(default_factory=dict)
    in_force: dict[str, float] = field(default_factory=dict)  # the scales the cost model applies now
    groups_seen: set[str] = field(default_factory=set)  # every group observed (its scale is exported)

    def observe(self, group: str, predicted_step_s: float, actual_tpot_s: float) -> bool:
        """One request's actual TPOT against the (uncorrected) predicted step time of the batch it
        decoded in; True when the group's scale moved enough to be put in force."""
        if not (predicted_step_s > 0 and actual_tpot_s > 0 and math.isfinite(actual_tpot_s)):
            return False
        self.groups_seen.add(group)
        ratio = math.log(min(MAX_SCALE, max(MIN_SCALE, actual_tpot_s / predicted_step_s)))
        before = self._log_scale.get(group, 0.0)
        self._log_scale[group] = before + self.alpha * (ratio - before)
        scale = math.exp(self._log_scale[group])
        if abs(scale / self.in_force.get(group, 1.0) - 1.0) > CHANGE:
            self.in_force[group] = scale
            return True
        return False

    def reset(self) -> None:
        """A new model is in force: its fit includes what the scales corrected."""
        self._log_scale.clear()
        self.in_force.clear()
