"""pdgate: an SLO-aware gateway and global scheduler for prefill-decode disaggregated LLM serving.

One import root, layered from the bottom up (docs/architecture.md draws it; import-linter
contracts in pyproject.toml keep it so):

* :mod:`pdgate.common`: the bottom layer everything may use: tokenizers and chat templates,
  vLLM's block hashing and KV-event wire format, the GPU performance model, HTTP/1 server and
  client, SSE framing, process helpers, JSON/YAML file reading. It imports none of the others.
* :mod:`pdgate.engines` (the simulated engine and launchers of real ones) and
  :mod:`pdgate.loadgen` (the SLO load generator, HTTP only) stand on the bottom layer alone.
* :mod:`pdgate.scheduler` decides over snapshots (plugins, cost model, prefix index) and
  :mod:`pdgate.adapters` carry decisions out against engines; neither imports the other.
* :mod:`pdgate.gateway` drives both: the OpenAI-compatible proxy, admission, migration.
* :mod:`pdgate.cli` assembles the ``pdgate`` command from every layer's subcommands.
"""
