"""What a patch is: a set of Changes (code for one target each, built
against a baseline fingerprint) plus new module or class globals."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Mapping, Sequence


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
PYTHON_TAG = sys.implementation.cache_tag  # e.g. "cpython-311"


@dataclass(frozen=True)
class Change:
    """New code for one target. `baseline` is the fingerprint of the code the
    change was built against; `defaults`/`kwdefaults` are stored on every
    function of the target in the same commit when given."""

    target: str
    new_code: types.CodeType
    baseline: str
    allow_active: bool = False
    defaults: object = UNCHANGED
    kwdefaults: object = UNCHANGED
    python: str = PYTHON_TAG


@dataclass
class Patch:
    """`new_globals` maps "module:name" (or "module:Class.name") to a value
    set in the same commit: added helpers, imports, changed constants.
    `sources` maps the filenames used in the new code to their text, so that
    tracebacks show the patched lines."""

    id: str
    changes: Sequence[Change]
    cumulative: bool = False
    new_globals: Mapping[str, object] | None = None
    requires: Sequence[str] = ()
    sources: Mapping[str, str] | None = None
    metadata: Mapping[str, object] = field(default_factory=dict)
    hooks: object = None  # hooks.BundleHooks run around apply and rollback, or None
