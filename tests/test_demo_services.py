"""The asyncio and worker-pool demo services, patched live through the CLI:
the documented behaviour before and after each fix, with suspended
coroutines and never-returning loops in the picture."""

import json
import os
import socket
import sys
import time

import pytest

from live import Service, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOMS = os.path.join(ROOT, "demo_apps", "asyncio_api")
POOL = os.path.join(ROOT, "demo_apps", "worker_pool")
RUN = [sys.executable, "-m", "livepatch", "run", "--allow-unsigned", "--"]


@pytest.fixture
def started(tmp_path):
    made = []

    def make(cwd, program, **kw):
        s = Service(tmp_path, cwd, program, launcher=RUN, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def _build(tmp_path, demo, fix, *extra):
    out = str(tmp_path / f"{fix}.lpb")
    r = cli("build", os.path.join(demo, "patches", "baseline"), os.path.join(demo, "patches", fix), "-o", out,
            "--id", f"HP-{fix}", *extra)
    assert r.returncode == 0, r.stderr
    return out


def _hold_waits(port, n, seconds):
    """n keep-alive connections, each with a /wait request in flight."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /wait?seconds={seconds} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        conns.append(s)
    return conns


def test_asyncio_authorization_fix_applies_while_coroutines_are_suspended(started, tmp_path):
    svc = started(ROOMS, ["-m", "rooms.server"], load_paths=("/rooms/lobby?user=x", "/health")).start_load()
    bundle = _build(tmp_path, ROOMS, "fix-authorization")
    assert svc.get("/rooms/payroll?user=mallory")[0] == 200  # the bug
    waiting = _hold_waits(svc.port, 50, 4)
    time.sleep(0.5)
    assert svc.get("/health")[1]["connections"] >= 50
    r = cli("apply", str(svc.pid), bundle, "--json")
    assert r.returncode == 0, r.stderr
    assert svc.get("/rooms/payroll?user=mallory")[0] == 403
    assert svc.get("/rooms/payroll?user=carol")[0] == 200
    assert svc.get("/rooms/lobby?user=anyone")[0] == 200
    for s in waiting:  # the suspended requests complete normally
        s.settimeout(10)
        assert b"waited" in s.recv(4096)
        s.close()
    assert cli("rollback", str(svc.pid)).returncode == 0
    assert svc.get("/rooms/payroll?user=mallory")[0] == 200
    svc.stop()
    assert svc.failed == 0, svc.errors[:3]


def test_patching_a_suspended_coroutine_waits_and_reports_it(started, tmp_path):
    svc = started(ROOMS, ["-m", "rooms.server"])
    base, new = tmp_path / "base", tmp_path / "new"
    import shutil
    shutil.copytree(os.path.join(ROOMS, "patches", "baseline"), base)
    shutil.copytree(os.path.join(ROOMS, "patches", "baseline"), new)
    server = new / "rooms" / "server.py"
    server.write_text(server.read_text().replace('return 200, {"waited": True}', 'return 200, {"waited": "yes"}'))
    bundle = str(tmp_path / "route.lpb")
    assert cli("build", str(base), str(new), "-o", bundle, "--id", "HP-ROUTE").returncode == 0
    waiting = _hold_waits(svc.port, 3, 4)
    time.sleep(0.5)
    r = cli("apply", str(svc.pid), bundle, "--timeout", "1")
    assert r.returncode == 3 and "TargetBusy" in r.stderr and "suspended coroutine" in r.stderr
    for s in waiting:
        s.close()
    time.sleep(4)
    r = cli("apply", str(svc.pid), bundle, "--timeout", "5")
    assert r.returncode == 0, r.stderr
    waiting = _hold_waits(svc.port, 1, 0.1)
    waiting[0].settimeout(10)
    assert b'"waited": "yes"' in waiting[0].recv(4096)


def test_worker_pool_fix_needs_allow_active_for_the_endless_loop(started, tmp_path):
    svc = started(POOL, ["-m", "jobs.pool", "--workers", "3"], load_paths=("/stats",))
    time.sleep(1.0)
    before = svc.get("/stats")[1]
    assert before["done"] > 0 and before["last_ms"] > 0
    strict = _build(tmp_path, POOL, "fix-quadratic")
    r = cli("apply", str(svc.pid), strict, "--timeout", "1")
    assert r.returncode == 3 and "worker_loop" in r.stderr and "worker-" in r.stderr  # names the busy threads
    # unique_tags is hot (some worker is always inside it) and has no state
    # across calls: running calls may finish on the old code
    allowed = _build(tmp_path, POOL, "fix-quadratic", "--allow-active", "worker_loop", "--allow-active", "unique_tags")
    r = cli("apply", str(svc.pid), allowed, "--json")
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    after = svc.get("/stats")[1]
    assert after["done"] > before["done"] and after["failed"] == 0
    assert after["last_ms"] < before["last_ms"] / 5, (before, after)  # linear, not quadratic, per job
    status = json.loads(cli("status", str(svc.pid), "--json").stdout)
    assert status["applied"][0]["frames_on_old_code"] >= 3  # the running loops keep their old body
