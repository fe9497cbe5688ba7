"""``pdgate engine sim``: start one simulated engine."""

from __future__ import annotations

import argparse
import ssl
import sys
from typing import Any

from pydantic import ValidationError

from pdgate.common.kv_events import engine_binds
from pdgate.common.tls import ServerTlsFiles, TlsError, server_context
from pdgate.engines.flags import add_model_flags, model_from_args
from pdgate.engines.sim.config import SimEngineConfig

SIM_DESCRIPTION = """\
Start one simulated LLM engine: an HTTP server that speaks vLLM's (or SGLang's) OpenAI API,
runs a vLLM-v1-like step loop (chunked prefill, paged prefix cache, preemption, priorities)
and takes as long per step as a real GPU would, from profiles calibrated on measured kernels.
With no flags it starts a colocated vLLM-flavour H100 / Llama-3-8B engine on 127.0.0.1:8100.
Flags override values from --config FILE (YAML with the same names, snake_case).
"""


def add_sim_command(kinds: argparse._SubParsersAction) -> None:
    sim = kinds.add_parser(
        "sim",
        help="the embedded simulated engine (no GPU needed)",
        description=SIM_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--config", metavar="FILE", help="YAML file of engine settings")
    add_model_flags(sim, SimEngineConfig)
    tls = sim.add_argument_group("TLS (vLLM's flag names)")
    tls.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this PEM certificate chain")
    tls.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's unencrypted PEM private key")
    tls.add_argument(
        "--ssl-ca-certs", metavar="FILE", help="require client certificates signed by this PEM CA bundle (mTLS)"
    )
    sim.set_defaults(run=run_sim)


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The HTTPS context the TLS flags ask for (None: plain HTTP); :class:`TlsError` when they are incomplete
    or a file does not load."""
    if args.ssl_certfile is None and args.ssl_keyfile is None:
        if args.ssl_ca_certs is not None:
            raise TlsError("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile")
        return None
    if args.ssl_certfile is None or args.ssl_keyfile is None:
        raise TlsError("--ssl-certfile and --ssl-keyfile go together: give both")
    files = ServerTlsFiles(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs)
    return server_context(files, require_client_cert=args.ssl_ca_certs is not None)


def run_sim(args: argparse.Namespace) -> int:
    from pdgate.common.runtime import run_async, serve_until_signalled
    from pdgate.engines.sim.server import SimServer

    try:
        config = model_from_args(SimEngineConfig, args, args.config)
        server = SimServer(config, ssl_context=_ssl_context(args))
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
        # the addresses bound, not the ones asked for: port 0 and ``tcp://host:*`` pick free ports
        if server.bootstrap_port is not None:
            print(f"  sglang bootstrap server on {config.host}:{server.bootstrap_port}", flush=True)
        publisher = st.publisher
        if publisher is not None:
            replay = f" replay={publisher.replay_address}" if publisher.replay_address else ""
            binds = engine_binds(config.kv_events_endpoint or "")
            mode = "bound: gateways connect" if binds else "connected: one gateway binds it"
            print(
                f"  KV events -> {publisher.pub_address} topic={config.kv_events_topic!r}{replay} ({mode})",
                flush=True,
            )

    try:
        run_async(serve_until_signalled(server, ready))
    except OSError as exc:
        print(f"pdgate engine sim: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
