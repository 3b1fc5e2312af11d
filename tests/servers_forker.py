"""A service that forks plain children with os.fork, for the tests of a fork
that happens while an apply is in progress.

python servers_forker.py DIR [--while-importing]: imports `held` (from
PYTHONPATH) and keeps `held.hold` running on a thread, so that an apply of a
patch to it waits for a safe point until its timeout. While DIR/fork exists
it forks a child every 0.3 s. With --while-importing it also forks, up to
three times, at a moment another thread is executing the body of a
livepatch or cryptography module being imported (what the agent does, on
its own thread, the first time it verifies a bundle). Each child reports,
in DIR/child-PID.json, when and how it was forked and what it finds in
itself (garbage collector on, the engine's status answering, which version
of `held.answer` runs), and keeps rewriting that report until it is
killed."""

import gc
import json
import os
import sys
import threading
import time

import held

import livepatch

_fork_lock = threading.Lock()


def child(directory, forked_at, how):
    while True:
        status = livepatch.status()  # would hang if the fork had copied a held engine lock
        report = {"pid": os.getpid(), "forked_at": forked_at, "how": how, "gc_enabled": gc.isenabled(),
                  "applied": [p["id"] for p in status["applied"]], "answer": held.answer()}
        tmp = os.path.join(directory, f".child-{os.getpid()}")
        with open(tmp, "w") as fh:
            json.dump(report, fh)
        os.replace(tmp, os.path.join(directory, f"child-{os.getpid()}.json"))
        time.sleep(0.2)


def fork(directory, how):
    with _fork_lock:
        forked_at = time.monotonic()
        if os.fork() == 0:
            try:
                child(directory, forked_at, how)
            finally:
                os._exit(1)


def importing():
    """The name of a livepatch or cryptography module whose body runs now."""
    for name, module in list(sys.modules.items()):
        if name.startswith(("livepatch", "cryptography")) and getattr(getattr(module, "__spec__", None),
                                                                       "_initializing", False):
            return name
    return None


def watch_imports(directory, times=3):
    while times:
        name = importing()
        if name:
            fork(directory, f"while importing {name}")
            times -= 1
            time.sleep(0.01)
        time.sleep(0.0002)


def main():
    directory = sys.argv[1]
    threading.Thread(target=held.hold, daemon=True, name="holder").start()
    if "--while-importing" in sys.argv[2:]:
        threading.Thread(target=watch_imports, args=(directory,), daemon=True, name="import-watcher").start()
    with open(os.path.join(directory, "ready"), "w") as fh:
        fh.write(str(os.getpid()))
    while True:
        if os.path.exists(os.path.join(directory, "fork")):
            fork(directory, "during the apply")
        time.sleep(0.3)


if __name__ == "__main__":
    main()
