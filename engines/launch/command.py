"""The shared shape of ``pdgate engine vllm|sglang``: flags from a launch config, ``--print``, exec."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from pdgate.engines.flags import add_model_flags, model_from_args


def add_launch_command(
    kinds: argparse._SubParsersAction,
    name: str,
    *,
    help_text: str,
    description: str,
    config: type[BaseModel],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """A ``pdgate engine NAME`` that launches a real engine: one flag per ``config`` field and ``--print``."""
    parser = kinds.add_parser(
        name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(parser, config)
    parser.add_argument("--print", action="store_true", help="print the environment and command, do not start")
    parser.set_defaults(run=run)


def run_launcher(
    args: argparse.Namespace,
    engine: str,
    config_cls: type[BaseModel],
    build: Callable[[Any], tuple[list[str], dict[str, str]]],
    problem: Callable[[Any], str | None],
) -> int:
    """Validate the flags, build the command; print it (``--print``) or replace this process with it.

    Invalid flags, or a ``problem`` that keeps the engine from starting, exit with 2 and say why.
    """
    try:
        config = model_from_args(config_cls, args, None)
        argv, env = build(config)
    except (ValidationError, ValueError) as exc:
        print(f"pdgate engine {engine}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.print:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print(f"{prefix} {shlex.join(argv)}" if prefix else shlex.join(argv))
        return 0
    reason = problem(config)
    if reason is not None:
        print(f"pdgate engine {engine}: {reason}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, {**os.environ, **env})
    return 0  # pragma: no cover - exec does not return
