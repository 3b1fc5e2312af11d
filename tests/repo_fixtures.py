"""Patch repositories for the tests: a small real application (a baseline
tree and fixed trees built into signed bundles), a repository directory
made with `livepatch repo add`, served by a real HTTP server on loopback,
and the application run under `livepatch run` with forked workers."""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import json
import os
import subprocess
import sys
import threading
import time

from live import cli, end_process

_names = itertools.count()

APP_INIT = ""
CORE = '''def answer():
    return "old"
'''
CORE_FIXED = '''def answer():
    return "fixed"
'''
CORE_FIXED_2 = '''def answer():
    return "fixed-2"
'''
LAZY = '''def lazy_answer():
    return "lazy-old"
'''
LAZY_FIXED = '''def lazy_answer():
    return "lazy-fixed"
'''
# The program: forks WORKERS children, then every process writes what
# app.core.answer() returns to OUT.PID until it is stopped; it imports
# app.lazy only once the file IMPORT exists.
MAIN = '''import os, sys, time
from app import core
out, workers, trigger = sys.argv[1], int(sys.argv[2]), sys.argv[3]
children = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        children = None
        break
    children.append(pid)
lazy = None
while True:
    if lazy is None and os.path.exists(trigger):
        from app import lazy
    text = core.answer() + (" " + lazy.lazy_answer() if lazy else "")
    tmp = "%s.%d.tmp" % (out, os.getpid())
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, "%s.%d" % (out, os.getpid()))
    time.sleep(0.02)
'''


def write_tree(root, core=CORE, lazy=LAZY):
    os.makedirs(os.path.join(root, "app"), exist_ok=True)
    for name, text in (("__init__.py", APP_INIT), ("core.py", core), ("lazy.py", lazy), ("main.py", MAIN)):
        with open(os.path.join(root, "app", name), "w") as fh:
            fh.write(text)
    return str(root)


def unique_name(prefix="lprepo") -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@functools.lru_cache(maxsize=None)
def _trees(base_dir: str) -> dict:
    trees = {"base": write_tree(os.path.join(base_dir, "base")),
             "core": write_tree(os.path.join(base_dir, "core"), core=CORE_FIXED),
             "core2": write_tree(os.path.join(base_dir, "core2"), core=CORE_FIXED_2),
             "lazy": write_tree(os.path.join(base_dir, "lazy"), lazy=LAZY_FIXED)}
    return trees


def build(tmp, keys, fix: str, patch_id: str, name: str, version: str = "1.0", **options) -> str:
    """A signed bundle of the fix tree `fix` ("core", "core2", "lazy"),
    made by the builder `livepatch build` runs (in this process: quicker)."""
    from livepatch.builder import build as make
    from livepatch.signing import load_private
    trees = _trees(str(tmp))
    out = os.path.join(str(tmp), f"{patch_id}.lpb")
    data, _ = make(trees["base"], trees[fix], patch_id=patch_id, name=name, version=version,
                   private_key=load_private(keys["key"]), **options)
    with open(out, "wb") as fh:
        fh.write(data)
    return out


def repo_add(repo, keys, *bundles):
    r = cli("repo", "add", *bundles, "--repo", str(repo), "--key", keys["key"], "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def served(directory):
    """`directory` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def unreachable():
    """An http URL on 127.0.0.1 that refuses connections for as long as it
    is in use: its port is bound here and never listened on, so no other
    server can take it meanwhile."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class App:
    """The program under `livepatch run --name NAME --version VERSION`, with
    WORKERS forked children; stopped by PID."""

    def __init__(self, tmp, keys, name, version="1.0", workers=1, declare=True, installed=None):
        """`installed`: {distribution: version} installed on the program's
        path (their dist-info); one named NAME is what an undeclared run finds."""
        self.tmp, self.name = str(tmp), name
        trees = _trees(self.tmp)
        self.out = os.path.join(self.tmp, f"out-{name}")
        self.trigger = os.path.join(self.tmp, f"import-{name}")
        path = [trees["base"]]
        if installed:
            site = os.path.join(self.tmp, f"site-{name}")
            for dist, version in installed.items():
                info = os.path.join(site, f"{dist.replace('-', '_')}-{version}.dist-info")
                os.makedirs(info)
                with open(os.path.join(info, "METADATA"), "w") as fh:
                    fh.write(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
            path.append(site)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        for var in [v for v in env if v.startswith("LIVEPATCH_") and v != "LIVEPATCH_STATE_DIR"]:
            del env[var]
        cmd = [sys.executable, "-m", "livepatch", "run", "--name", name, "--trust", keys["trust"],
               *(["--version", version] if declare else []), "--",
               sys.executable, "-m", "app.main", self.out, str(workers), self.trigger]
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pid = self.proc.pid
        try:
            self.pids = self._wait_workers(workers + 1)
        except BaseException:  # never started for the test to stop: end its whole session here
            import signal
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise

    def _wait_workers(self, count, timeout=90):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            prefix = os.path.basename(self.out) + "."
            pids = sorted(int(n[len(prefix):]) for n in os.listdir(self.tmp)
                          if n.startswith(prefix) and n[len(prefix):].isdigit())
            agents = [p for p in pids if _agent_up(p)]
            if len(agents) >= count:
                return agents
            assert time.monotonic() < deadline, f"{self.name}: {len(agents)} of {count} processes have an agent"
            time.sleep(0.05)

    def answers(self) -> dict:
        out = {}
        for pid in self.pids:
            with open(f"{self.out}.{pid}") as fh:
                out[pid] = fh.read()
        return out

    def _wait(self, done, timeout=90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got = self.answers()
            if done(got):
                return got
            assert time.monotonic() < deadline, got
            time.sleep(0.02)

    def wait_answers(self, expected: str) -> dict:
        """Every process's answers, once all of them answer `expected`."""
        return self._wait(lambda got: set(got.values()) == {expected})

    def wait_answers_of(self, pid: int, expected: str) -> dict:
        """Every process's answers, once process `pid` answers `expected`."""
        return self._wait(lambda got: got[pid] == expected)

    def import_lazy(self):
        open(self.trigger, "w").close()

    def stop(self):
        import signal
        for pid in self.pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        end_process(self.proc)


def _agent_up(pid: int) -> bool:
    from livepatch.client import AgentUnavailable, socket_for
    try:
        return socket_for(pid) is not None
    except AgentUnavailable:
        return False
