"""Whether a definition a release removes is still referenced by the
patched module: the hotpatch leaves the removed object in place, so code
that still reaches it would run the old version.

A reference is a real one, not a bare name anywhere: a removed module-level
function is referenced by a load of that global name; a removed method
`C.m` by `C.m`, or by `self.m`, `cls.m` or `super().m` inside `C` or a
class of the module that derives from `C`. Pure syntax, nothing is run."""

from __future__ import annotations

import ast


def _subclasses(tree: ast.Module, owner: str) -> set[str]:
    """`owner` (a dotted class path) and the module's classes deriving from it."""
    classes = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                classes[prefix + child.name] = child
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    family = {owner}
    changed = True
    while changed:
        changed = False
        for path, node in classes.items():
            if path not in family and any(ast.unparse(b) in {f.rpartition(".")[2] for f in family} | family
                                          for b in node.bases):
                family.add(path)
                changed = True
    return family


def _class_bodies(tree: ast.Module, paths: set[str]):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                if prefix + child.name in paths:
                    yield child
                yield from walk(child, prefix + child.name + ".")
    return walk(tree, "")


def _is_super_call(node) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def still_referenced(qualname: str, tree: ast.Module) -> bool:
    """Whether the patched module `tree` still reaches the removed `qualname`."""
    owner, _, name = qualname.rpartition(".")
    if not owner:
        return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) for n in ast.walk(tree))
    owner_name = owner.rpartition(".")[2]
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.value, ast.Name) and n.value.id == owner_name:
            return True
    for body in _class_bodies(tree, _subclasses(tree, owner)):
        for n in ast.walk(body):
            if isinstance(n, ast.Attribute) and n.attr == name and (
                    (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")) or _is_super_call(n.value)):
                return True
    return False
