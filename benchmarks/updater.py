"""From a bundle appearing in the updater's repository to the fix in effect
in every process of a 4-worker pre-fork service, with the updater's own
loop (livepatch/updater.py) at a low assessment interval, split into:

  waiting     from the publication until the updater's next assessment starts
              (on average half the interval: the price of polling)
  assessing   the assessment: finding the services, the signed catalog, the
              bundle's download and verification, every agent's check
  installing  from the end of the assessment until the install says the
              bundle is in every process (its own assess, the download from
              the cache, `livepatch apply SERVICE`: CLI start, every agent's
              verify and check, the commits); then `status` of every process
              is checked to show it (not timed)

Each round publishes one more bundle (built before the clock starts; each
fixes a function of its own, so they stack) into a repository served over
HTTP on 127.0.0.1, at a random moment of the updater's interval. Rounds alternate between
two identical modes, A and A' (an A/A control: their difference is the
noise of the machine). Canary off and no observation time: both come on
top, as configured.

    python benchmarks/updater.py [--rounds 6] [--workers 4] [--interval 2]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import updater_apps  # noqa: E402
from common import RESULTS, machine  # noqa: E402
from servers_harness import Keys, cli, cli_json  # noqa: E402

from livepatch import updater_config  # noqa: E402
from livepatch.updater import Updater  # noqa: E402

SHARES = ("waiting", "assessing", "installing")


class TimedUpdater(Updater):
    """The updater, noting when each assessment and install starts and ends."""

    def __init__(self, *a, marks, **kw):
        super().__init__(*a, **kw)
        self.marks = marks

    def assess_now(self):
        self.marks.append(("assess-start", time.perf_counter()))
        try:
            return super().assess_now()
        finally:
            self.marks.append(("assess-end", time.perf_counter(), dict(self.pending)))

    def decide(self, message, **fields):
        if fields.get("patch") and f"{fields['patch']} installed in" in message and "canary" not in message:
            self.marks.append(("installed", time.perf_counter(), fields["patch"]))
        return super().decide(message, **fields)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def everywhere(name, patch_id) -> bool:
    procs = cli_json("status", name)["processes"]
    return bool(procs) and all(patch_id in p["patches"] for p in procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6, choices=range(1, 8))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--interval", type=float, default=2.0)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-updater-")
    keys = Keys(os.path.join(work, "keys"))
    name = f"calc-bench-{os.getpid()}"
    server = updater_apps.start(__import__("pathlib").Path(work), keys, workers=args.workers, name=name)
    repo_dir = os.path.join(work, "repo")
    os.makedirs(repo_dir)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=repo_dir))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    # each round's fix changes a function of its own: the bundles stack, none needs the others rolled back
    bundles = [updater_apps.build(keys, work, f"HP-BENCH-{i + 1}",
                                  updater_apps.BASELINE.replace(f"spare_{i}(x):\n    return x\n", f"spare_{i}(x):\n    return x + 1\n"),
                                  name=name, sequence=i + 1) for i in range(args.rounds + 1)]
    config_path = os.path.join(work, "updater.toml")
    with open(config_path, "w") as fh:
        fh.write(f'repository = "http://127.0.0.1:{httpd.server_address[1]}"\ntrusted_keys = "{keys.trust}"\n'
                 f'state_file = "{work}/updater/state.json"\ncache_dir = "{work}/cache"\n'
                 f'interval = "{args.interval}s"\ncanary = false\n'
                 '[[window]]\ndays = "daily"\nstart = "00:00"\nend = "23:59"\n'
                 f'[services.{name}]\nobserve = "0s"\npatched_errors = false\n')
    config = updater_config.load(config_path)
    # the first bundle is only there so the repository has a catalog; rolled back before round 1
    assert cli("repo", "add", bundles[0], "--repo", repo_dir, "--key", keys.key).returncode == 0
    rounds = []
    try:
        marks: list = []
        up = TimedUpdater(config, marks=marks)
        stop = threading.Event()
        loop = threading.Thread(target=up.run, args=(stop,), daemon=True)
        loop.start()
        deadline = time.monotonic() + 300
        while not everywhere(name, "HP-BENCH-1"):
            assert time.monotonic() < deadline, "the first bundle never arrived"
            time.sleep(0.2)
        for i in range(1, args.rounds + 1):
            mode = "A" if i % 2 else "A'"
            patch_id = f"HP-BENCH-{i + 1}"
            # publish at a random moment of the interval: after an assessment, plus a random delay
            n = len(marks)
            while not any(m[0] == "assess-end" for m in marks[n:]):
                time.sleep(0.01)
            time.sleep(random.uniform(0, args.interval))
            published = time.perf_counter()
            r = cli("repo", "add", bundles[i], "--repo", repo_dir, "--key", keys.key)
            assert r.returncode == 0, r.stderr
            published_end = time.perf_counter()
            while not any(m[0] == "installed" and m[2] == patch_id for m in marks):
                time.sleep(0.01)
            assert everywhere(name, patch_id), f"{patch_id} is not in every process"
            since = [m for m in marks if m[1] >= published_end]
            a_end = next(m[1] for m in since if m[0] == "assess-end" and patch_id in json.dumps(m[2]))
            # the assessment that found it may have started while the catalog was being written
            a_start = max(published_end, max(m[1] for m in marks if m[0] == "assess-start" and m[1] <= a_end))
            i_end = next(m[1] for m in since if m[0] == "installed" and m[2] == patch_id)
            shares = {"waiting": a_start - published_end, "assessing": a_end - a_start, "installing": i_end - a_end}
            rounds.append({"mode": mode, "publish_s": published_end - published, "total_s": i_end - published_end,
                           **{k: round(v, 4) for k, v in shares.items()}})
            print(mode, json.dumps(rounds[-1]), flush=True)
        stop.set()
        loop.join(timeout=120)
    finally:
        httpd.shutdown()
        server.stop()
    out = {"benchmark": "updater", "machine": machine(), "python": sys.version.split()[0],
           "params": vars(args), "rounds": rounds, "when": datetime.datetime.now().isoformat(timespec="seconds"),
           "summary": {}}
    for mode in ("A", "A'"):
        rs = [r for r in rounds if r["mode"] == mode]
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs) for k in ("total_s", *SHARES)}
        out["summary"][mode] = {**{k: round(v, 3) for k, v in med.items()},
                                "shares_pct": {k: round(100 * med[k] / med["total_s"], 1) for k in SHARES}}
    path = os.path.join(RESULTS, f"updater-py{sys.version_info[0]}.{sys.version_info[1]}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out["summary"], indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
