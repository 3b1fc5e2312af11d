"""A job runner in the style of Celery's prefork workers: a dispatcher with
an HTTP front end hands each job to a multiprocessing.Pool worker.

python -m shop.jobs [--context fork|spawn|forkserver] [--workers 2]
                    [--max-tasks N] [--port 8082] [--port-file PATH]

GET /health                -> {"ok": true, "pid": dispatcher pid}
GET /login?next=/orders/7  -> 302, computed by a pool worker; the body
                              carries the worker's PID
"""

import argparse
import json
import multiprocessing
import os
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from . import tasks


def make_handler(pool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            url = urlparse(self.path)
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            headers = []
            if url.path == "/health":
                status, body = 200, {"ok": True, "pid": os.getpid()}
            elif url.path == "/login":
                target, worker = pool.apply(tasks.check_link, (params.get("next"),))
                status, body = 302, {"redirect": target, "pid": worker}
                headers.append(("Location", target))
            else:
                status, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers]:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
    return Handler


def _stop(signum, frame):
    raise KeyboardInterrupt


def _worker_init():
    # forked workers inherit the dispatcher's handler; Pool.terminate() stops them with SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="fork", choices=["fork", "spawn", "forkserver"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-tasks", type=int, default=None, help="replace a worker after this many jobs")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8082)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    context = multiprocessing.get_context(args.context)
    with context.Pool(args.workers, initializer=_worker_init, maxtasksperchild=args.max_tasks) as pool:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(pool))
        server.daemon_threads = True
        port = server.server_address[1]
        if args.port_file:
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(str(port))
            os.replace(tmp, args.port_file)
        print(f"shop jobs on http://{args.host}:{port} ({args.workers} {args.context} workers, pid {os.getpid()})",
              flush=True)
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
