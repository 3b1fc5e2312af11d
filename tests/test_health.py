"""Health checks after an install: HTTP URLs answering 2xx, commands
exiting 0, and the agents' count of exceptions raised through the patched
code (Python 3.12+; 3.11 gives no signal), against real servers."""

import http.server
import sys
import threading

import pytest

import updater_apps
from livepatch import fanout, health
from livepatch.updater_config import HealthConfig
from servers_harness import Keys, cli, get

MONITORING = sys.version_info >= (3, 12)


@pytest.fixture
def http_server():
    """A loopback server whose /ok answers 200 and anything else 503."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_check(http_server):
    assert health.check_http(http_server + "/ok", 5) is None
    assert health.check_http(http_server + "/down", 5) == f"GET {http_server}/down answered 503, not 2xx"
    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    assert health.check_http(closed, 5).startswith(f"GET {closed} failed:")


def test_command_check(tmp_path):
    assert health.check_command([sys.executable, "-c", "pass"], 10) is None
    problem = health.check_command([sys.executable, "-c", "import sys; print('db down', file=sys.stderr); sys.exit(3)"], 10)
    assert problem.endswith("exited 3: db down")
    assert health.check_command([str(tmp_path / "missing")], 10) == f"check command {tmp_path / 'missing'} not found"
    assert "did not finish within 0.5s" in health.check_command([sys.executable, "-c", "import time; time.sleep(30)"], 0.5)


def test_observe_stops_at_the_first_failing_check(http_server):
    rounds = []
    verdict = health.observe([], "HP-X", HealthConfig(observe=60, http=[http_server + "/ok", http_server + "/down"],
                                                     patched_errors=None),
                             sleep=lambda s: rounds.append(s))
    assert not verdict.healthy and rounds == []
    assert verdict.reason == f"GET {http_server}/down answered 503, not 2xx"
    ticks = iter(range(100))
    verdict = health.observe([], "HP-X", HealthConfig(observe=3, http=[http_server + "/ok"], patched_errors=None),
                             clock=lambda: next(ticks), sleep=rounds.append)
    assert verdict.healthy and len(verdict.checks) == 3 and rounds == [1.0, 1.0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return Keys(tmp_path_factory.mktemp("keys"))


def test_patched_errors_are_counted_in_every_worker(tmp_path, keys):
    """Exceptions leaving the patched function count, wherever they are
    caught afterwards; other exceptions and normal calls do not."""
    server = updater_apps.start(tmp_path, keys, workers=2)
    try:
        bundle = updater_apps.build(keys, tmp_path, "HP-RAISES-1", updater_apps.RAISES, name=server.name)
        r = cli("apply", server.name, bundle)
        assert r.returncode == 0, r.stderr + r.stdout
        pids = server.agents()
        signal = health.AgentSignal(pids, "HP-RAISES-1", 30)
        if not MONITORING:
            assert signal.watching == []  # 3.11: no signal, said so in the answer
            answer = fanout.request_all(pids[:1], "patched-errors", wait=10, action="start", patch_id="HP-RAISES-1")
            assert answer[pids[0]].result["supported"] is False
            return
        assert sorted(signal.watching) == sorted(pids)
        assert get(server.port, "/div?a=7&b=2").body == {"result": 4}   # the fix is in effect
        assert get(server.port, "/nope").status == 404                  # not through patched code
        assert signal.counts()[0] == {pid: 0 for pid in pids}
        failures = sum(get(server.port, "/div?a=1&b=0").status == 500 for _ in range(6))
        assert failures == 6
        counts, samples = signal.counts()
        assert sum(counts.values()) == 6
        assert samples[0]["error"] == "ZeroDivisionError" and samples[0]["function"] == "divide"
        signal.stop()
        after = fanout.request_all(pids, "patched-errors", wait=10, action="read")
        assert all(o.result == {"supported": True, "observing": False} for o in after.values())
    finally:
        server.stop()


def test_observe_fails_on_patched_errors_and_passes_without(tmp_path, keys):
    server = updater_apps.start(tmp_path, keys)
    try:
        bundle = updater_apps.build(keys, tmp_path, "HP-RAISES-2", updater_apps.RAISES, name=server.name)
        r = cli("apply", server.name, bundle)
        assert r.returncode == 0, r.stdout + r.stderr
        pids = server.agents()
        calm = health.observe(pids, "HP-RAISES-2", HealthConfig(observe=0.5, http=[f"http://127.0.0.1:{server.port}/health"]))
        assert calm.healthy, calm.reason
        stop = threading.Event()

        def bad_requests():
            while not stop.is_set():
                get(server.port, "/div?a=1&b=0")
        t = threading.Thread(target=bad_requests, daemon=True)
        t.start()
        try:
            # 3.12+: ends at the first count; 3.11 has no signal and watches out the time
            verdict = health.observe(pids, "HP-RAISES-2", HealthConfig(observe=20 if MONITORING else 1, patched_errors=0))
        finally:
            stop.set()
            t.join()
        if MONITORING:
            assert not verdict.healthy
            assert "raised through the patched code (allowed 0); first: ZeroDivisionError in divide" in verdict.reason
            assert verdict.seconds < 20
        else:
            assert verdict.healthy  # 3.11: HTTP and command checks only
    finally:
        server.stop()
