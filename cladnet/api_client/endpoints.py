"""Every controller and collector call the CLI and the agent make: method, path and the
typed shapes of request and answer, described once and used by both transports
(:mod:`cladnet.api_client.sync` for the CLI, :mod:`cladnet.api_client.aio` for the agent).

Shapes are ``TypedDict`` (plain dicts at run time: no pydantic in the agent's client).
Resource objects the callers keep or pass on verbatim (a network, a host, a group, a
policy) are ``dict[str, Any]``; their fields are in ``openapi.json``. Envelopes whose
fields the callers read are typed field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, NotRequired, TypedDict, TypeVar
from urllib.parse import quote

Body = TypeVar("Body")
Answer = TypeVar("Answer")

# Objects carried verbatim (see openapi.json for their fields).
Json = dict[str, Any]
Network = dict[str, Any]
Host = dict[str, Any]
Peer = dict[str, Any]
Group = dict[str, Any]


@dataclass(frozen=True)
class Endpoint(Generic[Body, Answer]):
    """One operation: ``path`` may hold ``{name}`` parameters, filled (URL-quoted) by
    :meth:`path_for`. ``Body`` is what it takes (``None``: no body), ``Answer`` what a
    2xx carries (``None``: nothing to read)."""

    method: str
    path: str

    def path_for(self, **params: str) -> str:
        """The path with its parameters filled in, each quoted as one segment."""
        return self.path.format(**{k: quote(str(v), safe="") for k, v in params.items()})


# --- request bodies ------------------------------------------------------------------------


class JoinBody(TypedDict):
    token: str
    hostname: NotRequired[str]
    explicit_hostname: NotRequired[bool]
    public_key: NotRequired[str]
    listen_port: NotRequired[int]
    addresses: NotRequired[list[str]]
    labels: NotRequired[dict[str, str]]
    host_id: NotRequired[str]
    proof: NotRequired[str]


class ChallengeBody(TypedDict):
    token: str
    public_key: str


class HeartbeatBody(TypedDict, total=False):
    addresses: list[str]
    listen_port: int


class EndpointsBody(TypedDict, total=False):
    addresses: list[str]
    listen_port: int
    public_key: str
    endpoints: list[str]


class NetworkCreateBody(TypedDict, total=False):
    name: str
    cidr: str
    expected_hosts: int
    mtu: int
    listen_port: int
    keepalive: int


class TokenCreateBody(TypedDict, total=False):
    ttl_seconds: int
    max_uses: int


class TagsBody(TypedDict):
    tags: list[str]


class ActionBody(TypedDict):
    action: str


# --- answers ----------------------------------------------------------------------------


class Challenge(TypedDict):
    host_id: str
    network_id: str
    ephemeral_public_key: str
    nonce: str
    expires_at: float


class Joined(TypedDict):
    host_id: str
    hostname: str
    renamed_from: NotRequired[str | None]
    credential: str
    overlay_ip: str
    prefix_len: int
    network: Network
    observed_address: str
    peers_url: str


class HeartbeatReply(TypedDict):
    host_id: str
    observed_address: str
    changed: bool
    server_time: float


class PeerPage(TypedDict):
    network_id: str
    revision: int
    peers: list[Peer]
    # "continue" is a keyword: read it with .get("continue").
    policy: NotRequired[Json | None]


class QueuedCommand(TypedDict):
    id: str
    command: str
    timeout: float
    created_at: float


class HostCommands(TypedDict):
    commands: list[QueuedCommand]


class MetricsCredentials(TypedDict):
    interval: float
    broker: str
    username: str | None
    password: str | None
    topic: str
    ack_topic: str


class TokenCreated(TypedDict):
    id: str
    token: str
    uses: int
    max_uses: int | None
    expires_at: float
    ca_cert_hash: NotRequired[str | None]


class CaCertificate(TypedDict):
    ca_pem: str


# --- the controller ---------------------------------------------------------------------

HEALTH: Endpoint[None, Json] = Endpoint("GET", "/healthz")
READY: Endpoint[None, Json] = Endpoint("GET", "/readyz")
CA: Endpoint[None, CaCertificate] = Endpoint("GET", "/v1/ca")
ADDRESS_SPACES: Endpoint[None, Json] = Endpoint("GET", "/v1/address-spaces")

NETWORKS: Endpoint[None, list[Network]] = Endpoint("GET", "/v1/networks")
NETWORK_CREATE: Endpoint[NetworkCreateBody, Network] = Endpoint("POST", "/v1/networks")
NETWORK: Endpoint[None, Network] = Endpoint("GET", "/v1/networks/{ref}")
NETWORK_DELETE: Endpoint[None, Network] = Endpoint("DELETE", "/v1/networks/{ref}")
NETWORK_HOSTS: Endpoint[None, list[Host]] = Endpoint("GET", "/v1/networks/{ref}/hosts")
NETWORK_PEERS: Endpoint[None, PeerPage] = Endpoint("GET", "/v1/networks/{ref}/peers")
TOKENS: Endpoint[None, list[Json]] = Endpoint("GET", "/v1/networks/{ref}/tokens")
TOKEN_CREATE: Endpoint[TokenCreateBody, TokenCreated] = Endpoint(
    "POST", "/v1/networks/{ref}/tokens"
)
TOKEN_REVOKE: Endpoint[None, None] = Endpoint("DELETE", "/v1/networks/{ref}/tokens/{token_id}")
POLICY: Endpoint[None, Json] = Endpoint("GET", "/v1/networks/{ref}/policy")
POLICY_PUT: Endpoint[Json, Json] = Endpoint("PUT", "/v1/networks/{ref}/policy")
POLICY_TEST: Endpoint[Json, Json] = Endpoint("POST", "/v1/networks/{ref}/policy/test")
POLICY_EXPLAIN: Endpoint[None, Json] = Endpoint("GET", "/v1/networks/{ref}/policy/explain")

JOIN: Endpoint[JoinBody, Joined] = Endpoint("POST", "/v1/join")
JOIN_CHALLENGE: Endpoint[ChallengeBody, Challenge] = Endpoint("POST", "/v1/join/challenge")
HOST: Endpoint[None, Host] = Endpoint("GET", "/v1/hosts/{host_id}")
HOST_LEAVE: Endpoint[None, Peer] = Endpoint("DELETE", "/v1/hosts/{host_id}")
HOST_TAGS: Endpoint[TagsBody, Peer] = Endpoint("PUT", "/v1/hosts/{host_id}/tags")
HEARTBEAT: Endpoint[HeartbeatBody, HeartbeatReply] = Endpoint(
    "POST", "/v1/hosts/{host_id}/heartbeat"
)
ENDPOINTS: Endpoint[EndpointsBody, Peer] = Endpoint("PUT", "/v1/hosts/{host_id}/endpoints")
METRICS_CREDENTIALS: Endpoint[None, MetricsCredentials] = Endpoint(
    "POST", "/v1/hosts/{host_id}/metrics-credentials"
)
HOST_COMMANDS: Endpoint[None, HostCommands] = Endpoint("GET", "/v1/hosts/{host_id}/commands")
COMMAND_REPORT: Endpoint[Json, None] = Endpoint("POST", "/v1/hosts/{host_id}/commands/{command_id}")

GROUPS: Endpoint[None, list[Group]] = Endpoint("GET", "/v1/groups")
GROUP_CREATE: Endpoint[Json, Group] = Endpoint("POST", "/v1/groups")
GROUP: Endpoint[None, Group] = Endpoint("GET", "/v1/groups/{name}")
GROUP_DELETE: Endpoint[None, Group] = Endpoint("DELETE", "/v1/groups/{name}")
GROUP_ACTION: Endpoint[ActionBody, Group] = Endpoint("POST", "/v1/groups/{name}/actions")
VM_ACTION: Endpoint[ActionBody, Json] = Endpoint("POST", "/v1/groups/{name}/vms/{vm}/actions")
GROUP_COMMAND: Endpoint[Json, Json] = Endpoint("POST", "/v1/groups/{name}/commands")
GROUP_COMMAND_RUN: Endpoint[None, Json] = Endpoint("GET", "/v1/groups/{name}/commands/{command_id}")

# --- the collector ----------------------------------------------------------------------

PAIRS: Endpoint[None, Json] = Endpoint("GET", "/v1/networks/{name}/pairs")
METRICS_LATEST: Endpoint[None, Json] = Endpoint("GET", "/v1/metrics/latest")
METRIC_NAMES: Endpoint[None, Json] = Endpoint("GET", "/v1/metrics/names")
SERIES: Endpoint[None, Json] = Endpoint("GET", "/v1/series")
ALARMS: Endpoint[None, Json] = Endpoint("GET", "/v1/alarms")
ALARM_CREATE: Endpoint[Json, Json] = Endpoint("POST", "/v1/alarms")
ALARM_DELETE: Endpoint[None, Json] = Endpoint("DELETE", "/v1/alarms/{rule_id}")

# The collector's API is not in the controller's openapi.json (tests check the others are).
COLLECTOR = (PAIRS, METRICS_LATEST, METRIC_NAMES, SERIES, ALARMS, ALARM_CREATE, ALARM_DELETE)
