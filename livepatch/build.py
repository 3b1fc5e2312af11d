"""Building patches from source: compile a baseline and a patched version of
a module, match their code objects by qualname, and turn every difference
into a Change (functions), a new global (added functions, imports, literal
constants) or a refusal with its reason and line.

`diff_sources` is the pure comparison (used by the bundle builder for whole
trees); `patch_from_source` applies it to a module loaded in this process."""

from __future__ import annotations

import ast
import inspect
import sys
import types
from dataclasses import dataclass, field

from . import definitions as defs, derived, noops
from .checks import code_kind
from .errors import PatchError, Problem
from .fingerprint import fingerprint
from .patch import UNCHANGED, Change, Patch


def code_tree(module_code: types.CodeType) -> dict[str, list[types.CodeType]]:
    """qualname -> code objects (a property getter and setter share one)."""
    out: dict[str, list] = {}

    def walk(code):
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                out.setdefault(const.co_qualname, []).append(const)
                walk(const)

    walk(module_code)
    return out


# code objects of comprehensions and generator expressions: made afresh by
# each run of the code that contains them, never bound to a function
COMPREHENSIONS = ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def patched_filename(filename: str, patch_id: str) -> str:
    """A distinct filename for patched code, so linecache shows its lines."""
    return f"{filename} [livepatch {patch_id}]"


class SourceError(PatchError):
    """A source Python itself would not compile: a syntax error, or nesting
    too deep for the parser or the compiler. `side` is "baseline" or
    "patched", `line` None where Python does not say."""

    category = "refused:syntax"

    def __init__(self, side: str, line: int | None, detail: str):
        self.side, self.line, self.detail = side, line, detail
        super().__init__(f"{side} source{'' if line is None else f', line {line}'}: {detail}")


def compile_error(exc: BaseException) -> tuple[int | None, str]:
    """(line, message) of why compiling failed, for one line of output."""
    if isinstance(exc, SyntaxError):
        return exc.lineno, exc.msg or type(exc).__name__
    if isinstance(exc, RecursionError):
        return None, f"nested too deeply to compile ({exc})"
    if isinstance(exc, MemoryError):  # the parser's stack limit, in 3.11 with no message
        return None, f"too complex to parse ({exc or 'the parser ran out of stack'})"
    return None, str(exc) or type(exc).__name__  # ValueError: null bytes (3.11)


_COMPILE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


def _parse(source: str, filename: str, side: str):
    try:
        tree = ast.parse(source, filename)
        return tree, compile(tree, filename, "exec", dont_inherit=True)
    except _COMPILE_ERRORS as exc:
        raise SourceError(side, *compile_error(exc)) from None


@dataclass
class ModuleDiff:
    module: str
    changes: list = field(default_factory=list)  # (qualname, baseline fingerprint, new code, defaults, kwdefaults)
    new_functions: list = field(default_factory=list)  # (qualname, code, defaults, kwdefaults)
    new_imports: list = field(default_factory=list)  # ast nodes of added module-level imports
    constants: dict = field(default_factory=dict)  # name -> new literal value
    refused: list = field(default_factory=list)  # Problems
    ignored: list = field(default_factory=list)  # Problems "ignored:<why>": changes that never run
    values: dict = field(default_factory=dict)  # qualname -> {"expression", "line"}: evaluated at apply time
    definitions: dict = field(default_factory=dict)  # qualname -> {"statement", "line", "replaces"}: run at apply time
    statements: dict = field(default_factory=dict)  # first line -> {"statement", "line", "binds"}: run at apply time
    captured: dict = field(default_factory=dict)  # qualname of a value or constant -> {"refs", "stale"}
    warnings: list = field(default_factory=list)  # Problems "warning:<why>": what the patch leaves in its old state


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """qualname -> def node, mirroring how the compiler names code objects."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = prefix + child.name
                out[q] = child
                walk(child, q + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                q = prefix + child.name
                out[q] = child
                walk(child, q + ".")
            elif not isinstance(child, ast.Lambda):
                walk(child, prefix)

    walk(tree, "")
    return out


def _literal_defaults(node):
    """(defaults, kwdefaults) of a def whose default expressions are literals."""
    args = node.args
    try:
        defaults = tuple(defs.literal(d) for d in args.defaults) or None
        kw = {a.arg: defs.literal(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None} or None
    except ValueError:
        return None
    return defaults, kw


def _defaults_text(node) -> str:
    a = node.args
    return ast.dump(ast.Tuple(elts=list(a.defaults) + [d or ast.Constant(None) for d in a.kw_defaults], ctx=ast.Load()))


def _decorators(node) -> list[str]:
    return [ast.dump(d) for d in getattr(node, "decorator_list", ())]


def _class_layout(node: ast.ClassDef) -> dict:
    """What a hotpatch cannot change about a class: bases, keywords
    (metaclass), decorators, __slots__ and annotated (dataclass) fields."""
    slots = [ast.dump(n.value) for n in node.body
             if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in n.targets)]
    # compared without the no-ops (a field's declared type, an `object` base)
    fields = [noops.runtime_form(n) for n in node.body if isinstance(n, ast.AnnAssign)]
    bases = [ast.dump(b) for b in node.bases if not (isinstance(b, ast.Name) and b.id == "object")]
    return {"bases": bases, "metaclass or class keywords": [ast.dump(k) for k in node.keywords],
            "class decorators": _decorators(node), "__slots__": slots, "fields": fields}


def _header(node: ast.ClassDef) -> ast.ClassDef:
    """The bases and annotated fields of a class: the part of its layout
    that may differ by no-ops alone."""
    return ast.ClassDef(name=node.name, bases=node.bases, keywords=[], decorator_list=[], type_params=[],
                        body=[n for n in node.body if isinstance(n, ast.AnnAssign)])


def _ignore(diff: ModuleDiff, target: str, line: int, reasons) -> None:
    for reason in reasons or ():
        diff.ignored.append(Problem(f"ignored:{reason}", target, f"line {line}: {noops.REASONS[reason]}"))


def _diff_classes(diff: ModuleDiff, base_defs: dict, new_defs: dict, trees=None) -> None:
    for qualname, node in new_defs.items():
        base = base_defs.get(qualname)
        if not isinstance(node, ast.ClassDef) or not isinstance(base, ast.ClassDef):
            continue
        target = f"{diff.module}:{qualname}"
        old_layout, new_layout = _class_layout(base), _class_layout(node)
        aliased = noops.same_bases(base, node, *trees) if trees and old_layout["bases"] != new_layout["bases"] else None
        if aliased:  # `TypedDict` from `from typing import TypedDict`, now `typing.TypedDict`: one class
            new_layout["bases"] = old_layout["bases"]
            diff.ignored.append(Problem("ignored:same-base", target,
                                        f"line {node.lineno}: {noops.SAME_BASE_REASON} ({'; '.join(aliased)})"))
        for what in old_layout:
            if old_layout[what] != new_layout[what]:
                diff.refused.append(Problem("refused:class-layout", target, f"line {node.lineno}: {what} changed; instances and subclasses keep the old layout; {defs.HOOK_HINT}"))
        if old_layout == new_layout and ast.dump(_header(base)) != ast.dump(_header(node)):
            _ignore(diff, target, node.lineno, noops.ignored_reasons(_header(base), _header(node)))
        old_attrs = {t.id: n for n in base.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for n in node.body:
            if not isinstance(n, ast.Assign) or not all(isinstance(t, ast.Name) for t in n.targets):
                continue
            for t in n.targets:
                if t.id == "__slots__" or (t.id in old_attrs and ast.dump(old_attrs[t.id].value) == ast.dump(n.value)):
                    continue
                defs.add_value(diff, f"{qualname}.{t.id}", n)


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _strip(node: ast.AST) -> str:
    return ast.dump(node, annotate_fields=True, include_attributes=False)


class _MaskDefinitions(ast.NodeTransformer):
    """Replaces each def and class by its name: their insides are compared
    as definitions (the compiler names them as if at module level)."""

    def _mask(self, node):
        return ast.Expr(ast.Constant(f"<{type(node).__name__} {node.name}>"))

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _mask


def _statement_shape(node: ast.AST) -> str:
    """A module-level statement as it runs at import, but for the bodies of
    the functions and classes it defines: `if HAS_CRYPTO: class RSA: ...`
    whose methods change is the same statement, its methods changed."""
    import copy
    return _strip(_MaskDefinitions().visit(copy.deepcopy(node)))


def _other_statements(tree: ast.Module) -> list:
    """Module-level statements that are not defs, classes, imports or
    assignments to plain names: code that ran once at import. An assignment
    to an attribute, a subscript or a tuple is one of them, or a change to it
    would go unseen."""
    return [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                       ast.Import, ast.ImportFrom))
            and not (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) for t in n.targets))
            and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # docstrings


def _diff_statements(diff: ModuleDiff, base_tree: ast.Module, new_tree: ast.Module) -> None:
    target = f"{diff.module}:<module>"
    checking = [[_strip(n) for n in _other_statements(t) if noops.is_type_checking(n)] for t in (base_tree, new_tree)]
    if checking[0] != checking[1]:
        line = next(n.lineno for t in (new_tree, base_tree) for n in _other_statements(t) if noops.is_type_checking(n))
        _ignore(diff, target, line, ["type-checking"])
    base = [n for n in _other_statements(base_tree) if not noops.is_type_checking(n)]
    changed = []
    for n in _other_statements(new_tree):
        if noops.is_type_checking(n):
            continue
        same = next((b for b in base if _statement_shape(b) == _statement_shape(n)), None)
        if same is None:  # the same but for no-ops (a declared type, an exception guard)
            same = next((b for b in base if noops.runtime_form(b) == noops.runtime_form(n)), None)
            if same is not None:
                _ignore(diff, target, n.lineno, noops.ignored_reasons(same, n))
        if same is not None:
            base.remove(same)
        elif not defs.annotated_value(diff, n, base):  # a changed `NAME: type = value` is a value as any other
            changed.append(n)
    _diff_binding_statements(diff, changed, base, base_tree, new_tree)


def _diff_binding_statements(diff: ModuleDiff, changed: list, base: list, base_tree: ast.Module,
                             new_tree: ast.Module) -> None:
    """New or changed statements that only bind names run at apply time
    (livepatch.statements), paired with the baseline statements they replace."""
    from . import statements
    target = f"{diff.module}:<module>"
    others = [(i, b) for i, b in enumerate(_other_statements(base_tree)) if any(b is x for x in base)]
    positions = {id(n): i for i, n in enumerate(_other_statements(new_tree))}
    base_defs = _definitions(base_tree)
    for n in changed:
        statements.pair(n, positions[id(n)], others)
        why = statements.add(diff, n, base_defs)
        if why is not None:
            diff.refused.append(Problem("refused:statement", target, f"line {n.lineno}: changed module-level statement ({type(n).__name__}) ran at import and cannot be re-run: {why}"))
    for _, gone in others:
        problem = statements.removed(diff, gone, new_tree)
        (diff.ignored if problem.category.startswith("ignored:") else diff.refused).append(problem)


def _diff_removed(diff: ModuleDiff, base_codes: dict, new_codes: dict, new_tree: ast.Module) -> None:
    from .references import still_referenced
    for qualname in base_codes:
        if qualname in new_codes or "<" in qualname:
            continue
        if still_referenced(qualname, new_tree):
            diff.refused.append(Problem("refused:removed-referenced", f"{diff.module}:{qualname}",
                                        f"removed, but the patched code still refers to {qualname}"))


def _module_level(tree: ast.Module) -> dict:
    """Top-level names bound by imports, assignments and defs."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            for t in node.targets:
                out[t.id] = node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
    return out


def diff_sources(module: str, base_src: str, new_src: str, base_filename: str, new_filename: str,
                 decorators: dict | None = None) -> ModuleDiff:
    """Compare two versions of a module; SourceError if either does not
    compile (or is too deep to compare), never another exception for them.
    `decorators`: {"baseline": verdicts, "patched": verdicts} of the
    decorators the module imports from the rest of its distribution
    (livepatch.decorators.verdicts); those defined in it are found here."""
    base_tree, base_code = _parse(base_src, base_filename, "baseline")
    new_tree, new_code = _parse(new_src, new_filename, "patched")
    try:
        from .decorators import verdicts
        known = {side: {**verdicts(module, tree), **(decorators or {}).get(side, {})}
                 for side, tree in (("baseline", base_tree), ("patched", new_tree))}
        return _diff(module, base_tree, new_tree, code_tree(base_code), code_tree(new_code), known)
    except (RecursionError, MemoryError) as exc:  # the walks below recurse with the syntax tree's depth
        raise SourceError("patched", None, f"nested too deeply to compare with the baseline ({exc})") from None


def _diff(module: str, base_tree: ast.Module, new_tree: ast.Module, base_codes: dict, new_codes: dict,
          known: dict) -> ModuleDiff:
    diff = ModuleDiff(module)
    base_defs, new_defs = _definitions(base_tree), _definitions(new_tree)
    # the implementation runs, never the @overload stubs beside it
    base_codes, new_codes = noops.without_overloads(base_codes, base_tree), noops.without_overloads(new_codes, new_tree)
    for qualname, line in noops.overload_changes(base_tree, new_tree):
        _ignore(diff, f"{module}:{qualname}", line, ["overload"])

    for qualname, news in new_codes.items():
        if qualname.rpartition(".")[2] in COMPREHENSIONS:
            continue  # no function object runs it: it travels inside its enclosing code, whose fingerprint covers it
        bases = base_codes.get(qualname)
        node = new_defs.get(qualname)
        line = getattr(node, "lineno", news[0].co_firstlineno)
        if bases is None:
            if "<locals>" in qualname or "<lambda>" in qualname or qualname.endswith(">"):
                continue  # new nested code travels inside its enclosing function's code
            if defs.inside_new_class(qualname, base_defs, new_defs):
                continue  # defined by the new class's definition
            lit = _literal_defaults(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else (None, None)
            if isinstance(node, ast.ClassDef) or (node is not None and node.decorator_list) or lit is None \
                    or news[0].co_freevars:  # zero-argument super() needs the class cell a definition makes
                defs.add_definition(diff, qualname, node)  # executed at apply time
                continue
            diff.new_functions.append((qualname, news[0], *lit))
            continue
        if len(bases) != len(news):
            diff.refused.append(Problem("refused:ambiguous", f"{module}:{qualname}", f"line {line}: number of definitions named {qualname} changed"))
            continue
        for base, new in zip(bases, news):
            if isinstance(node, ast.ClassDef) or base.co_name == "<module>":
                continue
            base_fp = fingerprint(base)
            base_node = base_defs.get(qualname)
            defaults_changed = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and base_node is not None \
                and _defaults_text(node) != _defaults_text(base_node)
            target = f"{module}:{qualname}"
            if node is not None and base_node is not None and _decorators(node) != _decorators(base_node):
                impure = defs.impure_reason(base_node, base_tree, known["baseline"]) \
                    or defs.impure_reason(node, new_tree, known["patched"])
                if impure is None and len(news) == 1:
                    defs.add_definition(diff, qualname, node, replaces=True)  # re-applied: the new object replaces the old
                    break
                text, why = impure or (qualname, "names more than one definition")
                why = f"is not known to be pure: it {why}" if why else (
                    "is not known to be pure (only staticmethod, classmethod, property and its accessors, "
                    "cached_property, lru_cache, cache and the distribution's own wrappers, wrapper factories "
                    "and markers are re-applied)")
                # reported even when the body is unchanged: the change would otherwise be silently lost
                diff.refused.append(Problem("refused:decorator", target, f"line {line}: decorators changed and @{text} {why}; a hotpatch does not re-run it, so what the baseline registered or wrapped stays as it was"))
                if base_fp == fingerprint(new) and not defaults_changed:
                    continue
            elif base_fp == fingerprint(new) and not defaults_changed:
                if len(news) == 1 and node is not None and base_node is not None and _strip(node) != _strip(base_node):
                    _ignore(diff, target, line, noops.ignored_reasons(base_node, node))  # e.g. annotations: not in the code
                continue
            reasons = noops.ignored_reasons(base_node, node) if len(news) == 1 and node is not None and base_node is not None else None
            if reasons:
                _ignore(diff, target, line, reasons)
                continue
            if code_kind(base) != code_kind(new):
                diff.refused.append(Problem("refused:kind", target, f"line {line}: {_article(code_kind(base))} became {_article(code_kind(new))}; callers and running frames expect the old kind; {defs.HOOK_HINT}"))
                continue
            if base.co_freevars != new.co_freevars and defs.class_cell_redefinition(diff, qualname, base, new, node, len(news), new_tree):
                continue  # a method that starts or stops using zero-argument super(): defined anew in its class
            if base.co_freevars != new.co_freevars:
                diff.refused.append(Problem("refused:free-vars", target, f"line {line}: free variables changed from {base.co_freevars} to {new.co_freevars}"))
                continue
            defaults = kwdefaults = UNCHANGED
            if defaults_changed:
                lit = _literal_defaults(node)
                if lit is None and not defs.add_defaults(diff, qualname, node):
                    diff.refused.append(Problem("refused:defaults", target, f"line {line}: changed defaults are not literals, and the function the module holds is a decorator's wrapper or a nested function, whose defaults are not this def's"))
                    continue
                if lit is not None:  # else evaluated at apply time, as values (defs.add_defaults)
                    defaults, kwdefaults = lit
            diff.changes.append((qualname, base_fp, new, defaults, kwdefaults))

    _diff_classes(diff, base_defs, new_defs, (base_tree, new_tree))
    _diff_statements(diff, base_tree, new_tree)
    _diff_removed(diff, base_codes, new_codes, new_tree)
    base_top, new_top = _module_level(base_tree), _module_level(new_tree)
    for name, node in new_top.items():
        before = base_top.get(name)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if before is None or ast.dump(before) != ast.dump(node):
                diff.new_imports.append((name, node))
        elif isinstance(node, ast.Assign):
            if before is not None and ast.dump(before) == ast.dump(node):
                continue
            if isinstance(node.value, ast.Lambda) and isinstance(getattr(before, "value", None), ast.Lambda):
                continue  # a lambda's body is code: diffed with the other code objects
            defs.add_value(diff, name, node)
    defs.finish(diff, base_tree, new_tree, new_codes)
    derived.add_recomputed(diff, base_tree, new_tree)  # objects built at import by construction code that changed
    return diff


def _import_value(name: str, node: ast.AST, module: types.ModuleType):
    namespace = {"__name__": module.__name__, "__package__": module.__package__}
    exec(compile(ast.Module(body=[node], type_ignores=[]), module.__name__, "exec"), namespace)
    return namespace[name]


def patch_from_source(patch_id: str, module_name: str, new_source: str, *, base_source: str | None = None,
                      allow_active=(), requires=(), cumulative: bool = False) -> Patch:
    """A Patch turning the loaded module `module_name` (whose source is
    `base_source`, read from its file by default) into `new_source`."""
    module = sys.modules[module_name]
    filename = module.__file__ or f"<{module_name}>"
    if base_source is None:
        base_source = inspect.getsource(module)
    new_filename = patched_filename(filename, patch_id)
    from .decorators import for_loaded
    diff = diff_sources(module_name, base_source, new_source, filename, new_filename,
                        for_loaded(module_name, base_source, new_source))
    if diff.refused:
        raise PatchError(f"cannot hotpatch {module_name}", diff.refused)
    changes = [
        Change(f"{module_name}:{q}", new, base_fp, allow_active=q in allow_active, defaults=d, kwdefaults=kw)
        for q, base_fp, new, d, kw in diff.changes
    ]
    new_globals = {}
    for name, node in diff.new_imports:
        new_globals[f"{module_name}:{name}"] = _import_value(name, node, module)
    for q, code, d, kw in diff.new_functions:
        name = q.rpartition(".")[2]
        fn = types.FunctionType(code, module.__dict__, name, d)
        fn.__kwdefaults__ = kw
        fn.__qualname__ = q
        new_globals[f"{module_name}:{q}"] = fn
    for name, value in diff.constants.items():
        new_globals[f"{module_name}:{name}"] = value
    defs.exact_sources(diff, new_source)
    from .values import diff_globals
    new_globals.update(diff_globals(diff, module_name, new_filename, new_globals))  # made at apply time
    return Patch(patch_id, changes, cumulative=cumulative, new_globals=new_globals, requires=tuple(requires),
                 sources={new_filename: new_source})
