"""``pdgate serve`` and ``pdgate up``."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from pdgate.common.runtime import run_async
from pdgate.gateway.config import ConfigError, GatewayConfig
from pdgate.scheduler.registry import PluginConfigError

SERVE_HELP = """\
Run the gateway over the fleet described in a YAML config (instances: url, kind, role, model,
optional API key, KV-events endpoint). The engines must already be running; see
configs/*.yaml for examples and `pdgate up` to start a simulated fleet too.

The fleet may change while it serves: SIGHUP reads the config again and applies its instances
(new ones added, missing ones drained and removed, changed ones replaced; other settings need a
restart), and the admin API adds (POST /admin/instances) and removes (DELETE
/admin/instances/ID) instances.
"""

UP_HELP = """\
The one-command embedded default: start the simulated engines of a fleet config as child
processes (default configs/default.yaml: two prefill and two decode engines), wait until they
are healthy, then serve the gateway on the config's address (127.0.0.1:8000). Ctrl-C or SIGTERM
stops the gateway and every child cleanly.
"""


def add_gateway_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the gateway over a running fleet",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="fleet and gateway YAML")
    _common(serve)
    serve.set_defaults(run=run_serve)
    up = commands.add_parser(
        "up",
        help="start a simulated fleet and the gateway (embedded default)",
        description=UP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--config", metavar="FILE", help="fleet and gateway YAML (default: configs/default.yaml)")
    _common(up)
    up.set_defaults(run=run_up)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="override the config's listen address")
    parser.add_argument("--port", type=int, help="override the config's port (0 picks a free one)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override logging.level")
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="override logging.format (json: one object per line)"
    )
    parser.add_argument("--access-log", action="store_true", default=None, help="log one line per finished request")


def _load(args: argparse.Namespace, path: str) -> Any:
    from pdgate.gateway.app import build_gateway
    from pdgate.gateway.logs import configure_logging

    config = _read_config(args, path)
    configure_logging(config.logging)
    return config, build_gateway(config)


def _read_config(args: argparse.Namespace, path: str) -> GatewayConfig:
    """The config file with the command line's overrides (also what a SIGHUP reload reads)."""
    config = GatewayConfig.load(path)
    overrides = {k: getattr(args, k) for k in ("host", "port") if getattr(args, k) is not None}
    if overrides:
        config = config.model_copy(update=overrides)
    logs = {
        k: getattr(args, a)
        for k, a in (("level", "log_level"), ("format", "log_format"), ("access_log", "access_log"))
        if getattr(args, a) is not None
    }
    if logs:
        config = config.model_copy(update={"logging": config.logging.model_copy(update=logs)})
    return config


def run_serve(args: argparse.Namespace) -> int:
    from pdgate.common.runtime import serve_until_signalled
    from pdgate.gateway.app import GatewayServer
    from pdgate.gateway.launcher import describe

    try:
        config, gateway = _load(args, args.config)
    except (ConfigError, PluginConfigError, ValueError, OSError) as exc:
        print(f"pdgate serve: {exc}", file=sys.stderr)
        return 2
    server = GatewayServer(gateway, reload_config=lambda: _read_config(args, args.config))
    try:
        run_async(
            serve_until_signalled(
                server, lambda s: _started(describe(config, [], s.url)), on_hangup=GatewayServer.reload
            )
        )
    except OSError as exc:
        print(f"pdgate serve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _started(banner: str) -> None:
    """The gateway is serving: say so, and move everything loaded so far (tokenizers, models,
    config) out of the garbage collector's way, so that a full collection does not pause every
    stream for tens of milliseconds (measured: ~76 ms on the 2-core box, benchmarks/migration.py)."""
    print(banner, flush=True)
    gc.collect()
    gc.freeze()


def run_up(args: argparse.Namespace) -> int:
    from pdgate.common.runtime import serve_until_signalled
    from pdgate.gateway.app import GatewayServer
    from pdgate.gateway.launcher import (
        default_config_path,
        describe,
        start_children,
        stop_children,
        wait_healthy,
    )

    path = args.config or str(default_config_path())
    try:
        config, gateway = _load(args, path)
    except (ConfigError, PluginConfigError, ValueError, OSError) as exc:
        print(f"pdgate up: {exc}", file=sys.stderr)
        return 2
    children = start_children(config)
    try:

        async def main() -> None:
            await wait_healthy(children)
            server = GatewayServer(gateway)
            await serve_until_signalled(server, lambda s: _started(describe(config, children, s.url)))

        run_async(main())
    except (RuntimeError, OSError) as exc:
        print(f"pdgate up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        stop_children(children)
    return 0
