"""What this process runs: its application baseline (a release name and
version) and the third-party distributions it has imported, with the
versions their installed metadata gives.

The application baseline is the one declared when the agent was started
(`livepatch run|attach --name N --version V`, `livepatch.agent.start(version=)`,
LIVEPATCH_VERSION), else
the version of an installed distribution of the service's name. Both are
read the first time a status asks and kept: files on disk may change after
the process started (a deploy), what it runs does not. `importlib.metadata`
is imported only then, never at agent start."""

from __future__ import annotations

import os
import sys
import threading

from livepatch import atfork

_lock = threading.Lock()
_application = None
_versions: dict[str, str | None] = {}
_top_level: dict | None = None   # import name -> distribution names
_loaded_key = None
_loaded: dict | None = None


def _after_fork_in_child() -> None:
    # a thread of the parent (its agent answering a status) may have held
    # it at the fork: the child's first status would then wait forever
    global _lock
    _lock = threading.Lock()


atfork.on_child_reset(_after_fork_in_child)


def _version_of(dist: str) -> str | None:
    if dist not in _versions:
        from importlib import metadata
        try:
            _versions[dist] = metadata.version(dist)
        except Exception:  # not installed, or unreadable metadata
            _versions[dist] = None
    return _versions[dist]


def application(agent) -> dict:
    """{"name", "version", "source"}: source "declared", "metadata", or
    "unknown" (version None)."""
    global _application
    with _lock:
        if _application is None or _application["name"] != agent.name:
            declared = getattr(agent, "declared_version", None) or os.environ.get("LIVEPATCH_VERSION") or None
            if declared:
                _application = {"name": agent.name, "version": declared, "source": "declared"}
            else:
                found = _version_of(agent.name)
                _application = {"name": agent.name, "version": found, "source": "metadata" if found else "unknown"}
        return dict(_application)


def distributions() -> dict[str, str]:
    """{distribution name: version} of every installed distribution with a
    top-level module imported in this process; computed again only when
    more modules have been imported since."""
    global _top_level, _loaded_key, _loaded
    with _lock:
        names = {m.partition(".")[0] for m in list(sys.modules)}
        key = len(names)
        if _loaded is not None and key == _loaded_key:
            return dict(_loaded)
        if _top_level is None:
            from importlib import metadata
            try:
                _top_level = metadata.packages_distributions()
            except Exception:
                _top_level = {}
        out = {}
        for name in names:
            for dist in _top_level.get(name, ()):
                version = _version_of(dist)
                if version is not None:
                    out[dist] = version
        _loaded_key, _loaded = key, out
        return dict(out)


def installed(names) -> dict[str, str | None]:
    """{name: installed version, or None} of distributions named by the
    request, imported or not (a fix for one not imported yet is pending on
    its import)."""
    if not isinstance(names, list) or len(names) > 64 or not all(isinstance(n, str) and len(n) <= 200 for n in names):
        return {}
    with _lock:
        return {n: _version_of(n) for n in names}


def runs(agent, request: dict) -> dict:
    """The status fields: "baseline" always, "distributions" when the
    request asks for them (`"distributions": true`), and "installed" for
    the distributions it names (`"installed": [names]`)."""
    out = {"baseline": application(agent)}
    if request.get("distributions") is True:
        out["distributions"] = distributions()
    if request.get("installed"):
        out["installed"] = installed(request["installed"])
    return out
