"""``pdgate simulate``: the gateway's own scheduling code over a simulated fleet on a virtual clock.

* :mod:`~pdgate.simulate.memory`: the in-memory transport (no sockets, no HTTP framing);
* :mod:`~pdgate.simulate.fleet`: the simulated engines of a gateway config, resized on demand;
* :mod:`~pdgate.simulate.run`: one run (gateway, fleet and load generator in one process);
* :mod:`~pdgate.simulate.cli` and :mod:`~pdgate.simulate.commands`: the command line and its report.

docs/simulate.md says what is simulated, what is not, and how closely it matches a real-time run.
"""
