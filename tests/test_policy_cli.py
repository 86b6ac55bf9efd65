"""``cladnet policy`` and ``cladnet tag`` against a real controller."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cladnet.cli import app
from lab.api import join, make_token
from lab.components import ADMIN_TOKEN, Controller


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in-process; returns (exit code, stdout, the one-line error main() would print)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("CLADNET_CONTROLLER", "CLADNET_COLLECTOR", "CLADNET_TOKEN", "CLADNET_CONTEXT"):
        monkeypatch.delenv(var, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        r = CliRunner().invoke(app, list(args), catch_exceptions=True)
        error = (
            "" if r.exception is None or isinstance(r.exception, SystemExit) else str(r.exception)
        )
        return r.exit_code, r.stdout, error

    return run


POLICY_YAML = """
groups:
  web: [tag:web]
  db: [tag:db]
rules:
  - {src: group:web, dst: group:db, proto: tcp, ports: [5432]}
tests:
  - {src: group:web, dst: group:db, proto: tcp, port: 5432, expect: allow}
  - {src: group:web, dst: tag:bastion, proto: tcp, port: 22, expect: deny}
"""


def test_policy_get_set_test_diff_check_and_tag(
    cli,
    controller: Controller,
    tmp_path: Path,
) -> None:
    assert cli("login", controller.url, "--token", ADMIN_TOKEN)[0] == 0
    assert cli("net", "create", "prod", "--cidr", "10.61.0.0/24")[0] == 0
    code, out, _ = cli("policy", "get", "prod")
    assert code == 0 and "policy default, allows everything" in out and "'*'" in out

    good = tmp_path / "policy.yaml"
    good.write_text(POLICY_YAML)
    assert cli("policy", "test", "prod", str(good))[:2] == (0, "all tests pass\n")
    code, out, _ = cli("policy", "diff", "prod", str(good))
    assert code == 1 and "+- dst: group:db\n" in out and "-  proto: any\n" in out, out
    assert cli("policy", "set", "prod", str(good))[:2] == (0, "policy of prod is now version 1\n")
    assert cli("policy", "diff", "prod", str(good))[:2] == (0, "")
    assert "policy version 1\n" in cli("policy", "get", "prod")[1]

    bad = tmp_path / "bad.json"  # JSON is YAML: the same loader reads both
    bad.write_text(
        '{"rules": [{"src": "*", "dst": "*"}], "tests": '
        '[{"src": "tag:web", "dst": "tag:bastion", "port": 22, "expect": "deny"}]}'
    )
    code, out, _ = cli("policy", "test", "prod", str(bad))
    assert code == 1 and out.startswith("FAIL tests[0] tag:web → tag:bastion tcp:22 denied")
    code, _, err = cli("policy", "set", "prod", str(bad))
    assert code == 1 and "policy_tests_failed" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [{src: web, dst: '*'}]")
    code, _, err = cli("policy", "set", "prod", str(broken))
    assert code == 1 and "rules[0].src[0]" in err

    token = make_token(controller.client(), "prod")
    web = join(controller, token, "web-1").json()["host_id"]
    join(controller, token, "db-1")
    code, out, _ = cli("policy", "check", "prod", "web-1", "db-1", "--port", "5432")
    assert code == 1 and "denied: no rule allows it" in out  # not tagged yet
    assert cli("tag", web, "web")[:2] == (0, "web-1: tags web\n")
    # By name too (--network: the one network it is in).
    assert cli("tag", "db-1", "db", "--network", "prod")[:2] == (0, "db-1: tags db\n")
    code, out, _ = cli("policy", "check", "prod", "web-1", "db-1", "--port", "5432")
    assert code == 0 and "allowed by rule 0" in out
    code, out, _ = cli("policy", "check", "prod", "db-1", "web-1", "--port", "5432")
    assert code == 1

    # explain: both ways, through the controller; by name, with the rule and the deny.
    code, out, _ = cli(
        "policy", "explain", "prod", "web-1", "db-1", "--proto", "tcp", "--port", "5432"
    )
    assert code == 0 and out.startswith("policy version 1 of prod, tcp:5432:\n"), out
    assert "  web-1 → db-1: allowed by rule 0 (group:web → group:db tcp:5432)" in out
    assert "  db-1 → web-1: default deny: no rule allows it" in out and "peers: yes" in out
    code, _, err = cli("policy", "explain", "prod", "web-1", "db-9")
    assert code == 1 and "host_not_found" in err
