"""Real servers for the end-to-end tests: gunicorn, uvicorn, Django's
runserver and a multiprocessing job runner, each started on 127.0.0.1 under
`livepatch run` in its own session, driven by client threads that record
every request, and stopped by PID (SIGTERM to the master, then SIGKILL to
whatever is left of its session), also when a test fails."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = os.path.join(ROOT, "demo_apps", "servers")
BASELINE = os.path.join(SERVERS, "patches", "baseline")
FIX = os.path.join(SERVERS, "patches", "fix-open-redirect")
BIN = os.path.dirname(sys.executable)

EXPLOIT = "/login?next=//evil.example/phish"   # the open redirect: off-site before the fix
BENIGN = "/login?next=/orders/7"                # on-site: redirected there before and after
FIXED, VULNERABLE = "/", "//evil.example/phish"  # the Location the exploit gets


def env(extra=None) -> dict:
    """The environment servers and the CLI run in: this virtualenv's scripts first."""
    e = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1")
    e.pop("PYTHONPATH", None)
    for var in [v for v in e if v.startswith("LIVEPATCH_")]:
        del e[var]  # the test process's own settings must not leak into the services
    e.update(extra or {})
    return e


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livepatch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env())


def cli_json(*args, timeout=120):
    r = cli(*args, "--json", timeout=timeout)
    assert r.returncode == 0, f"livepatch {' '.join(map(str, args))} exited {r.returncode}: {r.stderr or r.stdout}"
    return json.loads(r.stdout)


def process_status(pid: int) -> dict:
    """The agent status of one process."""
    data = cli_json("status", pid)
    return data["processes"][0]["status"] if "processes" in data else data


def history_events(target) -> list[dict]:
    """Every history entry of a process or a service, oldest first."""
    data = cli_json("history", target)
    if isinstance(data, dict):
        return data["history"]
    if data and "history" in data[0]:  # one list per process
        return [e for p in data for e in p["history"] or []]
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Keys:
    """A signing key and a trust directory holding its public half."""

    def __init__(self, directory):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        r = cli("keygen", os.path.join(self.dir, "ops"))
        assert r.returncode == 0, r.stderr
        self.key = os.path.join(self.dir, "ops.key")
        self.trust = os.path.join(self.dir, "trusted")
        os.makedirs(self.trust, mode=0o700, exist_ok=True)
        shutil.copy(os.path.join(self.dir, "ops.pub"), self.trust)

    def build(self, out, baseline=BASELINE, patched=FIX, patch_id="HP-SHOP-1", version="1.0"):
        r = cli("build", baseline, patched, "-o", out, "--id", patch_id, "--classification", "security",
                "--ref", "CVE-0000-0101", "--name", "shop", "--version", version, "--key", self.key)
        assert r.returncode == 0, r.stderr
        return str(out)


# ---------------------------------------------------------------- requests

@dataclass
class Reply:
    status: int
    location: str | None
    body: dict
    started: float
    ended: float

    @property
    def pid(self):
        return self.body.get("pid")


def get(port, path, timeout=10.0) -> Reply:
    """One GET on a fresh connection; redirects are not followed."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            body = {"raw": data[:200].decode("latin-1")}
        return Reply(resp.status, resp.getheader("Location"), body, started, time.monotonic())
    finally:
        conn.close()


class Load:
    """Client threads sending the exploit and an ordinary request in turn, as
    fast as they are answered (or paused). Every reply is kept; an exception
    or a 5xx is a failed request."""

    def __init__(self, port, threads=2, paths=(EXPLOIT, BENIGN), log=lambda: ""):
        self.port, self.paths, self.log = port, paths, log
        self.replies: list[tuple[str, Reply]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._busy = threading.Semaphore(threads)
        self._count = threads
        self._threads = [threading.Thread(target=self._drive, daemon=True, name=f"load-{i}") for i in range(threads)]

    def _drive(self):
        while not self._stop.is_set():
            self._running.wait()
            with self._busy:
                if self._running.is_set():  # not paused meanwhile
                    self._round()

    def _round(self):
        for path in self.paths:
            started = time.monotonic()
            try:
                reply = get(self.port, path)
            except Exception as exc:  # every failed request counts
                self.failures.append(f"at {started:.2f} after {time.monotonic() - started:.2f}s {path}: {exc!r}")
                continue
            if reply.status >= 500:
                self.failures.append(f"at {started:.2f} {path}: HTTP {reply.status} {reply.body}")
            else:
                self.replies.append((path, reply))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def pause(self):
        """No new requests, and none in flight, until resume()."""
        self._running.clear()
        for _ in range(self._count):
            self._busy.acquire()
        for _ in range(self._count):
            self._busy.release()

    def resume(self):
        self._running.set()

    def stop(self):
        self._stop.set()
        self._running.set()
        for t in self._threads:
            if t.is_alive():
                t.join(30)

    def since(self, moment, path=EXPLOIT) -> list[Reply]:
        """Replies to `path` for requests sent after `moment` (time.monotonic())."""
        return [r for p, r in list(self.replies) if p == path and r.started >= moment]

    def wait_for(self, predicate, timeout=60.0, what="the load"):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert not self.failures, (self.failures[:5], self.log())
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


# ---------------------------------------------------------------- servers

def _session_members(sid: int) -> list[int]:
    import psutil
    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                members.append(pid)
        except OSError:
            pass
    return members


class Server:
    """One service under `livepatch run`, in a session of its own so that
    every process it forks or spawns can be found and stopped by PID."""

    def __init__(self, command, *, name, cwd, logs, keys=None, state_dir=None, port=None, extra_env=None,
                 run_options=()):
        self.name, self.port, self.cwd = name, port, cwd
        self.log_path = os.path.join(str(logs), f"{name}-{time.monotonic_ns()}.log")
        run = [sys.executable, "-m", "livepatch", "run", "--name", name]
        if keys is not None:
            run += ["--trust", keys.trust]
        if state_dir is not None:
            run += ["--state-dir", str(state_dir)]
        self.command = [*run, *run_options, "--", *command]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env(extra_env), start_new_session=True)
        self.pid = self.proc.pid  # `livepatch run` execs the server: this is the master's PID

    def log(self, tail=4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read().decode("utf-8", "replace")[-tail:]
        except OSError:
            return ""

    def wait_ready(self, path="/health", timeout=60.0) -> Reply:
        """The first reply to `path`, retried until the server answers."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}:\n{self.log()}"
            try:
                return get(self.port, path, timeout=5)
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{self.name} did not answer on port {self.port}:\n{self.log()}"
            time.sleep(0.05)

    def processes(self) -> list[int]:
        """The master and every live process it started (its session)."""
        return sorted(_session_members(self.pid))

    def agents(self) -> list[int]:
        """Processes of this server whose agent is listening."""
        from livepatch.client import live_agents
        mine = set(self.processes())
        return sorted(p for p in live_agents() if p in mine)

    def wait_agents(self, count, timeout=30.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(found := self.agents()) < count:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"only {found} of {count} agents listening:\n{self.log()}"
            time.sleep(0.05)
        return found

    def settle(self, quiet=0.5, timeout=30.0) -> list[int]:
        """Wait until no process of the server has started or ended, and no
        agent has come or gone, for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while True:
            now = (self.processes(), self.agents())
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now[0]
            assert time.monotonic() < deadline, f"{self.name} did not settle: {now}"
            time.sleep(0.05)

    def stop(self, timeout=15.0) -> int | None:
        """SIGTERM to the master, SIGKILL after `timeout`, then SIGKILL to any
        process of its session still there. Returns the master's exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        while (left := _session_members(self.pid)):
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self._log.close()
        return self.proc.returncode


_names = itertools.count()


class Servers:
    """Starts servers for one test and stops all of them at its end."""

    def __init__(self, tmp_path, keys):
        self.tmp, self.keys = tmp_path, keys
        self.started: list[Server] = []

    def start(self, command, *, name=None, cwd=SERVERS, state_dir=None, **kw) -> Server:
        # a name of its own: `livepatch apply NAME` must not reach another test's servers
        name = name or f"shop-{os.getpid()}-{next(_names)}"
        if state_dir is None:
            state_dir = self.tmp / "state"
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        server = Server(command, name=name, cwd=cwd, logs=self.tmp, keys=self.keys, state_dir=state_dir, **kw)
        self.started.append(server)
        return server

    def stop_all(self):
        for server in reversed(self.started):
            server.stop()
