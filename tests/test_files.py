"""cladnet.files.write_atomic: the one writer of secrets and state files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cladnet import files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_is_0600_and_holds_the_data(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    files.write_atomic(path, "s3cret\n")
    assert path.read_text() == "s3cret\n"
    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["secret"]


def test_replacing_a_wider_file_narrows_it(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("old")
    path.chmod(0o644)
    files.write_atomic(path, b"new", durable=False)
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600


def test_a_public_file_gets_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    files.write_atomic(path, b"cert", mode=0o644)
    assert _mode(path) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")

    def broken(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]
