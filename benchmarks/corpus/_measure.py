"""Shared pieces of the corpus checks: a growth test for denial-of-service
fixes and a loopback HTTP server for redirect fixes. Both run inside the
process under test."""

import http.server
import threading
import time


def growth(func, make_input, small: int, factor: int = 4, repeat: int = 3) -> float:
    """How much longer `func` takes on an input `factor` times larger (the
    best of `repeat` runs each). A linear algorithm grows by about `factor`,
    a quadratic one by about factor**2: the ratio tells them apart on a busy
    machine, where a wall-time limit would not."""
    def best(n):
        # per call, the best of `repeat` batches; a batch repeats the call for at least
        # 50 ms so that a fast (fixed) version is not measured at the timer's or the
        # scheduler's resolution
        data = make_input(n)
        times = []
        for _ in range(repeat):
            calls, t0 = 0, time.perf_counter()
            while True:
                func(data)
                calls += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= 0.05:
                    break
            times.append(elapsed / calls)
        return max(min(times), 1e-9)
    best(small)  # warm up caches and the adaptive interpreter
    return best(small * factor) / best(small)


def superlinear(func, make_input, small: int, factor: int = 4, power: float = 1.5) -> tuple[bool, str]:
    """(quadratic or worse, detail): the growth is over factor**1.5, halfway (on a
    log scale) between linear (factor) and quadratic (factor**2). An exponential
    case measured at factor 2 (a larger input would not finish) asks for a
    higher `power`: a busy machine can stretch a linear x2 to x3."""
    ratio = growth(func, make_input, small, factor)
    return ratio > factor ** power, f"x{factor} input took x{ratio:.1f} the time (linear: ~x{factor})"


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers /redirect with a redirect to the `to` query value's target and
    records every request's method, path, headers and body."""
    routes: dict = {}
    seen: list = []

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
        status, location = self.routes.get(self.path.partition("?")[0], (200, None))
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *args):
        pass


class LoopbackServer:
    """A real HTTP server on 127.0.0.1, port 0, in a thread; `with` stops it."""

    def __init__(self, routes: dict):
        handler = type("Handler", (Recorder,), {"routes": routes, "seen": []})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.seen = handler.seen
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
