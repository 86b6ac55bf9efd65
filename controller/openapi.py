"""The controller's OpenAPI document: who may call each operation, every status it can
answer and the one error shape, built from a small table instead of per-route dicts.

``python -m controller.openapi > openapi.json`` writes the document published in the repo
(tests/test_api_contract.py fails when the served one drifts from it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cladnet.models import ApiErrorBody, PeerEvent

API_VERSION = "v1"  # the path prefix; a breaking change gets /v2 and a new document
ERROR_REF = "#/components/schemas/ApiErrorBody"

# Security schemes (all HTTP bearer tokens); a route names the ones it accepts.
ADMIN, VIEWER, HOST = "admin", "viewer", "host"
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    ADMIN: {
        "type": "http",
        "scheme": "bearer",
        "description": "An operator token with the admin role (`cla_…`, or the configured "
        "CLADNET_ADMIN_TOKEN): every call.",
    },
    VIEWER: {
        "type": "http",
        "scheme": "bearer",
        "description": "An operator token with the viewer role (`cla_…`): read-only calls.",
    },
    HOST: {
        "type": "http",
        "scheme": "bearer",
        "description": "A host's credential (`clh_…`, from its join): calls about its own "
        "host and network.",
    },
}
# Who may call: the security requirement of each kind of route (alternatives).
Auth = tuple[str, ...]
ADMIN_ONLY: Auth = (ADMIN,)
READERS: Auth = (ADMIN, VIEWER)
ANYONE_KNOWN: Auth = (ADMIN, VIEWER, HOST)
SELF: Auth = (ADMIN, HOST)  # a host on itself, or the admin
AGENT: Auth = (HOST,)
PUBLIC: Auth = ()
# The join: anonymous with the join token in the body, or a host's credential / the admin
# to re-join as an existing host. OpenAPI has no scheme for a token inside a body.
JOIN: Auth = ("", HOST, ADMIN)

DESCRIPTIONS = {
    400: "Bad request: the body is not JSON, or breaks a rule the schema cannot state",
    401: "No valid credential",
    403: "The credential may not do this",
    404: "Not found",
    409: "Conflicts with the current state",
    410: "Gone",
    413: "The request body is over the limit",
    422: "The request does not match the schema",
    429: "Rate limited (see Retry-After)",
    500: "Internal error; the request may be retried",
    502: "A cloud driver failed",
    503: "A backend (etcd, the broker, a driver) is unavailable, or too much contention",
}
# Codes every operation with such an answer may carry.
COMMON_CODES = {
    400: ("invalid_json",),  # only operations with a body, where it is not JSON
    401: ("unauthorized",),
    403: ("forbidden",),
    404: ("not_found",),  # the path matches no route (an id with a '/', say)
    413: ("body_too_large",),
    422: ("invalid_request",),
    429: ("rate_limited",),
    500: ("internal",),
    503: ("etcd_unavailable",),
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


# The documented way from one call to the next (OpenAPI links): network → token → join →
# heartbeat → leave → network deleted. Clients and the stateful fuzzer follow them.
NETWORK_ID = {"path.ref": "$response.body#/id"}
HOST_ID = {"path.host_id": "$response.body#/host_id"}
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, Any]]]] = {
    ("post", "/v1/networks", "201"): {
        "CreateToken": ("post", "/v1/networks/{ref}/tokens", NETWORK_ID),
        "GetNetwork": ("get", "/v1/networks/{ref}", NETWORK_ID),
        "ListPeers": ("get", "/v1/networks/{ref}/peers", NETWORK_ID),
        "ListHosts": ("get", "/v1/networks/{ref}/hosts", NETWORK_ID),
        "ListTokens": ("get", "/v1/networks/{ref}/tokens", NETWORK_ID),
        "DeleteNetwork": ("delete", "/v1/networks/{ref}", NETWORK_ID),
    },
    ("post", "/v1/networks/{ref}/tokens", "201"): {
        "Join": (  # as a new host (re-joining is another story: proof or credential)
            "post",
            "/v1/join",
            {"requestBody": {"token": "$response.body#/token", "host_id": None, "replace": False}},
        ),
        "RevokeToken": (
            "delete",
            "/v1/networks/{ref}/tokens/{token_id}",
            {"path.ref": "$response.body#/network_id", "path.token_id": "$response.body#/id"},
        ),
    },
    ("post", "/v1/join", "200"): {
        "Heartbeat": ("post", "/v1/hosts/{host_id}/heartbeat", HOST_ID),
        "UpdateEndpoints": ("put", "/v1/hosts/{host_id}/endpoints", HOST_ID),
        "GetHost": ("get", "/v1/hosts/{host_id}", HOST_ID),
        "Leave": ("delete", "/v1/hosts/{host_id}", HOST_ID),
    },
    ("delete", "/v1/hosts/{host_id}", "200"): {
        "DeleteNetwork": (
            "delete",
            "/v1/networks/{ref}",
            {"path.ref": "$response.body#/network_id"},
        ),
    },
}


def contract(
    auth: Auth, errors: Mapping[int, Iterable[str]] | None = None, etcd: bool = True
) -> dict[str, Any]:
    """Route decorator keywords: the security ``auth`` accepts, and every error status
    with its codes (``errors``: status → codes beyond the common ones). The statuses any
    caller can meet (401/403 with a credential, 429, 500, 503 for ``etcd``) are added;
    413 and 422 are added by ``install`` where the operation takes input."""
    statuses: dict[int, list[str]] = {429: [], 500: []}
    if etcd:
        statuses[503] = []
    if any(auth):  # a bearer is checked (even the optional one of the join)
        statuses[401], statuses[403] = [], []
    for status, codes in (errors or {}).items():
        statuses.setdefault(status, []).extend(codes)
    responses = {status: _error(status, codes) for status, codes in sorted(statuses.items())}
    security: list[dict[str, list[str]]] = [{name: []} if name else {} for name in auth]
    return {"responses": responses, "openapi_extra": {"security": security}}


def _error(status: int, codes: Iterable[str]) -> dict[str, Any]:
    """One error response: the shared schema, its code narrowed to ``codes``."""
    enum = sorted({*COMMON_CODES.get(status, ()), *codes})
    schema = {"allOf": [{"$ref": ERROR_REF}, {"properties": {"error": {"enum": enum}}}]}
    response: dict[str, Any] = {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": schema}},
    }
    if status == 429:
        response["headers"] = RETRY_AFTER
    return response


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` the whole truth: security schemes, the error schema, and the
    statuses the middleware answers for any operation that takes input (413, 422)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        components = doc.setdefault("components", {})
        components["securitySchemes"] = SECURITY_SCHEMES
        schemas = components.setdefault("schemas", {})
        for model in (ApiErrorBody, PeerEvent):
            _add_model(schemas, model)
        schemas.pop("HTTPValidationError", None)  # 422s are ApiErrorBody here
        schemas.pop("ValidationError", None)
        for methods in doc.get("paths", {}).values():
            for op in methods.values():
                _complete(op)
        _link(doc["paths"])
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    )
    schemas.update(schema.pop("$defs", {}))
    schemas.setdefault(model.__name__, schema)


def _complete(op: dict[str, Any]) -> None:
    responses = op.setdefault("responses", {})
    where = {p.get("in") for p in op.get("parameters", [])}
    if "requestBody" in op:
        for status in ("400", "413"):
            responses.setdefault(status, _error(int(status), ()))
    # FastAPI's own 422 (HTTPValidationError) goes; ours is there if anything is validated.
    if "HTTPValidationError" in json.dumps(responses.get("422", {})):
        del responses["422"]
    if ("requestBody" in op or "query" in where) and "422" not in responses:
        responses["422"] = _error(422, ())
    if "path" in where and "404" not in responses:  # an id with a '/' matches no route
        responses["404"] = _error(404, ())
    op["responses"] = dict(sorted(responses.items()))


def _link(paths: dict[str, Any]) -> None:
    """Add ``LINKS`` to the responses they start from (routes not in this app: none)."""
    for (method, path, status), links in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        for name, (to_method, to_path, how) in links.items():
            target = paths.get(to_path, {}).get(to_method)
            if target is None:
                continue
            link: dict[str, Any] = {"operationId": target["operationId"]}
            params = {k: v for k, v in how.items() if k != "requestBody"}
            if params:
                link["parameters"] = params
            if "requestBody" in how:
                link["requestBody"] = how["requestBody"]
            response.setdefault("links", {})[name] = link


def main() -> None:
    """Print the document of a controller built with default settings (no etcd needed)."""
    from controller.api import create_app
    from controller.config import Settings

    app = create_app(Settings(admin_token="unused-for-the-document"))
    json.dump(app.openapi(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
