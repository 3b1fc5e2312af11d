"""The HTTP JSON API. Run: python -m inventory.server [--port N] [--port-file PATH]

GET /health                      -> {"ok": true}
GET /quote?sku=widget&qty=3      -> {"sku": ..., "qty": ..., "total": ...}
GET /docs?name=widget.txt        -> {"name": ..., "text": ...}  (404 if missing)
GET /report?seconds=1            -> a slow report
"""

import argparse
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from . import files, pricing


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the demo's output readable
        pass

    def do_GET(self):
        url = urlparse(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            status, body = route(url.path, params)
        except (KeyError, ValueError) as exc:
            status, body = 400, {"error": f"bad request: {exc}"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def route(path, params):
    if path == "/health":
        return 200, {"ok": True, "pid": os.getpid()}
    if path == "/quote":
        sku, qty = params["sku"], int(params.get("qty", "1"))
        return 200, {"sku": sku, "qty": qty, "total": pricing.quote(sku, qty)}
    if path == "/docs":
        text = files.read_document(params["name"])
        if text is None:
            return 404, {"error": "no such document"}
        return 200, {"name": params["name"], "text": text}
    if path == "/report":
        return 200, pricing.build_report(float(params.get("seconds", "1")))
    return 404, {"error": "not found"}


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the service cleanly, like Ctrl-C


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(str(port))
        os.replace(tmp, args.port_file)
    print(f"inventory API listening on http://{args.host}:{port} (pid {os.getpid()})", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
