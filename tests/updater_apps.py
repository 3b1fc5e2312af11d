"""The application the updater and health tests patch (`calc`, served by
tests/updater_service.py), its fixes as source trees, signed bundles of
them, and the service started under `livepatch run`."""

from __future__ import annotations

import itertools
import os
import time

from servers_harness import Server, cli

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = os.path.join(HERE, "updater_service.py")

BASELINE = '''\
def divide(a, b):
    return a // b if b else 0


def healthy():
    return True
''' + "".join(f"\n\ndef spare_{i}(x):\n    return x\n" for i in range(8))  # one for each benchmark round
# the fix the tests install: rounds half up instead of down
GOOD = BASELINE.replace("return a // b if b else 0", "return (a + b // 2) // b if b else 0")
# a fix that breaks: dividing by zero now raises (through the patched function)
RAISES = BASELINE.replace("return a // b if b else 0", "return (a + b // 2) // b")
# a fix after which the service's health page says it is unwell
UNHEALTHY = BASELINE.replace("def healthy():\n    return True", "def healthy():\n    return False")

_names = itertools.count()


def tree(root, name: str, source: str) -> str:
    path = os.path.join(str(root), name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "calc.py"), "w") as fh:
        fh.write(source)
    return path


def build(keys, root, patch_id: str, source: str, *, name: str, classification="security", sequence=1,
          lineage=None, cumulative=False) -> str:
    """A signed bundle changing the baseline `calc` into `source`, for the
    service `name` at version 1.0 (what `start` declares it runs)."""
    base = tree(root, "baseline", BASELINE)
    fixed = tree(root, f"src-{patch_id}", source)
    out = os.path.join(str(root), f"{patch_id}.lpb")
    args = ["build", base, fixed, "-o", out, "--id", patch_id, "--classification", classification,
            "--ref", f"CVE-2026-{1000 + sum(map(ord, patch_id))}", "--name", name, "--version", "1.0",
            "--key", keys.key, "--sequence", str(sequence)]
    if lineage:
        args += ["--lineage", lineage]
    if cumulative:
        args.append("--cumulative")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    return out


def start(tmp_path, keys, *, workers=1, state_dir=None, name=None) -> Server:
    """The service under `livepatch run`, answering, every agent listening."""
    app = tree(tmp_path, "app", BASELINE)
    name = name or f"calc-{os.getpid()}-{next(_names)}"
    state_dir = state_dir or os.path.join(str(tmp_path), "state")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    port_file = os.path.join(str(tmp_path), f"{name}.port")
    if os.path.exists(port_file):  # from an earlier start of the same service
        os.unlink(port_file)
    server = Server(["python", SERVICE, app, "--port-file", port_file, "--workers", str(workers)], name=name,
                    cwd=str(tmp_path), logs=tmp_path, keys=keys, state_dir=state_dir,
                    run_options=("--version", "1.0"))
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file):
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() < deadline, f"{name} did not start:\n{server.log()}"
        time.sleep(0.02)
    server.port = int(open(port_file).read())
    server.state_dir = state_dir
    server.wait_agents(workers + 1)
    server.wait_ready()
    return server
