"""Per-service state on disk: the bundles applied to a service, their
ordered record, and the service's history, so that a fix survives a
restart and every process of the service (master and workers share one
directory) can answer `history` for what happened before it started.

Location: `$LIVEPATCH_STATE_DIR/<name>` (or `start(state_dir=...)`), else
`/var/lib/livepatch/<name>` for root, else `$XDG_STATE_HOME/livepatch/<name>`
(default `~/.local/state/livepatch/<name>`). The directory is created 0700
by the first write (a service that never gets a patch leaves nothing) and
refused, like the socket directory, when it is a symlink, has another
owner or any group/other bits, or when a directory above it lets others
replace it (group/world writable without the sticky bit, or owned by
another user). Contents:

    bundles/<id>-<sha256 prefix>.lpb   the applied bundles, byte for byte
    applied.json                       ordered list of applied records
    history.jsonl                      one JSON object per event, kept
                                       LIVEPATCH_HISTORY_DAYS (default 30)
                                       and at most HISTORY_MAX_BYTES
    retired/                           bundles that no longer apply here
    .lock                              flock(2) serialising every update

At agent start (`on_agent_start`) every record is verified again against
the agent's trusted keys and applied in order; targets whose modules are
not imported yet are committed by the engine as they are imported. A
record that fails verification or whose baseline does not match the
running code is *retired*: moved out of the record with a history entry,
never applied to the wrong code.

A forked child inherits its parent's patch stack in memory (pending parts
included); its agent applies only the records that stack does not already
hold (`engine.applied_ids()`, plus what an applied cumulative patch
replaced), so nothing is applied twice. A record the parent lacks (its
apply was refused there) is applied in the child like at any start.

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

REAPPLY_TIMEOUT = 5.0
# Refusals that mean "this bundle is not for the code that runs here".
_WRONG_CODE = ("BaselineMismatch", "TargetNotFound", "IncompatibleChange")


class State(Records):
    """One service's state directory: its applied records and its history."""


# ------------------------------------------------------------ agent hooks

_current = {"state": None, "agent": None}
_classes: dict = {}  # patch id -> classification, for history entries and log lines
_local = threading.local()  # .reapplying: the record being re-applied on this thread


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
            for rec in state.records():
                if rec.get("classification"):
                    _classes[rec["id"]] = rec["classification"]
            _reapply(agent, state)
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
    if patch_id in _classes:
        return _classes[patch_id]
    import livepatch
    with contextlib.suppress(Exception):
        for p in livepatch.engine.status()["applied"]:
            if p["id"] == patch_id and p["metadata"].get("classification"):
                _classes[patch_id] = p["metadata"]["classification"]
                return _classes[patch_id]
    return None


_KEEP = ("reason", "error", "module", "targets", "pending", "pause_ns", "attempts", "functions", "forced", "commit",
         "peer", "allow_downgrade", "downgrade", "authorization", "trust", "keys", "replaced",
         "bundle_sha256", "size", "field")


def _on_entry(entry: dict) -> None:
    """Engine listener: one history line on disk and one log line."""
    rec = getattr(_local, "reapplying", None)
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
    if action == "import" and out["outcome"] == "refused" and out.get("error") in _WRONG_CODE:
        _retire(state, patch_id, f"{out.get('module') or 'a module'} as imported here does not match the bundle's "
                                 f"baseline ({out.get('error')}): {_log._first_line(out.get('reason'))}")


def _retire(state: State, patch_id: str, reason: str, sha256: str | None = None) -> None:
    try:
        entry = state.retire(patch_id, reason, sha256)
    except (OSError, UnsafeState) as exc:
        _log.logger.error("livepatch: could not retire %s in %s: %s", patch_id, state.path,
                          getattr(exc, "strerror", None) or exc)
        return
    if entry is not None:
        _log.log_entry(entry, entry.get("classification"))


def _missing_modules(manifest: dict) -> list[str]:
    from livepatch.locate import loaded_module
    names = {t["target"].partition(":")[0] for t in manifest.get("targets", ())}
    names |= {g["name"].partition(":")[0] for g in manifest.get("globals", ())}
    return sorted(n for n in names if loaded_module(n) is None)


def _held(engine) -> set:
    """Ids this process already runs: applied, or replaced by an applied
    cumulative patch (a forked child inherits both from its parent)."""
    held = set(engine.applied_ids())
    with contextlib.suppress(Exception):
        for p in engine.status()["applied"]:
            held.update(p.get("replaces") or ())
    return held


def _reapply(agent, state: State) -> None:
    records = state.records()
    if not records:
        return  # nothing recorded: the engine is left to the first request that needs it
    import livepatch
    held = _held(livepatch.engine)
    for rec in records:
        if rec["id"] in held:
            continue  # inherited through fork, or applied already
        try:
            _reapply_one(agent, state, rec)
        except Exception as exc:  # one bad record must not stop the others
            _log.logger.error("livepatch: re-applying %s failed: %s: %s", rec["id"], type(exc).__name__,
                              _log._first_line(exc))
        finally:
            _local.reapplying = None


def _reapply_one(agent, state: State, rec: dict) -> None:
    import livepatch
    from livepatch.bundle import read, to_patch
    from livepatch.errors import PatchError
    try:
        data = state.read_bundle(rec)
    except UnsafeState as exc:
        _retire(state, rec["id"], f"recorded bundle unusable: {exc}", rec["sha256"])
        return
    manifest = None
    try:
        bundle = read(data, agent.trusted, allow_unsigned=agent.allow_unsigned)
        manifest = bundle.manifest
        if bundle.id != rec["id"]:
            raise PatchError(f"bundle carries id {bundle.id!r}, recorded as {rec['id']!r}")
        _classes[bundle.id] = manifest.get("classification")
        patch = to_patch(bundle)
    except Exception as exc:  # a PatchError, or an import a new global needs failing here
        if manifest is not None and type(exc).__name__ == "TargetNotFound" and _missing_modules(manifest):
            _log.logger.warning("livepatch: not re-applying %s in this process: %s; the record is kept",
                                rec["id"], _log._first_line(exc))
            return
        what = "failed verification" if manifest is None else "cannot be loaded here"
        _retire(state, rec["id"], f"recorded bundle {what}: {type(exc).__name__}: {_log._first_line(exc)}",
                rec["sha256"])
        return
    _local.reapplying = rec
    try:
        livepatch.engine.apply(patch, timeout=REAPPLY_TIMEOUT)
    except PatchError as exc:
        kind = type(exc).__name__
        if kind == "TargetNotFound" and _missing_modules(manifest):
            return  # the engine cannot hold pending targets: kept for a later start
        if kind in _WRONG_CODE or "requires" in {p.category for p in exc.problems}:
            _retire(state, rec["id"], f"does not apply to the code running here ({kind}): "
                                      f"{_log._first_line(exc)}", rec["sha256"])
        # busy or a failed commit: kept, the next start tries again


def on_applied(agent, data: bytes, bundle) -> bool:
    """After a successful apply: keep the bundle and its record."""
    state = getattr(agent, "state", None)
    _classes[bundle.id] = bundle.manifest.get("classification")
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
