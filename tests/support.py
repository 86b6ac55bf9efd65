"""Assertions and helpers the test modules share (not fixtures)."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from cladnet.mesh import DeviceState
from lab.components import REPO, Controller
from lab.netns import root_missing


def need_root() -> None:
    """Skip the calling test unless we can make namespaces and WireGuard devices."""
    reason = root_missing()
    if reason:
        pytest.skip(reason)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert body["message"]
    return body


async def no_device() -> DeviceState:
    return DeviceState(listen_port=51820, peers={})


async def until(predicate, seconds: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll a (blocking) predicate off the loop until it is truthy."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                result = await asyncio.to_thread(predicate)
                if result:
                    return result
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds}s waiting for {what}") from None


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (Debian: systemd)"
)


def verify_unit(path: Path) -> tuple[bool, str]:
    """Clean means exit 0 and no line about the unit (unknown options are only warned)."""
    r = run(["systemd-analyze", "verify", str(path)], timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    return r.returncode == 0 and not [x for x in lines if path.name in x], "\n".join(lines)


def with_real_binaries(unit: Path, dest_dir: Path) -> Path:
    """A copy whose ExecStart is this venv's script: verify also checks it exists."""
    copy = dest_dir / unit.name
    copy.write_text(unit.read_text().replace(OPT_BIN, f"{Path(sys.prefix)}/bin/"))
    return copy


def unit_settings(name: str) -> dict[str, str]:
    text = (DEPLOY / "systemd" / name).read_text()
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))


DEPLOY = REPO / "deploy"


OPT_BIN = "/opt/cladnet/venv/bin/"


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    """Run outside the checkout, so ``python -c`` cannot import the checkout's packages."""
    kw.setdefault("cwd", "/")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


class Watcher:
    """Reads an NDJSON watch stream in a thread and queues its events."""

    def __init__(
        self, ctl: Controller, net: str, since: int | None, token: str | None = None
    ) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.status: int | None = None
        self.error: Exception | None = None
        self.body: dict = {}
        params = {"watch": "true"} | ({"since": str(since)} if since is not None else {})
        self._client = ctl.client(token) if token else ctl.client()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(net, params), daemon=True)
        self._thread.start()
        self._opened.wait(10)

    def _run(self, net: str, params: dict) -> None:
        try:
            with self._client.stream(
                "GET", f"/v1/networks/{net}/peers", params=params, timeout=None
            ) as r:
                if r.status_code != 200:
                    self.body = json.loads(r.read())
                self.status = r.status_code
                self._opened.set()
                if r.status_code != 200:
                    return
                for line in r.iter_lines():
                    if line:
                        self.events.put(json.loads(line))
        except httpx.HTTPError as exc:  # the stream was cut
            self.error = exc
        finally:
            self._opened.set()
            self.events.put({"type": "CLOSED"})

    def next(self, skip_bookmarks: bool = True, timeout: float = 10) -> dict:
        while True:
            event = self.events.get(timeout=timeout)
            if not (skip_bookmarks and event["type"] == "BOOKMARK"):
                return event

    def close(self) -> None:
        self._client.close()
