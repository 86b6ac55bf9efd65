"""The collector's query and alarm API (FastAPI); every route but health needs the token."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cladnet import tokens
from cladnet.alarms import AGENT_METRICS, AlarmEngine, Rule, RuleError, check_metric
from cladnet.api_errors import ApiError
from collector.ingest import Ingest

DOWN_AFTER_INTERVALS = 3
# The agents' per-peer series (label ``peer``) → the field of a pair's health.
PAIR_FIELDS = {
    "wireguard_peer_handshake_age_seconds": "handshake_age_s",
    "wireguard_peer_latency_seconds": "latency_ms",
    "wireguard_peer_receive_bytes_total": "rx_bytes",
    "wireguard_peer_transmit_bytes_total": "tx_bytes",
}


class RuleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=128)]
    metric: Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,127}$")]
    network: Annotated[str, Field(min_length=1, max_length=128)]
    host: str | None = None
    labels: dict[str, str] = {}
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    threshold: float
    for_s: Annotated[float, Field(ge=0, le=86400)] = 0.0


async def authorized(request: Request) -> None:
    """Bearer token whose hash is one of the configured ones (compared in constant time)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing bearer token")
    digest = tokens.hash_secret(token.strip())
    if not any(hmac.compare_digest(digest, h) for h in request.app.state.token_hashes):
        raise ApiError(401, "unauthorized", "invalid token")


Auth = Annotated[None, Depends(authorized)]


class RuleBook:
    """Alarm rules, kept in a JSON file in the collector's state dir."""

    def __init__(self, path: Path, engine: AlarmEngine) -> None:
        self.path, self.engine = path, engine
        if path.exists():
            for raw in json.loads(path.read_text()):
                engine.set_rule(Rule(**raw))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([r.to_dict() for r in self.engine.rules.values()], indent=1))
        tmp.replace(self.path)


def create_app(
    ingest: Ingest,
    rules: RuleBook,
    token_hashes: list[str],
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The HTTP API over a running ingest (its store, live state and alarm engine).

    ``cors_origins``: where the dashboard is served from (the controller's /ui), so
    the browser may call this API with the token.
    """
    app = FastAPI(title="CLADNet collector")
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    store = ingest.store

    def _error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": code, "message": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, "invalid_request", str(exc))

    app.state.token_hashes = token_hashes

    def _up(network: str, host: str, now: float) -> bool:
        ts, interval = ingest.last_seen.get((network, host), (0.0, 0.0))
        return now - ts <= DOWN_AFTER_INTERVALS * max(interval, 1.0)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        ok = ingest.connected
        return JSONResponse({"broker_connected": ok}, status_code=200 if ok else 503)

    @app.get("/v1/metrics/latest")
    async def latest(_: Auth, network: str | None = None, host: str | None = None) -> Any:
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for s in await store.latest(network=network, host=host):
            entry = out.setdefault(
                s.host,
                {
                    "network": s.network,
                    "ts": s.ts,
                    "up": _up(s.network, s.host, now),
                    "metrics": {},
                },
            )
            entry["ts"] = max(entry["ts"], s.ts)
            entry["metrics"][s.series] = s.value
        return {"hosts": out}

    @app.get("/v1/hosts/{host}/latest")
    async def host_latest(host: str, _: Auth, network: str | None = None) -> Any:
        """The newest value of every series of one host."""
        hosts = (await latest(None, network=network, host=host))["hosts"]
        if host not in hosts:
            raise ApiError(404, "not_found", f"no metrics from host {host!r}")
        return {"host": host, **hosts[host]}

    @app.get("/v1/series")
    async def series(
        _: Auth,
        host: str,
        metric: str,
        start: float | None = None,
        end: float | None = None,
        since: Annotated[float, Query(gt=0, le=90 * 86400)] = 600,
        step: Annotated[float, Query(ge=1, le=86400)] = 10,
        agg: Literal["avg", "min", "max", "last"] = "avg",
        labels: Annotated[str | None, Query(description="k=v,k2=v2")] = None,
    ) -> Any:
        """One metric of one host from ``start`` to ``end`` (unix seconds; default: the
        last ``since`` seconds) in buckets of ``step`` seconds."""
        wanted = None
        if labels:
            wanted = {}
            for part in labels.split(","):
                k, eq, v = part.partition("=")
                if not eq:
                    raise ApiError(400, "invalid_request", f"labels must be k=v,…, got {part!r}")
                wanted[k.strip()] = v.strip()
        end = time.time() if end is None else end
        start = end - since if start is None else start
        points = await store.series(host, metric, wanted, start, end, step, agg)
        return {"host": host, "metric": metric, "step": step, "agg": agg, "points": points}

    @app.get("/v1/networks/{network}/summary")
    async def summary(network: str, _: Auth) -> Any:
        now = time.time()
        hosts = sorted(h for (n, h) in ingest.last_seen if n == network)
        down = [h for h in hosts if not _up(network, h, now)]
        figures = {}
        for metric in (
            "cpu_usage_ratio",
            "memory_usage_ratio",
            "load1",
            "wireguard_peer_latency_seconds",
        ):
            figures[metric] = await store.aggregate(network, metric, now - 60)
        return {
            "network": network,
            "hosts": len(hosts),
            "hosts_down": down,
            "aggregates": figures,
        }

    @app.get("/v1/networks/{network}/latency")
    async def latency(network: str, _: Auth) -> Any:
        matrix: dict[str, dict[str, float]] = {}
        for s in await store.latest(network=network):
            if s.name == "wireguard_peer_latency_seconds":
                matrix.setdefault(s.host, {})[dict(s.labels).get("peer", "?")] = s.value
        return {"network": network, "unit": "seconds", "matrix": matrix}

    @app.get("/v1/networks/{network}/pairs")
    async def pairs(network: str, _: Auth) -> Any:
        """Per-pair health as each host last reported it (reporter → peer name → figures),
        from one read of the network's newest samples: the CLI's and dashboard's status."""
        now = time.time()
        hosts: dict[str, dict[str, Any]] = {}
        for s in await store.latest(network=network):
            field = PAIR_FIELDS.get(s.name)
            peer = dict(s.labels).get("peer")
            if field is None or peer is None:
                continue
            entry = hosts.setdefault(
                s.host, {"up": _up(network, s.host, now), "ts": s.ts, "peers": {}}
            )
            entry["ts"] = max(entry["ts"], s.ts)
            row = entry["peers"].setdefault(peer, dict.fromkeys(PAIR_FIELDS.values()))
            if field == "handshake_age_s":  # as of now, not as of the sample
                row[field] = s.value + max(0.0, now - s.ts)
            elif field == "latency_ms":
                row[field] = s.value * 1000
            else:
                row[field] = s.value
        return {"network": network, "hosts": hosts}

    @app.get("/v1/ingest")
    async def ingest_stats(_: Auth) -> Any:
        return {
            "broker_connected": ingest.connected,
            "counters": dict(ingest.counters),
            "hosts": ingest.tracker.stats(),
        }

    @app.get("/v1/hosts/{host}/ingest")
    async def host_ingest(host: str, _: Auth) -> Any:
        """Batches received, duplicates, gaps and resets of one host (per network)."""
        stats = {k: v for k, v in ingest.tracker.stats().items() if k.split("/", 1)[1] == host}
        if not stats:
            raise ApiError(404, "not_found", f"no batch from host {host!r}")
        return {"host": host, "networks": stats}

    @app.get("/v1/alarms")
    async def alarms(_: Auth) -> Any:
        """The rules, the alarms firing now and the recent transitions."""
        recent = ingest.notifier.history[-100:] if ingest.notifier else []
        return {
            "rules": [r.to_dict() for r in rules.engine.rules.values()],
            "alarms": rules.engine.active(),
            "recent": recent,
        }

    async def metric_names(network: str | None = None) -> set[str]:
        """What agents publish, and every name this collector holds (of ``network``)."""
        seen = {s.name for s in await store.latest(network=network)}
        return set(AGENT_METRICS) | seen

    @app.get("/v1/metrics/names")
    async def names(_: Auth, network: str | None = None) -> Any:
        """The metric names alarm rules may use."""
        return {"names": sorted(await metric_names(network))}

    @app.post("/v1/alarms", status_code=201)
    async def create_rule(req: RuleCreate, _: Auth) -> Any:
        try:
            rule = Rule(id=f"r-{uuid.uuid4().hex[:12]}", **req.model_dump())
        except RuleError as exc:
            raise ApiError(400, "invalid_rule", str(exc)) from exc
        try:
            check_metric(rule.metric, await metric_names(rule.network))
        except RuleError as exc:
            raise ApiError(400, "unknown_metric", str(exc)) from exc
        rules.engine.set_rule(rule)
        rules.save()
        return rule.to_dict()

    @app.delete("/v1/alarms/{rule_id}", status_code=204)
    async def delete_rule(rule_id: str, _: Auth) -> Response:
        if not rules.engine.remove_rule(rule_id):
            raise ApiError(404, "not_found", f"no alarm rule {rule_id!r}")
        rules.save()
        return Response(status_code=204)

    return app
