"""One request to many agents at once, from one process: a thread per
agent, each connection with its own deadline, and one outcome per process
(its result, or why there is none). A slow or dead agent costs its own
deadline, never the others' time; nothing here decides what an outcome
means for the operation (that is the caller's).

Ctrl-C during an apply or rollback asks every agent to cancel it (see
livepatch/cancel.py) and raises Interrupted with what each one answered."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# At most this many connections are open at once (a service with hundreds
# of workers must not exhaust the CLI's file descriptors).
MAX_PARALLEL = 64

UNAVAILABLE = "AgentUnavailable"
TIMEOUT = "Timeout"
CANCELLED = "Cancelled"
# requests an agent abandons, before any store, when their client goes away
CANCELLABLE = ("apply", "rollback")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during request_all of an apply or rollback, after every
    request in flight was asked to cancel: `outcomes` {pid: Outcome} holds
    each answer (CANCELLED; a result if that process finished first; or
    TIMEOUT if it did not confirm in time)."""

    def __init__(self, outcomes: dict):
        super().__init__("interrupted")
        self.outcomes = outcomes


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


def request_one(pid: int, op: str, wait: float, fields: dict, group=None) -> Outcome:
    """One request; with a cancel.Group, one that the group can cancel."""
    from . import cancel
    from .client import AgentUnavailable, request
    started = time.perf_counter()

    def done(**kw):
        return Outcome(pid, elapsed_ms=round((time.perf_counter() - started) * 1000, 2), **kw)
    try:
        if group is not None:
            response = cancel.request(pid, op, wait=wait, group=group, **fields)
        else:
            response = request(pid, op, wait=wait, **fields)
    except AgentUnavailable as exc:
        return done(ok=False, error=UNAVAILABLE, message=str(exc))
    except TimeoutError:
        return done(ok=False, error=TIMEOUT, message=f"the agent of process {pid} did not answer within {wait:g}s")
    except OSError as exc:  # reset or broken pipe: the process went away mid-request
        return done(ok=False, error=UNAVAILABLE, message=f"the connection to process {pid} failed: {exc.strerror or exc}")
    return _outcome(response, done)


def _outcome(response: dict, done) -> Outcome:
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
    from . import cancel
    group = cancel.Group() if op in CANCELLABLE else None

    def one(pid):
        with slots:
            extra = fields_for(pid) if fields_for else {}
            out[pid] = request_one(pid, op, wait, {**fields, **extra}, group)

    threads = []
    try:
        if len(pids) == 1:  # no thread for the common single-process case
            one(pids[0])
        else:
            threads = [threading.Thread(target=one, args=(pid,), daemon=True, name=f"livepatch-{op}-{pid}") for pid in pids]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    except KeyboardInterrupt as exc:
        if group is None:
            raise
        group.cancel_all()
        if isinstance(exc, cancel.Interrupted):  # raised in this thread by its own request
            out[exc.pid] = (_outcome(exc.response, lambda **kw: Outcome(exc.pid, **kw)) if exc.response else
                            Outcome(exc.pid, False, error=TIMEOUT, message="did not confirm the cancel"))
        elif not threads:  # while connecting, in this thread: nothing was sent
            out[pids[0]] = Outcome(pids[0], False, error=CANCELLED, message="interrupted before the request was sent")
        # polled, not joined: a join that Ctrl-C interrupted may not wait again
        deadline = time.monotonic() + cancel.CONFIRM_WAIT
        try:
            while threads and time.monotonic() < deadline and not all(pid in out for pid in pids):
                time.sleep(0.02)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting for confirmations
        raise Interrupted({pid: out.get(pid) or Outcome(pid, False, error=TIMEOUT, message="did not confirm the cancel")
                           for pid in pids}) from None
    return {pid: out[pid] for pid in pids}
