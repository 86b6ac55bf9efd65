"""The place that uses a dependency's private parts fails here, loudly, when the
dependency changes under it: controller/etcd_revision.py (aetcd's kvstub and
_timeout). Read the new upstream code, update the adapter, then the pin in
pyproject.toml and the constant here. (The collector's manual MQTT acks no longer
reach into aiomqtt's paho client: collector/mqtt.py is its own client.)"""

from __future__ import annotations

import inspect
from importlib import metadata

import aetcd
from aetcd import rpc

from controller import etcd_revision


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
