"""The benchmark scripts run (tiny parameters) so they cannot rot; the
figures themselves come from `make bench`, never from assertions here."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1].split("results: ", 1)[1]
    with open(path) as fh:
        return json.load(fh)


def test_pause_benchmark_runs():
    data = _run("pause.py", "--quick", "--threads", "2", "--sizes", "1", "10", "--reps", "2")
    assert data["machine"]["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert [r["functions"] for r in data["rows"]] == [1, 10]
    assert all(r["commit_hold_ns"]["n"] == 4 for r in data["rows"])


def test_memory_benchmark_runs():
    data = _run("memory.py", "--quick")
    assert data["retained"]["functions"] == 1000
    assert data["cycles"]["cycles"] == 100


def test_demo_runs_with_zero_failures():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "demo_apps", "engine_demo.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "line_total(0.29, 3) = 0.87" in out.stdout and "failed: 0" in out.stdout
