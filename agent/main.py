"""``cladnet-agent``: join a network and keep its WireGuard mesh; run; leave; status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import firewall
from agent.metrics.spool import spool_dir, spool_status
from agent.state import Membership, StateDir
from agent.wireguard.backend import WireGuardBackend
from cladnet import mesh
from cladnet.tasks import cancel_and_wait

if TYPE_CHECKING:
    from cladnet.api_client import AsyncClient
    from cladnet.api_client.endpoints import Joined

log = logging.getLogger("cladnet.agent")

DEFAULT_STATE_DIR = "/var/lib/cladnet"
TOKEN_ENV = "CLADNET_JOIN_TOKEN"


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--label needs key=value, got {item!r}")
        labels[key] = value
    return labels


def interface_name(network_name: str) -> str:
    """``cl-<network>``, cut to Linux's 15-character limit."""
    return ("cl-" + re.sub(r"[^a-zA-Z0-9-]", "", network_name))[:15]


def _backend(force: str | None) -> WireGuardBackend:
    from agent.wireguard import choose_backend

    return choose_backend(force)


async def _run_networks(
    states: StateDir,
    backend_name: str | None,
    only: list[str] | None = None,
    metrics_listen: str | None = None,
    allow_commands: bool = False,
    in_process_commands: bool = True,
    tune_host: bool = False,
) -> int:
    from agent import tuning
    from agent.daemon import NetworkAgent
    from agent.metrics.exposition import MetricsServer

    ids = only or states.network_ids()
    if not ids:
        raise UsageError(f"no joined network in {states.root}; run 'cladnet-agent join' first")
    # Before the devices are made: a new device's socket gets the raised default size.
    if tune_host:
        tuning.tune(states.root)
    else:  # the switch was turned off: put back what a tuned run changed
        tuning.restore(states.root)
    server = None
    if metrics_listen:
        host, _, port = metrics_listen.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--metrics-listen needs HOST:PORT, got {metrics_listen!r}")
        server = MetricsServer(host.strip("[]"), int(port))
        serving = asyncio.create_task(server.run(), name="metrics-server")
    agents = []
    for net_id in ids:
        membership, credential, private_key = states.load(net_id)
        membership.allow_commands = membership.allow_commands or allow_commands
        if not in_process_commands:  # cladnet-agent-commands.service runs them
            membership.allow_commands = False
        backend = _backend(backend_name or membership.backend)
        agents.append(
            NetworkAgent(
                states,
                membership,
                credential,
                private_key,
                backend,
                metrics_server=server,
                tune_host=tune_host,
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runs = [asyncio.create_task(a.run()) for a in agents]
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*runs, stopper], return_when=asyncio.FIRST_COMPLETED)
    # On a signal the interfaces stay up: a restart must not interrupt traffic.
    if server is not None:
        runs.append(serving)
    await cancel_and_wait(runs)
    return 0


def join_token(args: argparse.Namespace) -> str:
    """The join token from ``--token-file`` or ``$CLADNET_JOIN_TOKEN``, never from argv
    (anyone on the host can read a command line in ``ps``)."""
    if args.legacy_token is not None:  # not echoed: it is a secret
        raise UsageError(
            f"--token is not accepted (it shows in ps): set {TOKEN_ENV} or use --token-file"
        )
    # Out of our environment either way: wireguard-go and remote commands inherit it.
    from_env = os.environ.pop(TOKEN_ENV, "").strip()
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from exc
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty")
        return token
    if not from_env:
        raise UsageError(f"no join token: set {TOKEN_ENV} or use --token-file FILE")
    return from_env


async def _join_or_rejoin(
    client: AsyncClient, token: str, states: StateDir, fields: dict[str, Any], new_key: str
) -> tuple[Joined, str]:
    """Join, and the private key joined with. A host that already has state for the
    token's network re-joins as itself with a proof of its saved key (same key, IP and
    name); otherwise ``new_key`` joins as a new host. Safe to retry with the same
    ``new_key``: a join that went through but whose answer was lost is proven, not
    repeated."""
    from cladnet.api_client import ApiClientError
    from cladnet.keys import public_key_of

    urls = set(client.urls)
    for net_id in states.network_ids():
        membership, _, saved = states.load(net_id)
        # Only the controller that key belongs to is asked to challenge it.
        if urls & {u.strip().rstrip("/") for u in membership.controller.split(",")}:
            result = await client.rejoin(token, saved, **fields)
            if result is not None:
                return result, saved
    try:
        return await client.join(token, public_key=public_key_of(new_key), **fields), new_key
    except ApiClientError as exc:
        # A retried join whose first answer was lost: the host exists, with this very
        # key (key_in_use), or it used up a one-use token (token_exhausted) as a group's
        # VM has. Either way the key's proof re-joins it; a used-up token with an unknown
        # key stays refused.
        if exc.code not in ("key_in_use", "token_exhausted"):
            raise
        result = await client.rejoin(token, new_key, **fields)
        if result is None:
            raise
        return result, new_key


async def cmd_join(args: argparse.Namespace) -> int:
    from agent import addresses
    from cladnet.api_client import AsyncClient, fetch_pinned_ca, with_retries
    from cladnet.keys import generate_keypair, public_key_of

    token = join_token(args)
    states = StateDir(Path(args.state_dir))
    local = await addresses.underlay_addresses()
    ca_pem = None
    verify: bool | ssl.SSLContext = True
    if args.ca_hash:
        ca_pem = await with_retries(
            lambda: fetch_pinned_ca(args.controller, args.ca_hash), args.join_timeout, "fetch CA"
        )
        verify = ssl.create_default_context(cadata=ca_pem)
    client = AsyncClient(args.controller, verify=verify)
    try:
        fields: dict[str, Any] = {
            "hostname": args.hostname or socket.gethostname(),
            # The machine's own name (clones share it) may be given a -N suffix.
            "explicit_hostname": args.hostname is not None,
            "addresses": local,
            "labels": _labels(args.label),
        }
        if args.listen_port:
            fields["listen_port"] = args.listen_port
        new_key = generate_keypair()[0]  # once: retries of the join reuse it
        # A controller that restarts, or limits joins, must not leave this VM out for good.
        result, private_key = await with_retries(
            lambda: _join_or_rejoin(client, token, states, fields, new_key),
            args.join_timeout,
            "join",
        )
    finally:
        await client.close()
    public_key = public_key_of(private_key)
    net = result["network"]
    if result.get("renamed_from"):
        log.warning(
            "hostname taken, joined under another",
            extra={"requested": result["renamed_from"], "hostname": result["hostname"]},
        )
    me = {
        "id": result["host_id"],
        "name": result["hostname"],
        "network_id": net["id"],
        "public_key": public_key,
        "overlay_ip": result["overlay_ip"],
        "listen_port": args.listen_port or net["listen_port"],
        "addresses": local,
        "public_address": result["observed_address"],
        "endpoints": [],
        "labels": fields["labels"],
    }
    membership = Membership(
        controller=args.controller,
        host_id=result["host_id"],
        interface=args.interface or interface_name(net["name"]),
        network=net,
        me=me,
        labels=fields["labels"],
        backend=args.backend,
        allow_commands=args.allow_commands,
    )
    states.save_secrets(net["id"], result["credential"], private_key)
    if ca_pem is not None:
        membership.ca_file = states.save_ca(net["id"], ca_pem)
    states.save(membership)
    log.info(
        "joined",
        extra={"network": net["name"], "host": result["host_id"], "ip": result["overlay_ip"]},
    )
    print(
        json.dumps(
            {
                "network": net["name"],
                "host_id": result["host_id"],
                "hostname": result["hostname"],
                "overlay_ip": result["overlay_ip"],
                "interface": membership.interface,
            }
        ),
        flush=True,
    )
    if args.no_run:
        return 0
    return await _run_networks(
        states,
        args.backend,
        [net["id"]],
        args.metrics_listen,
        args.allow_commands,
        tune_host=args.tune_host,
    )


async def cmd_run(args: argparse.Namespace) -> int:
    return await _run_networks(
        StateDir(Path(args.state_dir)),
        args.backend,
        metrics_listen=args.metrics_listen,
        allow_commands=args.allow_commands,
        in_process_commands=not args.no_commands,
        tune_host=args.tune_host,
    )


async def cmd_commands(args: argparse.Namespace) -> int:
    """Run the remote commands of the networks that opted in (the commands unit)."""
    from agent.commands import NotOptedIn, serve

    states = StateDir(Path(args.state_dir))
    task = asyncio.create_task(serve(states))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except NotOptedIn as exc:
        raise UsageError(str(exc)) from exc
    except asyncio.CancelledError:  # a signal: the running command's group is killed
        pass
    return 0


async def cmd_leave(args: argparse.Namespace) -> int:
    from agent.names import undo
    from cladnet.api_client import ApiClientError, AsyncClient

    states = StateDir(Path(args.state_dir))
    ids = states.network_ids()
    if args.network:
        ids = [
            i for i in ids if i == args.network or states.load(i)[0].network["name"] == args.network
        ]
        if not ids:
            raise UsageError(f"not a member of network {args.network!r}")
    for net_id in ids:
        membership, credential, _ = states.load(net_id)
        client = AsyncClient(membership.controller, credential, verify=membership.ca_file or True)
        try:
            await client.leave(membership.host_id)
        except ApiClientError as exc:
            if exc.status not in (401, 404):  # already gone is fine
                raise
        finally:
            await client.close()
        await undo(states.root / "networks" / net_id, membership.interface)
        with contextlib.suppress(Exception):
            await _backend(membership.backend).destroy(membership.interface)
        with contextlib.suppress(Exception):
            await firewall.remove(membership.interface)
        states.remove(net_id)
        print(f"left {membership.network['name']} (released {membership.me['overlay_ip']})")
    if not states.network_ids():  # the last network: put back what --tune-host raised
        from agent import tuning

        tuning.restore(states.root)
    return 0


def _policy_status(m: Membership) -> dict[str, Any] | None:
    """The enforced policy's version and whether it allows everything (None: no policy)."""
    from cladnet import policy as acl

    if m.policy is None:
        return None
    try:
        allows_all = acl.parse(m.policy["document"]).allows_all
    except (acl.PolicyError, KeyError, TypeError):
        allows_all = False
    return {"version": m.policy_version, "allows_all": allows_all}


def _paths(m: Membership) -> dict[str, str]:
    """Peer name → the path the plan gives it (private, direct, relayed via R); empty
    when the saved state cannot be planned (status must still answer)."""
    names = {p.get("public_key"): str(p.get("name")) for p in m.peers.values()}
    try:
        planned = mesh.plan(m.network, m.me, list(m.peers.values())).peers
    except (KeyError, TypeError, ValueError):
        return {}
    return {names.get(k, k): p.path for k, p in planned.items()}


async def cmd_status(args: argparse.Namespace) -> int:
    from agent.names import read_status as read_dns_status

    states = StateDir(Path(args.state_dir))
    out = []
    for net_id in states.network_ids():
        m, _, _ = states.load(net_id)
        device = None
        with contextlib.suppress(Exception):
            device = await _backend(m.backend).get(m.interface)
        out.append(
            {
                "network": m.network["name"],
                "interface": m.interface,
                "overlay_ip": m.me["overlay_ip"],
                "revision": m.revision,
                "controller": m.controller_state,
                "controller_since": m.controller_state_since,
                "peers": len(m.peers),
                "device_peers": len(device.peers) if device is not None else None,
                "policy": _policy_status(m),
                "paths": _paths(m),
                "metrics_spool": spool_status(spool_dir(states.root, net_id)),
                "dns": read_dns_status(states.root / "networks" / net_id),
            }
        )
    print(json.dumps(out, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cladnet-agent", description="CLADNet agent")
    p.add_argument("--log-level", default=os.environ.get("CLADNET_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--state-dir", default=os.environ.get("CLADNET_STATE_DIR", DEFAULT_STATE_DIR)
        )
        sp.add_argument(
            "--backend",
            choices=["kernel", "userspace"],
            default=None,
            help="force a WireGuard implementation (default: kernel if present)",
        )

    def serve(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--metrics-listen",
            default=os.environ.get("CLADNET_METRICS_LISTEN"),
            metavar="HOST:PORT",
            help="serve Prometheus metrics here (off by default; e.g. the overlay IP)",
        )
        sp.add_argument(
            "--allow-commands",
            action="store_true",
            default=os.environ.get("CLADNET_ALLOW_COMMANDS") == "1",
            help="run the shell commands an admin sends to this host's group, as this "
            "agent's user (env CLADNET_ALLOW_COMMANDS=1; saved by join)",
        )
        sp.add_argument(
            "--tune-host",
            action="store_true",
            default=os.environ.get("CLADNET_TUNE_HOST") == "1",
            help="raise the UDP socket buffer sysctls net.core.{r,w}mem_{max,default} to "
            "7 MiB (fewer dropped tunnel packets); the old values come back on leave, or "
            "on a run without it (env CLADNET_TUNE_HOST=1)",
        )

    j = sub.add_parser("join", help="join a network and keep running")
    j.add_argument(
        "--controller", required=True, help="controller URL; several, comma-separated, for replicas"
    )
    j.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"read the join token from FILE (mode 0600); default: env {TOKEN_ENV}",
    )
    j.add_argument("--token", dest="legacy_token", help=argparse.SUPPRESS)
    j.add_argument(
        "--join-timeout",
        type=float,
        default=os.environ.get("CLADNET_JOIN_TIMEOUT", "600"),  # argparse applies type
        metavar="SECONDS",
        help="keep retrying while the controller is down or busy (429/5xx) for this long "
        "(default 600; env CLADNET_JOIN_TIMEOUT)",
    )
    j.add_argument(
        "--ca-hash",
        help="sha256:… of the controller's CA (from the token's ca_cert_hash): pin it on join",
    )
    j.add_argument(
        "--hostname", help="name in the network (default: this machine's, with -N if taken)"
    )
    j.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    j.add_argument(
        "--interface",
        default=os.environ.get("CLADNET_INTERFACE"),
        help="WireGuard interface name (default cl-<network>; env CLADNET_INTERFACE)",
    )
    j.add_argument("--listen-port", type=int)
    j.add_argument("--no-run", action="store_true", help="join and exit (then use 'run')")
    common(j)
    serve(j)
    j.set_defaults(func=cmd_join)

    r = sub.add_parser("run", help="run from the saved state (what the systemd unit does)")
    common(r)
    serve(r)
    r.add_argument(
        "--no-commands",
        action="store_true",
        help="leave remote commands to 'cladnet-agent commands' (the systemd units do)",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "commands",
        help="run the remote commands of the networks joined with --allow-commands "
        "(cladnet-agent-commands.service: outside the agent's sandbox)",
    )
    c.add_argument("--state-dir", default=os.environ.get("CLADNET_STATE_DIR", DEFAULT_STATE_DIR))
    c.set_defaults(func=cmd_commands)

    lv = sub.add_parser("leave", help="leave the network(s), remove the interface, release the IP")
    lv.add_argument("--network", help="only this network (id or name)")
    common(lv)
    lv.set_defaults(func=cmd_leave)

    st = sub.add_parser("status", help="what this agent knows and what its devices hold")
    common(st)
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> None:
    from cladnet import logs

    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    log.debug("agent starting", extra={"command": args.command})
    try:
        code = asyncio.run(args.func(args))
    except UsageError as exc:
        print(f"cladnet-agent: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # one readable line, details in the log
        log.debug("command failed", exc_info=True)
        # Some errors (timeouts) have no message: their name is then the message.
        print(f"cladnet-agent: {str(exc) or type(exc).__name__}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
