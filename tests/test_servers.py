"""The open-redirect fix of demo_apps/servers applied to real servers as
they run: gunicorn (sync with recycled workers, gthread, --preload), uvicorn
with spawned workers, Django with views imported on the first request, a
multiprocessing pool, a plain os.fork during an apply, and restarts under
`livepatch run`. Each test starts the server under `livepatch run`, drives it
with client threads and asserts what users see: the exploit request is
redirected on-site, and no request fails."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from servers_harness import (BENIGN, EXPLOIT, FIXED, SERVERS, VULNERABLE, Keys, Load, Servers, cli, cli_json,
                             env, free_port, get, history_events, process_status)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pre-fork servers on Linux")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle(keys, tmp_path_factory):
    return keys.build(tmp_path_factory.mktemp("bundles") / "HP-SHOP-1.lpb")


@pytest.fixture
def servers(tmp_path, keys):
    s = Servers(tmp_path, keys)
    yield s
    s.stop_all()


def _gunicorn_has(option):
    from gunicorn.config import KNOWN_SETTINGS
    return any(option in s.cli for s in KNOWN_SETTINGS if s.cli)


# newer gunicorn opens a control socket at one fixed path in $HOME, which
# servers running side by side would share
NO_CONTROL_SOCKET = ["--no-control-socket"] if _gunicorn_has("--no-control-socket") else []


def gunicorn(port, *options, app="shop.wsgi:app"):
    return ["gunicorn", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "3", *NO_CONTROL_SOCKET, *options, app]


def _uvicorn_has(parameter):
    import inspect
    from uvicorn.config import Config
    return parameter in inspect.signature(Config).parameters


# on a loaded machine a freshly spawned worker can take longer than uvicorn's
# default 5 s to report ready, and uvicorn then kills it and aborts a restart
SLOW_START = ["--timeout-worker-healthcheck", "30"] if _uvicorn_has("timeout_worker_healthcheck") else []


def uvicorn(port, *options, app="shop.asgi:app"):
    return ["uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *SLOW_START, *options, app]


def locations(replies):
    return sorted({r.location for r in replies})


def served(replies, expected):
    """Assert that every reply redirected to `expected`; say which processes did not."""
    wrong = [r for r in replies if r.location != expected]
    if wrong:
        culprits = {r.pid for r in wrong}
        events = []
        for pid in sorted(culprits, key=str)[:3]:
            try:
                events += [e for e in history_events(pid) if e.get("pid") == pid]
            except AssertionError as exc:  # exited meanwhile
                events.append(str(exc).splitlines()[0])
        raise AssertionError(f"{len(wrong)} of {len(replies)} replies not {expected!r}, from {sorted(culprits)} "
                             f"(first at {wrong[0].started:.2f}); their history: {events}")


def pids(replies):
    return {r.pid for r in replies}


def apply(target, bundle, *options):
    return cli_json("apply", target, bundle, *options)


def rollback(target, *options):
    return cli_json("rollback", target, *options)


# ---------------------------------------------------------------- gunicorn

def gunicorn_recycling(servers, bundle, pause):
    """gunicorn sync workers replaced every 10 requests under load: the fix
    and then its rollback reach every worker, including the ones started
    after each. With `pause`, no request is sent while the apply and the
    rollback run (so no worker is replaced meanwhile)."""
    port = free_port()
    srv = servers.start(gunicorn(port, "--workers", "3", "--max-requests", "10", "--max-requests-jitter", "0"),
                        port=port)
    srv.wait_ready()
    with Load(port, log=srv.log) as load:
        load.wait_for(lambda: len(load.since(0)) >= 10, what="requests before the apply")
        served(load.since(0), VULNERABLE)  # the bug, in every worker
        if pause:
            load.pause()
            srv.settle()
        before = set(srv.processes())
        report = apply(srv.name, bundle)
        applied = time.monotonic()
        load.resume()
        assert report["serving_patched"] + report["serving_pending"] == report["serving"]
        # under load every worker may be replaced while the apply runs (they live ~0.3 s): then none is counted
        assert report["serving"] >= 1 or not pause
        # a worker is replaced every 10 requests: wait for 20 workers forked after the apply
        load.wait_for(lambda: len(pids(load.since(applied)) - before) >= 20, timeout=120,
                      what="20 workers started after the apply")
        served(load.since(applied), FIXED)
        assert locations(load.since(applied, BENIGN)) == ["/orders/7"]

        if pause:
            load.pause()
            srv.settle()
        after_apply = set(srv.processes()) - before  # started after the apply, alive now
        rollback(srv.name)
        rolled = time.monotonic()
        load.resume()
        load.wait_for(lambda: len(pids(load.since(rolled)) - after_apply - before) >= 5, timeout=120,
                      what="5 workers started after the rollback")
        back = load.since(rolled)
        served(back, VULNERABLE)
        if pause:  # under load the workers alive at the rollback are replaced before it returns
            assert pids(back) & after_apply, "no worker started after the apply served after the rollback"
    assert not load.failures, (load.failures[:5], srv.log())


def test_gunicorn_sync_workers_recycled_by_max_requests(servers, bundle):
    gunicorn_recycling(servers, bundle, pause=True)


def test_gunicorn_sync_workers_recycled_during_the_apply(servers, bundle):
    """Workers exit and are forked while the apply and the rollback run."""
    gunicorn_recycling(servers, bundle, pause=False)


def test_gunicorn_gthread(servers, bundle):
    port = free_port()
    srv = servers.start(gunicorn(port, "--workers", "2", "--worker-class", "gthread", "--threads", "4"), port=port)
    srv.wait_ready()
    srv.wait_agents(3)
    with Load(port, threads=3, log=srv.log) as load:
        load.wait_for(lambda: len(load.since(0)) >= 10)
        report = apply(srv.name, bundle)
        applied = time.monotonic()
        assert report["serving"] == 2 and report["serving_patched"] == 2, report["summary"]
        # the kernel may hand one gthread worker many connections in a row, so
        # wait until both have answered rather than counting a fixed number
        load.wait_for(lambda: len(pids(load.since(applied))) == 2 and len(load.since(applied)) >= 50,
                      what="both workers serving after the apply")
        served(load.since(applied), FIXED)
        rollback(srv.name)
        rolled = time.monotonic()
        load.wait_for(lambda: len(load.since(rolled)) >= 20)
        served(load.since(rolled), VULNERABLE)
    assert not load.failures, (load.failures[:5], srv.log())


def test_gunicorn_preload_counts_the_workers_and_new_workers_inherit_the_fix(servers, bundle):
    port = free_port()
    srv = servers.start(gunicorn(port, "--workers", "2", "--preload"), port=port)
    srv.wait_ready()
    srv.wait_agents(3)
    with Load(port, log=srv.log) as load:
        load.wait_for(lambda: len(load.since(0)) >= 10)
        report = apply(srv.name, bundle)
        applied = time.monotonic()
        # the master imported the app but serves nothing: the workers are what counts
        assert report["serving"] == 2 and report["serving_patched"] == 2, report["summary"]
        assert report["masters"] == 1 and report["masters_patched"] == 1, report["summary"]
        assert "2 of 2 serving processes patched" in report["summary"]
        roles = {p["pid"]: p["role"] for p in report["processes"]}
        assert roles[srv.pid] == "master" and sorted(roles.values()) == ["master", "worker", "worker"]
        load.wait_for(lambda: len(load.since(applied)) >= 20)
        # a worker that exits (here told to, as --max-requests or a timeout does) is
        # re-forked from the patched master
        victim = next(p for p in roles if p != srv.pid)
        os.kill(victim, signal.SIGTERM)
        stopped = time.monotonic()
        load.wait_for(lambda: pids(load.since(stopped)) - set(roles), timeout=60, what="a new worker serving")
        served(load.since(applied), FIXED)
    assert not load.failures, (load.failures[:5], srv.log())


# ---------------------------------------------------------------- uvicorn

def uvicorn_restarts(servers, bundle, pause):
    """uvicorn's spawned workers get the fix, and so do the ones SIGHUP starts
    in their place; after the rollback, new workers run the release. With
    `pause`, no request is in flight while uvicorn replaces its workers."""
    port = free_port()
    srv = servers.start(uvicorn(port, "--workers", "2"), port=port)
    srv.wait_ready()

    def restart(workers):
        """SIGHUP; returns once every worker in `workers` has been replaced."""
        if pause:
            load.pause()
        os.kill(srv.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not (workers.isdisjoint(srv.processes()) and len(srv.agents()) == 3):
            assert time.monotonic() < deadline, f"uvicorn did not replace {workers}:\n{srv.log()}"
            time.sleep(0.05)
        restarted = time.monotonic()
        load.resume()
        load.wait_for(lambda: len(pids(load.since(restarted)) - workers) == 2, what="two new workers serving")
        return restarted

    with Load(port, log=srv.log) as load:
        load.wait_for(lambda: len(pids(load.since(0))) == 2, what="both workers serving")
        served(load.since(0), VULNERABLE)
        workers = pids(load.since(0))
        srv.wait_agents(3)
        report = apply(srv.name, bundle)
        applied = time.monotonic()
        outcome = {p["pid"]: p["outcome"] for p in report["processes"]}
        assert all(outcome[w] == "patched" for w in workers), report["processes"]
        load.wait_for(lambda: len(pids(load.since(applied))) == 2 and len(load.since(applied)) >= 40)
        # new interpreters: they re-apply the recorded fix as they import the app
        restarted = restart(workers)
        served(load.since(applied), FIXED)

        rollback(srv.name)
        rolled = time.monotonic()
        load.wait_for(lambda: len(pids(load.since(rolled))) == 2 and len(load.since(rolled)) >= 40)
        served(load.since(rolled), VULNERABLE)
        restart(pids(load.since(restarted)))  # the record is gone: new workers run the release
        served(load.since(rolled), VULNERABLE)
    assert not load.failures, (load.failures[:5], srv.log())


def test_uvicorn_spawned_workers_and_the_ones_sighup_starts(servers, bundle):
    uvicorn_restarts(servers, bundle, pause=True)


# ---------------------------------------------------------------- Django

@pytest.mark.parametrize("server", ["runserver", "gunicorn"])
def test_django_views_imported_on_the_first_request_are_already_fixed(servers, bundle, server):
    port = free_port()
    if server == "runserver":
        command, processes = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"], 1
    else:
        command, processes = gunicorn(port, "--workers", "2", app="shopsite.wsgi"), 3
    srv = servers.start(command, port=port)
    assert srv.wait_ready("/health").status == 200  # /health lives in the URLconf, not in the views
    srv.wait_agents(processes)
    report = apply(srv.name, bundle)
    serving = report["serving"]
    assert serving == processes - (processes > 1)
    assert report["serving_pending"] == serving, report["summary"]  # nothing has imported shop.links yet
    status = cli_json("status", srv.name)
    workers = [p for p in status["processes"] if p["serves"]]
    assert len(workers) == serving and all(p["pending"] == ["shop.links"] for p in workers)
    first = get(port, EXPLOIT)
    assert first.status == 302 and first.location == FIXED
    for _ in range(10):
        assert get(port, EXPLOIT).location == FIXED
        assert get(port, BENIGN).location == "/orders/7"
    rollback(srv.name)
    assert get(port, EXPLOIT).location == VULNERABLE


# ---------------------------------------------------------------- multiprocessing

@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_multiprocessing_pool_workers_run_the_patched_function(servers, bundle, context):
    port = free_port()
    srv = servers.start([sys.executable, "-m", "shop.jobs", "--context", context, "--workers", "2",
                         "--max-tasks", "5", "--port", str(port)], port=port)
    srv.wait_ready()
    with Load(port, threads=2, log=srv.log) as load:
        load.wait_for(lambda: len(load.since(0)) >= 10)
        served(load.since(0), VULNERABLE)
        # the apply and the rollback reach the workers as they are; replacing
        # workers during a service apply is the gunicorn --max-requests case
        load.pause()
        before = set(srv.settle())
        apply(srv.name, bundle)
        applied = time.monotonic()
        load.resume()
        # --max-tasks 5: the pool replaces its workers; the new ones run the fix too
        load.wait_for(lambda: len(pids(load.since(applied)) - before) >= 4, timeout=90,
                      what="4 pool workers started after the apply")
        served(load.since(applied), FIXED)
        load.pause()
        after = set(srv.settle())
        rollback(srv.name)
        rolled = time.monotonic()
        load.resume()
        load.wait_for(lambda: len(pids(load.since(rolled)) - after) >= 2, timeout=90)
        served(load.since(rolled), VULNERABLE)
    assert not load.failures, (load.failures[:5], srv.log())


# ---------------------------------------------------------------- os.fork

HELD = '''import time


def hold():
    while True:
        time.sleep({nap})


def answer():
    return {answer!r}
'''


def _forker(servers, keys, tmp_path, *options):
    base, new, out = tmp_path / "base", tmp_path / "new", tmp_path / "out"
    for d in (base, new, out):
        d.mkdir(parents=True)
    (base / "held.py").write_text(HELD.format(nap=0.05, answer="old"))
    (new / "held.py").write_text(HELD.format(nap=0.02, answer="new"))
    held = keys.build(tmp_path / "held.lpb", baseline=base, patched=new, patch_id="HP-HELD-1")
    program = os.path.join(os.path.dirname(os.path.abspath(__file__)), "servers_forker.py")
    srv = servers.start([sys.executable, program, str(out), *options], state_dir=tmp_path / "state",
                        extra_env={"PYTHONPATH": str(base)})
    deadline = time.monotonic() + 30
    while not (out / "ready").exists():
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.log()
        time.sleep(0.05)
    srv.wait_agents(1)
    return srv, held, out


def _children(out):
    return [json.loads(p.read_text()) for p in sorted(out.glob("child-*.json"))]


def _usable(child, held, out):
    """The child's agent answers, and a patch applies there and runs."""
    assert process_status(child)["agent"]["pid"] == child
    r = cli("apply", child, held, "--timeout", "5", timeout=30)
    assert r.returncode == 0, r.stderr
    report = out / f"child-{child}.json"
    deadline = time.monotonic() + 10
    while json.loads(report.read_text())["answer"] != "new":
        assert time.monotonic() < deadline, report.read_text()
        time.sleep(0.1)
    assert json.loads(report.read_text())["applied"] == ["HP-HELD-1"]


def test_plain_fork_during_an_apply_leaves_a_usable_child(servers, keys, tmp_path):
    srv, held, out = _forker(servers, keys, tmp_path)
    # held.hold never leaves its thread's stack: the apply waits for a safe point until its timeout
    applying = subprocess.Popen([sys.executable, "-m", "livepatch", "apply", str(srv.pid), held, "--timeout", "4"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        time.sleep(1.0)
        (out / "fork").touch()  # the service forks every 0.3 s from now on
        opened = time.monotonic()
        _, stderr = applying.communicate(timeout=60)
        closed = time.monotonic()
    finally:
        if applying.poll() is None:
            applying.kill()
            applying.wait()
        (out / "fork").unlink(missing_ok=True)
    assert applying.returncode == 3 and "TargetBusy" in stderr, (applying.returncode, stderr)
    time.sleep(1.0)
    during = [c for c in _children(out) if opened <= c["forked_at"] <= closed - 0.5]
    assert len(during) >= 3, _children(out)
    for c in during:
        assert c["gc_enabled"] and c["applied"] == [] and c["answer"] == "old", c
        assert process_status(c["pid"])["agent"]["pid"] == c["pid"]
    # usable: the patch applies in a child (its holding thread did not survive the fork)
    _usable(during[0]["pid"], held, out)


# ---------------------------------------------------------------- restarts

RELEASE_1_1 = '''"""Where a user is sent after logging in: back to the page they came from,
as long as it is on this site."""


def safe_next(target, default="/"):
    """The redirect target for `?next=`: a path on this site, else `default`."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\\\")):
        return default
    return target
'''


def test_fork_while_the_agent_imports_what_an_apply_needs(servers, keys, tmp_path):
    # The first apply in a process imports the verification and commit code
    # on the agent's thread; the service forks at a moment that import is
    # under way (it watches for it). Not every try lands in one: up to three.
    for attempt in range(3):
        srv, held, out = _forker(servers, keys, tmp_path / str(attempt), "--while-importing")
        r = cli("apply", srv.pid, held, "--timeout", "2")
        assert r.returncode == 3 and "TargetBusy" in r.stderr, r.stderr
        time.sleep(1.0)
        children = [c for c in _children(out) if c["how"].startswith("while importing")]
        if children:
            break
        srv.stop()
    assert children, "no fork landed in an import"
    for c in children:
        assert c["gc_enabled"] and c["applied"] == [], c
        _usable(c["pid"], held, out)


def test_restart_reapplies_the_fix_before_the_first_request_and_a_new_release_retires_it(servers, bundle, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(os.path.join(SERVERS, "shop"), release / "shop", ignore=shutil.ignore_patterns("__pycache__"))
    state = tmp_path / "service-state"

    name = f"shop-restarts-{os.getpid()}"  # one name across the restarts: the state is kept under it

    def start():
        port = free_port()
        return servers.start(gunicorn(port, "--workers", "2"), name=name, cwd=str(release), state_dir=state,
                             port=port), port

    srv, port = start()
    assert srv.wait_ready(EXPLOIT).location == VULNERABLE
    srv.wait_agents(3)
    apply(srv.name, bundle)
    assert get(port, EXPLOIT).location == FIXED
    srv.stop()

    srv, port = start()  # same release: the recorded fix re-applies as the workers import the app
    first = srv.wait_ready(EXPLOIT)
    assert first.status == 302 and first.location == FIXED
    with Load(port, log=srv.log) as load:
        load.wait_for(lambda: len(load.since(0)) >= 20)
        served(load.since(0), FIXED)
    assert not load.failures, (load.failures[:5], srv.log())
    assert [p["id"] for p in process_status(first.pid)["applied"]] == ["HP-SHOP-1"]
    reapplied = {e["pid"] for e in history_events(srv.name) if e["action"] in ("reapply", "import")
                 and e["outcome"] == "ok" and e["patch"] == "HP-SHOP-1"}
    assert first.pid in reapplied
    srv.stop()

    (release / "shop" / "links.py").write_text(RELEASE_1_1)  # release 1.1 ships its own fix
    (release / "shop" / "__init__.py").write_text((release / "shop" / "__init__.py").read_text().replace("1.0", "1.1"))
    srv, port = start()
    first = srv.wait_ready(EXPLOIT)
    assert first.location == FIXED  # by the release's own code
    srv.wait_agents(3)
    retired = [e for e in history_events(srv.name) if e["action"] == "retire" and e["patch"] == "HP-SHOP-1"]
    assert retired and "does not match" in retired[0]["reason"], retired
    srv.stop()
    srv, port = start()  # the retired record is not applied again
    assert srv.wait_ready(EXPLOIT).location == FIXED
    srv.wait_agents(3)
    assert all(p["patches"] == [] for p in cli_json("status", srv.name)["processes"])
