"""From a bundle appearing in a patch repository to the fix in effect in
every process of a 4-worker service, through assess and install
(livepatch/assess.py, livepatch/install.py), split into its shares:

  discover    finding the service's processes by name (every agent on the
              machine is asked its name)
  catalog     fetching and verifying the signed catalog
  download    fetching the bundle (HTTP on loopback)
  verify      the bundle's digest, signature and manifest against its entry
  assess      the agents' status and assess answers (every process checks
              the bundle, changing nothing)
  commit      the process-tree apply (`livepatch apply SERVICE BUNDLE`: its
              CLI start, every agent's verify and check, the commits)
  seen        until every process's own output shows the fixed code

Each round publishes a new bundle (a new id, built before the clock
starts) in a repository of its own, served over HTTP on 127.0.0.1, and
assesses and installs it with a fresh cache; the fix is rolled back after
the round (not timed). Two identical modes alternate (A and A', an A/A
control: their difference is the noise of the machine), and a third runs
the same assess and install on a repository holding only what is already
installed (nothing to do: the fixed cost). The updater's waiting share
(its assessment interval) comes on top.

    python benchmarks/repository.py [--rounds 8] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the test program and HTTP server

from common import RESULTS, machine  # noqa: E402
from repo_fixtures import App, build, served, unique_name  # noqa: E402

from livepatch import assess as assess_module, install as install_module, publish, tree  # noqa: E402
from livepatch.repository import Repository  # noqa: E402
from livepatch.signing import generate, load_private  # noqa: E402

SHARES = ("discover", "catalog", "download", "verify", "assess", "commit", "seen")


class TimedRepository(Repository):
    """A Repository that adds up where its time goes."""

    def __init__(self, *args, times, **kw):
        super().__init__(*args, **kw)
        self.times = times

    def _get(self, relative, limit):
        start = time.perf_counter()
        try:
            return super()._get(relative, limit)
        finally:
            self.times["catalog" if relative == "catalog.json" else "download"] += time.perf_counter() - start

    def catalog(self, refresh=False):
        start, before = time.perf_counter(), self.times["catalog"]
        try:
            return super().catalog(refresh)
        finally:  # the verification of the catalog counts with its fetch
            self.times["catalog"] = before + (time.perf_counter() - start)

    def _check_bundle(self, entry, data):
        start = time.perf_counter()
        try:
            return super()._check_bundle(entry, data)
        finally:
            self.times["verify"] += time.perf_counter() - start


def _timed(times, key, func):
    def wrapper(*args, **kw):
        start = time.perf_counter()
        try:
            return func(*args, **kw)
        finally:
            times[key] += time.perf_counter() - start
    return wrapper


def one_round(mode, work, keys, app, url_base, served_dir, i, installed_id):
    times = dict.fromkeys(SHARES, 0.0)
    repo_dir = os.path.join(served_dir, f"r{i}")
    os.mkdir(repo_dir)
    key = load_private(keys["key"])
    if mode == "nothing pending":
        publish.add(repo_dir, key, bundles=[installed_id[1]])
    else:
        bundle = build(work, keys, "core", f"HP-R{i}", app.name, classification="bugfix")
        publish.add(repo_dir, key, bundles=[bundle])
    # the bundle is in the repository: the clock starts
    start = time.perf_counter()
    repo = TimedRepository(f"{url_base}/r{i}", trusted_keys=keys["trust"],
                           cache_dir=os.path.join(work, f"cache{i}"), times=times)
    original_statuses, original_verdicts, original_apply = (assess_module._statuses, assess_module._verdicts,
                                                            install_module._apply)
    assess_module._statuses = _timed(times, "assess", original_statuses)
    assess_module._verdicts = _timed(times, "assess", original_verdicts)
    install_module._apply = _timed(times, "commit", original_apply)
    try:
        discovered = time.perf_counter()
        service = tree.by_name(app.name)
        times["discover"] = time.perf_counter() - discovered
        result = install_module.install(repo, [service])
    finally:
        assess_module._statuses, assess_module._verdicts, install_module._apply = (
            original_statuses, original_verdicts, original_apply)
    assert result.exit_code == 0, json.dumps(result.to_json())
    seen = time.perf_counter()
    if mode != "nothing pending":
        app.wait_answers("fixed")
    times["seen"] = time.perf_counter() - seen
    total = time.perf_counter() - start
    outcomes = [o.outcome for s in result.services for o in s.outcomes]
    if mode != "nothing pending":
        assert outcomes == ["installed"], outcomes
        import subprocess
        r = subprocess.run([sys.executable, "-m", "livepatch", "rollback", app.name, f"HP-R{i}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        app.wait_answers("old")
    else:
        assert outcomes == [], outcomes
    times["total"] = total
    times["other"] = total - sum(times[k] for k in SHARES)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="one round (make bench-quick)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    work = tempfile.mkdtemp(prefix="lpbench-repo-")
    os.makedirs(os.path.join(work, "trusted"))
    generate(os.path.join(work, "trusted", "ops"))
    os.replace(os.path.join(work, "trusted", "ops.key"), os.path.join(work, "ops.key"))
    keys = {"key": os.path.join(work, "ops.key"), "trust": os.path.join(work, "trusted")}
    os.environ.setdefault("LIVEPATCH_STATE_DIR", os.path.join(work, "state"))
    name = unique_name("lpbench")
    app = App(work, keys, name, workers=args.workers)
    served_dir = os.path.join(work, "served")
    os.mkdir(served_dir)
    samples = {"A": [], "A'": [], "nothing pending": []}
    try:
        # what the "nothing pending" repository lists: a bundle that stays installed (a fix of the lazy module)
        kept = build(work, keys, "lazy", "HP-KEPT", name, classification="bugfix", sequence=1)
        r = __import__("subprocess").run([sys.executable, "-m", "livepatch", "apply", name, kept],
                                         capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        with served(served_dir) as url:
            i = 0
            for _ in range(args.rounds):
                for mode in samples:
                    samples[mode].append(one_round(mode, work, keys, app, url, served_dir, i, ("HP-KEPT", kept)))
                    i += 1
    finally:
        app.stop()
    out = {"machine": machine(), "workers": args.workers, "processes": args.workers + 1, "rounds": args.rounds,
           "load_average": os.getloadavg(), "samples": samples,
           "median_ms": {mode: {k: round(statistics.median(s[k] for s in rows) * 1000, 1)
                                for k in (*SHARES, "other", "total")} for mode, rows in samples.items()}}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"repository-py{sys.version_info[0]}.{sys.version_info[1]}"
                                 f"{'-quick' if args.quick else ''}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    for mode, shares in out["median_ms"].items():
        print(f"{mode:16s} " + "  ".join(f"{k} {v:.0f}" for k, v in shares.items()) + " (ms, p50)")
    print(f"load average {out['load_average'][0]:.1f}; written to {path}")


if __name__ == "__main__":
    main()
