"""`build --only PATTERN`: the part of a release diff an operator chose.

A pattern is an fnmatch pattern on module:qualname (`app.views:render`,
`app.security:*`, `*:escape`). A changed function is included when a
pattern matches it; a new global (import, helper, value) when a pattern
matches it or when an included function's module has it, since included
code may use it; a refusal only when it is about what is included or
about a module that is, because that is what would be swapped in.
Everything else is left out and named in the manifest."""

from __future__ import annotations

import fnmatch

from .errors import Problem


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(patterns, targets: dict, globals_: dict, refused: list, packages=(),
           baseline_names=None) -> tuple[list, list]:
    """Filter `targets` and `globals_` ({name: manifest entry}) in place;
    returns (the refusals that still apply, the names left out). A new
    global that an included import takes from another module stays in
    (`packages` names the modules that are packages, for relative
    imports), and so does what a kept module-level statement needs. A
    ValueError when no changed function matches, or when an included
    import takes a name its module binds neither in the baseline
    (`baseline_names`: module -> names, None where unknowable) nor in
    the bundle."""
    chosen = [t for t in targets if _matches(t, patterns)]
    if not chosen:
        names = sorted(targets)
        raise ValueError(f"--only {' '.join(patterns)}: matches none of the changed functions "
                         f"({', '.join(names[:8]) or 'none'}{', ...' if len(names) > 8 else ''})")
    modules = {t.partition(":")[0] for t in chosen}
    left_out = [t for t in targets if t not in chosen]
    for name in left_out:
        del targets[name]
    keep = {g for g in globals_ if _matches(g, patterns) or g.partition(":")[0] in modules}
    while True:  # what kept imports take from the bundle's other new globals, what kept statements need
        needed = {n for g in keep for n in _imported(g, globals_[g], packages) + _statement_needs(g, globals_[g])
                  if n in globals_} - keep
        if not needed:
            break
        keep |= needed
    for g in sorted(keep):  # an import of a name only a left-out or refused change of its module binds
        for n in _imported(g, globals_[g], packages):
            source, _, imported = n.partition(":")
            # None: a module the release leaves as it is, or unknowable; a module __getattr__ makes names lazily
            bound = (baseline_names or {}).get(source)
            if n not in globals_ and bound is not None and imported not in bound and "__getattr__" not in bound:
                raise ValueError(f"{g} imports {imported} from {source}, which neither the baseline nor what this "
                                 f"bundle carries binds: add --only '{source}:*' (or see why it is refused)")
    for name in [g for g in globals_ if g not in keep]:
        del globals_[name]
        left_out.append(name)
    kept: list[Problem] = []
    for p in refused:
        if _matches(p.target, patterns) or p.target.partition(":")[0] in modules or not p.target:
            kept.append(p)
        else:
            left_out.append(f"{p.target} ({p.category})")
    return kept, sorted(dict.fromkeys(left_out))


def check_patterns(patterns) -> list[str]:
    """The patterns, each of the form MODULE:QUALNAME (wildcards allowed)."""
    for p in patterns:
        if ":" not in p or len(p) > 512:
            raise ValueError(f"--only {p[:80]!r}: expected MODULE:QUALNAME, wildcards allowed (e.g. app.views:render, app.auth:*)")
    return list(dict.fromkeys(patterns))


def keep_modules(module_entries: dict, payloads: dict, targets: dict, globals_: dict) -> None:
    """Drop the sources and code of modules nothing included is in."""
    used = {name.partition(":")[0] for name in (*targets, *globals_)}
    for module in [m for m in module_entries if m not in used]:
        del module_entries[module]
        for name in [n for n in payloads if n.rpartition("/")[2] == module and not n.startswith("hooks/")]:
            del payloads[name]


def _statement_needs(name: str, entry: dict) -> list[str]:
    """module:name of every name a kept module-level statement binds (it is
    run once for all of them) and of those it reads in its module."""
    if entry.get("kind") != "statement":
        return []
    import ast
    module = name.partition(":")[0]
    try:
        read = {n.id for n in ast.walk(ast.parse(entry["source"])) if isinstance(n, ast.Name)}
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        read = set()
    return [f"{module}:{n}" for n in sorted(set(entry.get("binds", ())) | read)]


def _imported(name: str, entry: dict, packages) -> list[str]:
    """module:name of what a `from X import ...` global binds."""
    import ast
    if entry.get("kind") != "import":
        return []
    try:
        node = ast.parse(entry["statement"]).body[0]
    except (SyntaxError, ValueError, IndexError):
        return []
    if not isinstance(node, ast.ImportFrom):
        return []
    module = name.partition(":")[0]
    package = module if module in packages else module.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        package = package.rpartition(".")[0]
    source = node.module or "" if node.level == 0 else ".".join(p for p in (package, node.module) if p)
    return [f"{source}:{a.name}" for a in node.names]
