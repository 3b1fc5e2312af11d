"""Objects built at import by code the patch changes.

An unchanged statement such as `Retry.DEFAULT = Retry(3)` ran once, at
import, with the old construction code: the object it stored keeps what the
old `__init__` made of the old defaults and class values (a lower-cased copy
of a header list, a compiled pattern), even once the patch is in. The
builder (`add_recomputed`, pure syntax, run in the build worker) finds such
statements and either

* makes them *recomputed* values (a value entry with a "built" record) when
  re-running is safe: a plain `NAME = C(args)` / `Cls.ATTR = C(args)` whose
  arguments are literals or names, the target never mutated by a later
  module-level statement, and C a class or function of the same module; or
* warns, naming the object and where it was built, and that a `--hooks`
  post_apply can rebuild it.

At apply time (`construct`, before the pause like any value) the call runs
with the patch's construction code: a copy of the constructor (or function)
with the new code, the new defaults in the slots the source binds to the
changed names, and module globals overlaid with the changed names it reads.
The live class and module are not touched until the commit stores the
result."""

from __future__ import annotations

import ast

from . import definitions as defs
from .errors import Problem

WARNING = "warning:built-at-import"
_CONSTRUCTION = ("__new__", "__post_init__")


# ---------------------------------------------------------------- build side

def add_recomputed(diff, base_tree: ast.Module, new_tree: ast.Module) -> None:
    """Recomputed values (in diff.values, with "built") and warnings (in
    diff.warnings) for the unchanged statements that built an object with
    construction code this diff changes. Runs after definitions.finish."""
    classes = {n.name: n for n in new_tree.body if isinstance(n, ast.ClassDef)}
    functions = {n.name: n for n in new_tree.body if isinstance(n, ast.FunctionDef)}
    unchanged = {_dump(n) for _, n, _ in _assignments(base_tree)}
    for scope, node, later in _assignments(new_tree):
        if _dump(node) not in unchanged:
            continue  # a changed statement is a changed value already
        for call in _calls(node.value):
            name = call.func.id
            if name not in classes and name not in functions:
                continue
            found = _construction(diff, name, classes.get(name), functions.get(name), new_tree)
            if found is None:
                continue
            reason, blockers, built = found
            _record(diff, new_tree, scope, node, call, later, classes, reason, blockers, built)
            break


def _record(diff, tree, scope, node, call, later, classes, reason, blockers, built) -> None:
    target = _target(scope, node)
    shown = target or f"the object built at line {node.lineno}"
    why = f"built at import by {ast.unparse(call)}, {reason}"
    unsafe = list(blockers)
    if target is None:
        unsafe.append("its statement is not an assignment to a name or to a class attribute of this module")
    elif not (isinstance(node, ast.Assign) and node.value is call):
        unsafe.append("it is not a plain assignment of the call's result")
    elif not _plain_arguments(call):
        unsafe.append("the call's arguments are not literals or names")
    elif target in diff.values or target in diff.constants:
        return  # the patch assigns it anew itself
    else:
        if "." in target and target.partition(".")[0] not in classes:
            unsafe.append(f"it is stored on {target.partition('.')[0]}, not on a class of this module")
        mutated = _mutated(target, later)
        if mutated:
            unsafe.append(mutated)
    where = f"{diff.module}:{target or '<module>'}"
    if unsafe:
        diff.warnings.append(Problem(WARNING, where, (
            f"line {node.lineno}: {shown} was {why}; it keeps the state built by the old code "
            f"({'; '.join(unsafe)}); a --hooks post_apply(ctx) can rebuild it (see livepatch/hooks.py)")))
        return
    v = node.value
    built["reason"] = why
    diff.values[target] = {"expression": defs.expression(v), "line": v.lineno, "built": built,
                           "spans": [(v.lineno, v.col_offset, v.end_lineno, v.end_col_offset)]}
    refs, stale = defs.references(tree, target, set(diff.values) | set(diff.constants))
    if refs or stale:
        diff.captured[target] = {"refs": refs, "stale": stale}


def _construction(diff, name: str, cls, fn, tree):
    """(reason, blockers, built) when calling `name` runs code or reads
    values the diff changes; None when its construction is unchanged."""
    changed_code = {q for q, *_ in diff.changes} | {q for q, d in diff.definitions.items() if d.get("replaces")}
    changed = set(diff.values) | set(diff.constants)
    blockers, reasons = [], []
    if cls is not None:
        function = f"{name}.__init__"
        who = "its __init__"
        for member in _CONSTRUCTION:
            if f"{name}.{member}" in changed_code:
                reasons.append(f"whose {member} changed")
                blockers.append(f"its {member} changed, and only an __init__ can be run anew before the commit")
        node = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if cls.decorator_list and any(q.startswith(f"{name}.") for q in changed_code | changed):
            reasons.append("whose class, made by a decorator, changed")
            blockers.append("the class decorator makes its construction")
    else:
        function, who, node = name, "it", fn
    if node is None:
        return ("; ".join(reasons), blockers, {}) if reasons else None
    if function in changed_code:
        reasons.append(f"whose {who[4:] if cls is not None else 'code'} changed")
        if node.decorator_list:
            blockers.append(f"{function} is decorated")
    reads, slots = [], {}
    for suffix in ("__defaults__", "__kwdefaults__"):
        if f"{function}.{suffix}" in diff.values:
            reasons.append(f"whose changed defaults {who} takes")
            reads.append(f"{function}.{suffix}")
    for q, captured in sorted(diff.captured.items()):
        bound = [r for r in captured.get("refs", ()) if r.startswith((f"defaults:{function}:", f"kwdefaults:{function}:"))]
        if bound:
            reasons.append(f"whose changed {q.rpartition('.')[2]} {who} reads")
            reads.append(q)
            slots.update({r: q for r in bound})
    new_names = {n for n, _ in diff.new_imports} | {q for q, *_ in diff.new_functions} \
        | {q for q in diff.definitions if "." not in q}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            if n.id in changed and "." not in n.id and n.id not in reads:
                reasons.append(f"whose changed {n.id} {who} reads")
                reads.append(n.id)
            elif n.id in new_names and n.id not in reads:
                reads.append(n.id)  # a name the new code needs that only the patch binds
            elif n.id in changed_code and n.id != name:
                blockers.append(f"{who} calls {n.id}, whose new code runs only once the patch is in")
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and cls is not None \
                and n.value.id in ("self", "cls", name):
            q = f"{name}.{n.attr}"
            if q in changed and q not in reads:
                reasons.append(f"whose changed {n.attr} {who} reads")
                blockers.append(f"{who} reads {q} at run time, which holds the old value until the commit")
            elif q in changed_code and q != function:
                blockers.append(f"{who} calls {q}, whose new code runs only once the patch is in")
    if not reasons:
        return None  # calling changed code alone is not a construction the patch changes
    built = {"call": name, "function": function, "reads": reads, "slots": slots}
    if function in changed_code:
        built["source"], built["line"] = defs.statement(node)
    return "; ".join(dict.fromkeys(reasons)), list(dict.fromkeys(blockers)), built


def _assignments(tree: ast.Module):
    """(class qualname or "", statement, later module-level statements as
    (scope, node)) for every module-level and top-level class-body
    assignment."""
    body = tree.body
    for i, n in enumerate(body):
        rest = [("", m) for m in body[i + 1:]]
        if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None:
            yield "", n, rest
        elif isinstance(n, ast.ClassDef):
            for j, m in enumerate(n.body):
                if isinstance(m, (ast.Assign, ast.AnnAssign)) and m.value is not None:
                    yield n.name, m, [(n.name, k) for k in n.body[j + 1:]] + rest


def _calls(value):
    """Calls of a plain name inside an assigned value, outermost first (not
    inside lambdas, whose bodies do not run at import)."""
    todo = [value]
    while todo:
        n = todo.pop(0)
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            yield n
        todo += list(ast.iter_child_nodes(n))


def _target(scope: str, node) -> str | None:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if len(targets) != 1:
        return None
    t = targets[0]
    if isinstance(t, ast.Name):
        return f"{scope}.{t.id}" if scope else t.id
    if not scope and isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
        return f"{t.value.id}.{t.attr}"
    return None


def _plain_arguments(call: ast.Call) -> bool:
    def plain(a):
        if isinstance(a, (ast.Name, ast.Constant)):
            return True
        try:
            defs.literal(a)
            return True
        except defs.NotLiteral:
            return False
    return all(plain(a) for a in call.args) and all(k.arg is not None and plain(k.value) for k in call.keywords)


def _mutated(target: str, later) -> str | None:
    """Why a later statement at import changes or rebinds `target` (a
    method call on it, a store into it, passing it to a call), or None."""
    scope, _, name = target.rpartition(".")
    for where, stmt in later:
        forms = {_dump(ast.Name(name, ast.Load()))} if where == scope else set()
        if scope and not where:
            forms.add(_dump(ast.Attribute(ast.Name(scope, ast.Load()), name, ast.Load())))
        elif not scope:
            forms.add(_dump(ast.Name(name, ast.Load())))
        if not forms:
            continue
        for n in _runs_at_import(stmt):
            if isinstance(n, ast.Call):
                if isinstance(n.func, ast.Attribute) and _inside(n.func.value, forms):
                    return f"line {n.lineno} calls a method on it"
                if any(_dump(a.value if isinstance(a, ast.Starred) else a) in forms for a in n.args) \
                        or any(_dump(k.value) in forms for k in n.keywords):
                    return f"line {n.lineno} passes it to a call"
            targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else \
                [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if _dump(t) in forms:
                    return f"line {n.lineno} binds it again"
                if isinstance(t, (ast.Attribute, ast.Subscript)) and _inside(t.value, forms):
                    return f"line {n.lineno} stores into it"
    return None


def _runs_at_import(stmt):
    """The nodes of a statement that run when it does (not function or
    lambda bodies)."""
    todo = [stmt]
    while todo:
        n = todo.pop()
        yield n
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo += n.decorator_list + n.args.defaults + [d for d in n.args.kw_defaults if d is not None]
        elif not isinstance(n, ast.Lambda):
            todo += list(ast.iter_child_nodes(n))


def _inside(node, forms) -> bool:
    """Whether `node` is one of `forms` or an attribute/subscript chain on one."""
    while True:
        if _dump(node) in forms:
            return True
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        else:
            return False


def _dump(node) -> str:
    return ast.dump(node, include_attributes=False).replace("ctx=Store()", "ctx=Load()").replace("ctx=Del()", "ctx=Load()")


# ---------------------------------------------------------------- apply side

def construct(module, qualname: str, expression: str, filename: str, line: int, refs, built: dict, bundled, making):
    """The recomputed value: `expression` evaluated with the name it calls
    bound to the patch's construction (see the module docstring)."""
    from .values import evaluate
    making.add(f"{module.__name__}:{qualname}")
    try:
        staged = _staged(module, built, filename, bundled, making)
        return evaluate(module, qualname, expression, filename, line, refs, bundled, making,
                        names={built["call"]: staged})
    finally:
        making.discard(f"{module.__name__}:{qualname}")


def _staged(module, built: dict, filename: str, bundled, making):
    import types
    from .values import _owner, _resolve, _siblings, current, define
    owner_path, _, name = built["function"].rpartition(".")
    owner = _owner(module, owner_path)
    live = vars(owner if owner is not None else module).get(name)
    if not isinstance(live, types.FunctionType):
        raise LookupError(f"{module.__name__}:{built['function']} is not a plain function in this process")
    fn = define(module, built["function"], built["source"], filename, built.get("line", 1), bundled, making) \
        if "source" in built else live

    def made(q):
        where, _, attr = q.rpartition(".")
        try:
            return _siblings(module, where, bundled, making)(attr)
        except KeyError:  # left out of this bundle (--only): the live value is the one the construction reads
            return current(_resolve(module, where), attr, None)

    overlay = {}
    defaults, kwdefaults = fn.__defaults__, dict(fn.__kwdefaults__ or {}) or None
    for q in built.get("reads", ()):
        if q == f"{built['function']}.__defaults__":
            defaults = made(q)
        elif q == f"{built['function']}.__kwdefaults__":
            kwdefaults = made(q)
        elif "." not in q:
            overlay[q] = made(q)
    for ref, q in built.get("slots", {}).items():
        kind, _, slot = ref.rpartition(":")
        where, _, attr = q.rpartition(".")
        holder = _owner(module, where) if where else module
        old, new = current(holder, attr, None), made(q)
        if kind.startswith("defaults") and defaults and slot.isdigit() and int(slot) < len(defaults) \
                and defaults[int(slot)] is old:
            defaults = defaults[:int(slot)] + (new,) + defaults[int(slot) + 1:]
        elif kind.startswith("kwdefaults") and kwdefaults and kwdefaults.get(slot, new) is old:
            kwdefaults = {**kwdefaults, slot: new}
    scope = fn.__globals__ if not overlay else {**fn.__globals__, **overlay}
    function = types.FunctionType(fn.__code__, scope, fn.__name__, defaults, fn.__closure__)
    function.__kwdefaults__, function.__qualname__ = kwdefaults, fn.__qualname__
    if owner is None:
        return function

    def call(*args, **kwargs):  # as type.__call__, with the patch's __init__
        new = owner.__new__
        obj = object.__new__(owner) if new is object.__new__ else new(owner, *args, **kwargs)
        if isinstance(obj, owner):
            function(obj, *args, **kwargs)
        return obj
    return call
