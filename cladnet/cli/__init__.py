"""``cladnet``: the operator's CLI over the controller and collector HTTP APIs.

Every command takes ``--json`` (a stable schema: the API's own objects, or the
documented shape of ``status``), exits non-zero on failure, and reports connection,
auth and API errors as one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

from cladnet.roles import missing_extra

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
except ModuleNotFoundError as missing:  # an agent-only install: one line, not a traceback
    missing_extra("cladnet", "cli", missing)

from cladnet import __version__, mesh
from cladnet.api_client import ApiClientError, SyncClient, TrustError, fetch_ca
from cladnet.api_client import endpoints as ep
from cladnet.cli import config
from cladnet.cli.api import CliError, connect, one_line
from cladnet.cli.hosts import find_host
from cladnet.cli.status import summary, with_health
from cladnet.dns import domain_of, host_name

app = typer.Typer(
    help="CLADNet: one encrypted private network across clouds.", no_args_is_help=True
)
net_app = typer.Typer(help="Networks (CLADNets).", no_args_is_help=True)
token_app = typer.Typer(help="Join tokens of a network.", no_args_is_help=True)
hosts_app = typer.Typer(help="Hosts (agents) of a network.", no_args_is_help=True)
metrics_app = typer.Typer(help="Metrics from the collector.", no_args_is_help=True)
alarms_app = typer.Typer(help="Alarm rules and firing alarms (collector).", no_args_is_help=True)
for sub, name in (
    (net_app, "net"),
    (token_app, "token"),
    (hosts_app, "hosts"),
    (metrics_app, "metrics"),
    (alarms_app, "alarms"),
):
    app.add_typer(sub, name=name)

out = Console()
State: dict[str, Any] = {"context": None}
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
InNetwork = Annotated[
    str | None, typer.Option("--network", help="the host's network, when its name is in several")
]
Watch = Annotated[
    bool, typer.Option("--watch", help="refresh every --interval (with --json: one line each)")
]
Interval = Annotated[float, typer.Option(help="seconds between refreshes with --watch")]


@app.callback()
def _global(
    context: Annotated[str | None, typer.Option(help="use this context from the config")] = None,
) -> None:
    State["context"] = context


def controller() -> SyncClient:
    """The current context's controller."""
    ctx = config.resolve(State["context"])
    return connect(ctx.controller, ctx.token, "controller", ca_pem=ctx.ca_pem)


def collector() -> SyncClient:
    """The current context's collector."""
    ctx = config.resolve(State["context"])
    return connect(ctx.collector, ctx.token, "collector")


def emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif table is not None:
        out.print(table)


def _table(
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    drop: tuple[str, ...] = (),
    styles: list[str] | None = None,
) -> Table:
    """A table that fits the terminal: the ``drop`` columns go first, in that order,
    when the table would be wider (so 80 columns keep what people read first; ``--json``
    keeps everything), and the caption says which went. ``styles``: one per row."""
    cells = [["" if v is None else str(v) for v in r] for r in rows]  # plain: widths count
    keep = list(range(len(columns)))

    def width() -> int:  # rich's default box: a border and 3 characters per column
        longest = (
            max(len(line) for r in [columns, *cells] for line in r[i].split("\n")) for i in keep
        )
        return 1 + sum(w + 3 for w in longest)

    hidden = []
    for name in drop:
        if width() <= out.width:
            break
        keep.remove(columns.index(name))
        hidden.append(name)
    caption = f"{', '.join(hidden)} hidden at this width (--json has all)" if hidden else None
    t = Table(title=title, caption=caption)
    for i in keep:
        t.add_column(columns[i])
    for n, r in enumerate(cells):
        # Escaped: an IPv6 endpoint ("[fd00::1]:51820") is not rich markup.
        t.add_row(*[escape(r[i]) for i in keep], style=styles[n] if styles else None)
    return t


def _watch(render: Any, data: Any, as_json: bool, interval: float) -> NoReturn:
    """Refresh ``render(data())`` in place every ``interval`` seconds until interrupted;
    with ``as_json`` one compact JSON document per line instead (for scripts)."""
    if as_json:
        while True:
            print(json.dumps(data(), sort_keys=True), flush=True)
            time.sleep(interval)
    from rich.live import Live

    with Live(render(data()), console=out) as live:
        while True:
            time.sleep(interval)
            live.update(render(data()))


def _ms(value: float | None) -> str:
    """Milliseconds for people (exact in --json)."""
    return "—" if value is None else f"{value:.1f}"


def _num(value: float) -> str:
    """A measured value for people: 4 significant digits (exact in --json)."""
    return f"{value:.4g}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


# --- login / version -------------------------------------------------------------------


@app.command()
def login(
    url: str,
    token_file: Annotated[
        Path | None,
        typer.Option(help="file holding an admin or viewer token (or env CLADNET_TOKEN)"),
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="the token itself (visible in ps; prefer --token-file)")
    ] = None,
    ca_hash: Annotated[
        str | None,
        typer.Option(help="pin the controller's CA: sha256:… (as 'cladnet token create' prints)"),
    ] = None,
    collector_url: Annotated[str | None, typer.Option("--collector")] = None,
    name: Annotated[str, typer.Option("--name", help="context name")] = "default",
) -> None:
    """Check the token against the controller and save a context (0600), pinning the
    controller's CA when given its hash."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"--token-file: {exc}") from None
    token = token or os.environ.get("CLADNET_TOKEN")
    if not token:
        raise CliError("no token: pass --token-file FILE (or set CLADNET_TOKEN)")
    ca_pem = fetch_ca(url, ca_hash) if ca_hash else None
    connect(url, token, ca_pem=ca_pem).call(ep.NETWORKS)
    data = config.load()
    data["contexts"][name] = {
        "controller": url,
        "collector": collector_url,
        "token": token,
        "ca_pem": ca_pem,
    }
    data["current"] = name
    path = config.save(data)
    pinned = " (CA pinned)" if ca_pem else ""
    out.print(f"logged in to {url}{pinned} as context [bold]{name}[/] ({path})")


@app.command()
def version(as_json: Json = False) -> None:
    """The CLI's version (and the controller's, if reachable)."""
    info: dict[str, Any] = {"cli": __version__}
    try:
        info["controller"] = controller().call(ep.HEALTH).get("version")
    except (CliError, ApiClientError):
        info["controller"] = None
    if as_json:
        emit(info, True)
    else:
        out.print(f"cladnet {info['cli']} (controller: {info['controller'] or 'unreachable'})")


# --- networks ----------------------------------------------------------------------------


@net_app.command("create")
def net_create(
    name: str,
    cidr: Annotated[str | None, typer.Option(help="default: the recommended free space")] = None,
    hosts: Annotated[int | None, typer.Option(help="expected hosts")] = None,
    mtu: int | None = None,
    listen_port: int | None = None,
    keepalive: int | None = None,
    as_json: Json = False,
) -> None:
    """Create a network."""
    body = {
        "name": name,
        "cidr": cidr,
        "expected_hosts": hosts,
        "mtu": mtu,
        "listen_port": listen_port,
        "keepalive": keepalive,
    }
    net = controller().call(
        ep.NETWORK_CREATE, cast(ep.NetworkCreateBody, {k: v for k, v in body.items() if v})
    )
    if as_json:
        emit(net, True)
    else:
        out.print(f"created {net['name']} ({net['id']}) with {net['cidr']}")


@net_app.command("list")
def net_list(as_json: Json = False) -> None:
    """All networks."""
    nets = controller().call(ep.NETWORKS)
    rows = [[n["name"], n["id"], n["cidr"], n["mtu"], n["listen_port"]] for n in nets]
    emit(nets, as_json, _table("networks", ["NAME", "ID", "CIDR", "MTU", "PORT"], rows))


@net_app.command("show")
def net_show(network: str, as_json: Json = False) -> None:
    """One network and its hosts."""
    api = controller()
    net = api.call(ep.NETWORK, ref=network)
    hosts = api.call(ep.NETWORK_HOSTS, ref=network)
    if as_json:
        emit({"network": net, "hosts": hosts}, True)
        return
    out.print(f"[bold]{net['name']}[/] {net['id']} {net['cidr']} mtu {net['mtu']}")
    _print_hosts(hosts)


@net_app.command("delete")
def net_delete(
    network: str,
    force: Annotated[bool, typer.Option(help="also when hosts are still in it")] = False,
    as_json: Json = False,
) -> None:
    """Delete a network."""
    net = controller().call(ep.NETWORK_DELETE, query={"force": force}, ref=network)
    if as_json:
        emit(net, True)
    else:
        out.print(f"deleted {net['name']}")


@app.command("address-spaces")
def address_spaces(
    hosts: Annotated[int, typer.Option(help="size the recommendation for N hosts")] = 100,
    as_json: Json = False,
) -> None:
    """Free private address space and the recommended prefix."""
    spaces = controller().call(ep.ADDRESS_SPACES, query={"hosts": hosts})
    rows = [[b["block"], b["free_addresses"], ", ".join(b["free"][:6])] for b in spaces["blocks"]]
    if not as_json:
        out.print(f"recommended for {hosts} hosts: [bold]{spaces['recommended']}[/]")
    emit(spaces, as_json, _table("free space", ["BLOCK", "FREE ADDRESSES", "LARGEST"], rows))


# --- tokens ------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    network: str,
    ttl: Annotated[int, typer.Option(help="seconds")] = 86400,
    max_uses: int | None = None,
    as_json: Json = False,
) -> None:
    """A join token (shown once)."""
    body: ep.TokenCreateBody = {"ttl_seconds": ttl}
    if max_uses:
        body["max_uses"] = max_uses
    tok = controller().call(ep.TOKEN_CREATE, body, ref=network)
    if as_json:
        emit(tok, True)
        return
    out.print(f"token (shown once): [bold]{tok['token']}[/]")
    extra = f" --ca-hash {tok['ca_cert_hash']}" if tok.get("ca_cert_hash") else ""
    out.print(
        f"join with: CLADNET_JOIN_TOKEN={tok['token']} cladnet-agent join --controller URL{extra}"
    )


@token_app.command("list")
def token_list(network: str, as_json: Json = False) -> None:
    """Join tokens of a network (never their secrets)."""
    toks = controller().call(ep.TOKENS, ref=network)
    expires = [time.strftime("%Y-%m-%d %H:%M", time.localtime(t["expires_at"])) for t in toks]
    rows = [
        [t["id"], t["uses"], t.get("max_uses") or "-", e]
        for t, e in zip(toks, expires, strict=True)
    ]
    emit(toks, as_json, _table(f"tokens of {network}", ["ID", "USES", "MAX", "EXPIRES"], rows))


@token_app.command("revoke")
def token_revoke(network: str, token_id: str) -> None:
    """Revoke a join token."""
    controller().call(ep.TOKEN_REVOKE, ref=network, token_id=token_id)
    out.print(f"revoked {token_id}")


# --- hosts and status --------------------------------------------------------------------


def _print_hosts(hosts: list[dict[str, Any]]) -> None:
    now = time.time()
    rows = [
        [
            h["name"],
            h["id"],
            h["overlay_ip"],
            h.get("public_address"),
            ",".join(f"{k}={v}" for k, v in sorted(h.get("labels", {}).items())),
            _age(now - h["last_seen"]) if h.get("last_seen") else "never",
        ]
        for h in hosts
    ]
    columns = ["NAME", "ID", "OVERLAY", "PUBLIC", "LABELS", "SEEN"]
    out.print(_table("hosts", columns, rows, drop=("LABELS", "ID", "PUBLIC")))


@hosts_app.command("list")
def hosts_list(network: str, as_json: Json = False) -> None:
    """Hosts of a network."""
    hosts = controller().call(ep.NETWORK_HOSTS, ref=network)
    if as_json:
        emit(hosts, True)
    else:
        _print_hosts(hosts)


@hosts_app.command("show")
def hosts_show(host: str, network: InNetwork = None, as_json: Json = False) -> None:
    """One host (by name or id), with what it reports about its peers."""
    found = find_host(controller(), host, network)
    if as_json:
        emit(found, True)
        return
    for key in ("name", "id", "overlay_ip", "public_address", "addresses", "labels"):
        out.print(f"{key:15} {found.get(key)}")


def _hosts_with_health(net: dict[str, Any]) -> list[dict[str, Any]]:
    """A network's hosts (controller: liveness) with their pair health (collector)."""
    hosts = controller().call(ep.NETWORK_HOSTS, ref=net["id"])
    health = collector().call(ep.PAIRS, name=net["name"])["hosts"]
    return with_health(hosts, health)


@app.command()
def peers(
    host: str,
    network: InNetwork = None,
    watch: Watch = False,
    interval: Interval = 2.0,
    as_json: Json = False,
) -> None:
    """A host's peers (by name or id): handshake age and latency as it reports them (collector)."""
    api = controller()
    found = find_host(api, host, network)
    net = api.call(ep.NETWORK, ref=found["network_id"])
    if watch:
        _watch(
            lambda data: _peers_table(found, data), lambda: _peers_of(found, net), as_json, interval
        )
    data = _peers_of(found, net)
    emit(data, as_json, _peers_table(found, data))


def _peers_of(found: dict[str, Any], net: dict[str, Any]) -> list[dict[str, Any]]:
    """``found``'s peers as it reports them, with their names, addresses and path."""
    hosts = _hosts_with_health(net)
    others = {h["id"]: h for h in hosts}
    reported = others[found["id"]]["status"]["peers"] if found["id"] in others else []
    data = []
    for p in reported:
        other = others.get(p["peer_id"])
        name = other.get("name") if other else None
        data.append(
            {
                **p,
                "name": name,
                "endpoint": other.get("public_address") if other else None,
                "overlay_ip": other.get("overlay_ip") if other else None,
                "dns_name": host_name(name, net) if name else None,
                "path": mesh.choose_path(found, other)[1] if other else None,
            }
        )
    return data


def _peers_table(found: dict[str, Any], data: list[dict[str, Any]]) -> Table:
    rows = [
        [
            d["dns_name"] or d["name"],
            d["overlay_ip"],
            d["endpoint"],
            d["path"],
            _age(d["handshake_age_s"]),
            _ms(d["latency_ms"]),
        ]
        for d in data
    ]
    columns = ["PEER", "OVERLAY", "PUBLIC", "PATH", "HANDSHAKE", "RTT MS"]
    drop = ("PUBLIC", "OVERLAY", "PATH")
    return _table(f"peers of {found['name']}", columns, rows, drop=drop)


@app.command()
def resolve(name: str, as_json: Json = False) -> None:
    """A host's overlay IP from its name (<host>.<network>.<zone>), as the agents answer it."""
    api = controller()
    wanted = name.lower().rstrip(".")
    for net in api.call(ep.NETWORKS):
        if not wanted.endswith("." + domain_of(net)):
            continue
        for h in api.call(ep.NETWORK_HOSTS, ref=net["id"]):
            if host_name(h["name"], net) == wanted:
                data = {"name": wanted, "overlay_ip": h["overlay_ip"], "host_id": h["id"]}
                if as_json:
                    emit(data, True)
                else:
                    print(h["overlay_ip"])
                return
    raise CliError(f"no host is named {wanted!r} (NXDOMAIN)")


def _status_views(network: str | None) -> list[dict[str, Any]]:
    api = controller()
    nets = [api.call(ep.NETWORK, ref=network)] if network else api.call(ep.NETWORKS)
    now = time.time()
    return [summary(n, _hosts_with_health(n), now, _policy_of(api, n["id"])) for n in nets]


def _policy_of(api: SyncClient, network_id: str) -> Any:
    """The network's policy, or None from a controller without policies."""
    from cladnet import policy as acl

    try:
        return acl.parse(api.call(ep.POLICY, ref=network_id)["policy"])
    except ApiClientError:
        return None


def _render_status(views: list[dict[str, Any]]) -> Table:
    """One row per network; at 80 columns the names and moved hosts give way."""
    columns = ["NETWORK", "NAMES", "UP", "DOWN", "BROKEN", "WORST PAIRS", "MOVED"]
    rows = []
    for v in views:
        worst = [
            f"{p['from']}→{p['to']} {p['state']} {p['path']}"
            + (f" {p['latency_ms']:.1f}ms" if p["latency_ms"] is not None else "")
            # Which rule lets the pair talk (`cladnet policy explain` says more).
            + (f" ({p['policy']})" if p.get("policy") else "")
            for p in v["pairs"][:3]
        ]
        rows.append(
            [
                v["network"],
                f"<host>.{v['domain']}",
                len(v["hosts_up"]),
                ", ".join(v["hosts_down"]) or "-",
                v["broken_pairs"],
                "\n".join(worst) or "-",
                ", ".join(v["endpoint_changed"]) or "-",
            ]
        )
    styles = ["green" if v["healthy"] else "red" for v in views]
    return _table("CLADNet status", columns, rows, drop=("NAMES", "MOVED"), styles=styles)


@app.command()
def status(
    network: Annotated[str | None, typer.Argument()] = None,
    watch: Watch = False,
    interval: Interval = 2.0,
    as_json: Json = False,
) -> None:
    """Is my overlay healthy? Hosts up/down, broken pairs first, moved endpoints."""
    if watch:
        _watch(_render_status, lambda: _status_views(network), as_json, interval)
    views = _status_views(network)
    emit(views, as_json, _render_status(views))
    if not all(v["healthy"] for v in views):
        raise typer.Exit(3)  # scripts can tell "unhealthy" (3) from "failed" (1)


# --- metrics and alarms (collector) -------------------------------------------------------


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise CliError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)") from None


@metrics_app.command("top")
def metrics_top(
    network: Annotated[str | None, typer.Argument()] = None, as_json: Json = False
) -> None:
    """Latest CPU, memory and load per host."""
    data = collector().call(ep.METRICS_LATEST, query={"network": network})["hosts"]

    def pct(value: float | None) -> str | None:
        return None if value is None else f"{100 * value:.1f}"

    def _load(value: float | None) -> str | None:
        return None if value is None else f"{value:.2f}"

    rows = [
        [
            h,
            d["network"],
            "up" if d["up"] else "DOWN",
            pct(d["metrics"].get("cpu_usage_ratio")),
            pct(d["metrics"].get("memory_usage_ratio")),
            _load(d["metrics"].get("load1")),
        ]
        for h, d in sorted(data.items())
    ]
    columns = ["HOST", "NETWORK", "STATE", "CPU %", "MEM %", "LOAD"]
    emit(data, as_json, _table("hosts", columns, rows, drop=("NETWORK",)))


@metrics_app.command("show")
def metrics_show(
    host: str, metric: str, since: str = "10m", step: str = "10s", as_json: Json = False
) -> None:
    """One metric of one host over time."""
    query = {"host": host, "metric": metric, "since": _seconds(since), "step": _seconds(step)}
    data = collector().call(ep.SERIES, query=query)
    rows = [[time.strftime("%H:%M:%S", time.localtime(t)), _num(v)] for t, v in data["points"]]
    emit(data, as_json, _table(f"{metric} on {host}", ["TIME", "VALUE"], rows))


@metrics_app.command("names")
def metrics_names(
    network: Annotated[str | None, typer.Option(help="names seen in this network")] = None,
    as_json: Json = False,
) -> None:
    """The metric names the collector knows (what alarm rules may use)."""
    data = collector().call(ep.METRIC_NAMES, query={"network": network})
    if as_json:
        emit(data, True)
    else:
        out.print("\n".join(data["names"]))


@alarms_app.command("list")
def alarms_list(as_json: Json = False) -> None:
    """Rules and the alarms firing now."""
    data = collector().call(ep.ALARMS)
    if as_json:
        emit(data, True)
        return
    rules = [[r["id"], r["name"], _rule_text(r), f"{r['for_s']:g}s"] for r in data["rules"]]
    out.print(_table("rules", ["ID", "NAME", "RULE", "FOR"], rules))
    firing = [[a["rule_name"], a["host"], a["series"], _num(a["value"])] for a in data["alarms"]]
    out.print(_table("firing", ["RULE", "HOST", "SERIES", "VALUE"], firing, drop=("SERIES",)))


def _rule_text(r: dict[str, Any]) -> str:
    where = f"{r['network']}/{r.get('host') or '*'}"
    return f"{r['metric']} {r['op']} {r['threshold']:g} on {where}"


@alarms_app.command("create")
def alarms_create(
    name: str,
    metric: str,
    op: str,
    threshold: float,
    network: Annotated[str, typer.Option()],
    host: str | None = None,
    for_: Annotated[str, typer.Option("--for")] = "0s",
    as_json: Json = False,
) -> None:
    """An alarm rule on a metric the collector knows (``cladnet metrics names``):
    ``cladnet alarms create hot cpu_usage_ratio '>' 0.9 --network prod --for 1m``."""
    body = {
        "name": name,
        "metric": metric,
        "op": op,
        "threshold": threshold,
        "network": network,
        "host": host,
        "for_s": _seconds(for_),
    }
    rule = collector().call(ep.ALARM_CREATE, body)
    if as_json:
        emit(rule, True)
    else:
        out.print(f"created rule {rule['id']}")


@alarms_app.command("delete")
def alarms_delete(rule_id: str) -> None:
    """Delete an alarm rule."""
    collector().call(ep.ALARM_DELETE, rule_id=rule_id)
    out.print(f"deleted {rule_id}")


from cladnet.cli.demo import demo_app  # noqa: E402 - they use the helpers above
from cladnet.cli.groups import group_app  # noqa: E402
from cladnet.cli.policy import policy_app, tag  # noqa: E402

app.add_typer(demo_app, name="demo")
app.add_typer(group_app, name="group")
app.add_typer(policy_app, name="policy")
app.command("tag")(tag)


def main() -> None:
    try:
        # Without standalone mode click returns (not raises) the code of typer.Exit.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except (CliError, ApiClientError, TrustError) as exc:
        print(f"cladnet: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # usage errors and the like: one line
        # Usage errors are click's ClickException, or since typer 0.29 typer's own copy of
        # it (click is then not even installed): both have show() and exit_code.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        print(f"cladnet: {exc}", file=sys.stderr)
        sys.exit(1)
