"""assess and apply --dry-run change nothing and run nothing from the bundle,
and say who holds the targets now; Ctrl-C or a killed CLI cancels its
pending apply before any store; status shows an apply in progress. Against
real service processes (the inventory HTTP service under `livepatch run`,
and a small asyncio program holding a suspended coroutine)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from live import SECRET, Service, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")

MARKER_MODULE = """\
import os
with open(os.environ["LP_MARKER"], "a") as fh:
    fh.write("imported\\n")
ONE = 1
"""


def _tree(tmp, name, source):
    out = tmp / name
    shutil.copytree(os.path.join(PATCHES, source), out, symlinks=False)
    return out


def _edit(tree, relpath, old, new):
    f = tree / relpath
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))


def _build(keys, base, new, out, patch_id, classification="security"):
    r = cli("build", str(base), str(new), "-o", str(out), "--id", patch_id, "--key", keys["key"],
            "--name", "inventory", "--version", "1.0", "--classification", classification)
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="module")
def bundles(keys, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    base = _tree(d, "base", "baseline")
    out = {}
    # the path traversal fix plus a new import in pricing (a module the service has imported)
    for name, module in (("marker", "lp_marker_mod"), ("broken", "lp_broken_mod")):
        new = _tree(d, f"new-{name}", "fix-path-traversal")
        _edit(new, "inventory/pricing.py", "import time\n", f"import time\n\nimport {module}\n")
        _edit(new, "inventory/pricing.py", "    return CATALOG[sku]\n", f"    return CATALOG[sku] * {module}.ONE\n")
        out[name] = _build(keys, base, new, d / f"{name}.lpb", f"HP-{name.upper()}")
    # the path traversal fix plus a change to build_report, which a slow request holds
    new = _tree(d, "new-busy", "fix-path-traversal")
    _edit(new, "inventory/pricing.py", "lines += 1", "lines += 2")
    out["busy"] = _build(keys, base, new, d / "busy.lpb", "HP-BUSY")
    out["busy-bugfix"] = _build(keys, base, new, d / "busy-bugfix.lpb", "HP-BUSYFIX", "bugfix")
    return out


@pytest.fixture
def service(tmp_path, keys):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "lp_marker_mod.py").write_text(MARKER_MODULE)
    (mods / "lp_broken_mod.py").write_text("raise RuntimeError('refuses to be imported')\n")
    marker = tmp_path / "marker"
    made = []

    def make(name="dryrun"):
        env = {"PYTHONPATH": os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "LP_MARKER": str(marker)}
        launcher = [sys.executable, "-m", "livepatch.cli", "run", "--name", name, "--trust", keys["trust"],
                    "--state-dir", str(tmp_path / "state"), "--"]
        svc = Service(tmp_path, DEMO, ["-m", "inventory.server"], launcher=launcher, env=env)
        svc.marker = marker
        made.append(svc)
        _wait_for_agent(svc.pid)
        return svc
    yield make
    for s in made:
        s.stop()


def _wait_for_agent(pid, seconds=20):
    deadline = time.monotonic() + seconds
    while cli("status", str(pid), "--json").returncode != 0:
        assert time.monotonic() < deadline, "the agent did not come up"
        time.sleep(0.2)


def _status(pid):
    r = cli("status", str(pid), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _history(pid):
    r = cli("history", str(pid), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- runs nothing

def test_assess_and_dry_run_run_no_import_of_the_bundle_apply_does(service, bundles):
    svc = service()
    assert svc.get(SECRET)[0] == 200
    r = cli("assess", str(svc.pid), bundles["marker"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["verdict"] == "applies"
    r = cli("apply", str(svc.pid), bundles["marker"], "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verdict"] == "applies"
    assert not svc.marker.exists()  # the import statement did not run
    assert _status(svc.pid)["applied"] == []

    r = cli("apply", str(svc.pid), bundles["marker"], "--json")
    assert r.returncode == 0, r.stderr
    assert svc.marker.read_text() == "imported\n"  # run once, by the apply
    assert svc.get(SECRET)[0] == 404
    assert svc.get("/quote?sku=widget&qty=1")[0] == 200  # the new global serves


def test_an_import_that_fails_refuses_the_whole_apply(service, bundles):
    svc = service()
    r = cli("apply", str(svc.pid), bundles["broken"])
    assert r.returncode == 3, r.stderr
    assert "lp_broken_mod" in r.stderr and "refuses to be imported" in r.stderr and "nothing was changed" in r.stderr
    assert "Traceback" not in r.stderr
    assert svc.get(SECRET)[0] == 200  # the fix in the same bundle was not stored
    assert _status(svc.pid)["applied"] == []
    entry = [e for e in _history(svc.pid) if e.get("patch") == "HP-BROKEN"][-1]
    assert entry["outcome"] == "refused"


def test_engine_assess_leaves_sys_modules_alone(tmp_path, bundles, keys, monkeypatch):
    """In this process: assess of a patch with a new import changes nothing
    in sys.modules and writes no marker; apply imports it."""
    import livepatch
    from livepatch.bundle import load_bundle

    monkeypatch.setenv("LP_MARKER", str(tmp_path / "marker"))
    (tmp_path / "lp_marker_mod.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(DEMO)
    import inventory.pricing  # noqa: F401  the module the bundle adds the import to
    import inventory.files  # noqa: F401
    engine = livepatch.Engine()
    patch = load_bundle(bundles["marker"], keys["trust"])
    engine.assess(patch)  # anything the engine imports lazily is imported now
    before = set(sys.modules)
    verdict = engine.assess(patch)
    assert verdict["verdict"] == "applies", verdict
    assert set(sys.modules) == before and not (tmp_path / "marker").exists()
    try:
        engine.apply(patch)
        assert "lp_marker_mod" in sys.modules and (tmp_path / "marker").exists()
    finally:
        engine.rollback_all()
        sys.modules.pop("lp_marker_mod", None)


# ---------------------------------------------------------------- busy now

def test_assess_names_the_thread_holding_a_target(service, bundles):
    svc = service()
    t = threading.Thread(target=svc.get, args=("/report?seconds=6",), daemon=True)
    t.start()
    time.sleep(0.8)
    r = cli("assess", str(svc.pid), bundles["busy"], "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)[0]
    assert v["verdict"] == "applies"
    holders = [b for b in v["busy_now"] if b["kind"] == "thread"]
    assert holders and holders[0]["targets"] == ["inventory.pricing:build_report"]
    assert holders[0]["thread_name"] and holders[0]["thread_id"]
    assert any("pricing.py" in line and "build_report" in line for line in holders[0]["holding"])
    r = cli("assess", str(svc.pid), bundles["busy"])
    assert r.returncode == 0
    assert "applies, but HP-BUSY's target inventory.pricing:build_report is running on thread" in r.stdout
    r = cli("apply", str(svc.pid), bundles["busy"], "--dry-run", "--timeout", "2")
    assert r.returncode == 0 and "would apply now" in r.stdout and "up to 2s" in r.stdout
    t.join()
    assert _status(svc.pid)["applied"] == []


CORO_BASE = '''\
import asyncio


async def hold(event):
    """Waits for an event nobody sets: suspended for good."""
    await event.wait()
    return "old"
'''

CORO_PROGRAM = '''\
import asyncio, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import livepatch.agent
import lp_coro_target

async def main():
    livepatch.agent.start(name=sys.argv[3], allow_unsigned=True, state_dir=sys.argv[2])
    task = asyncio.ensure_future(lp_coro_target.hold(asyncio.Event()))
    await asyncio.sleep(0.1)
    open(sys.argv[1] + ".tmp", "w").close()
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    await asyncio.sleep(3600)

asyncio.run(main())
'''


def test_a_suspended_coroutine_holding_a_target_is_reported_blocked(tmp_path):
    app = tmp_path / "app"
    (tmp_path / "new").mkdir()
    app.mkdir()
    (app / "lp_coro_target.py").write_text(CORO_BASE)
    (app / "main.py").write_text(CORO_PROGRAM)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "lp_coro_target.py").write_text(CORO_BASE)
    (tmp_path / "new" / "lp_coro_target.py").write_text(CORO_BASE.replace('"old"', '"new"'))
    bundle = str(tmp_path / "coro.lpb")
    r = cli("build", str(tmp_path / "base"), str(tmp_path / "new"), "-o", bundle, "--id", "HP-CORO")
    assert r.returncode == 0, r.stderr
    ready = tmp_path / "ready"
    name = f"dryrun-coro-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, str(app / "main.py"), str(ready), str(tmp_path / "state"), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = cli("assess", str(proc.pid), bundle, "--json")
        assert r.returncode == 3, r.stdout + r.stderr
        v = json.loads(r.stdout)[0]
        assert v["verdict"] == "blocked"
        assert [b["kind"] for b in v["busy_now"]] == ["coroutine"]
        assert v["busy_now"][0]["targets"] == ["lp_coro_target:hold"]
        r = cli("assess", str(proc.pid), bundle)
        assert "blocked: HP-CORO's target lp_coro_target:hold is held by a suspended coroutine" in r.stdout, r.stdout
        assert "--force" in r.stdout
        r = cli("apply", str(proc.pid), bundle, "--dry-run")
        assert r.returncode == 3 and "is blocked" in r.stdout
        r = cli("apply", str(proc.pid), bundle, "--dry-run", "--force", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "applies"
        r = cli("apply", name, bundle, "--dry-run")  # the service form says so too
        assert r.returncode == 3 and "blocked" in r.stdout and "1 blocked by a suspended coroutine" in r.stdout, r.stdout
        r = cli("status", str(proc.pid), "--json")
        assert json.loads(r.stdout)["applied"] == []
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- cancel

# Seconds a slow request holds the target: long enough for the CLI to start
# and be interrupted on a loaded machine; after it the apply would land.
HOLD = 15


class _Hold:
    """A request holding inventory.pricing:build_report for `seconds` on a
    thread of the service (the client may give up earlier: the service goes
    on with the report)."""

    def __init__(self, svc, seconds=HOLD):
        self.until = time.monotonic() + seconds
        self._t = threading.Thread(target=self._run, args=(svc, seconds), daemon=True)
        self._t.start()

    @staticmethod
    def _run(svc, seconds):
        try:
            svc.get(f"/report?seconds={seconds}")
        except OSError:
            pass  # Service.get's read timeout, or the service stopped

    @property
    def holding(self) -> bool:
        return time.monotonic() < self.until - 0.5

    def wait(self):
        """Until the target is free again, and a moment more."""
        time.sleep(max(0.0, self.until - time.monotonic()) + 1.0)


def _wait_in_progress(pid, seconds=HOLD):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = _status(pid)
        assert s["applied"] == [], "the apply landed before it could be interrupted (a hold too short for this machine)"
        # the agent is busy from the request on; the engine's own entry
        # appears once it waits for a safe point (after verifying the bundle)
        if s["agent"]["busy"] and s.get("in_progress"):
            return s
        time.sleep(0.1)
    raise AssertionError("the apply never showed as in progress")


def _apply_in_background(target, bundle, *extra):
    return subprocess.Popen([sys.executable, "-m", "livepatch", "apply", str(target), bundle, "--timeout", "60", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _not_patched(svc):
    assert svc.get(SECRET)[0] == 200  # still vulnerable: nothing was stored
    s = _status(svc.pid)
    assert s["applied"] == [] and not s["agent"]["busy"] and s["agent"]["in_progress"] is None
    # the processes of one service share its persisted history: each entry names its pid
    entries = [e for e in _history(svc.pid) if e.get("patch") == "HP-BUSY" and e.get("pid", svc.pid) == svc.pid]
    assert [(e["action"], e["outcome"]) for e in entries] == [("apply", "cancelled")], entries


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupting_the_cli_cancels_the_pending_apply(service, bundles, how):
    svc = service()
    hold = _Hold(svc)
    time.sleep(0.5)
    cli_proc = _apply_in_background(svc.pid, bundles["busy"])
    s = _wait_in_progress(svc.pid)
    # status answers during the wait and says what is under way
    assert s["agent"]["in_progress"]["action"] == "apply" and s["agent"]["in_progress"]["patch"] == "HP-BUSY"
    assert s["agent"]["in_progress"]["client_pid"] == cli_proc.pid
    assert s["in_progress"]["patch"] == "HP-BUSY"
    assert "in progress: apply of HP-BUSY" in cli("status", str(svc.pid)).stdout
    cli_proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    out, err = cli_proc.communicate(timeout=30)
    if how == "sigint":
        assert cli_proc.returncode == 130, err
        assert f"livepatch apply: cancelled; nothing was changed in process {svc.pid}" in err
        assert "Traceback" not in err
    else:
        assert cli_proc.returncode == -signal.SIGKILL
    assert hold.holding  # cancelled while the target was still held
    hold.wait()  # the target is free now: an apply still pending would land
    _not_patched(svc)


def test_interrupting_a_rollback_cancels_it(service, bundles):
    svc = service()
    assert cli("apply", str(svc.pid), bundles["busy-bugfix"]).returncode == 0
    assert svc.get(SECRET)[0] == 404
    hold = _Hold(svc)
    time.sleep(0.5)
    cli_proc = subprocess.Popen([sys.executable, "-m", "livepatch", "rollback", str(svc.pid), "--timeout", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HOLD
    while not _status(svc.pid)["agent"]["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cli_proc.send_signal(signal.SIGINT)
    out, err = cli_proc.communicate(timeout=30)
    assert cli_proc.returncode == 130 and f"livepatch rollback: cancelled; nothing was changed in process {svc.pid}" in err, err
    assert hold.holding
    hold.wait()
    assert svc.get(SECRET)[0] == 404  # still patched
    assert [p["id"] for p in _status(svc.pid)["applied"]] == ["HP-BUSYFIX"]
    entries = [(e["action"], e["outcome"]) for e in _history(svc.pid) if e.get("patch") == "HP-BUSYFIX"]
    assert entries == [("apply", "ok"), ("rollback", "cancelled")], entries


@pytest.mark.parametrize("processes", [1, 2])
def test_interrupting_a_service_apply_cancels_it_everywhere(service, bundles, processes):
    name = f"dryrun-svc{processes}"
    svcs = [service(name=name) for _ in range(processes)]
    holds = [_Hold(s) for s in svcs]
    time.sleep(0.5)
    cli_proc = _apply_in_background(name, bundles["busy"])
    for s in svcs:
        _wait_in_progress(s.pid)
    cli_proc.send_signal(signal.SIGINT)
    out, err = cli_proc.communicate(timeout=30)
    assert cli_proc.returncode == 130, out + err
    assert f"cancelled; nothing was changed in service {name}" in out, out + err
    assert "Traceback" not in err
    assert all(h.holding for h in holds)
    for h in holds:
        h.wait()
    for s in svcs:
        _not_patched(s)


def test_ps_and_service_status_show_an_apply_in_progress(service, bundles):
    svc = service(name="dryrun-ps")
    hold = _Hold(svc, 25)
    time.sleep(0.5)
    cli_proc = _apply_in_background("dryrun-ps", bundles["busy"])
    try:
        _wait_in_progress(svc.pid)
        status = cli("status", "dryrun-ps")
        ps = cli("ps")
        assert hold.holding, "the hold ended before ps answered: too loaded a machine for this test"
        assert "(applying HP-BUSY)" in status.stdout, status.stdout
        assert next(line for line in ps.stdout.splitlines() if line.split()[:1] == [str(svc.pid)]).count(
            "(applying HP-BUSY)") == 1, ps.stdout
    finally:
        cli_proc.send_signal(signal.SIGINT)
        cli_proc.communicate(timeout=30)


# ---------------------------------------------------------------- engine: cancelled()

BUSY_SOURCE = """\
import threading

def hold(event):
    event.wait()
    return "old"
"""


def test_engine_cancelled_between_attempts_changes_nothing_and_is_recorded(make_module, engine):
    from conftest import patch_of

    from livepatch.errors import Cancelled
    m, source = make_module(BUSY_SOURCE)
    patch = patch_of(m, source, BUSY_SOURCE.replace('"old"', '"new"'))
    release = threading.Event()
    t = threading.Thread(target=m.hold, args=(release,), daemon=True)
    t.start()
    asked = []

    def cancelled():
        asked.append(time.monotonic())
        return len(asked) > 3  # the client goes away while the engine waits
    old_code = m.hold.__code__
    try:
        with pytest.raises(Cancelled, match="cancelled by its client"):
            engine.apply(patch, timeout=30, cancelled=cancelled)
    finally:
        release.set()
        t.join()
    assert asked[-1] - asked[0] < 5  # well inside the timeout
    assert m.hold.__code__ is old_code and engine.applied_ids() == []
    assert engine.status()["in_progress"] is None
    last = engine.history()[-1]
    assert (last["action"], last["patch"], last["outcome"]) == ("apply", "HP-1", "cancelled")
    # the target is free now: the same patch applies, and a rollback can be cancelled too
    engine.apply(patch)
    assert m.hold(_set_event()) == "new"
    with pytest.raises(Cancelled):
        engine.rollback(cancelled=lambda: True)
    assert engine.applied_ids() == ["HP-1"] and engine.history()[-1]["outcome"] == "cancelled"
    engine.rollback()
    assert m.hold.__code__ is old_code


def _set_event():
    e = threading.Event()
    e.set()
    return e
