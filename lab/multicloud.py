"""A multi-cloud on one machine, for tests: an "internet" bridge, and clouds that are
each a router namespace doing NAT (nftables masquerade) for a private subnet of host
namespaces. Two clouds may use the same private subnet, as real clouds do.

Every name starts with ``cl-`` and a random tag; ``cleanup`` removes all of it (the
routers' nftables tables go with their namespaces).
"""

from __future__ import annotations

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

    def add_host(self, cloud_name: str, index: int) -> str:
        """Host namespace ``cl-<tag>-<cloud><index>`` at ``<subnet>.<10+index>``."""
        cloud = self.clouds[cloud_name]
        host = f"cl-{self.tag}-{cloud_name}{index}"
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
            cloud.router,
        )
        self.run(cloud.router, "ip", "link", "set", f"h{index}", "master", "lan", "up")
        self.run(host, "ip", "link", "set", "lo", "up")
        self.run(
            host, "ip", "addr", "add", f"{self.host_address(cloud_name, index)}/24", "dev", "eth0"
        )
        self.run(host, "ip", "link", "set", "eth0", "up")
        self.run(host, "ip", "route", "add", "default", "via", f"{cloud.subnet}.1")
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

    def move_public_address(self, cloud_name: str, public_host: int) -> str:
        """The cloud's NAT gets a new public address (as after a suspend/resume)."""
        cloud = self.clouds[cloud_name]
        new = f"{self.inet}.{public_host}"
        # Removing the old address also drops masquerade's connection-tracking entries.
        # (Old first: deleting a primary address deletes its secondaries with it.)
        self.run(cloud.router, "ip", "addr", "del", f"{cloud.public}/24", "dev", "wan")
        self.run(cloud.router, "ip", "addr", "add", f"{new}/24", "dev", "wan")
        cloud.public = new
        return new
