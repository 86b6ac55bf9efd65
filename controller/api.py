"""The controller's HTTP API (FastAPI)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from aetcd import exceptions as etcd_errors
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from cladnet import __version__, mesh, metrics, tokens
from cladnet import policy as acl
from cladnet.models import (
    AddressSpaces,
    AdminToken,
    AdminTokenCreate,
    AdminTokenCreated,
    AuditPage,
    CaCertificate,
    ChallengeRequest,
    ChallengeResponse,
    CommandReport,
    CommandRequest,
    CommandRun,
    DriverInfo,
    EndpointsUpdate,
    Group,
    GroupAction,
    GroupCreate,
    Health,
    Heartbeat,
    HeartbeatResponse,
    Host,
    HostCommands,
    JoinRequest,
    JoinResponse,
    JoinToken,
    JoinTokenCreated,
    MetricsCredentials,
    Network,
    NetworkCreate,
    Peer,
    PeerList,
    Ready,
    TagsUpdate,
    TokenCreate,
)
from cladnet.ratelimit import RateLimiter, source_key
from cladnet.tasks import cancel_and_wait
from controller import auth, collector_proxy, tls
from controller import keyspace as ks
from controller.audit import AuditLog, is_audited
from controller.auth import Authenticator, Principal
from controller.bodylimit import BodyLimit
from controller.broker import BrokerAdmin, BrokerError, BrokerJanitor
from controller.commands import Commands, require_agent
from controller.config import Settings
from controller.errors import ApiError, not_found
from controller.etcd import from_settings as etcd_from_settings
from controller.groups import Drivers, GroupStore, Reconciler
from controller.leader import Leadership
from controller.openapi import (
    ADMIN_ONLY,
    AGENT,
    ANYONE_KNOWN,
    API_VERSION,
    JOIN,
    PUBLIC,
    READERS,
    SELF,
    contract,
)
from controller.openapi import install as install_openapi
from controller.paging import CONTINUE_PATTERN, MAX_LIMIT, read_page
from controller.policy import PolicyStore, admin_view, public_view, record_of
from controller.store import Store
from controller.telemetry import (
    API_ERRORS,
    HTTP_LATENCY,
    HTTP_REQUESTS,
    JOINS,
    REGISTRY,
    UNMATCHED_ROUTE,
    method_label,
)
from controller.ui import mount_ui
from controller.watch import WatchGone, WatchHubs

log = logging.getLogger("cladnet.controller.api")

ETCD_DOWN = (
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
    etcd_errors.InternalError,
)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    API_ERRORS.labels(code).inc()
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _observed(request: Request) -> str:
    """The caller's address as this controller sees it (its public address behind NAT)."""
    return request.client.host if request.client else "0.0.0.0"


def _audit_join_token(request: Request, token: str) -> None:
    """For the audit log: which join token a join or challenge used."""
    parsed = tokens.parse(token)
    if parsed is not None:
        request.state.principal = Principal("join-token", token_id=parsed.id)


# --- dependencies -------------------------------------------------------------------------


def _rate_limited(seconds: float, what: str) -> ApiError:
    wait = math.ceil(seconds)
    return ApiError(429, "rate_limited", f"too many {what}; retry in {wait} s", retry_after=wait)


async def principal(request: Request) -> Principal:
    """The caller (a source with too many failures was already refused by ``Observe``)."""
    who = await request.app.state.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = who  # for the audit log
    return who


async def join_allowed(request: Request) -> None:
    wait = request.app.state.join_limit.hit(source_key(_observed(request)), time.monotonic())
    if wait > 0:
        raise _rate_limited(wait, "joins from this address")


async def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    auth.require_admin(p)
    return p


async def reader(p: Annotated[Principal, Depends(principal)]) -> Principal:
    auth.require_reader(p)
    return p


async def store_of(request: Request) -> Store:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, per request.
    return request.app.state.store


Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
Reader = Annotated[Principal, Depends(reader)]
Db = Annotated[Store, Depends(store_of)]


async def policies_of(request: Request) -> PolicyStore:
    return request.app.state.policies


Policies = Annotated[PolicyStore, Depends(policies_of)]


async def groups_of(request: Request) -> GroupStore:
    return request.app.state.groups


Groups = Annotated[GroupStore, Depends(groups_of)]


async def commands_of(request: Request) -> Commands:
    return request.app.state.commands


Cmds = Annotated[Commands, Depends(commands_of)]
# A page of a list: at most ``limit`` items (all without), after ``continue``.
Limit = Annotated[int | None, Query(ge=1, le=MAX_LIMIT, description="at most this many items")]
Continue = Annotated[
    str | None,
    Query(
        alias="continue",
        pattern=CONTINUE_PATTERN,
        description="the `continue` of the previous page (same snapshot)",
    ),
]
NOT_NETWORK = {404: ["network_not_found"]}
NOT_HOST = {404: ["host_not_found"]}
NOT_GROUP = {404: ["group_not_found"]}
EXPIRED = {410: ["continue_expired"]}
CONTINUE_HEADER = "X-Continue"


class Observe:
    """Request metrics, the audit log and the per-source limit on failures, as plain ASGI
    (no per-request task or copy).

    An audited call is recorded before its last response byte is sent, so a client
    that got an answer finds the call in the log. A source whose anonymous requests
    keep failing (401s, unknown routes, bad bodies) is refused with 429 before any
    routing or body reading, whatever token it then shows.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        source = source_key(client[0] if client else "")
        failures: RateLimiter = scope["app"].state.auth_failures
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                who = scope.get("state", {}).get("principal")
                matched = scope.get("route") is not None
                if is_audited(method, path, matched, who and who.name, status):
                    await self._audit(scope, method, path, status)
            await send(message)

        try:
            wait = failures.blocked_for(source, time.monotonic())
            if wait > 0:
                status = 429
                await _refuse(send, _rate_limited(wait, FAILURES))
            else:
                await self.app(scope, receive, sending)
        finally:
            if _anonymous_failure(scope, status):
                failures.hit(source, time.monotonic())
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            HTTP_REQUESTS.labels(method_label(method), route, str(status)).inc()
            HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)

    @staticmethod
    async def _audit(scope: Any, method: str, path: str, status: int) -> None:
        state = scope.get("state", {})
        client = scope.get("client")
        await scope["app"].state.audit.record(
            state["principal"].name,
            method,
            path,
            status,
            client[0] if client else "",
            state.get("audit_detail"),
        )


FAILURES = "failed authentications or refused anonymous requests from this address"


def _anonymous_failure(scope: Any, status: int) -> bool:
    """A refused request that proved no identity: counts against its source's limit."""
    anonymous = scope.get("state", {}).get("principal") is None
    return status == 401 or (anonymous and 400 <= status < 500 and status != 429)


async def _refuse(send: Any, exc: ApiError) -> None:
    """``exc`` as a JSON error response, from outside the application."""
    API_ERRORS.labels(exc.code).inc()
    body = json.dumps({"error": exc.code, "message": exc.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"retry-after", b"%d" % (exc.retry_after or 1)),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings) -> FastAPI:
    """Build the controller application; etcd is connected in the lifespan."""

    generated_token = None
    if not settings.admin_token:
        generated_token = auth.load_or_create_admin_token(settings.state_dir)
    tls_files = tls.serving_files(settings)  # issued by controller.main before serving

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        etcd = etcd_from_settings(settings)
        await etcd.connect()
        store = Store(etcd)

        tried = asyncio.Event()

        async def index_keys() -> None:
            """Keys of hosts that joined before keys were unique, before serving; while
            etcd is away the controller serves (unready) and indexes once it is back."""
            while True:
                try:
                    if await store.index_public_keys():
                        log.info("indexed the public keys of hosts from before unique keys")
                    return
                except ETCD_DOWN as exc:
                    log.warning("etcd unavailable; indexing keys later", extra={"error": repr(exc)})
                    tried.set()
                    await asyncio.sleep(5)
                finally:
                    tried.set()

        indexing = asyncio.create_task(index_keys(), name="index-keys")
        # Normally done before the first request; with etcd away, serve (unready) at once.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tried.wait(), 10)
        configured = None
        if settings.admin_token:  # configured: accepted as is, never written anywhere
            configured = tokens.hash_secret(settings.admin_token)
        elif generated_token:
            await auth.bootstrap_admin_token(etcd, generated_token)
        app.state.etcd = etcd
        app.state.store = store
        app.state.policies = PolicyStore(etcd, store)
        app.state.auth = Authenticator(etcd, store, configured)
        app.state.hubs = WatchHubs(etcd, settings.watch_keepalive)
        app.state.audit = AuditLog(etcd)

        async def janitor() -> None:
            while True:
                removed = await store.delete_expired_tokens(time.time())
                if removed:
                    log.info("expired join tokens removed", extra={"count": removed})
                await asyncio.sleep(settings.janitor_interval)

        drivers = Drivers(settings.drivers)
        app.state.groups = GroupStore(etcd, store, drivers)
        app.state.commands = Commands(etcd, app.state.groups, store)
        reconciler = Reconciler(
            app.state.groups,
            store,
            settings.controller_url,
            tls_files.ca_hash if tls_files else None,
            settings.driver_timeout,
        )

        async def background_jobs() -> None:
            jobs = [janitor(), reconciler.run()]
            if app.state.broker_janitor is not None:  # gone hosts' broker users, fleet-wide
                jobs.append(app.state.broker_janitor.run())
            await asyncio.gather(*jobs)

        app.state.leadership = Leadership(
            etcd, "background", background_jobs, ttl=settings.leader_ttl
        )
        background = asyncio.create_task(app.state.leadership.run(), name="leadership")
        app.state.join_limit = RateLimiter(
            settings.join_rate, settings.join_burst, settings.rate_limit_sources
        )
        app.state.auth_failures = RateLimiter(
            settings.auth_failure_rate, settings.auth_failure_burst, settings.rate_limit_sources
        )
        app.state.broker = None
        if settings.mqtt_url and settings.mqtt_admin_password:
            # An mqtts:// broker's certificate comes from the cluster CA unless told.
            mqtt_ca = settings.mqtt_ca or (tls_files.ca if tls_files else None)
            app.state.broker = BrokerAdmin(
                public_url=settings.mqtt_url,
                admin_url=settings.mqtt_admin_url or settings.mqtt_url,
                username=settings.mqtt_admin_user,
                password=settings.mqtt_admin_password,
                ca_file=str(mqtt_ca) if mqtt_ca else None,
            )
        # Set before the leadership task gets to run background_jobs (it awaits etcd).
        app.state.broker_janitor = None
        if app.state.broker is not None:
            app.state.broker_janitor = BrokerJanitor(
                app.state.broker, store.host_ids, settings.janitor_interval
            )
            reconciler.hosts_removed = app.state.broker_janitor.wake
        log.info("controller ready", extra={"etcd": settings.etcd, "listen": settings.listen})
        try:
            yield
        finally:
            await cancel_and_wait([background, indexing])
            await drivers.close()
            await app.state.hubs.close()
            await etcd.close()

    app = FastAPI(
        title="CLADNet controller",
        version=API_VERSION,
        description="The controller's HTTP API. Every error is `{error, message}` "
        "(ApiErrorBody); each operation lists its statuses and their codes.",
        lifespan=lifespan,
    )
    install_openapi(app)

    # --- errors and request metrics ----------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return _error(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "invalid_request", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's only own 400: a body that is not JSON.
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Still JSON, still a message: clients (and agents) handle every error alike.
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal", "internal error; the request may be retried")

    for exc_type in ETCD_DOWN:

        @app.exception_handler(exc_type)
        async def etcd_down(_: Request, exc: Exception) -> JSONResponse:
            log.error("etcd unavailable", extra={"error": repr(exc)})
            return _error(503, "etcd_unavailable", "the controller cannot reach etcd")

    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, per_path={"/v1/join": settings.max_join_body}
    )
    app.add_middleware(Observe)  # outermost: it sees the 413s and 429s too
    mount_ui(app, settings.collector_url is not None)
    app.include_router(
        collector_proxy.router(settings.collector_url, settings.collector_token, reader)
    )

    # --- health ------------------------------------------------------------------------

    @app.get("/healthz", **contract(PUBLIC, etcd=False))
    async def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @app.get("/v1/ca", **contract(PUBLIC, {404: ["tls_disabled"]}, etcd=False))
    async def ca() -> CaCertificate:
        """The CA that signed this controller's certificate (public; agents check its hash)."""
        if tls_files is None:
            raise ApiError(404, "tls_disabled", "this controller does not serve TLS")
        return CaCertificate(ca_pem=tls_files.ca_pem.decode(), ca_hash=tls_files.ca_hash)

    @app.get("/v1/whoami", **contract(ANYONE_KNOWN))
    async def whoami(p: Caller) -> dict[str, Any]:
        """Who the token is: ``role`` admin, viewer or host (the dashboard shows an
        admin's buttons only to admins; the API decides anyway)."""
        return {
            "role": p.kind,
            "token_id": p.token_id,
            "host_id": p.host_id,
            "network_id": p.network_id,
        }

    @app.post("/v1/admin-tokens", status_code=201, **contract(ADMIN_ONLY))
    async def create_admin_token(
        req: AdminTokenCreate, request: Request, _: Admin
    ) -> AdminTokenCreated:
        """An operator token (admin or viewer); shown once, stored hashed."""
        token, record = await auth.create_admin_token(
            request.app.state.etcd, req.role, req.description
        )
        record.pop("hash")
        return AdminTokenCreated(**record, token=token)

    @app.get("/v1/admin-tokens", **contract(ADMIN_ONLY))
    async def list_admin_tokens(request: Request, _: Admin) -> list[AdminToken]:
        return [AdminToken(**t) for t in await auth.list_admin_tokens(request.app.state.etcd)]

    @app.delete(
        "/v1/admin-tokens/{token_id}", status_code=204, **contract(ADMIN_ONLY, {404: ["not_found"]})
    )
    async def revoke_admin_token(token_id: str, request: Request, _: Admin) -> Response:
        etcd = request.app.state.etcd
        if await etcd.get(ks.admin_token(token_id)) is None:
            raise ApiError(404, "not_found", f"no admin token {token_id!r}")
        await etcd.call(lambda c: c.delete(ks.admin_token(token_id)))
        return Response(status_code=204)

    @app.get("/v1/audit", **contract(ADMIN_ONLY, EXPIRED))
    async def audit_log(
        request: Request,
        _: Admin,
        cont: Continue = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> AuditPage:
        """The newest entries first; ``continue`` goes on to older ones."""
        entries, next_token = await request.app.state.audit.recent(limit, cont)
        return AuditPage.model_validate({"entries": entries, "continue": next_token})

    @app.get("/readyz", response_model=Ready, **contract(PUBLIC))
    async def readyz(request: Request) -> JSONResponse:
        try:
            status = await request.app.state.etcd.status()
        except Exception as exc:
            return _error(503, "etcd_unavailable", f"etcd is not reachable: {exc!r}")
        return JSONResponse(
            {
                "status": "ready",
                "etcd_version": status.version,
                "leader": request.app.state.leadership.leading,
            }
        )

    @app.get("/metrics", response_class=PlainTextResponse, **contract(PUBLIC, etcd=False))
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # --- networks ----------------------------------------------------------------------

    @app.post(
        "/v1/networks",
        status_code=201,
        **contract(
            ADMIN_ONLY,
            {
                400: ["cidr_too_small"],
                409: [
                    "network_exists",
                    "cidr_overlaps_network",
                    "cidr_overlaps_underlay",
                    "no_address_space",
                ],
                503: ["contention"],
            },
        ),
    )
    async def create_network(req: NetworkCreate, _: Admin, db: Db) -> Network:
        return await db.create_network(req)

    @app.get("/v1/networks", **contract(READERS))
    async def list_networks(_: Reader, db: Db) -> list[Network]:
        networks, _rev = await db.list_networks()
        return sorted(networks, key=lambda n: n.name)

    @app.get("/v1/networks/{ref}", **contract(ANYONE_KNOWN, NOT_NETWORK))
    async def get_network(ref: str, p: Caller, db: Db) -> Network:
        net = await db.get_network(ref)
        auth.require_member(p, net.id)
        return net

    @app.delete(
        "/v1/networks/{ref}",
        **contract(ADMIN_ONLY, {**NOT_NETWORK, 409: ["network_has_hosts"], 503: ["contention"]}),
    )
    async def delete_network(
        ref: str, request: Request, _: Admin, db: Db, force: bool = False
    ) -> Network:
        net = await db.delete_network(ref, force)
        broker: BrokerAdmin | None = request.app.state.broker
        if broker is not None:  # its hosts' broker users go with it
            try:
                await broker.prune(db.host_ids)
            except BrokerError as exc:  # the leader's broker janitor retries
                log.warning("broker cleanup failed", extra={"network": net.id, "error": str(exc)})
        return net

    @app.get("/v1/address-spaces", **contract(READERS))
    async def address_spaces(
        _: Reader, db: Db, hosts: Annotated[int, Query(ge=1, le=1_000_000)] = 100
    ) -> AddressSpaces:
        return await db.address_spaces(hosts)

    # --- provisioning: drivers and groups of VMs --------------------------------------

    @app.get(
        "/v1/drivers", **contract(READERS, {502: ["driver_error"], 503: ["driver_unavailable"]})
    )
    async def list_drivers(_: Reader, groups: Groups) -> list[DriverInfo]:
        drivers = []
        for name in sorted(settings.drivers):
            regions = await groups.call(groups.drivers.get(name).regions())
            listed = [dataclasses.asdict(r) for r in regions]
            drivers.append(DriverInfo.model_validate({"name": name, "regions": listed}))
        return drivers

    @app.post(
        "/v1/groups",
        status_code=202,
        **contract(
            ADMIN_ONLY,
            {
                400: ["too_many_vms"],
                404: ["unknown_driver", "unknown_region"],
                409: ["network_exists", "group_exists"],
                502: ["driver_error"],
                503: ["driver_unavailable"],
            },
        ),
    )
    async def create_group(req: GroupCreate, _: Admin, groups: Groups) -> Group:
        return await groups.create(req)

    @app.get("/v1/groups", **contract(READERS))
    async def list_groups(_: Reader, groups: Groups) -> list[Group]:
        return sorted(await groups.list(), key=lambda g: g.name)

    @app.get("/v1/groups/{name}", **contract(READERS, NOT_GROUP))
    async def get_group(name: str, _: Reader, groups: Groups) -> Group:
        return await groups.get(name)

    @app.post(
        "/v1/groups/{name}/actions",
        status_code=202,
        **contract(
            ADMIN_ONLY, {**NOT_GROUP, 409: ["group_deleting", "action_refused", "vm_changed"]}
        ),
    )
    async def group_action(name: str, req: GroupAction, _: Admin, groups: Groups) -> Group:
        return await groups.act(name, req.action)

    @app.post(
        "/v1/groups/{name}/vms/{vm}/actions",
        status_code=202,
        **contract(
            ADMIN_ONLY,
            {
                404: ["group_not_found", "vm_not_found"],
                409: ["group_deleting", "action_refused", "vm_changed"],
            },
        ),
    )
    async def vm_action(name: str, vm: str, req: GroupAction, _: Admin, groups: Groups) -> Group:
        return await groups.act(name, req.action, vm)

    @app.post(
        "/v1/groups/{name}/commands",
        status_code=202,
        **contract(ADMIN_ONLY, {**NOT_GROUP, 409: ["commands_disabled"]}),
    )
    async def run_command(
        name: str, req: CommandRequest, request: Request, p: Admin, commands: Cmds
    ) -> CommandRun:
        """Run a shell command on every VM of the group (through the agents that accept it)."""
        request.state.audit_detail = {"command": req.command, "timeout": req.timeout}
        return await commands.start(name, req, p.name)

    @app.get(
        "/v1/groups/{name}/commands/{command_id}",
        **contract(ADMIN_ONLY, {404: ["command_not_found"]}),
    )
    async def get_command(name: str, command_id: str, _: Admin, commands: Cmds) -> CommandRun:
        """Each VM's state, exit code and output (admin only: output may hold secrets)."""
        return await commands.get(name, command_id)

    @app.delete(
        "/v1/groups/{name}",
        status_code=202,
        **contract(
            ADMIN_ONLY,
            {**NOT_GROUP, 409: ["group_changed", "group_deleting", "action_refused", "vm_changed"]},
        ),
    )
    async def delete_group(name: str, _: Admin, groups: Groups) -> Group:
        return await groups.delete(name)

    # --- join tokens -------------------------------------------------------------------

    @app.post("/v1/networks/{ref}/tokens", status_code=201, **contract(ADMIN_ONLY, NOT_NETWORK))
    async def create_token(
        ref: str, _: Admin, db: Db, req: TokenCreate | None = None
    ) -> JoinTokenCreated:
        created = await db.create_token(ref, req or TokenCreate())
        if tls_files is not None:
            created.ca_cert_hash = tls_files.ca_hash
        return created

    @app.get("/v1/networks/{ref}/tokens", **contract(READERS, NOT_NETWORK))
    async def list_tokens(ref: str, _: Reader, db: Db) -> list[JoinToken]:
        net = await db.get_network(ref)
        return await db.list_tokens(net.id)

    @app.delete(
        "/v1/networks/{ref}/tokens/{token_id}",
        status_code=204,
        **contract(ADMIN_ONLY, {404: ["network_not_found", "token_not_found"]}),
    )
    async def revoke_token(ref: str, token_id: str, _: Admin, db: Db) -> Response:
        await db.revoke_token(ref, token_id)
        return Response(status_code=204)

    # --- hosts (agents) ----------------------------------------------------------------

    @app.post(
        "/v1/join/challenge",
        dependencies=[Depends(join_allowed)],
        **contract(
            PUBLIC,
            {
                400: ["weak_key"],
                401: ["invalid_token", "token_expired"],
                404: ["host_not_found"],
            },
        ),
    )
    async def join_challenge(req: ChallengeRequest, request: Request, db: Db) -> ChallengeResponse:
        """A challenge for the holder of a registered key, to re-join as its host."""
        _audit_join_token(request, req.token)
        return await db.challenge(req)

    @app.post(
        "/v1/join",
        dependencies=[Depends(join_allowed)],
        **contract(
            JOIN,
            {
                401: ["invalid_token", "token_expired"],
                403: ["token_exhausted", "proof_required", "invalid_proof"],
                404: ["network_not_found", "host_not_found"],
                409: ["key_in_use", "hostname_taken", "network_full"],
                503: ["contention"],
            },
        ),
    )
    async def join(req: JoinRequest, request: Request, db: Db) -> JoinResponse:
        vouched = None
        if request.headers.get("authorization"):
            # A host's credential re-joins as that host; an admin may name any host.
            who = await principal(request)
            vouched = who.host_id if who.kind == "host" else req.host_id if who.is_admin else None
        if vouched is None:
            _audit_join_token(request, req.token)
        observed = _observed(request)
        joined = await db.join(req, observed, vouched)
        JOINS.inc()
        net = joined.network
        return JoinResponse(
            host_id=joined.peer.id,
            hostname=joined.peer.name,
            renamed_from=joined.renamed_from,
            credential=joined.credential,
            overlay_ip=joined.peer.overlay_ip,
            prefix_len=int(net.cidr.split("/")[1]),
            network=net,
            observed_address=observed,
            peers_url=f"/v1/networks/{net.id}/peers",
        )

    hosts_doc = contract(READERS, {**NOT_NETWORK, **EXPIRED})
    hosts_doc["responses"][200] = {
        "description": "The hosts (a page of them with `limit`)",
        "headers": {
            CONTINUE_HEADER: {
                "description": "the next page's `continue`, when there is one",
                "schema": {"type": "string", "pattern": CONTINUE_PATTERN},
            }
        },
    }

    @app.get("/v1/networks/{ref}/hosts", **hosts_doc)
    async def list_hosts(
        ref: str, response: Response, _: Reader, db: Db, limit: Limit = None, cont: Continue = None
    ) -> list[Host]:
        """The network's hosts by name; a page (``limit``) is in host id order and the
        next page's token is in the ``X-Continue`` header."""
        net = await db.get_network(ref)
        if limit is None and cont is None:
            return sorted(await db.list_hosts(net.id), key=lambda h: h.name)
        page = await read_page(db.etcd, ks.prefix("peers", net.id), limit, cont)
        if page.continue_token:
            response.headers[CONTINUE_HEADER] = page.continue_token
        peers = [Peer.model_validate_json(kv.value) for kv in page.kvs if not ks.is_policy(kv.key)]
        return await db.list_hosts(net.id, peers)

    @app.get("/v1/hosts/{host_id}", **contract(ANYONE_KNOWN, NOT_HOST))
    async def get_host(host_id: str, p: Caller, db: Db) -> Host:
        if not p.can_read_all:
            auth.require_self(p, host_id)
        return await db.get_host(host_id)

    @app.post("/v1/hosts/{host_id}/heartbeat", **contract(SELF, {**NOT_HOST, 503: ["contention"]}))
    async def heartbeat(
        host_id: str, request: Request, p: Caller, db: Db, req: Heartbeat | None = None
    ) -> HeartbeatResponse:
        auth.require_self(p, host_id)
        observed = _observed(request)
        _, changed = await db.heartbeat(host_id, req or Heartbeat(), observed)
        return HeartbeatResponse(
            host_id=host_id, observed_address=observed, changed=changed, server_time=time.time()
        )

    @app.put(
        "/v1/hosts/{host_id}/endpoints",
        **contract(SELF, {**NOT_HOST, 409: ["key_in_use"], 503: ["contention"]}),
    )
    async def update_endpoints(
        host_id: str, req: EndpointsUpdate, request: Request, p: Caller, db: Db
    ) -> Peer:
        auth.require_self(p, host_id)
        return await db.update_endpoints(host_id, req, _observed(request))

    @app.post("/v1/hosts/{host_id}/status", status_code=410, **contract(SELF, {410: ["gone"]}))
    async def report_status(host_id: str, p: Caller) -> Response:
        """Gone: per-peer health travels with the metrics (MQTT → collector), not etcd."""
        auth.require_self(p, host_id)
        raise ApiError(410, "gone", "peer status goes to the collector with the metrics")

    @app.post(
        "/v1/hosts/{host_id}/metrics-credentials",
        **contract(
            SELF,
            {
                404: ["host_not_found", "network_not_found", "metrics_disabled"],
                503: ["broker_unavailable"],
            },
        ),
    )
    async def metrics_credentials(
        host_id: str, request: Request, p: Caller, db: Db
    ) -> MetricsCredentials:
        """Where and as whom this host publishes its metrics (a fresh password each call)."""
        auth.require_self(p, host_id)
        host = await db.get_host(host_id)
        net = await db.get_network(host.network_id)
        answer: dict[str, Any] = {"interval": net.metrics_interval}
        if not settings.mqtt_url:
            raise ApiError(404, "metrics_disabled", "this controller has no metrics broker")
        broker: BrokerAdmin | None = request.app.state.broker
        if broker is None:  # an open broker (development): no per-host users
            return MetricsCredentials.model_validate(
                {
                    **answer,
                    "broker": settings.mqtt_url,
                    "username": None,
                    "password": None,
                    "topic": metrics.topic(net.name, host.name),
                    # End-to-end acknowledgement needs no broker users: a restart of an open
                    # broker must not lose batches either.
                    "ack_topic": metrics.ack_topic(net.name, host.name),
                }
            )
        try:
            registered = await broker.register(host_id, net.name, host.name)
            return MetricsCredentials.model_validate({**answer, **registered})
        except BrokerError as exc:
            log.warning("broker registration failed", extra={"host": host_id, "error": str(exc)})
            raise ApiError(503, "broker_unavailable", "the metrics broker is unreachable") from exc

    @app.get("/v1/hosts/{host_id}/commands", **contract(AGENT))
    async def host_commands(host_id: str, p: Caller, commands: Cmds) -> HostCommands:
        """The commands this host's agent is to run (an agent that asks accepts them)."""
        require_agent(p, host_id)
        return HostCommands.model_validate({"commands": await commands.pending(host_id)})

    @app.post(
        "/v1/hosts/{host_id}/commands/{command_id}",
        status_code=204,
        **contract(
            AGENT,
            {
                404: ["command_not_found", "host_not_found"],
                409: ["command_state", "command_changed"],
            },
        ),
    )
    async def report_command(
        host_id: str, command_id: str, req: CommandReport, p: Caller, commands: Cmds
    ) -> Response:
        require_agent(p, host_id)
        await commands.report(host_id, command_id, req)
        return Response(status_code=204)

    @app.delete("/v1/hosts/{host_id}", **contract(SELF, NOT_HOST))
    async def leave(host_id: str, request: Request, p: Caller, db: Db) -> Peer:
        auth.require_self(p, host_id)
        peer = await db.leave(host_id)
        broker: BrokerAdmin | None = request.app.state.broker
        if broker is not None:
            try:
                await broker.unregister(host_id)
            except BrokerError as exc:  # the user is useless without a host; log and go on
                log.warning("broker cleanup failed", extra={"host": host_id, "error": str(exc)})
        return peer

    # --- access policy -------------------------------------------------------------------

    @app.get("/v1/networks/{ref}/policy", **contract(ANYONE_KNOWN, NOT_NETWORK))
    async def get_policy(ref: str, p: Caller, db: Db, policies: Policies) -> dict[str, Any]:
        """Operators see the whole policy; a member host the groups and rules it enforces."""
        net = await db.get_network(ref)
        auth.require_member(p, net.id)
        view = admin_view(net.id, await policies.get(net.id))
        if not p.can_read_all:
            view["policy"] = public_view({**view, "document": view["policy"]})["document"]
        return view

    @app.put(
        "/v1/networks/{ref}/policy",
        **contract(
            ADMIN_ONLY,
            {
                **NOT_NETWORK,
                400: ["invalid_policy"],
                409: ["version_conflict"],
                422: ["policy_tests_failed"],
                503: ["contention"],
            },
        ),
    )
    async def put_policy(
        ref: str,
        document: dict[str, Any],
        _: Admin,
        db: Db,
        policies: Policies,
        if_version: Annotated[int | None, Query(ge=0)] = None,
    ) -> dict[str, Any]:
        net = await db.get_network(ref)
        return admin_view(net.id, await policies.put(net.id, document, if_version))

    @app.post(
        "/v1/networks/{ref}/policy/test",
        **contract(READERS, {**NOT_NETWORK, 400: ["invalid_policy"]}),
    )
    async def test_policy(
        ref: str, document: dict[str, Any], _: Reader, db: Db, policies: Policies
    ) -> dict[str, Any]:
        """A dry run: validate and run the tests, write nothing (viewers may too)."""
        net = await db.get_network(ref)
        parsed, failures = await policies.check(net.id, document)
        return {"passed": not failures, "failures": failures, "allows_all": parsed.allows_all}

    @app.get(
        "/v1/networks/{ref}/policy/explain",
        **contract(READERS, {404: ["network_not_found", "host_not_found"], 400: ["invalid_query"]}),
    )
    async def explain_policy(
        ref: str,
        src: Annotated[str, Query(max_length=255, description="host name or id")],
        dst: Annotated[str, Query(max_length=255, description="host name or id")],
        _: Reader,
        db: Db,
        policies: Policies,
        proto: Annotated[Literal["tcp", "udp", "icmp", "any"] | None, Query()] = None,
        port: Annotated[int | None, Query(ge=1, le=65535)] = None,
    ) -> dict[str, Any]:
        """Why two hosts may or may not talk, each way: every rule that allows it, or
        the default deny (the pair view of ``cladnet status`` and the dashboard). Without
        ``proto``, any flow; ``port`` needs ``proto`` tcp or udp. ``path``: how each
        side's agent reaches the other (private, direct or relayed)."""
        net = await db.get_network(ref)
        hosts = await db.list_hosts(net.id)

        def find(wanted: str) -> dict[str, Any]:
            found = [h for h in hosts if wanted in (h.id, h.name)]
            if not found:
                raise not_found("host", wanted)
            return found[0].model_dump()

        a, b = find(src), find(dst)
        record = await policies.get(net.id)
        try:
            said = acl.explain(acl.parse(record["document"]), a, b, proto, port)
        except acl.PolicyError as exc:
            raise ApiError(400, "invalid_query", str(exc)) from None
        return {
            "network_id": net.id,
            "version": record["version"],
            "default": record["version"] == 0,
            "src": a["name"],
            "dst": b["name"],
            "proto": proto,
            "port": port,
            **said,
            "path": {"forward": mesh.choose_path(a, b)[1], "reverse": mesh.choose_path(b, a)[1]},
        }

    @app.put("/v1/hosts/{host_id}/tags", **contract(ADMIN_ONLY, {**NOT_HOST, 503: ["contention"]}))
    async def set_tags(host_id: str, req: TagsUpdate, _: Admin, db: Db) -> Peer:
        """Tags are the admin's word about a host: the host itself cannot set them."""
        return await db.set_tags(host_id, req.tags)

    # --- peers: list + watch -----------------------------------------------------------

    peers_doc = contract(
        ANYONE_KNOWN, {**NOT_NETWORK, 410: ["revision_compacted", "continue_expired"]}
    )
    peers_doc["responses"][200] = {
        "model": PeerList,
        "description": "The peers (a page of them with `limit`); with `watch`, a stream of "
        "PeerEvent lines",
        "content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/PeerEvent"}}},
    }

    @app.get("/v1/networks/{ref}/peers", response_model=None, **peers_doc)
    async def peers(
        ref: str,
        request: Request,
        p: Caller,
        db: Db,
        watch: bool = False,
        since: Annotated[int | None, Query(ge=0)] = None,
        limit: Limit = None,
        cont: Continue = None,
    ) -> PeerList | StreamingResponse:
        """List (pages with ``limit``, at one revision), or ``watch`` from ``since``."""
        net = await db.get_network(ref)
        auth.require_member(p, net.id)
        if not watch:
            if limit is None and cont is None:
                items, policy_kv, revision = await db.list_peers_and_policy(net.id)
                policy = public_view(record_of(policy_kv))
                return PeerList(network_id=net.id, revision=revision, peers=items, policy=policy)
            page = await read_page(db.etcd, ks.prefix("peers", net.id), limit, cont)
            policy_kv = next((kv for kv in page.kvs if ks.is_policy(kv.key)), None)
            return PeerList.model_validate(
                {
                    "network_id": net.id,
                    "revision": page.revision,
                    "peers": [
                        Peer.model_validate_json(kv.value)
                        for kv in page.kvs
                        if not ks.is_policy(kv.key)
                    ],
                    "continue": page.continue_token,
                    # On the last page: the policy's key sorts after every host id.
                    "policy": (None if page.continue_token else public_view(record_of(policy_kv))),
                }
            )
        initial: list[bytes] = []
        if since is None:  # a plain watch starts with the policy and the current peers
            items, policy_kv, since = await db.list_peers_and_policy(net.id)
            head = {
                "type": "POLICY",
                "revision": since,
                "policy": public_view(record_of(policy_kv)),
            }
            initial = [
                json.dumps(event).encode() + b"\n"
                for event in [
                    head,
                    *({"type": "ADDED", "revision": since, "peer": i.model_dump()} for i in items),
                ]
            ]
        try:
            stream = await request.app.state.hubs.open(net.id, since)
        except WatchGone as gone:
            raise ApiError(
                410,
                "revision_compacted",
                f"revision {since} is compacted (oldest is {gone.compacted}); list the peers again",
            ) from gone

        async def body() -> AsyncIterator[bytes]:
            for line in initial:
                yield line
            async for line in stream:
                yield line

        return StreamingResponse(body(), media_type="application/x-ndjson")

    return app
