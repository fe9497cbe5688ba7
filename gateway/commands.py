"""``pdgate serve`` and ``pdgate up``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from typing import Any

import zmq

from pdgate.common.runtime import run_async
from pdgate.gateway.config import ConfigError, GatewayConfig
from pdgate.scheduler.registry import PluginConfigError

SERVE_HELP = """\
Run the gateway over the fleet described in a YAML config (instances: url, kind, role, model,
optional API key, KV-events endpoint). The engines must already be running; see
configs/*.yaml for examples and `pdgate up` to start a simulated fleet too.

--workers N (default: the number of cores, or PDGATE_WORKERS) runs N gateway processes on one
address, sharing the fleet's state through NATS (sharing.nats_url, or a NATS server started as a
child); one worker is a single process sharing nothing unless sharing.nats_url is set.

The fleet may change while it serves: SIGHUP reads the config again and applies its instances
(new ones added, missing ones drained and removed, changed ones replaced; other settings need a
restart), and the admin API adds (POST /admin/instances) and removes (DELETE
/admin/instances/ID) instances.
"""

UP_HELP = """\
The one-command embedded default: start the simulated engines of a fleet config as child
processes (default configs/default.yaml: two prefill and two decode engines), wait until they
are healthy, then serve the gateway on the config's address (127.0.0.1:8000) with --workers
processes (and a NATS server for them when there are several). Ctrl-C or SIGTERM stops the
gateway and every child cleanly.
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
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gateway processes on one address (default: PDGATE_WORKERS, else the number of cores "
        "when the replicas extra is installed and sharing is enabled, else 1)",
    )
    # set by a supervisor for the workers it starts
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replica-id", help=argparse.SUPPRESS)
    parser.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
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
    if args.replica_id:
        config = config.model_copy(
            update={"sharing": config.sharing.model_copy(update={"replica_id": args.replica_id})}
        )
    return config


def _worker_count(args: argparse.Namespace, config: GatewayConfig) -> int:
    """``--workers``, else ``PDGATE_WORKERS``, else every core when workers can share state, else 1."""
    from pdgate.gateway.local_nats import replicas_installed
    from pdgate.gateway.workers import WORKERS_ENV, default_workers

    if args.worker_of is not None:
        return 1
    if args.workers is not None:
        count = args.workers
    elif os.environ.get(WORKERS_ENV) or (config.sharing.enabled and replicas_installed()):
        count = default_workers()
    else:
        count = 1
    if count < 1:
        raise ValueError(f"--workers must be at least 1, not {count}")
    binding = [i.spec().id for i in config.instances if i.kv_events is not None and not i.kv_events.engine_binds]
    if count > 1 and binding:
        raise ValueError(
            f"{count} workers cannot all bind the KV-event endpoints of {', '.join(binding)}: "
            "give those engines an endpoint they bind (tcp://*:PORT), or run one worker"
        )
    return count


def run_serve(args: argparse.Namespace) -> int:
    from pdgate.common.runtime import serve_until_signalled
    from pdgate.gateway.launcher import describe
    from pdgate.gateway.server import GatewayServer
    from pdgate.gateway.workers import end_with_parent

    try:
        config, gateway = _load(args, args.config)
        workers = _worker_count(args, config)
    except (ConfigError, PluginConfigError, ValueError, OSError) as exc:
        print(f"pdgate serve: {exc}", file=sys.stderr)
        return 2
    try:
        if workers > 1:
            run_async(_serve_workers(args, config, args.config, workers, []))
            return 0
        if args.worker_of is not None:
            end_with_parent(args.worker_of)
        server = GatewayServer(
            gateway, reload_config=lambda: _read_config(args, args.config), reuse_port=args.reuse_port
        )

        def ready(s: GatewayServer) -> None:
            banner = describe(config, [], s.url)
            _started(banner.split("\n", 1)[0] if args.worker_of is not None else banner)  # a worker: one line

        run_async(serve_until_signalled(server, ready, on_hangup=GatewayServer.reload))
    except (RuntimeError, OSError, zmq.ZMQError) as exc:
        print(f"pdgate serve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_workers(
    args: argparse.Namespace, config: GatewayConfig, path: str, count: int, children: list[Any]
) -> None:
    """Serve with ``count`` worker processes (and a local NATS server for them when none is
    configured) until SIGINT/SIGTERM."""
    import logging

    from pdgate.common.runtime import serve_until_signalled
    from pdgate.gateway.launcher import describe
    from pdgate.gateway.local_nats import LocalNats
    from pdgate.gateway.workers import WorkerPool

    nats: LocalNats | None = None
    env: dict[str, str] = {}
    if not config.sharing.enabled:
        logging.getLogger("pdgate.workers").warning(
            "%d workers with sharing disabled: each sees only its own in-flight load", count
        )
    elif config.sharing.url() is None:
        nats = LocalNats()
        try:
            env["PDGATE_NATS_URL"] = await nats.start()
        except BaseException:
            nats.stop()
            raise
    shared_through = config.sharing.url() or env.get("PDGATE_NATS_URL")

    def worker_argv(index: int, port: int) -> list[str]:
        argv = [sys.executable, "-m", "pdgate.cli", "serve", "--config", path, "--workers", "1", "--reuse-port"]
        argv += ["--worker-of", str(os.getpid()), "--host", config.host, "--port", str(port)]
        if config.sharing.replica_id:
            argv += ["--replica-id", f"{config.sharing.replica_id}-{index}"]
        for flag, value in (("--log-level", args.log_level), ("--log-format", args.log_format)):
            if value is not None:
                argv += [flag, value]
        if args.access_log:
            argv.append("--access-log")
        return argv

    def ready(pool: WorkerPool) -> None:
        banner = describe(config, children, pool.url).split("\n")
        sharing = f"sharing through NATS at {shared_through}" if shared_through else "sharing nothing"
        if nats is not None:
            sharing += " (a child of this process)"
        banner.insert(1, f"  {count} workers (pids {', '.join(map(str, pool.pids))}), {sharing}")
        _started("\n".join(banner))

    scheme = "https" if config.tls.files() is not None else "http"
    pool = WorkerPool(
        count, config.host, config.port, worker_argv, env=env, scheme=scheme, stop_grace_s=config.shutdown.total_s
    )
    supervising = asyncio.create_task(nats.supervise(), name="local-nats") if nats is not None else None
    try:
        await serve_until_signalled(pool, ready, on_hangup=WorkerPool.reload)
    finally:
        if supervising is not None:
            supervising.cancel()
            await asyncio.gather(supervising, return_exceptions=True)
        if nats is not None:
            nats.stop()


def _started(banner: str) -> None:
    """The gateway is serving: say so, and move everything loaded so far (tokenizers, models,
    config) out of the garbage collector's way, so that a full collection does not pause every
    stream for tens of milliseconds (measured: ~76 ms on the 2-core box, benchmarks/migration.py)."""
    print(banner, flush=True)
    gc.collect()
    gc.freeze()


def run_up(args: argparse.Namespace) -> int:
    from pdgate.common.runtime import serve_until_signalled
    from pdgate.gateway.launcher import (
        default_config_path,
        describe,
        start_children,
        stop_children,
        wait_healthy,
    )
    from pdgate.gateway.server import GatewayServer

    path = args.config or str(default_config_path())
    try:
        config, gateway = _load(args, path)
        workers = _worker_count(args, config)
    except (ConfigError, PluginConfigError, ValueError, OSError) as exc:
        print(f"pdgate up: {exc}", file=sys.stderr)
        return 2
    children = start_children(config)
    try:

        async def main() -> None:
            await wait_healthy(children, upstream_tls=config.upstream_tls.files())
            if workers > 1:
                await _serve_workers(args, config, path, workers, children)
                return
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
