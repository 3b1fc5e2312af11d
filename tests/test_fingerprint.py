import subprocess
import sys
import textwrap

import pytest

from livepatch import fingerprint

SRC = textwrap.dedent('''
    def f(a, b=2, *, c=3):
        try:
            x = [i * 2 for i in range(a)]
        except ValueError:
            return frozenset({1.5, "a", None, (1, 2)})
        def inner():
            return x
        return inner
''')


def _compile(src, filename="m.py"):
    ns = {}
    exec(compile(src, filename, "exec"), ns)
    return ns["f"]


def test_independent_of_lines_filename_and_identity():
    f = _compile(SRC)
    moved = _compile("\n\n\n# comment\n" + SRC, "elsewhere/other.py")
    assert f.__code__ is not moved.__code__
    assert fingerprint(f) == fingerprint(moved) == fingerprint(f.__code__)


def test_detects_constant_instruction_and_nested_changes():
    base = fingerprint(_compile(SRC))
    assert fingerprint(_compile(SRC.replace("i * 2", "i * 3"))) != base
    assert fingerprint(_compile(SRC.replace("i * 2", "i + 2"))) != base
    assert fingerprint(_compile(SRC.replace("return x", "return -x"))) != base  # nested code only
    assert fingerprint(_compile(SRC.replace("b=2, *, c=3", "b=2, c=3"))) != base  # argument counts
    assert fingerprint(_compile(SRC.replace("x = [", "y = [").replace("return x", "return y"))) != base


def test_identical_in_separate_processes_despite_hash_randomisation(tmp_path):
    script = tmp_path / "fp.py"
    script.write_text(SRC + "\nfrom livepatch import fingerprint\nprint(fingerprint(f))\n")
    outs = set()
    for seed in ("1", "2", "3"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        outs.add(subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert len(outs) == 1
    assert outs == {fingerprint(_compile(SRC))}


def test_accepts_methods_and_rejects_builtins():
    class C:
        def m(self):
            return 1
    assert fingerprint(C().m) == fingerprint(C.m)
    try:
        fingerprint(len)
    except TypeError as exc:
        assert "no Python code object" in str(exc)
    else:
        raise AssertionError("builtin accepted")


def test_the_fast_decoder_handles_real_code_and_agrees_with_dis():
    """The co_code decoder (not the slow bytecode-package path) is what runs
    on 3.11-3.13: its jump targets match dis.findlabels for real modules."""
    import asyncio.base_events
    import json.decoder
    from livepatch.build import code_tree
    fp = sys.modules["livepatch.fingerprint"]
    codes = []
    for mod in (asyncio.base_events, json.decoder):
        with open(mod.__file__) as fh:
            tree = code_tree(compile(fh.read(), mod.__file__, "exec"))
        codes += [c for group in tree.values() for c in group]
    assert len(codes) > 100
    assert all(fp._decode(c) is not None for c in codes)


def test_live_bytecode_is_rebuilt_exactly_without_caching_co_code(monkeypatch):
    """Reading co_code caches a bytes copy on the code object for good; the
    fingerprint rebuilds the same bytes from the specialised live copy."""
    import gc
    import json
    import tracemalloc
    import types
    fp = sys.modules["livepatch.fingerprint"]
    for i in range(300):  # let the adaptive interpreter specialise some code
        json.loads(json.dumps({"a": [i, 2.5, "x"], "b": None}))
    functions = [o for o in gc.get_objects() if isinstance(o, types.FunctionType)]
    specialised = 0
    for f in functions:
        code = f.__code__
        rebuilt = fp._rebuilt_co_code(code)
        assert rebuilt == code.co_code, f.__qualname__
        specialised += code._co_code_adaptive != rebuilt
    assert specialised > 10  # the comparison above really exercised the deopt tables

    def fresh_code(name):
        ns = {}
        exec(compile(SRC.replace("def f(", f"def {name}("), f"{name}.py", "exec"), ns)
        return ns[name].__code__

    def kept_by_fingerprint(code):
        # only allocations made from the fingerprint module count: the test
        # process has other threads allocating meanwhile
        only_fp = [tracemalloc.Filter(True, fp.__file__)]
        # a digest table with room for the entry fingerprint() adds (taken
        # out again below): the digest kept for the next apply is not what
        # this measures, nor the table growing
        monkeypatch.setattr(fp, "_known", {-1: None})
        del fp._known[-1]
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces(only_fp)
            fingerprint(code)
            fp._known.pop(id(code))
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces(only_fp)
        finally:
            tracemalloc.stop()
        return sum(stat.size_diff for stat in after.compare_to(before, "filename"))

    fingerprint(fresh_code("warm_up"))
    kept_rebuilt = kept_by_fingerprint(fresh_code("live"))
    monkeypatch.setattr(fp, "_rebuild_trusted", False)  # read co_code the way CPython offers
    code = fresh_code("read_directly")
    kept_reading = kept_by_fingerprint(code)
    assert kept_reading >= len(code.co_code)  # the measurement sees the cached copy
    assert kept_rebuilt < len(code.co_code) // 2


def test_instrumented_code_falls_back_to_cpython(tmp_path):
    """With sys.monitoring instrumenting a function (3.12+: a debugger or a
    coverage tool), the original instructions are hidden; the fingerprint
    must still be the one of the plain code."""
    if not hasattr(sys, "monitoring"):
        pytest.skip("sys.monitoring is new in 3.12")
    f = _compile(SRC)
    plain = fingerprint(_compile(SRC))
    mon = sys.monitoring
    tool = mon.PROFILER_ID
    mon.use_tool_id(tool, "livepatch-test")
    try:
        mon.set_local_events(tool, f.__code__, mon.events.LINE | mon.events.PY_START)
        f(3)
        fp = sys.modules["livepatch.fingerprint"]
        assert fp._rebuilt_co_code(f.__code__) is None  # instrumented: not rebuilt here
        assert fingerprint(f) == plain
    finally:
        mon.set_local_events(tool, f.__code__, 0)
        mon.free_tool_id(tool)


def test_a_live_code_object_is_encoded_once_and_its_digest_swept_after_it(monkeypatch):
    """An apply checks its targets' baselines from the digests kept per live
    code object; a code object that dies leaves a dead entry, which is never
    taken for a new code object at the same address and is swept once the
    table has grown. The weak reference runs no callback: that would be
    Python code of livepatch run wherever any code object dies, in the
    service's threads and at exit."""
    import gc
    import weakref
    fp = sys.modules["livepatch.fingerprint"]
    ns = {}
    exec(compile(SRC, "kept.py", "exec"), ns)
    code = ns["f"].__code__
    first = fingerprint(code)
    ref, digest = fp._known[id(code)]
    assert digest == first and ref() is code
    assert weakref.getweakrefcount(code) == 1 and ref.__callback__ is None
    encoded = []
    real = fp._encode_code
    monkeypatch.setattr(fp, "_encode_code", lambda c: encoded.append(c) or real(c))
    assert fingerprint(ns["f"]) == first
    assert encoded == []
    key = id(code)
    del ns, code, ref
    gc.collect()
    assert fp._known[key][0]() is None  # dead, not yet swept
    monkeypatch.setattr(fp, "_sweep_at", [len(fp._known)])
    other = {}
    exec(compile(SRC.replace("1", "2"), "other.py", "exec"), other)
    fingerprint(other["f"])  # the table is full: dead entries go first
    assert key not in fp._known or fp._known[key][0]() is not None
    assert all(r() is not None for r, _ in fp._known.values())
    assert fp._sweep_at[0] >= 1024
