"""The import hook: runs a callback right after a watched module's code has
been executed by its import (or reload), before the import returns.

A finder at the front of `sys.meta_path` declines every name nobody watches
with one dict lookup (benchmarks/import_hook.py measures it). For a watched
name it asks the remaining finders for the spec and wraps its loader: the
wrapper delegates everything to the real loader, runs the real
`exec_module`, puts the real loader back on `module.__loader__` and
`__spec__.loader`, then calls the watchers. The import system holds the
module's import lock all the while, so a thread importing the same module
concurrently gets it only after the callbacks ran. If the module's code
raises, the callbacks are not called (the import failed; nothing is
imported).

This module knows nothing of patches: the engine says which names it
watches (`watch`) and what to do when one is executed."""

from __future__ import annotations

import sys
import threading
import weakref
from importlib import _bootstrap

_lock = threading.Lock()
# name -> tuple of weak callbacks. The finder reads it without the lock; it
# is changed in place, one key at a time (each change is atomic)
_watched: dict = {}
# watcher key -> (names, weak callback)
_watchers: dict = {}
_busy = threading.local()  # names this thread is finding a spec for (finders that call find_spec again)


class _Finder:
    """Declines unwatched names; wraps the loader of watched ones."""

    def find_spec(self, name, path=None, target=None, _watched=_watched):
        if name not in _watched:
            return None
        return _watched_spec(self, name, path, target)

    def invalidate_caches(self):
        pass

    def __repr__(self):
        return "<livepatch import hook>"


_finder = _Finder()


def _watched_spec(me, name, path, target):
    busy = getattr(_busy, "names", None)
    if busy is None:
        busy = _busy.names = set()
    if name in busy:
        return None
    busy.add(name)
    try:
        for finder in list(sys.meta_path):
            if finder is me or isinstance(finder, _Finder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
    finally:
        busy.discard(name)
    loader = spec.loader
    if loader is not None and hasattr(loader, "exec_module") and not isinstance(loader, _Loader):
        spec.loader = _Loader(loader, spec)
    return spec


class _Loader:
    """Stands in for the real loader during one import; transparent for
    everything but `exec_module`."""

    def __init__(self, loader, spec):
        self.__dict__["_livepatch_loader"] = loader
        self.__dict__["_livepatch_spec"] = spec

    def __getattr__(self, attr):
        try:
            loader = self.__dict__["_livepatch_loader"]
        except KeyError:  # a half-built copy
            raise AttributeError(attr) from None
        return getattr(loader, attr)

    def __repr__(self):
        return repr(self.__dict__["_livepatch_loader"])

    def create_module(self, spec):
        create = getattr(self._livepatch_loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        loader, spec = self._livepatch_loader, self._livepatch_spec
        try:
            loader.exec_module(module)
        finally:
            # the module's code has run: from here on it sees its real loader
            if spec.loader is self:
                spec.loader = loader
            if module.__dict__.get("__loader__") is self:
                module.__loader__ = loader
        _executed(spec.name, module)


def _executed(name, module):
    for ref in _watched.get(name, ()):
        fn = ref()
        if fn is not None:
            try:
                fn(name, module)
            except Exception:  # the watcher reports its own failures; the import goes on
                pass


def _weak(fn):
    try:
        return weakref.WeakMethod(fn)
    except TypeError:
        return weakref.ref(fn)


def watch(key, names, callback) -> None:
    """Make `names` the module names watched for `key` (replacing the ones
    before); `callback(name, module)` runs after each one's code ran. The
    callback is held weakly: a watcher that is gone stops watching."""
    names = frozenset(names)
    with _lock:
        if names:
            _watchers[key] = (names, _weak(callback))
        else:
            _watchers.pop(key, None)
        _rebuild()
        if _watched and _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def _rebuild():
    table: dict = {}
    for key, (names, ref) in list(_watchers.items()):
        if ref() is None:
            del _watchers[key]
            continue
        for name in names:
            table[name] = table.get(name, ()) + (ref,)
    # the finder holds this very dict: change it in place, one key at a time
    for name in [n for n in _watched if n not in table]:
        _watched.pop(name, None)
    _watched.update(table)


def watched() -> list[str]:
    return sorted(_watched)


def when_settled(name: str, callback) -> None:
    """Call `callback(name)` once no import of `name` is executing in
    another thread: at once if none is, else from a thread that waits for
    that import to finish (it began before the name was watched, so its
    loader is not wrapped)."""
    ref = _bootstrap._module_locks.get(name) if hasattr(_bootstrap, "_module_locks") else None
    if ref is None or ref() is None:
        callback(name)
        return

    def wait():
        try:
            _bootstrap._lock_unlock_module(name)
        except Exception:
            pass
        callback(name)

    threading.Thread(target=wait, name=f"livepatch-import-{name}"[:60], daemon=True).start()


def reinit_in_child() -> None:
    """After fork: the lock may have been held by a thread that is gone."""
    global _lock, _busy
    _lock = threading.Lock()
    _busy = threading.local()
