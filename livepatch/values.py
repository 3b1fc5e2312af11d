"""Values computed at import and new definitions, made at apply time.

A changed module or class assignment whose value is an expression
(`re.compile(...)`, `frozenset({...})`, `functools.partial(...)`) is
evaluated in its module's namespace (a class attribute: in the class's
namespace, then the module's), and a new class, decorated function or
decorated class member is defined by executing its statement there. Both
run the bundle's code, so both are made only on the way to a commit, before
the pause (pending.AtCommit): an exception refuses the apply with nothing
changed.

What captured the old value at import keeps it unless it is stored too:
`Recomputed.captured` finds, by identity, function defaults and module or
class attributes bound to the old object and returns the stores that rebind
them, committed with the value and restored by rollback. Small ints, strings
and tuples of such constants are shared by unrelated names, so
for those only the references the builder saw in the source (a default or
alias that is exactly the name) are followed."""

from __future__ import annotations

import sys
import types

# values whose identity says nothing about where they came from
ATOMS = (int, float, complex, str, bytes, bool, type(None))


class Recomputed:
    """A value made at apply time, with the source references (`refs`, as the
    builder wrote them: "defaults:QUALNAME:INDEX", "kwdefaults:QUALNAME:ARG",
    "alias:QUALNAME") that hold the value it replaces."""

    __slots__ = ("value", "module", "refs")

    def __init__(self, value, module: types.ModuleType, refs=()):
        self.value, self.module, self.refs = value, module, tuple(refs)

    def __repr__(self) -> str:
        return f"Recomputed({self.value!r})"

    def captured(self, owner, name: str, old, missing) -> list:
        """(key, owner, attribute, before, after) for every other reference
        to `old` that the store of `owner.name` leaves behind."""
        if old is missing:
            return []
        new, out, seen = self.value, [], {(id(owner), name)}
        modname = self.module.__name__

        def rebind(key, where, attr, before, after):
            if (id(where), attr) not in seen:
                seen.add((id(where), attr))
                out.append((key, where, attr, before, after))

        if _shared_by_value(old):
            slots: dict = {}  # (qualname, "defaults" or "kwdefaults") -> the slots the source binds to the name
            for ref in self.refs:
                kind, _, rest = ref.partition(":")
                if kind == "alias":
                    where, _, attr = rest.rpartition(".")
                    where = _resolve(self.module, where) if where else self.module
                    if where is not None and vars(where).get(attr, missing) is old:
                        rebind(f"{modname}:{rest}", where, attr, old, new)
                    continue
                qualname, _, slot = rest.rpartition(":")
                slots.setdefault((qualname, kind), set()).add(slot)
            for (qualname, kind), which in slots.items():
                for fn in _functions_of(_resolve(self.module, qualname)):
                    _rebind_defaults(fn, kind, which, old, new, f"{modname}:{qualname}", rebind)
            return out
        replaced: dict = {}  # id(container holding old) -> (it, its copy holding new)
        # the module's own lists and tables of functions (another module's may be a registry that
        # something else holds too: a copy there would part from it; they are left as they are)
        tables = _is_function_like(old)
        for qualname, holder in _namespaces(self.module):
            for attr, value in list(vars(holder).items()):
                key = f"{modname}:{qualname + '.' if qualname else ''}{attr}"
                if value is old:
                    rebind(key, holder, attr, old, new)
                elif tables and (copy := _replaced_in(value, old, new, replaced)) is not None:
                    rebind(key, holder, attr, value, copy)
                for fn in _functions_of(value):
                    key = f"{modname}:{getattr(fn, '__qualname__', attr)}"
                    _rebind_defaults(fn, "defaults", {str(i) for i, d in enumerate(fn.__defaults__ or ()) if d is old},
                                     old, new, key, rebind)
                    _rebind_defaults(fn, "kwdefaults", {a for a, d in (fn.__kwdefaults__ or {}).items() if d is old},
                                     old, new, key, rebind)
        for other_name, other in list(sys.modules.items()):
            if other is self.module or not isinstance(other, types.ModuleType):
                continue
            try:  # the module's own dict, past any __getattribute__ of a lazy module type
                items = list(object.__getattribute__(other, "__dict__").items())
            except Exception:
                continue
            for attr, value in items:
                if value is old:
                    rebind(f"{other_name}:{attr}", other, attr, old, new)
                elif id(value) in replaced and replaced[id(value)][0] is value:  # `from m import HANDLERS`
                    rebind(f"{other_name}:{attr}", other, attr, value, replaced[id(value)][1])
        return out


def _is_function_like(obj) -> bool:
    """A function or a method descriptor: what a module-level list, tuple
    or dict holds by identity when it lists the functions of a module."""
    return isinstance(obj, (types.FunctionType, staticmethod, classmethod, property)) \
        or (callable(obj) and not isinstance(obj, type) and hasattr(obj, "__wrapped__"))


_TABLE_LIMIT = 4096  # items: bigger containers are data, not lists of functions, and cost a scan each


def _replaced_in(container, old, new, replaced: dict):
    """A copy of a list, tuple or dict (exactly those types) with `new`
    wherever it held `old` by identity, or None if it does not hold it; one
    copy per container (`replaced`), whatever names it. The container itself
    is left as it is: rollback rebinds it."""
    if type(container) not in (list, tuple, dict) or len(container) > _TABLE_LIMIT:
        return None
    if id(container) in replaced:
        return replaced[id(container)][1]
    items = container.values() if type(container) is dict else container
    if not any(v is old for v in items):
        return None
    if type(container) is dict:
        copy = {k: new if v is old else v for k, v in container.items()}
    else:
        copy = type(container)(new if v is old else v for v in container)
    replaced[id(container)] = (container, copy)  # keeps the container alive, so its id stays its own
    return copy


def _shared_by_value(obj, depth: int = 0) -> bool:
    """Whether equal constants may be one object with unrelated names: atoms,
    tuples of them (the compiler merges equal constants of a module; `()` is
    a single object) and the empty frozenset."""
    if isinstance(obj, ATOMS) or (type(obj) is frozenset and not obj):
        return True
    if type(obj) is tuple and depth < 8:
        return all(_shared_by_value(o, depth + 1) for o in obj)
    return False


def _rebind_defaults(fn, kind: str, slots: set, old, new, key: str, rebind) -> None:
    """One store of `fn`'s defaults (kind "defaults": positions as text) or
    keyword defaults with `new` in every slot of `slots` that holds `old`."""
    if kind == "defaults":
        values = fn.__defaults__ or ()
        hit = {i for i in range(len(values)) if str(i) in slots and values[i] is old}
        if hit:
            after = tuple(new if i in hit else v for i, v in enumerate(values))
            rebind(f"{key}.__defaults__", fn, "__defaults__", fn.__defaults__, after)
    elif kind == "kwdefaults":
        values = fn.__kwdefaults__ or {}
        hit = {a for a in slots if a in values and values[a] is old}
        if hit:
            rebind(f"{key}.__kwdefaults__", fn, "__kwdefaults__", fn.__kwdefaults__,
                   {a: new if a in hit else v for a, v in values.items()})


def _resolve(module, qualname: str):
    obj = module
    for part in qualname.split(".") if qualname else ():
        obj = vars(obj).get(part) if isinstance(obj, (type, types.ModuleType)) else None
        if obj is None:
            return None
    return obj


def _namespaces(module):
    """("", module) and (qualname, class) for every class defined in it."""
    out, todo, seen = [("", module)], [("", module)], set()
    while todo:
        prefix, holder = todo.pop()
        for attr, value in list(vars(holder).items()):
            if isinstance(value, type) and value.__module__ == module.__name__ and id(value) not in seen:
                seen.add(id(value))
                qualname = f"{prefix}.{attr}" if prefix else attr
                out.append((qualname, value))
                todo.append((qualname, value))
    return out


def _functions_of(value) -> list:
    """The Python functions behind a module or class attribute: unwrapped
    from static and class methods, properties, cached properties and
    functools.wraps wrappers (whose defaults are the wrapped function's)."""
    found = []
    todo = [value]
    while todo and len(found) < 16:
        v = todo.pop()
        if isinstance(v, (staticmethod, classmethod)):
            todo.append(v.__func__)
        elif isinstance(v, property):
            todo += [f for f in (v.fget, v.fset, v.fdel) if f is not None]
        elif isinstance(v, types.FunctionType):
            found.append(v)
            wrapped = vars(v).get("__wrapped__")
            if wrapped is not None:
                todo.append(wrapped)
        elif type(v).__name__ == "cached_property" and hasattr(v, "func"):
            todo.append(v.func)
        elif callable(v) and "__wrapped__" in getattr(v, "__dict__", {}):  # lru_cache and other C wrappers
            todo.append(v.__dict__["__wrapped__"])
    return found


def _owner(module, owner_path: str):
    """The class at `owner_path` in `module`, or None for the module itself."""
    if not owner_path:
        return None
    owner = _resolve(module, owner_path)
    if not isinstance(owner, type):
        raise LookupError(f"{owner_path!r} is not a class in {module.__name__!r}")
    return owner


class _Namespace(dict):
    """The local namespace code made at apply time runs in: a class's
    attributes for code of a class body, then the names the same patch
    binds in the module (a new import, function, class or value), as they
    will be once it commits; then the module's globals, as for any code."""

    __slots__ = ("lookup",)

    def __missing__(self, name):
        return self.lookup(name)


def _siblings(module, scope: str, bundled, making: set):
    """lookup(name) -> the value the patch binds to `name` (in class `scope`
    first), made now if it is made at commit (each once); KeyError if the
    patch binds no such name."""
    from .pending import UNBOUND, AtImport

    def lookup(name):
        for key in ([f"{module.__name__}:{scope}.{name}"] if scope else []) + [f"{module.__name__}:{name}"]:
            value = (bundled or {}).get(key, _ABSENT)
            if value is _ABSENT or key in making:
                continue
            if isinstance(value, AtImport):
                making.add(key)
                try:
                    value = value.make(module)
                finally:
                    making.discard(key)
            if value is UNBOUND:  # a statement of the patch that does not bind it here
                continue
            return value.value if isinstance(value, Recomputed) else value
        other = module.__dict__.get(name)
        if isinstance(other, types.ModuleType) and other is not module \
                and any(k.startswith(f"{other.__name__}:") for k in bundled or ()):
            return _PatchedModule(other, _siblings(other, "", bundled, making))  # `@recurse(sql.Over)`, Over new
        raise KeyError(name)
    return lookup


def _real_modules_in_defaults(value):
    """`value` with the module itself wherever a default captured the view
    of it (`def f(mod=sql)`): the view exists only while the patch is made."""
    for fn in _functions_of(value):
        if any(isinstance(d, _PatchedModule) for d in fn.__defaults__ or ()):
            fn.__defaults__ = tuple(d._module if isinstance(d, _PatchedModule) else d for d in fn.__defaults__)
        if any(isinstance(d, _PatchedModule) for d in (fn.__kwdefaults__ or {}).values()):
            fn.__kwdefaults__ = {k: d._module if isinstance(d, _PatchedModule) else d for k, d in fn.__kwdefaults__.items()}
    return value


class _PatchedModule:
    """Another module as code made at apply time sees it: the names the
    same patch binds in it, as they will be once it commits, then its own
    attributes (a decorator's argument naming a class the patch adds)."""

    __slots__ = ("_module", "_lookup")

    def __init__(self, module, lookup):
        self._module, self._lookup = module, lookup

    def __getattr__(self, name):
        try:
            return self._lookup(name)
        except KeyError:
            return getattr(self._module, name)


_ABSENT = object()


def _namespace(module, scope: str, bundled, making, start=()) -> _Namespace:
    ns = _Namespace(start)
    ns.lookup = _siblings(module, scope, bundled, making)
    return ns


def evaluate(module, qualname: str, expression: str, filename: str, line: int, refs=(), bundled=None,
             making=None, names=None) -> Recomputed:
    """The value of `expression` as the assignment to `qualname` computes
    it: module globals, and the class namespace for a class attribute
    (`names` bound over both: the patch's constructor, livepatch.derived)."""
    import ast
    tree = ast.parse(expression, filename, "eval")
    ast.increment_lineno(tree, max(0, line - 1))
    code = compile(tree, filename, "eval", dont_inherit=True)
    scope = qualname.rpartition(".")[0]
    if qualname.endswith((".__defaults__", ".__kwdefaults__")):
        scope = scope.rpartition(".")[0]  # a def's defaults are evaluated where the def is
    owner = _owner(module, scope)
    local = _namespace(module, scope, bundled, making if making is not None else set(),
                       {**(vars(owner) if owner is not None else {}), **(names or {})})
    return Recomputed(eval(code, module.__dict__, local), module, refs)  # the bundle's code: see docs/bundle-format.md


class _ClassBody(type):
    """Runs a class member's definition as a class body would, with the
    class's attributes in scope (`@total.setter` needs `total`), and returns
    the namespace instead of making a class."""

    def __prepare__(name, bases, namespace=None, **kw):
        return namespace

    def __new__(mcs, name, bases, ns, **kw):
        return ns


def define(module, qualname: str, statement: str, filename: str, line: int, bundled=None, making=None):
    """Execute one def or class statement binding the last part of
    `qualname`; returns the object it bound (its globals are the module's).
    A member of an existing class is run inside a class body whose
    namespace starts as that class's, and zero-argument super() in it
    refers to that class."""
    import ast
    tree = ast.parse(statement, filename)
    ast.increment_lineno(tree, max(0, line - 1))
    name = qualname.rpartition(".")[2]
    owner_path = qualname.rpartition(".")[0]
    making = making if making is not None else set()
    owner = _owner(module, owner_path)
    if owner is None:
        code = compile(tree, filename, "exec", dont_inherit=True)
        local = _namespace(module, "", bundled, making)
        exec(code, module.__dict__, local)  # the bundle's code: see docs/bundle-format.md
        return _real_modules_in_defaults(local[name])
    # class <Owner>(metaclass=__livepatch_body__, namespace=...): <statement>
    shell = ast.ClassDef(name=owner.__name__, bases=[], keywords=[
        ast.keyword("metaclass", ast.Name("__livepatch_body__", ast.Load())),
        ast.keyword("namespace", ast.Name("__livepatch_namespace__", ast.Load()))],
        body=tree.body, decorator_list=[], **({"type_params": []} if sys.version_info >= (3, 12) else {}))
    ast.copy_location(shell, tree.body[0])
    shell_tree = ast.fix_missing_locations(ast.Module([shell], []))
    local = {"__livepatch_body__": _ClassBody,
             "__livepatch_namespace__": _namespace(module, owner_path, bundled, making, vars(owner))}
    exec(compile(shell_tree, filename, "exec", dont_inherit=True), module.__dict__, local)
    ns = local[owner.__name__]
    cell = ns.get("__classcell__")
    if cell is not None:
        cell.cell_contents = owner  # zero-argument super() and __class__ name the live class
    value = ns[name]
    for fn in _functions_of(value):
        if "." not in fn.__qualname__ or not fn.__qualname__.startswith(owner.__qualname__ + "."):
            fn.__qualname__ = f"{owner.__qualname__}.{fn.__qualname__.partition('.')[2] or fn.__name__}"
    if hasattr(value, "__set_name__"):
        value.__set_name__(owner, name)  # cached_property and other descriptors learn their name
    return value


def manifest_value(entry: dict, field: str, filename: str, fail, literal_value=None, bundled=None):
    """The new global for a manifest entry of kind "value", "definition" or
    a "constant" with references: checked now (parsed, never run), made on
    the way to a commit for the first two (they run the bundle's code)."""
    import ast
    from .pending import value_for
    module_name, _, qualname = entry["name"].partition(":")
    refs = entry.get("refs", ())
    line = entry.get("line", 1)
    if entry["kind"] == "constant":
        return value_for(module_name, lambda module: Recomputed(literal_value, module, refs))
    if entry["kind"] == "statement":
        from .statements import manifest_statement
        return manifest_statement(entry, field, filename, fail, bundled)
    if entry["kind"] == "value":
        text = entry["expression"]
        _parsed(text, "eval", f"{field}.expression", fail)
        built = entry.get("built")
        if built is not None:  # an object built at import, made anew with the patch's construction code
            from .derived import construct
            make = _once(lambda module, making: construct(module, qualname, text, filename, line, refs, built,
                                                          bundled, making))
        else:
            make = _once(lambda module, making: evaluate(module, qualname, text, filename, line, refs, bundled, making))
        return value_for(module_name, make, runs_code=f"{qualname} = {text.strip()}"[:200])
    text = entry["source"]
    tree = _parsed(text, "exec", f"{field}.source", fail)
    name = qualname.rpartition(".")[2]
    # one def or class; or several defs of one name (a property's getter, then its setter)
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef) if len(tree.body) == 1 else (ast.FunctionDef, ast.AsyncFunctionDef)
    if not tree.body or not all(isinstance(n, defs) and n.name == name for n in tree.body):
        fail(f"{field}.source", f"must be one def or class statement named {name!r}, or defs of that name")
    make = _once(lambda module, making: _defined(module, qualname, text, filename, line, entry.get("replaces", False),
                                                 bundled, making))
    first = text.strip().splitlines()[0] if text.strip() else ""
    return value_for(module_name, make, runs_code=f"definition of {qualname} ({first[:120]})")


def _once(make):
    """`make(module)` made once per module: a value another one of the same
    patch needed first is the very object the commit stores."""
    made: list = []  # [(module, value)]
    making: set = set()

    def once(module):
        for m, value in made:
            if m is module:
                return value
        value = make(module, making)
        made.append((module, value))
        return value
    return once


def _defined(module, qualname, text, filename, line, replaces: bool, bundled, making):
    value = define(module, qualname, text, filename, line, bundled, making)
    # a re-applied decorator: what held the old object (an import of it
    # elsewhere, an alias) gets the new one, as for a changed value
    return Recomputed(value, module) if replaces else value


def _parsed(text: str, mode: str, field: str, fail):
    import ast
    try:
        return ast.parse(text, mode=mode)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        fail(field, "not valid Python")


def function_of(owner, name: str):
    """The Python function `owner.name` defines (unwrapped from a static or
    class method), or None."""
    value = vars(owner).get(name) if isinstance(owner, (type, types.ModuleType)) else None
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return value if isinstance(value, types.FunctionType) else None


def current(owner, name: str, missing):
    """What `owner.name` holds now: its own attribute (a module's or class's
    __dict__), or a function's defaults, which live in no __dict__."""
    if isinstance(owner, types.FunctionType) and name in ("__defaults__", "__kwdefaults__"):
        return getattr(owner, name)
    return vars(owner).get(name, missing)


def diff_globals(diff, module_name: str, filename: str, bundled: dict) -> dict:
    """The new globals of a build.ModuleDiff's values, definitions and
    constants with references, for a patch made in this process."""
    from .definitions import global_entries
    from .errors import PatchError, Problem

    def fail(field, message):
        raise PatchError(f"{field}: {message}", [Problem("invalid", field, message)])

    from collections import ChainMap
    entries, extra = global_entries(module_name, diff.values, diff.definitions, diff.captured, diff.statements)
    entries += [{"name": f"{module_name}:{q}", "kind": "constant"} for q in diff.constants]
    out = {}
    bundled = ChainMap(out, bundled)  # the patch's other globals, those made here too
    for entry in entries:
        entry.update(extra.get(entry["name"], {}))
        if entry["kind"] == "constant" and not entry.get("refs"):
            continue
        value = diff.constants.get(entry["name"].partition(":")[2])
        out[entry["name"]] = manifest_value(entry, entry["name"], filename, fail, value, bundled)
    return out
