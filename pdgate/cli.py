"""``pdgate``: the one console script. Subcommands register themselves from their packages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pdgate.engines.cli import add_engine_commands
from pdgate.gateway.commands import add_gateway_commands
from pdgate.loadgen.cli import add_bench_commands
from pdgate.scheduler.costmodel.cli import add_cost_model_commands
from pdgate.simulate.cli import add_simulate_commands

DESCRIPTION = """\
pdgate: an SLO-aware gateway and global scheduler for prefill-decode disaggregated LLM serving.

It sits in front of vLLM / SGLang engines (or its own simulated engine, which speaks the same
HTTP API without a GPU) and decides where each request is prefilled and decoded.
"""

EPILOG = """\
examples:
  pdgate up                                           # simulated 2P2D fleet + gateway on 127.0.0.1:8000
  pdgate serve --config configs/default.yaml          # gateway over an already running fleet
  pdgate engine sim                                   # one simulated vLLM-style engine on :8100
  pdgate engine sim --role prefill --port 8101 --api vllm --profile h100-llama-3-8b
  pdgate engine sim --help                            # every engine flag, with defaults
  pdgate bench run --target http://127.0.0.1:8000 --model llama-3-8b --rate 4 --slo ttft=0.5,tpot=0.05
  pdgate simulate --instances 16 --rate 40 --num-requests 2000 --slo ttft=0.5,tpot=0.05   # virtual time
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdgate", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_gateway_commands(commands)
    add_engine_commands(commands)
    add_bench_commands(commands)
    add_cost_model_commands(commands)
    add_simulate_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
