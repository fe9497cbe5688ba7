"""The learned cost model: output length, prefill time, decode step time and KV transfer time.

* :mod:`scheduler.costmodel.features`: request features (stable hashed prompt n-grams, no text kept).
* :mod:`scheduler.costmodel.output_length`: output-length quantile model and its baselines.
* :mod:`scheduler.costmodel.latency`: per-instance-kind prefill / decode-step / KV-transfer models
  with a physical prior.
* :mod:`scheduler.costmodel.store`: versioned models on disk.
* :mod:`scheduler.costmodel.datasets` and :mod:`scheduler.costmodel.cli`: ``pdgate cost-model``.
"""
