"""A service's history on disk: `history.jsonl` in its state directory,
one JSON object per event (apply, rollback, import, retire, ...) from every
process of the service, so that `history` answers for what happened before
a process started. Kept LIVEPATCH_HISTORY_DAYS (default 30) and at most
HISTORY_MAX_BYTES; retired bundles are kept as long as the history that
names them."""

from __future__ import annotations

import contextlib
import json
import os
import time

# datetime is imported where used: an agent whose history is empty may never need it
from . import log as _log
from .state_dir import StateDir, UnsafeState

HISTORY_DAYS = 30.0
HISTORY_MAX_BYTES = 8 << 20  # beyond this, the oldest half goes, whatever its age


def now_iso(ts: float | None = None) -> str:
    import datetime
    ts = time.time() if ts is None else ts
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds")


def parse_time(text) -> float | None:
    import datetime
    try:
        return datetime.datetime.fromisoformat(str(text)).timestamp()
    except (TypeError, ValueError):
        return None


def history_days() -> float:
    raw = os.environ.get("LIVEPATCH_HISTORY_DAYS")
    if raw is None:
        return HISTORY_DAYS
    try:
        days = float(raw)
        if days > 0 and days == days:
            return days
    except ValueError:
        pass
    _log.logger.warning("livepatch: LIVEPATCH_HISTORY_DAYS=%r is not a positive number of days; keeping %g",
                        raw[:40], HISTORY_DAYS)
    return HISTORY_DAYS

class History(StateDir):
    """The history file of a state directory: appended under the lock,
    read whole, pruned by age and size."""

    def append(self, entry: dict) -> None:
        with self.locked():
            self._append_locked(entry)

    def _append_locked(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        fd = os.open(os.path.join(self.path, "history.jsonl"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > HISTORY_MAX_BYTES:
            self._trim_locked()

    def _trim_locked(self) -> None:
        """Keep the newest half of an oversized history (a service whose
        workers are recycled all day writes an import entry per worker)."""
        raw = self._read("history.jsonl") or b""
        tail = raw[-(HISTORY_MAX_BYTES // 2):]
        cut = tail.find(b"\n") + 1 if len(tail) < len(raw) else 0
        self._write("history.jsonl", tail[cut:])

    def history(self) -> list[dict]:
        raw = self._read_or_warn("history.jsonl", "history")
        out, bad = [], 0
        for line in (raw or b"").splitlines():
            try:
                entry = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                entry = None
            if isinstance(entry, dict):
                out.append(entry)
            elif line.strip():
                bad += 1
        if bad:
            self._warn_once("history-lines", f"{self.path}/history.jsonl has {bad} unreadable line(s); skipping them")
        return out

    def prune(self, days: float | None = None) -> int:
        """Drop history entries (and retired bundles) older than `days`;
        returns how many entries went. Cheap when nothing is old: only the
        first line is read."""
        cutoff = time.time() - 86400 * (history_days() if days is None else days)
        try:
            if not self._present():
                return 0
            fd = os.open(os.path.join(self.path, "history.jsonl"),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (OSError, UnsafeState):
            return 0
        with os.fdopen(fd, "rb") as fh:
            first = fh.readline(1 << 20).strip()
        try:
            oldest = parse_time(json.loads(first).get("time")) if first else None
        except (ValueError, AttributeError, UnicodeDecodeError):
            oldest = 0.0  # unreadable first line: rewrite without it
        self._prune_retired(cutoff)
        if oldest is None or oldest >= cutoff:
            return 0
        with self.locked():
            entries = self.history()
            keep = [e for e in entries if (parse_time(e.get("time")) or 0.0) >= cutoff]
            self._write("history.jsonl", b"".join(json.dumps(e, separators=(",", ":"), default=str).encode() + b"\n"
                                                  for e in keep))
        return len(entries) - len(keep)

    def _prune_retired(self, cutoff: float) -> None:
        folder = os.path.join(self.path, "retired")
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                p = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    if st.st_mtime < cutoff:
                        os.unlink(p)
