"""VM groups: the lifecycle of a VM, a group's derived state, and the user-data that
enrols a new VM in its group's network. Pure: the controller's reconciler does the I/O.

A VM's state is data in etcd. A *transitional* state (Creating, Suspending, …) says
work is pending; the reconciler does it and writes the resulting state, or Failed
with the error and the operation that failed (so it can be retried). Anything that
reads a VM in a transitional state may redo its operation: drivers are idempotent.
"""

from __future__ import annotations

import shlex
from collections import Counter

CREATING = "Creating"
RUNNING = "Running"
SUSPENDING = "Suspending"
SUSPENDED = "Suspended"
RESUMING = "Resuming"
REBOOTING = "Rebooting"
TERMINATING = "Terminating"
TERMINATED = "Terminated"
FAILED = "Failed"

# Transitional state → the driver operation it waits for.
OPERATION = {
    CREATING: "create",
    SUSPENDING: "suspend",
    RESUMING: "resume",
    REBOOTING: "reboot",
    TERMINATING: "terminate",
}
TRANSITIONAL = frozenset(OPERATION)
# Operation → the transitional state that asks for it, and the state after success.
STARTS = {op: state for state, op in OPERATION.items()}
RESULT = {
    "create": RUNNING,
    "suspend": SUSPENDED,
    "resume": RUNNING,
    "reboot": RUNNING,
    "terminate": TERMINATED,
}
# Group actions and the states a VM must be in for each (other VMs are left alone).
ACTIONS = {
    "suspend": frozenset({RUNNING}),
    "resume": frozenset({SUSPENDED}),
    "reboot": frozenset({RUNNING}),
    "terminate": frozenset({CREATING, RUNNING, SUSPENDED, FAILED}),
    "retry": frozenset({FAILED}),
}
# Which state names a mixed group: problems first, then work in progress, then rest.
_PRIORITY = [
    FAILED,
    CREATING,
    TERMINATING,
    SUSPENDING,
    RESUMING,
    REBOOTING,
    SUSPENDED,
    TERMINATED,
    RUNNING,
]


class ActionRefused(ValueError):
    """The action does not apply to the VM in its current state."""


def next_state(state: str, action: str, failed_op: str | None = None) -> str:
    """The state a VM moves to when ``action`` is asked for; ``ActionRefused`` if it can't."""
    allowed = ACTIONS.get(action)
    if allowed is None:
        raise ActionRefused(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    if state not in allowed:
        raise ActionRefused(f"cannot {action} a VM that is {state}")
    if action == "retry":
        return STARTS[failed_op or "create"]
    return STARTS[action]


def group_state(states: list[str]) -> tuple[str, dict[str, int]]:
    """A group's state from its VMs': all alike → that state, else ``Partial-<state>``.

    The named state of a mixed group is the most pressing one present (Failed, then
    work in progress, then Suspended, Terminated): 4 Running + 2 Suspended is
    ``Partial-Suspended``. An empty group is ``Empty``.
    """
    counts = dict(Counter(states))
    if not counts:
        return "Empty", counts
    if len(counts) == 1:
        return states[0], counts
    named = next(s for s in _PRIORITY if s in counts)
    return f"Partial-{named}", counts


def vm_names(group: str, counts: list[int]) -> list[list[str]]:
    """VM names per member, numbered across the group: ``web-1``, ``web-2``, …"""
    names, n = [], 0
    for count in counts:
        names.append([f"{group}-{n + i + 1}" for i in range(count)])
        n += count
    return names


def user_data(
    controller_url: str,
    token: str,
    hostname: str,
    labels: dict[str, str],
    ca_hash: str | None = None,
    allow_commands: bool = False,
) -> str:
    """The first-boot script that installs nothing and joins: the agent must be present.

    Under systemd (a real VM) it joins without running, then hands the agent to
    systemd. Without it (a ``local`` VM, which sets ``CLADNET_NO_SYSTEMD``) it execs
    one ``join`` that goes on running: one agent start-up per VM, not two, so a group
    of VMs booting at once meshes sooner. It holds a one-use join token: it is
    written 0600, and the token goes to the agent in its environment, never on a
    command line (``ps``). ``allow_commands``: the group asked for remote commands.
    Join saves the opt-in; under systemd they run in ``cladnet-agent-commands.service``
    (outside the agent's sandbox, so ``apt-get`` works), otherwise in the agent itself.
    """
    args = ["--controller", controller_url]
    args += ["--hostname", hostname]
    if ca_hash:  # TLS: the agent pins the controller's CA on first contact
        args += ["--ca-hash", ca_hash]
    if allow_commands:
        args.append("--allow-commands")
    for key, value in sorted(labels.items()):
        args += ["--label", f"{key}={value}"]
    join = " ".join(shlex.quote(a) for a in args)
    env = f"CLADNET_JOIN_TOKEN={shlex.quote(token)}"
    # The mesh first: an image without the commands unit still joins.
    under_systemd = "    systemctl enable --now cladnet-agent.service\n"
    if allow_commands:
        under_systemd += "    systemctl enable --now cladnet-agent-commands.service\n"
    return (
        "#!/bin/sh\n"
        f"# CLADNet enrolment of {hostname}, made by the controller. Holds a one-use\n"
        "# join token: keep it private.\n"
        "set -eu\n"
        'AGENT="${CLADNET_AGENT:-cladnet-agent}"\n'
        'if [ -d /run/systemd/system ] && [ -z "${CLADNET_NO_SYSTEMD:-}" ]; then\n'
        f'    {env} "$AGENT" join --no-run {join}\n'
        f"{under_systemd}"
        "    exit 0\n"
        "fi\n"
        # The assignment is exported to the exec'd agent (sh, dash, bash alike).
        f'{env} exec "$AGENT" join {join}\n'
    )
