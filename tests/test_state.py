"""The per-service state directory against real processes: a fix applied
to the inventory service survives a restart (in effect on the first
request), a rollback is remembered, a new release or a tampered bundle
retires the record instead of applying it, unsafe directories are refused
with one log line while the service still starts; plus the file-level
rules (serialised writers across processes, idempotent records, corrupt
files, history pruning)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from live import SECRET, Service, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")


@pytest.fixture
def inventory(tmp_path, keys):
    """Start the inventory service under `livepatch run --name inventory`,
    from the demo or from another copy of it; every one is stopped at the end."""
    made = []

    def start(cwd=DEMO, env=None):
        launcher = [sys.executable, "-m", "livepatch", "run", "--name", "inventory", "--trust", keys["trust"], "--"]
        s = Service(tmp_path, cwd, ["-m", "inventory.server"], launcher=launcher, env=env)
        made.append(s)
        return s
    yield start
    for s in made:
        s.stop()


def _state_dir():
    return os.path.join(os.environ["LIVEPATCH_STATE_DIR"], "inventory")


def _records():
    path = os.path.join(_state_dir(), "applied.json")
    return json.load(open(path)) if os.path.exists(path) else []


def _file_history():
    path = os.path.join(_state_dir(), "history.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _json(*args):
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def _stderr(svc):
    svc.stop()
    return svc.proc.stderr.read().decode()


def _apply_and_stop(inventory, docs_bundle):
    svc = inventory()
    assert svc.get(SECRET)[0] == 200
    r = cli("apply", str(svc.pid), docs_bundle)
    assert r.returncode == 0, r.stderr
    assert svc.get(SECRET)[0] == 404
    svc.stop()
    assert [r["id"] for r in _records()] == ["HP-DOCS"]
    return svc


# ---------------------------------------------------------------- restarts

def test_apply_is_recorded_and_in_effect_on_the_first_request_after_a_restart(inventory, docs_bundle):
    svc, other = inventory(), inventory()  # two processes of one service
    assert svc.get(SECRET)[0] == 200
    assert cli("apply", str(svc.pid), docs_bundle).returncode == 0

    state = _state_dir()
    assert os.stat(state).st_mode & 0o777 == 0o700
    [rec] = _records()
    assert rec["id"] == "HP-DOCS" and rec["classification"] == "security" and rec["pid"] == svc.pid
    assert rec["baseline"] == {"name": "inventory", "version": "1.0"}
    kept = os.path.join(state, "bundles", rec["file"])
    assert open(kept, "rb").read() == open(docs_bundle, "rb").read()
    assert os.stat(kept).st_mode & 0o777 == 0o600
    assert [(h["action"], h["patch"], h["outcome"], h["pid"], h["classification"]) for h in _file_history()] == \
        [("apply", "HP-DOCS", "ok", svc.pid, "security")]
    status = _json("status", str(svc.pid))
    assert status["state_dir"] == state and [r["id"] for r in status["recorded"]] == ["HP-DOCS"]

    # the same bundle applied to the other process: still one record
    assert cli("apply", str(other.pid), docs_bundle).returncode == 0
    assert [r["id"] for r in _records()] == ["HP-DOCS"]
    other.stop()
    svc.stop()

    again = inventory()
    assert again.get(SECRET)[0] == 404  # the very first request already runs the fix
    assert again.get("/docs?name=widget.txt")[0] == 200
    assert [p["id"] for p in _json("status", str(again.pid))["applied"]] == ["HP-DOCS"]
    history = _json("history", str(again.pid))
    seen = [(h["action"], h["outcome"], h["pid"]) for h in history if h["action"] in ("apply", "reapply")]
    assert ("apply", "ok", svc.pid) in seen and ("reapply", "ok", again.pid) in seen, history

    # rollback in one process forgets the record and the kept bytes
    assert cli("rollback", str(again.pid)).returncode == 0
    assert _records() == [] and os.listdir(os.path.join(state, "bundles")) == []
    assert ("rollback", "ok", again.pid) in [(h["action"], h["outcome"], h["pid"]) for h in _file_history()]
    again.stop()
    fresh = inventory()
    assert fresh.get(SECRET)[0] == 200  # vulnerable again, as rolled back
    assert _json("status", str(fresh.pid))["applied"] == []


def test_a_changed_release_retires_the_record_and_runs_unpatched(inventory, docs_bundle, tmp_path):
    _apply_and_stop(inventory, docs_bundle)
    release = tmp_path / "release-1.1"
    shutil.copytree(DEMO, release, ignore=shutil.ignore_patterns("patches", "__pycache__"))
    files = release / "inventory" / "files.py"
    source = files.read_text()
    files.write_text(source.replace('return os.path.join(DATA_DIR, "docs", name)',
                                    'return os.path.join(DATA_DIR, "docs", str(name))', 1))
    assert files.read_text() != source

    svc = inventory(cwd=str(release))
    assert svc.get("/health")[0] == 200 and svc.get("/docs?name=widget.txt")[0] == 200
    assert svc.get(SECRET)[0] == 200  # the new release's own code runs: nothing applied to it
    assert _records() == []
    assert os.listdir(os.path.join(_state_dir(), "retired")) and not os.listdir(os.path.join(_state_dir(), "bundles"))
    [retired] = [h for h in _json("history", str(svc.pid)) if h["action"] == "retire"]
    assert retired["patch"] == "HP-DOCS" and retired["pid"] == svc.pid
    assert "BaselineMismatch" in retired["reason"] and "inventory.files" in retired["reason"], retired
    log = _stderr(svc)
    assert "livepatch: retired HP-DOCS (security)" in log and "Traceback" not in log, log

    # and it stays retired: the next start applies nothing and writes no new entry
    before = len(_file_history())
    again = inventory(cwd=str(release))
    assert again.get(SECRET)[0] == 200
    assert len([h for h in _file_history()[before:] if h["action"] in ("retire", "reapply")]) == 0


@pytest.mark.parametrize("how", ["flipped byte", "flipped byte and recorded digest"])
def test_a_tampered_bundle_in_the_state_dir_is_retired_not_applied(inventory, docs_bundle, how):
    _apply_and_stop(inventory, docs_bundle)
    [rec] = _records()
    kept = os.path.join(_state_dir(), "bundles", rec["file"])
    data = bytearray(open(kept, "rb").read())
    data[len(data) // 2] ^= 0x40
    with open(kept, "wb") as fh:
        fh.write(bytes(data))
    if how != "flipped byte":
        import hashlib
        rec["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        with open(os.path.join(_state_dir(), "applied.json"), "w") as fh:
            json.dump([rec], fh)

    svc = inventory()
    assert svc.get(SECRET)[0] == 200 and svc.get("/health")[0] == 200
    assert _json("status", str(svc.pid))["applied"] == []
    assert _records() == []
    [retired] = [h for h in _json("history", str(svc.pid)) if h["action"] == "retire"]
    expected = "does not match its recorded SHA-256" if how == "flipped byte" else "failed verification: BundleError"
    assert expected in retired["reason"], retired


def test_a_bundle_no_longer_trusted_is_retired(inventory, docs_bundle, tmp_path):
    _apply_and_stop(inventory, docs_bundle)
    other = tmp_path / "other-keys"
    other.mkdir()
    assert cli("keygen", str(other / "k")).returncode == 0
    os.unlink(other / "k.key")
    svc = Service(tmp_path, DEMO, ["-m", "inventory.server"],
                  launcher=[sys.executable, "-m", "livepatch", "run", "--name", "inventory", "--trust", str(other), "--"])
    try:
        assert svc.get(SECRET)[0] == 200
        [retired] = [h for h in _json("history", str(svc.pid)) if h["action"] == "retire"]
        assert "SignatureError" in retired["reason"], retired
    finally:
        svc.stop()


# ---------------------------------------------------------------- unsafe directories

def _plant(kind, root):
    target = os.path.join(root, "inventory")
    if kind == "group-writable":
        os.mkdir(target, 0o700)
        os.chmod(target, 0o770)
        return "has mode 770"
    if kind == "symlink":
        real = os.path.join(root, "elsewhere")
        os.mkdir(real, 0o700)
        os.symlink(real, target)
        return "is a symlink"
    if kind == "other owner":
        if os.getuid() != 0:
            pytest.skip("needs root to create a directory owned by another user")
        os.mkdir(target, 0o700)
        os.chown(target, 65534, 65534)
        return "owned by uid 65534"
    if kind == "open parent":
        os.chmod(root, 0o777)
        return "writable by others without the sticky bit"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["group-writable", "symlink", "other owner", "open parent"])
def test_an_unsafe_state_dir_is_refused_with_one_line_and_the_service_starts(inventory, docs_bundle, kind):
    expected = _plant(kind, os.environ["LIVEPATCH_STATE_DIR"])
    svc = inventory()
    assert svc.get("/health")[0] == 200
    assert cli("apply", str(svc.pid), docs_bundle).returncode == 0  # patching still works, in memory only
    assert svc.get(SECRET)[0] == 404
    status = _json("status", str(svc.pid))
    assert status["state_dir"] is None and status["recorded"] == []
    log = _stderr(svc)
    lines = [line for line in log.splitlines() if line.startswith("livepatch:")]
    assert len(lines) == 1 and "not keeping patches across restarts" in lines[0] and expected in lines[0], log
    assert "Traceback" not in log
    if kind == "symlink":
        assert os.listdir(os.path.join(os.environ["LIVEPATCH_STATE_DIR"], "elsewhere")) == []


# ---------------------------------------------------------------- the files themselves

def _state(tmp_path, name="svc"):
    from livepatch.agent.state import State
    from livepatch.agent.state_dir import location
    return State(location(name, str(tmp_path / "root")))


def test_names_cannot_leave_the_root(tmp_path):
    from livepatch.agent.state_dir import UnsafeState, location
    for bad in ("../etc", "a/b", "..", "a..b", "", "-c", ".hidden", "x" * 65, "a\nb", "inventory\n", "é"):
        with pytest.raises(UnsafeState):
            location(bad, str(tmp_path))
    assert location("inventory.api_2", str(tmp_path)) == str(tmp_path / "inventory.api_2")


def test_an_agent_whose_name_cannot_name_a_directory_keeps_no_state(tmp_path, caplog):
    import types
    from livepatch.agent import state
    root = tmp_path / "root"
    with caplog.at_level("WARNING", logger="livepatch"):
        assert state.open_for(types.SimpleNamespace(name="../evil", state_dir=str(root))) is None
    [line] = [r.getMessage() for r in caplog.records]
    assert "not keeping patches across restarts" in line and "'../evil' cannot name a state directory" in line
    assert not (tmp_path / "evil").exists()


def test_history_is_pruned_to_the_configured_age(tmp_path, monkeypatch):
    from livepatch.agent.history_file import now_iso
    s = _state(tmp_path)
    now = time.time()
    for days in (45, 31, 20, 2, 0):
        s.append({"time": now_iso(now - days * 86400), "action": "apply", "patch": f"HP-{days}"})
    assert s.prune() == 2
    assert [h["patch"] for h in s.history()] == ["HP-20", "HP-2", "HP-0"]
    assert s.prune() == 0  # nothing old: only the first line is read
    monkeypatch.setenv("LIVEPATCH_HISTORY_DAYS", "1")
    assert s.prune() == 2 and [h["patch"] for h in s.history()] == ["HP-0"]


def test_an_oversized_history_keeps_its_newest_half(tmp_path, monkeypatch):
    from livepatch.agent import history_file
    monkeypatch.setattr(history_file, "HISTORY_MAX_BYTES", 20_000)
    s = _state(tmp_path)
    for i in range(400):
        s.append({"time": history_file.now_iso(), "action": "import", "patch": f"HP-{i}", "padding": "x" * 60})
    history = s.history()
    assert os.path.getsize(os.path.join(s.path, "history.jsonl")) <= 20_000
    assert history[-1]["patch"] == "HP-399" and 50 < len(history) < 400
    numbers = [int(h["patch"][3:]) for h in history]
    assert numbers == list(range(numbers[0], 400))  # whole lines, newest kept, none lost in between


def test_old_history_is_pruned_when_a_service_starts(inventory, tmp_path):
    from livepatch.agent.history_file import now_iso
    os.makedirs(_state_dir(), mode=0o700)
    with open(os.path.join(_state_dir(), "history.jsonl"), "w") as fh:
        for days in (40, 3):
            fh.write(json.dumps({"time": now_iso(time.time() - days * 86400), "pid": 1, "action": "apply",
                                 "patch": f"HP-{days}", "outcome": "ok"}) + "\n")
    svc = inventory()
    assert [h["patch"] for h in _json("history", str(svc.pid))] == ["HP-3"]


def test_corrupt_files_are_one_log_line_and_empty(tmp_path, caplog):
    s = _state(tmp_path)
    os.makedirs(s.path, mode=0o700)
    with open(os.path.join(s.path, "applied.json"), "w") as fh:
        fh.write('[{"id": "HP-1", "file": "HP-1')  # truncated
    with open(os.path.join(s.path, "history.jsonl"), "w") as fh:
        fh.write('{"action": "apply", "patch": "HP-1"}\n{"action": "rollb\n')
    with caplog.at_level("WARNING", logger="livepatch"):
        assert s.records() == [] and s.records() == []
        assert [h["patch"] for h in s.history()] == ["HP-1"]
        s.history()
    assert len([r for r in caplog.records if "applied.json is corrupt" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "unreadable line" in r.getMessage()]) == 1
    # a record naming a path outside bundles/ is never followed
    with open(os.path.join(s.path, "applied.json"), "w") as fh:
        json.dump([{"id": "HP-1", "file": "../../etc/passwd", "sha256": "0" * 64}], fh)
    assert s.records() == []


def test_recording_is_idempotent_and_rollback_forgets(tmp_path):
    s = _state(tmp_path)
    manifest = {"id": "HP-1", "classification": "bugfix", "baseline": {"name": "a", "version": "1"}}
    first = s.record(b"bundle one", manifest)
    assert s.record(b"bundle one", manifest) == first and len(s.records()) == 1
    two = s.record(b"bundle two", {**manifest, "id": "HP-2"})
    rebuilt = s.record(b"bundle one, rebuilt", manifest)  # a new build of HP-1 replaces it in place
    assert [(r["id"], r["sha256"]) for r in s.records()] == [("HP-1", rebuilt["sha256"]), ("HP-2", two["sha256"])]
    assert sorted(os.listdir(os.path.join(s.path, "bundles"))) == sorted([rebuilt["file"], two["file"]])
    assert s.remove(["HP-1"]) == ["HP-1"] and s.remove(["HP-1"]) == []
    assert [r["id"] for r in s.records()] == ["HP-2"]
    assert s.retire("HP-2", "test") is not None and s.retire("HP-2", "test") is None
    assert s.records() == [] and os.listdir(os.path.join(s.path, "retired")) == [two["file"]]
    assert [(h["action"], h["patch"], h["reason"]) for h in s.history()] == [("retire", "HP-2", "test")]


def test_writers_in_several_processes_are_serialised(tmp_path):
    """Four processes append history and record the same bundle at once:
    every line arrives whole, and the bundle is recorded once."""
    root = str(tmp_path / "root")
    script = textwrap.dedent(f"""
        import sys
        from livepatch.agent import state
        from livepatch.agent.history_file import now_iso
        from livepatch.agent.state_dir import location
        s = state.State(location("svc", {root!r}))
        for i in range(200):
            s.append({{"time": now_iso(), "action": "apply", "patch": "HP-%s-%d" % (sys.argv[1], i),
                      "padding": "x" * 3000}})
            if i % 20 == 0:
                s.record(b"the same bundle", {{"id": "HP-SAME", "classification": "bugfix"}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    s = _state(tmp_path)
    history = s.history()
    assert len(history) == 800 and len({h["patch"] for h in history}) == 800
    assert [r["id"] for r in s.records()] == ["HP-SAME"]


@pytest.fixture(scope="module")
def cumulative_bundle(keys, tmp_path_factory):
    """The documents fix plus a change to the report in one cumulative
    bundle (replaces HP-DOCS)."""
    d = tmp_path_factory.mktemp("cumulative")
    shutil.copytree(os.path.join(PATCHES, "fix-path-traversal"), d / "both")
    pricing = d / "both" / "inventory" / "pricing.py"
    pricing.write_text(pricing.read_text().replace("lines += 1", "lines += 2", 1))
    path = str(d / "all.lpb")
    r = cli("build", os.path.join(PATCHES, "baseline"), str(d / "both"), "-o", path, "--id", "HP-ALL", "--cumulative",
            "--sequence", "2", "--key", keys["key"], "--name", "inventory", "--version", "1.0", "--classification", "bugfix")
    assert r.returncode == 0, r.stderr
    return path


def test_a_forked_child_does_not_apply_again_what_it_inherited(inventory, docs_bundle, cumulative_bundle, keys):
    """The parent re-applies HP-DOCS, then the cumulative HP-ALL that replaces
    it; the child holds both already (HP-DOCS as replaced), applies nothing and
    retires nothing."""
    svc = inventory()
    assert cli("apply", str(svc.pid), docs_bundle).returncode == 0
    r = cli("apply", str(svc.pid), cumulative_bundle)
    assert r.returncode == 0, r.stderr
    svc.stop()
    assert [r["id"] for r in _records()] == ["HP-DOCS", "HP-ALL"]
    script = textwrap.dedent("""
        import json, os, sys
        import livepatch, livepatch.agent
        livepatch.agent.start(name="inventory", trust=sys.argv[1])
        import inventory.files, inventory.pricing
        parent = livepatch.engine.applied_ids()
        pid = os.fork()
        if pid == 0:
            import livepatch.agent as a
            a.start()
            ok = inventory.files.document_path("../private/secrets.txt") is None
            os.write(1, json.dumps({"child": os.getpid(), "applied": livepatch.engine.applied_ids(), "fixed": ok,
                                    "report": inventory.pricing.build_report.__code__.co_consts}, default=repr).encode()
                     + b"\\n")
            os._exit(0)
        os.waitpid(pid, 0)
        print(json.dumps({"parent": os.getpid(), "applied": parent}))
    """)
    r = subprocess.run([sys.executable, "-c", script, keys["trust"]], cwd=DEMO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    child, parent = [json.loads(line) for line in r.stdout.splitlines()]
    assert parent["applied"] == ["HP-ALL"] and child["applied"] == ["HP-ALL"], (parent, child)
    assert child["fixed"] and 2 in child["report"] and 1 not in child["report"]  # lines += 2: HP-ALL runs
    history = _file_history()
    assert [(h["patch"], h["pid"]) for h in history if h["action"] == "reapply"] == \
        [("HP-DOCS", parent["parent"]), ("HP-ALL", parent["parent"])], history
    assert not [h for h in history if h["action"] == "retire"] and len(_records()) == 2


def test_the_service_log_gets_one_line_per_event(tmp_path, keys, docs_bundle):
    """A service that sets up logging itself (after the agent started) gets
    the agent's lines in its own log, the re-apply at start included."""
    program = ["-c", "import logging, runpy\n"
                     "logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')\n"
                     "runpy.run_module('inventory.server', run_name='__main__')"]
    launcher = [sys.executable, "-m", "livepatch", "run", "--name", "inventory", "--trust", keys["trust"], "--"]
    svc = Service(tmp_path, DEMO, program, launcher=launcher)
    try:
        assert cli("apply", str(svc.pid), docs_bundle).returncode == 0
    finally:
        first = _stderr(svc)
    svc = Service(tmp_path, DEMO, program, launcher=launcher)
    try:
        assert svc.get(SECRET)[0] == 404
        assert cli("rollback", str(svc.pid)).returncode == 0
    finally:
        second = _stderr(svc)
    lines = [line for line in (first + second).splitlines() if line.startswith("livepatch ")]
    assert len(lines) == 4, first + second
    assert lines[0].startswith("livepatch INFO livepatch: applied HP-DOCS (security) to 2 targets, pause ")
    assert lines[1] == "livepatch INFO livepatch: re-applied HP-DOCS (security); 1 module pending: inventory.files"
    assert lines[2] == "livepatch INFO livepatch: applied HP-DOCS (security) to inventory.files on import (2 targets)"
    assert lines[3].startswith("livepatch INFO livepatch: rolled back HP-DOCS (security) from 2 targets, pause ")


def test_nothing_is_written_until_there_is_something_to_keep(tmp_path):
    s = _state(tmp_path)
    assert not os.path.exists(s.path) and s.records() == [] and s.history() == [] and s.prune() == 0
    s.append({"time": "2026-01-01T00:00:00.000+00:00", "action": "apply"})
    assert sorted(os.listdir(s.path)) == [".lock", "bundles", "history.jsonl", "retired"]
    assert all(os.stat(os.path.join(s.path, d)).st_mode & 0o777 == 0o700 for d in ("", "bundles", "retired"))


@pytest.fixture(scope="module")
def rounding_bundle(keys, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rounding") / "rounding.lpb")
    r = cli("build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-rounding"), "-o", path,
            "--id", "HP-ROUND", "--key", keys["key"], "--name", "inventory", "--version", "1.0", "--classification", "bugfix")
    assert r.returncode == 0, r.stderr
    return path


def _apply_rounding_and_restart(inventory, rounding_bundle):
    svc = inventory()
    assert svc.get("/quote?sku=widget&qty=1")[1]["total"] == 2.67
    assert cli("apply", str(svc.pid), rounding_bundle).returncode == 0
    svc.stop()
    return inventory()


def test_a_fix_with_new_globals_is_reapplied_when_its_module_is_imported(inventory, rounding_bundle):
    """Its values (here an import) are made when the module's part commits."""
    again = _apply_rounding_and_restart(inventory, rounding_bundle)
    assert again.get("/quote?sku=widget&qty=1")[1]["total"] == 2.68  # the first request
    assert [r["id"] for r in _records()] == ["HP-ROUND"]
    assert not [h for h in _file_history() if h["action"] == "retire"]


def test_log_lines_name_the_event_the_patch_and_why():
    from livepatch.agent.log import describe, level_of
    cases = [
        ({"action": "apply", "patch": "HP-1", "outcome": "ok", "targets": ["m:a", "m:b"], "pause_ns": 12_000,
          "pending": {"inventory.files": ["inventory.files:f"]}}, "security",
         "livepatch: applied HP-1 (security) to 2 targets, pause 12.0 µs; 1 module pending: inventory.files", "INFO"),
        ({"action": "apply", "patch": "HP-1", "outcome": "refused", "error": "BaselineMismatch",
          "reason": "baseline does not match the running code (1 problem)\n  - m:f: expected ..."}, None,
         "livepatch: refused to apply HP-1: BaselineMismatch: baseline does not match the running code (1 problem)",
         "WARNING"),
        ({"action": "import", "patch": "HP-1", "outcome": "refused", "error": "BaselineMismatch", "module": "m",
          "reason": "no"}, "bugfix", "livepatch: refused to apply HP-1 (bugfix) to m on import: BaselineMismatch: no",
         "WARNING"),
        ({"action": "rollback", "patch": "HP-1", "outcome": "failed", "error": "CommitFailed", "reason": "store"}, None,
         "livepatch: failed to roll back HP-1: CommitFailed: store", "ERROR"),
        ({"action": "rollback", "patch": "HP-1", "outcome": "ok", "targets": ["m:a"], "pause_ns": 5_000}, None,
         "livepatch: rolled back HP-1 from 1 target, pause 5.0 µs", "INFO"),
        ({"action": "retire", "patch": "HP-1", "outcome": "ok", "reason": "new release"}, "security",
         "livepatch: retired HP-1 (security): new release; it will not be applied again", "WARNING"),
    ]
    for entry, classification, line, level in cases:
        assert describe(entry, classification) == line
        assert __import__("logging").getLevelName(level_of(entry)) == level


def test_a_mismatch_found_at_start_retires_the_record(inventory, docs_bundle, keys, tmp_path):
    """The agent starts after the (changed) module was imported, as with an
    in-code start or an attach: the engine refuses at once, the record goes."""
    _apply_and_stop(inventory, docs_bundle)
    release = tmp_path / "release-1.1"
    shutil.copytree(DEMO, release, ignore=shutil.ignore_patterns("patches", "__pycache__"))
    files = release / "inventory" / "files.py"
    files.write_text(files.read_text().replace("if not os.path.isfile(path):", "if not path or not os.path.isfile(path):"))
    script = ("import sys, json, inventory.files, livepatch, livepatch.agent\n"
              "livepatch.agent.start(name='inventory', trust=sys.argv[1])\n"
              "print(json.dumps(livepatch.engine.applied_ids()))\n")
    r = subprocess.run([sys.executable, "-c", script, keys["trust"]], cwd=release, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    assert _records() == []
    [retired] = [h for h in _file_history() if h["action"] == "retire"]
    assert "does not apply to the code running here (BaselineMismatch)" in retired["reason"], retired
    assert "livepatch: retired HP-DOCS (security)" in r.stderr and "Traceback" not in r.stderr


def test_a_child_forked_while_a_thread_holds_the_lock_can_write(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        from livepatch.agent import state
        from livepatch.agent.history_file import now_iso
        from livepatch.agent.state_dir import location
        s = state.State(location("svc", {str(tmp_path / "root")!r}))
        held, go = threading.Event(), threading.Event()
        def hold():
            with s.locked():
                held.set()
                go.wait()
        t = threading.Thread(target=hold)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # never outlives a failed test
            s.append({{"time": now_iso(), "action": "apply", "patch": "HP-CHILD"}})
            os._exit(0)
        time.sleep(0.2)
        go.set()
        t.join()
        s.append({{"time": now_iso(), "action": "apply", "patch": "HP-PARENT"}})
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert sorted(h["patch"] for h in _state(tmp_path).history()) == ["HP-CHILD", "HP-PARENT"]


def test_log_lines_of_rejected_and_cancelled_requests():
    """A bundle that never verified is named by its digest (its id is not to
    be trusted); a cancelled apply says nothing changed."""
    from livepatch.agent import log
    rejected = {"action": "apply", "patch": "", "outcome": "rejected", "error": "SignatureError",
                "reason": "bundle is signed by an untrusted key", "bundle_sha256": "ab" * 32}
    assert log.describe(rejected) == ("livepatch: rejected a bundle (sha256 abababababababab) sent to apply: "
                                      "SignatureError: bundle is signed by an untrusted key")
    assert log.level_of(rejected) == logging.WARNING
    cancelled = {"action": "apply", "patch": "HP-1", "outcome": "cancelled", "error": "Cancelled"}
    assert log.describe(cancelled, "security") == (
        "livepatch: cancelled the apply of HP-1 (security) (its client went away); nothing was changed")
