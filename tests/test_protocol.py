"""The control protocol against hostile and careless clients of the owner's
uid, on a real agent in its own process: slow clients cannot take every
slot, frames are bounded, no input gives a traceback, ids are checked
before they are stored or printed, signatures have one spelling, refused
bundles are recorded, and patched sources leave linecache on rollback.
Ends with a fuzzing run (hypothesis) of the request protocol."""

import base64
import json
import linecache
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live import cli, end_process
from livepatch import bundle as fmt
from livepatch.agent import connections, protocol
from livepatch.builder import build
from livepatch.cli import printable, table
from livepatch.signing import generate, load_private

TARGET = "def price(qty):\n    return qty * 3\n"
AGENT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import proto_target
import livepatch.agent as agent
path = agent.start(name="proto", trust=sys.argv[2] or None, allow_unsigned=sys.argv[3] == "1")
print(json.dumps({"socket": path}), flush=True)
sys.stdin.read()
"""


class Agent:
    """An agent in a process of its own; stderr kept to look for tracebacks."""

    def __init__(self, tmp_path, trust="", allow_unsigned=False, env=None):
        code = tmp_path / "code"
        code.mkdir(exist_ok=True)
        (code / "proto_target.py").write_text(TARGET)
        self.err_path = tmp_path / f"agent-{time.monotonic_ns()}.err"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, str(code), trust, "1" if allow_unsigned else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=dict(os.environ, **(env or {})))
        line = self.proc.stdout.readline()
        assert line, self.stderr()
        self.path, self.pid = json.loads(line)["socket"], self.proc.pid

    def connect(self, timeout=15.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def raw(self, payload: bytes):
        """Send bytes, read one answer (None if the agent hung up first)."""
        s = self.connect()
        try:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                return protocol.recv(s)
            except (protocol.ProtocolError, ConnectionResetError):
                return None
        finally:
            s.close()

    def request(self, op, **fields):
        return self.raw(protocol.encode({"v": 1, "op": op, **fields}))

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def stop(self):
        end_process(self.proc, ask=lambda p: p.stdin.close())  # its program exits at the end of its input
        self._err.close()


@pytest.fixture
def agents(tmp_path):
    made = []

    def make(**kw):
        a = Agent(tmp_path, **kw)
        made.append(a)
        return a
    yield make
    for a in made:
        a.stop()


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A trust directory and a signed bundle patching proto_target.price."""
    d = tmp_path_factory.mktemp("signed")
    key, pub, _ = generate(str(d / "ops"))
    trust = d / "trust"
    trust.mkdir()
    os.rename(pub, trust / "ops.pub")
    base, new = d / "base", d / "new"
    base.mkdir()
    new.mkdir()
    (base / "proto_target.py").write_text(TARGET)
    (new / "proto_target.py").write_text(TARGET.replace("* 3", "* 4"))
    data, _ = build(str(base), str(new), patch_id="HP-PROTO", name="proto", version="1", private_key=load_private(key))
    return {"trust": str(trust), "bundle": data}


def frame(text) -> bytes:
    body = text if isinstance(text, bytes) else text.encode()
    return struct.pack(">I", len(body)) + body


def assert_no_traceback(agent):
    err = agent.stderr()
    assert "Traceback" not in err, err


# ---------------------------------------------------------------- slots and deadlines

def test_slow_clients_do_not_take_the_slots_of_a_legitimate_request(agents):
    agent = agents()
    # more trickling clients than the old limit of 8 served connections
    slow = []
    for i in range(12):
        s = agent.connect()
        s.sendall(struct.pack(">I", 1000) + b"{")  # half a frame, then a byte now and then
        slow.append(s)
    for s in slow[:4]:
        s.sendall(b" ")
    answer = agent.request("status")
    assert answer["ok"] is True, answer
    for s in slow:
        s.close()
    assert_no_traceback(agent)


def test_clients_that_never_read_their_refusal_do_not_stall_accepting(agents):
    agent = agents()
    # fill the connection table, then keep connecting clients that are refused and never read
    held = [agent.connect() for _ in range(connections.MAX_CONNECTIONS)]
    for s in held:
        s.sendall(b"\x00")  # a started header, never finished
    time.sleep(0.6)  # older than a prompt client's wait: the longest waiting make room
    answer = agent.request("ping")
    assert answer["ok"] is True, answer
    for s in held:
        s.close()
    assert_no_traceback(agent)


def test_a_request_frame_must_arrive_whole_within_the_deadline(agents, monkeypatch):
    agent = agents()
    s = agent.connect(timeout=connections.REQUEST_DEADLINE + 10)
    s.sendall(struct.pack(">I", 100) + b"{")
    started = time.monotonic()
    answer = protocol.recv(s)  # the agent gives up on it, with a reason
    assert answer["error"]["error"] == "ProtocolError" and "within" in answer["error"]["message"]
    assert time.monotonic() - started < connections.REQUEST_DEADLINE + 5  # bounded, not a performance figure
    s.close()


def test_frame_limit_is_sized_to_real_bundles_and_configurable(agents):
    assert protocol.max_request() == 16 << 20
    agent = agents()
    answer = agent.raw(struct.pack(">I", (16 << 20) + 1))
    assert "over the limit of 16777216" in answer["error"]["message"]
    small = agents(env={"LIVEPATCH_MAX_FRAME": "64K"})
    answer = small.raw(frame(json.dumps({"v": 1, "op": "ping", "pad": "x" * 70000})))
    assert "over the limit of 65536" in answer["error"]["message"]
    assert small.request("ping")["ok"] is True
    bad = agents(env={"LIVEPATCH_MAX_FRAME": "lots"})  # a service is never killed by a bad setting
    assert bad.request("ping")["ok"] is True
    assert "LIVEPATCH_MAX_FRAME='lots' is not a size" in bad.stderr()
    with pytest.raises(ValueError, match="outside"):
        protocol.max_request(1 << 40)


def test_large_frames_share_one_budget(agents):
    agent = agents()
    big = []
    for _ in range(8):  # eight clients announcing maximal frames and sending part of them
        s = agent.connect()
        try:
            s.sendall(struct.pack(">I", 16 << 20) + b"x" * (1 << 20))
        except OSError:
            pass
        big.append(s)
    refused = 0
    for s in big:
        s.settimeout(0.5)
        try:
            data = s.recv(1 << 16)
            refused += bool(data) and b"Busy" in data
        except OSError:
            pass
    assert refused >= 8 - connections.BUFFER_BUDGET_FRAMES  # only the budget's worth is being held
    assert agent.request("ping")["ok"] is True
    for s in big:
        s.close()


# ---------------------------------------------------------------- no traceback for any input

@pytest.mark.parametrize("body, says", [
    (b"[" * 200_000, "nested too deeply"),
    (b'{"v": 1, "op": "ping", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than"),
    (b'{"v": 1, "op": "\xff"}', "not UTF-8"),
    (b'{"v": 1, "op": "\\ud800"}', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
    (b'{"v": ' + b"9" * 5000 + b"}", "not JSON"),
    (b'{"v": NaN}', "not JSON"),
    (b"\xfe\xff\x00{\x00}", "not UTF-8"),
    (b"", "not JSON"),
])
def test_every_decoding_error_is_a_protocol_error(agents, body, says):
    agent = agents()
    answer = agent.raw(frame(body))
    assert answer["ok"] is False and answer["error"]["error"] == "ProtocolError"
    assert says in answer["error"]["message"]
    assert agent.request("ping")["ok"] is True
    assert_no_traceback(agent)


def test_decode_is_total():
    for body in (b"[" * 100_000, b"{" * 100_000, b'{"a":' * 50_000, b"\x80", b'"\\ud800"'):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(body)
    assert protocol.decode(b'{"emoji": "\\ud83d\\ude00"}') == {"emoji": "\U0001F600"}  # a pair is fine


# ---------------------------------------------------------------- ids

HOSTILE_IDS = ["\x1b[31mHP-1\x1b[0m", "HP-\ud800", "HP-1\n", "../HP-1", "x" * 200, "", 7, ["HP-1"]]


def test_hostile_patch_ids_are_refused_and_never_stored(agents):
    agent = agents()
    before = agent.request("history")["result"]
    for patch_id in HOSTILE_IDS:
        answer = agent.raw(protocol.encode({"v": 1, "op": "rollback", "patch_id": patch_id}))
        # a lone surrogate is refused as soon as the frame is decoded, the rest as ids
        assert answer["ok"] is False and answer["error"]["error"] in ("BadRequest", "ProtocolError"), (patch_id, answer)
    assert agent.request("history")["result"] == before
    r = cli("history", str(agent.pid))
    assert r.returncode == 0, r.stderr
    assert_no_traceback(agent)


def test_cli_escapes_control_characters_from_agents():
    hostile = "HP\x1b[2J\r\u202e\ud800"
    out = table([{"patch": hostile, "reason": "a\nb"}], ["patch", "reason"])
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out and "\ud800" not in out
    assert "\\x1b[2J" in out and "a\\nb" in out
    out.encode("utf-8")  # printable on any UTF-8 terminal
    assert printable("line one\nline two", keep="\n") == "line one\nline two"
    assert printable("plain µs") == "plain µs"


def test_bundle_ids_match_whole():
    assert fmt.valid_id("HP-1.2_a") and not fmt.valid_id("HP-1\n") and not fmt.valid_id("-HP")


# ---------------------------------------------------------------- signatures

def _with_signature(data: bytes, transform) -> bytes:
    head = len(fmt.MAGIC)
    (n,) = struct.unpack(">I", data[head:head + 4])
    at = head + 4 + n
    (m,) = struct.unpack(">I", data[at:at + 4])
    sig = json.loads(data[at + 4:at + 4 + m])
    new = fmt.canonical(transform(sig))
    return data[:at] + struct.pack(">I", len(new)) + new + data[at + 4 + m:]


@pytest.mark.parametrize("transform", [
    lambda s: dict(s, signature=s["signature"].upper()),
    lambda s: dict(s, signature=" " + s["signature"]),
    lambda s: dict(s, signature=s["signature"] + "\n"),
    lambda s: dict(s, signature=s["signature"][:2] + " " + s["signature"][2:]),
    lambda s: dict(s, signature=s["signature"] + "00"),
    lambda s: dict(s, key_id=s["key_id"].upper()),
], ids=["upper", "leading-space", "newline", "inner-space", "longer", "key-id-upper"])
def test_signature_hex_has_one_spelling(signed, transform):
    from livepatch.signing import load_trusted
    trusted = load_trusted(signed["trust"])
    assert fmt.read(signed["bundle"], trusted).signed_by  # the canonical one verifies
    altered = _with_signature(signed["bundle"], transform)
    with pytest.raises(fmt.BundleError, match="lower-case hex"):
        fmt.read(altered, trusted)
    with pytest.raises(fmt.BundleError, match="lower-case hex"):  # also where signatures go unchecked
        fmt.read(altered, {}, allow_unsigned=True)


# ---------------------------------------------------------------- rejections in history

def test_rejected_bundles_are_recorded_without_their_contents(agents, signed):
    agent = agents(trust=signed["trust"])
    data = bytearray(signed["bundle"])
    data[-5] ^= 0xFF  # a payload byte: the digest no longer matches
    tampered = base64.b64encode(bytes(data)).decode()
    resigned = base64.b64encode(_with_signature(signed["bundle"], lambda s: dict(s, signature="0" * 128))).decode()
    answers = [agent.request("apply", bundle=tampered), agent.request("apply", bundle=resigned),
               agent.request("assess", bundles=[tampered]), agent.request("apply", bundle="!!")]
    assert [a["ok"] for a in answers[:2] + answers[3:]] == [False, False, False]
    assert agent.request("status")["result"]["applied"] == []
    history = [e for e in agent.request("history")["result"] if e["action"] in ("apply", "assess")]
    assert [(e["action"], e["outcome"]) for e in history] == [("apply", "rejected")] * 2 + [
        ("assess", "rejected"), ("apply", "rejected")]
    assert [e["error"] for e in history] == ["BundleError", "SignatureError", "BundleError", "BadRequest"]
    assert all(e["patch"] == "" and e["reason"] for e in history)  # no id from a bundle that did not verify
    assert "digest" in history[0]["reason"] and "does not verify" in history[1]["reason"]
    text = json.dumps(history)
    assert tampered[:64] not in text and "return qty" not in text
    ok = agent.request("apply", bundle=base64.b64encode(signed["bundle"]).decode())
    assert ok["ok"] is True, ok
    assert_no_traceback(agent)


# ---------------------------------------------------------------- linecache

def _patch_with_source(make_module, patch_id, cumulative=False):
    from conftest import patch_of
    module, source = make_module(TARGET)
    return patch_of(module, source, TARGET.replace("* 3", "* 5"), patch_id=patch_id, cumulative=cumulative)


def test_patched_sources_leave_linecache_on_rollback(engine, make_module):
    first = _patch_with_source(make_module, "HP-A")
    (name,) = first.sources
    engine.apply(first)
    assert name in linecache.cache
    engine.rollback("HP-A")
    assert name not in linecache.cache


def test_a_cumulative_patch_takes_over_linecache_and_gives_it_back(engine, make_module):
    first = _patch_with_source(make_module, "HP-A")
    engine.apply(first)
    (old,) = first.sources
    cumulative = _patch_with_source(make_module, "HP-C", cumulative=True)
    (new,) = cumulative.sources
    engine.apply(cumulative)
    assert new in linecache.cache and old not in linecache.cache
    engine.rollback("HP-C")  # brings HP-A back, and its source
    assert old in linecache.cache and new not in linecache.cache
    engine.rollback("HP-A")
    assert old not in linecache.cache


# ---------------------------------------------------------------- fuzzing

OPS = list(protocol.OPS)
_fields = st.dictionaries(
    st.sampled_from(["v", "op", "bundle", "bundles", "patch_id", "timeout", "force", "all", "dry_run",
                     "allow_downgrade", "authorizations", "undo_token", "trust"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                 | st.sampled_from(OPS),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                 max_leaves=10),
    max_size=6)


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["request", "json", "bytes", "truncated", "length"]))
    if kind == "request":
        request = draw(_fields)
        request.setdefault("v", 1)
        request.setdefault("op", draw(st.sampled_from(OPS + ["nope"])))
        if request["op"] == "apply":
            request["dry_run"] = True  # never a real apply of what the fuzzer found
        if request["op"] == "reload-trust" and "trust" in request:
            # never a real store (a safe directory without keys is a legitimate change): junk and missing paths
            request["trust"] = draw(st.sampled_from(["relative/dir", "/nonexistent/trust", "", "/\x00", 7, None]))
        return frame(json.dumps(request))
    if kind == "json":
        return frame(json.dumps(draw(st.recursive(st.integers() | st.text(max_size=10),
                                                  lambda i: st.lists(i, max_size=3), max_leaves=20))))
    if kind == "bytes":
        return frame(draw(st.binary(max_size=200)))
    if kind == "truncated":
        body = json.dumps({"v": 1, "op": "status"}).encode()
        return frame(body)[:draw(st.integers(0, len(body) + 3))]
    return struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + draw(st.binary(max_size=20))


@pytest.fixture(scope="module")
def fuzz_agent(tmp_path_factory, signed):
    agent = Agent(tmp_path_factory.mktemp("fuzz"), trust=signed["trust"])
    agent.history_at_start = len(agent.request("history")["result"])
    agent.keys_at_start = agent.request("status")["result"]["agent"]["trusted_keys"]
    yield agent
    agent.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(payload=frames())
def test_fuzzed_frames_change_nothing_and_never_raise(fuzz_agent, payload):
    s = fuzz_agent.connect()
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # a truncated frame ends here, not at the deadline
        while s.recv(1 << 16):
            pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    status = fuzz_agent.request("status")["result"]
    assert status["applied"] == [] and status["forced"] is False
    # only refusals: bundles rejected, rollbacks refused with nothing applied
    assert status["agent"]["trusted_keys"] == fuzz_agent.keys_at_start
    history = fuzz_agent.request("history")["result"][fuzz_agent.history_at_start:]
    # refusals only, and reloads of the trust store that left the same keys
    assert [e for e in history if e["outcome"] not in ("rejected", "refused")
            and not (e["action"] == "trust" and e["keys"] == fuzz_agent.keys_at_start)] == []
    assert "Traceback" not in fuzz_agent.stderr()


def test_protocol_fuzz_benchmark_runs():
    """The benchmark-style run (10^5 cases by default) in its quick form."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "protocol_fuzz.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(out.stdout.strip().splitlines()[-1].split("results: ", 1)[1]) as fh:
        data = json.load(fh)
    assert data["fuzz"]["cases"] == 3000 and data["fuzz"]["tracebacks"] == 0 and data["fuzz"]["agent_still_answers"]
    assert data["memory"]["answers"] == {"ok": 8}  # 8 x 1 MiB: within the budget of two 16 MiB frames
