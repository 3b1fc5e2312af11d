"""Atomicity under load: no thread ever sees half a patch.

Runs tests/stress_program.py in a fresh interpreter (an audit hook cannot be
removed once installed) with the interpreter running the tests, so each
supported Python version proves it for itself."""
import json
import os
import subprocess
import sys

import pytest

PROGRAM = os.path.join(os.path.dirname(__file__), "stress_program.py")


def _run(*args):
    out = subprocess.run([sys.executable, PROGRAM, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("audit_hook", [False, True], ids=["no-hook", "python-audit-hook"])
def test_no_torn_observation_over_a_million_calls(audit_hook):
    report = _run("--calls", "1000000", "--swaps", "300", *(["--audit-hook"] if audit_hook else []))
    assert report["calls"] >= 1_000_000
    assert report["swaps"] >= 300
    assert report["snapshots"] > 10_000
    assert report["torn_calls"] == 0, report
    assert report["torn_snapshots"] == 0, report
    assert report["warnings"] == []
    if audit_hook:
        assert report["hook_events"] >= report["swaps"] * 4  # the hook really ran inside the stores


def test_the_stress_detects_a_non_atomic_patcher():
    """The same workload with a plain Python loop of stores does tear: the
    detector above is sensitive enough to fail."""
    report = _run("--calls", "1000000", "--swaps", "2000", "--naive")
    assert report["torn_calls"] + report["torn_snapshots"] > 0, report
