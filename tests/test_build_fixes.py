"""A new function imported by another module of the same bundle, and
changed comprehensions and generator expressions: both build and apply."""

import pytest

from livepatch.builder import BuildRefused, build

from release_trees import manifest_of, round_trip, write_release

A = "def f(x):\n    return x\n"
B = """\
from .a import f


def g(xs):
    return [f(x) for x in xs]


def h(xs):
    return sum(x for x in xs)


def k(xs):
    return {x: {y for y in xs} for x in xs}
"""
A_NEW = A + "\n\ndef clean(x):\n    return x * 2\n"
B_NEW = (B.replace("from .a import f", "from .a import f, clean")
         .replace("[f(x) for x in xs]", "[clean(f(x)) for x in xs]")
         .replace("sum(x for x in xs)", "sum(x + 1 for x in xs)")
         .replace("{y for y in xs}", "{y * 2 for y in xs}"))
PROBE = "[sys.modules['app.b'].g([1, 2]), sys.modules['app.b'].h([1, 2]), sorted(sys.modules['app.b'].k([1])[1])]"


def _release(tmp_path):
    return write_release(tmp_path, {"app/__init__.py": "", "app/a.py": A, "app/b.py": B},
                         {"app/__init__.py": "", "app/a.py": A_NEW, "app/b.py": B_NEW})


def test_comprehensions_travel_inside_their_function_and_the_new_import_resolves(tmp_path):
    data, summary = build(*_release(tmp_path), patch_id="HP-CX")
    manifest = manifest_of(data)
    # the comprehension code objects are no targets of their own (3.11 has
    # <listcomp>, 3.12 inlines it; every version has <genexpr>)
    assert sorted(t["target"] for t in manifest["targets"]) == ["app.b:g", "app.b:h", "app.b:k"]
    assert sorted((g["name"], g["kind"]) for g in manifest["globals"]) == [
        ("app.a:clean", "function"), ("app.b:clean", "import"), ("app.b:f", "import")]
    assert summary["targets"] == {"app.b": ["g", "h", "k"]}
    out = round_trip(tmp_path, data, ["app.b"], PROBE)
    assert out == {"before": [[1, 2], 3, [1]], "applied": [[2, 4], 5, [2]], "rolled_back": [[1, 2], 3, [1]]}


def test_the_imported_new_function_is_the_one_added_to_its_module(tmp_path):
    data, _ = build(*_release(tmp_path), patch_id="HP-CX")
    probe = "[sys.modules['app.b'].clean is sys.modules['app.a'].clean, sys.modules['app.b'].clean.__module__]"
    out = round_trip(tmp_path, data, ["app.b"], probe)
    assert out["applied"] == [True, "app.a"]
    assert out["rolled_back"].startswith("AttributeError")  # both names are gone again


def test_a_failing_import_of_the_bundle_still_changes_nothing(tmp_path):
    base, new = write_release(tmp_path, {"app/__init__.py": "", "app/a.py": A, "app/b.py": B},
                              {"app/__init__.py": "", "app/a.py": A,
                               "app/b.py": B.replace("from .a import f", "from .a import f, missing")
                               .replace("[f(x) for x in xs]", "[missing(x) for x in xs]")})
    data, _ = build(base, new, patch_id="HP-CX")
    out = round_trip(tmp_path, data, ["app.b"], PROBE)
    assert "cannot import name 'missing'" in out["apply_error"] and "nothing was changed" in out["apply_error"]
    assert out["rolled_back"] == out["before"] == [[1, 2], 3, [1]]


GUARDED = """\
try:
    import hmac
    HAS_CRYPTO = True
except ImportError:
    HAS_CRYPTO = False

if HAS_CRYPTO:
    class Algorithm:
        def accepts(self, name):
            return name in ("HS256", "none")
"""


def test_a_method_changed_inside_a_module_level_if_is_a_function_change(tmp_path):
    # as in PyJWT, whose algorithms are defined under `if has_crypto:`
    fixed = GUARDED.replace('("HS256", "none")', '("HS256",)')
    base, new = write_release(tmp_path, {"app/__init__.py": "", "app/algos.py": GUARDED},
                              {"app/__init__.py": "", "app/algos.py": fixed})
    data, summary = build(base, new, patch_id="HP-IF")
    assert [t["target"] for t in manifest_of(data)["targets"]] == ["app.algos:Algorithm.accepts"]
    out = round_trip(tmp_path, data, ["app.algos"], "sys.modules['app.algos'].Algorithm().accepts('none')")
    assert out == {"before": True, "applied": False, "rolled_back": True}


def test_a_changed_condition_of_a_module_level_if_is_refused_where_it_would_drop_a_live_class(tmp_path):
    base, new = write_release(tmp_path, {"app/__init__.py": "", "app/algos.py": GUARDED},
                              {"app/__init__.py": "", "app/algos.py": GUARDED.replace("if HAS_CRYPTO:", "if not HAS_CRYPTO:")})
    data, _ = build(base, new, patch_id="HP-IF")  # the statement only binds names: it runs at apply time
    [entry] = manifest_of(data)["globals"]
    assert (entry["name"], entry["kind"], entry["keeps"]) == ("app.algos:Algorithm", "statement", ["Algorithm"])
    out = round_trip(tmp_path, data, ["app.algos"], "sys.modules['app.algos'].Algorithm().accepts('none')")
    assert out["apply_error"].endswith("line 7: the statement no longer defines Algorithm in this process, which "
                                       "has it (the live one would stay); nothing was changed"), out
    assert out["before"] is True and out["rolled_back"] is True
