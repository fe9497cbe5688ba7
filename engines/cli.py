"""``pdgate engine ...``: launch engines (the embedded simulator, real vLLM, SGLang)."""

from __future__ import annotations

import argparse

from pdgate.engines.launch.sglang import add_sglang_command
from pdgate.engines.launch.vllm import add_vllm_command
from pdgate.engines.launch.vllm_cpu.install import add_setup_command
from pdgate.engines.sim.cli import add_sim_command


def add_engine_commands(commands: argparse._SubParsersAction) -> None:
    engine = commands.add_parser(
        "engine", help="run an inference engine (simulated or real)", description="Run an inference engine."
    )
    kinds = engine.add_subparsers(dest="engine_kind", metavar="KIND", required=True)
    add_sim_command(kinds)
    add_vllm_command(kinds)
    add_setup_command(kinds)
    add_sglang_command(kinds)
