"""The agent's state directory: secrets stay private; a broken disk is not fatal; a
change appends only what changed, and a kill at any point leaves a saved state."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from agent import state
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
    for name in ("private.key", "credential", "membership.json", "journal"):
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


def _peers(m: Membership) -> dict[str, Any]:
    return {pid: dict(p) for pid, p in m.peers.items()}


def test_a_change_appends_only_the_changed_peers(tmp_path: Path) -> None:
    states = StateDir(tmp_path)
    m = _membership()
    m.peers = {f"h-{n}": host(n) for n in range(2, 202)}
    states.save(m)
    states.save_secrets(m.network_id, "clh_a.b", "k")
    d = tmp_path / "networks" / m.network_id
    snapshot = (d / "membership.json").read_bytes()
    m.peers["h-7"] = host(7, public_address="203.0.113.7")
    del m.peers["h-9"]
    m.revision = 42
    states.save_changes(m, {"h-7", "h-9"})
    assert (d / "membership.json").read_bytes() == snapshot, "the snapshot is not rewritten"
    assert len((d / "journal").read_bytes()) < len(snapshot) / 20
    assert (d / "journal").stat().st_mode & 0o777 == 0o600
    loaded = StateDir(tmp_path).load(m.network_id)[0]
    assert loaded.revision == 42 and _peers(loaded) == _peers(m)


def test_the_journal_is_compacted_once_as_large_as_the_snapshot(tmp_path: Path) -> None:
    states = StateDir(tmp_path)
    m = _membership()
    m.peers = {f"h-{n}": host(n) for n in range(2, 12)}
    states.save(m)
    states.save_secrets(m.network_id, "clh_a.b", "k")
    d = tmp_path / "networks" / m.network_id
    for step in range(400):
        m.peers["h-3"] = host(3, public_address=f"203.0.113.{step % 250}")
        m.revision = step
        states.save_changes(m, {"h-3"})
        # Bounded: never much more than the threshold (or the snapshot) plus one line.
        assert len((d / "journal").read_bytes()) < state.JOURNAL_MIN + 4096
    loaded = StateDir(tmp_path).load(m.network_id)[0]
    assert loaded.revision == 399 and _peers(loaded) == _peers(m)


def test_a_kill_at_any_byte_leaves_a_state_that_was_saved(tmp_path: Path) -> None:
    """A prefix of the journal (a kill mid-append) and a kill between a compaction's
    snapshot and its truncation load as one of the saved states, never a mix."""
    states = StateDir(tmp_path / "live")
    m = _membership()
    m.peers = {f"h-{n}": host(n) for n in range(2, 8)}
    states.save(m)
    states.save_secrets(m.network_id, "clh_a.b", "k")
    saved = [(m.revision, _peers(m))]
    for step in range(1, 6):
        if step % 2:
            m.peers[f"h-{step + 1}"] = host(step + 1, name=f"moved{step}")
        else:
            m.peers.pop(f"h-{step + 1}")
        m.revision = 10 + step
        states.save_changes(m, {f"h-{step + 1}"})
        saved.append((m.revision, _peers(m)))
    live = tmp_path / "live" / "networks" / m.network_id
    journal = (live / "journal").read_bytes()
    # Every byte would do as well; these are the cuts that differ: at, just before and
    # just after each line's end, and in the middle of each line.
    ends = [i + 1 for i, b in enumerate(journal) if b == ord("\n")]
    starts = [0, *ends[:-1]]
    cuts = {c for e in ends for c in (e - 1, e, e + 1)} | {
        (a + e) // 2 for a, e in zip(starts, ends, strict=True)
    }
    for cut in sorted(c for c in cuts | {0} if c <= len(journal)):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tmp_path / "live", copy)
        (copy / "networks" / m.network_id / "journal").write_bytes(journal[:cut])
        restored = StateDir(copy)
        loaded = restored.load(m.network_id)[0]
        whole = journal[:cut].count(b"\n")
        assert (loaded.revision, _peers(loaded)) == saved[whole]
        # After a torn line, the next save starts clean (a snapshot) and appends load.
        loaded.revision = 99
        loaded.peers.pop("h-2")
        restored.save_changes(loaded, {"h-2"})
        loaded.revision = 100
        restored.save_changes(loaded, set())
        again = StateDir(copy).load(m.network_id)[0]
        assert again.revision == 100 and _peers(again) == _peers(loaded)
    # A compaction killed after its snapshot, before the journal's truncation.
    states.save(m)
    (live / "journal").write_bytes(journal)  # the old generation's lines, still there
    loaded = StateDir(tmp_path / "live").load(m.network_id)[0]
    assert (loaded.revision, _peers(loaded)) == saved[-1]
