"""Helpers for tests against real service processes: the `livepatch`
command in a subprocess, and a service started with a port file plus a
client thread that drives load and counts failed requests."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

SECRET = "/docs?name=../private/secrets.txt"


def cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "livepatch", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def observed_program(program: str, *args, env=None, cwd=None):
    """(process, observe) for `program` run under `livepatch run`: it prints
    "ready", then one JSON line for each line it reads; observe() asks once
    and returns the answer. Stop the process with end_process."""
    proc = subprocess.Popen([sys.executable, "-m", "livepatch", "run", "--", sys.executable, program, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    try:
        ready = proc.stdout.readline().strip()
    except BaseException:
        end_process(proc)
        raise
    if ready != "ready":
        end_process(proc)
        raise AssertionError(f"the program did not start: {ready!r} {proc.stderr.read()}")

    def observe():
        proc.stdin.write("?\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())
    return proc, observe


def end_process(proc, ask=lambda p: p.send_signal(signal.SIGTERM), timeout=10):
    """Ask `proc` to exit (SIGTERM by default); SIGKILL it if it has not
    within `timeout` seconds."""
    if proc.poll() is None:
        ask(proc)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_ports = __import__("itertools").count()


class Service:
    """The inventory API in its own process, plus a client thread driving load."""

    def __init__(self, tmp_path, cwd, program, launcher=(), env=None, load_paths=None):
        self.port_file = str(tmp_path / f"port-{next(_ports)}")
        cmd = [*launcher, sys.executable, *program, "--port", "0", "--port-file", self.port_file]
        self.load_paths = load_paths or ("/quote?sku=widget&qty=1", SECRET, "/health")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 20
        while not os.path.exists(self.port_file):
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.02)
        self.port = int(open(self.port_file).read())
        self.pid = self.proc.pid
        self.served = self.failed = 0
        self.errors = []
        self._stop = threading.Event()
        self._load = threading.Thread(target=self._drive, daemon=True)

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def _drive(self):
        while not self._stop.is_set():
            for path in self.load_paths:
                try:
                    status, _ = self.get(path)
                    if status >= 500:
                        raise RuntimeError(status)
                    self.served += 1
                except Exception as exc:  # any failed request counts
                    self.failed += 1
                    self.errors.append(repr(exc))

    def start_load(self):
        self._load.start()
        return self

    def stop(self):
        self._stop.set()
        if self._load.is_alive():
            self._load.join()
        end_process(self.proc)


