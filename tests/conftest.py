"""Fixtures that start real components: etcd and the controller, on random loopback ports."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from lab.agents import Agent
from lab.components import (
    ADMIN_TOKEN,
    MQTT_ADMIN_PASSWORD,
    Collector,
    Controller,
    Etcd,
    Mosquitto,
    free_port,
)
from lab.netns import Lab
from lab.wgpair import Node, node_pair, wireguard_missing
from tests.support import need_root

__all__ = ["ADMIN_TOKEN", "Controller", "Etcd"]

# CI explores the same examples every run: a property test fails because the code
# changed, not because today's random draw found an old corner (run locally with
# HYPOTHESIS_PROFILE=explore to search further).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Agents started by tests never touch this machine's /etc/hosts or systemd-resolved;
# the DNS tests set CLADNET_DNS and CLADNET_HOSTS_FILE (a namespace's own file) themselves.
os.environ["CLADNET_DNS"] = "off"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(data_dir=tmp_path / "mosquitto", port=free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def metrics_controller(make_controller, mosquitto: Mosquitto) -> Controller:
    """A controller that hands out per-host broker users on ``mosquitto``."""
    return make_controller(
        extra_env={
            "CLADNET_MQTT_URL": mosquitto.url,
            "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
        }
    )


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd.serving(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_controller(etcd: Etcd, tmp_path: Path) -> Iterator:
    started: list[Controller] = []

    def make(**kw) -> Controller:
        ctl = Controller(
            etcd_url=etcd.url,
            state_dir=tmp_path / f"controller-{len(started)}",
            port=free_port(),
            **kw,
        )
        started.append(ctl)
        ctl.start()
        return ctl

    try:
        yield make
    finally:
        for ctl in started:
            ctl.stop()


@pytest.fixture
def controller(make_controller) -> Controller:
    return make_controller()


@pytest.fixture
def admin(controller: Controller) -> Iterator[httpx.Client]:
    with controller.client() as c:
        yield c


@pytest.fixture
def make_collector(mosquitto: Mosquitto, tmp_path: Path) -> Iterator:
    started: list[Collector] = []

    def make(*extra: str, store: str = "sqlite") -> Collector:
        c = Collector(
            mosquitto,
            tmp_path / f"collector-{len(started)}",
            free_port(),
            store=store,
            extra_args=list(extra),
        )
        started.append(c)
        c.start()
        return c

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture
def mesh_controller(lab: Lab, etcd, tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(
        etcd_url=etcd.url, state_dir=tmp_path / "controller", port=free_port(), host=lab.gateway
    )
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop()


@pytest.fixture
def agents(lab: Lab, tmp_path: Path) -> Iterator[list[Agent]]:
    made: list[Agent] = []

    def make(n: int) -> list[Agent]:
        """Ensure hosts 1..n exist; return all of them."""
        for i in range(len(made) + 1, n + 1):
            ns = lab.add_host(i)
            made.append(Agent(lab, i, ns, tmp_path / f"agent{i}", f"cl-{lab.tag}w{i}"))
        return list(made)

    yield make  # type: ignore[misc]
    for a in made:
        a.stop(signal.SIGKILL)
    # Deleting the namespaces (lab fixture) deletes the tun devices, and wireguard-go
    # exits when its device goes; only its socket file may be left behind.
    for a in made:
        Path(f"/var/run/wireguard/{a.interface}.sock").unlink(missing_ok=True)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node]]:
    """Two namespaces on a veth pair, a configured wireguard-go device in each."""
    reason = wireguard_missing()
    if reason:
        pytest.skip(reason)
    async with node_pair() as nodes:
        yield nodes
