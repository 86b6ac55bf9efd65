"""``cladnet group``: groups of VMs the controller provisions through its drivers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from cladnet.api_client import SyncClient
from cladnet.api_client import endpoints as ep
from cladnet.cli.api import CliError

group_app = typer.Typer(
    help="Groups of VMs made by the controller's drivers.", no_args_is_help=True
)
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Wait = Annotated[bool, typer.Option("--wait", help="until no VM is in a transitional state")]
SETTLED = {"Running", "Suspended", "Terminated", "Failed"}


def _api() -> SyncClient:
    from cladnet.cli import controller

    return controller()


def _member(text: str) -> dict[str, Any]:
    """``driver:region[:count]`` → a group member."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise CliError(f"--member {text!r}: expected DRIVER:REGION[:COUNT]")
    try:
        count = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise CliError(f"--member {text!r}: COUNT must be a number") from None
    return {"driver": parts[0], "region": parts[1], "count": count}


def _show(group: dict[str, Any], as_json: bool) -> None:
    from cladnet.cli import _table, out

    if as_json:
        print(json.dumps(group, indent=2, sort_keys=True))
        return
    counts = ", ".join(f"{n} {s}" for s, n in sorted(group["counts"].items()))
    columns = ["VM", "DRIVER", "REGION", "STATE", "PRIVATE", "PUBLIC", "OVERLAY", "ERROR"]
    rows = [
        [vm["name"], vm["driver"], vm["region"], vm["state"]]
        + [vm[k] or "-" for k in ("private_ip", "public_ip", "overlay_ip")]
        + [vm.get("error") or ""]
        for vm in group["vms"]
    ]
    title = f"group {group['name']}: {group['state']} ({counts or 'no VMs'})"
    out.print(_table(title, columns, rows, drop=("DRIVER", "PRIVATE", "REGION", "PUBLIC")))


def find(api: SyncClient, name: str) -> dict[str, Any] | None:
    """The group called ``name``, or None (a GET of a missing group is an error)."""
    return next((g for g in api.call(ep.GROUPS) if g["name"] == name), None)


def _settle(name: str, until_gone: bool = False, timeout: float = 600) -> dict[str, Any] | None:
    """Poll until no VM is transitional (or, ``until_gone``, the group is removed)."""
    api = _api()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        group = find(api, name)
        if until_gone:
            if group is None:
                return None
        elif group is not None and all(vm["state"] in SETTLED for vm in group["vms"]):
            return group
        time.sleep(1)
    raise CliError(f"group {name!r} did not settle within {timeout:.0f}s")


@group_app.command("create")
def create(
    name: str,
    member: Annotated[
        list[str], typer.Option(help="DRIVER:REGION[:COUNT], repeatable (e.g. local:a-west:2)")
    ],
    cidr: Annotated[
        str | None, typer.Option(help="the group's network (default: recommended)")
    ] = None,
    allow_commands: Annotated[
        bool,
        typer.Option(
            "--allow-commands",
            help="its VMs run 'cladnet group exec' commands as root (off unless given)",
        ),
    ] = False,
    wait: Wait = False,
    as_json: Json = False,
) -> None:
    """Create a group: its network, a one-use join token per VM, the VMs."""
    body: dict[str, Any] = {"name": name, "members": [_member(m) for m in member]}
    if cidr:
        body["cidr"] = cidr
    if allow_commands:
        body["allow_commands"] = True
    group = _api().call(ep.GROUP_CREATE, body)
    _show(_settle(name) if wait else group, as_json)  # type: ignore[arg-type]


@group_app.command("list")
def list_groups(as_json: Json = False) -> None:
    """Groups with their derived state."""
    from cladnet.cli import _table, out

    groups = _api().call(ep.GROUPS)
    if as_json:
        print(json.dumps(groups, indent=2, sort_keys=True))
        return
    rows = [
        [
            g["name"],
            g["state"],
            ", ".join(f"{n} {s}" for s, n in sorted(g["counts"].items())),
            g["network"],
        ]
        for g in groups
    ]
    out.print(_table("groups", ["GROUP", "STATE", "VMS", "NETWORK"], rows, drop=("NETWORK",)))


@group_app.command("show")
def show(name: str, as_json: Json = False) -> None:
    """Every VM of a group: state, addresses, the last error."""
    _show(_api().call(ep.GROUP, name=name), as_json)


def _action(action: str) -> Callable[..., None]:
    def command(
        name: str,
        vm: Annotated[str | None, typer.Option(help="only this VM")] = None,
        wait: Wait = False,
        as_json: Json = False,
    ) -> None:
        body: ep.ActionBody = {"action": action}
        if vm:
            group = _api().call(ep.VM_ACTION, body, name=name, vm=vm)
        else:
            group = _api().call(ep.GROUP_ACTION, body, name=name)
        _show(_settle(name) if wait else group, as_json)  # type: ignore[arg-type]

    command.__doc__ = f"{action.capitalize()} the group's VMs (or one, --vm) where it applies."
    return command


for _name in ("suspend", "resume", "reboot", "terminate", "retry"):
    group_app.command(_name)(_action(_name))


@group_app.command("delete")
def delete(name: str, wait: Wait = False) -> None:
    """Terminate every VM, then remove the group and its network."""
    from cladnet.cli import out

    _api().call(ep.GROUP_DELETE, name=name)
    if wait:
        _settle(name, until_gone=True)
    out.print(f"group {name} {'deleted' if wait else 'being deleted'}")


@group_app.command("exec")
def exec_command(
    name: str,
    command: Annotated[str, typer.Argument(help="shell command, run with /bin/sh -c on each VM")],
    timeout: Annotated[float, typer.Option(help="seconds per VM before it is killed")] = 60,
    as_json: Json = False,
) -> None:
    """Run a command on every VM of a group through its agent; exit 1 if any VM failed."""
    from cladnet.cli import out

    api = _api()
    run = api.call(ep.GROUP_COMMAND, {"command": command, "timeout": timeout}, name=name)
    deadline = time.monotonic() + timeout + 120
    while any(vm["state"] in ("pending", "running") for vm in run["vms"].values()):
        if time.monotonic() > deadline:
            raise CliError(f"command {run['id']} did not finish on every VM")
        time.sleep(1)
        run = api.call(ep.GROUP_COMMAND_RUN, name=name, command_id=run["id"])
    if as_json:
        print(json.dumps(run, indent=2, sort_keys=True))
    else:
        for vm, result in sorted(run["vms"].items()):
            code = result["exit_code"]
            colour = "green" if result["state"] == "done" and code == 0 else "red"
            detail = f"exit {code}" if code is not None else result.get("error") or ""
            out.print(f"[{colour}]== {vm}: {result['state']} {detail}[/]")
            for stream in ("stdout", "stderr"):
                if result[stream]:
                    out.print(result[stream].rstrip("\n"), markup=False, highlight=False)
    if any(r["state"] != "done" or r["exit_code"] != 0 for r in run["vms"].values()):
        raise typer.Exit(1)
