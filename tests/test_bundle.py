"""Bundles: builder outputs and refusals, the signed format, loading into the
engine in a real process, tamper and fuzz resistance."""

import glob
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundle_cases import BASE, REFUSED, SUPPORTED, _edit, write_case
from livepatch import bundle as fmt
from livepatch.builder import BuildRefused, build
from livepatch.patch import PYTHON_TAG
from livepatch.signing import SignatureError, generate, load_private, load_trusted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate(str(d / "release"))
    other = tmp_path_factory.mktemp("other")
    generate(str(other / "intruder"))
    return {"private": load_private(str(d / "release.key")), "trusted": load_trusted(str(d)),
            "dir": str(d), "intruder": load_private(str(other / "intruder.key"))}


@pytest.mark.parametrize("case", sorted(SUPPORTED))
def test_builder_emits_exactly_the_expected_changes(case, tmp_path):
    patched, targets, globals_, _ = SUPPORTED[case]
    base, new = write_case(str(tmp_path), patched)
    data, summary = build(base, new, patch_id="HP-T")
    manifest = fmt.read(data, allow_unsigned=True).manifest
    assert sorted(t["target"] for t in manifest["targets"]) == sorted(targets)
    assert sorted(g["name"] for g in manifest["globals"]) == sorted(globals_)
    for t in manifest["targets"]:
        assert t["code"][PYTHON_TAG]["baseline"] != t["code"][PYTHON_TAG]["patched"] or t["defaults"]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_builder_refuses_with_category_and_file_line(case, tmp_path):
    patched, category = REFUSED[case]
    base, new = write_case(str(tmp_path), patched)
    with pytest.raises(BuildRefused) as info:
        build(base, new, patch_id="HP-T")
    cats = [p.category for p in info.value.problems]
    assert category in cats, info.value
    problem = info.value.problems[cats.index(category)]
    assert problem.message.startswith("core.py"), problem  # names the file (and line where there is one)
    assert not os.listdir(tmp_path / "base" / "app" / "..") == []


def test_a_module_the_baseline_lacks_is_carried_in_the_bundle(tmp_path):
    base, new = write_case(str(tmp_path), SUPPORTED["function-body"][0],
                           extra_new_files=[("extra.py", "def f():\n    return 1\n")])
    data, summary = build(base, new, patch_id="HP-T")
    assert summary["new_modules"] == ["app.extra"]
    assert list(fmt.read(data, allow_unsigned=True).manifest["new_modules"]) == ["app.extra"]


def test_allow_overrides_a_decorator_refusal_and_records_it(tmp_path):
    base, new = write_case(str(tmp_path), REFUSED["decorator-changed"][0])
    data, summary = build(base, new, patch_id="HP-T", allow=["decorator"])
    manifest = fmt.read(data, allow_unsigned=True).manifest
    assert [o["category"] for o in manifest["overrides"]] == ["refused:decorator"]
    assert [t["target"] for t in manifest["targets"]] == ["app.core:handler"]
    with pytest.raises(BuildRefused, match="only decorator, statement"):
        build(base, new, patch_id="HP-T", allow=["free-vars"])


def test_unpacked_wheel_trees_and_dist_metadata(tmp_path):
    for side, src in (("base", BASE), ("new", SUPPORTED["function-body"][0])):
        root = tmp_path / side
        (root / "app").mkdir(parents=True)
        (root / "app" / "__init__.py").write_text("")
        (root / "app" / "core.py").write_text(src)
        (root / "app-1.4.2.dist-info").mkdir()
        (root / "app-1.4.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: app\nVersion: 1.4.2\n\n")
    data, summary = build(str(tmp_path / "base"), str(tmp_path / "new"), patch_id="HP-W")
    assert summary["baseline"] == {"name": "app", "version": "1.4.2"}
    assert summary["targets"] == {"app.core": ["price"]}


COMBINED = _edit(
    ("import json\n", "import json\nimport html\n"),
    ("RATE = 0.2", "RATE = 0.25"),
    ("return json.dumps(obj)", "return _wrap(html.escape(json.dumps(obj)))"),
    ("def price(x, digits=2):", "def price(x, digits=0):"),
    ("@register", "def _wrap(s):\n    return '[' + s + ']'\n\n\n@register"),
)

ROUND_TRIP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import app.core as core, livepatch
from livepatch.bundle import load_bundle
from livepatch.signing import load_trusted

def observe():
    c = core.Cart(); c.items = [10]
    return [core.render("<b>"), core.price(2.345), c.total(), core.RATE]

out = {"before": observe()}
patch = load_bundle(sys.argv[2], load_trusted(sys.argv[3]))
try:
    1 / 0 if False else core.render(object())
except TypeError as exc:
    import traceback
    out["traceback_before"] = "".join(traceback.format_exception(exc))
r = livepatch.apply(patch)
out["applied"] = observe()
try:
    core.render(object())
except TypeError as exc:
    import traceback
    out["traceback"] = "".join(traceback.format_exception(exc))
livepatch.rollback()
out["rolled_back"] = observe()
out["helper_left"] = hasattr(core, "_wrap")
out["pause_ns"] = r.pause_ns
print(json.dumps(out))
"""


def test_round_trip_build_load_apply_rollback_in_a_real_process(tmp_path, keys):
    base, new = write_case(str(tmp_path), COMBINED)
    data, _ = build(base, new, patch_id="HP-RT", private_key=keys["private"], name="app", version="1.0")
    path = tmp_path / "hp.lpb"
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, os.path.dirname(base), str(path), keys["dir"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"] == ['"<b>"', 2.35, 12.0, 0.2]
    assert out["applied"] == ['[&quot;&lt;b&gt;&quot;]', 2.0, 12.5, 0.25]
    assert out["rolled_back"] == out["before"]
    assert out["helper_left"] is False
    assert "[livepatch HP-RT]" in out["traceback"] and "html.escape(json.dumps(obj))" in out["traceback"]


def _other_python():
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    for venv in sorted(glob.glob(os.path.join(ROOT, ".venv-3.*"))):
        version = venv.rsplit("-", 1)[1]
        python = os.path.join(venv, "bin", "python")
        if version != mine and os.path.exists(os.path.join(venv, ".ready")):
            return python, version
    return None, None


def test_bundle_for_another_python_is_refused_with_what_it_carries(tmp_path):
    python, version = _other_python()
    if python is None:
        pytest.skip("no second Python venv here (make test creates one per version)")
    base, new = write_case(str(tmp_path), SUPPORTED["function-body"][0])
    data, summary = build(base, new, patch_id="HP-V", pythons=[python])
    other_tag = "cpython-" + version.replace(".", "")
    assert summary["pythons"] == [other_tag]
    bundle = fmt.read(data, allow_unsigned=True)
    with pytest.raises(fmt.BundleError) as info:
        fmt.to_patch(bundle)
    assert f"carries code for {other_tag}; this process runs {PYTHON_TAG}" in str(info.value)


def test_multi_python_bundle_carries_code_for_each(tmp_path):
    python, version = _other_python()
    if python is None:
        pytest.skip("no second Python venv here (make test creates one per version)")
    base, new = write_case(str(tmp_path), SUPPORTED["method"][0])
    data, summary = build(base, new, patch_id="HP-M", pythons=[sys.executable, python])
    manifest = fmt.read(data, allow_unsigned=True).manifest
    assert sorted(manifest["pythons"]) == sorted([PYTHON_TAG, "cpython-" + version.replace(".", "")])
    assert sorted(manifest["targets"][0]["code"]) == sorted(manifest["pythons"])


# ---------------------------------------------------------------- signatures

@pytest.fixture(scope="module")
def signed(keys, tmp_path_factory):
    d = tmp_path_factory.mktemp("signed")
    base, new = write_case(str(d), COMBINED)
    return build(base, new, patch_id="HP-S", private_key=keys["private"])[0]


def _sections(data):
    import struct
    m = struct.unpack(">I", data[8:12])[0]
    s_off = 12 + m
    s = struct.unpack(">I", data[s_off:s_off + 4])[0]
    return {"manifest": 12 + m // 2, "signature": s_off + 4 + s // 2, "payload": len(data) - 5}


def test_signed_bundle_verifies(signed, keys):
    assert fmt.read(signed, keys["trusted"]).signed_by in keys["trusted"]


@pytest.mark.parametrize("where", ["manifest", "signature", "payload"])
def test_one_flipped_byte_anywhere_is_refused(signed, keys, where):
    data = bytearray(signed)
    data[_sections(signed)[where]] ^= 0x01
    with pytest.raises((SignatureError, fmt.BundleError)) as info:
        fmt.read(bytes(data), keys["trusted"])
    assert "tampered" in str(info.value) or "signature" in str(info.value) or "invalid bundle" in str(info.value)


def test_untrusted_key_unsigned_and_no_keys_are_refused(keys, signed, tmp_path):
    base, new = write_case(str(tmp_path), COMBINED)
    by_intruder = build(base, new, patch_id="HP-I", private_key=keys["intruder"])[0]
    with pytest.raises(SignatureError, match="untrusted key"):
        fmt.read(by_intruder, keys["trusted"])
    unsigned = build(base, new, patch_id="HP-U")[0]
    with pytest.raises(SignatureError, match="not signed"):
        fmt.read(unsigned, keys["trusted"])
    assert fmt.read(unsigned, keys["trusted"], allow_unsigned=True).signed_by is None
    with pytest.raises(SignatureError, match="no trusted keys"):
        fmt.read(signed, {})


def test_signature_is_checked_before_any_payload_is_unmarshalled(signed, keys, monkeypatch):
    import marshal
    calls = []
    monkeypatch.setattr(marshal, "loads", lambda *a: calls.append(a))
    data = bytearray(signed)
    data[_sections(signed)["manifest"]] ^= 0x01
    with pytest.raises((SignatureError, fmt.BundleError)):
        fmt.load_bundle(bytes(data), keys["trusted"])
    assert calls == []


# ---------------------------------------------------------------- hostile input

def test_unknown_format_and_unknown_fields_name_the_field(keys):
    manifest = fmt.read(_valid_unsigned(), allow_unsigned=True).manifest
    for mutate, field in (
        (lambda m: m.update(format=2), "format 2 is not supported"),
        (lambda m: m.update(surprise=1), "surprise: unknown field"),
        (lambda m: m["targets"][0].update(target="../../etc:passwd"), "targets[0].target"),
        (lambda m: m["targets"][0]["code"][PYTHON_TAG].update(patched=12), "patched: expected a string"),
        (lambda m: m.update(classification="urgent"), "classification"),
        (lambda m: m["targets"].append(dict(m["targets"][0])), "duplicate target"),
        (lambda m: m["targets"][0].update(line=10**30), "targets[0].line"),
    ):
        m = json.loads(json.dumps(manifest))
        mutate(m)
        with pytest.raises(fmt.BundleError, match=field.replace("[", r"\[").replace("]", r"\]")):
            fmt.read(_repack(m, _valid_unsigned()), allow_unsigned=True)


def _valid_unsigned(_cache={}):
    if "data" not in _cache:
        import tempfile
        base, new = write_case(tempfile.mkdtemp(), COMBINED)
        _cache["data"] = build(base, new, patch_id="HP-F")[0]
    return _cache["data"]


def _repack(manifest, original, private_key=None):
    """Re-emit a bundle around an edited manifest, keeping the payloads."""
    bundle = fmt.read(original, allow_unsigned=True)
    body = fmt.canonical(manifest)
    import struct
    sig = fmt.canonical(__import__("livepatch.signing").signing.sign(private_key, body)) if private_key else b""
    out = [fmt.MAGIC, struct.pack(">I", len(body)), body, struct.pack(">I", len(sig)), sig,
           struct.pack(">I", len(bundle.payloads))]
    for name, data in sorted(bundle.payloads.items()):
        out += [struct.pack(">H", len(name)), name.encode(), struct.pack(">I", len(data)), data]
    return b"".join(out)


_SAFE = (fmt.BundleError, SignatureError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_never_crash_the_loader(data):
    with pytest.raises(_SAFE):
        fmt.read(data, allow_unsigned=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_and_truncated_bundles_fail_cleanly(data):
    original = _valid_unsigned()
    blob = bytearray(original)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:cut]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    try:
        bundle = fmt.read(bytes(blob), allow_unsigned=True)
    except _SAFE:
        return
    fmt.validate(bundle.manifest)  # whatever got through is still a valid bundle


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_hostile_manifest_values_are_named_errors(data):
    """Signed correctly, but with wrong types, huge numbers, odd names in
    random places: the schema, not a traceback, must refuse them."""
    manifest = json.loads(json.dumps(fmt.read(_valid_unsigned(), allow_unsigned=True).manifest))
    node = manifest
    path = []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        if not isinstance(node[key], (dict, list)):
            break
        node = node[key]
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    value = data.draw(_json)
    if path:
        parent[path[-1]] = value
    else:
        manifest[data.draw(st.text(max_size=10))] = value
    try:
        blob = _repack(manifest, _valid_unsigned())
    except (ValueError, TypeError):
        return  # not representable as canonical JSON at all
    try:
        bundle = fmt.read(blob, allow_unsigned=True)
    except _SAFE as exc:
        assert exc.problems and exc.problems[0].target or "manifest" in str(exc)
        return
    fmt.validate(bundle.manifest)


# ---------------------------------------------------------------- CLI

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "livepatch.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_keygen_build_verify_inspect(tmp_path):
    base, new = write_case(str(tmp_path), COMBINED)
    assert _cli("keygen", str(tmp_path / "ops")).returncode == 0
    assert oct(os.stat(tmp_path / "ops.key").st_mode & 0o777) == "0o600"
    out = _cli("build", base, new, "-o", str(tmp_path / "hp.lpb"), "--id", "HP-2026-11-01", "--key", str(tmp_path / "ops.key"),
               "--classification", "security", "--ref", "CVE-2026-0001", "--name", "app", "--version", "1.4.2", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["targets"] == {"app.core": ["price", "render"]} and summary["signed"]
    ok = _cli("verify", str(tmp_path / "hp.lpb"), "--trust", str(tmp_path / "ops.pub"))
    assert ok.returncode == 0 and "intact and signed" in ok.stdout
    shown = _cli("inspect", str(tmp_path / "hp.lpb"), "--trust", str(tmp_path / "ops.pub"))
    assert shown.returncode == 0
    assert "app.core:render" in shown.stdout and "+    return _wrap(html.escape(json.dumps(obj)))" in shown.stdout
    assert "CVE-2026-0001" in shown.stdout and "signed by trusted key" in shown.stdout
    data = bytearray((tmp_path / "hp.lpb").read_bytes())
    data[-3] ^= 1
    (tmp_path / "bad.lpb").write_bytes(bytes(data))
    bad = _cli("verify", str(tmp_path / "bad.lpb"), "--trust", str(tmp_path / "ops.pub"))
    assert bad.returncode == 4 and "tampered" in bad.stderr


def test_cli_build_refusal_lists_reasons_and_writes_nothing(tmp_path):
    base, new = write_case(str(tmp_path), REFUSED["free-vars"][0])
    out = _cli("build", base, new, "-o", str(tmp_path / "x.lpb"), "--id", "HP-X")
    assert out.returncode == 3
    assert "refused:free-vars" in out.stderr and "core.py:" in out.stderr
    assert not (tmp_path / "x.lpb").exists()
