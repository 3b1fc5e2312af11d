"""Atomicity soak: tests/stress_program.py with many more transitions than
the test suite runs, for each way of making the critical section (the
one-call commit, the commit after a handoff, a Python audit hook inside the
stores, a hook that keeps the patcher off the CPU there).

Reports, per variant, the transitions made, the calls and snapshots the
threads checked, the torn observations (which must be 0), how the commits
were made and how long the run took. A torn observation makes the exit
status 1.

Writes benchmarks/results/soak-pyX.Y[-quick].json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_result  # noqa: E402

PROGRAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "stress_program.py")

# name: (stress_program options, transitions in a full run)
VARIANTS = {
    "one-call": ([], 2000),
    "after-handoff": (["--handoff"], 600),
    "python-audit-hook": (["--audit-hook"], 300),
    "off-cpu-6ms-in-the-stores": (["--audit-hook", "--blocking-hook", "0.006"], 40),
}


def run(options, swaps, calls) -> dict:
    out = subprocess.run([sys.executable, PROGRAM, "--calls", str(calls), "--swaps", str(swaps),
                          "--timeout", "240", *options], capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    report = json.loads(out.stdout)
    keep = ("swaps", "calls", "snapshots", "torn_calls", "torn_snapshots", "commit_methods",
            "pause_p50_ns", "pause_max_ns", "interrupted_commits", "elapsed_s")
    return {k: report[k] for k in keep}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the transitions, 200,000 calls")
    ap.add_argument("--only", choices=sorted(VARIANTS), action="append", help="run this variant (repeatable)")
    args = ap.parse_args()
    results = {}
    for name in args.only or VARIANTS:
        options, swaps = VARIANTS[name]
        swaps = max(4, swaps // 10) if args.quick else swaps
        results[name] = run(options, swaps, 200_000 if args.quick else 1_000_000)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    path = write_result("soak", {"machine": machine(), "variants": results}, args.quick)
    print(f"wrote {path}")
    bad = [n for n, r in results.items() if "error" in r or r["torn_calls"] or r["torn_snapshots"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
