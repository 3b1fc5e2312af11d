"""Committing an applied patch's part for a module when that module's code
has run: at its first import (the part was pending), or again when it is
executed anew (`importlib.reload`, or an import after it was dropped from
`sys.modules`: the module then holds new functions with the code on disk).

The import hook (`imports`) calls `module_executed` right after the
module's code ran, before the import returns; each applied patch's part is
then one transition of the engine, in stack order, all of that part or none
of it. A refusal or failure is recorded (`"action": "import"`) and leaves
the module as its code left it. A part whose import was already under way
when it became pending is committed as soon as that import ends
(`catch_up`)."""

from __future__ import annotations

import threading

from . import imports
from .errors import PatchError, Problem
from .history import outcome_of
from .locate import loaded_module
from .patch import Patch
from .pending import imported, materialise


class EngineBusy(Exception):
    """The engine lock was not free in time."""


class ImportCommits:
    def __init__(self, engine):
        self._engine = engine

    def watch(self) -> None:
        """Watch every module an applied patch has a part for: pending ones
        to commit them, the others to commit them again if re-executed."""
        engine = self._engine
        imports.watch(id(engine), {m for p in engine._stack for m in p.parts}, self.module_executed)

    def module_executed(self, name: str, module) -> None:
        """Called by the import hook once `name`'s code has run: commit
        every applied patch's part for it."""
        engine = self._engine
        if engine._owner == threading.get_ident():
            # an import made by the engine's own work (a new global's
            # import): committed as soon as that work lets go of the lock
            engine._deferred.append(name)
            return
        wanted = self.parts_for(name, only_pending=False)
        try:
            self.commit(name, wanted, wait=engine.import_timeout)
        except EngineBusy:
            # Another apply or rollback has held the engine for that long,
            # perhaps waiting for a function this very import runs inside:
            # let the import return, and commit as soon as the engine is free.
            engine._log.warnings.append(f"{name} was imported while the engine was busy for over "
                                        f"{engine.import_timeout:g}s: its part was committed after the import returned")
            threading.Thread(target=self.commit, args=(name, wanted), kwargs={"late": True},
                             name="livepatch-late-import", daemon=True).start()

    def catch_up(self, name: str) -> None:
        """Commit pending parts for `name` if it got imported without the
        hook seeing it (its import was under way when the part became
        pending, or a cumulative patch was rolled back meanwhile)."""
        if imported(name) is not None:
            self.commit(name, self.parts_for(name, only_pending=True))

    def parts_for(self, name: str, only_pending: bool) -> list:
        """[(applied patch, its part for `name` was pending)] to commit now."""
        return [(p, name in p.pending) for p in list(self._engine._stack)
                if name in p.parts and (name in p.pending or not only_pending)]

    def commit(self, name: str, wanted: list, wait: float = -1, late: bool = False) -> None:
        engine = self._engine
        module = loaded_module(name)
        if module is None or not wanted:
            return
        # built before the lock (may import): see Engine.apply
        values = {}
        for p, _ in wanted:
            try:
                values[id(p)] = materialise(p.parts[name].globals, module)
            except Exception as exc:
                values[id(p)] = exc
        was_pending = {id(p): pending for p, pending in wanted}
        with engine._exclusive(wait):
            refused = set()
            for applied in engine._stack:
                if id(applied) not in was_pending:
                    continue
                if was_pending[id(applied)] and name not in applied.pending:
                    continue  # committed (or refused) meanwhile by another path
                part = applied.parts[name]
                try:
                    if isinstance(values[id(applied)], Exception):
                        raise values[id(applied)]
                    blocked = [r for r in applied.requires if r in refused]
                    if blocked:
                        raise PatchError(f"{applied.id} requires {', '.join(blocked)}, refused for {name}",
                                         [Problem("requires", "", f"{r} was refused for {name}") for r in blocked])
                    now = Patch(applied.id, part.changes, new_globals=values[id(applied)])
                    build = lambda heap: engine._apply_plan(now, heap)  # noqa: E731
                    result, done = engine._transition("import", applied.id, build, {name}, engine.import_timeout,
                                                      applied.forced)
                except Exception as exc:
                    refused.add(applied.id)
                    applied.pending = applied.pending - {name}
                    applied.refused = {**applied.refused, name: str(exc).splitlines()[0]}
                    engine._record("import", applied.id, outcome_of(exc), str(exc), exc=exc, module=name,
                                   targets=part.targets)
                    continue
                # one statement: a fork sees the commit either finished or undone (forksafe)
                (applied.switches, applied.globals, applied.saved_defaults, applied.pending,
                 engine._in_flight) = (applied.switches + done.switches, applied.globals + done.globals,
                                       applied.saved_defaults + done.saved_defaults, applied.pending - {name}, None)
                applied.refused = {m: why for m, why in applied.refused.items() if m != name}
                engine._record("import", applied.id, "ok", "", result=result, module=name, late=late or None)
