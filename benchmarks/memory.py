"""Memory cost of patching: bytes the patch stack retains per patched
function (previous code plus records), measured with tracemalloc and USS,
and RSS over many apply/rollback cycles (it must stay flat)."""

import argparse
import gc
import sys
import tracemalloc

import psutil

from common import machine, make_module, write_result

import livepatch
from livepatch.build import patch_from_source


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
    applied_bytes = tracemalloc.get_traced_memory()[0]
    uss_applied = proc.memory_full_info().uss
    # Dropping the stack frees exactly what it retained: previous code and records.
    stack = engine._stack
    engine._stack = []
    old_code_bytes = 0
    for p in stack:
        for s in p.switches:
            old_code_bytes += sys.getsizeof(s.old)
    del stack, p, s
    gc.collect()
    dropped_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_fn = (applied_bytes - dropped_bytes) / n
    return {
        "functions": n,
        "retained_bytes_per_function": round(per_fn, 1),
        "old_code_getsizeof_per_function": round(old_code_bytes / n, 1),
        # pymalloc keeps freed arenas, so USS is read as growth over the apply
        "uss_growth_on_apply_per_function": round((uss_applied - uss_before) / n, 1),
    }


def cycles(count: int):
    module, base, new = make_module(10, "lp_mem_cycles")
    patch = patch_from_source("CYC", module.__name__, new, base_source=base)
    proc = psutil.Process()
    samples = []
    for i in range(count):
        livepatch.apply(patch)
        livepatch.rollback()
        if i % max(1, count // 10) == 0 or i == count - 1:
            gc.collect()
            info = proc.memory_full_info()
            samples.append({"cycle": i + 1, "rss": info.rss, "uss": info.uss})
    # history grows by design (two small entries per cycle); report it apart
    history = len(livepatch.status()["history"])
    return {"cycles": count, "samples": samples, "history_entries": history,
            "rss_growth_after_warmup_bytes": samples[-1]["rss"] - samples[1]["rss"] if len(samples) > 1 else 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 1000 if args.quick else 10_000
    count = 100 if args.quick else 1000
    r = retained(n)
    print(f"{n} patched functions: {r['retained_bytes_per_function']} B retained per function (tracemalloc), "
          f"USS growth on apply {r['uss_growth_on_apply_per_function']} B per function; old code object alone {r['old_code_getsizeof_per_function']} B")
    c = cycles(count)
    print(f"{count} apply/rollback cycles: RSS {c['samples'][0]['rss'] / 2**20:.1f} -> {c['samples'][-1]['rss'] / 2**20:.1f} MiB, "
          f"growth after warm-up {c['rss_growth_after_warmup_bytes'] / 1024:.0f} KiB ({c['history_entries']} history entries)")
    path = write_result("memory", {"machine": machine(), "params": {"functions": n, "cycles": count},
                                   "retained": r, "cycles": c}, args.quick)
    print("results:", path)


if __name__ == "__main__":
    sys.exit(main())
