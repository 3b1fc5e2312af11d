"""Memory cost of patching: bytes a patch retains per patched function
(previous code, records, the digests kept per live code object and the
patched source kept for tracebacks),
measured with tracemalloc and USS, and RSS over many apply/rollback cycles
in a fresh small process (it must stay flat: a large process hides growth
in memory it freed before)."""

import argparse
import gc
import importlib
import json
import linecache
import os
import subprocess
import sys
import tracemalloc

import psutil

from common import machine, make_module, write_result

import livepatch
from livepatch.build import patch_from_source

fingerprints = importlib.import_module("livepatch.fingerprint")  # the package's name for it is the function


def retained(n: int):
    # traced from before the import, so that freeing the old code counts
    tracemalloc.start()
    module, base, new = make_module(n, f"lp_mem_{n}")
    patch = patch_from_source("MEM", module.__name__, new, base_source=base)
    proc = psutil.Process()
    engine = livepatch.Engine()
    gc.collect()
    uss_before = proc.memory_full_info().uss
    engine.apply(patch)
    del patch
    gc.collect()
    # The digests kept per live code object count as the patch's while its
    # code lives: dead ones (the build's own code) go now, the previous
    # code's once the stack lets go of it below.
    fingerprints._sweep()
    applied_bytes = tracemalloc.get_traced_memory()[0]
    uss_applied = proc.memory_full_info().uss
    # Dropping the stack, and the sources it put in linecache, frees exactly
    # what it retained: previous code, records and the source copy.
    stack = engine._stack
    engine._stack = []
    source_bytes = 0
    for p in stack:
        for filename in p.sources:
            source_bytes += sum(map(sys.getsizeof, linecache.cache.get(filename, ((), (), ()))[2]))
            linecache.cache.pop(filename, None)
    old_code_bytes = 0
    for p in stack:
        for s in p.switches:
            old_code_bytes += sys.getsizeof(s.old)
    del stack, p, s
    gc.collect()
    fingerprints._sweep()
    dropped_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_fn = (applied_bytes - dropped_bytes) / n
    return {
        "functions": n,
        "retained_bytes_per_function": round(per_fn, 1),
        "old_code_getsizeof_per_function": round(old_code_bytes / n, 1),
        "source_lines_getsizeof_per_function": round(source_bytes / n, 1),
        # pymalloc keeps freed arenas, so USS is read as growth over the apply
        "uss_growth_on_apply_per_function": round((uss_applied - uss_before) / n, 1),
    }


def cycles(count: int, functions: int):
    """In this (fresh) process: RSS over `count` apply/rollback cycles."""
    module, base, new = make_module(functions, f"lp_mem_cycles_{functions}")
    patch = patch_from_source("CYC", module.__name__, new, base_source=base)
    proc = psutil.Process()
    samples = []
    warmup = max(1, count // 10)
    for i in range(count):
        livepatch.apply(patch)
        livepatch.rollback()
        if i + 1 == warmup or (i + 1) % warmup == 0 or i == count - 1:
            gc.collect()
            info = proc.memory_full_info()
            samples.append({"cycle": i + 1, "rss": info.rss, "uss": info.uss})
    history = len(livepatch.status()["history"])
    growth = samples[-1]["rss"] - samples[0]["rss"]
    return {"cycles": count, "functions": functions, "samples": samples, "history_entries": history,
            "rss_growth_after_warmup_bytes": growth,
            "rss_growth_per_cycle_bytes": round(growth / max(1, count - warmup), 2)}


def cycles_in_fresh_process(count: int, functions: int) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-cycles", str(count), str(functions)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        sys.exit(f"memory cycles failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--functions", type=int, help="patched functions for the retained bytes (default 10,000; --quick 1,000)")
    ap.add_argument("--cycles", type=int, help="apply/rollback cycles per fresh process (default 10,000; --quick 100)")
    ap.add_argument("--child-cycles", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_cycles:
        print(json.dumps(cycles(*args.child_cycles)))
        return 0
    n = args.functions or (1000 if args.quick else 10_000)
    count = args.cycles or (100 if args.quick else 10_000)
    r = retained(n)
    print(f"{n} patched functions: {r['retained_bytes_per_function']} B retained per function (tracemalloc, "
          f"source copy included: its lines alone {r['source_lines_getsizeof_per_function']} B), "
          f"USS growth on apply {r['uss_growth_on_apply_per_function']} B per function; old code object alone {r['old_code_getsizeof_per_function']} B")
    runs = [cycles_in_fresh_process(count, functions) for functions in (10, 100)]
    for c in runs:
        print(f"{count} apply/rollback cycles of {c['functions']} functions in a fresh process: RSS "
              f"{c['samples'][0]['rss'] / 2**20:.1f} -> {c['samples'][-1]['rss'] / 2**20:.1f} MiB after warm-up, "
              f"{c['rss_growth_per_cycle_bytes']} B per cycle ({c['history_entries']} history entries kept)")
    path = write_result("memory", {"machine": machine(), "params": {"functions": n, "cycles": count},
                                   "retained": r, "cycles": runs[0], "cycles_by_size": runs}, args.quick)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
