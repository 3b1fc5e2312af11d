"""Cost of values computed at import (livepatch/values.py): a changed
`re.compile(...)` is evaluated before the pause and everything that captured
the old object is found by identity (the module, its classes and functions'
defaults, and every other module's attributes). Measured in one process
holding MODULES extra modules of ATTRS attributes each, three patches
applied and rolled back in interleaved rounds:

* `literal` and `literal-again`: a changed literal constant (no evaluation,
  no search): the A/A control, two identical variants;
* `value`: a changed `re.compile(...)` captured by a default, an alias and an
  import in another module.

Per variant: the apply's wall time (what the operator waits for; the search
runs there) and the pause (`Result.pause_ns`, what the service's threads
see)."""

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time

from common import machine, write_result

import livepatch
from livepatch.build import patch_from_source

BASE = '''\
import re
PATTERN = re.compile(r"<script")
ALIAS = PATTERN
LIMIT = 10


def clean(s, pattern=PATTERN):
    return pattern.sub("", s)[:LIMIT]
'''
LITERAL = BASE.replace("LIMIT = 10", "LIMIT = 20")
VALUE = BASE.replace('re.compile(r"<script")', 're.compile(r"<\\s*script", re.I)')


def filler(directory: str, count: int, attrs: int) -> None:
    """`count` modules of `attrs` attributes, imported (what a service holds)."""
    for i in range(count):
        with open(os.path.join(directory, f"lp_fill_{i}.py"), "w") as fh:
            fh.write("".join(f"A{j} = ({i}, {j})\n" for j in range(attrs)))
    importlib.invalidate_caches()
    for i in range(count):
        importlib.import_module(f"lp_fill_{i}")


def run(modules: int, attrs: int, rounds: int) -> dict:
    directory = tempfile.mkdtemp(prefix="lp-values-")
    sys.path.insert(0, directory)
    with open(os.path.join(directory, "lp_target.py"), "w") as fh:
        fh.write(BASE)
    with open(os.path.join(directory, "lp_user.py"), "w") as fh:
        fh.write("from lp_target import PATTERN\n")
    filler(directory, modules, attrs)
    importlib.import_module("lp_target")
    user = importlib.import_module("lp_user")
    variants = {"literal": LITERAL, "literal-again": LITERAL, "value": VALUE}
    seen = {name: {"apply_us": [], "pause_us": []} for name in variants}
    for r in range(rounds):
        for name, source in variants.items():
            patch = patch_from_source(f"HP-{name}-{r}", "lp_target", source, base_source=BASE)
            start = time.perf_counter_ns()
            result = livepatch.apply(patch)
            seen[name]["apply_us"].append((time.perf_counter_ns() - start) / 1000)
            seen[name]["pause_us"].append(result.pause_ns / 1000)
            if name == "value":
                assert user.PATTERN is sys.modules["lp_target"].PATTERN  # the capture was rebound
            livepatch.rollback()
    out = {}
    for name, series in seen.items():
        out[name] = {k: {"p50": round(statistics.median(v), 1),
                         "p90": round(sorted(v)[int(0.9 * (len(v) - 1))], 1)} for k, v in series.items()}
    return {"modules_loaded": len(sys.modules), "filler_modules": modules, "attrs_per_module": attrs,
            "rounds": rounds, "variants": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modules", type=int, help="filler modules (default 2000, quick 200)")
    parser.add_argument("--rounds", type=int, help="rounds of the three variants (default 40, quick 10)")
    args = parser.parse_args()
    modules, attrs, rounds = (200, 20, 10) if args.quick else (2000, 50, 40)
    modules, rounds = args.modules or modules, args.rounds or rounds
    result = {"machine": machine(), **run(modules, attrs, rounds)}
    path = write_result("values-apply", result, args.quick)
    print(f"{result['modules_loaded']} modules loaded")
    for name, v in result["variants"].items():
        print(f"{name:14} apply p50 {v['apply_us']['p50']:9.1f} us  p90 {v['apply_us']['p90']:9.1f} us   "
              f"pause p50 {v['pause_us']['p50']:7.1f} us  p90 {v['pause_us']['p90']:7.1f} us")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
