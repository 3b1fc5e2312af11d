"""Splitting a patch by module: the part of a patch for each target module,
which of those parts must wait until their module is imported, and new
globals whose value can only be built once their module exists or only by
running something (an import statement).

A part is the unit committed at import time: all of a module's changes and
new globals of one patch, or none of them.

Values that run code (AtCommit) are made only when an apply prepares its
commit, before the pause, or when their module's part commits at import:
never by assess or a dry run, which plan with a stand-in (PLANNED)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .locate import loaded_module, split_target
from .patch import Patch


class AtImport:
    """A new global whose value is built from its module when the part is
    committed (a new function needs the module's namespace as its globals,
    which does not exist before the import): `make(module) -> value`."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make

    def __repr__(self) -> str:
        return f"AtImport({self.make!r})"


class AtCommit(AtImport):
    """A new global whose making runs code (an import statement executes
    the imported module): made only on the way to a commit, never to
    assess. A failure to make it refuses the whole apply before anything
    is stored."""

    __slots__ = ("what",)

    def __init__(self, make, what: str = ""):
        super().__init__(make)
        self.what = what  # for messages: the statement

    def __repr__(self) -> str:
        return f"AtCommit({self.what or self.make!r})"


class _Planned:
    """Stands for an AtCommit value in a plan that is never committed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<made at commit>"


PLANNED = _Planned()


def value_for(module_name: str, make, *, runs_code: str = ""):
    """A new global's value for a patch: `make(module)` now if the module is
    imported, else an AtImport that makes it when the module's part commits.
    A value whose making runs code (`runs_code` says what) is always
    deferred: an AtCommit."""
    if runs_code:
        return AtCommit(make, runs_code)
    module = imported(module_name)
    return AtImport(make) if module is None else make(module)


@dataclass
class ModulePart:
    changes: list = field(default_factory=list)
    globals: dict = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return sorted({c.target for c in self.changes} | set(self.globals))


def split(patch: Patch) -> dict[str, ModulePart]:
    """module name -> that module's part of `patch`, in the patch's order."""
    parts: dict[str, ModulePart] = {}
    for change in patch.changes:
        parts.setdefault(split_target(change.target)[0], ModulePart()).changes.append(change)
    for key, value in (patch.new_globals or {}).items():
        parts.setdefault(split_target(key)[0], ModulePart()).globals[key] = value
    return parts


def imported(name: str):
    """The module if it is imported and its code has finished running; None
    while it is not imported or another import of it is still executing it
    (its part is then committed when that import finishes)."""
    module = loaded_module(name)
    if module is None:
        return None
    if getattr(getattr(module, "__spec__", None), "_initializing", False) is True:
        return None
    return module


def materialise(new_globals: dict, module, run: bool = True) -> dict:
    """The globals with every AtImport value built for `module`; with
    `run` false, AtCommit values become PLANNED and nothing is run."""
    if not any(isinstance(v, AtImport) for v in new_globals.values()):
        return new_globals
    made = {k: (_make(k, v, module, run) if isinstance(v, AtImport) else v) for k, v in new_globals.items()}
    return {k: v for k, v in made.items() if v is not UNBOUND}


class _Unbound:
    """What a global made at commit is when the patch turns out to store
    nothing there in this process (a statement whose branch binding it did
    not run): no store, nothing to roll back."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not bound here>"


UNBOUND = _Unbound()


def _make(key: str, value: AtImport, module, run: bool):
    from .errors import PatchError, Problem
    if not isinstance(value, AtCommit):
        return value.make(module)
    if not run:
        return PLANNED
    try:
        return value.make(module)
    except PatchError:
        raise
    except (Exception, SystemExit) as exc:  # an imported module's code can raise anything
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise PatchError(f"cannot make the new global {key} ({value.what}): {why}; nothing was changed",
                         [Problem("global-failed", key, f"{value.what}: {why}")]) from None


def part_patch(patch_id: str, parts, module_of=None, run: bool = True) -> Patch:
    """One Patch made of several parts (changes and globals concatenated);
    `module_of` maps a module name to the module for AtImport values; with
    `run` false nothing that runs code is made (see materialise)."""
    changes, new_globals = [], {}
    for name, part in parts:
        changes += part.changes
        values = part.globals
        if module_of is not None:
            values = materialise(values, module_of(name), run)
        new_globals.update(values)
    return Patch(patch_id, changes, new_globals=new_globals)


def targets_by_module(parts: dict, names) -> dict:
    """{module: [targets]} for the given modules."""
    return {name: parts[name].targets for name in sorted(names)}
