"""A real multi-cloud on one Linux machine (root): the ``local`` driver.

- The "internet" is a bridge in the root namespace, ``<internet>`` with ``.0.1`` ours
  (the controller listens there).
- A cloud is a router namespace on the internet with a public ``/24`` of its own and,
  per region, a private subnet on a bridge inside the router. Two clouds may use the
  same private subnet, as real clouds do.
- A VM is a namespace on its region's bridge with a private address and a public one
  by stateless 1:1 NAT on its router (nftables ``notrack`` rewrites, so a new public
  address takes effect at once, with no stale connection tracking). Its first boot
  runs the user-data; later boots run ``cladnet-agent run`` (what the systemd unit
  does on a real VM).
- Suspend kills the VM's processes and unplugs it; resume plugs it back with a NEW
  public address (clouds do that) and boots it. Terminate removes it all.

Every name starts with ``cl`` and the driver's tag; what exists is recorded in
``<state_dir>/state.json`` before it is made, so nothing is touched that this driver
did not create, and a controller that dies mid-call leaves a record to finish from.
The driver shells out to ``ip`` and ``nft``: it is a test and demo cloud, not a daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cladnet.files import write_atomic
from controller.drivers import base

log = logging.getLogger("cladnet.drivers.local")

DEMO_CLOUDS: dict[str, dict[str, Any]] = {
    "a": {"public": "172.29.1.0/24", "regions": {"a-west": "192.168.1.0/24"}},
    "b": {"public": "172.29.2.0/24", "regions": {"b-east": "192.168.1.0/24"}},
    "c": {"public": "172.29.3.0/24", "regions": {"c-north": "10.77.0.0/24"}},
}


class Driver(base.Driver):
    def __init__(
        self,
        state_dir: str = "/var/lib/cladnet/local-cloud",
        clouds: dict[str, dict[str, Any]] | None = None,
        internet: str = "172.29.0.0/16",
        agent: str | None = None,
        tag: str | None = None,
        agent_log_level: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.agent_log_level = agent_log_level  # e.g. "debug" to trace a VM's start
        self.internet = ipaddress.IPv4Network(internet)
        self.clouds = clouds or DEMO_CLOUDS
        self.agent = agent or str(Path(sys.executable).with_name("cladnet-agent"))
        self.tag = tag or hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:4]
        self.bridge = f"cl{self.tag}net"
        # Guards the state file and each cloud's NAT table; a VM's own namespace is made
        # outside it, so a group's VMs are plugged in parallel.
        self._lock = asyncio.Lock()
        self._cloud_lock = asyncio.Lock()  # one router per cloud, made once
        self._clouds_ready: set[str] = set()  # routers seen made: not probed per VM
        self._nat_stale: set[str] = set()  # clouds with a public address not in NAT yet
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._regions: dict[str, tuple[str, ipaddress.IPv4Network]] = {}
        for cloud, spec in self.clouds.items():
            if not (cloud.isalnum() and len(cloud) <= 4):
                raise base.DriverError(f"cloud name {cloud!r}: 1-4 letters or digits")
            public = ipaddress.IPv4Network(spec["public"])
            if not public.subnet_of(self.internet):
                raise base.DriverError(f"cloud {cloud}: {public} is not inside {self.internet}")
            for region, subnet in spec["regions"].items():
                if region in self._regions:
                    raise base.DriverError(f"region {region!r} is in two clouds")
                self._regions[region] = (cloud, ipaddress.IPv4Network(subnet))

    @property
    def gateway(self) -> str:
        """Our address on the internet: where VMs reach the controller."""
        return str(self.internet.network_address + 1)

    # --- state ------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load(self) -> dict[str, Any]:
        if self._state_file.exists():
            return json.loads(self._state_file.read_text())
        return {"next_vm": 1, "public_next": {}, "vms": {}}

    def _save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self._state_file, json.dumps(state, indent=1), durable=False)

    def _vm_dir(self, name: str) -> Path:
        return self.state_dir / "vms" / name

    def _router(self, cloud: str) -> str:
        return f"cl-{self.tag}-r{cloud}"

    def _wan(self, cloud: str) -> str:
        return f"cl{self.tag}w{sorted(self.clouds).index(cloud)}"

    async def _remove_router(self, cloud: str) -> None:
        # The WAN veth is deleted first and synchronously: deleting only the namespace
        # would leave its host end until the kernel's asynchronous namespace cleanup ran.
        self._clouds_ready.discard(cloud)
        await self._run("ip", "link", "del", self._wan(cloud), check=False)
        await self._run("ip", "netns", "del", self._router(cloud), check=False)

    def _namespace(self, name: str) -> str:
        return f"cl-{self.tag}-{name}"

    # --- commands ---------------------------------------------------------------------

    async def _run(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if check and proc.returncode != 0:
            raise base.DriverError(f"local: {' '.join(args[:6])}: {err.decode().strip()}")
        return out.decode()

    async def _in(self, ns: str, *args: str, check: bool = True) -> str:
        return await self._run("ip", "netns", "exec", ns, *args, check=check)

    async def _exists(self, *args: str) -> bool:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return await proc.wait() == 0

    # --- the internet and the clouds ----------------------------------------------------

    async def prepare(self) -> None:
        """Make the internet bridge (idempotent): the controller must be able to listen
        on ``gateway`` before any VM exists."""
        if not await self._exists("ip", "link", "show", self.bridge):
            await self._run("ip", "link", "add", self.bridge, "type", "bridge")
        prefix = f"{self.gateway}/{self.internet.prefixlen}"
        if prefix not in await self._run("ip", "-o", "addr", "show", "dev", self.bridge):
            await self._run("ip", "addr", "add", prefix, "dev", self.bridge)
        await self._run("ip", "link", "set", self.bridge, "up")

    async def _ensure_cloud(self, cloud: str) -> None:
        router = self._router(cloud)
        if cloud in self._clouds_ready:
            return
        if await self._exists("ip", "netns", "exec", router, "true"):
            self._clouds_ready.add(cloud)
            return
        await self.prepare()
        spec = self.clouds[cloud]
        await self._run("ip", "netns", "add", router)
        wan = self._wan(cloud)
        await self._run(
            "ip", "link", "add", wan, "type", "veth", "peer", "name", "wan", "netns", router
        )
        await self._run("ip", "link", "set", wan, "master", self.bridge, "up")
        public = ipaddress.IPv4Network(spec["public"])
        for sysctl in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            # The 1:1 NAT rewrites sources to the router's own (public) addresses.
            "net.ipv4.conf.all.accept_local=1",
            "net.ipv4.conf.default.accept_local=1",
        ):
            await self._in(router, "sysctl", "-qw", sysctl)
        await self._in(router, "ip", "link", "set", "lo", "up")
        own = f"{public.network_address + 1}/{self.internet.prefixlen}"
        await self._in(router, "ip", "addr", "add", own, "dev", "wan")
        await self._in(router, "ip", "link", "set", "wan", "up")
        regions: dict[str, str] = spec["regions"]
        for i, (region, subnet) in enumerate(sorted(regions.items())):
            lan = f"lan{i}"
            net = ipaddress.IPv4Network(subnet)
            await self._in(router, "ip", "link", "add", lan, "type", "bridge")
            await self._in(router, "sysctl", "-qw", f"net.ipv4.conf.{lan}.accept_local=1")
            gateway = f"{net.network_address + 1}/{net.prefixlen}"
            await self._in(router, "ip", "addr", "add", gateway, "dev", lan)
            await self._in(router, "ip", "link", "set", lan, "up")
            log.info("region ready", extra={"region": region, "subnet": subnet})
        self._clouds_ready.add(cloud)

    async def _apply_nat(self, cloud: str, state: dict[str, Any]) -> None:
        """Rewrite the cloud's whole NAT table from the records, in one nft transaction."""
        rules = []
        for vm in state["vms"].values():
            if vm["cloud"] != cloud or not vm.get("public_ip"):
                continue
            subnet = str(self._regions[vm["region"]][1])
            priv, pub = vm["private_ip"], vm["public_ip"]
            rules.append(f"ip daddr {pub} ip daddr set {priv} notrack")
            rules.append(f"ip saddr {priv} ip daddr != {subnet} ip saddr set {pub} notrack")
        body = "\n".join(f"    {r}" for r in rules)
        script = (
            "table ip cl-nat {}\ndelete table ip cl-nat\n"
            "table ip cl-nat {\n  chain pre {\n"
            "    type filter hook prerouting priority raw; policy accept;\n"
            f"{body}\n  }}\n}}\n"
        )
        await self._run("ip", "netns", "exec", self._router(cloud), "nft", "-f", "-", stdin=script)

    def _new_public(self, cloud: str, state: dict[str, Any]) -> str:
        """The cloud's next free public address (never the one a VM just gave up)."""
        public = ipaddress.IPv4Network(self.clouds[cloud]["public"])
        used = {vm.get("public_ip") for vm in state["vms"].values()}
        hosts = list(public.hosts())[1:]  # .1 is the router's
        start = state["public_next"].get(cloud, 0)
        for i in range(len(hosts)):
            candidate = str(hosts[(start + i) % len(hosts)])
            if candidate not in used:
                state["public_next"][cloud] = (start + i + 1) % len(hosts)
                return candidate
        raise base.DriverError(f"local: cloud {cloud} has no free public address")

    async def _set_public(self, vm: dict[str, Any], address: str | None) -> None:
        router = self._router(vm["cloud"])
        if vm.get("public_ip"):
            old = f"{vm['public_ip']}/32"
            await self._run("ip", "-n", router, "addr", "del", old, "dev", "wan", check=False)
        if address:
            await self._run("ip", "-n", router, "addr", "add", f"{address}/32", "dev", "wan")
        vm["public_ip"] = address

    # --- VM processes -------------------------------------------------------------------

    def _boot(self, name: str, vm: dict[str, Any]) -> None:
        """Start the VM's init: the user-data on the first boot, the agent after that."""
        home = self._vm_dir(name)
        first = not vm.get("booted")
        command = ["sh", str(home / "user-data")] if first else [self.agent, "run"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(home),
            "CLADNET_AGENT": self.agent,
            "CLADNET_STATE_DIR": str(home / "cladnet"),
            "CLADNET_INTERFACE": self._wireguard(vm),
            "CLADNET_NO_SYSTEMD": "1",
            # Names go to the VM's own hosts file, never this machine's /etc/hosts.
            "CLADNET_DNS": "hosts",
            "CLADNET_HOSTS_FILE": str(home / "hosts"),
        }
        if self.agent_log_level:
            env["CLADNET_LOG_LEVEL"] = self.agent_log_level
        with (home / "console.log").open("ab") as console:
            # A session of its own: the VM outlives the controller that booted it.
            child = subprocess.Popen(
                ["ip", "netns", "exec", self._namespace(name), *command],
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,
            )
        self._children[name] = child
        vm["booted"] = True

    def _wireguard(self, vm: dict[str, Any]) -> str:
        """The VM's WireGuard interface: unique machine-wide, as wireguard-go's socket
        directory is shared by every namespace."""
        return f"cl{self.tag}g{vm['no']}"

    async def _halt(self, name: str, vm: dict[str, Any]) -> None:
        """Stop every process in the VM's namespace (SIGTERM, then SIGKILL)."""
        ns = self._namespace(name)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            pids = (await self._run("ip", "netns", "pids", ns, check=False)).split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), sig)
            for _ in range(int(wait / 0.1)):
                if not (await self._run("ip", "netns", "pids", ns, check=False)).split():
                    break
                await asyncio.sleep(0.1)
        child = self._children.pop(name, None)
        if child is not None:
            child.poll()  # reap it
        # wireguard-go leaves its socket behind when killed.
        socket = Path(f"/var/run/wireguard/{self._wireguard(vm)}.sock")
        socket.unlink(missing_ok=True)  # noqa: ASYNC240 - one unlink, no I/O wait

    def _vm(self, name: str, vm: dict[str, Any]) -> base.Vm:
        return base.Vm(
            name=name,
            region=vm["region"],
            power=vm["power"],
            private_ip=vm["private_ip"],
            public_ip=vm.get("public_ip"),
            details={
                "namespace": self._namespace(name),
                "cloud": vm["cloud"],
                "interface": self._wireguard(vm),
            },
        )

    # --- the driver interface -------------------------------------------------------------

    async def regions(self) -> list[base.Region]:
        return [
            base.Region(region, details={"cloud": cloud, "vpc": region, "subnet": str(subnet)})
            for region, (cloud, subnet) in sorted(self._regions.items())
        ]

    async def create(self, spec: base.VmSpec) -> base.Vm:
        if spec.region not in self._regions:
            raise base.DriverError(f"local: no region {spec.region!r}")
        cloud, subnet = self._regions[spec.region]
        async with self._lock:
            state = self._load()
            vm = state["vms"].get(spec.name)
            if vm is not None and vm.get("booted"):
                return self._vm(spec.name, vm)
            if vm is None:  # recorded before anything is made
                taken = {
                    v["private_ip"] for v in state["vms"].values() if v["region"] == spec.region
                }
                hosts = list(subnet.hosts())[9:]  # .1 is the router, .10 onwards VMs
                private = next((str(h) for h in hosts if str(h) not in taken), None)
                if private is None:
                    raise base.DriverError(f"local: region {spec.region} is full")
                vm = {
                    "no": state["next_vm"],
                    "cloud": cloud,
                    "region": spec.region,
                    "private_ip": private,
                    "public_ip": None,
                    "power": base.RUNNING,
                    "booted": False,
                }
                state["next_vm"] += 1
                state["vms"][spec.name] = vm
                self._save(state)
        async with self._cloud_lock:
            await self._ensure_cloud(cloud)
        await self._plug(spec.name, vm, subnet)
        async with self._lock:
            state = self._load()  # others may have changed it meanwhile
            vm = self._creating(state, spec.name)
            if vm.get("booted"):
                return self._vm(spec.name, vm)
            await self._set_public(vm, self._new_public(cloud, state))
            self._save(state)
            self._nat_stale.add(cloud)
        # A second turn: the VMs that got their addresses meanwhile share one NAT rewrite.
        async with self._lock:
            state = self._load()
            vm = self._creating(state, spec.name)
            if vm.get("booted"):
                return self._vm(spec.name, vm)
            if cloud in self._nat_stale:
                await self._apply_nat(cloud, state)
                self._nat_stale.discard(cloud)
            home = self._vm_dir(spec.name)
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            user_data = home / "user-data"
            user_data.touch(mode=0o700)
            user_data.write_text(spec.user_data)  # holds a join token: owner only
            self._boot(spec.name, vm)
            self._save(state)
            return self._vm(spec.name, vm)

    def _creating(self, state: dict[str, Any], name: str) -> dict[str, Any]:
        vm = state["vms"].get(name)
        if vm is None:
            raise base.DriverError(f"local: VM {name!r} was terminated while created")
        return vm

    async def _plug(self, name: str, vm: dict[str, Any], subnet: ipaddress.IPv4Network) -> None:
        """The VM's namespace and its link to the region's bridge (idempotent)."""
        ns, router = self._namespace(name), self._router(vm["cloud"])
        port = f"v{vm['no']}"
        if not await self._exists("ip", "netns", "exec", ns, "true"):
            await self._run("ip", "netns", "add", ns)
        if not await self._exists("ip", "-n", ns, "link", "show", "eth0"):
            veth = f"link add eth0 netns {ns} type veth peer name {port} netns {router}"
            await self._run("ip", *veth.split())
            address = f"{vm['private_ip']}/{subnet.prefixlen}"
            gateway = str(subnet.network_address + 1)
            # One process for the four: a group's VMs are plugged at once on few cores.
            batch = (
                "link set lo up\n"
                f"addr add {address} dev eth0\n"
                "link set eth0 up\n"
                f"route add default via {gateway}\n"
            )
            await self._run("ip", "-n", ns, "-batch", "-", stdin=batch)
        lan = f"lan{sorted(self.clouds[vm['cloud']]['regions']).index(vm['region'])}"
        await self._in(router, "ip", "link", "set", port, "master", lan, "up")

    async def get(self, name: str) -> base.Vm:
        vm = self._load()["vms"].get(name)
        if vm is None:
            raise base.NoSuchVm(f"local: no VM {name!r}")
        return self._vm(name, vm)

    async def list(self) -> list[base.Vm]:
        return [self._vm(name, vm) for name, vm in self._load()["vms"].items()]

    async def suspend(self, name: str) -> base.Vm:
        async with self._lock:
            state = self._load()
            vm = self._existing(state, name)
            await self._halt(name, vm)
            await self._in(self._router(vm["cloud"]), "ip", "link", "set", f"v{vm['no']}", "down")
            await self._set_public(vm, None)
            vm["power"] = base.SUSPENDED
            await self._apply_nat(vm["cloud"], state)
            self._save(state)
            return self._vm(name, vm)

    async def resume(self, name: str) -> base.Vm:
        async with self._lock:
            state = self._load()
            vm = self._existing(state, name)
            if vm["power"] != base.RUNNING:
                await self._set_public(vm, self._new_public(vm["cloud"], state))
                await self._apply_nat(vm["cloud"], state)
                await self._in(self._router(vm["cloud"]), "ip", "link", "set", f"v{vm['no']}", "up")
                self._boot(name, vm)
                vm["power"] = base.RUNNING
                self._save(state)
            return self._vm(name, vm)

    async def reboot(self, name: str) -> base.Vm:
        async with self._lock:
            state = self._load()
            vm = self._existing(state, name)
            await self._halt(name, vm)
            self._boot(name, vm)
            self._save(state)
            return self._vm(name, vm)

    async def terminate(self, name: str) -> None:
        async with self._lock:
            state = self._load()
            vm = state["vms"].get(name)
            if vm is None:
                return
            await self._halt(name, vm)
            await self._run("ip", "netns", "del", self._namespace(name), check=False)
            await self._set_public(vm, None)
            del state["vms"][name]
            if any(v["cloud"] == vm["cloud"] for v in state["vms"].values()):
                await self._apply_nat(vm["cloud"], state)
            else:  # the cloud's last VM: its router (and NAT table) goes too
                await self._remove_router(vm["cloud"])
            shutil.rmtree(self._vm_dir(name), ignore_errors=True)
            self._save(state)

    def _existing(self, state: dict[str, Any], name: str) -> dict[str, Any]:
        vm = state["vms"].get(name)
        if vm is None:
            raise base.NoSuchVm(f"local: no VM {name!r}")
        return vm

    async def teardown(self) -> None:
        """Remove every VM, router and the internet bridge (``cladnet demo down``)."""
        for name in list(self._load()["vms"]):
            await self.terminate(name)
        for cloud in self.clouds:
            await self._remove_router(cloud)
        await self._run("ip", "link", "del", self.bridge, check=False)
        self._state_file.unlink(missing_ok=True)
