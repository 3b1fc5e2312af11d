"""State migration hooks: a bundle's own module whose `pre_apply`,
`post_apply`, `pre_rollback` and `post_rollback` functions run around the
commit, as kpatch's pre/post-patch and pre/post-unpatch callbacks.

Each hook is called with one argument, a HookContext (the patch id, the
action, and `module(name)` for the imported modules it migrates). The
points, and what a failure does:

- pre_apply: before anything is stored; raising aborts the apply with
  nothing changed.
- post_apply: once the patch is in; raising rolls the patch back (through
  pre_rollback and post_rollback) and the apply fails.
- pre_rollback: before the rollback; raising refuses it, nothing changed.
- post_rollback: once the old code is back, and after a failed apply whose
  pre_apply had run, to undo what pre_apply prepared; a failure is
  reported, the rollback stands.

The hooks module is signed inside the bundle like the code; the builder
only compiles it (never runs it). It is executed when an apply starts, in
a namespace of its own (never in sys.modules), outside the engine's lock
and before the pause: hooks must not call the engine themselves. Parts of
a patch committed later, when their module is imported, run no hooks."""

from __future__ import annotations

import ast
import sys

from .errors import PatchError, Problem

NAMES = ("pre_apply", "post_apply", "pre_rollback", "post_rollback")
MAX_SOURCE = 1 << 20


class HookFailed(PatchError):
    category = "hook-failed"


class HookContext:
    __slots__ = ("patch_id", "action")

    def __init__(self, patch_id: str, action: str):
        self.patch_id, self.action = patch_id, action

    def module(self, name: str):
        """The imported module `name`, or None when this process has not imported it."""
        return sys.modules.get(name)

    def __repr__(self) -> str:
        return f"HookContext({self.patch_id!r}, {self.action!r})"


def defined(source: str, filename: str) -> list[str]:
    """The hook names a hooks source defines as top-level functions; a
    SyntaxError (or ValueError) if it does not compile. Nothing is run."""
    tree = ast.parse(source, filename)
    compile(tree, filename, "exec", dont_inherit=True)
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in NAMES]


def read_source(path: str) -> tuple[str, list[str]]:
    """(source, hook names) of a hooks file for the builder: a regular
    file, at most MAX_SOURCE bytes, that compiles and defines at least one
    hook. ValueError naming what is wrong. Nothing in it is run."""
    import os
    from .operatorfile import read_bounded
    from .sourcetree import DecodeFailed, decode_source
    data = read_bounded(path, MAX_SOURCE, "--hooks")
    try:
        source = decode_source(data)
        names = defined(source, os.path.basename(path))
    except DecodeFailed as exc:
        raise ValueError(f"--hooks {path}: {exc}") from None
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        line = getattr(exc, "lineno", None)
        raise ValueError(f"--hooks {path}{'' if line is None else f':{line}'}: does not compile: "
                         f"{getattr(exc, 'msg', None) or exc}") from None
    if not names:
        raise ValueError(f"--hooks {path}: defines none of {', '.join(NAMES)} (top-level functions taking one argument)")
    return source, names


class BundleHooks:
    """What runs around one patch's commit: its hooks (source verified with
    its bundle, compiled now, executed once, when the first hook is needed)
    and the new modules it carries (newmodules.BundleModules, or None)."""

    def __init__(self, patch_id: str, source: str | None, names, modules=None):
        self.patch_id, self.names, self.modules = patch_id, tuple(names), modules
        self.filename = f"<livepatch hooks of {patch_id}>"
        self._code = None if source is None else compile(source, self.filename, "exec", dont_inherit=True)
        self._namespace = None
        if source is not None:
            import linecache
            linecache.cache[self.filename] = (len(source), None, source.splitlines(keepends=True), self.filename)

    def _functions(self) -> dict:
        if self._namespace is None:
            namespace = {"__name__": f"livepatch_hooks.{self.patch_id}", "__builtins__": __builtins__}
            try:
                exec(self._code, namespace)
            except Exception as exc:
                raise HookFailed(f"the hooks of {self.patch_id} failed to load ({_why(exc)}); nothing was changed",
                                 [Problem("hook-failed", "", f"loading the hooks module: {_why(exc)}")]) from exc
            self._namespace = namespace
        return self._namespace

    def run(self, name: str, action: str) -> None:
        """Call hook `name` if the module defines it; HookFailed if it raises."""
        if name not in self.names:
            return
        fn = self._functions().get(name)
        if not callable(fn):
            return
        try:
            fn(HookContext(self.patch_id, action))
        except Exception as exc:
            raise HookFailed(f"{name} of {self.patch_id} failed: {_why(exc)}",
                             [Problem("hook-failed", "", f"{name}: {_why(exc)}")]) from exc


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def around_apply(engine, patch, **kw):
    """engine._apply(patch) between pre_apply and post_apply, with the
    patch's new modules importable from the start."""
    hooks = patch.hooks
    # before the patch's import statements run; not undone by an apply that
    # fails because the same patch is in already
    installed = hooks.modules is not None and hooks.modules.install()
    try:
        hooks.run("pre_apply", "apply")
    except HookFailed as exc:
        if installed:
            hooks.modules.remove()
        raise HookFailed(f"{exc.args[0].splitlines()[0]}; nothing was changed", exc.problems) from None
    try:
        result = engine._apply(patch, **kw)
    except BaseException:
        _quietly(hooks, "post_rollback", "apply")  # undo what pre_apply prepared
        if installed:
            hooks.modules.remove()
        raise
    try:
        hooks.run("post_apply", "apply")
    except HookFailed as exc:
        first = exc.args[0].splitlines()[0]
        try:
            around_rollback(engine, hooks, patch.id, timeout=kw.get("timeout", 5.0), force=kw.get("force", False))
        except PatchError as undo:
            raise HookFailed(f"{first}; rolling the patch back failed too: {str(undo).splitlines()[0]}",
                             exc.problems) from None
        raise HookFailed(f"{first}; the patch was rolled back", exc.problems) from None
    return result


def around_rollback(engine, hooks, patch_id, **kw):
    """engine._rollback(patch_id) between pre_rollback and post_rollback."""
    try:
        hooks.run("pre_rollback", "rollback")
    except HookFailed as exc:
        raise HookFailed(f"{exc.args[0].splitlines()[0]}; the patch stays applied", exc.problems) from None
    result = engine._rollback(patch_id, **kw)
    _remove_modules(hooks)
    failed = _quietly(hooks, "post_rollback", "rollback")
    if failed:
        result.hook_failed = failed
    return result


def _remove_modules(hooks) -> None:
    if hooks.modules is not None:
        hooks.modules.remove()


def _quietly(hooks, name, action) -> str:
    """Run a hook whose failure cannot be undone (the code is already as it
    was): what failed, or ""."""
    try:
        hooks.run(name, action)
    except HookFailed as exc:
        return exc.args[0].splitlines()[0]
    return ""
