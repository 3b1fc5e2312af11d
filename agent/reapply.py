"""Re-applying a service's recorded bundles at agent start, so that a fix
survives a restart.

Every record is verified again against the agent's trusted keys and
applied in order; targets whose modules are not imported yet are committed
by the engine as they are imported. A record that fails verification or
whose baseline does not match the running code is *retired* (moved out of
the record with a history entry), never applied to the wrong code; one
whose modules are not imported in this process, or that meets a busy
safe point or a failed commit, is kept for a later start.

A forked child inherits its parent's patch stack in memory (pending parts
included); its agent applies only the records that stack does not already
hold (`engine.applied_ids()`, plus what an applied cumulative patch
replaced), so nothing is applied twice. A record the parent lacks (its
apply was refused there) is applied in the child like at any start."""

from __future__ import annotations

import contextlib

from . import log as _log
from .state import WRONG_CODE, State, classifications, reapplying, retire
from .state_dir import UnsafeState

REAPPLY_TIMEOUT = 5.0


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


def reapply(agent, state: State, records: list[dict]) -> None:
    """Apply each record this process does not hold yet, in order; one
    that fails is logged and the others still go."""
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
            reapplying.record = None


def _reapply_one(agent, state: State, rec: dict) -> None:
    import livepatch
    from livepatch.bundle import read, to_patch
    from livepatch.errors import PatchError
    try:
        data = state.read_bundle(rec)
    except UnsafeState as exc:
        retire(state, rec["id"], f"recorded bundle unusable: {exc}", rec["sha256"])
        return
    manifest = None
    try:
        bundle = read(data, agent.trusted, allow_unsigned=agent.allow_unsigned)
        manifest = bundle.manifest
        if bundle.id != rec["id"]:
            raise PatchError(f"bundle carries id {bundle.id!r}, recorded as {rec['id']!r}")
        classifications[bundle.id] = manifest.get("classification")
        patch = to_patch(bundle)
    except Exception as exc:  # a PatchError, or an import a new global needs failing here
        if manifest is not None and type(exc).__name__ == "TargetNotFound" and _missing_modules(manifest):
            _log.logger.warning("livepatch: not re-applying %s in this process: %s; the record is kept",
                                rec["id"], _log._first_line(exc))
            return
        what = "failed verification" if manifest is None else "cannot be loaded here"
        retire(state, rec["id"], f"recorded bundle {what}: {type(exc).__name__}: {_log._first_line(exc)}",
               rec["sha256"])
        return
    reapplying.record = rec
    try:
        livepatch.engine.apply(patch, timeout=REAPPLY_TIMEOUT)
    except PatchError as exc:
        kind = type(exc).__name__
        if kind == "TargetNotFound" and _missing_modules(manifest):
            return  # the engine cannot hold pending targets: kept for a later start
        if kind in WRONG_CODE or "requires" in {p.category for p in exc.problems}:
            retire(state, rec["id"], f"does not apply to the code running here ({kind}): "
                                     f"{_log._first_line(exc)}", rec["sha256"])
        # busy or a failed commit: kept, the next start tries again
