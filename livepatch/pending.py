"""Splitting a patch by module: the part of a patch for each target module,
which of those parts must wait until their module is imported, and new
globals whose value can only be built once their module exists.

A part is the unit committed at import time: all of a module's changes and
new globals of one patch, or none of them."""

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


def value_for(module_name: str, make):
    """A new global's value for a patch: `make(module)` now if the module is
    imported, else an AtImport that makes it when the module's part commits."""
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


def materialise(new_globals: dict, module) -> dict:
    """The globals with every AtImport value built for `module`."""
    if not any(isinstance(v, AtImport) for v in new_globals.values()):
        return new_globals
    return {k: (v.make(module) if isinstance(v, AtImport) else v) for k, v in new_globals.items()}


def part_patch(patch_id: str, parts, module_of=None) -> Patch:
    """One Patch made of several parts (changes and globals concatenated);
    `module_of` maps a module name to the module for AtImport values."""
    changes, new_globals = [], {}
    for name, part in parts:
        changes += part.changes
        values = part.globals
        if module_of is not None:
            values = materialise(values, module_of(name))
        new_globals.update(values)
    return Patch(patch_id, changes, new_globals=new_globals)


def targets_by_module(parts: dict, names) -> dict:
    """{module: [targets]} for the given modules."""
    return {name: parts[name].targets for name in sorted(names)}
