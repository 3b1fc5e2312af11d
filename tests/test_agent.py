"""The agent and the CLI against real processes: the inventory HTTP service
under load, attached by PID (pyinjector and the gdb fallback) or started
with `livepatch run`, patched and rolled back with zero failed requests;
every refusal path; hostile clients of the control channel."""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")
SECRET = "/docs?name=../private/secrets.txt"


from live import Service, cli


@pytest.fixture(scope="module")
def bundles(keys, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, fix in (("docs", "fix-path-traversal"), ("rounding", "fix-rounding")):
        path = str(d / f"{name}.lpb")
        r = cli("build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, fix), "-o", path,
                "--id", f"HP-{name.upper()}", "--key", keys["key"], "--name", "inventory", "--version", "1.0",
                "--classification", "security")
        assert r.returncode == 0, r.stderr
        out[name] = path
    return out


@pytest.fixture
def service(tmp_path):
    made = []

    def make(**kw):
        s = Service(tmp_path, DEMO, ["-m", "inventory.server"], **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def _apply_and_roll_back(svc, bundles):
    assert svc.get(SECRET)[0] == 200  # the vulnerable baseline serves the secret
    r = cli("apply", str(svc.pid), bundles["docs"], "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["patch_id"] == "HP-DOCS" and result["pause_ns"] > 0 and result["signed_by"]
    assert svc.get(SECRET)[0] == 404
    assert svc.get("/docs?name=widget.txt")[0] == 200
    status = json.loads(cli("status", str(svc.pid), "--json").stdout)
    assert [p["id"] for p in status["applied"]] == ["HP-DOCS"]
    # the bundle's claim stays with the patch; the process's baseline is what it runs (nothing declared here)
    assert status["applied"][0]["metadata"]["baseline"] == {"name": "inventory", "version": "1.0"}
    assert status["baseline"] == {"name": status["agent"]["name"], "version": None, "source": "unknown"}
    r = cli("rollback", str(svc.pid), "--json")
    assert r.returncode == 0, r.stderr
    assert svc.get(SECRET)[0] == 200
    history = json.loads(cli("history", str(svc.pid), "--json").stdout)
    assert [(h["action"], h["outcome"]) for h in history] == [("apply", "ok"), ("rollback", "ok")]
    return result


def _gdb_cannot_call() -> str | None:
    """Why gdb cannot call a function inside a process on this machine, or
    None if it can. Some gdb and kernel pairs fail every inferior call
    ("Couldn't write extended state status: Bad address"): an environment
    limit, not livepatch's, which the gdb path then reports as its error."""
    if shutil.which("gdb") is None:
        return "gdb is not installed"
    probe = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"])
    try:
        time.sleep(0.3)
        r = subprocess.run(["gdb", "-p", str(probe.pid), "-batch", "-ex", "call (int)getpid()"],
                           capture_output=True, text=True, timeout=60)
        if f"= {probe.pid}" in r.stdout:
            return None
        return "gdb cannot call functions in a process here: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    finally:
        probe.kill()
        probe.wait()


@pytest.mark.parametrize("method", ["pyinjector", "gdb"])
def test_attach_by_pid_apply_and_roll_back_under_load(service, bundles, keys, method):
    if method == "gdb" and (why := _gdb_cannot_call()):
        pytest.skip(why)
    svc = service().start_load()
    time.sleep(0.3)
    r = cli("attach", str(svc.pid), "--trust", keys["trust"], "--method", method, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["method"] == method and info["stop_ms"] > 0
    _apply_and_roll_back(svc, bundles)
    svc.stop()
    assert svc.failed == 0, svc.errors[:5]
    assert svc.served > 20


def test_run_launcher_apply_and_roll_back_under_load(service, bundles, keys):
    svc = service(launcher=[sys.executable, "-m", "livepatch.cli", "run", "--name", "inventory", "--trust",
                            keys["trust"], "--"]).start_load()
    listed = json.loads(cli("ps", "--json").stdout)
    assert any(row["pid"] == svc.pid and row["name"] == "inventory" for row in listed)
    _apply_and_roll_back(svc, bundles)
    svc.stop()
    assert svc.failed == 0, svc.errors[:5]


def test_run_keeps_argv_and_main_semantics(tmp_path):
    app = tmp_path / "app.py"
    app.write_text("import sys, json, os, livepatch.agent\n"
                   "class Point: pass\n"
                   "import pickle\n"
                   "print(json.dumps({'argv': sys.argv, 'name': __name__, 'path0': sys.path[0],\n"
                   "  'main_is_me': sys.modules['__main__'].Point is Point,\n"
                   "  'agent': livepatch.agent.socket_path() is not None, 'pickle': len(pickle.dumps(Point())) > 0}))\n")
    r = cli("run", "--", sys.executable, str(app), "a", "--flag")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"argv": [str(app), "a", "--flag"], "name": "__main__", "path0": str(tmp_path),
                   "main_is_me": True, "agent": True, "pickle": True}


def test_in_code_start_is_idempotent_and_leaves_the_service_own_agent_module(tmp_path):
    (tmp_path / "agent.py").write_text("WHO = 'the service'\n")
    code = ("import livepatch.agent, agent\n"
            "a = livepatch.agent.start(); b = livepatch.agent.start()\n"
            "import os\n"
            "print(a == b, os.path.exists(a), agent.WHO, oct(os.stat(a).st_mode & 0o777), oct(os.stat(os.path.dirname(a)).st_mode & 0o777))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "the", "service", "0o600", "0o700"]


# ---------------------------------------------------------------- refusals

def test_refusals_wrong_baseline_busy_target_and_tampered_bundle(service, bundles, keys, tmp_path):
    svc = service(launcher=[sys.executable, "-m", "livepatch.cli", "run", "--trust", keys["trust"], "--"])
    # built against a release whose documents code differs from what runs
    other = tmp_path / "other"
    shutil.copytree(os.path.join(PATCHES, "fix-path-traversal"), other / "base")
    shutil.copytree(os.path.join(PATCHES, "fix-path-traversal"), other / "new")
    f = other / "new" / "inventory" / "files.py"
    f.write_text(f.read_text().replace('    docs = os.path', '    name = name.strip()\n    docs = os.path', 1))
    wrong = str(tmp_path / "wrong.lpb")
    r = cli("build", str(other / "base"), str(other / "new"), "-o", wrong, "--id", "HP-WRONG", "--key", keys["key"])
    assert r.returncode == 0, r.stderr
    r = cli("apply", str(svc.pid), wrong)
    assert r.returncode == 3 and "BaselineMismatch" in r.stderr and "inventory.files:document_path" in r.stderr

    # a request holds pricing.build_report on a thread's stack
    slow = tmp_path / "slow"
    shutil.copytree(os.path.join(PATCHES, "baseline"), slow / "base", symlinks=False)
    shutil.copytree(os.path.join(PATCHES, "baseline"), slow / "new", symlinks=False)
    p = slow / "new" / "inventory" / "pricing.py"
    p.write_text(p.read_text().replace("lines += 1", "lines += 2"))
    busy = str(tmp_path / "busy.lpb")
    assert cli("build", str(slow / "base"), str(slow / "new"), "-o", busy, "--id", "HP-BUSY", "--key", keys["key"]).returncode == 0
    t = threading.Thread(target=svc.get, args=("/report?seconds=6",))
    t.start()
    time.sleep(0.5)
    r = cli("apply", str(svc.pid), busy, "--timeout", "1")
    t.join()
    assert r.returncode == 3, r.stderr
    assert "TargetBusy" in r.stderr and "build_report" in r.stderr and "Thread" in r.stderr and "pricing.py" in r.stderr

    data = bytearray(open(bundles["docs"], "rb").read())
    data[len(data) // 2] ^= 0x40
    tampered = tmp_path / "tampered.lpb"
    tampered.write_bytes(bytes(data))
    r = cli("apply", str(svc.pid), str(tampered))
    assert r.returncode == 4, r.stderr
    assessed = json.loads(cli("assess", str(svc.pid), bundles["docs"], str(tampered), wrong, "--json").stdout)
    assert [a["verdict"] for a in assessed] == ["applies", "refused", "refused"]
    assert svc.get(SECRET)[0] == 200  # nothing was applied by any of it
    status = json.loads(cli("status", str(svc.pid), "--json").stdout)
    assert status["applied"] == [] and not status["agent"]["development_mode_unsigned_bundles"]


def test_unsigned_bundle_refused_unless_development_mode(service, tmp_path):
    unsigned = str(tmp_path / "unsigned.lpb")
    assert cli("build", os.path.join(PATCHES, "baseline"), os.path.join(PATCHES, "fix-rounding"), "-o", unsigned,
               "--id", "HP-U").returncode == 0
    strict = service(launcher=[sys.executable, "-m", "livepatch.cli", "run", "--"])
    r = cli("apply", str(strict.pid), unsigned)
    assert r.returncode == 4 and "not signed" in r.stderr
    dev = service(launcher=[sys.executable, "-m", "livepatch.cli", "run", "--allow-unsigned", "--"])
    assert dev.get("/quote?sku=widget&qty=1")[1]["total"] == 2.67
    assert cli("apply", str(dev.pid), unsigned).returncode == 0
    assert dev.get("/quote?sku=widget&qty=1")[1]["total"] == 2.68
    assert json.loads(cli("status", str(dev.pid), "--json").stdout)["agent"]["development_mode_unsigned_bundles"]


def test_dead_pid_and_non_python_pid(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    r = cli("status", str(dead.pid))
    assert r.returncode == 5 and "no process" in r.stderr
    r = cli("attach", str(dead.pid))
    assert r.returncode == 5
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        r = cli("attach", str(sleeper.pid))
        assert r.returncode == 5 and "not a CPython interpreter" in r.stderr
        r = cli("status", str(sleeper.pid))
        assert r.returncode == 5 and "has no livepatch agent" in r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_attach_to_a_process_that_cannot_import_livepatch_says_how_to_fix_it():
    """The interpreter this venv was made from, isolated (-I: no PYTHONPATH,
    no user site), has no livepatch: the attach explains what to do and the
    process goes on unharmed."""
    base = sys._base_executable
    if subprocess.run([base, "-I", "-c", "import livepatch"], capture_output=True).returncode == 0:
        pytest.skip(f"livepatch is importable by {base} itself")
    target = subprocess.Popen([base, "-I", "-c", "import time\nwhile True:\n    time.sleep(0.02)"])
    try:
        time.sleep(0.3)
        r = cli("attach", str(target.pid))
        assert r.returncode == 1, r.stderr  # an attach error, not a missing process
        assert f"livepatch is not importable in process {target.pid}" in r.stderr and "PYTHONPATH=" in r.stderr
        assert target.poll() is None  # still running
    finally:
        target.kill()
        target.wait()


OTHER_UID_CLIENT = r"""
import socket, struct, json, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError as exc:
    print(json.dumps({"connect": "refused", "why": str(exc)})); sys.exit()
body = json.dumps({"v": 1, "op": "status"}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
data = b"".join(iter(lambda: s.recv(65536), b""))  # the agent answers, then hangs up
n = struct.unpack(">I", data[:4])[0]
print(json.dumps({"connect": "ok", "answer": json.loads(data[4:4 + n])}))
"""


def _python_for_nobody():
    """An interpreter uid 65534 can run (ours may live under a 0700 home)."""
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        ok = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", "pass"],
                            capture_output=True)
        if ok.returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to switch uid")
def test_clients_of_another_uid_are_refused(service):
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no interpreter runnable by uid 65534")
    svc = service(launcher=[sys.executable, "-m", "livepatch.cli", "run", "--"])
    path = json.loads(cli("status", str(svc.pid), "--json").stdout)["agent"]["socket"]
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run([*nobody, python, "-c", OTHER_UID_CLIENT, path], capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["connect"] == "refused", r.stderr  # the 0700 directory stops it
    # even with the directory check bypassed (CAP_DAC_OVERRIDE), the agent's SO_PEERCRED check refuses
    r = subprocess.run([*nobody, "--inh-caps=+dac_override", "--ambient-caps=+dac_override", python, "-c",
                        OTHER_UID_CLIENT, path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["connect"] == "ok" and out["answer"]["ok"] is False
    assert out["answer"]["error"]["error"] == "PermissionDenied" and "uid 65534" in out["answer"]["error"]["message"]


def test_garbage_stalled_and_vanishing_clients_do_not_hurt_the_agent(service):
    svc = service(launcher=[sys.executable, "-m", "livepatch.cli", "run", "--"])
    path = json.loads(cli("status", str(svc.pid), "--json").stdout)["agent"]["socket"]

    def raw(payload, read=True):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(path)
        s.sendall(payload)
        if not read:
            return s
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        s.close()
        return json.loads(data[4:]) if data else None

    assert raw(struct.pack(">I", 5) + b"hello")["error"]["error"] == "ProtocolError"
    assert "over the limit" in raw(struct.pack(">I", 2**31))["error"]["message"]
    assert raw(struct.pack(">I", 2) + b"[]")["error"]["message"] == "frame is not a JSON object"
    body = json.dumps({"v": 1, "op": "format_disk"}).encode()
    assert "unknown request" in raw(struct.pack(">I", len(body)) + body)["error"]["message"]
    body = json.dumps({"v": 1, "op": "apply", "bundle": "!!!"}).encode()
    assert "base64" in raw(struct.pack(">I", len(body)) + body)["error"]["message"]
    stalled = [raw(struct.pack(">I", 1000) + b"{", read=False) for _ in range(3)]  # half a frame, then silence
    vanished = raw(struct.pack(">I", 1000) + b"{", read=False)
    vanished.close()
    r = cli("status", str(svc.pid), "--json")  # still answers while three clients stall
    assert r.returncode == 0 and json.loads(r.stdout)["applied"] == []
    for s in stalled:
        s.close()
    assert svc.get("/health")[0] == 200


AGENT_FOOTPRINT = """
import sys, tempfile
sys.modules.pop("tempfile")  # imported above only to ask where it would put files
from livepatch.agent import runtime_dir
import livepatch.agent as agent
agent.start()
print(runtime_dir._temp_root() == tempfile.gettempdir(), "tempfile" in sys.modules)
agent.stop()
"""


@pytest.mark.parametrize("tmpdir_env", ["unset", "writable", "missing"])
def test_agent_finds_the_temporary_directory_without_importing_tempfile(tmpdir_env, tmp_path):
    """The socket directory's fallback sits where tempfile would put it (the
    CLI and the agent must agree), but the agent does not pull tempfile,
    shutil, random, bz2 and lzma into the service."""
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    if tmpdir_env == "writable":
        env["TMPDIR"] = str(tmp_path)
    elif tmpdir_env == "missing":
        env["TMPDIR"] = str(tmp_path / "nope")
    out = subprocess.run([sys.executable, "-c", AGENT_FOOTPRINT], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


# What an agent waiting for its first request (started as under `livepatch
# run`, nothing recorded in its state directory) adds to a service: the
# socket server, the protocol, the runtime and state directories, trust and
# logging. The engine, the bundle reader, signing and cryptography come with
# the first request that needs them.
IDLE_AGENT_MODULES = {
    "livepatch", "livepatch.forkimports", "livepatch.atfork", "livepatch.pyargs", "livepatch.agent", "livepatch.agent.autostart",
    "livepatch.agent.connections", "livepatch.agent.hangup", "livepatch.agent.history_file",
    "livepatch.agent.log", "livepatch.agent.protocol", "livepatch.agent.quietfork", "livepatch.agent.records",
    "livepatch.agent.requests",
    "livepatch.agent.runtime_dir", "livepatch.agent.server", "livepatch.agent.state", "livepatch.agent.state_dir",
    "livepatch.agent.stale_sockets", "livepatch.agent.trust",
}
# the standard library those need (3.11 to 3.13: json, socket, selectors, logging and what they import)
IDLE_AGENT_STDLIB = {
    "_colorize", "_json", "_socket", "_string", "_struct", "_tokenize", "_weakrefset", "array", "atexit",
    "collections.abc", "contextlib", "json", "json.decoder", "json.encoder", "json.scanner", "linecache",
    "logging", "math", "re", "select", "selectors", "socket", "string", "struct", "textwrap", "threading",
    "token", "tokenize", "traceback", "weakref",
}
# named so that a failure says what came back
NOT_IN_AN_IDLE_AGENT = ("livepatch.patchstack", "livepatch.bundle", "livepatch.signing", "livepatch.errors",
                        "livepatch.fingerprint", "livepatch.agent.ordering", "cryptography", "dataclasses",
                        "inspect", "typing", "ast", "dis", "hashlib", "hmac", "secrets", "random", "datetime",
                        "platform", "base64", "tempfile", "shutil", "subprocess", "argparse")
SNAPSHOTS = """
import sys
print(" ".join(sorted(sys.modules)), flush=True)
sys.stdin.readline()
print(" ".join(sorted(sys.modules)), flush=True)
"""


def _idle_and_after_requests(env, requests_then=None):
    """The modules of a process at its first statement, and after
    `requests_then(pid)` ran (the process waits for it)."""
    proc = subprocess.Popen([sys.executable, "-c", SNAPSHOTS], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        idle = set(proc.stdout.readline().split())
        if requests_then is not None:
            requests_then(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        after = set(proc.stdout.readline().split())
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return idle, after


def test_an_idle_agent_imports_only_what_waiting_for_requests_needs(tmp_path):
    """Every process of a service run under `livepatch run` (every worker)
    starts an agent: until a request needs more, it costs the modules listed
    above and nothing else; the first request that needs the engine loads it,
    and the state layer then hears of its events (a rejected bundle lands in
    the history on disk)."""
    from livepatch.client import request
    base = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    plain, _ = _idle_and_after_requests(base)
    state = tmp_path / "state"
    env = dict(base, LIVEPATCH_AUTOSTART="1", LIVEPATCH_NAME="footprint", LIVEPATCH_STATE_DIR=str(state),
               LIVEPATCH_ALLOW_UNSIGNED="1")
    served = {}

    def requests_then(pid):
        served["ping"] = request(pid, "ping")
        served["bad"] = request(pid, "apply", bundle="not base64!")

    for _ in range(3):
        idle, after = _idle_and_after_requests(env, requests_then)
        # every request imports ordering: seen at the first statement, some
        # other process's `livepatch ps` got an answer from this one first
        if "livepatch.agent.ordering" not in idle:
            break
    added = idle - plain
    ours = {m for m in added if m.split(".")[0] == "livepatch"}
    assert ours == IDLE_AGENT_MODULES, (sorted(ours - IDLE_AGENT_MODULES), sorted(IDLE_AGENT_MODULES - ours))
    assert sorted(m for m in NOT_IN_AN_IDLE_AGENT if m in added) == []
    assert sorted(added - ours - IDLE_AGENT_STDLIB) == []
    # the engine came with the request that needed it, and was listened to
    assert served["ping"]["ok"] and not served["bad"]["ok"] and "base64" in served["bad"]["error"]["message"]
    assert {"livepatch.patchstack", "livepatch.agent.ordering"} <= after
    history = [json.loads(line) for line in (state / "footprint" / "history.jsonl").read_text().splitlines()]
    assert [(e["action"], e["outcome"]) for e in history] == [("apply", "rejected")]


# `livepatch status/apply PID` needs the client, the protocol and its own
# presentation: neither the engine nor the bundle parser (the agent verifies
# and parses), nor what argparse's help formatter and `run` would pull, nor
# the agent's server, the socket module (the client uses the C socket type),
# threading, or the modules of other commands.
NOT_IN_THE_CLI = ("livepatch.patchstack", "livepatch.bundle", "livepatch.signing", "livepatch.errors",
                  "livepatch.tree", "livepatch.fanout", "livepatch.agent.requests", "livepatch.agent.state",
                  "livepatch.agent.server", "livepatch.agent.connections", "livepatch.agent.records",
                  "livepatch.agent.history_file", "livepatch.agent.reapply", "livepatch.cli_run", "livepatch.cli_repo", "livepatch.cli_updater",
                  "livepatch.hotfixes", "cryptography", "dataclasses", "inspect", "typing", "hashlib", "shutil",
                  "subprocess", "signal", "socket", "selectors", "threading", "datetime")
CLI_MODULES = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("MODULES " + " ".join(sorted(sys.modules)) + "\\n"))
from livepatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_cli_imports_the_client_not_the_engine(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
    env = dict(base, LIVEPATCH_AUTOSTART="1", LIVEPATCH_NAME="footprint-cli", LIVEPATCH_STATE_DIR=str(tmp_path / "s"),
               LIVEPATCH_ALLOW_UNSIGNED="1")
    bogus = tmp_path / "bogus.lpb"
    bogus.write_bytes(b"not a bundle")
    seen = {}

    def run_cli(pid):
        for args, code in ((["status", str(pid)], 0), (["apply", str(pid), str(bogus)], 4)):
            r = subprocess.run([sys.executable, "-c", CLI_MODULES, *args], capture_output=True, text=True, timeout=60,
                               env=base, cwd=str(tmp_path))
            assert r.returncode == code, r.stderr
            seen[args[0]] = set(r.stderr.rsplit("MODULES ", 1)[1].split())

    _idle_and_after_requests(env, run_cli)
    for command, modules in seen.items():
        assert (command, sorted(m for m in NOT_IN_THE_CLI if m in modules)) == (command, [])
        assert {"livepatch.cli", "livepatch.cli_agent", "livepatch.client"} <= modules


PACKAGE_API = """
import os, sys
import livepatch
assert "livepatch.patchstack" not in sys.modules and "engine" not in vars(livepatch)
from livepatch import fingerprint, Patch, Change, UNCHANGED, AtImport, Engine, Result, PatchError, Problem
from livepatch import BaselineMismatch, CommitFailed, IncompatibleChange, RollbackRefused, TargetBusy
from livepatch import TargetNotFound, UnsupportedRuntime, apply, rollback, rollback_all, status, load_bundle
import livepatch.fingerprint
assert callable(fingerprint) and livepatch.fingerprint is fingerprint  # the function, not its submodule
assert livepatch.engine is livepatch.engine and isinstance(livepatch.engine, Engine)
from livepatch import atfork, engine, forksafe
assert engine is livepatch.engine and forksafe._after_fork_in_child in atfork._resets  # the child's reset is registered
assert livepatch.commit.__name__ == "livepatch.commit"
assert livepatch.status()["applied"] == [] and livepatch.status() == engine.status()
try:
    livepatch.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
pid = os.fork()
if pid == 0:  # the child has the same engine, usable
    os._exit(0 if livepatch.engine is engine and livepatch.status()["applied"] == [] else 1)
assert os.waitpid(pid, 0)[1] == 0
print("ok")
"""


def test_the_package_api_is_the_same_and_its_engine_one_per_process():
    out = subprocess.run([sys.executable, "-c", PACKAGE_API], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "ok\n", "")
