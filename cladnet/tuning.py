"""Host settings an agent may raise behind ``--tune-host``: which, to what, and what to put
back. Pure: values in, values out (``agent/tuning.py`` reads and writes them).

Every tunnel here drops packets in default UDP socket buffers under load (issue 13,
item 8). ``rmem_max``/``wmem_max`` cap what a socket may ask for; ``rmem_default``/
``wmem_default`` are what a new socket gets, so they size the WireGuard device's own
socket when it is made after them: wireguard-go before 0.0.20230223 (Debian 12 ships
0.0.20220316) asks for no size, and kernel WireGuard's receive buffer is the default.
"""

from __future__ import annotations

from collections.abc import Mapping

# What wireguard-go asks for its own sockets since 0.0.20230223.
BUFFER_BYTES = 7 << 20
SETTINGS = (
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.core.rmem_default",
    "net.core.wmem_default",
)


def raised(current: Mapping[str, int], target: int = BUFFER_BYTES) -> dict[str, int]:
    """The settings to write: each of ``current`` below ``target``, raised to it. A value
    already at least that large (tuned by the operator) is never lowered."""
    return {name: target for name, value in current.items() if value < target}


def to_restore(
    saved: Mapping[str, Mapping[str, int]], current: Mapping[str, int]
) -> dict[str, int]:
    """The values to put back: ``saved`` is name → ``{"before": …, "set": …}`` as recorded
    when tuning. A setting that no longer holds what we set was changed by someone
    else since, and is left as they set it."""
    return {
        name: int(record["before"])
        for name, record in saved.items()
        if name in current and current[name] == record["set"]
    }
