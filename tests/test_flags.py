"""The flag names the issues fix (``--mqtt``) are accepted next to the longer ones."""

from __future__ import annotations

from collector.main import parse_args as collector_args
from controller.config import parse_args as controller_args


def test_mqtt_is_the_broker_url_for_controller_and_collector() -> None:
    url = "mqtt://10.1.2.3:1883"
    assert controller_args(["--mqtt", url]).mqtt_url == url
    assert controller_args(["--mqtt-url", url]).mqtt_url == url
    assert collector_args(["--mqtt", url]).mqtt_url == url
    assert collector_args(["--store", "sqlite:///x.db"]).store == "sqlite:///x.db"
