"""Which decorators of a release can be applied again at apply time (runs in
the builder: the syntax trees are read, nothing of them is run).

A decorator is pure when applying it only makes the object it returns: a
wrapper (`def deco(fn): def wrapper(...): ...; return wrapper`, with or
without `functools.wraps(fn)`), a factory of such a wrapper
(`def deco(*args): def wrap(fn): ...; return wrap`) used with arguments that
are literals, names or dotted attributes, or a marker that stores a literal
or a name on the function and returns it (`fn.attr = True; return fn`).
Re-applying one makes a new object and nothing else: the engine then
rebinds what held the old one. Anything else (a registration, a call, a
global store at decoration time) would happen twice, or not be undone by
rollback.

`verdicts` follows the module's imports into the other modules of the
distribution it is given, and answers for every decorator the module uses:
None (pure) or a sentence saying what makes it impure. Keys are the dotted
name as written, with "()" appended where it is called (a factory)."""

from __future__ import annotations

import ast
from typing import Callable


def dotted(node) -> str | None:
    """`a.b.c` for a name or attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _body(node) -> list:
    """A def's statements without its docstring (and other bare strings)."""
    return [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                         and isinstance(n.value.value, str))]


def simple_argument(node) -> bool:
    """A use-site argument of a factory that runs nothing but lookups:
    a literal, a name, a dotted attribute, or a tuple of those."""
    if isinstance(node, ast.Constant) or dotted(node) is not None:
        return True
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(simple_argument(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        return True
    return False


def _params(node) -> list[str]:
    a = node.args
    return [p.arg for p in a.posonlyargs + a.args]


def _calls(node) -> str | None:
    call = next((n for n in ast.walk(node) if isinstance(n, ast.Call)), None)
    return None if call is None else (dotted(call.func) or ast.unparse(call.func))


def _impure_statement(stmt, fn: str) -> str:
    """Why one statement of a decorator's body makes it impure."""
    if isinstance(stmt, (ast.Global, ast.Nonlocal)):
        return f"declares {'global' if isinstance(stmt, ast.Global) else 'nonlocal'} {', '.join(stmt.names)}"
    if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        for t in targets:
            if isinstance(t, ast.Subscript):
                return f"registers in {ast.unparse(t.value)} at decoration time"
            if isinstance(t, ast.Attribute) and dotted(t.value) != fn:
                return f"stores {ast.unparse(t)} at decoration time"
        called = _calls(stmt)
        if called is not None:
            return f"calls {called} at decoration time"
        return f"stores {ast.unparse(targets[0])} from a value other than a literal or a name"
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        func = stmt.value.func
        if isinstance(func, ast.Attribute) and func.attr in ("append", "add", "register", "update", "setdefault",
                                                              "insert", "extend"):
            return f"registers in {ast.unparse(func.value)} at decoration time"
        return f"calls {dotted(func) or ast.unparse(func)} at decoration time"
    if isinstance(stmt, ast.Return):
        return f"returns {ast.unparse(stmt.value) if stmt.value else 'None'} rather than a wrapper it defines"
    return f"runs a {type(stmt).__name__} statement at decoration time"


def _wrapper_def(inner, fn: str) -> str | None:
    """Why the wrapper def inside a decorator is not plain, or None: no
    decorator but functools.wraps(fn), defaults that run nothing."""
    for d in inner.decorator_list:
        if not (isinstance(d, ast.Call) and dotted(d.func) in ("functools.wraps", "wraps") and not d.keywords
                and len(d.args) == 1 and dotted(d.args[0]) == fn):
            return f"decorates its wrapper with @{ast.unparse(d)}"
    for default in inner.args.defaults + [k for k in inner.args.kw_defaults if k is not None]:
        if not simple_argument(default):
            return f"computes the default {ast.unparse(default)} of its wrapper at decoration time"
    return None


def decorator_shape(node) -> str | None:
    """None if the def `node`, used as `@node`, only makes a wrapper or marks
    the function; else what it does that makes it impure."""
    if node.decorator_list:
        return f"is itself decorated (@{ast.unparse(node.decorator_list[0])})"
    if isinstance(node, ast.AsyncFunctionDef):
        return "is a coroutine function: applying it makes a coroutine, not the decorated object"
    params = _params(node)
    if len(params) != 1 or node.args.vararg or node.args.kwarg or node.args.kwonlyargs:
        return "does not take exactly the decorated function"
    fn = params[0]
    body = _body(node)
    if not body:
        return "has no body"
    last = body[-1]
    if isinstance(body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) and len(body) == 2:
        inner = body[0]
        if isinstance(last, ast.Return) and dotted(last.value) == inner.name:
            return _wrapper_def(inner, fn)
    if isinstance(last, ast.Return) and dotted(last.value) == fn:
        for stmt in body[:-1]:  # a marker: fn.attr = CONST
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Attribute)
                    and dotted(stmt.targets[0].value) == fn
                    and (isinstance(stmt.value, ast.Constant) or isinstance(stmt.value, ast.Name))):
                return _impure_statement(stmt, fn)
        return None
    for stmt in body:
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Return)):
            return _impure_statement(stmt, fn)
    return "does not end by returning the one wrapper it defines or the function itself"


def factory_shape(node) -> str | None:
    """None if the def `node`, used as `@node(...)`, is a factory whose body
    is one pure decorator def and its return; else why it is impure."""
    if node.decorator_list:
        return f"is itself decorated (@{ast.unparse(node.decorator_list[0])})"
    body = _body(node)
    if len(body) == 2 and isinstance(body[0], ast.FunctionDef) and isinstance(body[1], ast.Return) \
            and dotted(body[1].value) == body[0].name:
        for default in body[0].args.defaults + [k for k in body[0].args.kw_defaults if k is not None]:
            if not simple_argument(default):
                return f"computes the default {ast.unparse(default)} of its decorator when called"
        why = decorator_shape(body[0])
        return None if why is None else f"makes a decorator that {why}"
    for stmt in body:
        if not isinstance(stmt, (ast.FunctionDef, ast.Return)):
            return _impure_statement(stmt, "").replace("decoration time", "the time it is called")
    return "is not a function whose body is one decorator def and its return"


# ---------------------------------------------------------------- resolution

def _module_of(package: str, level: int, name: str | None) -> str | None:
    """The absolute name `from <level dots><name> import ...` means in `package`."""
    if not level:
        return name
    parts = package.split(".") if package else []
    if level - 1 >= len(parts):
        return None
    return ".".join(parts[:len(parts) - (level - 1)] + ([name] if name else []))


def _imports(tree: ast.Module, package: str) -> dict:
    """name bound at the top of the module -> ("module", M) for `import M`
    or `import M as name` (name binds M's top package unless aliased), or
    ("from", M, attr) for `from M import attr`."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = ("module", a.name)
                else:
                    out[a.name.partition(".")[0]] = ("module", a.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            source = _module_of(package, node.level, node.module)
            if source is None:
                continue
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = ("from", source, a.name)
    return out


def _top_def(tree: ast.Module, name: str):
    found = None
    for n in tree.body:  # the last binding wins, as at import
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name:
            found = n
        elif isinstance(n, (ast.Assign, ast.ClassDef, ast.Import, ast.ImportFrom)) and name in _bound_by(n):
            found = None
    return found


def _bound_by(node) -> set:
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.ClassDef):
        return {node.name}
    return {(a.asname or a.name.partition(".")[0]) for a in node.names}


class _Distribution:
    """Parsed modules of a tree, read on demand through `read(name)`."""

    def __init__(self, read: Callable[[str], str | None], packages: set):
        self.read, self.packages, self.trees = read, packages, {}

    def tree(self, module: str):
        if module not in self.trees:
            try:
                text = self.read(module)
                self.trees[module] = None if text is None else ast.parse(text)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                self.trees[module] = None
        return self.trees[module]

    def package(self, module: str) -> str:
        return module if module in self.packages else module.rpartition(".")[0]

    def find(self, module: str, tree, dotted: str, depth: int = 0):
        """(module, def node) that `dotted`, as looked up at the top of
        `module`, names; None where it is no def of the distribution."""
        if tree is None or depth > 4:
            return None
        head, _, rest = dotted.partition(".")
        if not rest:
            node = _top_def(tree, head)
            if node is not None:
                return module, node
        bound = _imports(tree, self.package(module)).get(head)
        if bound is None:
            return None
        if bound[0] == "from":
            _, source, attr = bound
            target = f"{source}.{attr}"
            if self.tree(target) is not None:  # `from package import submodule`
                return self._in_module(target, rest, depth) if rest else None
            return self.find(source, self.tree(source), attr + (f".{rest}" if rest else ""), depth + 1)
        return self._in_module(bound[1], rest, depth) if rest else None

    def _in_module(self, module: str, rest: str, depth: int):
        parts = rest.split(".")
        while len(parts) > 1 and self.tree(f"{module}.{parts[0]}") is not None:  # import a; a.b.deco
            module, parts = f"{module}.{parts[0]}", parts[1:]
        return self.find(module, self.tree(module), ".".join(parts), depth + 1)


def verdicts(module: str, tree: ast.Module, read: Callable[[str], str | None] = lambda name: None,
             packages=()) -> dict:
    """{decorator as written (+ "()" when called): None if pure, else why
    not} for every decorator of a def in `tree`, the module `module`, whose
    definition is found in it or, through its imports, in a module `read`
    returns the source of (None: not in the distribution). `packages`: the
    names of the distribution that are packages (their __init__)."""
    dist = _Distribution(read, set(packages))
    dist.trees[module] = tree
    out = {}
    for node in ast.walk(tree):
        for d in getattr(node, "decorator_list", ()) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else ():
            called = isinstance(d, ast.Call)
            name = dotted(d.func if called else d)
            key = f"{name}()" if called else name
            if name is None or key in out:
                continue
            found = dist.find(module, tree, name)
            if found is None:
                continue  # not a def of the distribution: left to the built-in list
            where, definition = found
            why = factory_shape(definition) if called else decorator_shape(definition)
            out[key] = None if why is None else f"{why} ({where}.{definition.name}, line {definition.lineno})"
    return out


def tree_reader(source_tree):
    """read(module) for a livepatch.sourcetree tree: the decoded source of a
    module of it, or None."""
    from . import sourcetree

    def read(module: str):
        rel = source_tree.modules.get(module)
        if rel is None:
            return None
        try:
            return sourcetree.decode_source(source_tree.read_bytes(rel))
        except (sourcetree.UnsafeEntry, sourcetree.DecodeFailed, sourcetree.Unreadable):
            return None
    return read


def loaded_reader(base_module: str):
    """read(module) for modules loaded in this process that belong to the
    same top package as `base_module` (their source file, read, never run)."""
    import sys

    def read(module: str):
        if module.partition(".")[0] != base_module.partition(".")[0]:
            return None
        loaded = sys.modules.get(module)
        filename = getattr(loaded, "__file__", None)
        if not filename or not filename.endswith(".py"):
            return None
        try:
            with open(filename, encoding="utf-8") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError):
            return None
    return read


def _packages(source_tree) -> set:
    return {m for m, rel in source_tree.modules.items() if rel.endswith("__init__.py")}


def for_trees(module: str, base_src: str, new_src: str, base_tree, new_tree) -> dict:
    """{"baseline": verdicts, "patched": verdicts} of a changed module of two
    livepatch.sourcetree trees (what the build worker is sent)."""
    out = {}
    for side, src, tree in (("baseline", base_src, base_tree), ("patched", new_src, new_tree)):
        try:
            out[side] = verdicts(module, ast.parse(src), tree_reader(tree), _packages(tree))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            out[side] = {}  # the worker reports why it does not compile
    return out


def for_loaded(module: str, base_src: str, new_src: str) -> dict:
    """The same for a module loaded in this process, its distribution being
    the loaded modules of its top package."""
    import sys
    packages = {name for name, m in list(sys.modules.items()) if hasattr(m, "__path__")}
    out = {}
    for side, src in (("baseline", base_src), ("patched", new_src)):
        try:
            out[side] = verdicts(module, ast.parse(src), loaded_reader(module), packages)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            out[side] = {}
    return out
