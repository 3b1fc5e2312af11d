"""One request to many agents at once, from one process: a thread per
agent, each connection with its own deadline, and one outcome per process
(its result, or why there is none). A slow or dead agent costs its own
deadline, never the others' time; nothing here decides what an outcome
means for the operation (that is the caller's)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# At most this many connections are open at once (a service with hundreds
# of workers must not exhaust the CLI's file descriptors).
MAX_PARALLEL = 64

UNAVAILABLE = "AgentUnavailable"
TIMEOUT = "Timeout"


@dataclass
class Outcome:
    pid: int
    ok: bool
    result: object = None
    error: str = ""            # error kind: the agent's, UNAVAILABLE or TIMEOUT
    message: str = ""
    details: dict = field(default_factory=dict)
    elapsed_ms: float = 0.0

    @property
    def unavailable(self) -> bool:
        return self.error == UNAVAILABLE

    def describe(self) -> str:
        return f"{self.error}: {self.message}" if self.error else "ok"


def request_one(pid: int, op: str, wait: float, fields: dict) -> Outcome:
    from .client import AgentUnavailable, request
    started = time.perf_counter()

    def done(**kw):
        return Outcome(pid, elapsed_ms=round((time.perf_counter() - started) * 1000, 2), **kw)
    try:
        response = request(pid, op, wait=wait, **fields)
    except AgentUnavailable as exc:
        return done(ok=False, error=UNAVAILABLE, message=str(exc))
    except TimeoutError:
        return done(ok=False, error=TIMEOUT, message=f"the agent of process {pid} did not answer within {wait:g}s")
    except OSError as exc:  # reset or broken pipe: the process went away mid-request
        return done(ok=False, error=UNAVAILABLE, message=f"the connection to process {pid} failed: {exc.strerror or exc}")
    if response.get("ok"):
        return done(ok=True, result=response.get("result"))
    error = dict(response.get("error") or {})
    return done(ok=False, error=str(error.pop("error", "Error")), message=str(error.pop("message", "")), details=error)


def request_all(pids, op: str, wait: float, fields_for=None, **fields) -> dict[int, Outcome]:
    """Send `op` to every PID concurrently; returns {pid: Outcome} in the
    order of `pids`. `fields_for(pid)`, if given, adds per-process fields.
    Every request has its own deadline of `wait` seconds."""
    pids = list(dict.fromkeys(pids))
    out: dict[int, Outcome] = {}
    if not pids:
        return out
    slots = threading.BoundedSemaphore(MAX_PARALLEL)

    def one(pid):
        with slots:
            extra = fields_for(pid) if fields_for else {}
            out[pid] = request_one(pid, op, wait, {**fields, **extra})

    if len(pids) == 1:  # no thread for the common single-process case
        one(pids[0])
    else:
        threads = [threading.Thread(target=one, args=(pid,), daemon=True, name=f"livepatch-{op}-{pid}") for pid in pids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {pid: out[pid] for pid in pids}
