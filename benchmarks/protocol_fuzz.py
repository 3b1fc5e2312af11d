"""Fuzzing the control protocol against a real agent, and what hostile
frames cost it in memory.

* fuzz: at least 10^5 random cases (default 120 000; --quick 3 000), each
  on a connection of its own, from several client threads at once, while
  slow clients trickle bytes on connections of their own: well-formed
  requests of every op with fields of random types, values and nesting
  (hostile ids, lone surrogates, huge numbers, deep nesting, random and
  byte-flipped signed bundles), JSON that is not an object, bytes that are
  not UTF-8, truncated frames, random lengths, several frames on one
  connection. Asserted at the end (and every 10 000 cases): not one
  traceback on the agent's stderr, nothing applied, the status unchanged,
  every new history entry a rejection or a refusal, and the agent still
  answering.
* memory: 8 clients each sending a maximal frame (the agent's request
  limit, --frame-mib) at once; the agent's resident set before, and its
  peak (VmHWM) after.

`--pythonpath DIR` runs the agent from another source tree (a checkout of
an older version, to measure it the same way)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_result  # noqa: E402

from livepatch.agent.protocol import OPS as _OPS  # noqa: E402
from livepatch.bundle import MAGIC  # noqa: E402

OPS = list(_OPS)

TARGET = "def price(qty):\n    return qty * 3\n"
AGENT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import proto_target
import livepatch.agent as agent
path = agent.start(name="fuzz", trust=sys.argv[2])
print(json.dumps({"socket": path}), flush=True)
sys.stdin.read()
"""
FIELDS = ["v", "op", "bundle", "bundles", "patch_id", "timeout", "force", "all", "dry_run", "allow_downgrade",
          "authorizations", "undo_token", "trust"]
HOSTILE = ["\x1b[31mHP\x1b[0m", "\ud800", "HP-1\n", "../../etc/passwd", "\u202eHP", "x" * 300, "", "HP-PROTO",
           "\x00", "😀", "HP-1 ", "-HP", "/", "/dev/zero", "/proc/self/fd/0", "/tmp", "relative/path"]


class Agent:
    def __init__(self, work: str, trust: str, pythonpath: str | None):
        code = os.path.join(work, "code")
        os.makedirs(code, exist_ok=True)
        with open(os.path.join(code, "proto_target.py"), "w") as fh:
            fh.write(TARGET)
        env = dict(os.environ, LIVEPATCH_STATE_DIR=os.path.join(work, "state"))
        env.pop("LIVEPATCH_AUTOSTART", None)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.err_path = os.path.join(work, "agent.err")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, code, trust], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env,
                                     cwd=work)  # not the checkout: -c puts the working directory first on sys.path
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the agent did not start: {self.stderr()}")
        self.path = json.loads(line)["socket"]

    def connect(self, timeout=30.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def request(self, op: str, **fields) -> dict:
        s = self.connect()
        try:
            body = json.dumps({"v": 1, "op": op, **fields}).encode()
            s.sendall(struct.pack(">I", len(body)) + body)
            return _recv_frame(s)
        finally:
            s.close()

    def stderr(self) -> str:
        self._err.flush()
        with open(self.err_path, errors="replace") as fh:
            return fh.read()

    def memory_kb(self) -> dict:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh)
                    if k in ("VmRSS", "VmHWM")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def _recv_exactly(s: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = s.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_frame(s: socket.socket) -> dict | None:
    head = _recv_exactly(s, 4)
    if head is None:
        return None
    body = _recv_exactly(s, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


# ---------------------------------------------------------------- cases

def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Cases:
    def __init__(self, seed: int, bundle: bytes):
        self.rng = random.Random(seed)
        self.bundle = bundle

    def value(self, depth=0):
        r = self.rng
        kind = r.randrange(12 if depth < 4 else 9)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False])
        if kind == 2:
            return r.choice([0, 1, -1, 2**31, 2**63, -2**70, 10**300, r.randrange(-1000, 1000)])
        if kind == 3:
            return r.choice([0.5, -0.0, 1e308, 5e-324, r.random() * 1000])
        if kind == 4:
            return r.choice(HOSTILE)
        if kind == 5:
            return "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(20)))
        if kind == 6:
            return r.choice(OPS)
        if kind == 7:
            return base64.b64encode(r.randbytes(r.randrange(200))).decode()
        if kind == 8:
            return self.mutated_bundle()
        if kind in (9, 10):
            return [self.value(depth + 1) for _ in range(r.randrange(5))]
        return {self.rng.choice(FIELDS + HOSTILE[:4]): self.value(depth + 1) for _ in range(r.randrange(4))}

    def mutated_bundle(self) -> str:
        data = bytearray(self.bundle)
        r = self.rng
        how = r.randrange(4)
        if how == 0:
            data[r.randrange(len(data))] ^= 1 << r.randrange(8)
        elif how == 1:
            del data[r.randrange(len(data)):]
        elif how == 2:
            at = r.randrange(len(data))
            data[at:at] = r.randbytes(r.randrange(1, 16))
        else:  # the same signature, spelled in upper case
            at = data.find(b'"signature":"') + len(b'"signature":"')
            data[at:at + 128] = data[at:at + 128].upper()
        if bytes(data) == self.bundle:  # a flip undone by chance: never send the valid bundle
            data[len(MAGIC)] ^= 0xFF
        return base64.b64encode(bytes(data)).decode()

    def request(self) -> dict:
        r = self.rng
        request = {f: self.value() for f in r.sample(FIELDS, r.randrange(len(FIELDS)))}
        if r.random() < 0.8:
            request["v"] = 1
        if r.random() < 0.8:
            request["op"] = r.choice(OPS) if r.random() < 0.95 else r.choice(HOSTILE)
        if request.get("op") == "rollback" and r.random() < 0.8:
            request["op"] = "status"  # a refused rollback is recorded: keep the history small
        if request.get("op") == "apply" and r.random() < 0.5:
            request["bundle"] = self.mutated_bundle()
        if request.get("op") == "reload-trust" and isinstance(request.get("trust"), str) \
                and request["trust"].startswith("/"):
            # a real store would be a legitimate change (a safe directory without keys trusts none)
            request["trust"] = "/nonexistent/" + request["trust"]
        if request.get("op") in ("apply", "rollback"):
            request["timeout"] = 0.01 if not isinstance(request.get("timeout"), (int, float)) else request["timeout"]
        return request

    def case(self) -> tuple[str, list[bytes]]:
        """(kind, the chunks to send) for one connection."""
        r = self.rng
        kind = r.choices(["request", "pipelined", "json", "escapes", "bytes", "truncated", "length", "deep"],
                         [40, 8, 10, 10, 10, 10, 8, 4])[0]
        if kind == "request":
            return kind, [frame(json.dumps(self.request()).encode())]
        if kind == "pipelined":
            return kind, [b"".join(frame(json.dumps(self.request()).encode()) for _ in range(r.randrange(2, 5)))]
        if kind == "json":
            return kind, [frame(json.dumps(self.value()).encode())]
        if kind == "escapes":
            body = r.choice([b'{"v":1,"op":"\\ud800"}', b'{"\\udfff":1}', b'{"v":1,"op":"status","x":"\\ud83d"}',
                             b'{"v":' + b"9" * r.randrange(4000, 6000) + b"}", b'{"v":NaN}', b'{"v":1e999999}',
                             b'{"v":1,"op":"status","x":"\\ud83d\\ude00"}', b'{"v":1,"v":2}'])
            return kind, [frame(body)]
        if kind == "bytes":
            return kind, [frame(r.randbytes(r.randrange(100)))]
        if kind == "truncated":
            whole = frame(json.dumps(self.request()).encode())
            return kind, [whole[:r.randrange(len(whole))]]
        if kind == "length":
            return kind, [struct.pack(">I", r.choice([0, 1, 3, r.randrange(2**32), 2**32 - 1, (16 << 20) + 1]))
                          + r.randbytes(r.randrange(8))]
        depth = r.choice([40, 1000, 10_000, 200_000])
        opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
        return kind, [frame(b'{"v":1,"op":"ping","x":' + opener * depth + b"0" + closer * depth + b"}")]


def run_case(agent: Agent, chunks: list[bytes], tally: dict, lock: threading.Lock) -> None:
    s = agent.connect()
    answers = []
    try:
        try:
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)  # what was not sent is never coming: no waiting for deadlines
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while True:
                answer = _recv_frame(s)
                if answer is None:
                    break
                answers.append(answer)
        except ConnectionResetError:
            pass
    finally:
        s.close()
    with lock:
        if not answers:
            tally["no answer"] = tally.get("no answer", 0) + 1
        for a in answers:
            key = "ok" if a.get("ok") else a.get("error", {}).get("error", "?")
            tally[key] = tally.get(key, 0) + 1


def slow_clients(agent: Agent, n: int, stop: threading.Event, tally: dict, lock: threading.Lock) -> list:
    """Clients that send a frame's header and then a byte a second, and
    connect again when the agent hangs up on them."""
    def trickle():
        while not stop.is_set():
            try:
                s = agent.connect()
                s.sendall(struct.pack(">I", 100) + b"{")
                while not stop.wait(1.0):
                    s.sendall(b" ")
                s.close()
            except OSError:
                with lock:
                    tally["slow clients cut off"] = tally.get("slow clients cut off", 0) + 1
    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def check(agent: Agent, before: dict, history_before: int) -> dict:
    """What the agent looks like now; raises AssertionError on any change
    that is not a rejection or a refusal."""
    errors = agent.stderr()
    ping = agent.request("ping")
    status = agent.request("status")["result"]
    history = agent.request("history")["result"]
    new = history[history_before:]
    # refusals, and reloads of the trust store that left the same keys
    odd = [e for e in new if not (e.get("outcome") in ("rejected", "refused")
                                  and e.get("action") in ("apply", "assess", "rollback", "trust")
                                  or e.get("action") == "trust" and e.get("keys") == before["agent"]["trusted_keys"])]
    seen = {"tracebacks": errors.count("Traceback"), "agent_still_answers": bool(ping and ping["ok"]),
            "patches_applied": len(status["applied"]), "forced": status["forced"],
            "history_entries": len(new), "rejected": sum(e.get("outcome") == "rejected" for e in new),
            "refused": sum(e.get("outcome") == "refused" for e in new), "other_entries": len(odd)}
    assert seen["tracebacks"] == 0, errors[-4000:]
    assert seen["agent_still_answers"], ping
    assert status["applied"] == before["applied"] == [] and status["forced"] is before["forced"] is False, status
    assert status["agent"]["trusted_keys"] == before["agent"]["trusted_keys"], status["agent"]
    assert not odd, odd[:5]
    return seen


def fuzz(agent: Agent, bundle: bytes, cases: int, clients: int, slow: int, seed: int) -> dict:
    before = agent.request("status")["result"]
    history_before = len(agent.request("history")["result"])
    tally: dict = {}
    lock = threading.Lock()
    stop = threading.Event()
    slow_threads = slow_clients(agent, slow, stop, tally, lock)
    done = [0]
    checks = []

    def worker(index: int):
        gen = Cases(seed * 1000 + index, bundle)
        kinds: dict = {}
        while True:
            with lock:
                if done[0] >= cases:
                    return
                done[0] += 1
                n = done[0]
            kind, chunks = gen.case()
            kinds[kind] = kinds.get(kind, 0) + 1
            run_case(agent, chunks, tally, lock)
            if n % 10_000 == 0:
                checks.append(check(agent, before, history_before))

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - started
    stop.set()
    for t in slow_threads:
        t.join(5)
    final = check(agent, before, history_before)
    return {"cases": cases, "client_threads": clients, "slow_clients": slow, "seed": seed,
            "seconds": round(elapsed, 1), "cases_per_second": round(cases / elapsed),
            "answers": dict(sorted(tally.items())), "checks_passed": len(checks) + 1, "final": final,
            **{k: final[k] for k in ("tracebacks", "patches_applied", "agent_still_answers")}}


def memory(agent: Agent, clients: int, frame_bytes: int) -> dict:
    before = agent.memory_kb()
    pad = frame_bytes - len(b'{"v":1,"op":"ping","pad":""}')
    body = b'{"v":1,"op":"ping","pad":"' + b"x" * pad + b'"}'
    whole = frame(body)
    answers: list = []

    def send():
        s = agent.connect(timeout=60)
        try:
            try:
                s.sendall(whole)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                a = _recv_frame(s)
            except ConnectionResetError:
                a = None
            answers.append("ok" if a and a.get("ok") else (a or {}).get("error", {}).get("error", "no answer"))
        finally:
            s.close()
    threads = [threading.Thread(target=send) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.2)
    after = agent.memory_kb()
    assert agent.request("ping")["ok"]
    return {"clients": clients, "frame_bytes": frame_bytes, "rss_before_mb": round(before["VmRSS"] / 1024, 1),
            "peak_rss_after_mb": round(after["VmHWM"] / 1024, 1), "rss_after_mb": round(after["VmRSS"] / 1024, 1),
            "answers": {k: answers.count(k) for k in sorted(set(answers))}}


def signed_bundle(work: str) -> tuple[bytes, str]:
    from livepatch.builder import build
    from livepatch.signing import generate, load_private
    key, pub, _ = generate(os.path.join(work, "ops"))
    trust = os.path.join(work, "trust")
    os.mkdir(trust, 0o700)
    shutil.move(pub, os.path.join(trust, "ops.pub"))
    for name, text in (("base", TARGET), ("new", TARGET.replace("* 3", "* 4"))):
        os.mkdir(os.path.join(work, name))
        with open(os.path.join(work, name, "proto_target.py"), "w") as fh:
            fh.write(text)
    data, _ = build(os.path.join(work, "base"), os.path.join(work, "new"), patch_id="HP-PROTO", name="fuzz",
                    version="1", private_key=load_private(key))
    return data, trust


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cases", type=int)
    p.add_argument("--clients", type=int, default=4, help="client threads sending cases at once")
    p.add_argument("--slow", type=int, default=8, help="slow clients trickling bytes meanwhile")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--frame-mib", type=int, default=16, help="the frame size of the memory run (the agent's limit)")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--pythonpath", help="run the agent from this source tree")
    args = p.parse_args()
    cases = args.cases or (3_000 if args.quick else 120_000)
    work = tempfile.mkdtemp(prefix="lp-fuzz-")
    os.chmod(work, 0o700)
    agent = None
    try:
        bundle, trust = signed_bundle(work)
        agent = Agent(work, trust, args.pythonpath)
        data = {"machine": machine()}
        data["memory"] = memory(agent, 8, (1 << 20) if args.quick else args.frame_mib << 20)
        print(f"memory: 8 clients x {data['memory']['frame_bytes']} bytes: RSS {data['memory']['rss_before_mb']} MB "
              f"before, peak {data['memory']['peak_rss_after_mb']} MB after; answers {data['memory']['answers']}")
        if not args.memory_only:
            data["fuzz"] = fuzz(agent, bundle, cases, args.clients, 2 if args.quick else args.slow, args.seed)
            f = data["fuzz"]
            print(f"fuzz: {f['cases']} cases in {f['seconds']} s ({f['cases_per_second']}/s), {f['tracebacks']} "
                  f"tracebacks, {f['patches_applied']} patches applied, {f['final']['history_entries']} history "
                  f"entries ({f['final']['rejected']} rejections, {f['final']['refused']} refusals, "
                  f"{f['final']['other_entries']} other), agent still answering: {f['agent_still_answers']}; "
                  f"answers {f['answers']}")
        print("results:", write_result("protocol_fuzz", data, args.quick))
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
