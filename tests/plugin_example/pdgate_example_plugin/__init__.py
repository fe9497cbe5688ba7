"""An example third-party pdgate plugin: a scorer that prefers instances named in its parameters.

Install this package next to pdgate (``pip install tests/plugin_example``) and reference its
type in a gateway config::

    scheduling:
      plugins:
        - {name: pin, type: example-pinned, parameters: {instances: [decode-0]}}
        ...
      profiles:
        decode: [..., {pluginRef: pin, weight: 10}, ...]
"""

from __future__ import annotations

from collections.abc import Mapping

from pdgate.scheduler.framework import PluginParams, Scorer
from pdgate.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestInfo


class PinnedParams(PluginParams):
    instances: list[str]


class PinnedScorer(Scorer):
    """``score_i = 1`` if instance ``i`` is listed in ``instances``, else 0."""

    type_name = "example-pinned"
    Params = PinnedParams

    def score(
        self, request: RequestInfo, snapshot: ClusterSnapshot, candidates: list[InstanceView]
    ) -> Mapping[str, float]:
        pinned = set(self.params.instances)  # type: ignore[attr-defined]
        return {c.id: 1.0 if c.id in pinned else 0.0 for c in candidates}
