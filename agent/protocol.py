"""The control protocol: length-prefixed JSON over a Unix stream socket.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON (an object). Requests carry {"v": 1, "op": ..., ...}; responses
{"v": 1, "ok": true, "result": ...} or {"v": 1, "ok": false, "error": {...}}.
Bundles travel base64-encoded in the request, by content.

Decoding is total: whatever the bytes of a frame, `decode` returns a dict
or raises ProtocolError (never RecursionError, UnicodeDecodeError, the
integer-digits ValueError or a MemoryError). Strings holding lone
surrogates are refused too: they cannot be written as UTF-8, so they would
break whatever later logs, stores or prints them.

The agent accepts request frames up to `max_request()` bytes (16 MiB by
default, LIVEPATCH_MAX_FRAME or `start(max_frame=...)` to change it): real
bundles are kilobytes, and every byte of a frame is held in memory while it
is read and decoded. Clients accept answers up to MAX_FRAME."""

from __future__ import annotations

# the sockets are either type: the agent's (socket.socket) and the client's
# (the C type, whose module a short command imports faster). Frames are
# encoded and decoded with json's own C accelerator: the json package
# imports `re` (and with it enum, functools, collections), a third of a
# `livepatch status`; it is imported only to name what is wrong with a
# frame that is not JSON, or where the accelerator is missing.
import _socket
import os

try:
    import _json
except ImportError:  # an interpreter built without it: the json package does all
    _json = None

VERSION = 1
# The largest frame a client reads as an answer, and the largest request
# limit the agent may be given: a 64 MiB bundle, base64-encoded, plus the
# request around it.
MAX_FRAME = 96 << 20
DEFAULT_MAX_REQUEST = 16 << 20
MIN_MAX_REQUEST = 64 << 10
# Requests are flat (a few fields, lists of strings): deeper nesting is
# refused before anything formats or walks it recursively.
MAX_DEPTH = 32
OPS = ("ping", "status", "history", "assess", "apply", "rollback", "reload-trust", "patched-errors")


class ProtocolError(Exception):
    pass


def max_request(value=None) -> int:
    """The request frame limit: `value` (bytes, an int or a string such as
    "16M" / "512K") if given, else LIVEPATCH_MAX_FRAME, else 16 MiB.
    ValueError names what is wrong with a bad value."""
    source = "max_frame"
    if value is None:
        value = os.environ.get("LIVEPATCH_MAX_FRAME") or None
        source = "LIVEPATCH_MAX_FRAME"
        if value is None:
            return DEFAULT_MAX_REQUEST
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        if not digits.isdigit() or len(digits) > 12:
            raise ValueError(f"{source}={value[:40]!r} is not a size in bytes (e.g. 16777216, 16M, 512K)")
        value = int(digits) * scale
    if type(value) is not int:
        raise ValueError(f"{source} must be a size in bytes, not {type(value).__name__}")
    if not MIN_MAX_REQUEST <= value <= MAX_FRAME:
        raise ValueError(f"{source}={value} is outside {MIN_MAX_REQUEST} to {MAX_FRAME} bytes")
    return value


def header(length: int) -> bytes:
    return length.to_bytes(4, "big")


def frame_length(head: bytes) -> int:
    if len(head) != 4:
        raise ValueError(f"a frame header is 4 bytes, not {len(head)}")
    return int.from_bytes(head, "big")


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


class _Decoding:
    """What json.loads(text, parse_constant=_refuse_constant) scans with."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int, parse_constant = float, int, staticmethod(_refuse_constant)


_scan = _json.make_scanner(_Decoding()) if _json else None
_JSON_SPACE = " \t\n\r"


def _loads(text: str):
    """json.loads(text, parse_constant=_refuse_constant): the accelerator's
    scan of a well-formed text; anything else goes to json.loads itself, so
    that the error raised is json's own."""
    if _scan is not None:
        start = len(text) - len(text.lstrip(_JSON_SPACE))
        try:
            value, end = _scan(text, start)
        except Exception:
            pass
        else:
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return value
    import json
    return json.loads(text, parse_constant=_refuse_constant)


def _dumps(message: dict) -> str:
    """json.dumps(message, default=str): ASCII, the default separators,
    circular references refused (each call its own markers, as in json)."""
    if _json is None or type(message) is not dict:
        import json
        return json.dumps(message, default=str)
    encode = _json.make_encoder({}, str, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return "".join(encode(message, 0))


def _escapes_surrogate(text: str) -> bool:
    """Whether `text` holds an escape \\uD800 to \\uDFFF (or one that looks like it)."""
    i = text.find("\\u")
    while i >= 0:
        if text[i + 2:i + 3] in ("d", "D") and text[i + 3:i + 4] and text[i + 3] in "89abcdefABCDEF":
            return True
        i = text.find("\\u", i + 2)
    return False


def decode(body) -> dict:
    """The request object of a frame's body (bytes or bytearray)."""
    try:
        text = body.decode("utf-8")  # strict: no other encoding guessed, no surrogates
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not UTF-8 (invalid byte at offset {exc.start})") from None
    except MemoryError:
        raise ProtocolError("frame is too large to decode") from None
    try:
        message = _loads(text)
    except RecursionError:
        raise ProtocolError("frame is not JSON: nested too deeply") from None
    except MemoryError:
        raise ProtocolError("frame is too large to decode") from None
    except ValueError as exc:  # JSONDecodeError, and integers over the digit limit
        raise ProtocolError(f"frame is not JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    _check(message, _escapes_surrogate(text))
    return message


def _check(message: dict, escapes: bool) -> None:
    """Depth, and (only when the text escaped a surrogate) lone surrogates;
    iterative, so a deep value cannot exhaust the stack here."""
    if escapes:  # rare: re is imported for it alone
        import re
        lone_surrogate = re.compile("[\ud800-\udfff]").search
    todo = [(message, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(f"frame is nested deeper than {MAX_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if escapes and isinstance(key, str) and lone_surrogate(key):
                raise ProtocolError("frame holds a string with a lone surrogate (not valid Unicode)")
            if isinstance(item, (dict, list)):
                todo.append((item, depth + 1))
            elif escapes and isinstance(item, str) and lone_surrogate(item):
                raise ProtocolError("frame holds a string with a lone surrogate (not valid Unicode)")


def encode(message: dict) -> bytes:
    """A whole frame. ASCII JSON: a stray surrogate in an answer is escaped,
    never an encoding error."""
    body = _dumps(message).encode()
    return header(len(body)) + body


def _recv_exactly(sock: _socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-frame" if chunks or n != 4 else "connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(sock: _socket.socket, limit: int = MAX_FRAME) -> dict:
    length = frame_length(_recv_exactly(sock, 4))
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes is over the limit of {limit}")
    return decode(_recv_exactly(sock, length))


def send(sock: _socket.socket, message: dict) -> None:
    sock.sendall(encode(message))
