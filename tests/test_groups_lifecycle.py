"""The pure VM lifecycle: allowed actions, a group's derived state, the user-data."""

from __future__ import annotations

import subprocess

import pytest

from cladnet import groups as g


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([g.RUNNING] * 3, g.RUNNING),
        ([g.RUNNING, g.RUNNING, g.SUSPENDED], "Partial-Suspended"),
        ([g.RUNNING, g.FAILED, g.SUSPENDED], "Partial-Failed"),
        ([g.SUSPENDED, g.RESUMING], "Partial-Resuming"),
        ([g.TERMINATED, g.RUNNING], "Partial-Terminated"),
        ([], "Empty"),
    ],
)
def test_group_state(states: list[str], expected: str) -> None:
    state, counts = g.group_state(states)
    assert state == expected
    assert sum(counts.values()) == len(states)


def test_actions_only_apply_where_they_make_sense() -> None:
    assert g.next_state(g.RUNNING, "suspend") == g.SUSPENDING
    assert g.next_state(g.SUSPENDED, "resume") == g.RESUMING
    assert g.next_state(g.FAILED, "retry", "resume") == g.RESUMING
    assert g.next_state(g.CREATING, "terminate") == g.TERMINATING
    for state, action in [
        (g.SUSPENDED, "suspend"),
        (g.RUNNING, "resume"),
        (g.TERMINATED, "terminate"),
    ]:
        with pytest.raises(g.ActionRefused, match=state):
            g.next_state(state, action)
    with pytest.raises(g.ActionRefused, match="unknown action"):
        g.next_state(g.RUNNING, "explode")


def test_every_transitional_state_has_an_operation_and_a_result() -> None:
    for state in g.TRANSITIONAL:
        assert g.RESULT[g.OPERATION[state]] not in g.TRANSITIONAL


def test_vm_names_number_across_members() -> None:
    assert g.vm_names("web", [2, 1]) == [["web-1", "web-2"], ["web-3"]]


def test_user_data_quotes_everything_and_runs(tmp_path) -> None:
    """A label value with shell syntax stays a value: run the script against a fake agent."""
    fake = tmp_path / "agent"
    out = tmp_path / "calls"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" "token=${{CLADNET_JOIN_TOKEN:-}}" >> {out}\n'
        f"echo --- >> {out}\n"
    )
    fake.chmod(0o755)
    script = g.user_data("http://10.9.0.1:8470", "tok'en", "vm-1", {"k": "$(touch x); 'y'"})
    env = {"CLADNET_AGENT": str(fake), "CLADNET_NO_SYSTEMD": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", "-c", script], env=env, cwd=tmp_path, check=True)
    calls = out.read_text().split("---\n")
    # One process joins and goes on running (no service manager here): one start-up.
    assert len(calls) == 2 and calls[1] == ""
    join = calls[0].splitlines()
    assert join[0] == "join" and "--no-run" not in join
    # The token reaches join through its environment only, never its command line.
    assert join[-1] == "token=tok'en" and "--token" not in join
    assert "tok'en" not in " ".join(join[:-1])
    assert "k=$(touch x); 'y'" in join
    assert not (tmp_path / "x").exists()
    # Group VMs accept remote commands only when their group asks; join saves the choice.
    assert "--allow-commands" not in join
    assert "--allow-commands" in g.user_data("http://c", "t", "vm-1", {}, allow_commands=True)
