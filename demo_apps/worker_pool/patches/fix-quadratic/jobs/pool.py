"""Worker threads consuming a job queue. Run: python -m jobs.pool [--workers N] [--port-file PATH]

Jobs are fed by a producer thread; each worker runs `worker_loop` forever,
so that function never leaves the stack (patching it needs allow_active).
A tiny HTTP endpoint reports progress: GET /stats."""

import argparse
import json
import os
import signal
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import tasks

jobs = queue.Queue(maxsize=1000)
stats = {"done": 0, "failed": 0, "last_ms": 0.0, "version": 1}
lock = threading.Lock()


def worker_loop():
    while True:
        job = jobs.get()
        started = time.perf_counter()
        try:
            tasks.process(job)
            ok = True
        except Exception:
            ok = False
        finally:
            jobs.task_done()
        record(ok, time.perf_counter() - started)


def record(ok, seconds):
    with lock:
        stats["done" if ok else "failed"] += 1
        stats["last_ms"] = round(seconds * 1000, 3)


def producer(size):
    n = 0
    while True:
        jobs.put({"id": n, "tags": [f"t{i % (size // 2)}" for i in range(size)]})
        n += 1


class Stats(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with lock:
            data = json.dumps(dict(stats, pid=os.getpid())).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the service cleanly, like Ctrl-C


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tags", type=int, default=2000, help="tags per job (the quadratic part)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    args = ap.parse_args(argv)
    for i in range(args.workers):
        threading.Thread(target=worker_loop, name=f"worker-{i}", daemon=True).start()
    threading.Thread(target=producer, args=(args.tags,), name="producer", daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Stats)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as fh:
            fh.write(str(server.server_address[1]))
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"worker pool: {args.workers} workers, stats on http://127.0.0.1:{server.server_address[1]}/stats", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
