"""Applying to a whole service at once: a gunicorn service (sync workers,
the shop in demo_apps/servers) with 1, 4 and 16 workers under client load.

Per round, in alternating order:
* tree: `livepatch apply SERVICE BUNDLE` (every process, concurrently, all
  or nothing; found by asking every agent on the machine its name), then
  the service rolled back;
* pid_tree: the same as `livepatch apply MASTER_PID --tree BUNDLE` (only
  that process tree is asked);
* one: `livepatch apply PID BUNDLE` on one worker, then rolled back;
* control: a window as long as the last tree apply, with no apply.
Measured: the wall time of each `livepatch apply` command (what an operator
waits for, interpreter start-up included, and the part inside the CLI), and
the longest latency of any client request overlapping each window. The
goal is the whole tree within 2x of one process.

The service runs under `livepatch run -- gunicorn ...` (the master has an
agent too; it never imports the app, so the patch waits there as pending),
or, with `--launch hook`, gets its agents from a gunicorn config file whose
`post_fork` calls `livepatch.agent.start()` (workers only)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, summary, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = os.path.join(ROOT, "demo_apps", "servers")
PATCHES = os.path.join(SERVERS, "patches")
PATH = "/login?next=//evil.example/phish"

HOOK = """\
import livepatch.agent


def post_fork(server, worker):
    livepatch.agent.start(name={name!r}, trust={trust!r})
"""


def _cli(*args, check=True):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "livepatch", *args], capture_output=True, text=True, timeout=300)
    wall = (time.perf_counter() - t0) * 1000
    if check and out.returncode != 0:
        raise RuntimeError(f"livepatch {' '.join(args)} exited {out.returncode}: {out.stdout[-800:]}{out.stderr[-800:]}")
    return out, wall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    def __init__(self, workers: int, work: str, trust: str, launch: str):
        self.name = f"treebench-{workers}-{os.getpid()}"
        self.port = _free_port()
        self.workers = workers
        state = os.path.join(work, f"state-{workers}")
        env = dict(os.environ, LIVEPATCH_STATE_DIR=state)
        cmd = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-w", str(workers), "-k", "sync",
               "-b", f"127.0.0.1:{self.port}", "--log-level", "warning", "shop.wsgi:app"]
        if launch == "hook":
            conf = os.path.join(work, f"gunicorn-{workers}.conf.py")
            with open(conf, "w") as fh:
                fh.write(HOOK.format(name=self.name, trust=trust))
            cmd[1:1] = ["-c", conf]
        else:
            cmd = [sys.executable, "-m", "livepatch", "run", "--name", self.name, "--trust", trust,
                   "--state-dir", state, "--", *cmd]
        self.log = os.path.join(work, f"gunicorn-{workers}.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=SERVERS, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            self._wait_until_up(180)  # a loaded machine starts 16 workers slowly
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, seconds):
        from livepatch.tree import _descendants, _ppids
        deadline = time.monotonic() + seconds
        # every worker forked and serving before any agent is asked anything: an
        # agent busy importing in the master while it forks would hand the
        # worker a held import lock
        while len(_descendants([self.proc.pid], _ppids())) < self.workers or self._status() != 302:
            self._check(deadline)
            time.sleep(0.2)
        while True:
            self._check(deadline)
            try:
                rows = json.loads(_cli("ps", "--json")[0].stdout)
                self.rows = [r for r in rows if r["name"] == self.name]
                if sum(r["serves"] for r in self.rows) >= self.workers and all(r["state"] != "not answering" for r in self.rows):
                    self.worker_pids = [r["pid"] for r in self.rows if r["serves"]]
                    return
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(0.2)

    def _check(self, deadline):
        if self.proc.poll() is not None:
            with open(self.log, errors="replace") as fh:
                raise RuntimeError(f"gunicorn exited: {fh.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn with {self.workers} workers did not come up with agents (log: {self.log})")

    def _status(self):
        try:
            return self.get()[0]
        except OSError:
            return None

    def get(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", PATH)
            r = conn.getresponse()
            r.read()
            return r.status, r.getheader("Location")
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Load:
    """Client threads sending requests back to back; every request's start
    and end are kept, so the longest one overlapping any window is known."""

    def __init__(self, svc: Gunicorn, threads: int):
        self.svc, self.requests, self.failed, self.errors = svc, [], 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        mine = []
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = self.svc.get()
                if status != 302:
                    raise RuntimeError(status)
            except Exception as exc:  # any failed request counts
                self.failed += 1
                self.errors.append(repr(exc))
                continue
            mine.append((t0, time.perf_counter()))
        self.requests.extend(mine)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()

    def longest_in(self, start: float, end: float) -> float:
        return max((e - s for s, e in self.requests if s < end and e > start), default=0.0) * 1000


def _apply(target: str, bundle: str):
    out, wall = _cli("apply", target, bundle, "--json")
    return json.loads(out.stdout), wall


def run_service(workers: int, rounds: int, work: str, trust: str, bundle: str, clients: int, launch: str) -> dict:
    svc = Gunicorn(workers, work, trust, launch)
    windows = {"tree": [], "pid_tree": [], "one": [], "control": []}
    walls = {"tree": [], "pid_tree": [], "one": []}
    inside = {"tree": [], "pid_tree": [], "one": []}
    root = str(svc.proc.pid)  # gunicorn's master (livepatch run execs it: same PID)
    patched = []
    try:
        time.sleep(0.5)
        load = Load(svc, clients)
        time.sleep(0.5)
        last_tree = None
        for r in range(rounds):
            order = ("tree", "pid_tree", "one", "control") if r % 2 == 0 else ("control", "one", "pid_tree", "tree")
            for kind in order:
                start = time.perf_counter()
                if kind == "control":
                    time.sleep((last_tree or 0.2) / 1000)
                elif kind in ("tree", "pid_tree"):
                    if kind == "tree":
                        result, wall = _apply(svc.name, bundle)
                        last_tree = wall
                    else:
                        out, wall = _cli("apply", root, "--tree", bundle, "--json")
                        result = json.loads(out.stdout)
                    patched.append((result["serving_patched"], result["serving"]))
                    inside[kind].append(result["wall_ms"])
                else:
                    result, wall = _apply(str(svc.worker_pids[r % len(svc.worker_pids)]), bundle)
                    inside["one"].append(result["wall_ms"])
                end = time.perf_counter()
                if kind != "control":
                    walls[kind].append(wall)
                windows[kind].append((start, end))
                if kind in ("tree", "pid_tree"):
                    _cli("rollback", svc.name, "--all")
                elif kind == "one":
                    _cli("rollback", str(svc.worker_pids[r % len(svc.worker_pids)]), "--all")
                time.sleep(0.2)
        load.stop()
        requests, failed, errors = len(load.requests), load.failed, load.errors[:5]
        longest = {k: [round(load.longest_in(s, e), 2) for s, e in v] for k, v in windows.items()}
    finally:
        svc.stop()
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"workers": workers, "processes_with_agents": len(svc.rows), "rounds": rounds,
            "apply_wall_ms": {k: summary([round(x, 1) for x in v]) for k, v in walls.items()},
            "inside_cli_ms": {k: summary(v) for k, v in inside.items()},
            "ratio_tree_over_one": round(med(walls["tree"]) / med(walls["one"]), 3),
            "ratio_pid_tree_over_one": round(med(walls["pid_tree"]) / med(walls["one"]), 3),
            "longest_request_ms": {k: summary(v) for k, v in longest.items()},
            "serving_patched": patched, "requests": requests, "failed": failed, "errors": errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, nargs="+")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--launch", choices=["run", "hook"], default="run")
    args = ap.parse_args()
    workers = args.workers or ([1, 2] if args.quick else [1, 4, 16])
    rounds = args.rounds or (1 if args.quick else 8)
    work = tempfile.mkdtemp(prefix="lptree-")
    try:
        key = os.path.join(work, "ops")
        _cli("keygen", key)
        trust = os.path.join(work, "trust")
        os.mkdir(trust, 0o700)
        os.replace(key + ".pub", os.path.join(trust, "ops.pub"))
        bundle = os.path.join(work, "fix.lpb")
        _cli("build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-open-redirect"), "-o", bundle,
             "--id", "HP-TREE-BENCH", "--key", key + ".key", "--name", "shop", "--version", "1.0")
        rows = []
        for n in workers:
            row = run_service(n, rounds, work, trust, bundle, args.clients, args.launch)
            rows.append(row)
            w, lr = row["apply_wall_ms"], row["longest_request_ms"]
            print(f"{n:2d} workers: apply to the service p50 {w['tree']['p50']:.0f} ms (by PID --tree "
                  f"{w['pid_tree']['p50']:.0f} ms), to one worker p50 "
                  f"{w['one']['p50']:.0f} ms (ratio {row['ratio_tree_over_one']}, by PID --tree "
                  f"{row['ratio_pid_tree_over_one']}); longest request during the "
                  f"tree apply p50 {lr['tree']['p50']:.1f} ms (max {lr['tree']['max']:.1f}), during the control "
                  f"p50 {lr['control']['p50']:.1f} ms (max {lr['control']['max']:.1f}); {row['requests']} requests, "
                  f"{row['failed']} failed")
        path = write_result("tree", {"machine": machine(), "params": {"workers": workers, "rounds": rounds,
                                                                       "clients": args.clients, "launch": args.launch,
                                                                       "server": "gunicorn sync"},
                                     "rows": rows}, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
