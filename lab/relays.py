"""Relays (``python -m agent.relay``) in a lab namespace, for tests and benchmarks."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from lab.multicloud import MultiCloud

RELAY_PORTS = (40000, 40099)
METRICS_PORT = 9465


class Relay:
    """``python -m agent.relay`` in a namespace, stopped by the fixture."""

    def __init__(
        self, net: MultiCloud, ns: str, relay_id: str, host_no: int, etcd_url: str, log: Path
    ) -> None:
        self.log, self.id, self.net, self.ns = log, relay_id, net, ns
        self.address = f"{net.inet}.{host_no}"
        # Forwarding on: latched pairs are forwarded by the kernel (--kernel auto).
        net.run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # A short lease: a killed relay's pairs move within ~3 s.
        self.proc = net.popen(
            ns,
            [
                sys.executable,
                "-m",
                "agent.relay",
                "--id",
                relay_id,
                "--address",
                self.address,
                "--ports",
                f"{RELAY_PORTS[0]}-{RELAY_PORTS[1]}",
                "--etcd",
                etcd_url,
                "--ttl",
                "3",
                "--metrics-port",
                str(METRICS_PORT),
                "--log-level",
                "debug",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )

    def counts(self) -> dict[str, float]:
        """The relay's packet counters by outcome, from its /metrics; ``kernel``: the
        packets its kernel flows forwarded."""
        url = f"http://{self.address}:{METRICS_PORT}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("cladnet_relay_packets_total{"):
                label, value = line.split("}")
                out[label.split('"')[1]] = float(value)
            elif line.startswith("cladnet_relay_kernel_packets_total "):
                out["kernel"] = float(line.split()[1])
        return out

    def kill(self) -> None:
        """Die as a relay machine does: no lease revoke, and its kernel flows gone with it
        (a SIGKILLed process alone leaves its table forwarding until the pairs move)."""
        self.proc.kill()
        self.proc.wait(5)
        self.net.run(self.ns, "nft", "delete", "table", "ip", f"cl-relay-{self.id}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
