"""Provisioning drivers, found by name: ``controller.drivers.<name>`` defines ``Driver``.

A new provider is a new module in this package (or any importable module given by
its dotted path); nothing else changes.
"""

from __future__ import annotations

import importlib
from typing import Any

from controller.drivers.base import Driver, DriverError

__all__ = ["Driver", "DriverError", "load"]


def load(name: str, options: dict[str, Any] | None = None) -> Driver:
    """Import the driver module for ``name`` and build its ``Driver`` with ``options``."""
    module_name = name if "." in name else f"controller.drivers.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise DriverError(f"unknown driver {name!r} (no module {module_name})") from e
        # The driver exists; its SDK is an extra (boto3 for ec2) not installed here.
        raise DriverError(
            f"driver {name!r} needs {e.name}, which is not installed: pip install 'cladnet[{name}]'"
        ) from e
    cls = getattr(module, "Driver", None)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverError(f"module {module_name} has no Driver class")
    try:
        driver = cls(**(options or {}))
    except TypeError as e:
        raise DriverError(f"bad options for driver {name!r}: {e}") from e
    driver.name = name
    return driver
