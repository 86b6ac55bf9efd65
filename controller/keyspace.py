"""Where everything lives in etcd. One place, so the layout can be read at a glance.

/cladnet/networks/<net_id>                 Network JSON
/cladnet/network-names/<name>              net_id            (unique name)
/cladnet/tokens/<token_id>                 join token record (hash only)
/cladnet/token-uses/<token_id>/<host_id>   one key per use
/cladnet/hosts/<host_id>                   host record (network, credential hash)
/cladnet/hostnames/<net_id>/<hostname>     host_id           (unique name in a network)
/cladnet/ips/<net_id>/<ip>                 host_id           (unique overlay IP)
/cladnet/public-keys/<net_id>/<key hex>    host_id           (unique WireGuard key)
/cladnet/challenges/<net_id>/<host_id>     the host's open key challenge (one per host,
                                           a new one replaces it, used once)
/cladnet/peers/<net_id>/<host_id>          Peer JSON — the watched prefix
/cladnet/peers/<net_id>/~policy            the network's access policy (versioned): in
                                           the watched prefix so that agents get it in
                                           the same ordered stream as the peers
/cladnet/liveness/<net_id>/<host_id>       last seen + status report (changes often,
                                           kept apart so heartbeats do not wake watchers)
/cladnet/admin-tokens/<token_id>           admin token hash
/cladnet/groups/<name>                     Group JSON (members, network, deleting)
/cladnet/vms/<group>/<vm>                  Vm JSON — its state is the reconciler's to-do
/cladnet/commands/runs/<id>                CommandRun (without results) ┐ one 24 h lease
/cladnet/commands/results/<id>/<vm>        VmCommand: that VM's result  │ per command,
/cladnet/commands/queue/<host_id>/<id>     what the host's agent is to  ┘ so results expire
                                           run (removed when it starts)
/cladnet/commands/agents/<host_id>         last time the host's agent asked for commands
                                           (it accepts them; a daily lease)
/cladnet/tls/ca                            the cluster CA: {"cert", "key"} PEM
"""

from __future__ import annotations

ROOT = "/cladnet/"


def _k(*parts: str) -> bytes:
    return (ROOT + "/".join(parts)).encode()


def prefix(*parts: str) -> bytes:
    """A key prefix ending in '/', safe for prefix range reads."""
    return _k(*parts, "")


def network(net_id: str) -> bytes:
    return _k("networks", net_id)


def network_name(name: str) -> bytes:
    return _k("network-names", name)


def token(token_id: str) -> bytes:
    return _k("tokens", token_id)


def token_use(token_id: str, host_id: str) -> bytes:
    return _k("token-uses", token_id, host_id)


def token_slot(token_id: str, slot: int) -> bytes:
    """One of a limited join token's ``max_uses`` slots (value: the host that took it)."""
    return _k("token-uses", token_id, f"slot-{slot}")


def host(host_id: str) -> bytes:
    return _k("hosts", host_id)


def hostname(net_id: str, name: str) -> bytes:
    return _k("hostnames", net_id, name)


def ip(net_id: str, address: str) -> bytes:
    return _k("ips", net_id, address)


def public_key(net_id: str, key_hex: str) -> bytes:
    """The owner of a WireGuard public key (hex: base64 has '/') in a network."""
    return _k("public-keys", net_id, key_hex)


def challenge(net_id: str, host_id: str) -> bytes:
    return _k("challenges", net_id, host_id)


def peer(net_id: str, host_id: str) -> bytes:
    return _k("peers", net_id, host_id)


POLICY_SEGMENT = "~policy"  # never a host id (those are h-<hex>)


def policy(net_id: str) -> bytes:
    return _k("peers", net_id, POLICY_SEGMENT)


def is_policy(key: bytes) -> bool:
    """Whether a key of the peers prefix is a network's policy rather than a peer."""
    return key.endswith(b"/" + POLICY_SEGMENT.encode())


def liveness(net_id: str, host_id: str) -> bytes:
    return _k("liveness", net_id, host_id)


def admin_token(token_id: str) -> bytes:
    return _k("admin-tokens", token_id)


def leader(job: str) -> bytes:
    return _k("leader", job)


def audit(entry_id: str) -> bytes:
    return _k("audit", entry_id)


def last_segment(key: bytes) -> str:
    return key.decode().rsplit("/", 1)[-1]


def group(name: str) -> bytes:
    return _k("groups", name)


def vm(group_name: str, name: str) -> bytes:
    return _k("vms", group_name, name)


def command_run(command_id: str) -> bytes:
    return _k("commands", "runs", command_id)


def command_result(command_id: str, vm_name: str) -> bytes:
    return _k("commands", "results", command_id, vm_name)


def command_queue(host_id: str, command_id: str) -> bytes:
    return _k("commands", "queue", host_id, command_id)


def command_agent(host_id: str) -> bytes:
    return _k("commands", "agents", host_id)


def cluster_ca() -> bytes:
    return _k("tls", "ca")
