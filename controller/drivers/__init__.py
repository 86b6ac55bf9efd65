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
        raise DriverError(f"unknown driver {name!r} (no module {module_name})") from e
    cls = getattr(module, "Driver", None)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverError(f"module {module_name} has no Driver class")
    try:
        driver = cls(**(options or {}))
    except TypeError as e:
        raise DriverError(f"bad options for driver {name!r}: {e}") from e
    driver.name = name
    return driver
