"""Amazon EC2: the ``ec2`` driver, on boto3 (AWS's own SDK).

Credentials come from boto3's standard chain (environment, shared config/credentials
files, SSO, instance or container role), never from the driver's options. Per region
the driver finds, or creates once, what its VMs need — a VPC with an internet gateway,
a public subnet and a security group that lets in the WireGuard UDP port and nothing
else — all tagged ``cladnet:cluster=<cluster>``. A VM is an instance tagged with its
name and group: ``create`` of a name that exists adopts that instance (after a
controller crash it finds the one it launched instead of launching a second).

boto3 blocks, so every call runs in a worker thread (``asyncio.to_thread``): the
controller's event loop never waits on AWS. AWS errors (quota, capacity, a bad AMI)
become ``DriverError`` with AWS's code and message, which the reconciler records as
the VM's ``Failed`` reason.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cladnet.models import DEFAULT_LISTEN_PORT
from controller.drivers import base

log = logging.getLogger("cladnet.controller.drivers.ec2")

TAG_CLUSTER = "cladnet:cluster"
TAG_VM = "cladnet:vm"
TAG_GROUP = "cladnet:group"
TAG_PART = "cladnet:part"  # vpc, igw, subnet, rtb, sg: what a network resource is for

# EC2 instance state → the driver's power state; absent states (shutting-down,
# terminated) mean the VM is gone.
POWER = {
    "pending": base.RUNNING,
    "running": base.RUNNING,
    "stopping": base.SUSPENDED,
    "stopped": base.SUSPENDED,
}
LIVE_STATES = list(POWER)
DEFAULT_SIZES = {"small": "t3.small", "medium": "t3.medium", "large": "t3.large"}


def power_of(state: str) -> str | None:
    """The VM power state of an EC2 instance state; None when the instance is gone."""
    return POWER.get(state)


class Driver(base.Driver):
    """EC2 by region. Options (all optional but ``regions`` when no default region is set):

    ``regions``: region names (default: boto3's configured region); ``cluster``: the
    tag value that marks what this controller made (several controllers can share an
    account); ``images``: image name → AMI id, or → {region: AMI id} (an ``ami-`` id as
    a member's image is used as is); ``sizes``: size name → instance type (a name with
    a dot is an instance type); ``vpc_cidr``/``subnet_cidr`` of the VPC made per
    region; ``subnet_id`` + ``security_group_id`` to use existing ones instead;
    ``wireguard_port``; ``endpoint_url`` for an EC2-compatible API (tests use moto);
    ``poll_interval``/``wait_timeout`` for waiting on state changes.
    """

    def __init__(
        self,
        regions: list[str] | None = None,
        cluster: str = "cladnet",
        images: dict[str, str | dict[str, str]] | None = None,
        sizes: dict[str, str] | None = None,
        vpc_cidr: str = "10.87.0.0/16",
        subnet_cidr: str = "10.87.1.0/24",
        subnet_id: str | None = None,
        security_group_id: str | None = None,
        wireguard_port: int = DEFAULT_LISTEN_PORT,
        endpoint_url: str | None = None,
        poll_interval: float = 5.0,
        wait_timeout: float = 240.0,
    ) -> None:
        self._session = boto3.session.Session()
        default = self._session.region_name
        self.region_names = list(regions or ([default] if default else []))
        if not self.region_names:
            raise base.DriverError(
                "ec2: no region: set the driver's regions option or AWS_DEFAULT_REGION"
            )
        if bool(subnet_id) != bool(security_group_id):
            raise base.DriverError("ec2: subnet_id and security_group_id go together")
        self.cluster = cluster
        self.images = images or {}
        self.sizes = {**DEFAULT_SIZES, **(sizes or {})}
        self.vpc_cidr, self.subnet_cidr = vpc_cidr, subnet_cidr
        self.fixed_network = (subnet_id, security_group_id) if subnet_id else None
        self.wireguard_port = wireguard_port
        self.endpoint_url = endpoint_url
        self.poll_interval, self.wait_timeout = poll_interval, wait_timeout
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()  # boto3 sessions are not thread-safe
        self._networks: dict[str, tuple[str, str]] = {}  # region → (subnet, security group)
        self._network_locks: dict[str, asyncio.Lock] = {}
        self._name_locks: dict[str, asyncio.Lock] = {}

    # -- AWS calls, each in a worker thread ---------------------------------------

    def _client(self, region: str) -> Any:
        with self._clients_lock:
            if region not in self._clients:
                self._clients[region] = self._session.client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self.endpoint_url,
                    config=Config(retries={"mode": "standard", "max_attempts": 5}),
                )
            return self._clients[region]

    async def _call(self, region: str, op: str, **kwargs: Any) -> Any:
        """One EC2 API call off the event loop; AWS's error becomes a ``DriverError``."""

        def call() -> Any:
            return getattr(self._client(region), op)(**kwargs)

        return await self._run(region, op, call)

    async def _run(self, region: str, op: str, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except ClientError as e:
            err = e.response.get("Error", {})
            code, message = err.get("Code", "Error"), err.get("Message", str(e))
            raise base.DriverError(f"ec2 {region} {op}: {code}: {message}") from e
        except BotoCoreError as e:  # no credentials, endpoint unreachable, …
            raise base.DriverError(f"ec2 {region} {op}: {e}") from e

    async def _instances(self, region: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every instance of this cluster in ``region`` matching ``filters`` (all pages)."""
        wanted = [{"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster]}, *filters]

        def pages() -> list[dict[str, Any]]:
            paginator = self._client(region).get_paginator("describe_instances")
            return [
                instance
                for page in paginator.paginate(Filters=wanted)
                for reservation in page["Reservations"]
                for instance in reservation["Instances"]
            ]

        result: list[dict[str, Any]] = await self._run(region, "DescribeInstances", pages)
        return result

    async def _named(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """Every live instance named ``name``, in every region, oldest first."""
        found: list[tuple[str, dict[str, Any]]] = []
        for region in self.region_names:
            named = [
                {"Name": f"tag:{TAG_VM}", "Values": [name]},
                {"Name": "instance-state-name", "Values": LIVE_STATES},
            ]
            found += [(region, i) for i in await self._instances(region, named)]
        found.sort(key=lambda ri: ri[1]["LaunchTime"])
        return found

    async def _find(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The live instance named ``name`` (the oldest, should there ever be two)."""
        found = await self._named(name)
        return found[0] if found else None

    async def _describe(self, region: str, instance_id: str) -> dict[str, Any] | None:
        try:
            res = await self._call(region, "describe_instances", InstanceIds=[instance_id])
        except base.DriverError as e:
            if "InvalidInstanceID.NotFound" in str(e):  # not yet visible (eventual consistency)
                return None
            raise
        instances = [i for r in res["Reservations"] for i in r["Instances"]]
        return instances[0] if instances else None

    async def _wait(self, region: str, instance_id: str, *states: str) -> dict[str, Any]:
        """Poll until the instance is in one of ``states``; a launch that ends in
        ``terminated`` (capacity, volume limits, …) fails with AWS's reason."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            instance = await self._describe(region, instance_id)
            if instance is not None:
                state = instance["State"]["Name"]
                if state in states:
                    return instance
                if state in ("shutting-down", "terminated") and "terminated" not in states:
                    reason = instance.get("StateReason", {}).get("Message", "no reason given")
                    raise base.DriverError(f"ec2 {region}: {instance_id} terminated: {reason}")
            if time.monotonic() > deadline:
                raise base.DriverError(
                    f"ec2 {region}: {instance_id} not {'/'.join(states)} "
                    f"after {self.wait_timeout:.0f}s"
                )
            await asyncio.sleep(self.poll_interval)

    # -- the network a region's VMs use --------------------------------------------

    def _tags(self, resource: str, part: str) -> list[dict[str, Any]]:
        tags = [
            {"Key": TAG_CLUSTER, "Value": self.cluster},
            {"Key": TAG_PART, "Value": part},
            {"Key": "Name", "Value": f"cladnet-{self.cluster}"},
        ]
        return [{"ResourceType": resource, "Tags": tags}]

    def _ours(self, part: str) -> list[dict[str, Any]]:
        return [
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster]},
            {"Name": f"tag:{TAG_PART}", "Values": [part]},
        ]

    async def _network(self, region: str) -> tuple[str, str]:
        """(subnet id, security group id) for ``region``, made on first need.

        Each piece is looked up by its tags before it is made, so a controller that
        died half-way finishes the job instead of making a second VPC.
        """
        if self.fixed_network:
            return self.fixed_network[0] or "", self.fixed_network[1] or ""
        lock = self._network_locks.setdefault(region, asyncio.Lock())
        async with lock:
            if region in self._networks:
                return self._networks[region]
            call = self._call
            vpcs = (await call(region, "describe_vpcs", Filters=self._ours("vpc")))["Vpcs"]
            if vpcs:
                vpc = vpcs[0]["VpcId"]
            else:
                made = await call(
                    region,
                    "create_vpc",
                    CidrBlock=self.vpc_cidr,
                    TagSpecifications=self._tags("vpc", "vpc"),
                )
                vpc = made["Vpc"]["VpcId"]
                log.info("ec2: made VPC %s in %s", vpc, region)
            igws = (await call(region, "describe_internet_gateways", Filters=self._ours("igw")))[
                "InternetGateways"
            ]
            if igws:
                igw = igws[0]
            else:
                made = await call(
                    region,
                    "create_internet_gateway",
                    TagSpecifications=self._tags("internet-gateway", "igw"),
                )
                igw = made["InternetGateway"]
            if not igw.get("Attachments"):
                await call(
                    region,
                    "attach_internet_gateway",
                    InternetGatewayId=igw["InternetGatewayId"],
                    VpcId=vpc,
                )
            subnets = (await call(region, "describe_subnets", Filters=self._ours("subnet")))[
                "Subnets"
            ]
            if subnets:
                subnet = subnets[0]["SubnetId"]
            else:
                made = await call(
                    region,
                    "create_subnet",
                    VpcId=vpc,
                    CidrBlock=self.subnet_cidr,
                    TagSpecifications=self._tags("subnet", "subnet"),
                )
                subnet = made["Subnet"]["SubnetId"]
            await call(
                region,
                "modify_subnet_attribute",
                SubnetId=subnet,
                MapPublicIpOnLaunch={"Value": True},
            )
            tables = (await call(region, "describe_route_tables", Filters=self._ours("rtb")))[
                "RouteTables"
            ]
            if tables:
                table = tables[0]
            else:
                made = await call(
                    region,
                    "create_route_table",
                    VpcId=vpc,
                    TagSpecifications=self._tags("route-table", "rtb"),
                )
                table = made["RouteTable"]
            rtb = table["RouteTableId"]
            if not any(r.get("DestinationCidrBlock") == "0.0.0.0/0" for r in table["Routes"]):
                await call(
                    region,
                    "create_route",
                    RouteTableId=rtb,
                    DestinationCidrBlock="0.0.0.0/0",
                    GatewayId=igw["InternetGatewayId"],
                )
            if not any(a.get("SubnetId") == subnet for a in table.get("Associations", [])):
                await call(region, "associate_route_table", RouteTableId=rtb, SubnetId=subnet)
            sgs = (await call(region, "describe_security_groups", Filters=self._ours("sg")))[
                "SecurityGroups"
            ]
            if sgs:
                sg = sgs[0]
            else:
                made = await call(
                    region,
                    "create_security_group",
                    GroupName=f"cladnet-{self.cluster}",
                    Description="CLADNet VMs: WireGuard in, nothing else",
                    VpcId=vpc,
                    TagSpecifications=self._tags("security-group", "sg"),
                )
                sg = {"GroupId": made["GroupId"], "IpPermissions": []}
            wireguard = {
                "IpProtocol": "udp",
                "FromPort": self.wireguard_port,
                "ToPort": self.wireguard_port,
                "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "WireGuard"}],
            }
            if not any(
                p.get("IpProtocol") == "udp" and p.get("FromPort") == self.wireguard_port
                for p in sg["IpPermissions"]
            ):
                await call(
                    region,
                    "authorize_security_group_ingress",
                    GroupId=sg["GroupId"],
                    IpPermissions=[wireguard],
                )
            self._networks[region] = (subnet, sg["GroupId"])
            return self._networks[region]

    # -- the Driver interface ---------------------------------------------------------

    def _vm(self, name: str, region: str, instance: dict[str, Any]) -> base.Vm:
        state = instance["State"]["Name"]
        power = power_of(state)
        if power is None:
            raise base.NoSuchVm(f"ec2: VM {name!r} is {state}")
        return base.Vm(
            name=name,
            region=region,
            power=power,
            private_ip=instance.get("PrivateIpAddress"),
            public_ip=instance.get("PublicIpAddress"),
            details={
                "instance_id": instance["InstanceId"],
                "ec2_state": state,
                "instance_type": instance.get("InstanceType", ""),
                "image_id": instance.get("ImageId", ""),
                "zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
            },
        )

    def _image(self, image: str, region: str) -> str:
        if image.startswith("ami-"):
            return image
        ami = self.images.get(image)
        if isinstance(ami, dict):
            ami = ami.get(region)
        if not ami:
            raise base.DriverError(
                f"ec2: no AMI for image {image!r} in {region} "
                "(give an ami- id, or map it in the driver's images option)"
            )
        return ami

    def _size(self, size: str) -> str:
        if "." in size:
            return size
        if size not in self.sizes:
            raise base.DriverError(
                f"ec2: unknown size {size!r} (sizes: {', '.join(sorted(self.sizes))}, "
                "or an instance type such as t3.micro)"
            )
        return self.sizes[size]

    async def regions(self) -> list[base.Region]:
        return [
            base.Region(name, details={"cloud": "aws", "vpc": f"aws-{name}-{self.cluster}"})
            for name in self.region_names
        ]

    async def create(self, spec: base.VmSpec) -> base.Vm:
        if spec.region not in self.region_names:
            raise base.DriverError(f"ec2: region {spec.region!r} is not configured")
        async with self._name_locks.setdefault(spec.name, asyncio.Lock()):
            found = await self._named(spec.name)
            if found:  # made before (a crash, a retry): adopt it
                region, instance = found[0]
                log.info("ec2: %s exists as %s; adopting it", spec.name, instance["InstanceId"])
                # A launch not yet visible when a crashed controller's successor looked
                # (EC2 is eventually consistent) leaves a twin: it is ours, so it goes.
                for twin_region, twin in found[1:]:
                    log.warning("ec2: terminating %s, a twin of %s", twin["InstanceId"], spec.name)
                    await self._call(
                        twin_region, "terminate_instances", InstanceIds=[twin["InstanceId"]]
                    )
            else:
                region = spec.region
                image, size = self._image(spec.image, region), self._size(spec.size)
                subnet, sg = await self._network(region)
                tags = [
                    {"Key": TAG_CLUSTER, "Value": self.cluster},
                    {"Key": TAG_VM, "Value": spec.name},
                    {"Key": TAG_GROUP, "Value": spec.labels.get("group", "")},
                    {"Key": "Name", "Value": spec.name},
                ]
                made = await self._call(
                    region,
                    "run_instances",
                    ImageId=image,
                    InstanceType=size,
                    MinCount=1,
                    MaxCount=1,
                    UserData=spec.user_data,  # boto3 base64-encodes it
                    NetworkInterfaces=[
                        {
                            "DeviceIndex": 0,
                            "SubnetId": subnet,
                            "Groups": [sg],
                            "AssociatePublicIpAddress": True,
                        }
                    ],
                    # IMDSv2 only, one hop: a process on the VM (or an SSRF bug) can't
                    # read the user-data, which held the join token, by a plain GET.
                    MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
                    # Tagged in the same call: there is never an untagged instance to lose.
                    TagSpecifications=[
                        {"ResourceType": "instance", "Tags": tags},
                        {"ResourceType": "volume", "Tags": tags},
                    ],
                )
                instance = made["Instances"][0]
                log.info("ec2: launched %s as %s", spec.name, instance["InstanceId"])
            if instance["State"]["Name"] in ("stopping", "stopped"):
                return self._vm(spec.name, region, instance)
            running = await self._wait(region, instance["InstanceId"], "running")
            return self._vm(spec.name, region, running)

    async def _existing(self, name: str) -> tuple[str, dict[str, Any]]:
        found = await self._find(name)
        if found is None:
            raise base.NoSuchVm(f"ec2: no VM {name!r}")
        return found

    async def get(self, name: str) -> base.Vm:
        region, instance = await self._existing(name)
        return self._vm(name, region, instance)

    async def list(self) -> list[base.Vm]:
        vms = []
        for region in self.region_names:
            live = [{"Name": "instance-state-name", "Values": LIVE_STATES}]
            for instance in await self._instances(region, live):
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                vms.append(self._vm(tags.get(TAG_VM, instance["InstanceId"]), region, instance))
        return vms

    async def suspend(self, name: str) -> base.Vm:
        region, instance = await self._existing(name)
        if instance["State"]["Name"] != "stopped":
            await self._call(region, "stop_instances", InstanceIds=[instance["InstanceId"]])
            instance = await self._wait(region, instance["InstanceId"], "stopped")
        return self._vm(name, region, instance)

    async def resume(self, name: str) -> base.Vm:
        region, instance = await self._existing(name)
        if instance["State"]["Name"] == "stopping":
            instance = await self._wait(region, instance["InstanceId"], "stopped")
        if instance["State"]["Name"] != "running":
            await self._call(region, "start_instances", InstanceIds=[instance["InstanceId"]])
            instance = await self._wait(region, instance["InstanceId"], "running")
        return self._vm(name, region, instance)

    async def reboot(self, name: str) -> base.Vm:
        region, instance = await self._existing(name)
        await self._call(region, "reboot_instances", InstanceIds=[instance["InstanceId"]])
        return self._vm(name, region, instance)

    async def terminate(self, name: str) -> None:
        # Every live instance of that name (there should be one), in every region.
        for region, instance in await self._named(name):
            await self._call(region, "terminate_instances", InstanceIds=[instance["InstanceId"]])
            log.info("ec2: terminated %s (%s)", name, instance["InstanceId"])
