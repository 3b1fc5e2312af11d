"""An engine's history and warnings, and the listeners told of every entry.

Entries are recorded while the engine lock is held and handed to listeners
after it is released (`flush`), so a listener that writes files or logs
never holds up a commit or an import, and may call back into the engine.
Each entry is handed over on the thread whose apply, rollback or import
made it (a listener may read that request's context, e.g. its peer), one
listener call at a time."""

from __future__ import annotations

import datetime
import threading
import time
from collections import deque

from .errors import Cancelled, CommitFailed, PatchError


def outcome_of(exc: Exception) -> str:
    """"refused" for a refusal (nothing was touched), "cancelled" when its
    client went away first (nothing was touched either), else "failed"."""
    if isinstance(exc, Cancelled):
        return "cancelled"
    return "refused" if isinstance(exc, PatchError) and not isinstance(exc, CommitFailed) else "failed"


def now_iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds")


# What an engine keeps for `status` and `history`: the newest entries, none
# older than MAX_AGE seconds, each compact (a count for its targets: the
# listeners, which write the service's history, get every target). A service
# applying and rolling back for months keeps a bounded record in memory.
MAX_ENTRIES = 1000
MAX_AGE = 7 * 24 * 3600
MAX_WARNINGS = 100
# problems kept per entry (a refused patch of 1,000 targets names them all once, to its listeners)
MAX_PROBLEMS = 20


def compact(entry: dict) -> dict:
    """The entry as kept: target names replaced by their count, problems cut."""
    kept = dict(entry)
    targets = kept.pop("targets", None)
    if targets is not None:
        kept["target_count"] = len(targets)
    problems = kept.get("problems")
    if problems and len(problems) > MAX_PROBLEMS:
        kept["problems"] = problems[:MAX_PROBLEMS]
        kept["problems_total"] = len(problems)
    return kept


class History:
    def __init__(self):
        self.entries: deque[dict] = deque(maxlen=MAX_ENTRIES)
        self.warnings: deque[str] = deque(maxlen=MAX_WARNINGS)
        self._listeners: tuple = ()
        # entries this thread recorded and has not handed to listeners yet
        self._outbox = threading.local()
        # one thread delivers at a time (re-entrant: a listener may apply)
        self._delivering = threading.RLock()

    def record(self, action, patch_id, outcome, reason="", result=None, exc=None, **extra) -> dict:
        entry = {"time": now_iso(time.time()), "action": action, "patch": patch_id, "outcome": outcome}
        if result is not None:
            entry.update(pause_ns=result.pause_ns, attempts=result.attempts, forced=result.forced, commit=result.method,
                         functions=result.functions, targets=result.targets)
            if result.interrupted_by:
                entry["interrupted_by"] = list(result.interrupted_by)
        if exc is not None:
            entry.update(reason=reason, error=type(exc).__name__,
                         problems=[p.to_dict() for p in getattr(exc, "problems", ())])
        entry.update({k: v for k, v in extra.items() if v is not None})
        self.entries.append(compact(entry))
        cutoff = now_iso(time.time() - MAX_AGE)  # ISO times in UTC sort as strings
        while self.entries and self.entries[0]["time"] < cutoff:
            self.entries.popleft()
        if self._listeners:
            self._mine().append(entry)
        return entry

    def _mine(self) -> deque:
        try:
            return self._outbox.entries
        except AttributeError:
            self._outbox.entries = deque()
            return self._outbox.entries

    def add_listener(self, fn) -> None:
        if fn not in self._listeners:
            self._listeners = self._listeners + (fn,)

    def remove_listener(self, fn) -> None:
        self._listeners = tuple(f for f in self._listeners if f != fn)

    def flush(self) -> None:
        """Hand the entries this thread recorded to every listener. Call it
        without holding the engine lock."""
        mine = self._mine()
        if not mine:
            return
        with self._delivering:
            self._deliver(mine)

    def _deliver(self, mine: deque) -> None:
        while mine:
            entry = mine.popleft()
            for fn in self._listeners:
                try:
                    fn(dict(entry))
                except Exception as exc:  # a listener never breaks an apply or an import
                    self.warnings.append(f"history listener {getattr(fn, '__qualname__', fn)!r} failed on "
                                         f"{entry['action']} {entry['patch']}: {type(exc).__name__}: {exc}")

    def forget_unsent(self) -> None:
        """After a fork: the parent hands its own entries to its listeners."""
        self._outbox = threading.local()
        self._delivering = threading.RLock()
