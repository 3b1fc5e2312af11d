"""The bundle builder: two source trees (baseline and patched) -> a bundle.

Each module present in both trees is diffed (build.diff_sources) by every
target interpreter in a worker subprocess (`python -m livepatch.builder
--worker`), because code objects, and so fingerprints and marshalled
payloads, are specific to a Python minor version. The host merges the
workers' answers into one manifest, applies `--allow` overrides, and refuses
the build, listing every reason with file:line, if anything cannot be
hotpatched safely."""

from __future__ import annotations

import base64
import json
import marshal
import os
import re
import subprocess
import sys
import time

from . import __version__
from .errors import PatchError, Problem
from .patch import PYTHON_TAG

# Refusal categories an operator may override because skipping them is sound:
# the hotpatch simply does not re-run a decorator or a module statement.
OVERRIDABLE = ("decorator", "statement")
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv"}


class BuildRefused(PatchError):
    category = "refused"


def discover(root: str) -> dict[str, str]:
    """module name -> path relative to `root`, for a package directory (has
    __init__.py: its name prefixes every module) or a directory of modules
    and packages such as an unpacked wheel (dist-info and data dirs skipped)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise BuildRefused(f"{root} is not a directory")
    is_package = os.path.exists(os.path.join(root, "__init__.py"))
    base = os.path.dirname(root) if is_package else root
    out = {}
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # a baseline may link to the live tree
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith((".dist-info", ".data", ".egg-info")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), base)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and all(p.isidentifier() for p in parts):
                out[".".join(parts)] = os.path.relpath(os.path.join(dirpath, name), root)
    return out


def distribution_info(root: str) -> tuple[str, str] | None:
    """(name, version) from an unpacked wheel's *.dist-info/METADATA."""
    for entry in sorted(os.listdir(root)):
        meta = os.path.join(root, entry, "METADATA")
        if entry.endswith(".dist-info") and os.path.isfile(meta):
            fields = {}
            with open(meta, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if not line.strip():
                        break
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "name" in fields and "version" in fields:
                return fields["name"], fields["version"]
    return None


# ---------------------------------------------------------------- worker

def _worker(request: dict) -> dict:
    """Runs inside the target interpreter."""
    from .build import diff_sources, patched_filename
    from .checks import code_kind
    from .fingerprint import fingerprint

    out = {"tag": PYTHON_TAG, "modules": {}}
    for item in request["modules"]:
        module, rel = item["module"], item["file"]
        new_file = patched_filename(rel, request["id"])
        try:
            diff = diff_sources(module, item["base"], item["new"], rel, new_file)
            new_code = compile(item["new"], new_file, "exec", dont_inherit=True)
        except SyntaxError as exc:
            out["modules"][module] = {"refused": [Problem("refused:syntax", f"{module}:<module>", f"line {exc.lineno}: {exc.msg}").to_dict()]}
            continue
        def lit(value):
            from .patch import UNCHANGED
            return None if value is UNCHANGED or value is None else repr(value)

        out["modules"][module] = {
            "changes": [{"qualname": q, "baseline": fp, "patched": fingerprint(c), "kind": code_kind(c),
                         "defaults": lit(d), "kwdefaults": lit(kw), "line": c.co_firstlineno}
                        for q, fp, c, d, kw in diff.changes],
            "functions": [{"qualname": q, "patched": fingerprint(c), "defaults": lit(d), "kwdefaults": lit(kw),
                           "line": c.co_firstlineno} for q, c, d, kw in diff.new_functions],
            "imports": [{"name": name, "statement": __import__("ast").unparse(node)} for name, node in diff.new_imports],
            "constants": {name: repr(value) for name, value in diff.constants.items()},
            "refused": [p.to_dict() for p in diff.refused],
            "code": base64.b64encode(marshal.dumps(new_code)).decode(),
        }
    return out


def _run_worker(python: str, request: dict) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        proc = subprocess.run([python, "-m", "livepatch.builder", "--worker"], input=json.dumps(request),
                              capture_output=True, text=True, env=env, timeout=600)
    except FileNotFoundError:
        raise BuildRefused(f"Python interpreter {python!r} not found") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BuildRefused(f"compiling with {python} failed: {tail[0]} (it needs livepatch's dependencies, "
                           f"e.g. `{python} -m pip install bytecode psutil`)")
    return json.loads(proc.stdout)


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
          private_key=None, sequence: int = 1, lineage: str | None = None) -> tuple[bytes, dict]:
    """Build a bundle; returns (bundle bytes, summary). Raises BuildRefused
    listing every refused change (nothing is written then). `sequence`
    orders the bundles of one baseline (a later bundle needs a higher one),
    `lineage` names the family of successive versions of one fix."""
    from . import bundle as fmt
    check_sequence(sequence)
    if lineage is not None:
        check_lineage(lineage)
    bad = [a for a in allow if a not in OVERRIDABLE]
    if bad:
        raise BuildRefused(f"--allow {bad[0]}: only {', '.join(OVERRIDABLE)} can be overridden")
    if cumulative and requires:
        raise BuildRefused("--requires and --cumulative exclude each other")
    base_mods, new_mods = discover(baseline), discover(patched)
    refused, modules = [], []
    for module, rel in new_mods.items():
        with open(os.path.join(patched, rel), encoding="utf-8") as fh:
            new_src = fh.read()
        if module not in base_mods:
            refused.append(Problem("refused:new-module", f"{module}:<module>", f"{rel}: module is not in the baseline"))
            continue
        with open(os.path.join(baseline, base_mods[module]), encoding="utf-8") as fh:
            base_src = fh.read()
        if base_src != new_src:
            modules.append({"module": module, "file": rel, "base": base_src, "new": new_src})
    files = {m["module"]: m["file"] for m in modules}
    request = {"id": patch_id, "modules": modules}
    answers = [_worker(request) if p in (None, sys.executable) else _run_worker(p, request)
               for p in (list(pythons) or [None])]
    tags = [a["tag"] for a in answers]
    if len(set(tags)) != len(tags):
        raise BuildRefused(f"two --python interpreters are the same version ({', '.join(tags)})")

    targets, globals_, payloads, module_entries, overrides = {}, {}, {}, {}, []
    for answer in answers:
        tag = answer["tag"]
        for module, res in answer["modules"].items():
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
            if touched:
                payloads[fmt.code_payload(tag, module)] = base64.b64decode(res["code"])
                item = next(m for m in modules if m["module"] == module)
                payloads[fmt.source_payload(module)] = item["new"].encode()
                payloads[fmt.baseline_payload(module)] = item["base"].encode()
                module_entries[module] = {"file": files[module], "source": fmt.source_payload(module),
                                          "baseline": fmt.baseline_payload(module)}
    for key, entry in targets.items():
        missing = [t for t in tags if t not in entry["code"]]
        if missing:
            refused.append(Problem("refused:version-specific", key, f"changed for {', '.join(sorted(entry['code']))} but not for {', '.join(missing)}"))
    if refused:
        raise BuildRefused(f"cannot build {patch_id}: {len(refused)} change(s) cannot be hotpatched safely", refused)
    if not targets and not globals_:
        raise BuildRefused(f"cannot build {patch_id}: the trees differ in no function, import or constant")
    if name is None or version is None:
        dist = distribution_info(os.path.abspath(baseline))
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
    if lineage is not None:
        manifest["lineage"] = lineage
    data = fmt.write(manifest, payloads, private_key)
    fmt.validate(fmt.read(data, allow_unsigned=True).manifest)  # the builder never emits what the loader refuses
    return data, summary(manifest)


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
        "data changes": [g["name"] for g in manifest["globals"] if g["kind"] == "constant"],
        "new globals": [g["name"] for g in manifest["globals"] if g["kind"] != "constant"],
        "overridden": manifest["overrides"],
    }


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    json.dump(_worker(json.load(sys.stdin)), sys.stdout)
