"""Two versions of a small distribution laid out as real source trees, and
a real process that imports the baseline, applies a bundle built from them,
rolls it back and reports what its code returned at each step."""

import json
import os
import subprocess
import sys
import textwrap


def write_tree(root, files: dict) -> str:
    """`files` maps a path relative to `root` to its text; returns root."""
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(textwrap.dedent(text))
    return str(root)


def write_release(tmp_path, base: dict, new: dict, package: str = "app"):
    """tmp_path/base/<package> and tmp_path/new/<package>: (base dir, new dir)."""
    write_tree(tmp_path / "base", base)
    write_tree(tmp_path / "new", new)
    return str(tmp_path / "base" / package), str(tmp_path / "new" / package)


def manifest_of(data: bytes) -> dict:
    from livepatch import bundle
    return bundle.read(data, allow_unsigned=True).manifest


_PROGRAM = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import livepatch
from livepatch.bundle import load_bundle
imports, probe, later = json.loads(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
for name in imports:
    importlib.import_module(name)

def observe():
    try:
        return eval(probe)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

out = {"before": observe()}
try:
    livepatch.apply(load_bundle(sys.argv[2], allow_unsigned=True))
    for name in later:
        importlib.import_module(name)
    out["applied"] = observe()
except Exception as exc:
    out["apply_error"] = str(exc).splitlines()[0]
else:
    livepatch.rollback()
out["rolled_back"] = observe()
print(json.dumps(out))
"""


def round_trip(tmp_path, data: bytes, imports, probe: str, python: str = sys.executable, import_later=()) -> dict:
    """Run `probe` (an expression over the modules in `imports`) in a new
    process importing the baseline tree tmp_path/base: before the apply,
    with the bundle applied (and the modules of `import_later` imported
    then), after its rollback."""
    path = tmp_path / "hp.lpb"
    path.write_bytes(data)
    proc = subprocess.run([python, "-c", _PROGRAM, str(tmp_path / "base"), str(path), json.dumps(list(imports)), probe,
                           json.dumps(list(import_later))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
