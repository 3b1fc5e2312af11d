"""Per-service state on disk as the agent keeps it: the bundles applied to
a service and the service's history, so that a fix survives a restart and
every process of the service (master and workers share one directory) can
answer `history` for what happened before it started. This module opens a
service's state at agent start, writes every engine event to its history
and the log, and records applies and rollbacks. The directory layout:

    bundles/<id>-<sha256 prefix>.lpb   the applied bundles, byte for byte  (agent/records.py)
    applied.json                       ordered list of applied records     (agent/records.py)
    history.jsonl                      one JSON object per event           (agent/history_file.py)
    retired/                           bundles that no longer apply here   (agent/records.py)
    .lock                              flock(2) serialising every update   (agent/state_lock.py)

where it is and how it is kept safe: agent/state_dir.py; what is recorded
is applied again at start by agent/reapply.py.

Only services with a name of their own, an explicit state directory, or
started under `livepatch run` keep state: an agent attached to an arbitrary
process defaults to its program's file name, and unrelated programs must
not share records."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from . import log as _log
from .history_file import now_iso
from .records import Records
from .state_dir import UnsafeState, location

# Refusals that mean "this bundle is not for the code that runs here".
WRONG_CODE = ("BaselineMismatch", "TargetNotFound", "IncompatibleChange")


class State(Records):
    """One service's state directory: its applied records and its history."""


# ------------------------------------------------------------ agent hooks

_current = {"state": None, "agent": None}
classifications: dict = {}  # patch id -> classification, for history entries and log lines
reapplying = threading.local()  # .record: the record being re-applied on this thread (agent/reapply.py)


def _wants_state(agent, root) -> bool:
    env = os.environ
    if root or env.get("LIVEPATCH_STATE_DIR") or env.get("LIVEPATCH_NAME") or env.get("LIVEPATCH_AUTOSTART") == "1":
        return True
    try:
        from . import _default_name
        default = _default_name()
    except ImportError:
        default = os.path.basename(sys.argv[0] or "python")
    return agent.name != default


def open_for(agent, root: str | None = None) -> State | None:
    """The agent's state, or None (logged once) when it cannot be used."""
    root = root or getattr(agent, "state_dir", None)
    if not _wants_state(agent, root):
        return None
    try:
        return State(location(agent.name, root))
    except UnsafeState as exc:
        _log.logger.warning("livepatch: not keeping patches across restarts: %s", exc)
    except OSError as exc:
        _log.logger.warning("livepatch: not keeping patches across restarts: state directory for %r: %s",
                            agent.name, exc.strerror or exc)
    return None


def on_agent_start(agent, state_dir: str | None = None) -> None:
    """Open the service's state, persist and log every engine event from now
    on, and re-apply what is recorded. Never raises into the service."""
    import livepatch
    try:
        state = open_for(agent, state_dir)
        agent.state = state
        _current.update(state=state, agent=agent)
        livepatch.on_engine(_listen)  # without making it: an idle agent needs no engine
        if state is not None:
            state.prune()
            records = state.records()
            for rec in records:
                if rec.get("classification"):
                    classifications[rec["id"]] = rec["classification"]
            if records:  # else the engine is left to the first request that needs it
                from .reapply import reapply
                reapply(agent, state, records)
    except Exception as exc:  # a bug here must not take the service down
        _log.logger.exception("livepatch: state handling at agent start failed: %s", exc)


def _listen(engine) -> None:
    add = getattr(engine, "add_listener", None)
    if add is None:
        return
    # A forked child inherits the parent's registration: never twice.
    with contextlib.suppress(Exception):
        engine.remove_listener(_on_entry)
    add(_on_entry)


def _classification(patch_id):
    if patch_id in classifications:
        return classifications[patch_id]
    import livepatch
    with contextlib.suppress(Exception):
        for p in livepatch.engine.status()["applied"]:
            if p["id"] == patch_id and p["metadata"].get("classification"):
                classifications[patch_id] = p["metadata"]["classification"]
                return classifications[patch_id]
    return None


_KEEP = ("reason", "error", "module", "targets", "pending", "pause_ns", "attempts", "functions", "forced", "commit",
         "peer", "allow_downgrade", "downgrade", "authorization", "trust", "keys", "replaced",
         "bundle_sha256", "size", "field")


def _on_entry(entry: dict) -> None:
    """Engine listener: one history line on disk and one log line."""
    rec = getattr(reapplying, "record", None)
    action = entry.get("action")
    if rec is not None and action == "apply" and entry.get("patch") == rec["id"]:
        action = "reapply"
    patch_id = entry.get("patch")
    out = {"time": entry.get("time") or now_iso(), "pid": os.getpid(), "action": action, "patch": patch_id,
           "classification": _classification(patch_id), "outcome": entry.get("outcome")}
    if action in ("apply", "rollback"):
        # who asked, and what they overrode: listeners run on the request's thread
        from .ordering import record_fields
        entry = {**record_fields(), **entry}
    for key in _KEEP:
        if entry.get(key) not in (None, "", [], {}):
            out[key] = entry[key]
    if entry.get("problems"):
        out["problems"] = list(entry["problems"])[:20]
    _log.log_entry(out, out["classification"])
    state = _current["state"]
    if state is None:
        return
    try:
        state.append(out)
    except (OSError, UnsafeState) as exc:
        state._warn_once("append", f"cannot write {state.path}/history.jsonl: {getattr(exc, 'strerror', None) or exc}")
    if action == "import" and out["outcome"] == "refused" and out.get("error") in WRONG_CODE:
        retire(state, patch_id, f"{out.get('module') or 'a module'} as imported here does not match the bundle's "
                                f"baseline ({out.get('error')}): {_log._first_line(out.get('reason'))}")


def retire(state: State, patch_id: str, reason: str, sha256: str | None = None) -> None:
    """Retire a record (agent/records.py) with a log line, or one saying why it could not be."""
    try:
        entry = state.retire(patch_id, reason, sha256)
    except (OSError, UnsafeState) as exc:
        _log.logger.error("livepatch: could not retire %s in %s: %s", patch_id, state.path,
                          getattr(exc, "strerror", None) or exc)
        return
    if entry is not None:
        _log.log_entry(entry, entry.get("classification"))


def on_applied(agent, data: bytes, bundle) -> bool:
    """After a successful apply: keep the bundle and its record."""
    state = getattr(agent, "state", None)
    classifications[bundle.id] = bundle.manifest.get("classification")
    if state is None:
        return False
    try:
        state.record(data, bundle.manifest, bundle.signed_by)
        return True
    except (OSError, UnsafeState) as exc:
        _log.logger.error("livepatch: applied %s but could not record it in %s: %s; it will not be re-applied "
                          "after a restart", bundle.id, state.path, getattr(exc, "strerror", None) or exc)
        return False


def on_rolled_back(agent, patch_ids) -> None:
    state = getattr(agent, "state", None)
    if state is None:
        return
    try:
        state.remove(patch_ids)
    except (OSError, UnsafeState) as exc:
        _log.logger.error("livepatch: rolled back %s but could not update %s: %s", ", ".join(patch_ids),
                          state.path, getattr(exc, "strerror", None) or exc)


def history(agent) -> list[dict] | None:
    """The persisted history, or None when the agent keeps no state."""
    state = getattr(agent, "state", None)
    return state.history() if state is not None else None


def status_fields(agent) -> dict:
    _log.flush_early()
    state = getattr(agent, "state", None)
    return {"state_dir": state.path if state is not None else None,
            "recorded": state.records() if state is not None else []}
