"""CLI contexts, like kubectl's: ``~/.config/cladnet/config.toml`` (0600).

    current = "prod"
    [contexts.prod]
    controller = "https://ctl:8470"
    collector = "http://col:8471"
    token = "cla_…"
    ca_pem = "-----BEGIN CERTIFICATE-----\n…"   # the pinned cluster CA (cladnet login --ca-hash)

Environment variables win: CLADNET_CONTROLLER, CLADNET_COLLECTOR, CLADNET_TOKEN,
CLADNET_CONTEXT (which context to use).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cladnet.files import write_atomic


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cladnet" / "config.toml"


@dataclass
class Context:
    name: str
    controller: str | None = None
    collector: str | None = None
    token: str | None = None
    ca_pem: str | None = None  # the controller's CA; None: the system's CAs


def load() -> dict:
    path = config_path()
    if not path.exists():
        return {"current": None, "contexts": {}}
    with path.open("rb") as f:
        data = tomllib.load(f)
    data.setdefault("contexts", {})
    data.setdefault("current", None)
    return data


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def save(data: dict) -> Path:
    """Write the config (mode 0600, created so)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = []
    if data.get("current"):
        lines.append(f"current = {_toml_str(data['current'])}")
    for name, ctx in sorted(data["contexts"].items()):
        lines.append(f"\n[contexts.{_toml_str(name)}]")
        for key in ("controller", "collector", "token", "ca_pem"):
            if ctx.get(key):
                lines.append(f"{key} = {_toml_str(ctx[key])}")
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def resolve(name: str | None = None) -> Context:
    """The context to use: ``name`` / CLADNET_CONTEXT / current, then env overrides."""
    data = load()
    name = name or os.environ.get("CLADNET_CONTEXT") or data.get("current") or "default"
    stored = data["contexts"].get(name, {})
    env = os.environ
    controller = env.get("CLADNET_CONTROLLER") or stored.get("controller")
    return Context(
        name=name,
        controller=controller,
        collector=env.get("CLADNET_COLLECTOR") or stored.get("collector"),
        token=env.get("CLADNET_TOKEN") or stored.get("token"),
        # The pinned CA belongs to the controller it was pinned for.
        ca_pem=stored.get("ca_pem") if controller == stored.get("controller") else None,
    )
