"""The agent's trusted keys: loading them at start without ever taking the
service down, and reloading them in a running agent (`reload-trust`).

At start a trust store that is missing or unsafe (livepatch/signing.py
says why) is one line on the `livepatch` logger and the agent runs with no
trusted keys, so every signed bundle is refused; so is an agent started
with no store at all (unless unsigned bundles are allowed). A reload reads
the store (the one given, else the one in use) with the same checks and
replaces the keys only if it loads: a bad path changes nothing. Each reload
is a history entry (`"action": "trust"`) and a log line."""

from __future__ import annotations

import os

NO_KEYS = "no trusted keys: every signed bundle will be refused"


class Refused(Exception):
    """A reload that changed nothing; `kind` is the error's name for the client."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# What this process (or the parent it was forked from) has warned about:
# twenty forked workers of one service say it once, in the master.
_warned: set = set()


def initial(agent) -> None:
    """Set agent.trusted (and agent.trust_problem) from agent.trust_source."""
    agent.trust_problem = None
    agent.trusted = {}
    if not agent.trust_source:
        if not agent.allow_unsigned:
            agent.trust_problem = "no trust store given (--trust)"
            _warn_once("livepatch: agent in process %d started without --trust: %s", NO_KEYS)
        return
    from livepatch.signing import load_trusted
    try:
        agent.trusted = load_trusted(agent.trust_source)
    except Exception as exc:  # missing, unsafe, unreadable: never fatal to the service
        agent.trust_problem = _line(exc)
        _warn_once("livepatch: agent in process %d: %s", f"{agent.trust_problem}; {NO_KEYS}")


def _warn_once(template: str, text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        _logger().warning(template, os.getpid(), text)


def reload(agent, request) -> dict:
    """The `reload-trust` request: {"trust": path} (optional; default the
    store in use). Returns the source and the key ids now trusted."""
    import livepatch
    from livepatch.signing import load_trusted
    source = request.get("trust")
    if source is None:
        source = agent.trust_source  # what start() was given: a path, or a list of them
        if not source:
            raise Refused("BadRequest", "this agent has no trust store to reload; give one (--trust KEYFILE_OR_DIR)")
    elif not isinstance(source, str) or not source or len(source) > 4096 or "\0" in source:
        raise Refused("BadRequest", "trust must be the path of a .pub file or of a directory of them")
    elif not os.path.isabs(source):
        raise Refused("BadRequest", "trust must be an absolute path (the agent's working directory is not the client's)")
    before = sorted(agent.trusted)
    try:
        keys = load_trusted(source)
    except Exception as exc:
        _record(livepatch.engine, "refused", source, before, reason=_line(exc), exc=exc)
        raise Refused(type(exc).__name__, f"{_line(exc)}; nothing changed: the agent still trusts "
                                          f"{len(before)} key{'s' * (len(before) != 1)}") from None
    agent.trusted, agent.trust_source, agent.trust_problem = keys, source, None
    _warned.clear()  # a later problem is news again
    _follow(agent, source)
    ids = sorted(keys)
    _record(livepatch.engine, "ok", source, ids, replaced=before)
    return {"trust": source, "trusted_keys": ids, "added": sorted(set(ids) - set(before)),
            "removed": sorted(set(before) - set(ids))}


def describe(entry: dict) -> str:
    """The log line of a trust history entry (agent/log.py)."""
    keys = entry.get("keys") or []
    if entry.get("outcome") == "ok":
        shown = f" ({', '.join(k[:4] + '...' for k in keys)})" if keys else f": {NO_KEYS}"
        return f"livepatch: trusted keys reloaded from {entry.get('trust')}: {len(keys)} key{'s' * (len(keys) != 1)}{shown}"
    return (f"livepatch: trusted keys not reloaded from {entry.get('trust')}: {entry.get('reason')}; "
            f"still trusting {len(keys)} key{'s' * (len(keys) != 1)}")


def _record(engine, outcome: str, source: str, keys, reason: str = "", exc=None, **extra) -> None:
    from . import ordering
    log = engine._log  # the engine's history: persisted and logged by its listeners (agent/state.py)
    log.record("trust", "", outcome, reason, exc=exc, trust=source, keys=list(keys),
               peer=ordering.record_fields().get("peer"), **extra)
    log.flush()


def _follow(agent, source: str) -> None:
    """Children forked or spawned from now on use the new store too."""
    from . import _export
    import livepatch.agent as package
    options = package._options
    if options is not None and package._agent is agent:
        options["trust"] = source
        _export(options)


def _logger():
    import logging
    return logging.getLogger("livepatch")


def _line(exc) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
