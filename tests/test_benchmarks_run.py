"""The benchmark scripts run (tiny parameters) so they cannot rot; the
figures themselves come from `make bench`, never from assertions here."""
import json
import os
import subprocess
import sys

import pytest

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


def test_safepoint_benchmark_runs():
    data = _run("safepoint.py", "--quick")
    assert len(data["activeness"]) == 4 and all(r["heap_scan_ns_outside_pause"]["n"] == 5 for r in data["suspended"])
    assert all(r["inside_pause_ns"]["n"] == r["check_ns"]["n"] == 20 for r in data["activeness"])


def test_stall_benchmark_runs():
    data = _run("stall.py", "--quick")
    row = data["rows"][0]
    assert row["stall"]["worst_stall_apply_ns"]["n"] == row["stall"]["worst_stall_control_ns"]["n"] == 2
    modes = {"apply as the engine locates", "apply with the heap walked",
             "control: ordinary Python as long as the walked apply",
             "one gc.get_referrers pass (positive control)", "control: ordinary Python"}
    assert set(row["longest_hold_ns"]) == set(row["longest_profiled_gap"]) == modes
    assert "gc.get_referrers" in row["longest_profiled_gap"]["one gc.get_referrers pass (positive control)"]["C call"]["usual_by_cpu"]
    assert [lat["threads"] for lat in row["latency"]] == [4, 16]
    # the control is sized to the apply's CPU, not fixed
    assert all(lat["control_units"] >= 1 for lat in row["latency"])


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is 3.12 and later")
def test_switch_point_benchmark_runs_and_sees_one_long_c_call():
    data = _run("switch_points.py", "--quick")
    stretches = data["rows"][0]["longest_stretch"]
    assert stretches["apply with the heap walked"]["cpu_ns"]["n"] == 2
    # the positive control is one C-level call: the measure must name it as the longest
    positive = stretches["one gc.get_referrers pass (positive control)"]["longest_by_cpu"]
    assert positive["cpu_where"].startswith("get_referrers called from"), positive
    # long stretches are counted as well as the longest: none over a limit
    # exactly when the longest is under it
    for name, s in stretches.items():
        assert s["points"] > 0 and s["seconds"] > 0, name
        for limit, count in s["over_cpu_ns"].items():
            assert (count > 0) == (s["cpu_ns"]["max"] > int(limit)), (name, limit, count, s["cpu_ns"])


def test_walk_moves_benchmark_runs_and_its_objects_move_during_the_walks():
    data = _run("walk_moves.py", "--quick")
    for case, n in (("coroutines", data["coroutines"]["suspended"]), ("functions", data["functions"]["closures"])):
        row = data[case]
        # the control sees every one of them, and the other thread moved them while the engine walked
        assert row["single_pass_found_min"] == n, (case, row)
        assert row["moves_during_a_walk"]["p50"] > 0 and row["found"]["max"] <= n, (case, row)


def test_agent_benchmark_runs():
    data = _run("agent.py", "--quick")
    assert data["end_to_end"]["cycles"] == 3 and data["idle_cpu"]["ratio_agent_over_none"] > 0


def test_alternatives_benchmark_runs():
    data = _run("alternatives.py", "--quick")
    assert data["restart_vs_hotpatch"]["hotpatch"]["failed"] == 0
    assert data["reload"]["references_on_old_code_after_reload"] == 100
    assert data["reload"]["references_on_old_code_after_livepatch"] == 0
    assert os.path.exists(data["chart"])


def test_live_demo_runs_with_zero_failures(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "demo_apps", "live_demo.py"), "--phase", "0.5",
                          "--chart", str(tmp_path / "demo.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "<- VULNERABLE" in out.stdout and "<- FIXED" in out.stdout and ", 0 failed" in out.stdout
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_engine_demo_runs_with_zero_failures():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "demo_apps", "engine_demo.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "line_total(0.29, 3) = 0.87" in out.stdout and "failed: 0" in out.stdout
