"""How this host stands with the controller, and what an error answer means for it.

An error answer is never a reason to tear down: a controller started on an empty or
restored etcd, a wrong URL or a proxy in the way all answer 401/404 for a host that
is alive and well. Only this host's own ``DELETED`` event in its authenticated watch
(or ``cladnet-agent leave``) removes a membership; everything else keeps the tunnels,
keys and state, backs off and is reported here: one log line per change of standing,
a gauge, and ``cladnet-agent status``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cladnet.api_client import TRANSIENT_STATUS, ApiClientError

OK = "ok"
# No answer, or "not now" (429, 5xx): the controller restarts or its etcd is away.
UNREACHABLE = "unreachable"
# Answers, but refuses a request for another reason (a 4xx that is not about us).
REFUSED = "refused"
# Answers, but does not know this host (401/403/404, or a peer list without it).
UNRECOGNISED = "unrecognised"
STATES = (OK, UNREACHABLE, REFUSED, UNRECOGNISED)  # in order of severity


class HostNotListed(Exception):
    """The controller's peer list of this network does not hold this host."""


def classify(exc: BaseException) -> str:
    """The standing an error from a call to the controller implies."""
    if isinstance(exc, HostNotListed):
        return UNRECOGNISED
    if isinstance(exc, ApiClientError):
        if exc.status in (401, 403, 404):
            return UNRECOGNISED
        if exc.status in TRANSIENT_STATUS:
            return UNREACHABLE
        return REFUSED
    return UNREACHABLE


class Standing:
    """The worst standing reported by any channel (the watch, the heartbeat).

    Channels are kept apart so that a watch cut while heartbeats pass does not flap
    the overall standing; ``on_change(old, new, reason)`` runs only when it changes.
    """

    def __init__(
        self,
        on_change: Callable[[str, str, str], None],
        state: str = OK,
        since: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_change = on_change
        self._clock = clock
        self._channels: dict[str, str] = {}
        known = state in STATES
        self.state = state if known else OK
        self.since = since if known and since is not None else clock()

    def report(self, channel: str, state: str, reason: str = "") -> bool:
        """Record ``channel``'s latest outcome; True if the overall standing changed."""
        self._channels[channel] = state
        worst = max(self._channels.values(), key=STATES.index)
        if worst == self.state:
            return False
        old, self.state, self.since = self.state, worst, self._clock()
        self._on_change(old, worst, reason)
        return True

    def ok(self, channel: str) -> bool:
        """``channel`` got a good answer."""
        return self.report(channel, OK)

    def failed(self, channel: str, exc: BaseException) -> str:
        """``channel`` got ``exc``; returns the standing it implies for that channel."""
        state = classify(exc)
        self.report(channel, state, str(exc) or type(exc).__name__)
        return state

    def gauges(self) -> dict[str, float]:
        """Metric samples: 1 while unrecognised / unreachable, else 0."""
        return {
            "agent_controller_unrecognised": float(self.state == UNRECOGNISED),
            "agent_controller_unreachable": float(self.state == UNREACHABLE),
        }
