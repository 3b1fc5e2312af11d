"""What the builder makes of changed assignments and new definitions (runs
in the build worker: standard library only, nothing of the trees is run).

* `literal`: a value known without running anything: a literal, or an
  expression the compiler folds into one (`64 * 1024`, `-1`, `"a" * 3`).
* Any other changed assignment is a *value*: its expression, evaluated at
  apply time (livepatch.values). `references` lists where the source binds
  that value once more at import (a default or an alias that is exactly the
  name), and names what keeps the old value because it is computed from it.
* `statement`: the text of a new definition (decorators included) that is
  executed at apply time.
* `pure_decorators`: whether a decorator list can be re-applied: the
  built-in descriptors and functools caches, whose only effect is the
  object they return.
* `undefined_names`: global names patched code would look up but that the
  module does not bind once the patch is in (each one a NameError)."""

from __future__ import annotations

import ast
import builtins
import dis
import symtable
import types

from .decorators import dotted as _dotted, simple_argument

_CONST_OPS = {"RESUME", "NOP", "CACHE", "LOAD_CONST", "RETURN_VALUE", "RETURN_CONST"}


class NotLiteral(ValueError):
    pass


def literal(node: ast.AST):
    """The value of `node` when no code needs to run to know it; else
    NotLiteral."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        code = compile(ast.Expression(body=node), "<literal>", "eval", dont_inherit=True)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise NotLiteral("not a literal") from None
    if code.co_names or any(i.opname not in _CONST_OPS for i in dis.get_instructions(code)):
        raise NotLiteral("not a literal")
    value = eval(code, {"__builtins__": {}})  # only loads the constant the compiler folded
    try:
        if ast.literal_eval(repr(value)) != value:
            raise NotLiteral("no literal form")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise NotLiteral("no literal form") from None
    return value


def expression(node: ast.AST) -> str:
    return ast.unparse(node)


def statement(node: ast.AST) -> tuple[str, int]:
    """(source of a def or class with its decorators, the line it starts at)."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
    text = ast.unparse(node)
    return text, first


# ---------------------------------------------------------------- references

def _names_in(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _scopes(tree: ast.Module):
    """(class qualname or "", body) of the module and every class not
    inside a function, and (qualname, def) of every function not inside one."""
    bodies, defs = [("", tree.body)], []
    todo = [("", tree.body)]
    while todo:
        prefix, body = todo.pop()
        for n in body:
            if isinstance(n, ast.ClassDef):
                q = f"{prefix}{n.name}"
                bodies.append((q, n.body))
                todo.append((q + ".", n.body))
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.append((f"{prefix}{n.name}", n, prefix.rstrip(".")))
    return bodies, defs


def references(tree: ast.Module, qualname: str, changed=(), tables: bool = False) -> tuple[list, list]:
    """(refs, stale) for the changed assignment at `qualname` ("NAME" or
    "Class.NAME"): refs the engine rebinds to the new value when they still
    hold the old one ("defaults:QUAL:I", "kwdefaults:QUAL:ARG",
    "alias:QUAL"), and sentences naming what keeps the old value. `changed`
    are the other qualnames the patch assigns anew (not stale). `tables`:
    a list, tuple or dict display holding the name is no stale copy (the
    engine rebinds it to a copy holding a function defined anew)."""
    scope, _, name = qualname.rpartition(".")
    refs, stale = [], []
    bodies, defs = _scopes(tree)
    for owner, body in bodies:
        if owner != scope:
            continue
        for n in body:
            if isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) for t in n.targets):
                for t in n.targets:
                    q = f"{owner}.{t.id}" if owner else t.id
                    if q == qualname or q in changed:
                        continue
                    if isinstance(n.value, ast.Name) and n.value.id == name:
                        refs.append(f"alias:{q}")
                    elif tables and _table_of_names(n.value):
                        continue
                    elif name in _names_in(n.value):
                        stale.append(f"{q} is computed from {name} at import and keeps the value made from the old one")
    for q, node, owner in defs:
        if owner != scope:
            continue
        a = node.args
        for i, d in enumerate(a.defaults):
            if isinstance(d, ast.Name) and d.id == name:
                refs.append(f"defaults:{q}:{i}")
            elif name in _names_in(d):
                stale.append(f"a default of {q} is computed from {name} at import and keeps the old value")
        for arg, d in zip(a.kwonlyargs, a.kw_defaults):
            if d is None:
                continue
            if isinstance(d, ast.Name) and d.id == name:
                refs.append(f"kwdefaults:{q}:{arg.arg}")
            elif name in _names_in(d):
                stale.append(f"a default of {q} is computed from {name} at import and keeps the old value")
        for d in node.decorator_list:
            if name in _names_in(d):
                stale.append(f"the decorator of {q} was applied with the old {name} at import")
    return refs, stale


def _table_of_names(node) -> bool:
    """A list, tuple or dict display whose items (dict values) are names or
    literals: what captured a function in it is found by identity."""
    items = node.values if isinstance(node, ast.Dict) else getattr(node, "elts", None)
    if not isinstance(node, (ast.List, ast.Tuple, ast.Dict)) or None in (getattr(node, "keys", None) or ()):
        return False
    return all(isinstance(i, (ast.Name, ast.Constant)) for i in items)


# ---------------------------------------------------------------- decorators

_PURE = {"staticmethod", "classmethod", "property", "cached_property", "functools.cached_property",
         "lru_cache", "functools.lru_cache", "cache", "functools.cache", "abstractmethod", "abc.abstractmethod"}


def _wraps_style(tree, name: str | None) -> bool:
    """Whether `name` is a decorator defined at the top of the module that
    only wraps: `def deco(fn): @functools.wraps(fn) def inner(...): ...;
    return inner` (applying it again makes a new wrapper and nothing else)."""
    if tree is None or name is None or "." in name:
        return False
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None or node.decorator_list or len(node.args.args) != 1:
        return False
    body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if len(body) != 2 or not isinstance(body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    inner, ret = body
    deco = inner.decorator_list
    return (len(deco) == 1 and isinstance(deco[0], ast.Call) and _dotted(deco[0].func) in ("functools.wraps", "wraps")
            and [ast.dump(a) for a in deco[0].args] == [ast.dump(ast.Name(node.args.args[0].arg, ast.Load()))]
            and isinstance(ret, ast.Return) and isinstance(ret.value, ast.Name) and ret.value.id == inner.name)


def impure_decorator(node, tree=None, known=None) -> str | None:
    """The first decorator of a def that is not known to be pure (as text),
    or None when re-applying them all only makes the new object. `tree`, the
    module, lets functools.wraps-style decorators defined in it count;
    `known` (livepatch.decorators.verdicts) the wrappers, factories and
    markers of the distribution."""
    return (impure_reason(node, tree, known) or (None, None))[0]


def impure_reason(node, tree=None, known=None) -> tuple[str, str | None] | None:
    """(text, what makes it impure or None when unknown) of the first
    decorator of a def that is not known to be pure; None if all are."""
    for d in getattr(node, "decorator_list", ()):
        target, args = (d.func, d.args + [k.value for k in d.keywords]) if isinstance(d, ast.Call) else (d, [])
        name = _dotted(target)
        accessor = name is not None and name.rpartition(".")[2] in ("setter", "getter", "deleter") and "." in name
        if not isinstance(d, ast.Call) and _wraps_style(tree, name):
            continue
        key = f"{name}()" if isinstance(d, ast.Call) else name
        if known and key in known:
            if known[key] is not None:
                return ast.unparse(d), known[key]
            bad = next((a for a in args if not simple_argument(a)), None)
            if bad is None:
                continue
            return ast.unparse(d), f"is called with {ast.unparse(bad)}, which is more than a literal or a name"
        if name in _PURE or accessor:
            try:
                for a in args:
                    literal(a)
                continue
            except NotLiteral:
                pass
        return ast.unparse(d), None
    return None


# ---------------------------------------------------------------- names

_MODULE_NAMES = {"__name__", "__file__", "__doc__", "__package__", "__spec__", "__loader__", "__builtins__",
                 "__path__", "__cached__", "__annotations__", "__dict__", "__debug__"}


def bound_names(tree: ast.Module) -> set | None:
    """Names a module binds at import (any statement, any branch), and the
    names its functions declare global; None if a star import makes that
    unknowable."""
    if any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(tree)):
        return None
    table = symtable.symtable(ast.unparse(tree), "<module>", "exec")
    out = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    todo = list(table.get_children())
    while todo:
        t = todo.pop()
        out |= {s.get_name() for s in t.get_symbols() if s.is_declared_global()}
        todo += t.get_children()
    return out


def code_globals(code: types.CodeType) -> set:
    """Global (and, in class bodies, unqualified) names a code object and
    the code nested in it look up."""
    out, todo = set(), [code]
    while todo:
        c = todo.pop()
        loaded, stored = set(), set()
        for i in dis.get_instructions(c):
            if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                loaded.add(i.argval)
            elif i.opname == "STORE_NAME":
                stored.add(i.argval)
        out |= loaded - stored  # a class body's own names (class Local: x = 1; y = x) are its own
        todo += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return out


def expression_globals(node: ast.AST) -> set:
    try:
        return code_globals(compile(ast.Expression(body=node), "<value>", "eval", dont_inherit=True))
    except (ValueError, SyntaxError, RecursionError):
        return _names_in(node)


def definition_globals(node: ast.AST) -> set:
    """Names the def or class statement itself looks up where it runs:
    decorators, defaults, bases, keywords (its body is code of its own)."""
    parts = list(getattr(node, "decorator_list", ()))
    if isinstance(node, ast.ClassDef):
        parts += node.bases + [k.value for k in node.keywords]
    else:
        parts += node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
    out = set()
    for p in parts:
        out |= expression_globals(p)
    return out


def undefined_names(used: dict, bound: set | None, class_names: dict) -> list:
    """(qualname, name) for every name in `used` (qualname -> names, a
    qualname's class attributes in `class_names`) that is neither bound,
    builtin nor a module attribute every module has."""
    if bound is None:
        return []
    known = bound | set(dir(builtins)) | _MODULE_NAMES
    out = []
    for qualname, names in used.items():
        parent = qualname.rpartition(".")[0]
        scope = class_names.get(qualname, set()) | class_names.get(parent, set()) \
            | class_names.get(parent.rpartition(".")[0], set())  # a method's defaults: its class
        for name in sorted(names - known - scope):
            out.append((qualname, name))
    return out


def class_attributes(tree: ast.Module) -> dict:
    """class qualname -> names its body binds (for class-scope lookups)."""
    out = {}
    for q, body in _scopes(tree)[0]:
        if q:
            names = set()
            for n in body:
                for sub in ast.walk(n) if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.id)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(n.name)
            out[q] = names
    return out


# ---------------------------------------------------------------- the diff's hooks
# (diff: build.ModuleDiff; each adds to diff.values, diff.definitions or diff.refused)

HOOK_HINT = ("a migration hook can do it: build with --hooks hooks.py defining pre_apply(ctx) to migrate "
             "the live objects (ctx.module(name) is the module) and post_rollback(ctx) to migrate them back")


def add_value(diff, qualname: str, node: ast.Assign) -> None:
    """A changed assignment: its literal as a constant, else its expression
    as a value evaluated at apply time. One in a class defined inside a
    function runs anew with every call: the function's new code carries it."""
    if "<locals>" in qualname:
        return
    try:
        diff.constants[qualname] = literal(node.value)
    except NotLiteral:
        v = node.value
        diff.values[qualname] = {"expression": expression(v), "line": v.lineno,
                                 "spans": [(v.lineno, v.col_offset, v.end_lineno, v.end_col_offset)]}


def add_defaults(diff, qualname: str, node: ast.AST) -> bool:
    """Changed defaults that are not literals: `QUALNAME.__defaults__` and
    `QUALNAME.__kwdefaults__` become values, evaluated at apply time where
    the def is and stored on the function in the commit that swaps its code.
    False where the function the module holds is a decorator's wrapper."""
    if "<locals>" in qualname or any(_dotted(d) not in ("staticmethod", "classmethod") for d in node.decorator_list):
        return False
    a = node.args
    positional = ast.Tuple(elts=list(a.defaults), ctx=ast.Load()) if a.defaults else ast.Constant(None)
    kw = [(arg.arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    keywords = ast.Dict(keys=[ast.Constant(k) for k, _ in kw], values=[d for _, d in kw]) if kw else ast.Constant(None)
    for suffix, value in (("__defaults__", positional), ("__kwdefaults__", keywords)):
        ast.copy_location(value, node)
        diff.values[f"{qualname}.{suffix}"] = {"expression": expression(value), "line": node.lineno, "spans": []}
    return True


def class_cell_redefinition(diff, qualname: str, base: types.CodeType, new: types.CodeType, node, count: int,
                            tree) -> bool:
    """A method whose free variables differ only by `__class__` (it began or
    stopped using zero-argument super()) cannot get new code in place (the
    cell is the function's); it is defined again inside its class instead,
    replacing the old one everywhere it was captured. False otherwise."""
    if "<locals>" in qualname or "." not in qualname or count != 1 \
            or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
            or set(base.co_freevars) ^ set(new.co_freevars) != {"__class__"} or impure_decorator(node, tree):
        return False
    add_definition(diff, qualname, node, replaces=True)
    return True


def add_definition(diff, qualname: str, node: ast.AST, replaces: bool = False) -> None:
    text, line = statement(node)
    diff.definitions[qualname] = {"statement": text, "line": line, "replaces": replaces,
                                  "spans": [(line, 0, node.end_lineno, None)]}


def _same_named(tree: ast.Module, qualname: str) -> list:
    """Every def of `qualname`'s scope that binds its name, in order (a new
    property's getter and its @x.setter are one definition)."""
    owner, _, name = qualname.rpartition(".")
    for q, body in _scopes(tree)[0]:
        if q == owner:
            return [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    return []


def inside_new_class(qualname: str, base_defs: dict, new_defs: dict) -> bool:
    """Whether the code at `qualname` is defined by a new class around it
    (it then comes with that class's definition)."""
    parts = qualname.split(".")
    for i in range(1, len(parts)):
        outer = ".".join(parts[:i])
        if isinstance(new_defs.get(outer), ast.ClassDef) and outer not in base_defs:
            return True
    return False


def finish(diff, base_tree: ast.Module, new_tree: ast.Module, new_codes: dict) -> None:
    """References of the changed values, and the names check."""
    for q, entry in diff.definitions.items():
        nodes = _same_named(new_tree, q)
        if len(nodes) > 1 and not entry["replaces"]:
            texts = [statement(n) for n in nodes]
            entry.update(statement="\n".join(t for t, _ in texts), line=texts[0][1],
                         spans=[(line, 0, n.end_lineno, None) for (_, line), n in zip(texts, nodes)])
    changed = set(diff.constants) | set(diff.values)
    diff.captured = {}
    for qualname in sorted(changed):
        refs, stale = references(new_tree, qualname, changed)
        if refs or stale:
            diff.captured[qualname] = {"refs": refs, "stale": stale}
    for qualname, entry in diff.definitions.items():
        if entry["replaces"]:  # what holds the old object by identity is found at apply time; not what copied it
            stale = references(new_tree, qualname, changed | set(diff.definitions), tables=True)[1]
            if stale:
                diff.captured[qualname] = {"refs": [], "stale": stale}
    bound = bound_names(base_tree)
    if bound is None:
        return
    bound |= {q.partition(".")[0] for q in list(changed) + [f[0] for f in diff.new_functions] + list(diff.definitions)}
    bound |= {name for name, _ in diff.new_imports}
    bound |= {n for s in getattr(diff, "statements", {}).values() for n in s["binds"]}  # run at apply time
    # what a function of the release binds with `global NAME` exists once it ran, as in the release itself
    bound |= {n for node in ast.walk(new_tree) if isinstance(node, ast.Global) for n in node.names}
    used: dict = {}
    for q, _fp, code, _d, _kw in diff.changes:
        used.setdefault(q, set()).update(code_globals(code))
    for q, code, _d, _kw in diff.new_functions:
        used.setdefault(q, set()).update(code_globals(code))
    defs = _all_defs(new_tree)
    for q in diff.definitions:
        names = used.setdefault(q, set())
        for code in new_codes.get(q, ()):
            names |= code_globals(code)
        if q in defs:
            names |= definition_globals(defs[q])
            # names a class body inside the definition binds and then looks up (class Meta: ...)
            names -= {n.id for n in ast.walk(defs[q]) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            names -= {n.name for n in ast.walk(defs[q]) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for q, entry in diff.values.items():
        used.setdefault(q, set()).update(expression_globals(ast.parse(entry["expression"], mode="eval").body))
    line_of = {q: getattr(defs.get(q), "lineno", None) for q in used}
    for q, entry in diff.values.items():
        line_of[q] = entry["line"]
    for q, name in undefined_names(used, bound, class_attributes(new_tree)):
        where = f"line {line_of[q]}: " if line_of.get(q) else ""
        diff.refused.append(_problem("refused:undefined-name", f"{diff.module}:{q}",
                                     f"{where}uses the global name {name!r}, which the module does not bind once "
                                     "the patch is in (every call would raise NameError)"))


def _all_defs(tree) -> dict:
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + child.name] = child
            elif isinstance(child, ast.ClassDef):
                out[prefix + child.name] = child
                walk(child, prefix + child.name + ".")
            elif not isinstance(child, ast.Lambda):
                walk(child, prefix)
    walk(tree, "")
    return out


def _problem(category, target, message):
    from .errors import Problem
    return Problem(category, target, message)


def exact_sources(diff, source: str) -> None:
    """Replace the unparsed text of values and definitions by their lines
    as written (so tracebacks of code made at apply time match the patched
    source), where that text parses on its own."""
    import textwrap
    lines = source.splitlines(keepends=True)
    for entries, key, mode in ((diff.values, "expression", "eval"), (diff.definitions, "statement", "exec"),
                               (getattr(diff, "statements", {}), "statement", "exec")):
        for entry in entries.values():
            texts = []
            for first, col, last, end_col in entry.pop("spans"):
                chunk = lines[first - 1:last]
                if end_col is not None and chunk:
                    chunk[-1] = chunk[-1][:end_col] if len(chunk) > 1 else chunk[-1][col:end_col]
                    if len(chunk) > 1:
                        chunk[0] = chunk[0][col:]
                texts.append("".join(chunk) if mode == "eval" else textwrap.dedent("".join(chunk)))
            text = "\n".join(texts)
            if not text.strip():
                continue
            try:
                ast.parse(text, mode=mode)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
            entry[key] = text.rstrip("\n") if mode == "eval" else text


def global_entries(module: str, values: dict, definitions: dict, captured: dict,
                   statements: dict | None = None) -> tuple[list, dict]:
    """(manifest entries of a module's values and definitions, {name: the
    "refs" and "stale" of a changed value or constant}): the form both a
    bundle and an in-process patch carry them in."""
    entries = [{"name": f"{module}:{q}", "kind": "value", "expression": v["expression"], "line": v["line"],
                **({"built": v["built"]} if "built" in v else {})} for q, v in values.items()]
    entries += [{"name": f"{module}:{q}", "kind": "definition", "source": d["statement"], "line": d["line"],
                 "replaces": d["replaces"]} for q, d in definitions.items()]
    if statements:
        from .statements import manifest_entries
        entries += manifest_entries(module, statements)
    extra = {f"{module}:{q}": {k: c[k] for k in ("refs", "stale") if c[k]} for q, c in captured.items()}
    return entries, {k: v for k, v in extra.items() if v}


def annotated_value(diff, node: ast.AST, base: list) -> bool:
    """A changed module-level `NAME: type = value` becomes a value (or a
    constant) like a plain assignment; the baseline's statement binding the
    same name is taken from `base`. False for anything else."""
    if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
        return False
    name = node.target.id
    for old in base:
        if isinstance(old, ast.AnnAssign) and isinstance(old.target, ast.Name) and old.target.id == name:
            base.remove(old)
            break
    add_value(diff, name, node)
    return True
