"""The agent's own rtnetlink client against the kernel, in a namespace of the test's own
(root): what ``ip`` shows afterwards is the judge."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import sys
from collections.abc import Iterator

import pytest

from agent import link
from agent.netlink import Netlink
from lab.netns import Namespaces, sh
from tests.support import need_root


@pytest.fixture
def ns() -> Iterator[tuple[Namespaces, str]]:
    need_root()
    spaces = Namespaces()
    name = f"cl-{spaces.tag}-nl"
    sh("ip", "netns", "add", name)
    spaces.namespaces.append(name)
    try:
        # A veth pair: the dummy module is not there on every machine (not on CI's).
        spaces.run(name, "ip", "link", "add", "cl-dummy0", "type", "veth", "peer", "cl-dummy1")
        spaces.run(name, "ip", "link", "set", "cl-dummy1", "up")
        yield spaces, name
    finally:
        spaces.cleanup()


def _ip(spaces: Namespaces, name: str, *args: str) -> list[dict]:
    return json.loads(spaces.run(name, "ip", "-j", *args).stdout)


def test_configure_sets_address_mtu_state_and_routes_and_replaces_a_stale_address(ns) -> None:
    spaces, name = ns
    asyncio.run(
        link.configure("cl-dummy0", "10.231.0.5/24", 1380, netns=name, routes=["10.232.0.0/16"])
    )
    (dev,) = _ip(spaces, name, "addr", "show", "dev", "cl-dummy0")
    assert dev["mtu"] == 1380 and "UP" in dev["flags"]
    assert [(a["local"], a["prefixlen"]) for a in dev["addr_info"] if a["family"] == "inet"] == [
        ("10.231.0.5", 24)
    ]
    routes = {r["dst"] for r in _ip(spaces, name, "route", "show", "dev", "cl-dummy0")}
    assert routes == {"10.231.0.0/24", "10.232.0.0/16"}

    # Idempotent, then a new overlay address replaces the old one (routes follow).
    asyncio.run(link.configure("cl-dummy0", "10.231.0.5/24", 1380, netns=name))
    asyncio.run(link.configure("cl-dummy0", "10.233.0.9/24", 1420, netns=name))
    (dev,) = _ip(spaces, name, "addr", "show", "dev", "cl-dummy0")
    assert dev["mtu"] == 1420
    assert [a["local"] for a in dev["addr_info"] if a["family"] == "inet"] == ["10.233.0.9"]
    routes = {r["dst"] for r in _ip(spaces, name, "route", "show", "dev", "cl-dummy0")}
    assert "10.233.0.0/24" in routes and "10.231.0.0/24" not in routes

    with Netlink(name) as nl:
        index = nl.index("cl-dummy0")
        assert index is not None
        found = [a for a in nl.addresses() if a.index == index]
        assert [a.interface for a in found] == [ipaddress.ip_interface("10.233.0.9/24")]
        assert found[0].label == "cl-dummy0"
        # The kernel's refusal arrives as OSError with its errno.
        with pytest.raises(OSError) as refused:
            nl.change_address(True, index, ipaddress.ip_interface("10.233.0.9/24"))
        assert refused.value.errno == errno.EEXIST

    assert asyncio.run(link.exists("cl-dummy0", netns=name))
    asyncio.run(link.delete("cl-dummy0", netns=name))
    assert not asyncio.run(link.exists("cl-dummy0", netns=name))
    asyncio.run(link.delete("cl-dummy0", netns=name))  # absent: nothing to do
    with pytest.raises(link.LinkError, match="no interface 'cl-dummy0'"):
        asyncio.run(link.configure("cl-dummy0", "10.231.0.5/24", 1420, netns=name))


def test_a_missing_namespace_is_a_clear_error() -> None:
    need_root()
    with pytest.raises(OSError, match="cl-no-such-ns"):
        Netlink("cl-no-such-ns")


EVENTS = """
import asyncio, subprocess, time
from agent.addresses import AddressEvents, underlay_addresses

async def main():
    events = AddressEvents()
    events.start()
    await asyncio.sleep(0.3)  # subscribed
    before = await underlay_addresses()
    subprocess.run(["ip", "addr", "add", "10.234.0.7/24", "dev", "cl-dummy0"], check=True)
    started = time.monotonic()
    await events.wait(20)
    waited = time.monotonic() - started
    after = await underlay_addresses(exclude={"cl-dummy1"})
    await events.close()
    print(before, after, round(waited, 3))

asyncio.run(main())
"""


def test_address_events_wake_the_agent_at_once(ns) -> None:
    spaces, name = ns
    out = spaces.run(name, sys.executable, "-c", EVENTS).stdout.split()
    before, after, waited = out[0], out[1], float(out[2])
    assert before == "[]" and after == "['10.234.0.7/24']"
    assert waited < 10  # an event, not the 20 s fallback timeout
