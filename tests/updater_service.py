"""A small pre-fork HTTP service for the updater and health tests: the
master binds 127.0.0.1, imports the application (`calc` from the directory
given) and forks --workers workers that serve on the shared socket.

    GET /div?a=7&b=2   {"result": calc.divide(7, 2)}, 500 if it raises
    GET /health        200 if calc.healthy() is true, else 503
    GET /pid           {"pid": the worker's pid}

Run under `livepatch run --name N --trust DIR -- python updater_service.py APP_DIR --port-file F`."""

import argparse
import http.server
import json
import os
import signal
import socketserver
import sys
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        import calc
        url = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/div":
            try:
                self._reply(200, {"result": calc.divide(int(q.get("a", 1)), int(q.get("b", 1)))})
            except Exception as exc:  # the service's own error page: the exception went through divide
                self._reply(500, {"error": type(exc).__name__})
        elif url.path == "/health":
            self._reply(200 if calc.healthy() else 503, {"healthy": bool(calc.healthy())})
        elif url.path == "/pid":
            self._reply(200, {"pid": os.getpid()})
        else:
            self._reply(404, {"error": "no such page"})

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("app_dir")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, args.app_dir)
    import calc  # noqa: F401  the master imports the application before forking, like gunicorn --preload
    server = Server(("127.0.0.1", 0), Handler)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
            server.serve_forever()
            os._exit(0)
        children.append(pid)

    def stop(*_):
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for c in children:
            try:
                os.waitpid(c, 0)
            except ChildProcessError:
                pass
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
