"""The client authenticates the agent, against real processes and sockets:
a fake agent in a planted socket directory (another owner, mode 0777, a
symlink) or under the victim's name in the right directory is refused with
exit code 5 and never sent a request, while the victim runs on unpatched
and a real attach still works; services started after such a plant keep
running, say so in one log line and use the next safe directory, where the
client finds them; stale sockets of killed services (and of recycled PIDs)
are cleaned; root attaches to and patches another user's process."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from live import SECRET, Service, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")
NOBODY = 65534
ME = os.getuid()

FAKE_AGENT = r"""
import json, socket, struct, sys
path, log, victim = sys.argv[1], sys.argv[2], int(sys.argv[3])
answers = {
    "ping": {"pid": victim, "python": "3.11.7", "agent": "0.1.0"},
    "apply": {"patch_id": "HP-DOCS", "targets": ["inventory.files:document_path"], "functions": 1,
              "pause_ns": 7000, "attempts": 1, "forced": False, "signed_by": "ops"},
}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        head = c.recv(4)
        if len(head) == 4:
            n, body = struct.unpack(">I", head)[0], b""
            while len(body) < n:
                chunk = c.recv(n - len(body))
                if not chunk:
                    break
                body += chunk
            op = json.loads(body).get("op")
            with open(log, "a") as fh:
                fh.write(f"{op}\n")
            out = json.dumps({"v": 1, "ok": True, "result": answers.get(op, {})}).encode()
            c.sendall(struct.pack(">I", len(out)) + out)
    except OSError:
        pass
    finally:
        c.close()
"""

# A service that starts its agent itself; prints the socket path (or null).
AGENT_SERVICE = r"""
import json, time, livepatch.agent
print(json.dumps(livepatch.agent.start()), flush=True)
while True:
    time.sleep(0.05)
"""

PLAIN = "import time\nwhile True:\n    time.sleep(0.05)\n"


def isolated_env(base, **extra):
    """Socket directories of this test only: our own temporary directory
    and home; no $XDG_RUNTIME_DIR."""
    for name in ("tmp", "home"):
        os.makedirs(os.path.join(base, name), exist_ok=True)
    return dict(os.environ, XDG_RUNTIME_DIR="", TMPDIR=os.path.join(base, "tmp"), HOME=os.path.join(base, "home"),
                **extra)


def first_dir(env, uid=ME):
    return os.path.join(env["TMPDIR"], f"livepatch-{uid}")


def plant(directory, kind, elsewhere=None):
    """What a hostile local user (or a careless operator) leaves where the
    agent would put its socket."""
    if kind == "other-uid":
        os.mkdir(directory, 0o700)
        os.chown(directory, NOBODY, NOBODY)
    elif kind == "mode-0777":
        os.mkdir(directory)
        os.chmod(directory, 0o777)
    elif kind == "symlink":
        os.makedirs(elsewhere, mode=0o700)
        os.symlink(elsewhere, directory)
    elif kind == "open-parent":  # right itself, in a directory anyone may rename things in
        os.chmod(os.path.dirname(directory), 0o777)
        os.mkdir(directory, 0o700)
    else:
        raise ValueError(kind)


def reason(kind, planted):
    parent = os.path.dirname(planted)
    return {"other-uid": f"{planted} is owned by uid {NOBODY}, not {ME}", "mode-0777": f"{planted} has mode 777",
            "symlink": f"{planted} is a symlink",
            "open-parent": f"{parent} (above {planted}) is writable by others"}[kind]


KINDS = [pytest.param("other-uid", marks=pytest.mark.skipif(ME != 0, reason="needs root to chown")),
         "mode-0777", "symlink", "open-parent"]


class Proc:
    """A Python program in its own process, stopped (and its socket removed) at the end."""

    def __init__(self, code, *args, env=None, prefix=()):
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", code, *map(str, args)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def line(self):
        out = self.proc.stdout.readline()
        assert out, self.proc.stderr.read()
        return out.strip()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)
        return self.proc.stderr.read()


@pytest.fixture
def procs():
    made = []

    def start(*args, **kw):
        p = Proc(*args, **kw)
        made.append(p)
        return p
    yield start
    for p in made:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture
def services(tmp_path):
    made = []

    def start(env, launcher=(), base=None, **kw):
        s = Service(base or tmp_path, DEMO, ["-m", "inventory.server"], launcher=launcher, env=env, **kw)
        made.append(s)
        return s
    yield start
    for s in made:
        s.stop()


def listed(env):
    r = cli("ps", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return {row["pid"] for row in json.loads(r.stdout)}


def status(pid, env):
    r = cli("status", str(pid), "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def passed_over_lines(stderr):
    # (an agent started without --trust also says so: not what these count)
    lines = [line for line in stderr.splitlines() if "livepatch" in line and "every signed bundle will be refused" not in line]
    assert "Traceback" not in stderr, stderr
    return lines


# ---------------------------------------------------------------- planted directories

@pytest.mark.parametrize("kind", KINDS)
def test_fake_agent_in_a_planted_directory_is_refused(kind, tmp_path, services, procs, keys, docs_bundle):
    env = isolated_env(tmp_path)
    planted = first_dir(env)
    plant(planted, kind, elsewhere=str(tmp_path / "elsewhere"))
    victim = services(env)
    log = tmp_path / "fake-agent-requests"
    fake = procs(FAKE_AGENT, os.path.join(planted, f"{victim.pid}.sock"), log, victim.pid, env=env)
    assert fake.line() == "listening"

    for args in (("status", str(victim.pid)), ("apply", str(victim.pid), docs_bundle), ("history", str(victim.pid))):
        r = cli(*args, env=env)
        assert r.returncode == 5, (args, r.stdout, r.stderr)
        assert f"refusing the socket of process {victim.pid}: {reason(kind, planted)}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "applied" not in r.stdout
    assert victim.pid not in listed(env)
    assert not log.exists()  # nothing was ever sent to the impostor
    assert victim.proc.poll() is None and victim.get(SECRET)[0] == 200  # running, still vulnerable

    # the owner's attach is not answered by the fake either: a real agent
    # starts, in the next safe directory, and the fix lands
    r = cli("attach", str(victim.pid), "--trust", keys["trust"], "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["method"] != "already attached"
    assert not info["socket"].startswith(os.path.realpath(planted)) and not info["socket"].startswith(planted)
    r = cli("apply", str(victim.pid), docs_bundle, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert victim.get(SECRET)[0] == 404
    assert status(victim.pid, env)["agent"]["socket"] == info["socket"]
    assert victim.pid in listed(env)
    assert not log.exists()
    victim.stop()
    lines = passed_over_lines(victim.proc.stderr.read().decode())
    assert len(lines) == 1 and planted in lines[0] and info["socket"] in lines[0], lines


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["livepatch run", "agent.start()"])
def test_a_service_started_after_a_plant_runs_and_uses_the_next_safe_directory(kind, how, tmp_path, services, procs,
                                                                                keys, docs_bundle):
    env = isolated_env(tmp_path)
    planted = first_dir(env)
    plant(planted, kind, elsewhere=str(tmp_path / "elsewhere"))
    if how == "livepatch run":
        svc = services(env, launcher=[sys.executable, "-m", "livepatch", "run", "--trust", keys["trust"], "--"])
        pid = svc.pid
    else:
        svc = procs(AGENT_SERVICE, env=env)
        pid = svc.pid
        path = json.loads(svc.line())
        assert path and os.path.dirname(path) not in (planted, os.path.realpath(planted))
    s = status(pid, env)  # the client finds it, through the same candidates and checks
    socket_path = s["agent"]["socket"]
    assert os.path.basename(socket_path) == f"{pid}.sock"
    directory = os.path.dirname(socket_path)
    assert directory not in (planted, os.path.realpath(planted))
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700 and os.lstat(directory).st_uid == ME
    assert os.listdir(planted) == []  # nothing of ours went into the plant
    if how == "livepatch run":
        assert svc.get(SECRET)[0] == 200
        r = cli("apply", str(pid), docs_bundle, env=env)
        assert r.returncode == 0, r.stderr
        assert svc.get(SECRET)[0] == 404
        svc.stop()
        stderr = svc.proc.stderr.read().decode()
    else:
        assert svc.proc.poll() is None
        stderr = svc.stop()
    lines = passed_over_lines(stderr)
    assert len(lines) == 1, lines
    assert reason(kind, planted) in lines[0] and socket_path in lines[0]


def test_a_socket_of_another_process_under_the_victims_name_is_refused(tmp_path, procs):
    """The right directory (ours, 0700), but the listener is some other
    process of the same uid: SO_PEERCRED gives it away."""
    env = isolated_env(tmp_path)
    directory = first_dir(env)
    os.mkdir(directory, 0o700)
    victim = procs(PLAIN, env=env)
    log = tmp_path / "requests"
    impostor = procs(FAKE_AGENT, os.path.join(directory, f"{victim.pid}.sock"), log, victim.pid, env=env)
    assert impostor.line() == "listening"
    r = cli("status", str(victim.pid), env=env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert (f"refusing the socket of process {victim.pid}: {directory}/{victim.pid}.sock is served by "
            f"process {impostor.pid}, not {victim.pid}") in r.stderr
    assert victim.pid not in listed(env)
    # an attach is not fooled either: the real agent passes over the taken
    # name and the client finds it
    r = cli("attach", str(victim.pid), "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["method"] != "already attached" and os.path.dirname(info["socket"]) != directory
    assert status(victim.pid, env)["agent"]["socket"] == info["socket"]
    assert victim.pid in listed(env)
    assert not log.exists()
    lines = passed_over_lines(victim.stop())
    assert len(lines) == 1 and f"{directory}/{victim.pid}.sock is in use by another process" in lines[0], lines


# ---------------------------------------------------------------- stale sockets

def test_sockets_of_killed_services_are_cleaned(tmp_path, procs):
    env = isolated_env(tmp_path)
    terminated = procs(AGENT_SERVICE, env=env)
    path = json.loads(terminated.line())
    assert terminated.pid in listed(env)
    terminated.stop(signal.SIGTERM)  # dies of the signal: atexit does not run
    assert os.path.exists(path), "premise: SIGTERM leaves the socket behind"
    assert terminated.pid not in listed(env)
    assert not os.path.exists(path)  # `ps` removed it: the directory is ours

    # the next agent to start in the directory removes what killed ones left
    killed = [procs(AGENT_SERVICE, env=env) for _ in range(2)]
    left = [json.loads(k.line()) for k in killed]
    for k in killed:
        k.stop(signal.SIGKILL)
    assert all(os.path.exists(p) for p in left)
    fresh = procs(AGENT_SERVICE, env=env)
    mine = json.loads(fresh.line())
    assert os.path.dirname(mine) == os.path.dirname(left[0])
    assert not any(os.path.exists(p) for p in left)
    assert os.path.exists(mine) and fresh.pid in listed(env)


def test_a_recycled_pid_is_not_taken_for_an_agent(tmp_path, procs):
    """A socket left by a dead agent under the PID number a new process
    (with no agent) now has: the file is older than the process."""
    env = isolated_env(tmp_path)
    dead = procs(AGENT_SERVICE, env=env)
    left = json.loads(dead.line())
    dead.stop(signal.SIGKILL)
    directory = os.path.dirname(left)
    newcomer = procs(PLAIN, env=env)
    recycled = os.path.join(directory, f"{newcomer.pid}.sock")
    os.rename(left, recycled)  # as if the dead agent had had the newcomer's PID
    past = time.time() - 60
    os.utime(recycled, (past, past), follow_symlinks=False)
    # a socket being set up (bound, not yet listening) by a live process is newer than it: kept
    setting_up = procs(PLAIN, env=env)
    time.sleep(0.2)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.bind(os.path.join(directory, f"{setting_up.pid}.sock"))
    try:
        pids = listed(env)
        assert newcomer.pid not in pids and setting_up.pid not in pids
        assert not os.path.exists(recycled)
        assert os.path.exists(os.path.join(directory, f"{setting_up.pid}.sock"))
        for pid in (newcomer.pid, setting_up.pid):
            r = cli("status", str(pid), env=env)
            assert r.returncode == 5 and ("stale" in r.stderr or "has no livepatch agent" in r.stderr), r.stderr
        assert os.path.exists(os.path.join(directory, f"{setting_up.pid}.sock"))
    finally:
        half.close()


# ---------------------------------------------------------------- other uids (root only)

def _nobody_can_run_us():
    if ME != 0 or shutil.which("setpriv") is None:
        return False
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
                        "import livepatch.agent"], capture_output=True, cwd="/")
    return r.returncode == 0


needs_nobody = pytest.mark.skipif(not _nobody_can_run_us(),
                                  reason="needs root, setpriv and an interpreter with livepatch that uid 65534 can run")
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


@pytest.fixture
def shared():
    """A directory uid 65534 can use: a sticky temporary directory and a
    home of its own (pytest's are private to root)."""
    base = tempfile.mkdtemp(prefix="livepatch-auth-")
    os.chmod(base, 0o755)
    os.mkdir(os.path.join(base, "tmp"))
    os.chmod(os.path.join(base, "tmp"), 0o1777)
    os.mkdir(os.path.join(base, "home"), 0o700)
    os.chown(os.path.join(base, "home"), NOBODY, NOBODY)
    os.mkdir(os.path.join(base, "run"))
    os.chown(os.path.join(base, "run"), NOBODY, NOBODY)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def nobody_env(base):
    env = isolated_env(base)
    env.pop("LIVEPATCH_STATE_DIR", None)  # the state goes under its own home
    return env


@needs_nobody
def test_another_users_service_falls_back_to_its_home_or_runs_without_a_socket(shared, procs):
    env = nobody_env(shared)
    planted = first_dir(env, NOBODY)
    os.mkdir(planted, 0o700)  # root (another uid for it) got there first
    svc = procs(AGENT_SERVICE, env=env, prefix=AS_NOBODY)
    path = json.loads(svc.line())
    assert path == os.path.join(shared, "home", ".cache", "livepatch", "run", f"{svc.pid}.sock")
    assert status(svc.pid, env)["agent"]["socket"] == path  # found by root through the process's environment

    def as_nobody(*args):
        return subprocess.run([*AS_NOBODY, sys.executable, "-m", "livepatch", *args], env=env, cwd="/",
                              capture_output=True, text=True, timeout=120)
    r = as_nobody("ps", "--json")  # and by its owner
    assert r.returncode == 0 and svc.pid in {row["pid"] for row in json.loads(r.stdout)}, r.stderr
    r = as_nobody("status", str(os.getpid()))
    assert r.returncode == 5 and f"process {os.getpid()} belongs to uid 0: only its owner or root" in r.stderr
    lines = passed_over_lines(svc.stop())
    assert len(lines) == 1 and f"{planted} is owned by uid 0, not {NOBODY}" in lines[0]

    # its home fallback taken over as well (made by root): no safe place at all
    shutil.rmtree(os.path.join(shared, "home", ".cache"))
    os.makedirs(os.path.join(shared, "home", ".cache", "livepatch", "run"), mode=0o700)
    svc = procs(AGENT_SERVICE, env=env, prefix=AS_NOBODY)
    assert json.loads(svc.line()) is None  # started, without a control channel
    assert svc.proc.poll() is None
    r = cli("status", str(svc.pid), env=env)
    assert r.returncode == 5 and "Traceback" not in r.stderr, r.stderr
    lines = passed_over_lines(svc.stop())
    assert len(lines) == 1 and "without a control socket" in lines[0] and planted in lines[0], lines


@needs_nobody
def test_root_attaches_to_and_patches_another_users_process(shared, services, keys, docs_bundle):
    env = nobody_env(shared)
    # its environment is the user's to set: one naming a directory of root's
    # must not lead root to make something of the user's there
    rootonly = os.path.join(shared, "rootonly")
    os.mkdir(rootonly, 0o755)
    env["XDG_RUNTIME_DIR"] = rootonly
    trust = os.path.join(shared, "trusted")
    os.mkdir(trust)
    os.chmod(trust, 0o755)
    shutil.copy(keys["pub"], trust)
    os.chmod(os.path.join(trust, "ops.pub"), 0o644)
    svc = services(env, launcher=AS_NOBODY, base=__import__("pathlib").Path(shared, "run"))
    assert svc.get(SECRET)[0] == 200
    r = cli("attach", str(svc.pid), "--trust", trust, "--json")  # root's own environment
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["socket"] == os.path.join(shared, "tmp", f"livepatch-{NOBODY}", f"{svc.pid}.sock")
    directory = os.path.dirname(info["socket"])
    assert os.lstat(directory).st_uid == NOBODY and stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert sorted(os.listdir(directory)) == [f"{svc.pid}.sock"]  # the attach files are gone
    assert os.listdir(rootonly) == []
    r = cli("apply", str(svc.pid), docs_bundle, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert svc.get(SECRET)[0] == 404
    assert svc.pid in listed(dict(os.environ))
    r = cli("rollback", str(svc.pid))
    assert r.returncode == 0, r.stderr
    assert svc.get(SECRET)[0] == 200


def test_a_socket_path_too_long_for_af_unix_falls_back(tmp_path, procs):
    env = isolated_env(tmp_path)
    deep = os.path.join(env["TMPDIR"], "d" * 110)
    os.mkdir(deep)
    env["TMPDIR"] = deep
    svc = procs(AGENT_SERVICE, env=env)
    path = json.loads(svc.line())
    assert path and not path.startswith(deep)
    assert status(svc.pid, env)["agent"]["socket"] == path
    lines = passed_over_lines(svc.stop())
    assert len(lines) == 1 and "AF_UNIX path too long" in lines[0] and deep in lines[0], lines
