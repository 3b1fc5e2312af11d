"""livepatch: atomic in-memory hotpatching of running Python processes.

The engine's public API. Everything here runs inside the patched process."""

from .errors import (
    BaselineMismatch,
    CommitFailed,
    IncompatibleChange,
    PatchError,
    Problem,
    RollbackRefused,
    TargetBusy,
    TargetNotFound,
    UnsupportedRuntime,
)
from . import forksafe
from .fingerprint import fingerprint
from .patch import UNCHANGED, Change, Patch
from .patchstack import Engine, Result
from .pending import AtImport

__version__ = "0.1.0"

#: The process-wide engine: one patch stack per process.
engine = Engine()
# a forked child gets a clean, usable engine (locks, GC, no half-done transition)
forksafe.install()


def apply(patch: Patch, *, timeout: float = 5.0, force: bool = False) -> Result:
    """Apply `patch` atomically at a safe point; raises a PatchError (and
    changes nothing) if it cannot."""
    return engine.apply(patch, timeout=timeout, force=force)


def rollback(patch_id: str | None = None, *, timeout: float = 5.0, force: bool = False):
    """Undo the most recent patch, or the named one; `rollback(all=True)`
    style is `rollback_all()`."""
    return engine.rollback(patch_id, timeout=timeout, force=force)


def rollback_all(*, timeout: float = 5.0, force: bool = False):
    return engine.rollback_all(timeout=timeout, force=force)


def load_bundle(source, trusted_keys=None, *, allow_unsigned: bool = False) -> Patch:
    """Verify a bundle (path or bytes) against trusted keys (a .pub file, a
    directory of them, or {key id: key}) and return its Patch for this
    interpreter; see docs/bundle-format.md."""
    from .bundle import load_bundle as _load
    return _load(source, trusted_keys, allow_unsigned=allow_unsigned)


def status() -> dict:
    """JSON-serialisable state of the patch stack and its history."""
    return engine.status()


__all__ = [
    "apply", "rollback", "rollback_all", "status", "load_bundle", "engine", "fingerprint",
    "Change", "Patch", "UNCHANGED", "AtImport", "Engine", "Result",
    "PatchError", "BaselineMismatch", "IncompatibleChange", "TargetBusy", "TargetNotFound",
    "RollbackRefused", "UnsupportedRuntime", "CommitFailed", "Problem",
]
