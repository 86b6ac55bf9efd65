"""Every benchmark at its smoke size, through the harness: it runs, reports JSON with
its figures and prints a summary. Timings are never asserted (see bench/)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.__main__ import BENCHMARKS, main, run


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_at_smoke_size(name: str) -> None:
    if BENCHMARKS[name][1] and os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and WireGuard")
    result = run(name, smoke=True)
    assert result["returncode"] == 0, result
    assert "error" not in result, result
    report = result["report"]
    assert report["benchmark"].startswith("cladnet."), report
    assert result["summary"] and not result["summary"].startswith("{"), result["summary"]


def test_the_harness_lists_and_refuses_unknown_names(capsys) -> None:
    assert main([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in BENCHMARKS)
    with pytest.raises(SystemExit) as refused:
        main(["no-such-bench"])
    assert refused.value.code == 2
    assert "unknown benchmark no-such-bench" in capsys.readouterr().err


@pytest.mark.root
def test_agent_scale_drives_a_real_wireguard_go_at_smoke_size(capsys) -> None:
    """``agent-scale --wireguard-go``: the same agent with a real device, its CPU counted
    beside the agent's; the namespace and wireguard-go are gone afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace and wireguard-go")
    from bench import agent_scale

    assert agent_scale.main(["--smoke", "--wireguard-go"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    real, memory = report["results"]
    assert (real["device"], memory["device"]) == ("wireguard-go", "memory")
    assert real["burst"]["wireguard_go_cpu_seconds"] is not None
    assert real["bad_input"] == real["save_errors"] == 0
    assert (
        f"cl-ascale-{os.getpid()}"
        not in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
    )
