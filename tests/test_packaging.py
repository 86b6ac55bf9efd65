"""Installs by role, for real: wheels of every role built by pip through its configured
index (here: the local mirrors), then one fresh venv per role with ``cladnet[ROLE]``
installed from those wheels alone (no index). Each role's modules import with only its
set, and the agent's install carries none of the server, etcd, gRPC or CLI libraries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.components import REPO

ROLES = ("agent", "controller", "collector", "cli", "relay")
# What an agent never needs (its VM runs none of the services, nor the operator's CLI).
NOT_IN_AGENT = set(
    "fastapi uvicorn starlette pydantic aetcd grpcio protobuf prometheus-client typer rich click "
    "pygments pyyaml boto3".split()
)
# The modules of each role, imported one by one in its venv; (packages, left out).
MODULES = {
    # agent.relay is the relay's; cladnet.cli the CLI's; cladnet.models the controller's
    # wire format (pydantic).
    "agent": (["agent", "cladnet"], ["agent.relay", "cladnet.cli", "cladnet.models"]),
    # The ec2 driver is its own extra (boto3), loaded by name only when configured.
    "controller": (["controller"], ["controller.drivers.ec2"]),
    "collector": (["collector"], []),
    "cli": (["cladnet.cli"], ["cladnet.cli.__main__"]),  # __main__ runs the CLI
    "relay": (["agent.relay"], []),
}
IMPORT_ALL = """
import importlib, importlib.util, json, sys
from pathlib import Path
packages, left_out = json.loads(sys.argv[1])
failed = {}
for package in packages:
    spec = importlib.util.find_spec(package)
    is_package = spec.submodule_search_locations is not None
    root = Path(spec.origin).parents[package.count(".") + is_package]
    files = sorted(Path(spec.origin).parent.rglob("*.py")) if is_package else [Path(spec.origin)]
    for f in files:
        name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if any(name == x or name.startswith(x + ".") for x in left_out):
            continue
        try:
            importlib.import_module(name)
        except BaseException as e:  # SystemExit too: the CLI's own message
            failed[name] = repr(e)
print(json.dumps(failed))
"""


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    """Outside the checkout, so ``python -c`` imports only what the venv installed."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/", **kw)


def output(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def offline_env() -> dict[str, str]:
    """No pip configuration at all: this machine's names the local indexes."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return clean | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of every role, with the versions this venv runs pinned; pip's cache in the
    test's tmp dir (the build and each role's install share it)."""
    out = tmp_path_factory.mktemp("wheels")
    pins = out.parent / "constraints.txt"
    freeze = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"]).stdout
    pins.write_text("\n".join(x for x in freeze.splitlines() if "==" in x) + "\n")
    env = {**os.environ, "PIP_CONSTRAINT": str(pins), "PIP_CACHE_DIR": str(out.parent / "cache")}
    roles = ",".join(ROLES)
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(out)]
    r = run([*cmd, f"{REPO}[{roles}]"], timeout=900, env=env)
    assert r.returncode == 0, output(r)
    return out


def install(role: str, wheels: Path, venv: Path) -> Path:
    """A fresh venv with ``cladnet[role]`` from ``wheels`` alone; its interpreter."""
    r = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, output(r)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    r = run(
        [*pip, "install", "--quiet", "--no-index", "--find-links", str(wheels), f"cladnet[{role}]"],
        env=offline_env(),
    )
    assert r.returncode == 0, output(r)
    r = run([*pip, "check"], env=offline_env())
    assert r.returncode == 0, output(r)
    return python


def installed(python: Path) -> set[str]:
    """The distributions in a venv, by normalised name."""
    code = "import json, importlib.metadata as m; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"  # noqa: E501
    r = run([str(python), "-c", code])
    assert r.returncode == 0, output(r)
    return {re.sub(r"[-_.]+", "-", n).lower() for n in json.loads(r.stdout)}


@pytest.fixture(scope="module")
def agent_python(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install("agent", wheels, tmp_path_factory.mktemp("agent") / "venv")


def test_agent_install_runs_without_server_or_cli_libraries(agent_python: Path) -> None:
    """cladnet[agent] alone: the agent runs, its kernel backend's pyroute2 imports, and
    none of FastAPI, uvicorn, aetcd, gRPC, typer or rich is there."""
    bin_dir = agent_python.parent
    r = run([str(bin_dir / "cladnet-agent"), "--help"])
    assert r.returncode == 0 and "join" in r.stdout, output(r)
    code = "import agent.daemon, agent.main, pyroute2; print(agent.__file__)"
    r = run([str(agent_python), "-c", code])
    assert r.returncode == 0 and r.stdout.startswith(str(bin_dir.parent)), output(r)
    dists = installed(agent_python)
    assert "cladnet" in dists and {"pyroute2", "psutil", "aiomqtt", "httpx"} <= dists
    assert not dists & NOT_IN_AGENT, dists & NOT_IN_AGENT


@pytest.mark.parametrize(
    ("program", "extra"),
    [
        ("cladnet", "cli"),
        ("cladnet-controller", "controller"),
        ("cladnet-collector", "collector"),
        ("cladnet-relay", "relay"),
    ],
)
def test_other_roles_programs_in_an_agent_install_name_their_extra(
    agent_python: Path, program: str, extra: str
) -> None:
    """Every script is installed with every role: without its extra it says which
    install it needs, in one line, not an import traceback."""
    r = run([str(agent_python.parent / program), "--help"])
    assert r.returncode != 0 and f"pip install 'cladnet[{extra}]'" in r.stderr, output(r)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, output(r)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_imports_with_only_its_set(
    role: str, wheels: Path, agent_python: Path, tmp_path: Path
) -> None:
    """Every module of a role imports in a venv holding only ``cladnet[role]``: no
    module of it needs another role's dependency."""
    python = agent_python if role == "agent" else install(role, wheels, tmp_path / "venv")
    r = run([str(python), "-c", IMPORT_ALL, json.dumps(MODULES[role])])
    assert r.returncode == 0, output(r)
    assert json.loads(r.stdout) == {}
