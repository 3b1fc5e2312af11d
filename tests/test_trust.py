"""Trust stores, against real files and real agents in their own processes:
a store (or a key, or a directory or symlink on the way) that someone else
could write is refused with one line naming the path and the problem, so a
key planted there is never trusted; Kubernetes-style symlinked secrets load
when every hop is safe; a link loop is one line, never a traceback, and
never kills the service; `livepatch trust reload` and `attach --trust` on
an attached process change what is accepted without a restart, logged and
recorded in history; an agent with no keys says so; keygen refuses to
overwrite or to write nowhere."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from live import cli

ME = os.getuid()
NOBODY = 65534
as_root = pytest.mark.skipif(ME != 0, reason="needs root to give files to another uid")

# A service that starts its agent itself with the options in argv[2] and
# logs as a service would (INFO and above on stderr).
PROGRAM = r"""
import json, logging, sys, time
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
import app
import livepatch.agent
print(json.dumps(livepatch.agent.start(**json.loads(sys.argv[2]))), flush=True)
while True:
    time.sleep(0.05)
"""

NO_KEYS = "every signed bundle will be refused"


class Svc:
    def __init__(self, base, tmp_path, **options):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}
        env["LIVEPATCH_STATE_DIR"] = str(tmp_path / "state")
        self.proc = subprocess.Popen([sys.executable, "-c", PROGRAM, base, json.dumps(options)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.socket = json.loads(line)
        self._err = None

    def status(self):
        r = cli("status", str(self.pid), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self._err is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self._err = self.proc.stderr.read()
        return self._err


@pytest.fixture
def services(tmp_path, material):
    made = []

    def start(**options):
        s = Svc(material["base"], tmp_path, **options)
        made.append(s)
        return s
    yield start
    for s in made:
        s.stop()


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Two keys (ops, other) and a bundle signed by each, for a tiny app."""
    d = tmp_path_factory.mktemp("material")
    base, fixed = d / "base", d / "fixed"
    base.mkdir()
    fixed.mkdir()
    (base / "app.py").write_text("def greet():\n    return 'old'\n")
    (fixed / "app.py").write_text("def greet():\n    return 'new'\n")
    out = {"base": str(base)}
    for name in ("ops", "other"):
        r = cli("keygen", str(d / name), "--json")
        assert r.returncode == 0, r.stderr
        out[name] = {**json.loads(r.stdout), "bundle": str(d / f"{name}.lpb")}
        r = cli("build", str(base), str(fixed), "-o", out[name]["bundle"], "--id", f"FIX-{name.upper()}",
                "--key", out[name]["private"], "--classification", "bugfix")
        assert r.returncode == 0, r.stderr
    return out


def store(path, *keys, mode=0o700):
    os.makedirs(path)
    for key in keys:
        shutil.copy(key["public"], os.path.join(path, os.path.basename(key["public"])))
    os.chmod(path, mode)
    return str(path)


def one_line(r):
    """A refusal: one line on stderr, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def run_with(trust):
    return cli("run", "--trust", trust, "--", sys.executable, "-c", "print('service ran')")


def log_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("livepatch:")]


def refused_at_start(svc, material, *expected):
    """The service runs on with no trusted keys, says so in one line, and
    refuses the bundle of a key it would otherwise have trusted."""
    st = svc.status()["agent"]
    assert st["trusted_keys"] == [] and all(e in st["trust_problem"] for e in expected), st
    r = cli("apply", str(svc.pid), material["other"]["bundle"])
    assert r.returncode == 4 and "no trusted keys configured" in r.stderr, r.stdout + r.stderr
    assert svc.alive()
    err = svc.stop()
    lines = log_lines(err)
    assert "Traceback" not in err, err
    assert len(lines) == 2, lines  # the start, and the refused apply
    assert all(e in lines[0] for e in expected) and NO_KEYS in lines[0], lines
    assert "SignatureError: no trusted keys configured" in lines[1], lines


# ---------------------------------------------------------------- unsafe stores

def test_a_world_writable_store_with_a_planted_key_is_refused(tmp_path, material, services):
    keys = store(tmp_path / "keys", material["ops"], mode=0o777)
    # the attacker's key, dropped into the open directory
    shutil.copy(material["other"]["public"], os.path.join(keys, "zz-planted.pub"))
    problem = f"{keys} is writable by others (mode 777)"

    r = run_with(keys)
    assert r.returncode == 1 and problem in one_line(r) and "service ran" not in r.stdout
    r = cli("verify", material["other"]["bundle"], "--trust", keys)
    assert r.returncode == 4 and problem in one_line(r)
    refused_at_start(services(trust=keys), material, problem)


def test_a_group_writable_parent_is_refused(tmp_path, material, services):
    parent = tmp_path / "etc"
    keys = store(parent / "keys", material["other"], mode=0o755)
    os.chmod(parent, 0o775)
    problem = f"{parent} (above {keys}) is writable by others (mode 775)"

    r = run_with(keys)
    assert r.returncode == 1 and problem in one_line(r)
    r = run_with(os.path.join(keys, "other.pub"))  # a key file named directly: same parent
    assert r.returncode == 1 and f"{parent} (above {keys}/other.pub) is writable by others" in one_line(r)
    refused_at_start(services(trust=keys), material, problem)


def test_a_group_writable_key_file_is_refused(tmp_path, material):
    keys = store(tmp_path / "keys", material["other"])
    os.chmod(os.path.join(keys, "other.pub"), 0o664)
    r = run_with(keys)
    assert r.returncode == 1 and f"{keys}/other.pub is writable by others (mode 664)" in one_line(r)


@as_root
def test_a_store_owned_by_another_uid_is_refused(tmp_path, material):
    keys = store(tmp_path / "keys", material["other"], mode=0o755)
    os.chown(keys, NOBODY, NOBODY)
    r = run_with(keys)
    assert r.returncode == 1 and f"{keys} is owned by uid {NOBODY}, not {ME} or root" in one_line(r)


@as_root
def test_a_sticky_open_store_trusts_only_entries_of_its_owner(tmp_path, material, services):
    keys = store(tmp_path / "keys", material["other"], mode=0o1777)
    svc = services(trust=keys)
    assert svc.status()["agent"]["trusted_keys"] == [material["other"]["key_id"]]
    planted = os.path.join(keys, "planted.pub")
    shutil.copy(material["ops"]["public"], planted)
    os.chown(planted, NOBODY, NOBODY)  # what another user can do in a sticky directory
    r = cli("trust", "reload", str(svc.pid))
    assert r.returncode == 1 and f"{keys} (above {planted}) is writable by others (mode 1777) and {planted} is uid " \
        f"{NOBODY}'s" in r.stderr and "nothing changed" in r.stderr, r.stderr
    assert svc.status()["agent"]["trusted_keys"] == [material["other"]["key_id"]]


# ---------------------------------------------------------------- symlinks

def kubernetes_secret(path, *keys):
    """What kubelet makes of a secret volume: a timestamped directory, `..data`
    pointing at it, and each key a link through `..data`."""
    os.makedirs(path, mode=0o755)
    version = "..2026_12_01_22_00_00.1234567"
    store(os.path.join(path, version), *keys, mode=0o755)
    os.symlink(version, os.path.join(path, "..data"))
    for key in keys:
        name = os.path.basename(key["public"])
        os.symlink(os.path.join("..data", name), os.path.join(path, name))
    return str(path)


def test_a_kubernetes_style_secret_is_accepted_and_its_update_reloaded(tmp_path, material, services):
    secret = kubernetes_secret(tmp_path / "secret", material["ops"])
    r = run_with(secret)
    assert r.returncode == 0 and "service ran" in r.stdout, r.stderr
    r = cli("verify", material["ops"]["bundle"], "--trust", os.path.join(secret, "ops.pub"))
    assert r.returncode == 0, r.stderr

    svc = services(trust=secret)
    assert svc.status()["agent"]["trusted_keys"] == [material["ops"]["key_id"]]
    # kubelet's update: a new version directory, ..data swapped atomically
    version = "..2026_12_02_08_00_00.7654321"
    store(os.path.join(secret, version), material["ops"], material["other"], mode=0o755)
    os.symlink(version, os.path.join(secret, "..data_tmp"))
    os.rename(os.path.join(secret, "..data_tmp"), os.path.join(secret, "..data"))
    os.symlink(os.path.join("..data", "other.pub"), os.path.join(secret, "other.pub"))
    r = cli("trust", "reload", str(svc.pid))
    assert r.returncode == 0 and f"trusted keys reloaded from {secret}: 2 keys" in r.stdout, r.stdout + r.stderr
    r = cli("apply", str(svc.pid), material["other"]["bundle"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in svc.stop()


def test_a_symlink_to_a_key_in_an_unsafe_place_is_refused(tmp_path, material, services):
    open_dir = store(tmp_path / "drop", material["other"], mode=0o777)
    keys = store(tmp_path / "keys")
    os.symlink(os.path.join(open_dir, "other.pub"), os.path.join(keys, "other.pub"))
    problem = f"{open_dir} (on the way to {keys}/other.pub) is writable by others (mode 777)"
    r = run_with(keys)
    assert r.returncode == 1 and problem in one_line(r)
    # a directory link into the open place: the same
    os.symlink(open_dir, tmp_path / "linked")
    r = run_with(str(tmp_path / "linked"))
    assert r.returncode == 1 and f"{open_dir} (where {tmp_path}/linked leads) is writable by others (mode 777)" \
        in one_line(r)
    refused_at_start(services(trust=keys), material, problem)


def test_a_dangling_symlink_says_where_it_leads(tmp_path, material):
    keys = store(tmp_path / "keys")
    os.symlink(str(tmp_path / "gone" / "other.pub"), os.path.join(keys, "other.pub"))
    r = run_with(keys)
    assert r.returncode == 1 and f"leads to {tmp_path}/gone, which does not exist" in one_line(r)


@pytest.mark.parametrize("shape", ["key", "store"])
def test_a_link_loop_is_one_line_and_never_kills_the_service(shape, tmp_path, material, services):
    keys = store(tmp_path / "keys")
    if shape == "key":
        os.symlink("loop.pub", os.path.join(keys, "loop.pub"))
        trust, at = keys, f"{keys}/loop.pub"
    else:
        trust = at = str(tmp_path / "loop")
        os.symlink("loop", trust)
    problem = f"too many levels of symbolic links on the way to {at} (a loop at {at})"
    r = run_with(trust)
    assert r.returncode == 1 and problem in one_line(r)
    refused_at_start(services(trust=trust), material, problem)


# ---------------------------------------------------------------- reload

def test_reload_changes_what_is_accepted_and_is_logged_and_recorded(tmp_path, material, services):
    ops, other = material["ops"], material["other"]
    keys = store(tmp_path / "keys", ops)
    svc = services(trust=keys)
    r = cli("apply", str(svc.pid), other["bundle"])
    assert r.returncode == 4 and "untrusted key" in r.stderr, r.stdout + r.stderr

    shutil.copy(other["public"], os.path.join(keys, "other.pub"))
    r = cli("trust", "reload", str(svc.pid))
    both = sorted([ops["key_id"], other["key_id"]])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"process {svc.pid}: trusted keys reloaded from {keys}: 2 keys "
                                f"({both[0][:4]}..., {both[1][:4]}...) [1 added]")
    assert svc.status()["agent"]["trusted_keys"] == both
    r = cli("apply", str(svc.pid), other["bundle"])
    assert r.returncode == 0, r.stdout + r.stderr

    # an unsafe store given to reload changes nothing
    unsafe = store(tmp_path / "open", mode=0o777)
    r = cli("trust", "reload", str(svc.pid), "--trust", unsafe)
    assert r.returncode == 1 and f"{unsafe} is writable by others" in one_line(r) and "nothing changed" in r.stderr
    assert svc.status()["agent"]["trusted_keys"] == both

    # the key withdrawn: its bundles are refused from the next reload on
    os.unlink(os.path.join(keys, "other.pub"))
    r = cli("trust", "reload", str(svc.pid), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["reloaded"][str(svc.pid)]["removed"] == [other["key_id"]]
    r = cli("assess", str(svc.pid), other["bundle"], "--json")
    verdict = json.loads(r.stdout)[0]
    assert verdict["verdict"] == "refused" and verdict["error"] == "SignatureError", verdict

    r = cli("history", str(svc.pid), "--json")
    assert r.returncode == 0, r.stderr
    trust = [e for e in json.loads(r.stdout) if e["action"] == "trust"]
    assert [(e["outcome"], e["trust"], e["keys"]) for e in trust] == [
        ("ok", keys, both), ("refused", unsafe, both), ("ok", keys, [ops["key_id"]])]
    assert trust[0]["peer"]["uid"] == ME and "writable by others" in trust[1]["reason"]

    lines = log_lines(svc.stop())
    assert f"livepatch: trusted keys reloaded from {keys}: 2 keys ({both[0][:4]}..., {both[1][:4]}...)" in lines, lines
    assert f"livepatch: trusted keys reloaded from {keys}: 1 key ({ops['key_id'][:4]}...)" in lines, lines
    assert any(line.startswith(f"livepatch: trusted keys not reloaded from {unsafe}: ") for line in lines), lines


def test_reload_of_a_service_by_name(tmp_path, material, services):
    keys = store(tmp_path / "keys", material["ops"])
    name = f"trusted-{os.getpid()}-{tmp_path.name}"[:60]
    svcs = [services(trust=keys, name=name) for _ in range(2)]
    shutil.copy(material["other"]["public"], os.path.join(keys, "other.pub"))
    r = cli("trust", "reload", name)
    assert r.returncode == 0, r.stderr
    for s in svcs:
        assert f"process {s.pid}: trusted keys reloaded from {keys}: 2 keys" in r.stdout, r.stdout
        assert len(s.status()["agent"]["trusted_keys"]) == 2


def test_reload_of_a_relative_path_or_of_nothing_is_refused(tmp_path, material, services):
    svc = services()
    r = cli("trust", "reload", str(svc.pid))
    assert r.returncode == 1 and "no trust store to reload" in one_line(r)


def test_attach_trust_on_an_attached_process_reloads(tmp_path, material, services):
    svc = services()
    keys = store(tmp_path / "keys", material["ops"])
    r = cli("attach", str(svc.pid))
    assert r.returncode == 0 and "already has an agent" in r.stdout and "nothing changed" in r.stdout, r.stdout
    r = cli("attach", str(svc.pid), "--trust", keys)
    assert r.returncode == 0, r.stderr
    assert f"already has an agent on {svc.socket}: trusted keys reloaded from {keys}: 1 key" in r.stdout, r.stdout
    assert svc.status()["agent"]["trusted_keys"] == [material["ops"]["key_id"]]
    r = cli("apply", str(svc.pid), material["ops"]["bundle"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_attach_with_an_unsafe_store_attaches_nothing(tmp_path, material):
    keys = store(tmp_path / "keys", material["other"], mode=0o777)
    plain = subprocess.Popen([sys.executable, "-c", "import time\nwhile True:\n    time.sleep(0.05)\n"])
    try:
        r = cli("attach", str(plain.pid), "--trust", keys)
        assert r.returncode == 1 and f"{keys} is writable by others (mode 777)" in one_line(r) \
            and "nothing was attached" in r.stderr
        r = cli("status", str(plain.pid))
        assert r.returncode == 5, r.stdout + r.stderr  # no agent was started in it
        # made safe, the same attach works and trusts the key
        os.chmod(keys, 0o755)
        r = cli("attach", str(plain.pid), "--trust", keys)
        assert r.returncode == 0 and "agent listening" in r.stdout, r.stdout + r.stderr
        r = cli("status", str(plain.pid), "--json")
        assert json.loads(r.stdout)["agent"]["trusted_keys"] == [material["other"]["key_id"]]
    finally:
        plain.kill()
        plain.wait()


# ---------------------------------------------------------------- no keys

def test_an_agent_without_trust_warns_and_status_and_ps_say_so(material, services):
    svc = services()
    r = cli("status", str(svc.pid))
    assert r.returncode == 0 and f"no trusted keys (no trust store given (--trust)): every signed bundle is refused" \
        in r.stdout, r.stdout
    r = cli("ps")
    assert any(line.split()[:1] == [str(svc.pid)] and "(no trusted keys)" in line for line in r.stdout.splitlines()), \
        r.stdout
    lines = log_lines(svc.stop())
    assert lines == [f"livepatch: agent in process {svc.pid} started without --trust: no trusted keys: {NO_KEYS}"]

    dev = services(allow_unsigned=True)
    assert "(no trusted keys)" not in cli("status", str(dev.pid)).stdout
    assert log_lines(dev.stop()) == []


# ---------------------------------------------------------------- keygen

def _tree(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


@pytest.mark.parametrize("prefix, made, message", [
    ("missing/ops", [], "cannot write missing/ops.key: there is no directory missing"),
    ("ops", ["ops.key", "ops.pub"], "ops.key already exists: not overwriting a key"),
    ("ops", ["ops.pub"], "ops.pub already exists: not overwriting a key"),
    ("ops", ["ops.key"], "ops.key already exists: not overwriting a key"),
    ("keys", ["keys/"], "keys is a directory: give a prefix for the two files, such as keys/ops"),
    ("keys/", ["keys/"], "keys/ is a directory: give a prefix for the two files, such as keys/ops"),
])
def test_keygen_refuses_and_changes_nothing(prefix, made, message, tmp_path):
    for name in made:
        if name.endswith("/"):
            os.mkdir(tmp_path / name)
        else:
            (tmp_path / name).write_text(f"old {name}\n")
    before = _tree(tmp_path)
    r = cli("keygen", prefix, cwd=tmp_path)
    assert r.returncode == 1 and one_line(r).startswith(f"livepatch keygen: {message}"), r.stderr
    assert _tree(tmp_path) == before


def test_keygen_through_a_planted_symlink_writes_nothing(tmp_path):
    os.symlink(str(tmp_path / "elsewhere"), tmp_path / "ops.pub")
    r = cli("keygen", "ops", cwd=tmp_path)
    assert r.returncode == 1 and "ops.pub already exists" in one_line(r)
    assert sorted(os.listdir(tmp_path)) == ["ops.pub"]


def test_build_with_a_public_key_says_so(tmp_path, material):
    ops = material["ops"]
    r = cli("build", material["base"], material["base"], "-o", str(tmp_path / "x.lpb"), "--id", "X",
            "--key", ops["public"])
    assert r.returncode == 1, r.stderr
    line = one_line(r)
    assert f"{ops['public']} is a public key; signing needs the private key (its private key is {ops['private']})" \
        in line and "chmod" not in line
    assert not os.path.exists(tmp_path / "x.lpb")
