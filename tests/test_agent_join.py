"""``cladnet-agent join``: the token never on a command line, and a join that waits out
a controller that is down or busy (429 + Retry-After) instead of giving up.

The retry policy is unit-tested with a fake clock; the join itself runs as a real
agent process against a real controller and etcd.
"""

from __future__ import annotations

import email.utils
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cladnet.api_client import (
    ApiClientError,
    GaveUp,
    is_transient,
    retry_after,
    with_retries,
)
from cladnet.keys import generate_keypair
from lab.api import make_network, make_token
from lab.components import REPO, Controller, free_port, wait_until

# --- the retry policy (no I/O) -----------------------------------------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(*errors: Exception):  # type: ignore[no-untyped-def]
    """A call that raises ``errors`` in turn, then returns "joined"."""
    pending = list(errors)
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if pending:
            raise pending.pop(0)
        return "joined"

    return call, calls


async def test_transient_failures_are_retried_with_capped_jittered_backoff() -> None:
    t = FakeTime()
    errors = [httpx.ConnectError("refused")] * 5 + [ApiClientError(503, "etcd_unavailable", "")]
    errors += [httpx.ReadTimeout("slow"), ApiClientError(500, "internal", "")]
    call, calls = failing(*errors)
    result = await with_retries(call, 600, "join", low=1, high=8, sleep=t.sleep, clock=t.clock)
    assert result == "joined" and len(calls) == 9
    nominal = [1, 2, 4, 8, 8, 8, 8, 8]  # doubling, capped at 8
    for wait, base in zip(t.sleeps, nominal, strict=True):
        assert 0.8 * base <= wait <= 1.2 * base, t.sleeps
    assert len(set(t.sleeps)) > 1  # jittered, not lockstep


async def test_retry_after_is_honoured() -> None:
    t = FakeTime()
    call, _ = failing(ApiClientError(429, "rate_limited", "slow down", retry_after=17))
    assert await with_retries(call, 600, "join", low=1, sleep=t.sleep, clock=t.clock) == "joined"
    assert t.sleeps[0] >= 17


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_other_client_errors_fail_at_once(status: int) -> None:
    t = FakeTime()
    call, calls = failing(ApiClientError(status, "nope", "no"))
    with pytest.raises(ApiClientError):
        await with_retries(call, 600, "join", sleep=t.sleep, clock=t.clock)
    assert len(calls) == 1 and t.sleeps == []


async def test_gives_up_when_time_is_up() -> None:
    t = FakeTime()
    call, calls = failing(*[httpx.ConnectError("refused")] * 100)
    with pytest.raises(GaveUp, match="not available for 60 s"):
        await with_retries(call, 60, "join", low=1, high=30, sleep=t.sleep, clock=t.clock)
    assert t.now <= 60 and sum(t.sleeps) == pytest.approx(t.now)
    # A Retry-After beyond the deadline is not waited for.
    t = FakeTime()
    call, calls = failing(ApiClientError(429, "rate_limited", "", retry_after=3600))
    with pytest.raises(GaveUp):
        await with_retries(call, 60, "join", sleep=t.sleep, clock=t.clock)
    assert t.sleeps == [] and len(calls) == 1


def test_what_is_transient() -> None:
    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(httpx.ConnectTimeout("slow"))
    assert is_transient(ApiClientError(429, "rate_limited", ""))
    assert not is_transient(ApiClientError(401, "invalid_token", ""))
    assert not is_transient(ValueError("a bug"))
    # A certificate that does not verify now will not verify on a retry either.
    try:
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed")
        except ssl.SSLError as inner:
            raise httpx.ConnectError("tls") from inner
    except httpx.ConnectError as exc:
        assert not is_transient(exc)


def test_retry_after_header_forms() -> None:
    assert retry_after("7") == 7.0
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after(later, now=1_000_000) == pytest.approx(30)
    assert retry_after(None) is None and retry_after("soon") is None


# --- the real agent against a real controller --------------------------------------------


def start_join(
    controller_url: str,
    state: Path,
    *extra: str,
    token: str | None = None,
    timeout: float = 120,
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLADNET_JOIN_TOKEN"}
    if token is not None:
        env["CLADNET_JOIN_TOKEN"] = token
    cmd = [sys.executable, "-m", "agent.main", "--log-level", "debug", "join", "--no-run"]
    cmd += ["--controller", controller_url, "--state-dir", str(state)]
    cmd += ["--join-timeout", str(timeout), *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def log_entries(stderr: str, message: str) -> list[dict]:
    entries = []
    for line in stderr.splitlines():
        if line.startswith("{") and message in line:
            entries.append(json.loads(line))
    return entries


def host_names(ctl: Controller, network: str) -> list[str]:
    with ctl.client() as admin:
        return sorted(h["name"] for h in admin.get(f"/v1/networks/{network}/hosts").json())


def test_join_waits_for_a_controller_that_starts_later(controller: Controller, tmp_path) -> None:
    """The VM boots while the controller restarts: the join retries until it is back.
    The token comes from a 0600 file and is on no command line meanwhile."""
    with controller.client() as admin:
        make_network(admin, "late", cidr="10.61.0.0/24")
        token = make_token(admin, "late")
    token_file = tmp_path / "join-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    controller.stop()

    proc = start_join(
        controller.url, tmp_path / "state", "--hostname", "vm-late", "--token-file", str(token_file)
    )
    try:
        # It keeps trying (connection refused) …
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        wait_until(
            lambda: proc.poll() is None and b"--join-timeout" in cmdline.read_bytes(),
            30,
            what="the join to start",
        )
        assert token.encode() not in cmdline.read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert token.encode() not in environ
        time.sleep(4)
        assert proc.poll() is None, "the join gave up while the controller was down"
        # … and the controller comes back on its address.
        controller.start()
    finally:
        code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["network"] == "late"
    # Several attempts, one warning: the rest are debug lines.
    assert len(log_entries(err, "controller not available, retrying")) == 1, err[-3000:]
    assert log_entries(err, '"msg": "retrying"'), err[-3000:]
    assert host_names(controller, "late") == ["vm-late"]


def test_join_honours_429_retry_after(make_controller, tmp_path) -> None:
    """Joins limited to one per 4 s from this address: the controller says how long to
    wait (Retry-After), and the agent waits that long, then joins."""
    ctl = make_controller(extra_env={"CLADNET_JOIN_RATE": "0.25", "CLADNET_JOIN_BURST": "1"})
    with ctl.client() as admin:
        make_network(admin, "busy", cidr="10.62.0.0/24")
        token = make_token(admin, "busy")

    def join(name: str) -> httpx.Response:
        body = {"token": token, "hostname": name, "public_key": generate_keypair()[1]}
        with ctl.client(token=None) as c:
            return c.post("/v1/join", json=body)

    assert join("vm-first").status_code == 200
    limited = join("vm-limited")
    assert limited.status_code == 429, limited.text
    hint = int(limited.headers["retry-after"])
    assert 1 <= hint <= 4 and limited.json()["error"] == "rate_limited"

    proc = start_join(ctl.url, tmp_path / "state", "--hostname", "vm2", token=token)
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    (retry,) = log_entries(err, "controller not available, retrying")
    assert retry["error"].startswith("429 rate_limited") and retry["delay"] >= 1, retry
    assert host_names(ctl, "busy") == ["vm-first", "vm2"]


def test_join_refused_fails_at_once_with_one_line(controller: Controller, tmp_path) -> None:
    code, _, err = finish(start_join(controller.url, tmp_path / "s", token="clj_nope.nope"))
    assert code == 1
    (line,) = [x for x in err.splitlines() if not x.startswith("{")]
    assert line.startswith("cladnet-agent: 401 invalid_token"), err
    assert "retrying" not in err and not (tmp_path / "s" / "networks").exists()


def test_join_gives_up_after_join_timeout(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = finish(start_join(url, tmp_path / "s", token="clj_a.b", timeout=3))
    assert code == 1
    (line,) = [x for x in err.splitlines() if not x.startswith("{")]
    assert "join: the controller was not available for 3 s" in line, err


def test_token_is_never_taken_from_the_command_line(tmp_path) -> None:
    secret = "clj_secret.doNotEcho"
    code, _, err = finish(start_join("http://127.0.0.1:9", tmp_path / "s", "--token", secret))
    assert code == 2 and secret not in err
    (line,) = [x for x in err.splitlines() if not x.startswith("{")]
    assert "CLADNET_JOIN_TOKEN" in line and "--token-file" in line
    code, _, err = finish(start_join("http://127.0.0.1:9", tmp_path / "s"))
    assert code == 2 and "no join token" in err, err
