"""A live demonstration of the engine: a multi-threaded pricing service keeps
serving while a fix is patched in, then rolled back, with zero failed calls.

Run with `make demo` (sets everything up) or `python demo_apps/engine_demo.py`."""

import os
import sys
import tempfile
import threading
import time

import livepatch
from livepatch.build import patch_from_source

SERVICE = '''
"""pricing: the service's code as it was deployed (baseline)."""
import decimal

def line_total(price, qty):
    # BUG: float arithmetic and truncation lose cents: 0.29 * 3 -> 0.86
    return int(price * qty * 100) / 100

def order_total(lines):
    return sum(line_total(p, q) for p, q in lines)
'''

FIX = SERVICE.replace(
    '''    # BUG: float arithmetic and truncation lose cents: 0.29 * 3 -> 0.86
    return int(price * qty * 100) / 100''',
    '''    cents = decimal.Decimal(str(price)) * qty * 100
    return float(cents.quantize(decimal.Decimal(1), decimal.ROUND_HALF_UP) / 100)''')


def main():
    workdir = tempfile.mkdtemp(prefix="livepatch-demo-")
    with open(os.path.join(workdir, "pricing.py"), "w") as fh:
        fh.write(SERVICE)
    sys.path.insert(0, workdir)
    import pricing

    stop = threading.Event()
    served = [0] * 4
    failed = [0]

    def worker(i):
        order = [(0.29, 3), (1.10, 1)]
        while not stop.is_set():
            try:
                pricing.order_total(order)
                served[i] += 1
            except Exception:
                failed[0] += 1
            time.sleep(0.0002)

    threads = [threading.Thread(target=worker, args=(i,), name=f"request-worker-{i}") for i in range(4)]
    for t in threads:
        t.start()
    try:
        print(f"service running with {len(threads)} worker threads")
        print(f"  before: line_total(0.29, 3) = {pricing.line_total(0.29, 3)}   (wrong: should be 0.87)")
        time.sleep(0.5)

        patch = patch_from_source("HP-DEMO-1", "pricing", FIX, base_source=SERVICE)
        print(f"patch HP-DEMO-1 built: {[c.target for c in patch.changes]}")
        result = livepatch.apply(patch)
        print(f"  applied live: commit pause {result.pause_ns / 1000:.1f} us, {result.attempts} attempt(s), "
              f"{result.functions} function object(s) switched")
        print(f"  after:  line_total(0.29, 3) = {pricing.line_total(0.29, 3)}")
        time.sleep(0.5)

        result = livepatch.rollback()
        print(f"  rolled back: commit pause {result.pause_ns / 1000:.1f} us")
        print(f"  again:  line_total(0.29, 3) = {pricing.line_total(0.29, 3)}")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"requests served during the run: {sum(served)}, failed: {failed[0]}")
    history = livepatch.status()["history"]
    print("history:", ", ".join(f"{h['action']} {h['patch']} {h['outcome']}" for h in history))
    return 1 if failed[0] else 0


if __name__ == "__main__":
    sys.exit(main())
