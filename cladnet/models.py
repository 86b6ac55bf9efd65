"""Domain models shared by the controller, the CLI and the tests.

They are the wire format of the controller's HTTP API (pydantic v2). The agent does
not import them (it speaks plain JSON) so that its memory footprint stays small.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from cladnet.addrspace import is_private_cidr
from cladnet.keys import validate_public_key

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_O = rf"\.{_OCTET}"
# An IPv4 interface address, prefix optional (/32): dotted quad without leading zeros.
IFACE_RE = re.compile(rf"^{_OCTET}{_O}{_O}{_O}(/(3[0-2]|[12]?[0-9]))?$")
# An overlay CIDR inside one RFC 1918 block, /8-/30 (/31 and /32 hold no host).
PRIVATE_CIDR_RE = re.compile(
    rf"^(10{_O}{_O}{_O}/([89]|[12][0-9]|30)"
    rf"|172\.(1[6-9]|2[0-9]|3[01]){_O}{_O}/(1[2-9]|2[0-9]|30)"
    rf"|192\.168{_O}{_O}/(1[6-9]|2[0-9]|30))$"
)
# 32 bytes in canonical base64 (the last character's unused bits are zero), not all zero.
PUBLIC_KEY_RE = re.compile(r"^(?!A{43}=)[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # as cladnet.policy names

DEFAULT_MTU = 1420
DEFAULT_LISTEN_PORT = 51820
DEFAULT_KEEPALIVE = 25
DEFAULT_EXPECTED_HOSTS = 100
DEFAULT_METRICS_INTERVAL = 2.0
# Hosts are named <host>.<network>.<zone>; .internal is reserved for private use.
DEFAULT_DNS_ZONE = "cladnet.internal"


def _str_schema(regex: re.Pattern[str], description: str, **extra: Any) -> WithJsonSchema:
    """The JSON schema of a string the server checks against ``regex`` (whole string), so
    the published document is exactly as strict as the validation."""
    return WithJsonSchema(
        {"type": "string", "pattern": regex.pattern, "description": description, **extra}
    )


def _name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            "must be 1-63 lowercase letters, digits or '-', not starting/ending with '-'"
        )
    return value


# A DNS zone: lowercase labels as NAME_RE, dot-separated, at most 200 characters.
ZONE_RE = re.compile(
    r"^(?=.{1,200}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def _dns_zone(value: str) -> str:
    if not ZONE_RE.fullmatch(value):
        raise ValueError("must be a DNS name: lowercase labels of letters, digits and '-'")
    return value


def _hostname(value: str) -> str:
    if not HOSTNAME_RE.fullmatch(value):
        raise ValueError("not a valid hostname")
    return value


def _iface_address(value: str) -> str:
    """An interface address with its prefix, e.g. ``10.0.1.5/24``."""
    if not IFACE_RE.fullmatch(value):
        raise ValueError(f"not an IPv4 interface address like 10.0.1.5/24: {value!r}")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"not an interface address with prefix: {value!r}") from exc
    if iface.version != 4:
        raise ValueError(f"only IPv4 underlay addresses are supported: {value!r}")
    return str(iface)


def _private_cidr(value: str) -> str:
    """An overlay CIDR inside RFC 1918; host bits are cleared (10.1.2.3/16 → 10.1.0.0/16)."""
    if not PRIVATE_CIDR_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an IPv4 CIDR (/8 to /30) inside a private RFC 1918 block "
            "(10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
        )
    net = ipaddress.IPv4Network(value, strict=False)
    if not is_private_cidr(net):  # the pattern says so already; the library agrees
        raise ValueError(f"{value!r} is not inside a private RFC 1918 block")
    return str(net)


def _public_key(value: str) -> str:
    if not PUBLIC_KEY_RE.fullmatch(value):
        raise ValueError("not a WireGuard public key (44 characters of canonical base64)")
    return validate_public_key(value)


def _labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 32:
        raise ValueError("at most 32 labels")
    for k, v in value.items():
        if not LABEL_KEY_RE.fullmatch(k):
            raise ValueError(f"invalid label key {k!r}")
        if len(v) > 128:
            raise ValueError(f"label {k!r} value longer than 128 characters")
    return value


Name = Annotated[
    str,
    AfterValidator(_name),
    _str_schema(NAME_RE, "1-63 lowercase letters, digits or '-', not starting/ending with '-'"),
]
Hostname = Annotated[str, AfterValidator(_hostname), _str_schema(HOSTNAME_RE, "a hostname")]
IfaceAddress = Annotated[
    str,
    AfterValidator(_iface_address),
    _str_schema(IFACE_RE, "an IPv4 interface address, e.g. 10.0.1.5/24 (no prefix: /32)"),
]
PrivateCidr = Annotated[
    str,
    AfterValidator(_private_cidr),
    _str_schema(
        PRIVATE_CIDR_RE,
        "an IPv4 CIDR, /8 to /30, inside an RFC 1918 block; host bits are cleared",
    ),
]
PublicKey = Annotated[
    str,
    AfterValidator(_public_key),
    _str_schema(PUBLIC_KEY_RE, "a WireGuard public key (base64, as `wg pubkey` prints it)"),
]
Labels = Annotated[
    dict[str, str],
    AfterValidator(_labels),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": 32,
            "propertyNames": {"type": "string", "pattern": LABEL_KEY_RE.pattern},
            "additionalProperties": {"type": "string", "maxLength": 128},
        }
    ),
]


def _integral(value: object) -> object:
    """JSON Schema's integer includes 2.0; strict pydantic would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# For each integer of a request body (strict models take no "1" or true for it, as the
# schema); after its Field, so the schema keeps the bounds.
INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]
Port = Annotated[int, Field(ge=1, le=65535), INTEGRAL]


class Strict(BaseModel):
    """A request body: no unknown fields and no coercion (``false`` is not a number), so
    it accepts exactly what its JSON schema allows."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- networks ---------------------------------------------------------------------------


class NetworkCreate(Strict):
    """A new network. Beyond the schema: ``cidr`` must hold ``expected_hosts`` (400
    ``cidr_too_small``, a rule between two fields that JSON Schema cannot state)."""

    name: Name
    cidr: PrivateCidr | None = None
    expected_hosts: Annotated[int, Field(ge=1, le=1_000_000), INTEGRAL] = DEFAULT_EXPECTED_HOSTS
    mtu: Annotated[int, Field(ge=1280, le=9000), INTEGRAL] = DEFAULT_MTU
    listen_port: Port = DEFAULT_LISTEN_PORT
    keepalive: Annotated[int, Field(ge=0, le=600), INTEGRAL] = DEFAULT_KEEPALIVE
    # Seconds between the agents' metric batches (the per-network metrics policy).
    metrics_interval: Annotated[float, Field(ge=1, le=3600)] = DEFAULT_METRICS_INTERVAL
    # Hosts answer to <host>.<network>.<dns_zone> (set once, at creation).
    dns_zone: Annotated[
        str, AfterValidator(_dns_zone), _str_schema(ZONE_RE, "a DNS zone, e.g. cladnet.internal")
    ] = DEFAULT_DNS_ZONE


class Network(BaseModel):
    id: str
    name: str
    cidr: str
    expected_hosts: int
    mtu: int
    listen_port: int
    keepalive: int
    created_at: float
    metrics_interval: float = DEFAULT_METRICS_INTERVAL
    dns_zone: str = DEFAULT_DNS_ZONE


# --- address spaces -----------------------------------------------------------------------


class AddressSpaceBlock(BaseModel):
    block: str
    free: list[str]
    free_addresses: int


class AddressSpaces(BaseModel):
    hosts: int
    prefix_len: int
    recommended: str | None
    blocks: list[AddressSpaceBlock]
    used: int


# --- tokens -------------------------------------------------------------------------------


class TokenCreate(Strict):
    ttl_seconds: Annotated[int, Field(ge=60, le=365 * 86400), INTEGRAL] = 86400
    max_uses: Annotated[int, Field(ge=1, le=1_000_000), INTEGRAL] | None = None
    description: Annotated[str, Field(max_length=200)] = ""


class JoinToken(BaseModel):
    id: str
    network_id: str
    expires_at: float
    max_uses: int | None
    uses: int
    description: str
    created_at: float


class AdminTokenCreate(Strict):
    role: Literal["admin", "viewer"] = "viewer"
    description: Annotated[str, Field(max_length=256)] = ""


class JoinTokenCreated(JoinToken):
    token: str  # shown once; only its hash is stored
    # With TLS: the CA's public-key hash, for `cladnet-agent join --ca-hash`.
    ca_cert_hash: str | None = None


# --- hosts and peers ----------------------------------------------------------------------


class JoinRequest(Strict):
    """A join token creates a new host. Becoming an existing host (``host_id``) needs
    ``proof`` (the answer to ``POST /v1/join/challenge``), or its current credential or
    an admin token as the bearer."""

    token: Annotated[str, Field(min_length=1, max_length=512)]
    hostname: Hostname
    # False: the machine's own name (cloned VMs share it), so a taken one gets a suffix
    # (web-2). True: the caller chose it, and a taken one is an error.
    explicit_hostname: bool = True
    public_key: PublicKey
    listen_port: Port | None = None
    addresses: Annotated[list[IfaceAddress], Field(max_length=64)] = []
    labels: Labels = {}
    host_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    proof: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    # Old clients' "take over this name": now refused without proof of the host.
    replace: bool = False


class ChallengeRequest(Strict):
    """Ask for a challenge to prove possession of ``public_key``'s private key."""

    token: Annotated[str, Field(min_length=1, max_length=512)]
    public_key: PublicKey


class ChallengeResponse(BaseModel):
    """Answer with ``cladnet.keys.answer_challenge`` in ``JoinRequest.proof``, once,
    before ``expires_at``."""

    host_id: str
    network_id: str
    ephemeral_public_key: str
    nonce: str
    expires_at: float


class Peer(BaseModel):
    """What every member of a network may know about one host (no secrets)."""

    id: str
    name: str
    network_id: str
    public_key: str
    overlay_ip: str
    listen_port: int
    addresses: list[str]
    public_address: str | None
    endpoints: list[str]
    labels: dict[str, str]
    updated_at: float
    # Set by an admin only (PUT /v1/hosts/{id}/tags); policy groups trust them.
    tags: list[str] = []
    # Written by relays (cladnet-relay), only when they change: where this host's
    # WireGuard socket is seen from ({endpoint, observer, observed_at}), whether two
    # observers saw different mappings, and peer id → relay ip:port this host sends to.
    reflexive: list[dict[str, Any]] = []
    mapping_varies: bool = False
    relays: dict[str, str] = {}


class Host(Peer):
    """The admin view of a host: a peer plus liveness."""

    created_at: float
    last_seen: float | None = None
    public_address_changed_at: float | None = None


class JoinResponse(BaseModel):
    host_id: str
    hostname: str  # the host's name in the network
    # The requested hostname when it was taken and the host got another (web → web-2).
    renamed_from: str | None = None
    credential: str
    overlay_ip: str
    prefix_len: int
    network: Network
    observed_address: str
    peers_url: str


class Heartbeat(Strict):
    addresses: Annotated[list[IfaceAddress], Field(max_length=64)] | None = None
    listen_port: Port | None = None


class HeartbeatResponse(BaseModel):
    host_id: str
    observed_address: str
    changed: bool
    server_time: float


class EndpointsUpdate(Strict):
    addresses: Annotated[list[IfaceAddress], Field(max_length=64)] | None = None
    listen_port: Port | None = None
    public_key: PublicKey | None = None
    endpoints: (
        Annotated[list[Annotated[str, Field(max_length=255)]], Field(max_length=16)] | None
    ) = None


class PeerList(BaseModel):
    """One page of a network's peers (all of them without ``limit``), read at ``revision``;
    ``continue`` fetches the next page at the same revision."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    network_id: str
    revision: int
    peers: list[Peer]
    continue_token: str | None = Field(default=None, alias="continue")
    # The access policy's enforced part (controller.policy.public_view), None from
    # controllers without policies.
    policy: dict[str, Any] | None = None


class PeerEvent(BaseModel):
    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "POLICY"]
    revision: int
    peer: Peer | None = None
    id: str | None = None
    policy: dict[str, Any] | None = None


def _tags(value: list[str]) -> list[str]:
    for tag in value:
        if not TAG_RE.match(tag):
            raise ValueError(f"invalid tag {tag!r}")
    return sorted(set(value))


class TagsUpdate(Strict):
    """A host's complete set of tags (replaces the old one)."""

    tags: Annotated[
        list[Annotated[str, Field(pattern=TAG_RE.pattern)]],
        Field(max_length=32),
        AfterValidator(_tags),
    ]


# --- groups of VMs -------------------------------------------------------------------------


class GroupMember(Strict):
    """``count`` VMs from one driver in one region."""

    driver: Name
    region: Annotated[str, Field(min_length=1, max_length=64)]
    count: Annotated[int, Field(ge=1, le=100), INTEGRAL] = 1
    image: Annotated[str, Field(max_length=200)] = "debian-12"
    size: Annotated[str, Field(max_length=64)] = "small"
    labels: Labels = Field(default_factory=dict)


class GroupCreate(Strict):
    name: Name
    members: Annotated[list[GroupMember], Field(min_length=1, max_length=20)]
    cidr: PrivateCidr | None = None  # the group's network; recommended space when absent
    keepalive: Annotated[int, Field(ge=0, le=600), INTEGRAL] = DEFAULT_KEEPALIVE
    metrics_interval: Annotated[float, Field(ge=1, le=3600)] = DEFAULT_METRICS_INTERVAL
    # The VMs' agents run the admin's remote commands (as root): only when asked for.
    allow_commands: bool = False


class GroupAction(Strict):
    action: Literal["suspend", "resume", "reboot", "terminate", "retry"]


class Vm(BaseModel):
    """A VM of a group as the controller tracks it (``details``: the driver's own ids)."""

    name: str
    group: str
    driver: str
    region: str
    state: str
    error: str | None = None
    failed_op: str | None = None
    private_ip: str | None = None
    public_ip: str | None = None
    overlay_ip: str | None = None
    details: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    image: str = "debian-12"
    size: str = "small"
    updated_at: float = 0.0


class Group(BaseModel):
    name: str
    network: str  # the network's name (same as the group's)
    network_id: str | None = None  # set once the reconciler made the network
    members: list[GroupMember]
    cidr: str | None = None
    keepalive: int = DEFAULT_KEEPALIVE
    metrics_interval: float = DEFAULT_METRICS_INTERVAL
    allow_commands: bool = False
    created_at: float
    deleting: bool = False
    state: str = ""  # derived when read: see cladnet.groups.group_state
    counts: dict[str, int] = Field(default_factory=dict)
    vms: list[Vm] = Field(default_factory=list)


# --- remote commands on a group's VMs ---------------------------------------------------

# Bytes of stdout and of stderr kept per VM (the agent cuts, the controller checks).
COMMAND_OUTPUT_LIMIT = 64 * 1024


class CommandRequest(Strict):
    command: Annotated[str, Field(min_length=1, max_length=4096)]
    timeout: Annotated[float, Field(gt=0, le=600)] = 60


class CommandReport(Strict):
    """An agent's report on one command: it started, or how it ended."""

    state: Literal["running", "done", "timeout", "error"]
    exit_code: Int | None = None
    stdout: Annotated[str, Field(max_length=COMMAND_OUTPUT_LIMIT)] = ""
    stderr: Annotated[str, Field(max_length=COMMAND_OUTPUT_LIMIT)] = ""
    truncated: bool = False
    error: Annotated[str, Field(max_length=1000)] | None = None


class VmCommand(BaseModel):
    """One VM's part of a command: pending|running|done|timeout|refused|error."""

    state: str
    host_id: str | None = None
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


class CommandRun(BaseModel):
    """A command sent to every VM of a group, with each VM's result."""

    id: str
    group: str
    command: str
    timeout: float
    created_at: float
    by: str
    vms: dict[str, VmCommand] = Field(default_factory=dict)


class ApiErrorBody(BaseModel):
    """Every error the API answers: a stable machine-readable code and a readable message.
    The document lists, per operation and status, the codes it can carry."""

    error: str = Field(description="a stable code, e.g. network_not_found")
    message: str = Field(description="what went wrong, for people")


Host.model_rebuild()


# --- answers that are small records of their own -----------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Ready(BaseModel):
    status: Literal["ready"]
    etcd_version: str
    leader: bool


class CaCertificate(BaseModel):
    """The CA that signed the controller's certificate; agents pin ``ca_hash``."""

    ca_pem: str
    ca_hash: str


class AdminToken(BaseModel):
    """An operator token's record (never its secret or hash)."""

    id: str
    role: Literal["admin", "viewer"]
    description: str
    created_at: float


class AdminTokenCreated(AdminToken):
    token: str  # shown once; only its hash is stored


class AuditEntry(BaseModel):
    ts: float
    who: str
    method: str
    path: str
    status: int
    source: str
    detail: dict[str, Any] | None = None


class AuditPage(BaseModel):
    """Audit entries, newest first; ``continue`` fetches older ones."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    entries: list[AuditEntry]
    continue_token: str | None = Field(default=None, alias="continue")


class DriverRegion(BaseModel):
    name: str
    zones: list[str]
    details: dict[str, str]


class DriverInfo(BaseModel):
    name: str
    regions: list[DriverRegion]


class MetricsCredentials(BaseModel):
    """Where and as whom a host publishes its metrics (no user on an open broker)."""

    interval: float
    broker: str
    username: str | None
    password: str | None
    topic: str
    ack_topic: str


class QueuedCommand(BaseModel):
    id: str
    command: str
    timeout: float
    created_at: float


class HostCommands(BaseModel):
    commands: list[QueuedCommand]
