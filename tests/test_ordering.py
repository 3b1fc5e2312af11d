"""Ordered bundles and rollback authority: the manifest's sequence and
lineage, the builder's checks, the agent refusing downgrades unless allowed
(and recording who allowed one), and signed rollback authorisations for
security and critical patches, against real services."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from live import SECRET, Service, cli
from livepatch import authorization, bundle as fmt
from livepatch.builder import BuildRefused, build
from livepatch.signing import SignatureError, generate, load_private, load_trusted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo_apps", "http_api")
PATCHES = os.path.join(DEMO, "patches")
BASELINE = os.path.join(PATCHES, "baseline")
ROUNDING = "/quote?sku=widget&qty=1"  # 2.67 before the rounding fix, 2.68 after


def _nobody():
    """setpriv arguments running a command as uid 65534 with this
    interpreter; where it lives under a home only root may enter, with
    CAP_DAC_READ_SEARCH to read it (the uid, and so the peer check, stays
    65534's). None when that is not possible here."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        return None
    plain = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for prefix in (plain, plain + ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
        if subprocess.run([*prefix, sys.executable, "-c", "import livepatch.agent, cryptography, psutil"],
                          capture_output=True, cwd="/").returncode == 0:
            return prefix
    return None


NOBODY = _nobody()
AGENT_THEN_SERVER = ("import sys, livepatch.agent\n"
                     "livepatch.agent.start(trust=sys.argv.pop(1))\n"
                     "from inventory.server import main\n"
                     "main()\n")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shared():
    """A directory uid 65534 can enter: keys, bundles and authorisations
    readable by all, and `svc/`, owned by 65534, for a service run as it."""
    top = Path(tempfile.mkdtemp(prefix="lp-order-"))
    os.chmod(top, 0o711)
    files = top / "files"
    files.mkdir()
    os.chmod(files, 0o755)
    svc = top / "svc"
    svc.mkdir(mode=0o700)
    run = svc / "run"
    run.mkdir(mode=0o700)
    if os.getuid() == 0:
        for d in (svc, run):
            os.chown(d, 65534, 65534)
    yield {"top": top, "files": files, "svc": svc, "run": run}
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def keys(shared):
    d = shared["files"]
    ops, _, ops_id = generate(str(d / "ops"))
    other, _, _ = generate(str(d / "other"))
    trust = d / "trusted"
    trust.mkdir()
    shutil.copy(d / "ops.pub", trust / "ops.pub")
    for p in (trust, trust / "ops.pub"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return {"key": ops, "other": other, "trust": str(trust), "key_id": ops_id}


@pytest.fixture(scope="module")
def bundles(keys, shared, tmp_path_factory):
    """HP-X-1: the rounding fix; HP-X-2: rounding and path traversal; both
    cumulative security bundles of lineage HP-X for inventory 1.0. HP-D-1:
    the path traversal fix alone, lineage HP-D, sequence 3."""
    both = tmp_path_factory.mktemp("both")
    shutil.copytree(os.path.join(PATCHES, "fix-path-traversal", "inventory"), both / "inventory")
    shutil.copy(os.path.join(PATCHES, "fix-rounding", "inventory", "pricing.py"), both / "inventory" / "pricing.py")
    out = {}
    for pid, tree, seq, lineage, cumulative in (
            ("HP-X-1", os.path.join(PATCHES, "fix-rounding"), 1, "HP-X", True),
            ("HP-X-2", str(both), 2, "HP-X", True),
            # an independent fix of another lineage, built after both (sequence 3), not cumulative
            ("HP-D-1", os.path.join(PATCHES, "fix-path-traversal"), 3, "HP-D", False)):
        path = str(shared["files"] / f"{pid}.lpb")
        r = cli("build", BASELINE, tree, "-o", path, "--id", pid, "--key", keys["key"], "--name", "inventory",
                "--version", "1.0", "--classification", "security", "--sequence", str(seq),
                "--lineage", lineage, "--json", *(["--cumulative"] if cumulative else []))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sequence"] == seq
        os.chmod(path, 0o644)
        out[pid] = path
    return out


def _authorize(bundle_path, key, out_path, *extra):
    r = cli("authorize-rollback", bundle_path, "--key", key, "-o", str(out_path), *extra)
    assert r.returncode == 0, r.stderr
    os.chmod(out_path, 0o644)
    return str(out_path)


@pytest.fixture
def service(tmp_path, keys, monkeypatch):
    """The inventory API with an agent started in code and no state
    directory, so `history` answers the engine's own entries."""
    made = []
    for name in [k for k in os.environ if k.startswith("LIVEPATCH_")]:
        monkeypatch.delenv(name)

    def make(where=tmp_path, launcher=(), extra_env=None):
        s = Service(where, DEMO, ["-c", AGENT_THEN_SERVER, keys["trust"]], launcher=launcher, env=extra_env)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("LIVEPATCH_")}


def _json(r):
    assert r.stdout, r.stderr
    return json.loads(r.stdout)


def _applied(pid, as_nobody=False, env=None):
    return [p["id"] for p in _json(_cli(as_nobody, env, "status", str(pid), "--json"))["applied"]]


def _cli(as_nobody, env, *args):
    if not as_nobody:
        return cli(*args)
    return subprocess.run([*NOBODY, sys.executable, "-m", "livepatch", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd="/")


# ---------------------------------------------------------------- manifest and builder

def _tiny_trees(tmp_path):
    base, new = tmp_path / "base" / "app", tmp_path / "new" / "app"
    base.mkdir(parents=True)
    new.mkdir(parents=True)
    (base / "__init__.py").write_text("")
    (new / "__init__.py").write_text("")
    (base / "m.py").write_text("def f():\n    return 1\n")
    (new / "m.py").write_text("def f():\n    return 2\n")
    return str(base), str(new)


def test_builder_records_sequence_and_lineage_and_the_agent_side_metadata(tmp_path):
    base, new = _tiny_trees(tmp_path)
    data, summary = build(base, new, patch_id="HP-A-3", sequence=3, lineage="HP-A")
    assert summary["sequence"] == 3 and summary["lineage"] == "HP-A"
    b = fmt.read(data, allow_unsigned=True)
    assert b.manifest["sequence"] == 3 and b.manifest["lineage"] == "HP-A"
    assert fmt.ordering(b.manifest) == {"sequence": 3, "lineage": "HP-A"}
    default = fmt.read(build(base, new, patch_id="HP-B")[0], allow_unsigned=True)
    assert default.manifest["sequence"] == 1 and "lineage" not in default.manifest
    assert len(fmt.digest(b)) == 64 and fmt.digest(b) != fmt.digest(default)


def test_bundles_made_before_ordering_stay_readable_as_sequence_zero(tmp_path):
    base, new = _tiny_trees(tmp_path)
    data, _ = build(base, new, patch_id="HP-OLD")
    manifest = fmt.read(data, allow_unsigned=True).manifest
    del manifest["sequence"]
    legacy = _repack(manifest, data)
    assert fmt.ordering(fmt.read(legacy, allow_unsigned=True).manifest) == {"sequence": 0, "lineage": None}


@pytest.mark.parametrize("field, value, message", [
    ("sequence", 0, "sequence: expected an integer in [1, 2147483647]"),
    ("sequence", -4, "sequence: expected an integer"),
    ("sequence", "2", "sequence: expected an integer"),
    ("sequence", True, "sequence: expected an integer"),
    ("sequence", 2**31, "sequence: expected an integer"),
    ("lineage", "../etc", "lineage: '../etc' is not valid here"),
    ("lineage", 7, "lineage: expected a string"),
])
def test_the_loader_refuses_bad_ordering_fields_naming_them(tmp_path, field, value, message):
    base, new = _tiny_trees(tmp_path)
    data, _ = build(base, new, patch_id="HP-C")
    manifest = fmt.read(data, allow_unsigned=True).manifest
    manifest[field] = value
    with pytest.raises(fmt.BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fmt.read(_repack(manifest, data), allow_unsigned=True)


def test_builder_api_refuses_bad_sequence_and_lineage(tmp_path):
    base, new = _tiny_trees(tmp_path)
    for kw in ({"sequence": 0}, {"sequence": "1"}, {"sequence": 1.0}, {"lineage": "a/b"}, {"lineage": ""}):
        with pytest.raises(BuildRefused, match="sequence|lineage"):
            build(base, new, patch_id="HP-D", **kw)


@pytest.mark.parametrize("args, message", [
    (["--sequence", "0"], "argument --sequence: sequence must be a whole number from 1 to 2147483647, got '0'"),
    (["--sequence", "-1"], "argument --sequence: sequence must be a whole number"),
    (["--sequence", "two"], "argument --sequence: sequence must be a whole number"),
    (["--sequence", "99999999999"], "argument --sequence: sequence must be a whole number"),
    (["--lineage", "../x"], "argument --lineage: lineage must be like a patch id"),
])
def test_cli_build_bad_ordering_options_are_one_clear_usage_line(tmp_path, args, message):
    base, new = _tiny_trees(tmp_path)
    out = tmp_path / "x.lpb"
    r = cli("build", base, new, "-o", str(out), "--id", "HP-E", *args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_build_says_which_sequence_it_wrote(tmp_path):
    base, new = _tiny_trees(tmp_path)
    r = cli("build", base, new, "-o", str(tmp_path / "a.lpb"), "--id", "HP-F")
    assert r.returncode == 0, r.stderr
    assert "sequence 1 (the default: a later bundle for this baseline needs --sequence 2 or higher)" in r.stdout
    r = cli("build", base, new, "-o", str(tmp_path / "b.lpb"), "--id", "HP-F-4", "--sequence", "4", "--lineage", "HP-F")
    assert r.returncode == 0, r.stderr
    assert "sequence 4 in lineage HP-F\n" in r.stdout + "\n"


def _repack(manifest, original):
    import struct
    b = fmt.read(original, allow_unsigned=True)
    body = fmt.canonical(manifest)
    out = [fmt.MAGIC, struct.pack(">I", len(body)), body, struct.pack(">I", 0), b"", struct.pack(">I", len(b.payloads))]
    for name, data in sorted(b.payloads.items()):
        out += [struct.pack(">H", len(name)), name.encode(), struct.pack(">I", len(data)), data]
    return b"".join(out)


# ---------------------------------------------------------------- ordering decisions

def _meta(seq, lineage=None, name="inventory", version="1.0", cls="security"):
    return {"baseline": {"name": name, "version": version}, "sequence": seq, "lineage": lineage,
            "classification": cls, "signed_by": "k", "bundle_sha256": "0" * 64}


def _incoming(pid, seq, lineage=None, cumulative=False, **kw):
    return types.SimpleNamespace(id=pid, metadata=_meta(seq, lineage, **kw), cumulative=cumulative)


def _status(*patches):
    return [{"id": pid, "metadata": meta, "replaces": []} for pid, meta in patches]


def test_ordering_compares_within_a_lineage_and_cumulative_bundles_against_all_they_remove():
    from livepatch.agent import ordering
    applied = _status(("HP-DOCS-2", _meta(2, "HP-DOCS")))
    found = ordering.conflicts(_incoming("HP-DOCS-1", 1, "HP-DOCS"), applied)
    assert [p.message for _, p in found] == ["HP-DOCS-1 (sequence 1) is older than applied HP-DOCS-2 (sequence 2) for inventory 1.0"]
    assert ordering.conflicts(_incoming("HP-DOCS-3", 3, "HP-DOCS"), applied) == []
    assert ordering.conflicts(_incoming("HP-DOCS-2b", 2, "HP-DOCS"), applied) == []  # equal: not older
    # another lineage, not cumulative: an independent fix, not a downgrade
    assert ordering.conflicts(_incoming("HP-ROUND-1", 1, "HP-ROUND"), applied) == []
    # a cumulative bundle replaces everything: a newer patch of any lineage would be dropped
    found = ordering.conflicts(_incoming("HP-ALL-1", 1, "HP-ALL", cumulative=True), applied)
    assert "would remove it" in found[0][1].message
    assert ordering.conflicts(_incoming("HP-ALL-5", 5, "HP-ALL", cumulative=True), applied) == []
    # ... and must be newer than what it replaces: an equal number does not say so
    found = ordering.conflicts(_incoming("HP-ALL-2", 2, "HP-ALL", cumulative=True), applied)
    assert found[0][1].message == ("cumulative HP-ALL-2 (sequence 2) is not newer than applied HP-DOCS-2 (sequence 2) "
                                   "for inventory 1.0 and would remove it")
    # ... or a patch of another baseline it is not ordered against
    other = _status(("HP-B-1", _meta(1, name="billing", version="2.0")))
    found = ordering.conflicts(_incoming("HP-ALL-5", 5, cumulative=True), other)
    assert "not ordered against" in found[0][1].message
    assert ordering.conflicts(_incoming("HP-I-1", 1), other) == []
    # the same release, another version: not ordered against each other either
    assert ordering.conflicts(_incoming("HP-V-1", 1, version="1.1"), _status(("HP-V-9", _meta(9)))) == []
    # a bundle made before ordering existed (sequence 0) is older than any sequenced one
    assert ordering.conflicts(_incoming("HP-OLD", 0), _status(("HP-NEW", _meta(1))))
    assert ordering.conflicts(_incoming("HP-OLD2", 0), _status(("HP-OLD1", _meta(0)))) == []
    # patches made in-process (no baseline) are not ordered
    assert ordering.conflicts(_incoming("HP-Z", 1, cumulative=True), _status(("inproc", {}))) == []
    assert ordering.conflicts(types.SimpleNamespace(id="p", metadata={}, cumulative=True), applied) == []


def test_refused_downgrade_names_both_and_the_override():
    from livepatch.agent import ordering
    applied = _status(("HP-DOCS-2", _meta(2, "HP-DOCS")))
    with pytest.raises(ordering.Downgrade) as info:
        ordering.check_apply(None, _incoming("HP-DOCS-1", 1, "HP-DOCS"), {}, applied)
    assert str(info.value).splitlines()[0] == ("HP-DOCS-1 (sequence 1) is older than applied HP-DOCS-2 (sequence 2) "
                                               "for inventory 1.0; pass --allow-downgrade to apply it anyway")
    # only a JSON true allows it
    with pytest.raises(ordering.Downgrade):
        ordering.check_apply(None, _incoming("HP-DOCS-1", 1, "HP-DOCS"), {"allow_downgrade": "yes"}, applied)
    verdict = ordering.assess(_incoming("HP-DOCS-1", 1, "HP-DOCS"), {}, {"verdict": "applies", "patch_id": "HP-DOCS-1"}, applied)
    assert verdict["verdict"] == "refused" and verdict["error"] == "Downgrade"


def test_who_needs_an_authorisation_to_take_a_patch_out():
    from livepatch.agent import ordering
    from livepatch.authorization import RollbackUnauthorized
    agent = types.SimpleNamespace(trusted={})
    unsigned = dict(_meta(1, "HP-U"), signed_by=None)
    applied = _status(("HP-BUG", _meta(1, "HP-B", cls="bugfix")), ("HP-U", unsigned), ("HP-SEC", _meta(1, "HP-S")))
    owner = (4242, 1000, 1000)
    with ordering.request_context(owner):
        # the latest is HP-SEC, a signed security patch
        with pytest.raises(RollbackUnauthorized, match="HP-SEC is a security patch: rolling it back needs"):
            ordering.check_rollback(agent, {}, applied)
        ordering.check_rollback(agent, {"patch_id": "HP-BUG"}, applied)  # a bugfix: the owner may
        ordering.check_rollback(agent, {"patch_id": "HP-U"}, applied)  # applied unsigned (development mode)
        assert ordering.record_fields() == {"peer": {"uid": 1000, "pid": 4242}}
        with pytest.raises(RollbackUnauthorized, match="at most 16"):
            ordering.check_rollback(agent, {"authorizations": "not a list"}, applied)
    with ordering.request_context((7, 0, 0)):
        ordering.check_rollback(agent, {}, applied)  # root may: it is recorded
        assert ordering.record_fields() == {"peer": {"uid": 0, "pid": 7}, "authorization": {"HP-SEC": "root"}}
    assert ordering.record_fields() == {}  # nothing outlives the request


def test_rolling_back_everything_counts_the_patches_a_cumulative_one_brings_back():
    from livepatch.agent import ordering
    from livepatch.authorization import RollbackUnauthorized
    agent = types.SimpleNamespace(trusted={})
    with ordering.request_context((1, 1000, 1000)):
        # seen in effect once, then replaced by a cumulative bugfix
        ordering.check_rollback(agent, {"patch_id": "none"}, _status(("HP-OLD-SEC", _meta(1, "HP-S"))))
        stack = [{"id": "HP-ALL", "metadata": _meta(2, "HP-A", cls="bugfix"), "replaces": ["HP-OLD-SEC"]}]
        ordering.check_rollback(agent, {}, stack)  # just the cumulative one: what it replaced comes back
        with pytest.raises(RollbackUnauthorized, match="HP-OLD-SEC is a security patch"):
            ordering.check_rollback(agent, {"all": True}, stack)


# ---------------------------------------------------------------- authorisations

def test_authorization_is_bound_to_patch_build_key_and_time(keys, bundles):
    trusted = load_trusted(keys["trust"])
    b2 = fmt.read(fmt.read_file(bundles["HP-X-2"]), trusted)
    b1 = fmt.read(fmt.read_file(bundles["HP-X-1"]), trusted)
    doc = authorization.make(b2, load_private(keys["key"]), 3600)
    assert authorization.verify(doc, trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2)) == keys["key_id"]
    with pytest.raises(authorization.RollbackUnauthorized, match="is for HP-X-2, not HP-X-1"):
        authorization.verify(doc, trusted, patch_id="HP-X-1", bundle_sha256=fmt.digest(b1))
    with pytest.raises(authorization.RollbackUnauthorized, match="another build of HP-X-2"):
        authorization.verify(doc, trusted, patch_id="HP-X-2", bundle_sha256="1" * 64)
    with pytest.raises(authorization.RollbackUnauthorized, match="expired"):
        authorization.verify(doc, trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2), now=time.time() + 7200)
    early = authorization.make(b2, load_private(keys["key"]), 3600, now=time.time() + 3600)
    with pytest.raises(authorization.RollbackUnauthorized, match="in the future"):
        authorization.verify(early, trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2))
    other = authorization.make(b2, load_private(keys["other"]), 3600)
    with pytest.raises(SignatureError, match="untrusted key"):
        authorization.verify(other, trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2))
    # altered after signing: a longer validity, or a flipped signature digit
    d = json.loads(doc)
    d["authorization"]["expires"] += 10**6
    with pytest.raises(SignatureError, match="does not verify"):
        authorization.verify(json.dumps(d), trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2))
    d = json.loads(doc)
    sig = d["signature"]["signature"]
    d["signature"]["signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    with pytest.raises(SignatureError, match="does not verify"):
        authorization.verify(json.dumps(d), trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2))
    # a bundle's own signature is no authorisation (another domain), and junk is refused by shape
    fake = {"authorization": {"action": "rollback", "patch": "HP-X-2", "bundle_sha256": fmt.digest(b2),
                              "baseline": b2.manifest["baseline"], "issued": 0, "expires": 2**39},
            "signature": b2.signature}
    with pytest.raises(SignatureError):
        authorization.verify(json.dumps(fake), trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2))
    for junk in ("", "[]", "{}", "x" * 5000, '{"authorization": 1, "signature": 2}', "[" * 100000):
        with pytest.raises(authorization.RollbackUnauthorized, match="not a rollback authorisation"):
            authorization.verify(junk, trusted, patch_id="HP-X-2", bundle_sha256=fmt.digest(b2))


def test_cli_authorize_rollback_validates_and_never_overwrites(keys, bundles, tmp_path):
    out = tmp_path / "a.json"
    path = _authorize(bundles["HP-X-2"], keys["key"], out, "--valid-hours", "2")
    body = json.loads(open(path).read())["authorization"]
    assert body["patch"] == "HP-X-2" and body["expires"] - body["issued"] == 7200
    r = cli("authorize-rollback", bundles["HP-X-2"], "--key", keys["key"], "-o", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr  # exists: O_EXCL
    r = cli("authorize-rollback", bundles["HP-X-2"], "--key", keys["key"], "-o", str(tmp_path / "b"), "--valid-hours", "0")
    assert r.returncode == 2 and "--valid-hours" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- against real services

@pytest.mark.parametrize("history_on_disk", [False, True], ids=["in-memory", "state-dir"])
def test_older_signed_cumulative_bundle_is_refused_and_an_allowed_one_is_recorded(service, bundles, tmp_path,
                                                                                   history_on_disk):
    # with a state directory `history` answers the persisted entries: they must say who did what too
    env = {"LIVEPATCH_STATE_DIR": str(tmp_path / "state"), "LIVEPATCH_NAME": "inventory"} if history_on_disk else None
    svc = service(extra_env=env).start_load()
    assert svc.get(SECRET)[0] == 200
    r = cli("apply", str(svc.pid), bundles["HP-X-2"], "--json")
    assert r.returncode == 0, r.stderr
    assert svc.get(SECRET)[0] == 404 and svc.get(ROUNDING)[1]["total"] == 2.68

    # the older bundle, validly signed, would replace the stack and bring the traversal back
    r = cli("assess", str(svc.pid), bundles["HP-X-1"], "--json")
    assert r.returncode == 3 and _json(r)[0]["error"] == "Downgrade"
    r = cli("apply", str(svc.pid), bundles["HP-X-1"], "--dry-run", "--json")
    assert r.returncode == 3 and _json(r)["verdict"] == "refused"
    r = cli("apply", str(svc.pid), bundles["HP-X-1"])
    assert r.returncode == 3
    assert r.stderr.splitlines()[0] == (
        "livepatch apply: Downgrade: HP-X-1 (sequence 1) is older than applied HP-X-2 (sequence 2) for inventory 1.0 "
        "and would remove it; pass --allow-downgrade to apply it anyway")
    assert svc.get(SECRET)[0] == 404 and _applied(svc.pid) == ["HP-X-2"]

    # root may downgrade (it could anyway); it is recorded with who asked
    r = cli("apply", str(svc.pid), bundles["HP-X-1"], "--allow-downgrade", "--json")
    assert r.returncode == 0, r.stderr
    assert _applied(svc.pid) == ["HP-X-1"] and svc.get(SECRET)[0] == 200 and svc.get(ROUNDING)[1]["total"] == 2.68
    history = _json(cli("history", str(svc.pid), "--json"))
    first, last = [h for h in history if h["action"] == "apply" and h["outcome"] == "ok"]
    assert first["peer"]["uid"] == os.getuid() and "allow_downgrade" not in first
    assert last["patch"] == "HP-X-1" and last["allow_downgrade"] is True
    assert last["peer"]["uid"] == os.getuid() and last["peer"]["pid"] not in (svc.pid, os.getpid())
    assert "older than applied HP-X-2" in last["downgrade"][0]
    assert last["authorization"] == {"HP-X-2": "root"}

    r = cli("rollback", str(svc.pid), "--json")
    assert r.returncode == 0, r.stderr
    assert _applied(svc.pid) == ["HP-X-2"]  # the rollback brings back what the cumulative replaced
    rollback = [h for h in _json(cli("history", str(svc.pid), "--json")) if h["action"] == "rollback"][-1]
    assert rollback["outcome"] == "ok" and rollback["peer"]["uid"] == os.getuid() and rollback["peer"]["pid"] > 0
    assert rollback["authorization"] == {"HP-X-1": "root"}
    svc.stop()
    assert svc.failed == 0, svc.errors[:5]


def test_a_cumulative_bundle_does_not_silently_drop_a_newer_patch(service, bundles):
    svc = service()
    r = cli("apply", str(svc.pid), bundles["HP-D-1"])
    assert r.returncode == 0, r.stderr
    # HP-X-1 is of another lineage, but cumulative: it would replace HP-D-1, built after it
    r = cli("apply", str(svc.pid), bundles["HP-X-1"], "--json")
    assert r.returncode == 3
    refused = _json(r)["error"]  # the one error shape of --json
    assert refused["type"] == "Downgrade" and refused["exit_code"] == 3
    assert refused["problems"][0]["target"] == "HP-D-1"
    assert "older than applied HP-D-1 (sequence 3) for inventory 1.0 and would remove it" in refused["problems"][0]["message"]
    assert _applied(svc.pid) == ["HP-D-1"] and svc.get(SECRET)[0] == 404 and svc.get(ROUNDING)[1]["total"] == 2.67
    # HP-X-2 carries the same fix but was built before HP-D-1 too: refused as well, the operator decides
    r = cli("apply", str(svc.pid), bundles["HP-X-2"])
    assert r.returncode == 3 and "HP-X-2 (sequence 2) is older than applied HP-D-1 (sequence 3)" in r.stderr


@pytest.mark.skipif(NOBODY is None, reason="needs root, setpriv and an interpreter uid 65534 can run")
def test_the_owner_needs_a_signed_authorisation_to_remove_a_security_patch(service, bundles, keys, shared):
    env = dict(_clean_env(), XDG_RUNTIME_DIR=str(shared["run"]), HOME=str(shared["svc"]))
    svc = service(where=shared["svc"], launcher=NOBODY, extra_env={"XDG_RUNTIME_DIR": str(shared["run"]),
                                                                    "HOME": str(shared["svc"])})

    def as_owner(*args):
        return _cli(True, env, *args)

    r = as_owner("apply", str(svc.pid), bundles["HP-X-2"], "--json")
    assert r.returncode == 0, r.stderr
    token = _json(r)["undo_token"]
    assert svc.get(SECRET)[0] == 404

    def unchanged():
        assert _applied(svc.pid, True, env) == ["HP-X-2"] and svc.get(SECRET)[0] == 404

    r = as_owner("rollback", str(svc.pid))
    assert r.returncode == 3
    assert r.stderr.splitlines()[0].startswith(
        "livepatch rollback: RollbackUnauthorized: HP-X-2 is a security patch: rolling it back needs a rollback authorisation")
    unchanged()
    # an allowed downgrade that would remove it needs the same
    r = as_owner("apply", str(svc.pid), bundles["HP-X-1"], "--allow-downgrade")
    assert r.returncode == 3 and "RollbackUnauthorized: HP-X-2 is a security patch: removing it" in r.stderr
    unchanged()
    r = as_owner("apply", str(svc.pid), bundles["HP-X-1"], "--allow-downgrade", "--dry-run", "--json")
    assert r.returncode == 3 and _json(r)["error"] == "RollbackUnauthorized"  # the dry run says so too
    unchanged()

    files = shared["files"]
    good = _authorize(bundles["HP-X-2"], keys["key"], files / "x2.auth")
    wrong_id = _authorize(bundles["HP-X-1"], keys["key"], files / "x1.auth")
    other_key = _authorize(bundles["HP-X-2"], keys["other"], files / "x2-other.auth")
    doc = json.loads(open(good).read())
    doc["authorization"]["expires"] += 86400 * 365
    forged = files / "x2-forged.auth"
    forged.write_text(json.dumps(doc))
    os.chmod(forged, 0o644)
    for path, code, says in ((wrong_id, 3, "is for HP-X-1, not HP-X-2"), (other_key, 4, "untrusted key"),
                             (forged, 4, "does not verify")):
        r = as_owner("rollback", str(svc.pid), "--authorization", str(path))
        assert r.returncode == code and says in r.stderr.splitlines()[0], r.stderr
        assert "Traceback" not in r.stderr
        unchanged()

    # a made-up undo token is no authorisation either
    answer = _request_as_owner(env, svc.pid, "rollback", undo_token="0" * 32)
    assert answer["error"]["error"] == "RollbackUnauthorized"
    unchanged()

    r = as_owner("rollback", str(svc.pid), "--authorization", str(wrong_id), "--authorization", good, "--json")
    assert r.returncode == 0, r.stderr
    assert _applied(svc.pid, True, env) == [] and svc.get(SECRET)[0] == 200
    entry = [h for h in _json(as_owner("history", str(svc.pid), "--json")) if h["action"] == "rollback"][-1]
    assert entry["outcome"] == "ok" and entry["peer"]["uid"] == 65534 and entry["peer"]["pid"] > 0
    assert entry["authorization"] == {"HP-X-2": keys["key_id"]}

    # the token of an application that is gone undoes nothing; the client
    # that applied it again can undo its own apply (a service-wide apply
    # undoing its partial commits) without an authorisation
    r = as_owner("apply", str(svc.pid), bundles["HP-X-2"], "--json")
    assert r.returncode == 0, r.stderr
    fresh = _json(r)["undo_token"]
    assert fresh != token
    assert _request_as_owner(env, svc.pid, "rollback", undo_token=token)["error"]["error"] == "RollbackUnauthorized"
    answer = _request_as_owner(env, svc.pid, "rollback", patch_id="HP-X-2", undo_token=fresh)
    assert answer["ok"], answer
    assert _applied(svc.pid, True, env) == [] and svc.get(SECRET)[0] == 200
    entry = [h for h in _json(as_owner("history", str(svc.pid), "--json")) if h["action"] == "rollback"][-1]
    assert entry["authorization"] == {"HP-X-2": "undo of this client's apply"} and entry["peer"]["uid"] == 65534


def _request_as_owner(env, pid, op, **fields):
    code = ("import json, sys\nfrom livepatch.client import request\n"
            "print(json.dumps(request(int(sys.argv[1]), sys.argv[2], wait=30, **json.loads(sys.argv[3]))))\n")
    r = subprocess.run([*NOBODY, sys.executable, "-c", code, str(pid), op, json.dumps(fields)], capture_output=True,
                       text=True, timeout=60, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
