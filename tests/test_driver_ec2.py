"""The ec2 driver against moto's EC2 API in server mode, over HTTP on loopback.

What this proves: the driver's EC2 API calls (the requests boto3 makes, the
responses it parses), its find-or-create of the network, tagging, adoption by name,
state mapping and error mapping. What it cannot: moto boots nothing, runs no
user-data and carries no packets (the local driver is the data-plane proof).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto import settings as moto_settings
from moto.server import ThreadedMotoServer

from cladnet import groups as lifecycle
from controller.drivers import ec2, load
from controller.drivers.base import RUNNING, SUSPENDED, DriverError, NoSuchVm, VmSpec
from lab.components import wait_until

REGION = "eu-west-1"


@pytest.fixture
def moto_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh moto EC2 endpoint and fake credentials in the standard chain (env)."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its "cloud" in module globals, shared by every server in the process.
    httpx.post(f"{url}/moto-api/reset").raise_for_status()
    try:
        yield url
    finally:
        server.stop()


def aws(url: str) -> Any:
    """A plain boto3 client: the test's own view of the "cloud"."""
    return boto3.client("ec2", endpoint_url=url, region_name=REGION)


def an_ami(url: str) -> str:
    """One of moto's stock AMIs (filtered: listing all of them takes seconds)."""
    wanted = [{"Name": "name", "Values": ["*ubuntu-xenial-16.04*"]}]
    return str(aws(url).describe_images(Filters=wanted)["Images"][0]["ImageId"])


def options(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": url,
        "images": {"debian-12": an_ami(url)},
        "poll_interval": 0.05,
        "wait_timeout": 30,
        **extra,
    }


def spec(name: str = "web-1", **kw: Any) -> VmSpec:
    return VmSpec(
        name=name,
        region=REGION,
        user_data="#!/bin/sh\nCLADNET_JOIN_TOKEN='clj_secret' cladnet-agent join\n",
        labels={"group": name.rsplit("-", 1)[0]},
        **kw,
    )


def instances(url: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every instance moto holds (optionally by VM name tag), terminated ones too."""
    res = aws(url).describe_instances()
    found = [i for r in res["Reservations"] for i in r["Instances"]]
    if name is not None:
        found = [i for i in found if {"Key": "cladnet:vm", "Value": name} in i.get("Tags", [])]
    return found


async def test_every_call_through_the_api(moto_url: str) -> None:
    driver = load("ec2", options(moto_url))
    assert [r.name for r in await driver.regions()] == [REGION]

    vm = await driver.create(spec())
    assert vm.power == RUNNING and vm.private_ip and vm.public_ip
    assert vm.private_ip.startswith("10.87.1.")  # in the subnet the driver made
    [inst] = instances(moto_url, "web-1")
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags == {
        "cladnet:cluster": "cladnet",
        "cladnet:vm": "web-1",
        "cladnet:group": "web",
        "Name": "web-1",
    }
    assert inst["InstanceType"] == "t3.small"
    assert vm.details["instance_id"] == inst["InstanceId"]
    # The join token travels in the user-data, and only the user-data.
    attr = aws(moto_url).describe_instance_attribute(
        InstanceId=inst["InstanceId"], Attribute="userData"
    )
    assert base64.b64decode(attr["UserData"]["Value"]).decode() == spec().user_data
    assert inst["MetadataOptions"]["HttpTokens"] == "required"

    assert (await driver.get("web-1")).public_ip == vm.public_ip
    assert [v.name for v in await driver.list()] == ["web-1"]

    suspended = await driver.suspend("web-1")
    assert suspended.power == SUSPENDED and suspended.details["ec2_state"] == "stopped"
    assert (await driver.suspend("web-1")).power == SUSPENDED  # again: nothing to do
    resumed = await driver.resume("web-1")
    assert resumed.power == RUNNING and resumed.public_ip != vm.public_ip
    assert (await driver.reboot("web-1")).power == RUNNING

    await driver.terminate("web-1")
    await driver.terminate("web-1")  # gone is fine
    with pytest.raises(NoSuchVm):
        await driver.get("web-1")
    assert await driver.list() == []
    for op in (driver.suspend, driver.resume, driver.reboot):
        with pytest.raises(NoSuchVm):
            await op("web-1")


async def test_network_is_made_once_with_only_wireguard_open(moto_url: str) -> None:
    driver = load("ec2", options(moto_url, wireguard_port=51999))
    await asyncio.gather(*(driver.create(spec(f"db-{n}")) for n in (1, 2, 3)))
    # A second driver (a restarted controller) reuses what the first one made.
    await load("ec2", options(moto_url, wireguard_port=51999)).create(spec("db-4"))
    client = aws(moto_url)
    ours = [{"Name": "tag:cladnet:cluster", "Values": ["cladnet"]}]
    [vpc] = client.describe_vpcs(Filters=ours)["Vpcs"]
    [subnet] = client.describe_subnets(Filters=ours)["Subnets"]
    assert subnet["VpcId"] == vpc["VpcId"] and subnet["MapPublicIpOnLaunch"]
    [igw] = client.describe_internet_gateways(Filters=ours)["InternetGateways"]
    assert igw["Attachments"][0]["VpcId"] == vpc["VpcId"]
    [rtb] = client.describe_route_tables(Filters=ours)["RouteTables"]
    assert any(r.get("GatewayId") == igw["InternetGatewayId"] for r in rtb["Routes"])
    [sg] = client.describe_security_groups(Filters=ours)["SecurityGroups"]
    assert sg["IpPermissions"] == [
        {
            "IpProtocol": "udp",
            "FromPort": 51999,
            "ToPort": 51999,
            "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "WireGuard"}],
            "Ipv6Ranges": [],
            "PrefixListIds": [],
            "UserIdGroupPairs": [],
        }
    ]
    for inst in instances(moto_url):
        [nic] = inst["NetworkInterfaces"]
        assert [g["GroupId"] for g in nic["Groups"]] == [sg["GroupId"]]
        assert nic["SubnetId"] == subnet["SubnetId"]


async def test_create_adopts_after_a_crash_and_never_duplicates(moto_url: str) -> None:
    first = load("ec2", options(moto_url))
    vm = await first.create(spec())
    # The controller died; a new one (a new driver) redoes the create of web-1.
    second = load("ec2", options(moto_url))
    again = await second.create(spec())
    assert again.details["instance_id"] == vm.details["instance_id"]
    # Concurrent repeats in one driver make one instance too.
    await asyncio.gather(*(second.create(spec("web-2")) for _ in range(3)))
    assert len(instances(moto_url, "web-1")) == 1
    assert len(instances(moto_url, "web-2")) == 1
    # A suspended VM is adopted as it is, not started behind the user's back.
    await second.suspend("web-2")
    assert (await load("ec2", options(moto_url)).create(spec("web-2"))).power == SUSPENDED
    # After terminate the name is free: a create makes a new instance.
    await second.terminate("web-1")
    new = await second.create(spec())
    assert new.details["instance_id"] != vm.details["instance_id"]


async def test_a_twin_launched_in_a_crash_window_is_terminated(moto_url: str) -> None:
    """Two live instances with one VM name (a launch that EC2 did not show yet when the
    next controller looked): create keeps the oldest and terminates the other."""
    driver = load("ec2", options(moto_url))
    vm = await driver.create(spec())
    [first] = instances(moto_url, "web-1")
    twin = aws(moto_url).run_instances(
        ImageId=an_ami(moto_url),
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": first["Tags"]}],
    )["Instances"][0]["InstanceId"]
    again = await load("ec2", options(moto_url)).create(spec())
    assert again.details["instance_id"] == vm.details["instance_id"]
    states = {i["InstanceId"]: i["State"]["Name"] for i in instances(moto_url, "web-1")}
    assert states[vm.details["instance_id"]] == "running"
    assert states[twin] in ("shutting-down", "terminated")


async def test_foreign_instances_are_never_touched(moto_url: str) -> None:
    client = aws(moto_url)
    # Someone else's instance with the same Name tag, and another cluster's VM.
    client.run_instances(
        ImageId=an_ami(moto_url),
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "x-1"}]}],
    )
    other = load("ec2", options(moto_url, cluster="other"))
    await other.create(spec("x-1"))
    driver = load("ec2", options(moto_url))
    assert await driver.list() == []
    with pytest.raises(NoSuchVm):
        await driver.get("x-1")
    await driver.terminate("x-1")
    assert {i["State"]["Name"] for i in instances(moto_url)} == {"running"}


async def test_states_changed_outside_are_mapped(moto_url: str) -> None:
    driver = load("ec2", options(moto_url))
    vm = await driver.create(spec())
    iid = vm.details["instance_id"]
    client = aws(moto_url)
    client.stop_instances(InstanceIds=[iid])
    assert (await driver.get("web-1")).power == SUSPENDED
    client.terminate_instances(InstanceIds=[iid])
    with pytest.raises(NoSuchVm):
        await driver.get("web-1")
    assert ec2.power_of("pending") == RUNNING and ec2.power_of("stopping") == SUSPENDED
    assert ec2.power_of("shutting-down") is None and ec2.power_of("terminated") is None


async def test_aws_errors_become_driver_errors(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(moto_settings, "ENABLE_AMI_VALIDATION", True)
    monkeypatch.setattr(moto_settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)
    driver = load("ec2", options(moto_url))
    with pytest.raises(DriverError, match=r"InvalidAMIID\.NotFound"):
        await driver.create(spec(image="ami-00000000deadbeef"))
    with pytest.raises(DriverError, match="InvalidInstanceType"):
        await driver.create(spec(size="x9.bogus"))
    with pytest.raises(DriverError, match="no AMI for image 'ubuntu-24'"):
        await driver.create(spec(image="ubuntu-24"))
    with pytest.raises(DriverError, match="unknown size 'huge'"):
        await driver.create(spec(size="huge"))
    with pytest.raises(DriverError, match="not configured"):
        await driver.create(VmSpec(name="a-1", region="mars-1"))
    assert instances(moto_url) == []
    bad_subnet = load(
        "ec2", options(moto_url, subnet_id="subnet-00000000", security_group_id="sg-00000000")
    )
    with pytest.raises(DriverError, match="ec2 eu-west-1 run_instances: InvalidSubnetID"):
        await bad_subnet.create(spec())


async def test_unreachable_api_and_bad_options(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = load("ec2", {"endpoint_url": "http://127.0.0.1:9", "wait_timeout": 1})
    with pytest.raises(DriverError, match="ec2 eu-west-1 DescribeInstances"):
        await closed.get("web-1")
    # Credentials come from boto3's chain only: there is no option for them.
    with pytest.raises(DriverError, match="bad options"):
        load("ec2", {"aws_secret_access_key": "x"})
    # No credentials anywhere in the chain (and no instance metadata lookup: that
    # would leave loopback): one readable DriverError, before any request.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    anonymous = load("ec2", {"endpoint_url": moto_url})
    with pytest.raises(DriverError, match="Unable to locate credentials"):
        await anonymous.list()
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(DriverError, match="no region"):
        load("ec2", {})


async def test_calls_run_off_the_event_loop(moto_url: str) -> None:
    driver = load("ec2", options(moto_url))
    assert isinstance(driver, ec2.Driver)
    threads: set[str] = set()
    client = driver._client(REGION)
    client.meta.events.register(
        "before-call.ec2", lambda **_: threads.add(threading.current_thread().name)
    )
    await driver.create(spec())
    await driver.suspend("web-1")
    assert threads and threading.main_thread().name not in threads


def test_group_through_the_controller(make_controller, moto_url: str, tmp_path: Path) -> None:
    """POST /v1/groups with an ec2 member: the reconciler launches, suspends and
    terminates instances in moto, and records the cloud's message when a launch fails."""
    moto_settings.ENABLE_AMI_VALIDATION = True
    try:
        drivers = tmp_path / "drivers.json"
        drivers.write_text(json.dumps({"ec2": options(moto_url)}))
        ctl = make_controller(
            extra_env={"CLADNET_DRIVERS": str(drivers), "CLADNET_LEADER_TTL": "2"}
        )
        with ctl.client() as admin:
            _group_lifecycle(admin, moto_url)
    finally:
        moto_settings.ENABLE_AMI_VALIDATION = False


def _group_lifecycle(admin: httpx.Client, url: str) -> None:
    def state(name: str, want: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            group = admin.get(f"/v1/groups/{name}").json()
            return group if group.get("state") == want else None

        return wait_until(check, 30, what=f"group {name} {want}")

    member = {"driver": "ec2", "region": REGION, "count": 2}
    r = admin.post("/v1/groups", json={"name": "web", "members": [member]})
    assert r.status_code == 202, r.text
    group = state("web", lifecycle.RUNNING)
    assert all(vm["public_ip"] and vm["details"]["instance_id"] for vm in group["vms"])
    assert {i["State"]["Name"] for i in instances(url)} == {"running"}
    assert len(instances(url)) == 2
    [inst] = instances(url, "web-1")
    user_data = aws(url).describe_instance_attribute(
        InstanceId=inst["InstanceId"], Attribute="userData"
    )["UserData"]["Value"]
    assert "CLADNET_JOIN_TOKEN=" in base64.b64decode(user_data).decode()

    assert admin.post("/v1/groups/web/actions", json={"action": "suspend"}).status_code == 202
    state("web", lifecycle.SUSPENDED)
    assert {i["State"]["Name"] for i in instances(url, "web-1")} == {"stopped"}

    bad = {**member, "count": 1, "image": "ami-00000000deadbeef"}
    assert admin.post("/v1/groups", json={"name": "bad", "members": [bad]}).status_code == 202
    failed = state("bad", lifecycle.FAILED)
    assert "InvalidAMIID.NotFound" in failed["vms"][0]["error"]

    assert admin.delete("/v1/groups/web").status_code in (200, 202)
    wait_until(lambda: admin.get("/v1/groups/web").status_code == 404, 30, what="web to be deleted")
    assert {i["State"]["Name"] for i in instances(url, "web-1")} <= {"terminated", "shutting-down"}
