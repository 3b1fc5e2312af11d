"""Shared pieces of the benchmarks: generated target modules, percentiles,
machine description, result files."""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import psutil

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def typical_function(i: int, constant: int) -> str:
    """A 20-line function of the kind services are made of."""
    return f'''
def handler_{i}(request, limit=10, *, strict=False):
    """Validate and price an order line ({i})."""
    items = request.get("items", [])
    if not isinstance(items, list):
        raise ValueError("items must be a list")
    total = 0
    for item in items[:limit]:
        qty = int(item.get("qty", 1))
        price = float(item.get("price", 0.0))
        if strict and qty <= 0:
            raise ValueError("bad quantity")
        total += qty * price
    discount = request.get("discount", 0)
    if discount:
        total = total * (100 - discount) / 100
    result = {{"total": round(total, 2), "count": len(items)}}
    result["tag"] = {constant}
    return result
'''


def make_module(n: int, name: str):
    """Import a fresh module with n typical functions; return it with its
    baseline and patched sources."""
    base = "".join(typical_function(i, 1) for i in range(n))
    new = "".join(typical_function(i, 2) for i in range(n))
    return import_source(name, base), base, new


def import_source(name: str, source: str):
    """Import `source` as a module called `name`, from a file in a private
    directory of its own (the engine reads a module's source from its file)."""
    d = tempfile.mkdtemp(prefix="lpbench-")
    with open(os.path.join(d, name + ".py"), "w") as fh:
        fh.write(source)
    sys.path.insert(0, d)
    return __import__(name)


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summary(values):
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


def machine():
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(kind: str, data: dict, quick: bool) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    tag = f"{kind}-py{sys.version_info.major}.{sys.version_info.minor}{'-quick' if quick else ''}.json"
    path = os.path.join(RESULTS, tag)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
    return path


def rows_per_heap(script: str, kind: str, heaps: list, child_args: list, print_row) -> list:
    """Run `script --child --heap N *child_args` in a fresh process per heap
    size (a heap once built stays in its process); each row printed as it
    comes, with the load average after it."""
    rows = []
    for heap in heaps:
        cmd = [sys.executable, os.path.abspath(script), "--child", "--heap", str(heap), *child_args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"{kind} benchmark at {heap} objects failed:\n{done.stderr}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["load_average"] = os.getloadavg()
        rows.append(row)
        print_row(row)
    return rows
