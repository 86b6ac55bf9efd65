"""The operator docs' etcd backup and restore blocks run as written against a real etcd,
and the restored data holds what the backup had."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from lab.components import REPO, Etcd, free_port, wait_until
from tests.markdown import sh_blocks


def test_backup_and_restore_blocks_run_as_written(etcd: Etcd, tmp_path: Path) -> None:
    # /cladnet/networks/n-docs = "backup" (the JSON gateway takes base64)
    put = {"key": "L2NsYWRuZXQvbmV0d29ya3Mvbi1kb2Nz", "value": "ImJhY2t1cCI="}
    assert httpx.post(f"{etcd.url}/v3/kv/put", json=put, timeout=10).is_success
    blocks = sh_blocks(REPO / "docs" / "operator.md", "Backup and restore of etcd")
    assert len(blocks) == 2
    env = {
        **os.environ,
        "ETCD": etcd.url,
        "BACKUP": str(tmp_path / "backup"),
        "RESTORED": str(tmp_path / "restored"),
    }
    script = "\n".join(blocks)  # in order, in one shell, as a reader would
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "backup" / "cladnet.db").stat().st_size > 0
    # An etcd started on the restored directory has the key.
    client, peer = free_port(), free_port()
    log = (tmp_path / "restored.log").open("wb")
    proc = subprocess.Popen(
        [
            "etcd",
            "--name",
            "cl-restored",
            "--data-dir",
            str(tmp_path / "restored"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        get = {"key": put["key"]}
        url = f"http://127.0.0.1:{client}/v3/kv/range"
        kvs = wait_until(lambda: _range(url, get), 30, what="the restored etcd")
        assert kvs[0]["value"] == put["value"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _range(url: str, body: dict) -> list | None:
    try:
        return httpx.post(url, json=body, timeout=2).json().get("kvs")
    except httpx.HTTPError:
        return None
