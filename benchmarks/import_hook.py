"""Cost of the import hook that commits pending patches (livepatch/imports.py):

* per import of a module nobody watches: the finder's decline, timed alone
  (one call, one dict lookup) and as part of real imports of fresh modules,
  with and without the hook at the front of sys.meta_path, alternating;
* per import of a watched module: the import with its pending part (N
  functions) committed before it returns, against the same import without
  a patch."""

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import textwrap
import time
import timeit

from common import machine, typical_function, write_result

import livepatch
from livepatch import imports
from livepatch.build import patch_from_source

_seq = iter(range(10**9))


def fresh_modules(directory, count, functions=1, constant=1):
    names = []
    for _ in range(count):
        name = f"lp_imp_{next(_seq)}"
        with open(os.path.join(directory, name + ".py"), "w") as fh:
            fh.write("".join(typical_function(i, constant) for i in range(functions)))
        names.append(name)
    importlib.invalidate_caches()
    return names


def import_all(names):
    start = time.perf_counter_ns()
    for name in names:
        importlib.import_module(name)
    return (time.perf_counter_ns() - start) / len(names)


def hook_installed(on: bool):
    if on and imports._finder not in sys.meta_path:
        sys.meta_path.insert(0, imports._finder)
    if not on and imports._finder in sys.meta_path:
        sys.meta_path.remove(imports._finder)


def unwatched(directory, rounds, per_round):
    # other names are watched, as in a process with pending patches
    imports.watch("bench", {f"lp_watched_elsewhere_{i}" for i in range(50)}, _nothing)
    # the decline, next to a call of a method that does nothing
    empty = _Empty()
    decline_ns = _per_call(lambda: imports._finder.find_spec("json.decoder"))
    empty_ns = _per_call(lambda: empty.find_spec("json.decoder"))
    with_hook, without = [], []
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            hook_installed(on)
            (with_hook if on else without).append(import_all(fresh_modules(directory, per_round)))
    hook_installed(True)
    imports.watch("bench", (), _nothing)
    return {"decline_ns_per_call": round(decline_ns, 1), "empty_method_call_ns": round(empty_ns, 1),
            "import_us_with_hook_p50": round(statistics.median(with_hook) / 1e3, 1),
            "import_us_without_hook_p50": round(statistics.median(without) / 1e3, 1),
            "rounds": rounds, "modules_per_round": per_round}


def _nothing(name, module):
    pass


class _Empty:
    def find_spec(self, name, path=None, target=None):
        return None


def _per_call(fn, number=200_000):
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e9


def watched(directory, functions, reps):
    """Import a module whose pending part switches every function, against
    importing the same kind of module with nothing pending."""
    engine = livepatch.Engine()
    plain, patched, applied = [], [], []
    for _ in range(reps):
        base = "".join(typical_function(i, 1) for i in range(functions))
        new = "".join(typical_function(i, 2) for i in range(functions))
        name, other = fresh_modules(directory, 2, functions)
        module = importlib.import_module(name)
        patch = patch_from_source(f"IMP-{name}", name, new, base_source=base)
        del sys.modules[name], module
        engine.apply(patch)
        for which, target, out in ((0, other, plain), (1, name, patched)):
            start = time.perf_counter_ns()
            importlib.import_module(target)
            out.append(time.perf_counter_ns() - start)
        assert engine.status()["pending"] == []
        engine.rollback()
        # the same patch applied to the loaded module, for comparison
        start = time.perf_counter_ns()
        engine.apply(patch)
        applied.append(time.perf_counter_ns() - start)
        engine.rollback()
    return {"functions": functions, "reps": reps,
            "import_ms_plain_p50": round(statistics.median(plain) / 1e6, 3),
            "import_ms_with_pending_part_p50": round(statistics.median(patched) / 1e6, 3),
            "apply_ms_to_the_loaded_module_p50": round(statistics.median(applied) / 1e6, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=300)
    ap.add_argument("--functions", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.per_round, args.functions, args.reps = 2, 50, [10], 3
    sys.dont_write_bytecode = True  # every import compiles, as a first import in a service does
    directory = tempfile.mkdtemp(prefix="lpbench-imports-")
    sys.path.insert(0, directory)
    # watched first: the unwatched part imports thousands of modules, and a
    # commit's heap scan grows with the heap
    watched_results = [watched(directory, n, args.reps) for n in args.functions]
    result = {"machine": machine(), "unwatched": unwatched(directory, args.rounds, args.per_round),
              "watched": watched_results}
    path = write_result("import-hook", result, args.quick)
    u = result["unwatched"]
    print(f"unwatched import: finder declines in {u['decline_ns_per_call']} ns per call (a method that does "
          f"nothing: {u['empty_method_call_ns']} ns); import of a fresh module "
          f"p50 {u['import_us_with_hook_p50']} us with the hook, {u['import_us_without_hook_p50']} us without")
    for w in result["watched"]:
        print(f"watched import, {w['functions']} functions: p50 {w['import_ms_with_pending_part_p50']} ms "
              f"with the pending part committed, {w['import_ms_plain_p50']} ms plain; "
              f"apply to the loaded module {w['apply_ms_to_the_loaded_module_p50']} ms")
    print(path)


if __name__ == "__main__":
    main()
