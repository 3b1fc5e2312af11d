"""livepatch: atomic in-memory hotpatching of running Python processes.

The engine's public API. Everything here runs inside the patched process.

Importing the package costs next to nothing: every process of a service run
under `livepatch run` imports it at start (through the agent) and so does
every `livepatch` command, while most of them never patch anything. The
engine and its modules are imported, and the one process-wide engine is
created, the first time one of the names below is used (PEP 562)."""

import _thread

__version__ = "0.1.0"

# name -> the submodule it comes from
_LAZY = {
    "Engine": "patchstack", "Result": "patchstack",
    "Change": "patch", "Patch": "patch", "UNCHANGED": "patch",
    "AtImport": "pending",
    "BaselineMismatch": "errors", "CommitFailed": "errors", "IncompatibleChange": "errors",
    "PatchError": "errors", "Problem": "errors", "RollbackRefused": "errors", "TargetBusy": "errors",
    "TargetNotFound": "errors", "UnsupportedRuntime": "errors",
}
# Submodules that `import livepatch` alone used to make attributes of the
# package (the engine's): `livepatch.commit` and the like keep working.
_ENGINE_MODULES = frozenset({"busynow", "checks", "commit", "errors", "forksafe", "history", "imports",
                             "importtime", "locate", "patch", "patchstack", "pending", "safepoint"})

_engine_lock = _thread.allocate_lock()
_engine_hooks: list = []  # called with the engine once it exists (see on_engine)


def __getattr__(name: str):
    if name == "engine":
        return _engine()
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in _ENGINE_MODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _engine():
    """The process-wide engine: one patch stack per process, created on
    first use."""
    engine = globals().get("engine")
    if engine is not None:
        return engine
    with _engine_lock:
        engine = globals().get("engine")
        if engine is None:
            from . import forksafe
            from .patchstack import Engine
            engine = Engine()
            # a forked child gets a clean, usable engine (locks, GC, no half-done transition)
            forksafe.install()
            globals()["engine"] = engine
            hooks = list(_engine_hooks)
            _engine_hooks.clear()
        else:
            hooks = []
    for hook in hooks:
        hook(engine)
    return engine


def on_engine(hook) -> None:
    """Call `hook(engine)` once the process-wide engine exists: now if it
    does, else right after it is created (the same hook is kept once), so
    that an agent can listen to an engine it does not make it create."""
    with _engine_lock:
        engine = globals().get("engine")
        if engine is None:
            if hook not in _engine_hooks:
                _engine_hooks.append(hook)
            return
    hook(engine)


def _after_fork_in_child() -> None:
    # a thread of the parent's creating the engine at the fork is gone here
    global _engine_lock
    _engine_lock = _thread.allocate_lock()


def apply(patch, *, timeout: float = 5.0, force: bool = False):
    """Apply `patch` atomically at a safe point; raises a PatchError (and
    changes nothing) if it cannot."""
    return _engine().apply(patch, timeout=timeout, force=force)


def rollback(patch_id: str | None = None, *, timeout: float = 5.0, force: bool = False):
    """Undo the most recent patch, or the named one; `rollback(all=True)`
    style is `rollback_all()`."""
    return _engine().rollback(patch_id, timeout=timeout, force=force)


def rollback_all(*, timeout: float = 5.0, force: bool = False):
    return _engine().rollback_all(timeout=timeout, force=force)


def load_bundle(source, trusted_keys=None, *, allow_unsigned: bool = False):
    """Verify a bundle (path or bytes) against trusted keys (a .pub file, a
    directory of them, or {key id: key}) and return its Patch for this
    interpreter; see docs/bundle-format.md."""
    from .bundle import load_bundle as _load
    return _load(source, trusted_keys, allow_unsigned=allow_unsigned)


def status() -> dict:
    """JSON-serialisable state of the patch stack and its history."""
    return _engine().status()


class _Package(type(_thread)):
    """`livepatch.fingerprint` is the function, as it always was, although a
    submodule of that name exists: importing the submodule (the engine does,
    on first use) would otherwise rebind the package attribute to it."""

    @property
    def fingerprint(self):
        from .fingerprint import fingerprint
        return fingerprint

    @fingerprint.setter
    def fingerprint(self, value):
        pass  # the import system binding the submodule: `from livepatch import fingerprint` stays the function


import os as _os  # noqa: E402  (os is imported by every interpreter's start-up anyway)
import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
# first: the child's own hooks (the agent's among them) may import again
from . import forkimports as _forkimports  # noqa: E402
_forkimports.install()
# then, through one hook of their own: resets first, the agent's start last
from . import atfork as _atfork  # noqa: E402
_atfork.on_child_reset(_after_fork_in_child)
del _os, _sys, _forkimports, _atfork

__all__ = [
    "apply", "rollback", "rollback_all", "status", "load_bundle", "engine", "fingerprint",
    "Change", "Patch", "UNCHANGED", "AtImport", "Engine", "Result",
    "PatchError", "BaselineMismatch", "IncompatibleChange", "TargetBusy", "TargetNotFound",
    "RollbackRefused", "UnsupportedRuntime", "CommitFailed", "Problem",
]
