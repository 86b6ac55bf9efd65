"""The agent's state directory: secrets stay private; a broken disk is not fatal."""

from __future__ import annotations

from pathlib import Path

from agent.daemon import NetworkAgent
from agent.state import Membership, StateDir
from lab.peers import NETWORK, host


def _membership() -> Membership:
    return Membership(
        controller="http://127.0.0.1:9",
        host_id="h-1",
        interface="cl-st",
        network=NETWORK,
        me=host(1),
    )


def test_secrets_are_private_and_loosened_modes_are_tightened(tmp_path: Path) -> None:
    states = StateDir(tmp_path / "state")
    m = _membership()
    states.save_secrets(m.network_id, "clh_a.b", "private-key")
    states.save(m)
    d = tmp_path / "state" / "networks" / m.network_id
    for name in ("private.key", "credential", "membership.json"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    (d / "private.key").chmod(0o644)
    (tmp_path / "state").chmod(0o755)
    loaded, credential, key = states.load(m.network_id)
    assert (credential, key) == ("clh_a.b", "private-key") and loaded.host_id == "h-1"
    assert (d / "private.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


async def test_a_failing_disk_is_reported_not_fatal(tmp_path: Path) -> None:
    # As root, permissions do not stop writes; a file where the directory should be does.
    states = StateDir(tmp_path / "state")
    m = _membership()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "networks").write_text("not a directory")
    agent = NetworkAgent(states, m, "clh_a.b", "k", backend=None)  # type: ignore[arg-type]
    try:
        agent._save()  # must not raise
        assert agent.save_errors == 1
    finally:
        await agent.client.close()
