"""Rate limits: the pure limiter, and the controller refusing token guessing and join floods."""

from __future__ import annotations

import pytest

from cladnet.ratelimit import RateLimiter
from lab.api import join, make_network, make_token
from lab.components import Controller
from tests.support import assert_error


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.hit("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.hit("a", 0.0) == pytest.approx(0.5)  # refused, not recorded
    assert limiter.blocked_for("a", 0.25) == pytest.approx(0.25)
    assert limiter.hit("a", 0.5) == 0  # one token back after 1/rate seconds
    assert limiter.hit("b", 0.0) == 0  # keys are independent
    assert limiter.blocked_for("c", 0.0) == 0


def test_the_key_table_is_bounded() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=100)
    for i in range(1000):
        limiter.hit(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._buckets) == 100


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)


def test_failed_authentications_and_joins_are_rate_limited(make_controller) -> None:
    ctl: Controller = make_controller(
        extra_env={
            "CLADNET_AUTH_FAILURE_BURST": "5",
            "CLADNET_JOIN_BURST": "3",
            "CLADNET_JOIN_RATE": "0.01",
        }
    )
    with ctl.client(token="cla_guess.guess") as guesser:
        codes = [guesser.get("/v1/networks").status_code for _ in range(6)]
        assert codes == [401] * 5 + [429]
        body = assert_error(guesser.get("/v1/networks"), 429, "rate_limited")
        assert "failed authentications" in body["message"]
    # The address is refused for a while, even with a good token.
    with ctl.client() as admin:
        assert admin.get("/v1/networks").status_code == 429

    other = make_controller(extra_env={"CLADNET_JOIN_BURST": "3", "CLADNET_JOIN_RATE": "0.01"})
    with other.client() as admin:
        make_network(admin, "rl", cidr="10.231.0.0/24")
        token = make_token(admin, "rl")
    assert [join(other, token, f"vm{i}").status_code for i in range(3)] == [200] * 3
    assert_error(join(other, token, "vm4"), 429, "rate_limited")
