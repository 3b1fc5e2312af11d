"""A service that forks plain children with os.fork, for the test of a fork
that happens while an apply is in progress.

python servers_forker.py DIR: imports `held` (from PYTHONPATH), keeps
`held.hold` running on a thread (so an apply of a patch to it waits for a
safe point until its timeout), and while DIR/fork exists forks a child every
0.3 s. Each child reports, in DIR/child-PID.json, when it was forked and what
it found in itself after the fork (garbage collector on, the engine's status
answering), and keeps rewriting that report until it is killed."""

import gc
import json
import os
import sys
import threading
import time

import held

import livepatch


def child(directory, forked_at):
    while True:  # the report is rewritten, so a patch applied to the child later shows in it
        status = livepatch.status()  # would hang if the fork had copied a held engine lock
        report = {"pid": os.getpid(), "forked_at": forked_at, "gc_enabled": gc.isenabled(),
                  "applied": [p["id"] for p in status["applied"]], "answer": held.answer()}
        tmp = os.path.join(directory, f".child-{os.getpid()}")
        with open(tmp, "w") as fh:
            json.dump(report, fh)
        os.replace(tmp, os.path.join(directory, f"child-{os.getpid()}.json"))
        time.sleep(0.2)


def main():
    directory = sys.argv[1]
    threading.Thread(target=held.hold, daemon=True, name="holder").start()
    with open(os.path.join(directory, "ready"), "w") as fh:
        fh.write(str(os.getpid()))
    while True:
        if os.path.exists(os.path.join(directory, "fork")):
            forked_at = time.monotonic()
            if os.fork() == 0:
                try:
                    child(directory, forked_at)
                finally:
                    os._exit(1)
        time.sleep(0.3)


if __name__ == "__main__":
    main()
