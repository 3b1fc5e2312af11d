"""What the agent tells the service's own logs: one line per apply,
rollback, refusal, failure, import-time commit or refusal, re-apply and
retirement, on the standard `logging` logger named `livepatch`.

No handler is configured here: the service decides where its logs go. With
no handler at all, WARNING and above still reach stderr through logging's
last resort."""

from __future__ import annotations

import collections
import logging
import threading

from livepatch import atfork

logger = logging.getLogger("livepatch")

_VERB = {"apply": "applied", "reapply": "re-applied", "rollback": "rolled back"}


def _ns(ns) -> str:
    return f"{ns / 1000:.1f} µs" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _pending_modules(pending) -> list[str]:
    if isinstance(pending, dict):
        return sorted(pending)
    if isinstance(pending, (list, tuple)):
        return sorted(str(m) for m in pending)
    return []


def _first_line(text) -> str:
    text = str(text or "").strip()
    return text.splitlines()[0][:300] if text else ""


def describe(entry: dict, classification: str | None = None) -> str:
    """The log line for one history entry (engine entries, plus the agent's
    own "reapply" and "retire")."""
    action = entry.get("action", "?")
    patch = entry.get("patch") or "?"
    outcome = entry.get("outcome", "?")
    label = f"{patch} ({classification})" if classification else patch
    module = entry.get("module")
    if action == "trust":
        from .trust import describe as trust_line
        return trust_line(entry)
    if action == "retire":
        return f"livepatch: retired {label}: {_first_line(entry.get('reason'))}; it will not be applied again"
    if outcome == "ok":
        if action == "import":
            n = len(entry.get("targets") or ())
            return f"livepatch: applied {label} to {module} on import ({_plural(n, 'target')})"
        line = f"livepatch: {_VERB.get(action, action)} {label}"
        targets = len(entry.get("targets") or ())
        if targets or not entry.get("pending"):
            line += f" {'from' if action == 'rollback' else 'to'} {_plural(targets, 'target')}"
        if entry.get("pause_ns"):
            line += f", pause {_ns(entry['pause_ns'])}"
        if entry.get("forced"):
            line += " (FORCED)"
        pending = _pending_modules(entry.get("pending"))
        if pending and action == "rollback":
            line += f"; dropped what was waiting for the import of {', '.join(pending)}"
        elif pending:
            line += f"; {_plural(len(pending), 'module')} pending: {', '.join(pending)}"
        return line
    error = entry.get("error") or outcome
    reason = _first_line(entry.get("reason"))
    verb = {"apply": "apply", "reapply": "re-apply", "rollback": "roll back", "import": "apply"}.get(action, action)
    where = f" to {module} on import" if action == "import" else ""
    if outcome == "rejected":  # never verified: no id to trust, the digest names it
        what = patch if entry.get("patch") else f"a bundle (sha256 {str(entry.get('bundle_sha256') or '?')[:16]})"
        return f"livepatch: rejected {what} sent to {action}: {error}" + (f": {reason}" if reason and reason != error else "")
    if outcome == "cancelled":
        return f"livepatch: cancelled the {action} of {label}{where} (its client went away); nothing was changed"
    word = "refused" if outcome == "refused" else "failed"
    return f"livepatch: {word} to {verb} {label}{where}: {error}" + (f": {reason}" if reason and reason != error else "")


def level_of(entry: dict) -> int:
    outcome = entry.get("outcome")
    if entry.get("action") == "retire" or outcome in ("refused", "rejected"):
        return logging.WARNING
    if outcome == "failed":
        return logging.ERROR
    return logging.INFO


# The agent usually starts before the service configures logging, so the
# lines of re-applies at start would find no handler and INFO would be lost:
# they are held (with their original time) and handed over with the next
# line once a handler exists. WARNING and above go out at once (logging's
# last resort prints them to stderr).
_early: collections.deque = collections.deque(maxlen=200)
_early_lock = threading.Lock()


def log_entry(entry: dict, classification: str | None = None) -> None:
    level = level_of(entry)
    if not logger.isEnabledFor(level) and logger.hasHandlers():
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, "%s", (describe(entry, classification),), None)
    with _early_lock:
        if not logger.hasHandlers():
            if level < logging.WARNING:
                _early.append(record)
                return
        else:
            _flush_locked()
    logger.handle(record)


def flush_early() -> None:
    """Hand held lines to the handlers the service has set up by now."""
    with _early_lock:
        _flush_locked()


def _flush_locked() -> None:
    while _early and logger.hasHandlers():
        record = _early.popleft()
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _after_fork_in_child() -> None:
    global _early_lock
    _early_lock = threading.Lock()  # a thread of the parent may have held it
    _early.clear()  # the parent reports its own lines


atfork.on_child_reset(_after_fork_in_child)
