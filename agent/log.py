"""What the agent tells the service's own logs: one line per apply,
rollback, refusal, failure, import-time commit or refusal, re-apply and
retirement, on the standard `logging` logger named `livepatch`.

No handler is configured here: the service decides where its logs go. With
no handler at all, WARNING and above still reach stderr through logging's
last resort."""

from __future__ import annotations

import logging

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
    if action == "retire":
        return f"livepatch: retired {label}: {_first_line(entry.get('reason'))}; it will not be applied again"
    if outcome == "ok":
        if action == "import":
            n = len(entry.get("targets") or ())
            return f"livepatch: applied {label} to {module} on import ({_plural(n, 'target')})"
        verb = _VERB.get(action, action)
        line = f"livepatch: {verb} {label} {'from' if action == 'rollback' else 'to'} " \
               f"{_plural(len(entry.get('targets') or ()), 'target')}"
        if entry.get("pause_ns"):
            line += f", pause {_ns(entry['pause_ns'])}"
        if entry.get("forced"):
            line += " (FORCED)"
        pending = _pending_modules(entry.get("pending"))
        if pending:
            line += f"; {_plural(len(pending), 'module')} pending: {', '.join(pending)}"
        return line
    error = entry.get("error") or outcome
    reason = _first_line(entry.get("reason"))
    what = {"apply": "apply", "reapply": "re-apply", "rollback": "rollback"}.get(action, action)
    if action == "import":
        what = f"apply on import of {module}"
    word = "refused" if outcome == "refused" else "failed"
    return f"livepatch: {word} {what} of {label}: {error}" + (f": {reason}" if reason and reason != error else "")


def level_of(entry: dict) -> int:
    outcome = entry.get("outcome")
    if entry.get("action") == "retire" or outcome == "refused":
        return logging.WARNING
    if outcome == "failed":
        return logging.ERROR
    return logging.INFO


def log_entry(entry: dict, classification: str | None = None) -> None:
    logger.log(level_of(entry), "%s", describe(entry, classification))
