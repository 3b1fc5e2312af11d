"""Services of several processes: a parent that forks three workers, each
with its own agent and its own HTTP port answering with the code it runs.
`livepatch ps` groups them; `apply`/`rollback`/`status`/`history` by name
and by `PID --tree` reach all of them, all or nothing: a refusal in the
check changes nothing, a refusal at commit rolls back the ones that
committed, `--continue` leaves a partial service with its own exit code;
workers forked or spawned during an apply are picked up."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from live import cli, end_process

BASE = '''\
import os
import time


def answer():
    return "old"


def hold(seconds, until=None):
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and os.path.exists(until)):
        time.sleep(0.005)
    return "held"
'''
FIX = BASE.replace('return "old"', 'return "new"').replace('return "held"', 'return "held, fixed"')

# The service: parent and workers all import `treeapp` and serve GET / with
# treeapp.answer(). Faults are chosen per worker index on the command line.
PROGRAM = r'''
import argparse, http.server, os, signal, subprocess, sys, threading, time
ap = argparse.ArgumentParser()
ap.add_argument("--dir"); ap.add_argument("--name"); ap.add_argument("--trust")
ap.add_argument("--children", type=int, default=3)
ap.add_argument("--mismatch", type=int, default=-1)   # this worker runs other code for answer()
ap.add_argument("--busy", type=int, default=-1)       # a thread of this worker never leaves hold()
ap.add_argument("--slow", type=int, default=-1)       # a thread of this worker is in hold() until released
ap.add_argument("--exits", type=int, default=-1)      # on SIGUSR1 this worker exits as a recycled one does
ap.add_argument("--on-patch", default="none")         # fork | spawn | fork-silent: start a worker once the parent runs the fix
ap.add_argument("--lazy-parent", action="store_true")  # like a pre-fork master: only the workers import treeapp
ap.add_argument("--child", type=int, default=-1)      # set when spawned as a worker
ap.add_argument("--parent", type=int, default=0)
args = ap.parse_args()
sys.path.insert(0, os.path.join(args.dir, "app"))
import livepatch.agent
if not args.lazy_parent:
    import treeapp


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = treeapp.answer().encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def serve(block):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    path = os.path.join(args.dir, "ports", str(os.getpid()))
    with open(path + ".tmp", "w") as fh:
        fh.write(str(server.server_address[1]))
    os.replace(path + ".tmp", path)
    if block:
        server.serve_forever()
    threading.Thread(target=server.serve_forever, daemon=True).start()


def worker(i, parent):
    global treeapp
    import treeapp
    if i == args.mismatch:  # as if this worker had imported another release of the module
        ns = {}
        exec("def answer():\n    return 'other release'\n", ns)
        treeapp.answer.__code__ = ns["answer"].__code__
    if i == args.busy:
        threading.Thread(target=treeapp.hold, args=(3600,), daemon=True).start()
    if i == args.slow:
        def slow():  # in hold() without a break until the parent has started its new worker
            treeapp.hold(3600, until=os.path.join(args.dir, "released"))
        threading.Thread(target=slow, daemon=True).start()
    if i == args.exits:
        def recycled(*_):  # as at a worker's normal exit: its agent closes at exit, the process ends a moment later
            livepatch.agent.stop()
            time.sleep(1.0)
            os._exit(0)
        signal.signal(signal.SIGUSR1, recycled)

    def orphaned():  # never outlive the parent
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(0)
    threading.Thread(target=orphaned, daemon=True).start()
    livepatch.agent.start(name=args.name, trust=args.trust)
    serve(block=True)


if args.child >= 0:
    worker(args.child, args.parent)
    sys.exit(0)

me = os.getpid()
kids = []
for i in range(args.children):  # fork before this process has threads
    pid = os.fork()
    if pid == 0:
        worker(i, me)
        os._exit(0)
    kids.append(pid)


def stop(*_):
    for k in kids:
        try:
            os.kill(k, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for k in kids:
        try:
            os.waitpid(k, 0)
        except ChildProcessError:
            pass
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
livepatch.agent.start(name=args.name, trust=args.trust)
if args.lazy_parent:
    while True:
        time.sleep(1)
serve(block=False)
started_newcomer = False
while True:
    if args.on_patch != "none" and not started_newcomer and treeapp.answer() == "new":
        started_newcomer = True
        if args.on_patch in ("fork", "fork-silent"):
            pid = os.fork()
            if pid == 0:
                if args.on_patch == "fork-silent":  # its agent listens (started in the fork), never answers
                    os.kill(os.getpid(), signal.SIGSTOP)
                worker(100, me)
                os._exit(0)
            kids.append(pid)
        else:
            kids.append(subprocess.Popen([sys.executable, *sys.argv, "--child", "101", "--parent", str(me)]).pid)
        open(os.path.join(args.dir, "released"), "w").close()
    time.sleep(0.002)
'''


def _build(keys, d, classification):
    for tree_name, source in (("base", BASE), ("fix", FIX)):
        (d / tree_name).mkdir()
        (d / tree_name / "treeapp.py").write_text(source)
    path = str(d / "fix.lpb")
    r = cli("build", str(d / "base"), str(d / "fix"), "-o", path, "--id", "HP-TREE", "--key", keys["key"],
            "--name", "treeapp", "--version", "1.0", "--classification", classification)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def bundle(keys, tmp_path_factory):
    return _build(keys, tmp_path_factory.mktemp("treebundle"), "bugfix")


@pytest.fixture(scope="module")
def security_bundle(keys, tmp_path_factory):
    # rolling a security fix back needs an authorisation, except for the
    # client undoing its own apply
    return _build(keys, tmp_path_factory.mktemp("treesecurity"), "security")


class TreeService:
    def __init__(self, tmp_path, trust, **faults):
        self.dir = tmp_path / f"svc-{uuid.uuid4().hex[:8]}"
        (self.dir / "app").mkdir(parents=True)
        (self.dir / "ports").mkdir()
        (self.dir / "app" / "treeapp.py").write_text(BASE)
        (self.dir / "service.py").write_text(PROGRAM)
        self.name = f"treetest-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, str(self.dir / "service.py"), "--dir", str(self.dir), "--name", self.name,
               "--trust", trust]
        for key, value in faults.items():
            cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
        env = dict(os.environ, LIVEPATCH_STATE_DIR=str(self.dir / "state"))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.pid = self.proc.pid
        self.wait_for(1 + faults.get("children", 3), serving=faults.get("children", 3) + (not faults.get("lazy_parent")))

    def ports(self) -> dict:
        out = {}
        for name in os.listdir(self.dir / "ports"):
            if name.isdigit():
                out[int(name)] = int((self.dir / "ports" / name).read_text())
        return out

    def wait_for(self, n, serving=None, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            ports = self.ports()
            if len(ports) >= (n if serving is None else serving) and len(self.members()) >= n:
                return ports
            assert time.monotonic() < deadline, f"only {len(ports)} of {n} processes started"
            time.sleep(0.05)

    def members(self) -> list:
        r = cli("ps", "--json")
        assert r.returncode == 0, r.stderr
        return [row for row in json.loads(r.stdout) if row["name"] == self.name]

    def answers(self) -> dict:
        return self.answers_of(self.ports())

    def answers_of(self, pids) -> dict:
        ports, out = self.ports(), {}
        for pid in sorted(pids):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[pid]}/", timeout=10) as resp:
                out[pid] = resp.read().decode()
        return out

    def children(self) -> list:
        return sorted(p for p in self.ports() if p != self.pid)

    def stop(self):
        end_process(self.proc)
        for pid in self.ports():  # the workers exit with their parent; make sure by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def service(tmp_path, keys):
    made = []

    def make(**faults):
        s = TreeService(tmp_path, keys["trust"], **faults)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def _json(r):
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise AssertionError(r.stdout + r.stderr) from None


def _applied(pid):
    status = _json(cli("status", str(pid), "--json"))
    return [p["id"] for p in status["applied"]]


def _history(pid):
    # the processes of a service may share one persisted history: this process's part
    return [(h["action"], h["outcome"]) for h in _json(cli("history", str(pid), "--json")) if h.get("pid", pid) == pid]


# ---------------------------------------------------------------- the whole service

def test_ps_groups_a_forked_service_and_apply_by_name_reaches_every_process(service, bundle):
    svc = service()
    kids = svc.children()
    assert len(kids) == 3 and set(svc.answers().values()) == {"old"}

    rows = svc.members()
    assert [r["pid"] for r in rows] == [svc.pid, *kids]  # master first, then its workers
    assert [(r["role"], r["serves"], r["parent"]) for r in rows] == \
        [("master", False, None)] + [("worker", True, svc.pid)] * 3
    assert all(r["patches"] == [] and r["state"] == "baseline" and r["service"] == svc.name for r in rows)
    human = cli("ps").stdout
    block = human[human.index(svc.name):].splitlines()
    assert block[0].startswith(f"{svc.name}: 4 processes, 3 serving")
    assert block[2].split()[:2] == [str(svc.pid), "master"]
    assert [line.split()[:2] for line in block[3:6]] == [[str(k), "worker"] for k in kids]
    assert all(line.startswith("    ") for line in block[3:6])  # workers indented under the master

    r = cli("apply", svc.name, bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 of 3 serving processes patched; 1 of 1 master patched" in r.stdout
    assert set(svc.answers().values()) == {"new"}
    assert all(_applied(pid) == ["HP-TREE"] for pid in [svc.pid, *kids])
    assert all(r["state"] == "patched" and r["patches"] == ["HP-TREE"] for r in svc.members())

    status = _json(cli("status", svc.name, "--json"))
    assert [p["pid"] for p in status["processes"]] == [svc.pid, *kids]
    assert all(p["status"]["applied"][0]["id"] == "HP-TREE" for p in status["processes"])

    r = cli("rollback", svc.name, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = _json(r)
    assert [(p["pid"], p["outcome"], p["rolled_back"]) for p in out["processes"]] == \
        [(pid, "rolled back", ["HP-TREE"]) for pid in [svc.pid, *kids]]
    assert set(svc.answers().values()) == {"old"}

    history = _json(cli("history", svc.name, "--json"))["history"]
    for pid in [svc.pid, *kids]:
        assert [(e["action"], e["outcome"]) for e in history if e["pid"] == pid] == [("apply", "ok"), ("rollback", "ok")]
    human = cli("history", svc.name).stdout
    assert sum(str(svc.pid) in line and "rollback" in line for line in human.splitlines()) == 1


def test_apply_json_lists_every_process(service, bundle):
    svc = service()
    out = _json(cli("apply", svc.name, bundle, "--json"))
    assert out["exit_code"] == 0 and out["patch_id"] == "HP-TREE"
    assert (out["serving"], out["serving_patched"], out["masters"], out["masters_patched"]) == (3, 3, 1, 1)
    assert [(p["pid"], p["role"], p["outcome"]) for p in out["processes"]] == \
        [(svc.pid, "master", "patched")] + [(k, "worker", "patched") for k in svc.children()]
    assert all(p["pause_ns"] > 0 for p in out["processes"])
    # applying again changes nothing and says so
    again = _json(cli("apply", svc.name, bundle, "--json"))
    assert again["exit_code"] == 0 and {p["outcome"] for p in again["processes"]} == {"already applied"}


def test_baseline_mismatch_in_one_worker_refuses_before_any_commit(service, bundle):
    svc = service(mismatch=1)
    odd = svc.children()[1]
    before = svc.answers()
    assert before[odd] == "other release"
    r = cli("apply", svc.name, bundle, "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    out = _json(r)
    outcomes = {p["pid"]: p["outcome"] for p in out["processes"]}
    assert outcomes.pop(odd) == "refused"
    assert set(outcomes.values()) == {"unchanged"}
    assert next(p for p in out["processes"] if p["pid"] == odd)["error"] == "BaselineMismatch"
    assert "nothing was changed" in out["summary"] and "0 of 3 serving processes patched" in out["summary"]
    assert svc.answers() == before
    for pid in [svc.pid, *svc.children()]:
        assert _applied(pid) == [] and _history(pid) == []  # the check records nothing anywhere
    human = cli("apply", svc.name, bundle)
    assert human.returncode == 3 and "refused by 1 of 4 processes; nothing was changed" in human.stdout
    assert "BaselineMismatch" in human.stdout


def test_refusal_at_commit_rolls_back_the_processes_that_committed(service, security_bundle):
    svc = service(busy=2)
    busy = svc.children()[2]
    r = cli("apply", svc.name, security_bundle, "--timeout", "0.3", "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    out = _json(r)
    outcomes = {p["pid"]: p["outcome"] for p in out["processes"]}
    assert outcomes.pop(busy) == "refused"
    assert set(outcomes.values()) == {"rolled back"} and len(outcomes) == 3
    assert "were rolled back, nothing is left changed" in out["summary"]
    assert set(svc.answers().values()) == {"old"}
    assert _history(busy) == [("apply", "refused")]
    for pid in outcomes:
        assert _applied(pid) == [] and _history(pid) == [("apply", "ok"), ("rollback", "ok")]


def test_a_refusal_at_commit_also_rolls_back_a_worker_forked_with_the_patch_meanwhile(service, security_bundle):
    svc = service(busy=1, on_patch="fork")
    busy = svc.children()[1]
    r = cli("apply", svc.name, security_bundle, "--timeout", "1", "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    out = _json(r)
    new = [p for p in out["processes"] if p["newcomer"]]
    # forked with the patch, or in the middle of the parent's commit (the child's engine then undid it)
    assert len(new) == 1 and (new[0]["outcome"], new[0]["detail"][:38]) in \
        {("rolled back", "started during the apply with the patc"), ("unchanged", "started during the apply, without the ")}, out
    outcomes = {p["pid"]: p["outcome"] for p in out["processes"] if not p["newcomer"]}
    assert outcomes.pop(busy) == "refused" and set(outcomes.values()) == {"rolled back"}
    svc.wait_for(5)
    assert set(svc.answers().values()) == {"old"} and len(svc.answers()) == 5
    assert all(row["patches"] == [] for row in svc.members())


def test_a_worker_forked_meanwhile_that_does_not_answer_leaves_the_back_out_partial(service, security_bundle):
    """Forked with the patch, its agent never answering: the back-out cannot
    undo it there, and does not claim that nothing is left changed."""
    svc = service(busy=1, on_patch="fork-silent")
    r = cli("apply", svc.name, security_bundle, "--timeout", "1", "--json")
    out = _json(r)
    new = [p for p in out["processes"] if p["newcomer"]]
    try:
        assert r.returncode == 6, r.stdout + r.stderr
        assert [p["outcome"] for p in new] == ["not answering"], out
        assert "1 processes started during the apply did not answer and may run it" in out["summary"]
        assert "nothing is left changed" not in out["summary"]
    finally:
        for p in new:
            os.kill(p["pid"], signal.SIGKILL)


def test_continue_leaves_a_partial_service_with_its_own_exit_code(service, bundle):
    svc = service(busy=0)
    busy = svc.children()[0]
    r = cli("apply", svc.name, bundle, "--timeout", "0.3", "--continue")
    assert r.returncode == 6, r.stdout + r.stderr
    assert "2 of 3 serving processes patched; 1 of 1 master patched" in r.stdout
    answers = svc.answers()
    assert answers.pop(busy) == "old" and set(answers.values()) == {"new"}
    # rollback of the service reaches every process that has the patch
    r = cli("rollback", svc.name, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    outcomes = {p["pid"]: p["outcome"] for p in _json(r)["processes"]}
    assert outcomes.pop(busy) == "nothing to roll back" and set(outcomes.values()) == {"rolled back"}
    assert set(svc.answers().values()) == {"old"}


def test_a_worker_that_does_not_answer_is_counted_and_stops_the_apply(service, bundle):
    svc = service()
    stuck = svc.children()[1]
    os.kill(stuck, signal.SIGSTOP)  # its agent cannot answer, nor say which service it belongs to
    try:
        r = cli("apply", svc.name, bundle, "--json")
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert r.returncode == 3, r.stdout + r.stderr
    out = _json(r)
    outcomes = {p["pid"]: p["outcome"] for p in out["processes"]}
    assert outcomes.pop(stuck) == "not answering" and set(outcomes.values()) == {"unchanged"}
    assert "0 of 3 serving processes patched" in out["summary"]
    assert set(svc.answers().values()) == {"old"}


def _wait_busy(pid, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = cli("status", str(pid), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        if _json(r)["agent"]["busy"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"the apply never showed as in progress in process {pid}")


def test_a_worker_that_exits_during_the_apply_is_gone_not_a_failure(service, bundle):
    # The worker's commit waits for a thread to leave the target; meanwhile
    # it exits as a recycled worker does: its agent closes first (the apply's
    # connection hangs up), the process ends a second later.
    svc = service(slow=1, exits=1)
    leaving = svc.children()[1]
    apply = subprocess.Popen([sys.executable, "-m", "livepatch", "apply", svc.name, bundle, "--timeout", "30", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_busy(leaving)
        os.kill(leaving, signal.SIGUSR1)
        stdout, stderr = apply.communicate(timeout=60)
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.wait()
    assert apply.returncode == 0, stdout + stderr
    out = json.loads(stdout)
    outcomes = {p["pid"]: (p["outcome"], p["detail"]) for p in out["processes"]}
    assert outcomes.pop(leaving) == ("gone", "the process exited meanwhile")
    assert {o for o, _ in outcomes.values()} == {"patched"} and len(outcomes) == 3
    assert (out["serving"], out["serving_patched"], out["masters"], out["masters_patched"], out["gone"]) == (2, 2, 1, 1, 1)
    assert out["summary"] == "2 of 2 serving processes patched; 1 of 1 master patched; 1 exited during the operation"
    answers = svc.answers_of([p for p in svc.ports() if p != leaving])
    assert set(answers.values()) == {"new"} and len(answers) == 3


def test_a_master_that_never_imported_the_target_is_pending_and_its_workers_patched(service, bundle):
    svc = service(lazy_parent=True)
    workers = svc.children()
    assert len(workers) == 3 and svc.pid not in svc.ports()
    r = cli("apply", svc.name, bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 of 3 serving processes patched; 0 of 1 master patched, 1 pending" in r.stdout
    master_line = next(line for line in r.stdout.splitlines() if line.startswith(str(svc.pid)))
    assert master_line.split()[1:3] == ["master", "pending"] and "waits for the import of treeapp" in master_line
    assert set(svc.answers().values()) == {"new"}
    rows = {row["pid"]: row for row in svc.members()}
    assert rows[svc.pid]["state"] == "pending" and rows[svc.pid]["pending"] == ["treeapp"]
    assert all(rows[w]["state"] == "patched" and rows[w]["pending"] == [] for w in workers)
    assert cli("rollback", svc.name).returncode == 0
    assert set(svc.answers().values()) == {"old"}
    assert all(row["state"] == "baseline" for row in svc.members())


def test_tree_by_pid(service, bundle):
    svc = service()
    worker = svc.children()[0]
    # a worker's tree is the worker alone
    r = cli("apply", str(worker), "--tree", bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 of 1 serving processes patched" in r.stdout
    assert [pid for pid, a in svc.answers().items() if a == "new"] == [worker]
    r = cli("apply", str(svc.pid), "--tree", bundle, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    outcomes = [(p["pid"], p["outcome"]) for p in _json(r)["processes"]]
    assert outcomes == [(svc.pid, "patched")] + [(k, "already applied" if k == worker else "patched") for k in svc.children()]
    assert set(svc.answers().values()) == {"new"}
    status = _json(cli("status", str(svc.pid), "--tree", "--json"))
    assert [(p["pid"], p["role"], p["patches"]) for p in status["processes"]] == \
        [(svc.pid, "master", ["HP-TREE"])] + [(k, "worker", ["HP-TREE"]) for k in svc.children()]
    assert cli("rollback", str(svc.pid), "HP-TREE", "--tree").returncode == 0
    assert set(svc.answers().values()) == {"old"}


def test_a_bare_pid_is_still_one_process(service, bundle):
    svc = service()
    r = cli("apply", str(svc.pid), bundle, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _json(r)["patch_id"] == "HP-TREE"  # the single-process answer, as before
    answers = svc.answers()
    assert answers.pop(svc.pid) == "new" and set(answers.values()) == {"old"}
    assert cli("rollback", str(svc.pid)).returncode == 0


# a forked worker inherits the patch (or, forked in the middle of its parent's
# commit, which its engine then undid, gets it from this CLI); a spawned one
# gets it from this CLI, or, if its agent started after the service recorded
# the patch, from that record (pending until its import of treeapp, if the
# agent started before it)
@pytest.mark.parametrize("how, outcomes", [("fork", {"inherited", "patched"}),
                                           ("spawn", {"patched", "re-applied", "pending"})])
def test_workers_started_during_the_apply_are_picked_up(service, bundle, how, outcomes):
    # worker 0 is inside hold() until the parent, once patched, has started
    # another worker: that one appears while the commit phase is still running
    svc = service(slow=0, on_patch=how)
    kids = svc.children()
    r = cli("apply", svc.name, bundle, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = _json(r)
    new = [p for p in out["processes"] if p["newcomer"]]
    assert len(new) == 1 and new[0]["pid"] not in kids and new[0]["outcome"] in outcomes, out["processes"]
    assert new[0]["role"] == "worker" and new[0]["parent"] == svc.pid
    assert out["serving"] == out["serving_patched"] + out["serving_pending"] == 4
    svc.wait_for(5)
    assert set(svc.answers().values()) == {"new"} and len(svc.answers()) == 5
    r = cli("rollback", svc.name)
    assert r.returncode == 0 and "rolled back the latest patch in 5 processes" in r.stdout
    assert set(svc.answers().values()) == {"old"}


def test_dry_run_and_bad_input(service, bundle, tmp_path):
    svc = service(children=1)
    r = cli("apply", svc.name, bundle, "--dry-run")
    assert r.returncode == 0 and "2 of 2 processes would apply it now" in r.stdout, r.stdout + r.stderr
    assert set(svc.answers().values()) == {"old"}
    r = cli("apply", "no-such-service-" + uuid.uuid4().hex[:6], bundle)
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "no live agent belongs to a service" in r.stderr
    r = cli("status", "not-a-pid", "--tree")
    assert r.returncode == 2 and "--tree needs a PID" in r.stderr  # a usage error
    tampered = tmp_path / "tampered.lpb"
    data = bytearray(open(bundle, "rb").read())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    r = cli("apply", svc.name, str(tampered))
    assert r.returncode == 4, r.stdout + r.stderr
    assert set(svc.answers().values()) == {"old"} and _applied(svc.pid) == []


def test_tree_benchmark_runs():
    # the figures come from `make bench`; this only keeps the script from rotting
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "tree.py"), "--quick", "--workers", "2"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(out.stdout.strip().splitlines()[-1].split("results: ", 1)[1]) as fh:
        data = json.load(fh)
    row, = data["rows"]
    assert row["workers"] == 2 and row["serving_patched"] == [[2, 2], [2, 2]] and row["failed"] == 0  # by name, by tree
    assert row["apply_wall_ms"]["tree"]["n"] == row["apply_wall_ms"]["pid_tree"]["n"] == 1
    assert row["longest_request_ms"]["control"]["n"] == 1


def test_a_process_whose_module_refused_the_patch_at_import_is_not_called_patched():
    """After a new release, a worker imports code the patch was not built
    for: the engine refuses that module's part, and the process runs the
    release's own code there, so its state says so."""
    from livepatch.tree import Member
    applied = {"id": "HP-1", "pending": {}, "refused_at_import": {"shop.links": "BaselineMismatch: ..."}}
    member = Member(pid=1, status={"forced": False, "applied": [applied], "pending": []})
    assert member.state == "refused at import: shop.links"
    applied["refused_at_import"] = {}
    assert member.state == "patched"
