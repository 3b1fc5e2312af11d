"""Module-level statements whose only effect at import is binding names
(`try: import zstandard ... except ImportError: HAS_ZSTD = False`,
`if sys.version_info >= (3, 12): X = ...`), made live at apply time.

The builder (standard library only, nothing of the trees is run) decides
whether a new or changed statement only binds names: it is made of imports,
assignments to plain names, `if`/`try` of such statements, `pass`,
docstrings, and defs/classes inside them. Anything else it would do at
import (a call whose result is dropped, an attribute, subscript or
augmented store, `del`, `global`, a loop) cannot be undone and keeps it
refused, with the reason.

At apply time the statement runs before the pause in a namespace overlaying
the module (its globals are the module's, the names it binds go to the
overlay: nothing in the module changes until the commit); each name it
bound becomes a new global of the same commit, restored (or deleted) by
rollback. A def or class the baseline defines at the same place is not
rebound: the live object stays and its code is patched in place."""

from __future__ import annotations

import ast
import types

from . import definitions as defs


# ---------------------------------------------------------------- builder side

def side_effect(node: ast.AST) -> str | None:
    """Why running `node` again does more than bind names in its module, or
    None when binding names is all it does at import."""
    if isinstance(node, (ast.Import, ast.Pass)):
        return None
    if isinstance(node, ast.ImportFrom):
        return "a star import binds names nothing can list" if any(a.name == "*" for a in node.names) else None
    if isinstance(node, ast.Expr):
        if isinstance(node.value, ast.Constant):
            return None  # a docstring
        return f"line {node.lineno}: an expression whose result is not assigned ({_short(node.value)}) runs for its effect"
    if isinstance(node, ast.Assign):
        for t in node.targets:
            why = _target(t)
            if why:
                return f"line {node.lineno}: {why}"
        return None
    if isinstance(node, ast.AnnAssign):
        return None if isinstance(node.target, ast.Name) else f"line {node.lineno}: {_target(node.target)}"
    if isinstance(node, ast.AugAssign):
        return f"line {node.lineno}: an augmented assignment ({_short(node)}) may change the old object in place"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        impure = defs.impure_decorator(node)
        return None if impure is None else f"line {node.lineno}: decorator @{impure} of {node.name} may register it somewhere"
    if isinstance(node, (ast.If, ast.Try)):
        return _first(_branches(node))
    what = {ast.Delete: "del", ast.Global: "global", ast.Nonlocal: "nonlocal", ast.For: "a loop",
            ast.AsyncFor: "a loop", ast.While: "a loop", ast.With: "a with block", ast.AsyncWith: "a with block",
            ast.Raise: "raise", ast.Assert: "assert"}.get(type(node), type(node).__name__)
    return f"line {node.lineno}: {what} does more at import than binding names"


def _branches(node) -> list:
    """The statements of every branch of an `if` or `try`."""
    if isinstance(node, ast.If):
        return node.body + node.orelse
    return node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody


def _first(body) -> str | None:
    return next((why for why in map(side_effect, body) if why), None)


def _target(t) -> str | None:
    if isinstance(t, ast.Name):
        return None
    if isinstance(t, (ast.Tuple, ast.List)):
        return next((why for why in map(_target, t.elts) if why), None)
    if isinstance(t, ast.Starred):
        return _target(t.value)
    return f"a store to {_short(t)} changes an object, not a name of the module"


def _short(node) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 60 else text[:57] + "..."


def bound_names(node: ast.AST) -> list[str]:
    """The names a binding-only statement can bind, in any branch, in order
    (an `except ... as e` name is unbound again when its handler ends)."""
    out: dict = {}

    def walk(n):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                out[a.asname or a.name.partition(".")[0] if isinstance(n, ast.Import) else a.asname or a.name] = None
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[n.name] = None
            for d in getattr(n, "decorator_list", ()):
                names(d)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                names(t)
            if n.value is not None:
                names(n.value)  # a walrus in the value
        elif isinstance(n, (ast.If, ast.Try)):
            if isinstance(n, ast.If):
                names(n.test)
            for s in _branches(n):
                walk(s)

    def names(expr):
        for sub in ast.walk(expr):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                out[sub.id] = None

    walk(node)
    return list(out)


def _kept_definitions(node: ast.AST, base_defs: dict) -> set:
    """Names bound only by defs and classes the baseline defines at the same
    qualname: their live objects stay, their code is patched in place."""
    by_def, other = set(), set()

    def walk(n):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            base = base_defs.get(n.name)
            (by_def if base is not None and type(base) is type(n) else other).add(n.name)
        elif isinstance(n, (ast.If, ast.Try)):
            for s in _branches(n):
                walk(s)
        else:
            other.update(bound_names(n))

    walk(node)
    return by_def - other


def pair(node: ast.AST, position: int, base: list) -> ast.AST | None:
    """The baseline statement a changed one replaces, taken from `base`
    ([(position, node)] not yet paired): the one binding the same names,
    else the one at the same position among the module's other statements."""
    names = set(bound_names(node))
    found = next((b for b in base if names and set(bound_names(b[1])) == names), None) \
        or next((b for b in base if b[0] == position and type(b[1]) is type(node)), None)
    if found is None:
        return None
    base.remove(found)
    return found[1]


def add(diff, node: ast.AST, base_defs: dict) -> str | None:
    """Record a new or changed binding-only statement in diff.statements
    (made at apply time); the reason it is refused otherwise."""
    why = side_effect(node)
    if why is not None:
        return why
    kept = _kept_definitions(node, base_defs)
    end = node.end_lineno or node.lineno
    diff.statements[str(node.lineno)] = {"statement": ast.unparse(node), "line": node.lineno,
                                         "binds": bound_names(node), "spans": [(node.lineno, 0, end, None)]}
    if kept:
        diff.statements[str(node.lineno)]["keeps"] = [n for n in bound_names(node) if n in kept]
    return None


def removed(diff, node: ast.AST, new_tree: ast.Module):
    """A Problem for a removed baseline statement: ignored when it only
    bound names nothing in the patched module uses (they stay bound)."""
    from .errors import Problem
    target = f"{diff.module}:<module>"
    names = bound_names(node)
    used = {n.id for n in ast.walk(new_tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if side_effect(node) is None and not used & set(names):
        return Problem("ignored:unused-binding", target,
                       f"baseline line {node.lineno}: a removed statement bound {', '.join(names) or 'nothing'}, which "
                       "nothing in the patched module uses (they stay bound, unused)")
    return Problem("refused:statement", target, f"baseline line {node.lineno}: a module-level statement "
                                                f"({type(node).__name__}) was removed; what it did at import stays done")


def manifest_entries(module: str, statements: dict) -> list:
    """One manifest global per name a statement binds, each carrying the
    whole statement (the loader runs it once for all of them)."""
    return [{"name": f"{module}:{name}", "kind": "statement", "source": s["statement"], "line": s["line"],
             "binds": list(s["binds"]), **({"keeps": list(s["keeps"])} if s.get("keeps") else {})}
            for s in statements.values() for name in s["binds"]]


# ---------------------------------------------------------------- loader side

def checked(entry: dict, field: str, fail) -> ast.Module:
    """The entry's statement, parsed (never run): one binding-only statement
    that can bind every name in `binds`, among them the entry's own name."""
    try:
        tree = ast.parse(entry["source"])
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        fail(f"{field}.source", "not valid Python")
    if len(tree.body) != 1:
        fail(f"{field}.source", "must be one module-level statement")
    why = side_effect(tree.body[0])
    if why is not None:
        fail(f"{field}.source", f"does more than bind names: {why}")
    binds = entry.get("binds") or []
    name = entry["name"].partition(":")[2]
    missing = sorted((set(binds) | set(entry.get("keeps", ()))) - set(bound_names(tree.body[0])))
    if name not in binds or missing:
        fail(f"{field}.binds", f"the statement binds no {', '.join(missing) or name!r}")
    return tree


class _Run:
    """One statement, run once per module for every name it binds."""

    __slots__ = ("tree", "keys", "keeps", "filename", "line", "bundled", "made")

    def __init__(self, tree, keys, keeps, filename, line, bundled):
        self.tree, self.keys, self.keeps, self.filename, self.line = tree, keys, frozenset(keeps), filename, line
        self.bundled = bundled
        self.made: list = []  # [(module, namespace)]

    def namespace(self, module) -> dict:
        from .values import _namespace
        for m, ns in self.made:
            if m is module:
                return ns
        tree = ast.Module(body=list(self.tree.body), type_ignores=[])
        ast.increment_lineno(tree, max(0, self.line - 1))
        code = compile(tree, self.filename, "exec", dont_inherit=True)
        # its own names are never looked up among the patch's: they are what it makes
        local = _namespace(module, "", self.bundled, set(self.keys))
        exec(code, module.__dict__, local)  # the bundle's code: see docs/bundle-format.md
        ns = dict(local)
        self.made.append((module, ns))
        return ns


class _Bound:
    """make(module) for one name a statement binds."""

    __slots__ = ("run", "name")

    def __init__(self, run: _Run, name: str):
        self.run, self.name = run, name

    def __call__(self, module):
        from .pending import UNBOUND
        from .values import Recomputed
        ns = self.run.namespace(module)
        old = vars(module).get(self.name, _ABSENT)
        if self.name in self.run.keeps:  # a def or class the baseline has here: the live one stays
            if self.name not in ns and old is not _ABSENT:
                self._refuse(module, f"the statement no longer defines {self.name} in this process, which has it "
                                     "(the live one would stay)")
            return ns[self.name] if old is _ABSENT and self.name in ns else UNBOUND
        if self.name not in ns:  # the branch binding it did not run here: it keeps what it holds
            return UNBOUND
        new = ns[self.name]
        if old is _ABSENT or old is new:
            return new
        if isinstance(old, (type, types.FunctionType)):
            what = "class" if isinstance(old, type) else "function"
            self._refuse(module, f"the statement would rebind {self.name}, now the {what} "
                                 f"{getattr(old, '__qualname__', self.name)}, which the patch does not replace "
                                 "(instances and references would keep the old one)")
        return Recomputed(new, module)  # what captured the old object gets the new one

    def _refuse(self, module, why: str):
        from .errors import PatchError, Problem
        key = f"{module.__name__}:{self.name}"
        why = f"line {self.run.line}: {why}"
        raise PatchError(f"cannot make {key}: {why}; nothing was changed", [Problem("global-failed", key, why)])


_ABSENT = object()


def manifest_statement(entry: dict, field: str, filename: str, fail, bundled):
    """The new global for a manifest entry of kind "statement": checked now,
    run on the way to a commit (once for all the names it binds)."""
    from .pending import AtCommit, value_for
    tree = checked(entry, field, fail)
    module_name, _, name = entry["name"].partition(":")
    line = entry.get("line", 1)
    run = None
    for other in entry["binds"]:  # a sibling entry of the same statement already loaded
        value = (bundled or {}).get(f"{module_name}:{other}")
        if isinstance(value, AtCommit) and isinstance(value.make, _Bound) and value.make.run.line == line \
                and ast.dump(value.make.run.tree) == ast.dump(tree):
            run = value.make.run
            break
    if run is None:
        run = _Run(tree, [f"{module_name}:{b}" for b in entry["binds"]], entry.get("keeps", ()), filename, line, bundled)
    first = entry["source"].strip().splitlines()[0] if entry["source"].strip() else ""
    return value_for(module_name, _Bound(run, name), runs_code=f"statement binding {name} ({first[:120]})")
