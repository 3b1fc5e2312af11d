import importlib
import itertools
import signal
import sys
import textwrap
import types

import pytest

import livepatch
from livepatch.build import patch_from_source

_counter = itertools.count()

# Started in the background by a shell without job control (`cmd &` in a
# script), the suite inherits SIGINT ignored, and so would every command it
# starts: the tests of Ctrl-C on the CLI need it delivered as a terminal does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """Agents started by a test (and the services it starts) keep their
    state in a directory of that test only, never in the real home."""
    monkeypatch.setenv("LIVEPATCH_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def engine():
    """A fresh patch stack per test (the process-wide one is livepatch.engine)."""
    return livepatch.Engine()


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a real module file, import it, and return (module, source)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def make(source: str):
        name = f"lp_fixture_{next(_counter)}"
        source = textwrap.dedent(source)
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        created.append(name)
        return module, source

    yield make
    for name in created:
        sys.modules.pop(name, None)


def patch_of(module, source, new_source, patch_id="HP-1", **kw):
    return patch_from_source(patch_id, module.__name__, textwrap.dedent(new_source), base_source=source, **kw)


def snapshot(module):
    """Everything a patch could change in a module: functions' code and
    defaults (also inside classes and static/class methods), and the module
    namespace by identity."""
    state = {"globals": dict(vars(module))}

    def record(prefix, ns):
        for name, value in list(ns.items()):
            for f in _functions(value):
                state[prefix + name + ":" + f.__qualname__] = (f.__code__, f.__defaults__, f.__kwdefaults__)
            if isinstance(value, type) and value.__module__ == module.__name__:
                state[prefix + name + ".__dict__"] = dict(vars(value))
                record(prefix + name + ".", dict(vars(value)))

    record("", dict(vars(module)))
    return state


def _functions(value):
    seen = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, types.FunctionType):
            seen.append(v)
            if hasattr(v, "__wrapped__"):
                stack.append(v.__wrapped__)
        elif isinstance(v, (staticmethod, classmethod)):
            stack.append(v.__func__)
        elif isinstance(v, property):
            stack += [x for x in (v.fget, v.fset, v.fdel) if x]
    return seen


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after.keys() == before.keys()
    for key in before:
        if key == "globals" or key.endswith(".__dict__"):
            assert after[key].keys() == before[key].keys(), key
            for name in before[key]:
                assert after[key][name] is before[key][name], (key, name)
        else:
            for a, b in zip(after[key], before[key]):
                assert a is b, key


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An operator's key pair made by `livepatch keygen`, and a trust
    directory holding its public key, as the README's tour sets them up."""
    import shutil
    from live import cli
    d = tmp_path_factory.mktemp("trust")
    assert cli("keygen", str(d / "ops")).returncode == 0
    trust = d / "trusted"
    trust.mkdir()
    shutil.copy(d / "ops.pub", trust / "ops.pub")
    return {"key": str(d / "ops.key"), "pub": str(d / "ops.pub"), "trust": str(trust)}


@pytest.fixture(scope="module")
def docs_bundle(keys, tmp_path_factory):
    """The demo's path traversal fix, signed: HP-DOCS, security."""
    import os
    from live import cli
    patches = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_apps", "http_api", "patches")
    path = str(tmp_path_factory.mktemp("bundles") / "docs.lpb")
    r = cli("build", os.path.join(patches, "baseline"), os.path.join(patches, "fix-path-traversal"), "-o", path,
            "--id", "HP-DOCS", "--key", keys["key"], "--name", "inventory", "--version", "1.0",
            "--classification", "security")
    assert r.returncode == 0, r.stderr
    return path
