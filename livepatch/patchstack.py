"""The patch stack: applies, rolls back and replaces patches, keeps the
previous code of every change, and records status and history.

Every operation is a *transition*: a list of code switches (old code object
-> new code object, matched by identity) plus global stores, prepared from a
fresh heap scan, waited on until a safe point, then committed atomically by
`commit` (in one C-level call, or after a GIL handoff when that is not
safe). Apply, rollback and cumulative replace differ only in how the
switches are computed.

A patch's part for a module that is not imported yet stays *pending* on the
applied patch (its changes and new globals, split by module in
`pending`); `importtime` commits it, as a transition of its own, when the
module's code has run, before the import returns. History entries go to
`history`, which hands them to listeners once the engine lock is free."""

from __future__ import annotations

import contextlib
import gc
import itertools
import linecache
import platform
import sys
import threading
import time
import types
import weakref
from dataclasses import dataclass, field

from . import commit as _commit
from . import forksafe, imports, transition
from .checks import check_change, require_supported_runtime
from .errors import PatchError, Problem, RollbackRefused, raise_for
from .fingerprint import fingerprint
from .history import History, now_iso as _now_iso, outcome_of
from .importtime import EngineBusy, ImportCommits
from .locate import HeapIndex, Resolution, loaded_module, resolve, split_target
from .patch import UNCHANGED, Change, Patch
from .pending import AtImport, imported, part_patch, split, targets_by_module
from .values import Recomputed, current, function_of
from .busynow import holders
from .safepoint import count_running

MISSING = object()  # a global that did not exist (before) or is to be deleted (after)


@dataclass(slots=True)
class Switch:
    target: str
    old: types.CodeType
    new: types.CodeType
    allow_active: bool = False
    implied: bool = False  # enclosing code rewritten so future closures get new nested code
    defaults: object = UNCHANGED
    kwdefaults: object = UNCHANGED


@dataclass(slots=True)
class GlobalStore:
    key: str
    owner: object
    name: str
    before: object
    after: object


@dataclass
class AppliedPatch:
    id: str
    switches: list
    globals: list
    saved_defaults: list  # (weakref to function, old __defaults__, old __kwdefaults__)
    applied_at: float
    pause_ns: int
    attempts: int
    forced: bool
    cumulative: bool
    requires: tuple
    metadata: dict
    replaced: list = field(default_factory=list)  # patches a cumulative one replaced
    parts: dict = field(default_factory=dict)  # module -> ModulePart, kept for imports and reloads
    pending: frozenset = frozenset()  # modules whose part waits for their import
    refused: dict = field(default_factory=dict)  # module -> why its part was refused at import
    sources: dict = field(default_factory=dict)  # filename -> its linecache entry, there while in effect
    hooks: object = None  # the patch's migration hooks (livepatch.hooks), run by its rollback

    @property
    def targets(self) -> list[str]:
        return sorted({s.target for s in self.switches if not s.implied} | {g.key for g in self.globals})


@dataclass
class Result:
    patch_id: str
    action: str
    pause_ns: int
    attempts: int
    forced: bool
    functions: int  # function objects whose code was switched
    targets: list
    interrupted_by: list
    window_ns: tuple = (0, 0)  # perf_counter_ns bounds of the commit's GIL hold
    critical_ns: int = 0  # of pause_ns, the final check plus the stores
    method: str = ""  # how the critical section was made: commit.ONE_CALL or AFTER_HANDOFF
    pending: dict = field(default_factory=dict)  # module -> targets committed when it is imported

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _in_applied_order(stack):
    """The patches of `stack` and, before each cumulative one, the patches
    it replaced (recursively): every patch in the order it was applied."""
    for applied in stack:
        if applied.cumulative:
            yield from _in_applied_order(applied.replaced)
        yield applied


def _plain_owner(owner) -> bool:
    """Storing into it runs no Python code: a module or class whose type
    keeps the built-in attribute assignment."""
    return type(owner).__setattr__ is types.ModuleType.__setattr__ or type(owner) in (type, types.FunctionType)


def _resolve_owner(key: str):
    """"module:name" or "module:Class.name" -> (owner object, attribute name)."""
    modname, path = split_target(key)
    module = loaded_module(modname)
    if module is None:
        raise PatchError("bad global", [Problem("not-found", key, f"module {modname!r} is not loaded")])
    *owners, name = path.split(".")
    owner = module
    for i, part in enumerate(owners):
        if i == len(owners) - 1 and name in ("__defaults__", "__kwdefaults__"):  # "module:f.__defaults__"
            owner = function_of(owner, part)
            if owner is None:
                raise PatchError("bad global", [Problem("not-found", key, f"{part!r} is not a function in {modname!r}")])
            break
        owner = getattr(owner, part, None)
        if not isinstance(owner, type):
            raise PatchError("bad global", [Problem("not-found", key, f"{part!r} is not a class in {modname!r}")])
    return owner, name


def _rewrite_nested(code, mapping: dict, out: list):
    """`code` with every nested code constant in `mapping` (by id) replaced,
    recursively; appends (old, new) for every level rewritten."""
    consts = list(code.co_consts)
    changed = False
    for i, const in enumerate(consts):
        if isinstance(const, types.CodeType):
            new = mapping.get(id(const))
            if new is None:
                new = _rewrite_nested(const, mapping, out)
            if new is not const:
                consts[i] = new
                changed = True
    if not changed:
        return code
    new_code = code.replace(co_consts=tuple(consts))
    out.append((code, new_code))
    return new_code


class Engine:
    #: how long an import waits for a safe point to commit its module's part
    import_timeout = 2.0
    #: rejected requests recorded in history; later ones are counted only
    MAX_REJECTIONS = 1000

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None  # ident of the thread holding _lock
        self._stack: list[AppliedPatch] = []
        self._log = History()
        self._forced = False
        self._gc_owed = False  # a transition disabled the GC and will enable it again
        self._in_flight = None  # (ops, undo) of a transition whose bookkeeping is not done
        self._in_progress = None  # what status() says the engine is doing
        self._deferred: list = []  # modules executed while this thread held the lock
        self._settle: list = []  # modules that became pending: an import may already be under way
        self._imports = ImportCommits(self)
        self._rejections = itertools.count()
        forksafe.track(self)

    @property
    def _history(self) -> list:
        return self._log.entries

    @property
    def _warnings(self) -> list:
        return self._log.warnings

    @contextlib.contextmanager
    def _exclusive(self, wait: float = -1):
        """The engine lock, then what must happen outside it: listeners,
        imports that finished while it was held, imports under way. Raises
        EngineBusy if the lock was not free within `wait` seconds."""
        if not self._lock.acquire(timeout=wait):
            raise EngineBusy
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            deferred, settle = self._deferred, self._settle
            self._deferred, self._settle = [], []
            self._owner = None
            self._in_flight = self._in_progress = None
            self._lock.release()
            self._log.flush()
            for name in deferred:
                self._imports.commit(name, self._imports.parts_for(name, only_pending=False))
            for name in settle:
                imports.when_settled(name, self._imports.catch_up)

    def add_listener(self, fn) -> None:
        """`fn(entry)` after every history entry, outside the engine lock,
        one entry at a time and in order, on the thread of an apply,
        rollback or import (an import-time entry: the importing thread)."""
        self._log.add_listener(fn)

    def remove_listener(self, fn) -> None:
        self._log.remove_listener(fn)

    def _record(self, action, patch_id, outcome, reason, result=None, exc=None, **extra):
        self._log.record(action, patch_id, outcome, reason, result=result, exc=exc, **extra)

    # ---------------------------------------------------------------- apply
    def apply(self, patch: Patch, *, timeout: float = 5.0, force: bool = False, cancelled=None) -> Result:
        """`cancelled()`, if given, is asked between attempts: true abandons
        the apply before any store (Cancelled, recorded as "cancelled").
        A patch with hooks runs them around the commit (livepatch.hooks)."""
        if getattr(patch, "hooks", None) is None:
            return self._apply(patch, timeout=timeout, force=force, cancelled=cancelled)
        from .hooks import around_apply
        return around_apply(self, patch, timeout=timeout, force=force, cancelled=cancelled)

    def _apply(self, patch: Patch, *, timeout: float = 5.0, force: bool = False, cancelled=None) -> Result:
        require_supported_runtime()
        self._check_shape(patch)
        try:
            # before the lock: building new globals may import (and so wait
            # for another thread's import, which may be waiting for the lock)
            split_out, split_failed = self._split(patch), None
        except Exception as exc:
            split_out, split_failed = None, exc
        with self._exclusive():
            try:
                if any(p.id == patch.id for p in self._stack):
                    raise PatchError(f"patch {patch.id!r} is already applied")
                if split_failed is not None:
                    raise split_failed
                parts, pending, now = split_out
                build, modules = self._plan_for(patch, now, pending, parts)
                if now.changes or now.new_globals or patch.cumulative:
                    result, applied = self._transition("apply", patch.id, build, modules, timeout, force,
                                                       cancelled=cancelled)
                else:
                    result, applied = self._nothing_committed("apply", patch.id, force)
            except Exception as exc:
                self._record("apply", patch.id, outcome_of(exc), str(exc), exc=exc)
                raise
            applied.cumulative = patch.cumulative
            applied.requires = tuple(patch.requires)
            applied.metadata = dict(patch.metadata or {})
            applied.hooks = getattr(patch, "hooks", None)
            applied.parts, applied.pending = parts, frozenset(pending)
            result.pending = targets_by_module(parts, pending)
            if patch.cumulative:
                applied.replaced = self._stack
                stack = [applied]
            else:
                stack = self._stack + [applied]
            # one statement: a fork sees the commit either finished or undone (forksafe)
            self._stack, self._in_flight = stack, None
            applied.sources = self._register_sources(patch)
            self._release_sources(applied.replaced if patch.cumulative else ())
            self._imports.watch()
            self._settle += sorted(pending)
            self._record("apply", patch.id, "ok", "", result=result, pending=result.pending or None)
            return result

    @staticmethod
    def _split(patch: Patch, run: bool = True):
        """(parts by module, modules not imported yet, the Patch of the
        imported ones with their new globals built); with `run` false, a
        value whose making runs code (an import) is planned, not made."""
        parts = split(patch)
        pending = {name for name in parts if imported(name) is None}
        now = part_patch(patch.id, [(n, p) for n, p in parts.items() if n not in pending], loaded_module, run)
        return parts, pending, now

    def _plan_for(self, patch: Patch, now: Patch = None, pending=(), parts=None):
        """How to compute the transition for `now` (the part of `patch`
        whose modules are imported), and the modules it scans."""
        now = patch if now is None else now
        missing = [r for r in patch.requires if not any(p.id == r for p in self._stack)]
        if missing:
            raise PatchError(f"patch {patch.id!r} requires patches that are not applied: {', '.join(missing)}",
                             [Problem("requires", "", f"{r} is not applied") for r in missing])
        # listed with any refusal of the rest: what would have waited for an import
        notes = [Problem("pending", t, f"module {m!r} is not loaded in this process; it would be patched when imported")
                 for m in sorted(pending) for t in parts[m].targets]
        if patch.cumulative:
            build = lambda heap: self._cumulative_plan(now, heap, notes)  # noqa: E731
        else:
            build = lambda heap: self._apply_plan(now, heap, notes=notes)  # noqa: E731
        modules = {split_target(c.target)[0] for c in now.changes}
        modules |= {split_target(k)[0] for k in (now.new_globals or {})}
        modules |= {split_target(s.target)[0] for p in self._stack for s in p.switches} if patch.cumulative else set()
        return build, modules

    @staticmethod
    def _nothing_committed(action, patch_id, force):
        """A transition with nothing to store (every part is pending)."""
        applied = AppliedPatch(patch_id, [], [], [], time.time(), 0, 0, force, False, (), {})
        return Result(patch_id, action, 0, 0, force, 0, [], []), applied

    def assess(self, patch: Patch) -> dict:
        """Every check of apply() except the safe point and the commit:
        would this patch apply now? Changes nothing, records nothing, runs
        nothing of the patch (its imports are made only by apply); says who
        holds its targets now (`busy_now`, see busynow)."""
        require_supported_runtime()
        try:
            split_out, split_failed = self._split(patch, run=False), None
        except Exception as exc:
            split_out, split_failed = None, exc
        with self._lock:
            if any(p.id == patch.id for p in self._stack):
                return {"patch_id": patch.id, "verdict": "already-applied", "problems": []}
            try:
                self._check_shape(patch)
                if split_failed is not None:
                    raise split_failed
                parts, pending, now = split_out
                build, modules = self._plan_for(patch, now, pending, parts)
                heap = HeapIndex.scan(modules)
                switches, stores = build(heap)
            except PatchError as exc:
                return {"patch_id": patch.id, "verdict": "refused", "error": type(exc).__name__,
                        "message": str(exc).splitlines()[0], "problems": [p.to_dict() for p in exc.problems]}
            busy = {s.target for s in switches if not (s.allow_active or s.implied)
                    and count_running({id(s.old)})}
            busy_now = holders(switches, heap) if switches else []
            return {"patch_id": patch.id, "verdict": "applies", "problems": [],
                    "targets": sorted({s.target for s in switches if not s.implied}),
                    "functions": len(switches), "globals": len(stores),
                    "running_now": sorted(busy), "busy_now": busy_now,
                    "pending": targets_by_module(parts, pending)}

    @staticmethod
    def _check_shape(patch: Patch) -> None:
        problems = []
        if not isinstance(patch.id, str) or not patch.id:
            problems.append(Problem("invalid", "", "patch id must be a non-empty string"))
        seen = set()
        for change in patch.changes:
            if not isinstance(change, Change):
                problems.append(Problem("invalid", "", f"not a Change: {change!r}"))
                continue
            if change.target in seen:
                problems.append(Problem("invalid", change.target, "target appears twice in the patch"))
            seen.add(change.target)
        if not patch.changes and not patch.new_globals and not patch.cumulative:
            problems.append(Problem("invalid", "", "patch has no changes"))
        if patch.cumulative and patch.requires:
            problems.append(Problem("invalid", "", "a cumulative patch replaces the stack; it cannot require patches"))
        if problems:
            raise PatchError("invalid patch", problems)

    def _locate_baseline(self, change: Change, heap: HeapIndex, fps: dict, baseline_of=None):
        """Live code objects of a target whose baseline fingerprint matches.
        `baseline_of` maps a live code to the code it stands in for (for
        cumulative patches: the original baseline under earlier patches)."""
        found = resolve(change.target, heap)
        if isinstance(found, Problem):
            return None, [found]
        if found.builtin is not None:
            return None, [Problem("incompatible:builtin", change.target,
                                  f"{found.builtin!r} is implemented in C; it has no code object to replace")]
        matches, seen = [], []
        for code in found.codes:
            base = baseline_of(code) if baseline_of else code
            fp = fps.get(id(base))
            if fp is None:
                fp = fps[id(base)] = fingerprint(base)
            seen.append(fp)
            if fp == change.baseline:
                matches.append(code)
        if not matches:
            owner = self._patched_by(found.codes)
            note = f" (currently patched by {owner})" if owner else ""
            return None, [Problem("baseline-mismatch", change.target,
                                  f"expected baseline {change.baseline}, running code is {', '.join(sorted(set(seen)))}{note}")]
        problems = []
        for code in matches:
            problems += [p for p in check_change(change, code) if p not in problems]
        return matches, problems

    def _patched_by(self, codes) -> str | None:
        ids = {id(c) for c in codes}
        for p in reversed(self._stack):
            if any(id(s.new) in ids for s in p.switches):
                return p.id
        return None

    def _apply_plan(self, patch: Patch, heap: HeapIndex, baseline_of=None, notes=()):
        fps: dict = {}
        switches, problems = [], []
        for change in patch.changes:
            matches, found = self._locate_baseline(change, heap, fps, baseline_of)
            problems += found
            for code in matches or ():
                switches.append(Switch(change.target, code, change.new_code, change.allow_active,
                                       False, change.defaults, change.kwdefaults))
        raise_for(problems + list(notes) if problems else problems)
        switches += self._implied_switches(switches, heap)
        return switches, self._global_stores(patch.new_globals or {})

    @staticmethod
    def _implied_switches(switches: list, heap: HeapIndex) -> list:
        """For nested targets, rewrite the enclosing code so that closures
        created after the commit run the new nested code too."""
        nested = {id(s.old): s.new for s in switches if "<locals>" in s.target}
        if not nested:
            return []
        explicit = {id(s.old) for s in switches}
        implied, seen = [], set()
        for s in switches:
            if "<locals>" not in s.target:
                continue
            modname, qualname = split_target(s.target)
            outer = qualname.split(".<locals>.")[0]
            found = resolve(f"{modname}:{outer}", heap)
            if not isinstance(found, Resolution):
                continue
            for code in found.codes:
                if id(code) in explicit or id(code) in seen:
                    continue
                seen.add(id(code))
                pairs: list = []
                _rewrite_nested(code, nested, pairs)
                for old, new in pairs:
                    if id(old) not in explicit:
                        implied.append(Switch(f"{modname}:{old.co_qualname}", old, new, True, True))
        return implied

    @staticmethod
    def _global_stores(new_globals: dict) -> list:
        stores = []
        for key, value in new_globals.items():
            if isinstance(value, AtImport):
                raise PatchError("bad global", [Problem("invalid", key, "value was not built for its module")])
            owner, name = _resolve_owner(key)
            before = current(owner, name, MISSING)
            if isinstance(value, Recomputed):  # and what captured the value it replaces (values.py)
                stores += [GlobalStore(*s) for s in value.captured(owner, name, before, MISSING)]
                value = value.value
            stores.append(GlobalStore(key, owner, name, before, value))
        return stores

    # ------------------------------------------------------------- cumulative
    def _cumulative_plan(self, patch: Patch, heap: HeapIndex, notes=()):
        """Replace every applied patch with `patch` in one commit: each live
        code maps back through the stack to its original, then forward to the
        cumulative patch's code (or stays original)."""
        back: dict = {}  # id(code installed by the stack) -> original code
        chain = list(_in_applied_order(self._stack))
        for applied in chain:  # oldest first: each 'old' already maps to its original
            for s in applied.switches:
                back[id(s.new)] = back.get(id(s.old), s.old)
        original = lambda code: back.get(id(code), code)  # noqa: E731
        switches, stores = self._apply_plan(patch, heap, baseline_of=original, notes=notes)
        covered = {id(s.old) for s in switches}
        for applied in self._stack:
            for s in applied.switches:
                if id(s.new) not in covered and heap.functions_using(s.new):
                    covered.add(id(s.new))
                    switches.append(Switch(s.target, s.new, original(s.new), s.allow_active, s.implied))
        # globals: what the stack set goes back to its first 'before', then the patch's values
        planned = {(id(g.owner), g.name) for g in stores}
        for applied in self._stack:
            for g in applied.globals:
                if (id(g.owner), g.name) not in planned:
                    planned.add((id(g.owner), g.name))
                    first = next(x for p in chain for x in p.globals if x.owner is g.owner and x.name == g.name)
                    stores.append(GlobalStore(g.key, g.owner, g.name, current(g.owner, g.name, MISSING), first.before))
        return switches, stores

    # --------------------------------------------------------------- rollback
    def rollback(self, patch_id: str | None = None, *, timeout: float = 5.0, force: bool = False,
                 cancelled=None) -> Result:
        """The patch's hooks, if it has any, run around it (livepatch.hooks)."""
        stack = self._stack
        target = next((p for p in stack if p.id == patch_id), None) if patch_id is not None else \
            (stack[-1] if stack else None)
        if target is None or target.hooks is None:
            return self._rollback(patch_id, timeout=timeout, force=force, cancelled=cancelled)
        from .hooks import around_rollback
        return around_rollback(self, target.hooks, target.id, timeout=timeout, force=force, cancelled=cancelled)

    def _rollback(self, patch_id: str | None = None, *, timeout: float = 5.0, force: bool = False,
                  cancelled=None) -> Result:
        require_supported_runtime()
        with self._exclusive():
            target = None
            try:
                if not self._stack:
                    raise RollbackRefused("no patch is applied")
                if patch_id is None:
                    index = len(self._stack) - 1
                else:
                    ids = [p.id for p in self._stack]
                    if patch_id not in ids:
                        raise RollbackRefused(f"patch {patch_id!r} is not applied (applied: {', '.join(ids)})")
                    index = ids.index(patch_id)
                target = self._stack[index]
                dependents = self._dependents(index)
                if dependents:
                    raise RollbackRefused(f"cannot roll back {target.id!r}: later patches depend on it",
                                          [Problem("rollback-refused", t, f"also changed by {p}") for p, t in dependents])
                build = lambda heap: self._rollback_plan(target, heap)  # noqa: E731
                modules = {split_target(s.target)[0] for s in target.switches}
                if target.switches or target.globals or target.cumulative:
                    result, _ = self._transition("rollback", target.id, build, modules, timeout, force,
                                                 restore_defaults=target.saved_defaults, cancelled=cancelled)
                else:
                    result, _ = self._nothing_committed("rollback", target.id, force)
            except Exception as exc:
                # the patch it was about, once known (a rollback of "the latest" names it)
                self._record("rollback", target.id if target is not None else patch_id or "", outcome_of(exc),
                             str(exc), exc=exc)
                raise
            restored = target.replaced if target.cumulative else []
            stack = self._stack[:index] + restored + self._stack[index + 1:]
            # one statement: a fork sees the commit either finished or undone (forksafe)
            self._stack, self._in_flight = stack, None
            self._release_sources([target], back=restored)
            self._imports.watch()
            # parts of the patches a cumulative one replaced whose module was imported meanwhile
            self._settle += sorted({m for p in restored for m in p.pending})
            result.pending = targets_by_module(target.parts, target.pending)
            self._record("rollback", target.id, "ok", "", result=result, pending=result.pending or None)
            return result

    def rollback_all(self, *, timeout: float = 5.0, force: bool = False, cancelled=None) -> list[Result]:
        results = []
        while self._stack:
            results.append(self.rollback(timeout=timeout, force=force, cancelled=cancelled))
        return results

    def _dependents(self, index: int) -> list[tuple[str, str]]:
        target = self._stack[index]
        mine = {id(s.new) for s in target.switches}
        keys = {g.key for g in target.globals}
        out = []
        waiting = {t for m in target.pending for t in target.parts[m].targets}
        for later in self._stack[index + 1:]:
            if target.id in later.requires:
                out.append((later.id, f"requires {target.id}"))
            for m in later.pending:
                out += [(later.id, t) for t in later.parts[m].targets if t in waiting]
            for s in later.switches:
                if id(s.old) in mine:
                    out.append((later.id, s.target))
            for g in later.globals:
                if g.key in keys:
                    out.append((later.id, g.key))
        return out

    @staticmethod
    def _rollback_plan(applied: AppliedPatch, heap: HeapIndex):
        switches, seen = [], set()
        for s in applied.switches:
            if id(s.new) in seen:
                continue
            seen.add(id(s.new))
            switches.append(Switch(s.target, s.new, s.old, s.allow_active, s.implied))
        stores = [GlobalStore(g.key, g.owner, g.name, current(g.owner, g.name, MISSING), g.before)
                  for g in reversed(applied.globals)]
        return switches, stores

    # ------------------------------------------------------------- transition
    def _transition(self, action, patch_id, build, modules, timeout, force, restore_defaults=None, cancelled=None):
        """Locate, prepare and commit (see transition.py), then the result
        and what the patch stack keeps of it."""
        self._in_progress = {"action": action, "patch": patch_id, "since": _now_iso(time.time()),
                             "timeout": timeout}
        outcome, plan, attempts = transition.run(self, action, patch_id, build, modules, timeout, force,
                                                 restore_defaults, cancelled, plain_owner=_plain_owner)
        switches, stores, saved, functions = plan.switches, plan.stores, plan.saved, plan.functions

        if force:
            self._forced = True
        if outcome.interrupted_by:
            names = {t.ident: t.name for t in threading.enumerate()}
            ran = ", ".join(f"{names.get(t, '?')} ({t})" for t in outcome.interrupted_by)
            self._warnings.append(f"{action} {patch_id}: other threads ran during the commit ({ran}); "
                                  "something inside it released the GIL (an audit hook doing I/O?)")
        applied = AppliedPatch(patch_id, switches, stores, saved, time.time(), outcome.pause_ns,
                               attempts, force, False, (), {})
        result = Result(patch_id, action, outcome.pause_ns, attempts, force, functions,
                        applied.targets, outcome.interrupted_by, outcome.window_ns, outcome.critical_ns,
                        outcome.method)
        return result, applied

    @staticmethod
    def _make_ops(switches, stores, heap, restore_defaults):
        ops, undo, saved = [], [], []
        functions = 0
        restore = {}
        for ref, defaults, kwdefaults in restore_defaults or ():
            f = ref()
            if f is not None:
                restore[id(f)] = (defaults, kwdefaults)
        for s in switches:
            for f in heap.functions_using(s.old):
                functions += 1
                ops.append((setattr, f, "__code__", s.new))
                undo.append((setattr, f, "__code__", s.old))
                new_defaults, new_kwdefaults = s.defaults, s.kwdefaults
                if id(f) in restore:
                    new_defaults, new_kwdefaults = restore[id(f)]
                if new_defaults is not UNCHANGED or new_kwdefaults is not UNCHANGED:
                    saved.append((weakref.ref(f), f.__defaults__, f.__kwdefaults__))
                if new_defaults is not UNCHANGED:
                    ops.append((setattr, f, "__defaults__", new_defaults))
                    undo.append((setattr, f, "__defaults__", f.__defaults__))
                if new_kwdefaults is not UNCHANGED:
                    ops.append((setattr, f, "__kwdefaults__", new_kwdefaults))
                    undo.append((setattr, f, "__kwdefaults__", f.__kwdefaults__))
        for g in stores:
            ops.append((setattr, g.owner, g.name, g.after) if g.after is not MISSING else (delattr, g.owner, g.name))
            undo.append((setattr, g.owner, g.name, g.before) if g.before is not MISSING else (delattr, g.owner, g.name))
        return ops, undo, saved, functions

    # ------------------------------------------------------------ fork
    def _reinit_in_child(self) -> None:
        """After fork, in the child (one thread): whatever a thread that did
        not come along was doing in the engine is gone; finish nothing of it."""
        if self._owner == threading.get_ident():
            return  # the forking thread itself holds the engine: it goes on
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            forksafe.undo_effective(*flight)
        if self._gc_owed:
            gc.enable()
            self._gc_owed = False
        self._lock = threading.Lock()
        self._owner = self._in_progress = None
        self._deferred, self._settle = [], []
        self._log.forget_unsent()

    # --------------------------------------------------------------- reports
    @staticmethod
    def _register_sources(patch: Patch) -> dict:
        entries = {}
        for filename, text in (patch.sources or {}).items():
            lines = text.splitlines(keepends=True)
            # mtime None: linecache.checkcache never evicts it (_release_sources does)
            entries[filename] = linecache.cache[filename] = (len(text), None, lines, filename)
        return entries

    def _release_sources(self, gone, back=()) -> None:
        """linecache holds the sources of the patches in effect only: those
        of `gone` that no patch in effect uses leave it (a cumulative patch
        keeps what it replaced, outside linecache), those of `back` return."""
        for p in back:
            linecache.cache.update(p.sources)
        used = {f for p in self._stack for f in p.sources}
        for p in gone:
            for filename, entry in p.sources.items():
                if filename not in used and linecache.cache.get(filename) is entry:
                    del linecache.cache[filename]

    def record_rejection(self, action: str, patch_id: str, exc: Exception, **extra) -> None:
        """A request refused before the engine saw a patch (a bundle that did
        not verify or load): `"outcome": "rejected"`, handed to listeners on
        this thread. No engine lock: an apply waiting for a safe point does
        not hold it up. Past MAX_REJECTIONS they are only counted, so junk
        sent in a loop cannot grow the history without bound."""
        count = next(self._rejections)
        if count == self.MAX_REJECTIONS:
            self._warnings.append(f"over {self.MAX_REJECTIONS} rejected requests: later ones are not recorded")
        if count >= self.MAX_REJECTIONS:
            return
        self._log.record(action, patch_id, "rejected", str(exc).splitlines()[0][:500] if str(exc) else "",
                         exc=exc, **extra)
        self._log.flush()

    def status(self) -> dict:
        """Answers at once, also while an apply or rollback waits for a safe
        point (`in_progress`): every change of the stack replaces the list,
        and of an applied patch its fields, so this reads a consistent one."""
        stack, busy = [], self._in_progress
        for p in list(self._stack):
            old_ids = {id(s.old) for s in p.switches if s.allow_active or p.forced}
            stack.append({
                "id": p.id,
                "state": "applied",
                "applied_at": _now_iso(p.applied_at),
                "targets": p.targets,
                "pending": targets_by_module(p.parts, p.pending),
                "refused_at_import": dict(p.refused),
                "pause_ns": p.pause_ns,
                "attempts": p.attempts,
                "forced": p.forced,
                "cumulative": p.cumulative,
                "requires": list(p.requires),
                "replaces": [r.id for r in p.replaced],
                "frames_on_old_code": count_running(old_ids) if old_ids else 0,
                "metadata": dict(p.metadata),
            })
        return {
            "python": {
                "implementation": sys.implementation.name,
                "version": platform.python_version(),
                "cache_tag": sys.implementation.cache_tag,
            },
            "forced": self._forced,
            "applied": stack,
            "pending": sorted({m for p in stack for m in p["pending"]}),
            "in_progress": dict(busy) if busy else None,
            "history": list(self._history),
            "warnings": list(self._warnings),
        }

    def history(self) -> list[dict]:
        return list(self._history)

    def applied_ids(self) -> list[str]:
        return [p.id for p in self._stack]

    def patched_codes(self, patch_id: str | None = None) -> list:
        """The code objects a patch (default: every applied one) put in effect."""
        return [s.new for p in list(self._stack) if patch_id in (None, p.id) for s in p.switches]
