"""The package as a user gets it: the wheel, a fresh install of it, and the editable checkout.

The wheel is built offline from a copy of the sources (``pip wheel --no-build-isolation``: setuptools
and wheel come with the test extra) and installed with ``--no-deps`` into a new virtual environment.
That environment sees this one's third-party packages through a ``.pth`` file naming a folder of
links to them, which leaves out everything of pdgate's own (the editable install's finder and
``.pth``, its dist-info): what the fresh install imports is the wheel's code and nothing else.
Everything is run from a working directory outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from support.ports import reserve_port, retry_on_port_clash
from support.procs import PdgateProcess, start_pdgate
from support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
LAYER_FOLDERS = {"pdgate", "gateway", "scheduler", "adapters", "engines", "loadgen", "configs"}
OWN_SITE_ENTRIES = ("pdgate", "__editable__", "_pdgate")  # pdgate's own files in this venv's site-packages


def packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` under the mapped roots, by the name it installs as."""
    found = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root)
            if "__pycache__" in relative.parts or any(part.startswith(".") for part in relative.parts):
                continue
            found.add(".".join([package, *relative.parts]))
    return found


def source_folder(package: str) -> Path:
    """The checkout's folder of a package, through the longest ``package-dir`` entry above it."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        mapped = SETUPTOOLS["package-dir"].get(".".join(parts[:n]))
        if mapped is not None:
            return REPO.joinpath(mapped, *parts[n:])
    raise AssertionError(f"{package} is under no package-dir entry")


def test_package_list_is_exactly_the_package_folders():
    assert set(SETUPTOOLS["package-dir"].values()) == LAYER_FOLDERS
    assert set(SETUPTOOLS["package-dir"]) == {"pdgate"} | {f"pdgate.{f}" for f in LAYER_FOLDERS - {"pdgate"}}
    listed = SETUPTOOLS["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    on_disk = packages_on_disk()
    assert set(listed) == on_disk, (
        f"missing from pyproject: {sorted(on_disk - set(listed))}; not on disk: {sorted(set(listed) - on_disk)}"
    )


# ------------------------------------------------------------------------ wheel + fresh venv
@dataclass
class Install:
    venv: Path
    wheel: Path
    workdir: Path  # outside the checkout, no configs/ in it
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def pdgate(self) -> str:
        return str(self.venv / "bin" / "pdgate")

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def python_c(self, code: str) -> subprocess.CompletedProcess:
        return self.run(self.python, "-c", code)


def clean_env(bin_dir: Path | None = None) -> dict[str, str]:
    """This environment without anything that would put the checkout or this venv on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PDGATE_"))}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def build_wheel(out: Path, scratch: Path) -> Path:
    """``pip wheel`` of a copy of the sources (building writes build/ and *.egg-info next to them)."""
    source = scratch / "pdgate-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in LAYER_FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
        timeout=240,
    )
    (wheel,) = out.glob("pdgate-*.whl")
    return wheel


def third_party_links(target: Path) -> Path:
    """A folder of links to this venv's site-packages entries, pdgate's own left out."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(OWN_SITE_ENTRIES) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Install:
    root = tmp_path_factory.mktemp("packaging")
    wheel = build_wheel(root / "dist", root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
        + ["--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "third_party.pth").write_text(f"{third_party_links(root / 'third-party')}\n")
    workdir = root / "work"
    workdir.mkdir()
    return Install(venv, wheel, workdir, clean_env(venv / "bin"))


def test_wheel_installs_only_under_pdgate(installed: Install):
    names = zipfile.ZipFile(installed.wheel).namelist()
    strays = [n for n in names if not (n.startswith("pdgate/") or n.split("/")[0].startswith("pdgate-"))]
    assert not strays, f"files outside pdgate/: {strays[:10]}"
    assert not any(n.split("/")[0] in LAYER_FOLDERS - {"pdgate"} for n in names)
    # every package and every file of package data is in it
    for package in SETUPTOOLS["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for package, patterns in SETUPTOOLS["package-data"].items():
        source = source_folder(package)
        for pattern in patterns:
            files = list(source.glob(pattern))
            assert files, f"{package}: nothing matches {pattern}"
            for file in files:
                assert f"{package.replace('.', '/')}/{file.relative_to(source)}" in names


def test_installed_console_script_and_imports(installed: Install):
    helped = installed.run(installed.pdgate, "up", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage: pdgate up" in helped.stdout and "--port" in helped.stdout
    probe = installed.python_c(
        "import pdgate, pdgate.gateway, pdgate.scheduler.framework, pdgate.engines.sim.server\n"
        "print(pdgate.__file__); print(pdgate.gateway.__file__); print(pdgate.scheduler.framework.__file__)"
    )
    assert probe.returncode == 0, probe.stderr
    site = str(installed.venv)
    assert all(line.startswith(site) for line in probe.stdout.split()), probe.stdout  # the wheel's code
    for layer in sorted(LAYER_FOLDERS - {"pdgate"}):
        missing = installed.python_c(f"import {layer}")
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, layer


def test_installed_package_data(installed: Install):
    probe = installed.python_c(
        "from importlib import resources\n"
        "from pdgate.gateway.config import GatewayConfig\n"
        "from pdgate.gateway.launcher import default_config_path\n"
        "path = default_config_path()\n"
        "config = GatewayConfig.load(str(path))\n"
        "print(path.resolve()); print(len(config.instances))\n"
        "profiles = resources.files('pdgate.common').joinpath('profiles')\n"
        "print(','.join(sorted(p.name for p in profiles.iterdir() if p.name.endswith('.json'))))\n"
    )
    assert probe.returncode == 0, probe.stderr
    path, instances, profiles = probe.stdout.split("\n")[:3]
    assert path.startswith(str(installed.venv)) and path.endswith("pdgate/configs/default.yaml")
    assert int(instances) == 4
    shipped = sorted(p.name for p in (REPO / "pdgate" / "common" / "profiles").glob("*.json"))
    assert shipped and profiles.split(",") == shipped


def fleet_from_packaged_default(installed: Install) -> Path:
    """The packaged default config, its engines moved to ports of their own (``pdgate up`` starts
    each engine on its URL's port, so they are chosen beforehand; the default's fixed ones may be
    in use by anything else on this machine)."""
    path = installed.python_c(
        "from pdgate.gateway.launcher import packaged_config; print(packaged_config('default.yaml'))"
    )
    config = yaml.safe_load(Path(path.stdout.strip()).read_text())
    for instance in config["instances"]:
        instance["url"] = f"http://127.0.0.1:{reserve_port()}"
        instance["kv_events"] = {"endpoint": f"tcp://127.0.0.1:{reserve_port()}"}
        instance["launch"]["time_scale"] = 10.0
    config["cost_model"] = {"dir": str(installed.workdir / "cost-model")}
    target = installed.workdir / "fleet.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def test_installed_pdgate_up_serves(installed: Install):
    def start() -> PdgateProcess:
        config = fleet_from_packaged_default(installed)
        return start_pdgate(
            "up",
            "--config",
            str(config),
            "--port",
            "0",
            program=[installed.pdgate],
            cwd=str(installed.workdir),
            env={**installed.env, "PDGATE_LOG_DIR": str(installed.workdir / "logs")},
            replace_env=True,
            timeout=60,
        )

    up = retry_on_port_clash(start)
    children: list[int] = []
    try:
        children = [int(line.split("(pid ")[1].rstrip(")\n")) for line in up.output if "(pid " in line]
        assert len(children) == 4

        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"{up.url}/ready", timeout=2).status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_until(ready, timeout=20, interval=0.1, message=lambda: f"{up.url}/ready\n{up.log}")
        client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["llama-3-8b"]
        reply = client.completions.create(
            model="llama-3-8b", prompt="Hello from the wheel", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == 4
        client.close()
    finally:
        code = up.stop(signal.SIGINT, timeout=30)
    assert code == 0, up.log
    for pid in children:  # Ctrl-C stopped every engine it started
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------------------- editable install
def test_editable_install_imports_from_anywhere(tmp_path):
    env = clean_env()
    code = (
        "import pdgate.gateway.proxy, pdgate.engines.sim.server\n"
        "print(pdgate.gateway.proxy.__file__); print(pdgate.engines.sim.server.__file__)"
    )
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    proxy, sim = probe.stdout.split()
    assert Path(proxy) == REPO / "gateway" / "proxy.py" and Path(sim) == REPO / "engines" / "sim" / "server.py"
    bare = subprocess.run(
        [sys.executable, "-c", "import gateway"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bare.returncode != 0 and "No module named 'gateway'" in bare.stderr
