"""The live demo (`make demo`): hotpatch a running HTTP service under load.

1. start the inventory API (demo_apps/http_api) as an ordinary process;
2. drive load against it from client threads, recording every request;
3. show the vulnerable response (a path traversal leaks a secret file);
4. build and sign a bundle from patches/baseline -> patches/fix-path-traversal;
5. attach to the service by PID and apply the bundle live;
6. show the fixed response, the commit pause, requests served and failed;
7. roll back and show the old behaviour again;
8. write a PNG chart of request latency percentiles over time, the moments
   marked, the pauses and the failed-request count written on it.

Everything runs through the `livepatch` command, as an operator would."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVICE = os.path.join(HERE, "http_api")
PATCHES = os.path.join(SERVICE, "patches")
SECRET = "/docs?name=../private/secrets.txt"


# when each livepatch command ran: its own interpreter start-up competes with
# the service and the load for the machine's cores, which the chart shows
CLI_RUNS: list[tuple[float, float]] = []


def livepatch(*args) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "livepatch", *args, "--json"], capture_output=True, text=True, timeout=120)
    CLI_RUNS.append((started, time.perf_counter()))
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0:
        raise SystemExit(f"livepatch {args[0]} failed ({proc.returncode}): {out.get('error') or proc.stderr}")
    return out


def get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Load:
    """Client threads issuing requests back to back; every request is logged
    as (start time, latency, ok)."""

    def __init__(self, port: int, threads: int):
        self.port, self.samples, self.stop = port, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        paths = ("/quote?sku=widget&qty=3", "/docs?name=widget.txt", SECRET, "/health")
        i = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                status, _ = get(self.port, paths[i % len(paths)])
                ok = status < 500
            except Exception:
                ok = False
            with self.lock:
                self.samples.append((t0, time.perf_counter() - t0, ok))
            i += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def percentiles_per_interval(samples, t0, width: float):
    """[(interval middle, p50, p99, max)] of latency in ms, one per interval of `width` s."""
    bins: dict[int, list[float]] = {}
    for start, latency, _ in samples:
        bins.setdefault(int((start - t0) / width), []).append(latency * 1000)
    out = []
    for i in sorted(bins):
        lat = sorted(bins[i])
        out.append(((i + 0.5) * width, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], lat[-1]))
    return out


def chart(samples, marks, path, t0, caption: str, width: float = 0.25):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 5))
    shown = [(a, b) for a, b in CLI_RUNS if b > t0]
    for i, (a, b) in enumerate(shown):
        ax.axvspan(max(a, t0) - t0, b - t0, color="0.88", zorder=0,
                   label="a livepatch command running (its start-up shares the CPUs)" if i == 0 else None)
    ax.scatter([s[0] - t0 for s in samples], [s[1] * 1000 for s in samples], s=2, color="0.6", alpha=0.3,
               label="each request", zorder=1)
    rows = percentiles_per_interval(samples, t0, width)
    xs = [r[0] for r in rows]
    for k, (label, color) in enumerate((("p50", "tab:blue"), ("p99", "tab:purple"), ("max", "tab:red")), start=1):
        ax.plot(xs, [r[k] for r in rows], color=color, linewidth=1.4, label=f"{label} per {width * 1000:.0f} ms", zorder=2)
    top = max((r[3] for r in rows), default=1.0)
    for label, when, color in marks:
        ax.axvline(when - t0, color=color, linestyle="--", linewidth=1.5, zorder=3)
        ax.annotate(label, (when - t0, top), rotation=90, va="top", ha="right", color=color, fontsize=10)
    failed = [s for s in samples if not s[2]]
    if failed:
        ax.scatter([s[0] - t0 for s in failed], [s[1] * 1000 for s in failed], s=14, color="red", label="failed", zorder=4)
    ax.text(0.99, 0.03, caption, transform=ax.transAxes, ha="right", va="bottom", fontsize=10,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.7"))
    ax.set_xlabel("time since load started (s)")
    ax.set_ylabel("request latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title("inventory API under load: live patch and rollback")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=4, help="client threads driving load")
    ap.add_argument("--phase", type=float, default=3.0, help="seconds of load before, between and after the changes")
    ap.add_argument("--chart", default=os.path.join(ROOT, "demo-latency.png"))
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="livepatch-demo-")
    os.chmod(work, 0o700)
    port_file = os.path.join(work, "port")
    service = subprocess.Popen([sys.executable, "-m", "inventory.server", "--port", "0", "--port-file", port_file],
                               cwd=SERVICE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(port_file):
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the demo service did not start")
            time.sleep(0.02)
        port = int(open(port_file).read())
        print(f"1. started the inventory API: pid {service.pid}, http://127.0.0.1:{port} (it knows nothing about livepatch)")

        keys = os.path.join(work, "ops")
        livepatch("keygen", keys)
        trust = os.path.join(work, "trusted")
        os.mkdir(trust)
        shutil.copy(keys + ".pub", trust)
        bundle = os.path.join(work, "HP-DOCS-1.lpb")
        built = livepatch("build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-path-traversal"),
                          "-o", bundle, "--id", "HP-DOCS-1", "--classification", "security", "--key", keys + ".key",
                          "--title", "Path traversal in /docs", "--ref", "DEMO-CVE-0001", "--name", "inventory", "--version", "1.0")
        print(f"2. built and signed bundle HP-DOCS-1 ({built['size']} bytes): "
              + ", ".join(f"{m}:{q}" for m, qs in built["targets"].items() for q in qs))
        # taking a security fix out needs the signer's say-so (see the README's threat model)
        authorization = os.path.join(work, "HP-DOCS-1.rollback")
        livepatch("authorize-rollback", bundle, "--key", keys + ".key", "-o", authorization)

        with Load(port, args.threads) as load:
            t_start = time.perf_counter()
            time.sleep(args.phase)
            status, body = get(port, SECRET)
            print(f"3. GET {SECRET} -> {status} {json.dumps(body)[:90]}   <- VULNERABLE")

            t_attach = time.perf_counter()
            attached = livepatch("attach", str(service.pid), "--trust", trust)
            print(f"4. attached an agent to pid {service.pid} via {attached['method']}: "
                  f"the service was stopped for {attached['stop_ms']:.2f} ms")
            time.sleep(args.phase / 2)

            t_apply = time.perf_counter()
            applied = livepatch("apply", str(service.pid), bundle)
            status, body = get(port, SECRET)
            print(f"5. applied HP-DOCS-1 live: commit pause {applied['pause_ns'] / 1000:.1f} µs, "
                  f"whole apply {applied['wall_ms']:.0f} ms; GET {SECRET} -> {status} {json.dumps(body)}   <- FIXED")
            print(f"   GET /docs?name=widget.txt -> {get(port, '/docs?name=widget.txt')[0]} (legitimate documents still served)")
            time.sleep(args.phase)

            t_rollback = time.perf_counter()
            rolled = livepatch("rollback", str(service.pid), "--authorization", authorization)
            status, body = get(port, SECRET)
            print(f"6. rolled back: pause {rolled[0]['pause_ns'] / 1000:.1f} µs; GET {SECRET} -> {status}   <- old behaviour again")
            time.sleep(args.phase / 2)
        samples = load.samples
        served = sum(1 for s in samples if s[2])
        failed = len(samples) - served
        lat = sorted(s[1] for s in samples)
        p50, p99 = lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000
        print(f"7. load: {served} requests served, {failed} failed, latency p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
              f"max {lat[-1] * 1000:.2f} ms ({args.threads} client threads)")
        history = livepatch("history", str(service.pid))
        print(f"   history in the service: {', '.join(h['action'] + ' ' + h['outcome'] for h in history)}")
        caption = (f"apply: commit pause {applied['pause_ns'] / 1000:.1f} µs\n"
                   f"rollback: pause {rolled[0]['pause_ns'] / 1000:.1f} µs\n"
                   f"{served} requests served, {failed} failed")
        chart(samples, [("attach", t_attach, "gray"), ("apply", t_apply, "green"), ("rollback", t_rollback, "orange")],
              args.chart, t_start, caption)
        print(f"8. latency chart: {args.chart}")
        return 0 if failed == 0 else 1
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
