"""``pdgate engine ...``: launch engines (the embedded simulator, real vLLM, SGLang)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from engines.sim.config import SimEngineConfig

SIM_DESCRIPTION = """\
Start one simulated LLM engine: an HTTP server that speaks vLLM's (or SGLang's) OpenAI API,
runs a vLLM-v1-like step loop (chunked prefill, paged prefix cache, preemption, priorities)
and takes as long per step as a real GPU would, from profiles calibrated on measured kernels.
With no flags it starts a colocated vLLM-flavour H100 / Llama-3-8B engine on 127.0.0.1:8100.
Flags override values from --config FILE (YAML with the same names, snake_case).
"""


def add_engine_commands(commands: argparse._SubParsersAction) -> None:
    engine = commands.add_parser("engine", help="run an inference engine (simulated or real)", description="Run an inference engine.")
    kinds = engine.add_subparsers(dest="engine_kind", metavar="KIND", required=True)
    sim = kinds.add_parser(
        "sim", help="the embedded simulated engine (no GPU needed)", description=SIM_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--config", metavar="FILE", help="YAML file of engine settings")
    add_model_flags(sim, SimEngineConfig)
    sim.set_defaults(run=run_sim)
    from engines.sglang_launch import add_sglang_command
    from engines.vllm_cpu.install import add_setup_command
    from engines.vllm_launch import add_vllm_command

    add_vllm_command(kinds)
    add_setup_command(kinds)
    add_sglang_command(kinds)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One ``--kebab-case`` flag per field of a pydantic model, typed and documented."""
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default})"
        annotation = field.annotation
        choices, base = _flag_type(annotation)
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=base, choices=choices, default=None, metavar=None if choices else name.upper(), help=help_text)


def _flag_type(annotation: Any) -> tuple[list[Any] | None, Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        return _flag_type(args[0])
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation)), str
    return None, annotation if annotation in (int, float, bool) else str


def model_from_args(model: type[BaseModel], args: argparse.Namespace, config_file: str | None) -> Any:
    overrides = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    if config_file:
        return model.from_yaml(config_file, **overrides)  # type: ignore[attr-defined]
    return model.model_validate(overrides)


def add_launch_command(kinds: argparse._SubParsersAction, name: str, *, help_text: str, description: str,
                       config: type[BaseModel], run: Callable[[argparse.Namespace], int]) -> None:
    """A ``pdgate engine NAME`` that launches a real engine: one flag per ``config`` field and ``--print``."""
    parser = kinds.add_parser(name, help=help_text, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, config)
    parser.add_argument("--print", action="store_true", help="print the environment and command, do not start")
    parser.set_defaults(run=run)


def run_launcher(args: argparse.Namespace, engine: str, config_cls: type[BaseModel],
                 build: Callable[[Any], tuple[list[str], dict[str, str]]],
                 problem: Callable[[Any], str | None]) -> int:
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


def run_sim(args: argparse.Namespace) -> int:
    from engines.runtime import run_async, serve_until_signalled
    from engines.sim.server import SimServer

    try:
        config = model_from_args(SimEngineConfig, args, args.config)
        server = SimServer(config)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"pdgate engine sim: invalid configuration:\n{exc}", file=sys.stderr)
        return 2

    def ready(server: Any) -> None:
        st = server.state
        print(
            f"pdgate sim engine ready: {server.url} api={config.api} role={config.role} "
            f"model={st.served_model_name} profile={st.profile.name} ({st.profile.source}) "
            f"kv_blocks={st.core.kv.num_blocks}x{config.block_size} time_scale={config.time_scale}",
            flush=True,
        )
        boot = config.resolved_bootstrap_port()
        if boot is not None:
            print(f"  sglang bootstrap server on {config.host}:{boot}", flush=True)
        if config.kv_events_endpoint:
            print(f"  KV events -> {config.kv_events_endpoint} topic={config.kv_events_topic!r}", flush=True)

    try:
        run_async(serve_until_signalled(server, ready))
    except OSError as exc:
        print(f"pdgate engine sim: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
