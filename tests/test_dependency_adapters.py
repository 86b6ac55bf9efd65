"""The two places that use a dependency's private parts fail here, loudly, when the
dependency changes under them: collector/mqtt_ack.py (aiomqtt's paho client) and
controller/etcd_revision.py (aetcd's kvstub and _timeout). Read the new upstream
code, update the adapter, then the pin in pyproject.toml and the constant here."""

from __future__ import annotations

import inspect
from importlib import metadata

import aetcd
import aiomqtt
import paho.mqtt.client as paho
from aetcd import rpc

from collector import mqtt_ack
from controller import etcd_revision


async def test_aiomqtt_is_the_pinned_version_with_a_paho_client_inside() -> None:
    assert metadata.version("aiomqtt") == mqtt_ack.PINNED_AIOMQTT
    assert metadata.version("paho-mqtt").split(".")[0] == "2"
    client = aiomqtt.Client("127.0.0.1", 1)  # not connected: only the object is built
    assert isinstance(client._client, paho.Client)
    mqtt_ack.enable_manual_ack(client)  # does not raise on the pinned version


def test_paho_manual_ack_methods_keep_their_signatures() -> None:
    assert list(inspect.signature(paho.Client.manual_ack_set).parameters) == ["self", "on"]
    assert list(inspect.signature(paho.Client.ack).parameters) == ["self", "mid", "qos"]


def test_aetcd_is_the_pinned_version_and_reads_the_way_the_adapter_does() -> None:
    assert metadata.version("aetcd") == etcd_revision.PINNED_AETCD
    assert "self._timeout = timeout" in inspect.getsource(aetcd.Client.__init__)
    assert "self.kvstub = rpc.KVStub(self.channel)" in inspect.getsource(aetcd.Client.connect)
    # The adapter's call is aetcd's own, only with a revision in the request.
    get_range = inspect.getsource(aetcd.Client.get_range)
    assert "self.kvstub.Range(" in get_range
    assert "timeout=self._timeout" in get_range
    assert "metadata=self.metadata" in get_range
    fields = rpc.RangeRequest.DESCRIPTOR.fields_by_name
    assert {"key", "range_end", "revision", "limit", "keys_only"} <= set(fields)


def test_aetcd_maps_grpc_errors_the_way_raw_call_relies_on() -> None:
    # raw_call maps errors with aetcd's private _handle_exception, as its public calls do.
    assert callable(getattr(aetcd.exceptions, "_handle_exception", None))
    assert "exceptions._handle_exception(e)" in inspect.getsource(aetcd.client._handle_errors)
    fields = rpc.RangeRequest.DESCRIPTOR.fields_by_name
    assert {"count_only", "min_mod_revision", "sort_order"} <= set(fields)
