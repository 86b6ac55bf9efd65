"""``cladnet policy`` and ``cladnet tag``: a network's access policy and hosts' tags."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from cladnet import policy as acl
from cladnet.api_client import SyncClient
from cladnet.api_client import endpoints as ep
from cladnet.cli.api import CliError

policy_app = typer.Typer(
    help="A network's access policy (YAML or JSON files).", no_args_is_help=True
)
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _api() -> SyncClient:
    from cladnet.cli import controller

    return controller()


def load(path: Path) -> dict[str, Any]:
    """A policy document from a YAML or JSON file (JSON is YAML), checked locally first."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not YAML or JSON: {exc}".replace("\n", " ")) from None
    try:
        acl.parse(doc)
    except acl.PolicyError as exc:
        raise CliError(f"{path}: {exc}") from None
    assert isinstance(doc, dict)  # parse accepts objects only
    return doc


def _text(doc: dict[str, Any]) -> list[str]:
    return yaml.safe_dump(doc, sort_keys=True, allow_unicode=True).splitlines(keepends=True)


def _header(body: dict[str, Any]) -> str:
    kind = "default, allows everything" if body["default"] else f"version {body['version']}"
    if not body["default"] and body["allows_all"]:
        kind += ", allows everything"
    return f"# network {body['network_id']}: policy {kind}\n"


@policy_app.command("get")
def policy_get(network: str, as_json: Json = False) -> None:
    """Show the policy (a new network's is the explicit allow-all default)."""
    body = _api().call(ep.POLICY, ref=network)
    if as_json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        print(_header(body) + "".join(_text(body["policy"])), end="")


@policy_app.command("set")
def policy_set(
    network: str,
    file: Path,
    if_version: Annotated[
        int | None, typer.Option(help="refuse if the policy is no longer at this version")
    ] = None,
    as_json: Json = False,
) -> None:
    """Replace the policy; refused (nothing written) if one of its tests fails."""
    params = {"if_version": if_version} if if_version is not None else {}
    body = _api().call(ep.POLICY_PUT, load(file), query=params, ref=network)
    if as_json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        print(f"policy of {network} is now version {body['version']}")


@policy_app.command("test")
def policy_test(network: str, file: Path, as_json: Json = False) -> None:
    """Check a policy file and run its tests against the network's hosts; write nothing."""
    body = _api().call(ep.POLICY_TEST, load(file), ref=network)
    if as_json:
        print(json.dumps(body, indent=2, sort_keys=True))
    elif body["passed"]:
        print("all tests pass")
    else:
        for failure in body["failures"]:
            print(f"FAIL {failure}")
    if not body["passed"]:
        raise typer.Exit(1)


@policy_app.command("diff")
def policy_diff(network: str, file: Path) -> None:
    """What ``set FILE`` would change (exit 1 if anything)."""
    current = _api().call(ep.POLICY, ref=network)
    wanted = acl.to_doc(acl.parse(load(file)))
    lines = list(
        difflib.unified_diff(
            _text(current["policy"]),
            _text(wanted),
            f"{network} (version {current['version']})",
            str(file),
        )
    )
    print("".join(lines), end="")
    if lines:
        raise typer.Exit(1)


@policy_app.command("check")
def policy_check(
    network: str,
    src: Annotated[str, typer.Argument(help="source host name")],
    dst: Annotated[str, typer.Argument(help="destination host name")],
    proto: Annotated[str, typer.Option(help="tcp, udp or icmp")] = "tcp",
    port: Annotated[int | None, typer.Option(help="destination port (tcp, udp)")] = None,
    as_json: Json = False,
) -> None:
    """Which rule allows SRC to open a connection to DST, or that none does (exit 1)."""
    api = _api()
    current = api.call(ep.POLICY, ref=network)
    hosts = {h["name"]: h for h in api.call(ep.NETWORK_HOSTS, ref=network)}
    for name in (src, dst):
        if name not in hosts:
            raise CliError(f"no host {name!r} in {network}")
    if proto not in ("tcp", "udp", "icmp") or (proto != "icmp" and port is None):
        raise CliError("give --proto tcp|udp with --port N, or --proto icmp")
    decision = acl.evaluate(acl.parse(current["policy"]), hosts[src], hosts[dst], proto, port)
    if as_json:
        print(json.dumps({"allowed": decision.allowed, "rule": decision.rule}))
    else:
        print(f"{src} → {dst} {proto}{'' if port is None else f':{port}'}: {decision.reason}")
    if not decision.allowed:
        raise typer.Exit(1)


@policy_app.command("explain")
def policy_explain(
    network: str,
    src: Annotated[str, typer.Argument(help="a host name or id")],
    dst: Annotated[str, typer.Argument(help="a host name or id")],
    proto: Annotated[str | None, typer.Option(help="tcp, udp or icmp (default: any flow)")] = None,
    port: Annotated[int | None, typer.Option(help="destination port (tcp, udp)")] = None,
    as_json: Json = False,
) -> None:
    """Why SRC and DST may or may not talk, each way: the rules that allow it (or the
    default deny), whether they stay peers, and the path each way (the controller says)."""
    query = {"src": src, "dst": dst, "proto": proto, "port": port}
    body = _api().call(ep.POLICY_EXPLAIN, query=query, ref=network)
    if as_json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return
    what = (proto or "any") + ("" if port is None else f":{port}")
    version = "default" if body["default"] else f"version {body['version']}"
    print(f"policy {version} of {network}, {what}:")
    for key, a, b in (("forward", body["src"], body["dst"]), ("reverse", body["dst"], body["src"])):
        verdict = body[key]
        also = [r["index"] for r in verdict["rules"][1:]]
        more = f"; also rule {', '.join(map(str, also))}" if also else ""
        print(f"  {a} → {b}: {verdict['reason']}{more} [path {body['path'][key]}]")
    peers = "yes" if body["peers"] else "no (no flow either way: not in each other's lists)"
    print(f"  peers: {peers}")


def tag(
    host: Annotated[str, typer.Argument(help="host name or id")],
    tags: Annotated[list[str] | None, typer.Argument(help="its tags (none: remove all)")] = None,
    network: Annotated[
        str | None, typer.Option(help="the host's network, when its name is in several")
    ] = None,
) -> None:
    """Set a host's tags (admins only; a host cannot tag itself). Policies trust tags."""
    from cladnet.cli.hosts import find_host

    api = _api()
    found = find_host(api, host, network)
    wanted: ep.TagsBody = {"tags": tags or []}
    body = api.call(ep.HOST_TAGS, wanted, host_id=found["id"])
    print(f"{body['name']}: tags {', '.join(body['tags']) or '(none)'}")
