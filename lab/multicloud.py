"""A multi-cloud on one machine, for tests: an "internet" bridge, and clouds that are
each a router namespace doing NAT (nftables masquerade) for a private subnet of host
namespaces. Two clouds may use the same private subnet, as real clouds do.

Every name starts with ``cl-`` and a random tag; ``cleanup`` removes all of it (the
routers' nftables tables go with their namespaces).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lab.netns import Namespaces, free_prefix, sh


@dataclass
class Cloud:
    name: str  # one letter: a, b, c
    subnet: str  # e.g. "192.168.1" → router .1, hosts .11, .12 …
    public: str  # the router's address on the internet bridge
    router: str = ""
    hosts: list[str] = field(default_factory=list)
    forwards: dict[int, str] = field(default_factory=dict)  # public UDP port → private ip


@dataclass(kw_only=True)
class MultiCloud(Namespaces):
    """``internet`` is ``<inet>.0/24`` on a bridge in the root namespace (``.1`` is ours)."""

    inet: str = field(default_factory=lambda: free_prefix([f"172.29.{n}" for n in range(256)]))
    clouds: dict[str, Cloud] = field(default_factory=dict)
    # cloud name → its inner router, for stacked NATs (add_cgnat)
    inner: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bridge = f"cl-{self.tag}-net"
        self.add_bridge(self.bridge, self.gateway)

    @property
    def gateway(self) -> str:
        """Our address on the internet: where the controller and broker listen."""
        return f"{self.inet}.1"

    def add_cloud(self, name: str, subnet: str, public_host: int, nat: str = "masquerade") -> Cloud:
        """A cloud whose router NATs with ``nat`` (e.g. ``masquerade fully-random``: a new
        port per destination, as the big clouds' NAT gateways do)."""
        cloud = Cloud(name, subnet, f"{self.inet}.{public_host}")
        cloud.router = f"cl-{self.tag}-r{name}"
        sh("ip", "netns", "add", cloud.router)
        self.namespaces.append(cloud.router)
        outside = f"cl-{self.tag}-w{name}"
        sh(
            "ip",
            "link",
            "add",
            outside,
            "type",
            "veth",
            "peer",
            "name",
            "wan",
            "netns",
            cloud.router,
        )
        self.links.append(outside)
        sh("ip", "link", "set", outside, "master", self.bridge, "up")
        r = cloud.router
        self.run(r, "ip", "link", "set", "lo", "up")
        self.run(r, "ip", "addr", "add", f"{cloud.public}/24", "dev", "wan")
        self.run(r, "ip", "link", "set", "wan", "up")
        self.run(r, "ip", "link", "add", "lan", "type", "bridge")
        self.run(r, "ip", "addr", "add", f"{subnet}.1/24", "dev", "lan")
        self.run(r, "ip", "link", "set", "lan", "up")
        self.run(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")  # this namespace only
        self.run(r, "nft", "add table ip cl-nat")
        chain = "add chain ip cl-nat post { type nat hook postrouting priority 100 ; }"
        self.run(r, "nft", chain)
        self.run(r, "nft", f'add rule ip cl-nat post oifname "wan" {nat}')
        self.run(r, "nft", "add chain ip cl-nat pre { type nat hook prerouting priority -100 ; }")
        self.clouds[name] = cloud
        return cloud

    def drop_unsolicited(self, cloud_name: str) -> None:
        """The router accepts no UDP of its own on ``wan``, as a NAT gateway does.

        Without it, a peer's packet that reaches the router before its host has sent
        leaves a conntrack entry on the router, and the host's own packet then gets
        another port (a tuple clash). Dropped at input, the entry is never confirmed.
        """
        router = self.clouds[cloud_name].router
        self.run(router, "nft", "add table ip cl-fw")
        self.run(router, "nft", "add chain ip cl-fw in { type filter hook input priority 0 ; }")
        self.run(router, "nft", 'add rule ip cl-fw in iifname "wan" meta l4proto udp drop')

    def one_to_one(self, cloud_name: str, private_ip: str) -> None:
        """Every packet to the cloud's public address goes to ``private_ip`` (a 1:1 NAT,
        as a cloud's "public IP" of a VM): masquerade out, DNAT of everything in. No
        ``daddr`` in the rule, so it follows the address when it moves."""
        router = self.clouds[cloud_name].router
        self.run(router, "nft", f'add rule ip cl-nat pre iifname "wan" dnat to {private_ip}')

    def add_cgnat(self, name: str, subnet: str, public_host: int, link: str = "100.64.1") -> Cloud:
        """Two stacked NATs (carrier-grade NAT): hosts on ``subnet`` behind an inner
        router ``cl-<tag>-i<name>`` that masquerades to ``<link>.2``, on a
        ``<link>.0/24`` link (inside 100.64.0.0/10) to the outer router, the cloud's
        router, which masquerades to the internet. Both drop unsolicited UDP.
        ``add_host(name, i)`` puts hosts behind the inner one."""
        outer = self.add_cloud(name, link, public_host)  # its "lan" is the 100.64 link
        self.drop_unsolicited(name)
        inner = f"cl-{self.tag}-i{name}"
        sh("ip", "netns", "add", inner)
        self.namespaces.append(inner)
        sh(
            "ip",
            "link",
            "add",
            "wan",
            "netns",
            inner,
            "type",
            "veth",
            "peer",
            "name",
            "cgn",
            "netns",
            outer.router,
        )
        self.run(outer.router, "ip", "link", "set", "cgn", "master", "lan", "up")
        # The outer NAT translates only the carrier's range (as a CGN does).
        self.run(outer.router, "nft", "flush chain ip cl-nat post")
        rule = 'add rule ip cl-nat post oifname "wan" ip saddr 100.64.0.0/10 masquerade'
        self.run(outer.router, "nft", rule)
        self.run(inner, "ip", "link", "set", "lo", "up")
        self.run(inner, "ip", "addr", "add", f"{link}.2/24", "dev", "wan")
        self.run(inner, "ip", "link", "set", "wan", "up")
        self.run(inner, "ip", "route", "add", "default", "via", f"{link}.1")
        self.run(inner, "ip", "link", "add", "lan", "type", "bridge")
        self.run(inner, "ip", "addr", "add", f"{subnet}.1/24", "dev", "lan")
        self.run(inner, "ip", "link", "set", "lan", "up")
        self.run(inner, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.run(inner, "nft", "add table ip cl-nat")
        chain = "add chain ip cl-nat post { type nat hook postrouting priority 100 ; }"
        self.run(inner, "nft", chain)
        self.run(inner, "nft", 'add rule ip cl-nat post oifname "wan" masquerade')
        self.run(inner, "nft", "add table ip cl-fw")
        self.run(inner, "nft", "add chain ip cl-fw in { type filter hook input priority 0 ; }")
        self.run(inner, "nft", 'add rule ip cl-fw in iifname "wan" meta l4proto udp drop')
        # Hosts attach to the inner router; the outer one stays the cloud's public face.
        self.clouds[name] = Cloud(name, subnet, outer.public, router=outer.router)
        self.inner[name] = inner
        return self.clouds[name]

    def add_lan(self, cloud_name: str, bridge: str, subnet: str) -> None:
        """A second private subnet on the cloud's router (``<subnet>.1`` on ``bridge``),
        NATed the same way but with no route to the first one: the router drops
        forwarding between its LANs. Hosts join it with ``add_host(…, lan=bridge)``."""
        router = self.clouds[cloud_name].router
        self.run(router, "ip", "link", "add", bridge, "type", "bridge")
        self.run(router, "ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
        self.run(router, "ip", "link", "set", bridge, "up")
        self.run(router, "nft", "add table ip cl-lans")
        chain = "add chain ip cl-lans between { type filter hook forward priority 0 ; }"
        self.run(router, "nft", chain)
        for a, b in (("lan", bridge), (bridge, "lan")):
            self.run(router, "nft", f'add rule ip cl-lans between iifname "{a}" oifname "{b}" drop')

    def add_host(
        self, cloud_name: str, index: int, lan: str = "lan", subnet: str | None = None
    ) -> str:
        """Host namespace ``cl-<tag>-<cloud><index>`` at ``<subnet>.<10+index>`` (the
        cloud's subnet, or ``subnet`` on the router's other bridge ``lan``)."""
        cloud = self.clouds[cloud_name]
        host = f"cl-{self.tag}-{cloud_name}{index}"
        router = self.inner.get(cloud_name, cloud.router)
        prefix = subnet or cloud.subnet
        sh("ip", "netns", "add", host)
        self.namespaces.append(host)
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            host,
            "type",
            "veth",
            "peer",
            "name",
            f"h{index}",
            "netns",
            router,
        )
        self.run(router, "ip", "link", "set", f"h{index}", "master", lan, "up")
        self.run(host, "ip", "link", "set", "lo", "up")
        self.run(host, "ip", "addr", "add", f"{prefix}.{10 + index}/24", "dev", "eth0")
        self.run(host, "ip", "link", "set", "eth0", "up")
        self.run(host, "ip", "route", "add", "default", "via", f"{prefix}.1")
        cloud.hosts.append(host)
        return host

    def add_public_host(self, name: str, public_host: int) -> str:
        """Host namespace ``cl-<tag>-<name>`` right on the internet at ``<inet>.<n>``."""
        host = f"cl-{self.tag}-{name}"
        sh("ip", "netns", "add", host)
        self.namespaces.append(host)
        outside = f"cl-{self.tag}-w{name}"
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host)
        self.links.append(outside)
        sh("ip", "link", "set", outside, "master", self.bridge, "up")
        self.run(host, "ip", "link", "set", "lo", "up")
        self.run(host, "ip", "addr", "add", f"{self.inet}.{public_host}/24", "dev", "eth0")
        self.run(host, "ip", "link", "set", "eth0", "up")
        return host

    def forward(self, cloud_name: str, port: int, private_ip: str) -> None:
        """Port-forward ``<public>:port/udp`` to a host, as a cloud's NAT rule does.

        Without it, two hosts behind two Linux masquerading NATs rarely meet: the first
        packet to reach a NAT before its own host has sent creates a conntrack entry on
        the router itself, the host's reply then gets a different source port, and the
        peer's endpoint is wrong. Port-mapped NAT (or a 1:1 public IP) is what clouds
        offer VMs that must accept traffic.
        """
        cloud = self.clouds[cloud_name]
        cloud.forwards[port] = private_ip
        self._apply_forwards(cloud)

    def _apply_forwards(self, cloud: Cloud) -> None:
        self.run(cloud.router, "nft", "flush chain ip cl-nat pre")
        for port, ip in cloud.forwards.items():
            rule = f'add rule ip cl-nat pre iifname "wan" udp dport {port} dnat to {ip}:{port}'
            self.run(cloud.router, "nft", rule)

    def move_host(self, cloud_name: str, index: int, generation: int) -> str:
        """Give a host a new private address (its port-forwards follow, as in a cloud)."""
        cloud = self.clouds[cloud_name]
        host = f"cl-{self.tag}-{cloud_name}{index}"
        old = self.host_address(cloud_name, index)
        new = self.host_address(cloud_name, index, generation)
        self.run(host, "ip", "addr", "del", f"{old}/24", "dev", "eth0")
        self.run(host, "ip", "addr", "add", f"{new}/24", "dev", "eth0")
        self.run(host, "ip", "route", "replace", "default", "via", f"{cloud.subnet}.1")
        cloud.forwards = {p: (new if ip == old else ip) for p, ip in cloud.forwards.items()}
        self._apply_forwards(cloud)
        return new

    def host_address(self, cloud_name: str, index: int, generation: int = 0) -> str:
        return f"{self.clouds[cloud_name].subnet}.{10 + index + 100 * generation}"

    def move_public_address(self, cloud_name: str, public_host: int, flush: bool = False) -> str:
        """The cloud's NAT gets a new public address (as after a suspend/resume).

        ``flush``: every connection-tracking entry of the router goes too, as when a
        cloud re-assigns a NAT's address (without it, entries a DNAT made for inbound
        flows outlive the address)."""
        cloud = self.clouds[cloud_name]
        new = f"{self.inet}.{public_host}"
        # Removing the old address also drops masquerade's connection-tracking entries.
        # (Old first: deleting a primary address deletes its secondaries with it.)
        self.run(cloud.router, "ip", "addr", "del", f"{cloud.public}/24", "dev", "wan")
        self.run(cloud.router, "ip", "addr", "add", f"{new}/24", "dev", "wan")
        if flush:  # no conntrack tool here: pyroute2's ctnetlink, inside the router's netns
            code = "from pyroute2.conntrack import Conntrack; Conntrack().flush()"
            self.run(cloud.router, sys.executable, "-c", code)
        cloud.public = new
        return new
