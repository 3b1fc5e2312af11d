"""The bundle builder: two source trees (baseline and patched) -> a bundle.

The trees are read through sourcetree (regular files inside the tree only,
bounded, decoded as import decodes them); nothing in them is ever executed,
only parsed and compiled. Each module present in both trees is diffed
(build.diff_sources) by every target interpreter, because code objects, and
so fingerprints and marshalled payloads, are specific to a Python minor
version: this interpreter does it in process, another one in an isolated
worker (`-I -P -S`, working directory `/`, only PATH in its environment, a time
limit) that is sent the source of the livepatch modules it needs, so that
nothing of the current directory, the trees or that interpreter's
site-packages is imported. The host merges the workers' answers into one
manifest, applies `--allow` overrides, and refuses the build, listing every
reason with file:line, if anything cannot be hotpatched safely."""

from __future__ import annotations

import base64
import json
import marshal
import os
import re
import shutil
import subprocess
import sys
import time

from . import __version__
from . import noops
from .errors import PatchError, Problem
from .patch import PYTHON_TAG

# Refusal categories an operator may override because skipping them is sound:
# the hotpatch simply does not re-run a decorator or a module statement.
OVERRIDABLE = ("decorator", "statement")
WORKER_TIMEOUT = 300.0  # seconds one interpreter may take to compile everything
PROBE_TIMEOUT = 30.0
# what the isolated worker is sent, in import order (stdlib imports only)
_WORKER_MODULES = ("errors", "patch", "checks", "fingerprint", "noops", "references", "decorators", "definitions",
                   "statements", "derived", "build", "builder")


class BuildRefused(PatchError):
    """The build is refused: a change that cannot be hotpatched, a source
    that does not compile, an entry of a tree that is not read."""
    category = "refused"


class BuildError(BuildRefused):
    """Not a refusal of the change: a tree that cannot be read, a worker
    that failed or ran out of time."""
    category = "error"


class UnknownInterpreter(BuildError):
    """A --python that is not a usable Python interpreter (or the same
    version as another one)."""
    category = "usage"


def _tree(path: str, label: str, **kw):
    from . import sourcetree
    try:
        tree = sourcetree.SourceTree(path, label, **kw)
    except sourcetree.Unreadable as exc:
        raise BuildError(str(exc)) from None
    except sourcetree.UnsafeEntry as exc:
        raise BuildRefused(f"cannot read the {label} tree: {exc}") from None
    return tree


def discover(root: str) -> dict[str, str]:
    """module name -> path relative to `root`, for a package directory (has
    __init__.py: its name prefixes every module) or a directory of modules
    and packages such as an unpacked wheel (dist-info and data dirs skipped)."""
    return _tree(root, "source").modules


def distribution_info(root: str) -> tuple[str, str] | None:
    """(name, version) from an unpacked wheel's *.dist-info/METADATA."""
    from . import sourcetree
    try:
        return _tree(root, "source").distribution_info()
    except sourcetree.UnsafeEntry as exc:
        raise BuildRefused(str(exc)) from None
    except sourcetree.Unreadable as exc:
        raise BuildError(str(exc)) from None


# ---------------------------------------------------------------- worker

def _worker(request: dict) -> dict:
    """Runs inside the target interpreter: compiles and diffs, never runs."""
    from .build import SourceError, compile_error, diff_sources, patched_filename
    from . import definitions as defs
    from .checks import code_kind
    from .fingerprint import fingerprint
    from .patch import UNCHANGED

    def lit(value):
        return None if value is UNCHANGED or value is None else repr(value)

    out = {"tag": PYTHON_TAG, "modules": {}}
    for item in request["modules"]:
        module, rel = item["module"], item["file"]
        new_file = patched_filename(rel, request["id"])
        try:
            diff = diff_sources(module, item["base"], item["new"], rel, new_file, item.get("decorators"))
            defs.exact_sources(diff, item["new"])
            new_code = compile(item["new"], new_file, "exec", dont_inherit=True)
            out["modules"][module] = {
                "changes": [{"qualname": q, "baseline": fp, "patched": fingerprint(c), "kind": code_kind(c),
                             "defaults": lit(d), "kwdefaults": lit(kw), "line": c.co_firstlineno}
                            for q, fp, c, d, kw in diff.changes],
                "functions": [{"qualname": q, "patched": fingerprint(c), "defaults": lit(d), "kwdefaults": lit(kw),
                               "line": c.co_firstlineno} for q, c, d, kw in diff.new_functions],
                "imports": [{"name": name, "statement": __import__("ast").unparse(node)} for name, node in diff.new_imports],
                "constants": {name: repr(value) for name, value in diff.constants.items()},
                "refused": [p.to_dict() for p in diff.refused],
                "ignored": [p.to_dict() for p in diff.ignored],
                "warnings": [p.to_dict() for p in diff.warnings],
                "values": diff.values, "definitions": diff.definitions, "captured": diff.captured,
                "statements": diff.statements,
                "code": base64.b64encode(marshal.dumps(new_code)).decode(),
            }
        except SourceError as exc:
            out["modules"][module] = {"error": {"side": exc.side, "line": exc.line, "message": exc.detail}}
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            # deep code that parsed but is too deep to fingerprint or marshal
            line, message = compile_error(exc)
            out["modules"][module] = {"error": {"side": "patched", "line": line, "message": message}}
    out["new_modules"] = {}
    for item in request.get("new_modules", ()):
        try:  # compiled only: it runs when the patched process imports it
            code = compile(item["new"], patched_filename(item["file"], request["id"]), "exec", dont_inherit=True)
            out["new_modules"][item["module"]] = {"code": base64.b64encode(marshal.dumps(code)).decode()}
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
            line, message = compile_error(exc)
            out["new_modules"][item["module"]] = {"error": {"line": line, "message": message}}
    return out


# The isolated worker's whole program: it builds the livepatch modules it
# needs from the sources it is sent (so it imports nothing from disk but the
# standard library) and answers one request on stdin.
_BOOTSTRAP = r"""
import json, sys, types
data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
package = types.ModuleType("livepatch")
package.__path__, package.__version__ = [], data["version"]
sys.modules["livepatch"] = package
for name, filename, source in data["modules"]:
    module = types.ModuleType("livepatch." + name)
    module.__file__, module.__package__ = filename, "livepatch"
    sys.modules[module.__name__] = module
    setattr(package, name, module)
    exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)
answer = sys.modules["livepatch.builder"]._worker(data["request"])
sys.stdout.buffer.write(json.dumps(answer).encode("utf-8"))
"""
_PROBE = ("import sys; print('livepatch-probe %s %d %d %s' % (sys.implementation.name, sys.version_info[0], "
          "sys.version_info[1], sys.implementation.cache_tag))")


def _isolated(python: str, code: str, *, safe_path: bool = True) -> list[str]:
    # -I: no PYTHON* variables, no user site, no script or current directory
    # on sys.path (-P, implied by -I from 3.11, said again for clarity; the
    # probe leaves it out so that an older Python can still say its version);
    # -S: no site-packages and no .pth files of that interpreter
    return [python, "-I"] + (["-P"] if safe_path else []) + ["-S", "-c", code]


_WORKER_ENV = {"PATH": os.defpath}


def interpreter(python: str) -> tuple[str | None, str]:
    """(absolute path, cache tag) of a --python, or (None, tag) when it is
    this interpreter; UnknownInterpreter when it cannot be used."""
    found = shutil.which(python)
    if found is None:
        where = "" if os.sep in python else " on PATH"
        raise UnknownInterpreter(f"--python {python}: no such interpreter{where}")
    path = os.path.abspath(found)  # the worker runs in /: a relative path would not resolve there
    if os.path.realpath(path) == os.path.realpath(sys.executable):
        return None, PYTHON_TAG
    try:
        proc = subprocess.run(_isolated(path, _PROBE, safe_path=False), stdin=subprocess.DEVNULL, capture_output=True, cwd="/",
                              env=_WORKER_ENV, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UnknownInterpreter(f"--python {python}: {path} did not answer within {PROBE_TIMEOUT:g} s") from None
    except OSError as exc:
        raise UnknownInterpreter(f"--python {python}: cannot run {path}: {exc.strerror}") from None
    words = proc.stdout.decode("utf-8", "replace").split()
    if proc.returncode != 0 or len(words) != 5 or words[0] != "livepatch-probe":
        raise UnknownInterpreter(f"--python {python}: {path} is not a Python interpreter livepatch can use")
    impl, major, minor, tag = words[1], int(words[2]), int(words[3]), words[4]
    if impl != "cpython" or (major, minor) < (3, 11):
        raise UnknownInterpreter(f"--python {python}: livepatch needs CPython 3.11 or newer; "
                                 f"{path} is {impl} {major}.{minor}")
    return path, tag


def _run_worker(python: str, request: dict) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    modules = []
    for name in _WORKER_MODULES:
        filename = os.path.join(here, name + ".py")
        with open(filename, encoding="utf-8") as fh:
            modules.append([name, filename, fh.read()])
    payload = json.dumps({"version": __version__, "modules": modules, "request": request}).encode("utf-8")
    try:
        proc = subprocess.run(_isolated(python, _BOOTSTRAP), input=payload, capture_output=True, cwd="/",
                              env=_WORKER_ENV, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise BuildError(f"compiling with {python} took longer than {WORKER_TIMEOUT:g} s; it was stopped") from None
    except OSError as exc:
        raise BuildError(f"cannot run {python}: {exc.strerror}") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                                          else f"exit status {proc.returncode}")
        if "No module named" in reason:
            reason += " (the isolated worker has the standard library only)"
        raise BuildError(f"compiling with {python} failed: {reason[:300]}")
    try:
        answer = json.loads(proc.stdout)
        if not isinstance(answer, dict) or not isinstance(answer.get("modules"), dict):
            raise ValueError("not a worker answer")
    except ValueError:
        raise BuildError(f"compiling with {python} failed: its answer could not be read") from None
    return answer


# ---------------------------------------------------------------- host

def _located(problem: dict, files: dict) -> Problem:
    module = problem["target"].partition(":")[0]
    message = problem["message"]
    m = re.match(r"line (\d+): (.*)", message, re.S)
    if m and module in files:
        message = f"{files[module]}:{m.group(1)}: {m.group(2)}"
    elif module in files:
        message = f"{files[module]}: {message}"
    return Problem(problem["category"], problem["target"], message)


def build(baseline: str, patched: str, *, patch_id: str, pythons=(), title: str = "", description: str = "",
          references=(), classification: str = "bugfix", requires=(), cumulative: bool = False,
          name: str | None = None, version: str | None = None, allow=(), allow_active=(),
          private_key=None, sequence: int = 1, lineage: str | None = None, hooks: str | None = None,
          only=()) -> tuple[bytes, dict]:
    """Build a bundle; returns (bundle bytes, summary). Raises BuildRefused
    listing every refused change (nothing is written then). `sequence`
    orders the bundles of one baseline (a later bundle needs a higher one),
    `lineage` names the family of successive versions of one fix."""
    from . import bundle as fmt, sourcetree
    check_sequence(sequence)
    if lineage is not None:
        check_lineage(lineage)
    bad = [a for a in allow if a not in OVERRIDABLE]
    if bad:
        raise BuildRefused(f"--allow {bad[0]}: only {', '.join(OVERRIDABLE)} can be overridden")
    if cumulative and requires:
        raise BuildRefused("--requires and --cumulative exclude each other")
    hooks_source = _hooks_source(hooks)
    from . import selection
    try:
        only = selection.check_patterns(only)
    except ValueError as exc:
        raise BuildRefused(str(exc)) from None
    base_tree = _tree(baseline, "baseline", follow_top_packages=True)  # may link to the deployed release
    new_tree = _tree(patched, "patched")
    runners = [interpreter(p) for p in pythons] or [(None, PYTHON_TAG)]
    tags = [tag for _, tag in runners]
    if len(set(tags)) != len(tags):
        raise UnknownInterpreter(f"two --python interpreters are the same version ({', '.join(tags)})")
    unsafe = base_tree.refused + new_tree.refused
    refused, modules, source_errors, ignored, added, warnings = [], [], [], [], [], []
    for module, rel in new_tree.modules.items():
        if noops.is_test_module(module, rel):
            if base_tree.modules.get(module) is None or not _same_file(base_tree, new_tree, base_tree.modules[module], rel):
                ignored.append(Problem("ignored:test", f"{module}:<module>", f"{rel}: {noops.TEST_REASON}"))
            continue
        if module not in base_tree.modules:  # carried whole, importable while the patch is in
            try:
                added.append({"module": module, "file": rel, "new": sourcetree.decode_source(new_tree.read_bytes(rel))})
            except sourcetree.UnsafeEntry as exc:
                unsafe.append(str(exc))
            except sourcetree.DecodeFailed as exc:
                where = new_tree.shown(rel) + ("" if exc.line is None else f":{exc.line}")
                source_errors.append(Problem("refused:encoding", f"{module}:<module>", f"{where}: {exc}"))
            except sourcetree.Unreadable as exc:
                raise BuildError(str(exc)) from None
            continue
        base_rel = base_tree.modules[module]
        sides = {}
        for side, tree, path in (("baseline", base_tree, base_rel), ("patched", new_tree, rel)):
            try:
                sides[side] = tree.read_bytes(path)
            except sourcetree.UnsafeEntry as exc:
                unsafe.append(str(exc))
            except sourcetree.Unreadable as exc:
                raise BuildError(str(exc)) from None
        if len(sides) < 2 or sides["baseline"] == sides["patched"]:
            continue
        for side, tree, path in (("baseline", base_tree, base_rel), ("patched", new_tree, rel)):
            try:
                sides[side] = sourcetree.decode_source(sides[side])
            except sourcetree.DecodeFailed as exc:
                where = tree.shown(path) + ("" if exc.line is None else f":{exc.line}")
                source_errors.append(Problem("refused:encoding", f"{module}:<module>", f"{where}: {exc}"))
        if not all(isinstance(v, str) for v in sides.values()):
            continue
        if sides["baseline"] != sides["patched"]:
            modules.append({"module": module, "file": rel, "base": sides["baseline"], "new": sides["patched"],
                            "shown": {"baseline": base_tree.shown(base_rel), "patched": new_tree.shown(rel)}})
    if unsafe:
        raise _one_or_list(patch_id, [Problem("refused:unsafe-file", "", u) for u in dict.fromkeys(unsafe)],
                           "entries of the trees are not regular files inside them")
    if source_errors:
        raise _one_or_list(patch_id, source_errors, "source files cannot be read as Python reads them")
    files = {m["module"]: m["file"] for m in modules}
    from .decorators import for_trees
    request = {"id": patch_id, "modules": [{**{k: m[k] for k in ("module", "file", "base", "new")},
                                            "decorators": for_trees(m["module"], m["base"], m["new"], base_tree, new_tree)}
                                           for m in modules],
               "new_modules": added}
    answers = [_worker(request) if path is None else _run_worker(path, request) for path, _ in runners]
    failed: dict = {}  # (module, where, message) -> tags of the interpreters that said so
    for answer in answers:
        for module, res in answer["modules"].items():
            if "error" in res:
                err, item = res["error"], next(m for m in modules if m["module"] == module)
                where = item["shown"][err.get("side") or "patched"] + ("" if err["line"] is None else f":{err['line']}")
                failed.setdefault((module, where, err["message"]), []).append(answer["tag"])
    for answer in answers:
        for module, res in answer.get("new_modules", {}).items():
            if "error" in res:
                err = res["error"]
                where = new_tree.shown(next(m["file"] for m in added if m["module"] == module))
                failed.setdefault((module, where + ("" if err["line"] is None else f":{err['line']}"), err["message"]),
                                  []).append(answer["tag"])
    for (module, where, message), by in failed.items():
        suffix = f" ({', '.join(by)})" if len(by) < len(answers) else ""  # valid for another version
        source_errors.append(Problem("refused:syntax", f"{module}:<module>", f"{where}: {message}{suffix}"))
    if source_errors:
        raise _one_or_list(patch_id, list(dict.fromkeys(source_errors)), "source files do not compile")

    targets, globals_, payloads, module_entries, overrides = {}, {}, {}, {}, []
    for answer in answers:
        tag = answer["tag"]
        for module, res in answer["modules"].items():
            for p in res.get("ignored", ()):
                if (problem := _located(p, files)) not in ignored:
                    ignored.append(problem)
            for p in res.get("warnings", ()):
                if (problem := _located(p, files)) not in warnings:
                    warnings.append(problem)
            for p in res["refused"]:
                problem = _located(p, files)
                kind = problem.category.partition(":")[2]
                if kind in allow:
                    if problem.to_dict() not in overrides:
                        overrides.append(problem.to_dict())
                elif problem not in refused:
                    refused.append(problem)
            if "code" not in res:
                continue
            touched = False
            for c in res["changes"]:
                key = f"{module}:{c['qualname']}"
                entry = targets.setdefault(key, {"target": key, "kind": c["kind"], "allow_active": key in allow_active
                                                 or c["qualname"] in allow_active,
                                                 "defaults": c["defaults"], "kwdefaults": c["kwdefaults"],
                                                 "file": files[module], "line": c["line"], "code": {}})
                entry["code"][tag] = {"baseline": c["baseline"], "patched": c["patched"],
                                      "payload": fmt.code_payload(tag, module)}
                touched = True
            for f in res["functions"]:
                key = f"{module}:{f['qualname']}"
                entry = globals_.setdefault(key, {"name": key, "kind": "function", "code": {},
                                                  "defaults": f["defaults"], "kwdefaults": f["kwdefaults"]})
                entry["code"][tag] = {"patched": f["patched"], "payload": fmt.code_payload(tag, module)}
                touched = True
            for imp in res["imports"]:
                globals_.setdefault(f"{module}:{imp['name']}", {"name": f"{module}:{imp['name']}", "kind": "import",
                                                                "statement": imp["statement"]})
                touched = True
            for cname, value in res["constants"].items():
                globals_.setdefault(f"{module}:{cname}", {"name": f"{module}:{cname}", "kind": "constant", "value": value})
                touched = True
            touched |= _apply_time_globals(globals_, module, res)
            if touched:
                payloads[fmt.code_payload(tag, module)] = base64.b64decode(res["code"])
                item = next(m for m in modules if m["module"] == module)
                payloads[fmt.source_payload(module)] = item["new"].encode()
                payloads[fmt.baseline_payload(module)] = item["base"].encode()
                module_entries[module] = {"file": files[module], "source": fmt.source_payload(module),
                                          "baseline": fmt.baseline_payload(module)}
    left_out = None
    if only:  # the operator's choice of what the release diff contributes
        try:
            packages = {m for m, rel in files.items() if rel.endswith("__init__.py")}
            bound = {m["module"]: _baseline_names(m["base"]) for m in modules}
            refused, left_out = selection.select(only, targets, globals_, refused, packages, bound)
        except ValueError as exc:
            raise BuildRefused(f"cannot build {patch_id}: {exc}") from None
        selection.keep_modules(module_entries, payloads, targets, globals_)
    for key, entry in targets.items():
        missing = [t for t in tags if t not in entry["code"]]
        if missing:
            refused.append(Problem("refused:version-specific", key, f"changed for {', '.join(sorted(entry['code']))} but not for {', '.join(missing)}"))
    if refused:
        raise BuildRefused(f"cannot build {patch_id}: {len(refused)} change(s) cannot be hotpatched safely", refused)
    if not targets and not globals_:
        why = f" ({len(ignored)} change(s) that never run ignored)" if ignored else ""
        raise BuildRefused(f"cannot build {patch_id}: the trees differ in no function, import or constant{why}")
    if name is None or version is None:
        try:
            dist = base_tree.distribution_info()
        except sourcetree.UnsafeEntry as exc:
            raise BuildRefused(f"cannot build {patch_id}: {exc}") from None
        except sourcetree.Unreadable as exc:
            raise BuildError(str(exc)) from None
        name = name or (dist[0] if dist else os.path.basename(os.path.abspath(baseline)))
        version = version or (dist[1] if dist else "unversioned")
    manifest = {
        "id": patch_id, "title": title or patch_id, "description": description, "references": list(references),
        "classification": classification, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "baseline": {"name": name, "version": version}, "requires": list(requires), "cumulative": cumulative,
        "pythons": tags, "targets": list(targets.values()), "globals": list(globals_.values()),
        "modules": module_entries, "overrides": overrides, "builder": {"livepatch": __version__},
        "sequence": sequence,
    }
    if ignored:
        manifest["ignored"] = [p.to_dict() for p in ignored]
    if warnings:
        manifest["warnings"] = [p.to_dict() for p in warnings]
    if added:
        manifest["new_modules"] = _new_modules(added, answers, payloads)
    if left_out is not None:
        manifest["selection"] = {"only": only, "left_out": left_out}
    if hooks_source is not None:  # signed with the manifest like the code; run only at apply time
        payloads[fmt.HOOKS_PAYLOAD] = hooks_source[0].encode()
        manifest["hooks"] = {"file": os.path.basename(hooks), "payload": fmt.HOOKS_PAYLOAD, "functions": hooks_source[1]}
    if lineage is not None:
        manifest["lineage"] = lineage
    try:  # the builder never emits what the loader refuses
        data = fmt.write(manifest, payloads, private_key)
        fmt.validate(fmt.read(data, allow_unsigned=True).manifest)
    except fmt.BundleError as exc:
        raise BuildRefused(f"cannot build {patch_id}: the bundle would not load: {str(exc).splitlines()[0]}") from None
    out = summary(manifest)
    out["skipped"] = base_tree.skipped + new_tree.skipped
    return data, out


def _baseline_names(source: str):
    """Names a baseline module binds at import; None if that is unknowable
    (a star import, a source this interpreter cannot parse)."""
    import ast
    from .definitions import bound_names
    try:
        return bound_names(ast.parse(source))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _apply_time_globals(globals_: dict, module: str, res: dict) -> bool:
    """Manifest entries for a module's values and definitions (made at apply
    time, see livepatch.values), and the references its changed values and
    constants were captured by at import."""
    from .definitions import global_entries
    entries, extra = global_entries(module, res.get("values", {}), res.get("definitions", {}), res.get("captured", {}),
                                    res.get("statements", {}))
    for entry in entries:
        globals_.setdefault(entry["name"], entry)
    for name, fields in extra.items():
        if name in globals_:
            globals_[name].update(fields)
    return bool(entries)


def _new_modules(added: list, answers: list, payloads: dict) -> dict:
    """Manifest entries (and payloads) of the modules the release adds."""
    import hashlib
    from . import bundle as fmt
    out = {}
    for item in added:
        module = item["module"]
        payloads[fmt.source_payload(module)] = item["new"].encode()
        code = {}
        for answer in answers:
            data = base64.b64decode(answer["new_modules"][module]["code"])
            payloads[fmt.code_payload(answer["tag"], module)] = data
            code[answer["tag"]] = {"payload": fmt.code_payload(answer["tag"], module),
                                   "sha256": hashlib.sha256(data).hexdigest()}
        out[module] = {"file": item["file"], "source": fmt.source_payload(module), "code": code}
    return out


def _hooks_source(path):
    if path is None:
        return None
    from .hooks import read_source
    try:
        return read_source(path)
    except ValueError as exc:
        raise BuildRefused(str(exc)) from None


def _same_file(base_tree, new_tree, base_rel: str, rel: str) -> bool:
    from . import sourcetree
    try:
        return base_tree.read_bytes(base_rel) == new_tree.read_bytes(rel)
    except (sourcetree.UnsafeEntry, sourcetree.Unreadable):
        return False  # a test module is never read into the bundle: what it holds does not matter


def _one_or_list(patch_id: str, problems: list, what: str) -> BuildRefused:
    # one problem is one line (its message names the file); several, a list
    if len(problems) == 1:
        return BuildRefused(f"cannot build {patch_id}: {problems[0].message}")
    shown = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
        shown.append(Problem(problems[0].category, "", f"and {len(problems) - _MAX_LISTED} more"))
    return BuildRefused(f"cannot build {patch_id}: {len(problems)} {what}", shown)


_MAX_LISTED = 50


def check_sequence(value) -> int:
    from .bundle import MAX_SEQUENCE
    if type(value) is not int or not 1 <= value <= MAX_SEQUENCE:
        raise BuildRefused(f"sequence must be a whole number from 1 to {MAX_SEQUENCE}, got {str(value)[:40]!r}")
    return value


def check_lineage(value) -> str:
    from .bundle import _ID
    if not isinstance(value, str) or not _ID.match(value):
        raise BuildRefused(f"lineage must be like a patch id (letters, digits, '.', '_', '-'; at most 128), "
                           f"got {str(value)[:40]!r}")
    return value


def summary(manifest: dict) -> dict:
    by_module: dict = {}
    for t in manifest["targets"]:
        by_module.setdefault(t["target"].partition(":")[0], []).append(t["target"].partition(":")[2])
    return {
        "id": manifest["id"], "baseline": manifest["baseline"], "pythons": manifest["pythons"],
        "sequence": manifest.get("sequence", 0), "lineage": manifest.get("lineage"),
        "targets": by_module,
        "data_changes": [g["name"] for g in manifest["globals"] if g["kind"] == "constant"],
        "new_globals": [g["name"] for g in manifest["globals"] if g["kind"] != "constant"],
        "overridden": manifest["overrides"],
        "ignored": manifest.get("ignored", []),
        "warnings": manifest.get("warnings", []),
        "recomputed": [f"{g['name']}: {g['built']['reason']}" for g in manifest["globals"] if "built" in g],
        "hooks": manifest.get("hooks", {}).get("functions", []),
        "left_out": manifest.get("selection", {}).get("left_out", []),
        "new_modules": sorted(manifest.get("new_modules", {})),
        "made_at_apply": [g["name"] for g in manifest["globals"] if g["kind"] in ("value", "definition", "statement")],
        "not_updated": [f"{g['name']}: {why}" for g in manifest["globals"] for why in g.get("stale", ())],
    }

