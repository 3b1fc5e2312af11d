"""What a release changes that never runs, so that it never blocks a build:
tests shipped in the distribution, docstrings, annotations, `if
TYPE_CHECKING:` blocks, `@overload` stubs beside their implementation,
an explicit `(object)` base and `except ImportError` / `except
ModuleNotFoundError` guards around imports.

`runtime_form` is the text of a syntax tree with those no-ops normalised
away: two versions with the same form behave the same once imported, and
`ignored_reasons` says which normalisations made them the same (what the
build summary lists as ignored). Pure syntax: nothing is imported or run."""

from __future__ import annotations

import ast
import copy
import fnmatch

REASONS = {
    "docstring": "only a docstring changed (documentation, never run)",
    "annotation": "only annotations changed (read by type checkers, not by the running code)",
    "type-checking": "an `if TYPE_CHECKING:` block changed (it never runs)",
    "overload": "only @overload stubs changed (the implementation beside them is what runs)",
    "object-base": "an explicit `(object)` base was added or removed (every class has it)",
    "import-guard": "`except ImportError` and `except ModuleNotFoundError` around an import catch the same failure",
}
STEPS = tuple(REASONS)
TEST_REASON = "a test module shipped in the distribution (the service never imports it)"
_TEST_FILES = ("test_*.py", "*_test.py", "tests.py", "conftest.py")
_TEST_PACKAGES = ("test", "tests")


def is_test_module(module: str, rel: str) -> bool:
    """A module of the tests a distribution ships: in a `tests`/`test`
    package, or a file named like a pytest or unittest test module. A
    module file named `test.py` or `testing.py` is not one: such modules
    (werkzeug.test, flask.testing) are test utilities services may import."""
    name = rel.replace("\\", "/").rpartition("/")[2]
    parts = module.split(".")
    packages = parts if name == "__init__.py" else parts[:-1]
    return any(p in _TEST_PACKAGES for p in packages) or any(fnmatch.fnmatchcase(name, pat) for pat in _TEST_FILES)


SAME_BASE_REASON = "the bases name the same objects through other imports"


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name a module-level import binds it to
    (`from typing import TypedDict` -> "typing.TypedDict", `import a.b` ->
    "a", relative imports keep their dots). A name bound once more by
    anything else, or by two different imports, is left out: which object
    it names is not known from the syntax alone."""
    found: dict[str, set] = {}
    other: set = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault(a.asname or a.name.partition(".")[0], set()).add(a.name if a.asname else a.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            source = "." * node.level + (node.module or "")
            for a in node.names:
                found.setdefault(a.asname or a.name, set()).add(f"{source}.{a.name}" if node.module else f"{source}{a.name}")
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [n for h in getattr(node, "handlers", ()) for n in h.body]
        else:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                other.add(node.name)
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                    other.add(sub.id)
    return {name: next(iter(t)) for name, t in found.items() if len(t) == 1 and name not in other}


def _resolved(node, names: dict) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id)] + parts[::-1])


def same_bases(base: ast.ClassDef, new: ast.ClassDef, base_tree: ast.Module, new_tree: ast.Module):
    """["OLD is NEW", ...] for the bases written differently that name the
    same object through each side's imports, when every base does; None
    when the bases differ (an explicit `object` base aside)."""
    def bases(node):
        return [b for b in node.bases if not (isinstance(b, ast.Name) and b.id == "object")]
    old, now = bases(base), bases(new)
    if len(old) != len(now):
        return None
    base_names, new_names = imported_names(base_tree), imported_names(new_tree)
    out = []
    for b, n in zip(old, now):
        if ast.dump(b) == ast.dump(n) and _resolved(b, base_names) == _resolved(n, new_names):
            continue
        resolved = _resolved(b, base_names)
        if resolved is None or resolved != _resolved(n, new_names):
            return None
        out.append(f"{ast.unparse(b)} is {ast.unparse(n)}")
    return out or None


def _is_name(node, names) -> bool:
    return (isinstance(node, ast.Name) and node.id in names) or \
        (isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name))


def is_type_checking(node) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` with no else."""
    return isinstance(node, ast.If) and _is_name(node.test, ("TYPE_CHECKING",)) and not node.orelse


def is_overload(node) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
        any(_is_name(d, ("overload",)) for d in node.decorator_list)


def _docstring_of(body) -> bool:
    return bool(body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)


def _only_imports(body) -> bool:
    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body)


class _Normaliser(ast.NodeTransformer):
    def __init__(self, steps):
        self.steps = set(steps)

    def _body(self, node):
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if not isinstance(body, list):
                continue
            if "docstring" in self.steps and name == "body" and _docstring_of(body) and \
                    isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                body = body[1:]
            if "type-checking" in self.steps:
                body = [n for n in body if not is_type_checking(n)]
            if "overload" in self.steps:
                body = [n for n in body if not is_overload(n)]
            setattr(node, name, body)
        return node

    def generic_visit(self, node):
        self._body(node)
        return super().generic_visit(node)

    def visit_arg(self, node):
        if "annotation" in self.steps:
            node.annotation = None
        return node

    def visit_FunctionDef(self, node):
        if "annotation" in self.steps:
            node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        if "annotation" in self.steps and not _is_name_in(node.annotation, ("ClassVar", "InitVar")):
            node.annotation = ast.Constant(None)  # a field stays a field: only its declared type goes
        return self.generic_visit(node)

    def visit_ClassDef(self, node):
        if "object-base" in self.steps:
            node.bases = [b for b in node.bases if not (isinstance(b, ast.Name) and b.id == "object")]
        return self.generic_visit(node)

    def visit_Try(self, node):
        if "import-guard" in self.steps and _only_imports(node.body):
            for handler in node.handlers:
                if _is_name(handler.type, ("ModuleNotFoundError",)):
                    handler.type = ast.Name("ImportError", ast.Load())
        return self.generic_visit(node)


def _is_name_in(node, names) -> bool:
    return any(_is_name(n, names) for n in ast.walk(node))


def runtime_form(node, steps=STEPS) -> str:
    """The node's text with the no-ops of `steps` normalised away."""
    if isinstance(node, list):
        return "\n".join(runtime_form(n, steps) for n in node)
    out = _Normaliser(steps).visit(copy.deepcopy(node))
    return ast.dump(out, include_attributes=False)


def ignored_reasons(base, new) -> list[str] | None:
    """The no-op steps without which `base` and `new` would differ, when
    they behave the same; None when they do not (a real change)."""
    if runtime_form(base) != runtime_form(new):
        return None
    needed = [s for s in STEPS if runtime_form(base, [t for t in STEPS if t != s]) !=
              runtime_form(new, [t for t in STEPS if t != s])]
    return needed or [s for s in STEPS if runtime_form(base, [s]) != runtime_form(base, ()) or
                      runtime_form(new, [s]) != runtime_form(new, ())]


def describe(reasons) -> str:
    return "; ".join(REASONS[r] for r in reasons)


def overload_stubs(tree: ast.Module) -> dict[str, list[int]]:
    """qualname -> positions, among the definitions of that qualname in
    source order, of the @overload stubs (their code objects come in the
    same order in the compiled module)."""
    out: dict[str, list[int]] = {}
    seen: dict[str, int] = {}
    for q, node in _all_defs(tree):
        position = seen[q] = seen.get(q, -1) + 1
        if is_overload(node):
            out.setdefault(q, []).append(position)
    return out


def without_overloads(codes: dict, tree: ast.Module) -> dict:
    """The qualname -> code objects map without the code of @overload stubs
    (and of what is nested in them)."""
    stubs = overload_stubs(tree)
    if not stubs:
        return codes
    out = dict(codes)
    dropped = []
    for q, positions in stubs.items():
        group = out.get(q, [])
        dropped += [c for i, c in enumerate(group) if i in positions]
        out[q] = [c for i, c in enumerate(group) if i not in positions]
        if not out[q]:
            del out[q]
    inside = {id(c) for stub in dropped for c in _nested(stub)}
    return {q: kept for q, group in out.items() if (kept := [c for c in group if id(c) not in inside])}


def overload_changes(base_tree: ast.Module, new_tree: ast.Module) -> list[tuple[str, int]]:
    """(qualname, line) of every definition whose @overload stubs differ."""
    def stubs(tree):
        out: dict = {}
        for q, node in _all_defs(tree):
            if is_overload(node):
                out.setdefault(q, []).append(node)
        return out

    base, new = stubs(base_tree), stubs(new_tree)
    return [(q, (new.get(q) or base[q])[0].lineno) for q in sorted(base.keys() | new.keys())
            if runtime_form(base.get(q, []), ()) != runtime_form(new.get(q, []), ())]


def _all_defs(tree):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, prefix + child.name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            elif not isinstance(child, ast.Lambda):
                yield from walk(child, prefix)
    return walk(tree, "")


def _nested(code):
    for const in code.co_consts:
        if hasattr(const, "co_consts"):
            yield const
            yield from _nested(const)
