"""The control protocol: length-prefixed JSON over a Unix stream socket.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON (an object). Requests carry {"v": 1, "op": ..., ...}; responses
{"v": 1, "ok": true, "result": ...} or {"v": 1, "ok": false, "error": {...}}.
Bundles travel base64-encoded in the request, by content."""

from __future__ import annotations

import json
import socket
import struct

VERSION = 1
MAX_FRAME = 96 << 20  # a 64 MiB bundle, base64-encoded, plus the request around it
OPS = ("ping", "status", "history", "assess", "apply", "rollback")


class ProtocolError(Exception):
    pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-frame" if chunks or n != 4 else "connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket, limit: int = MAX_FRAME) -> dict:
    (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes is over the limit of {limit}")
    try:
        message = json.loads(_recv_exactly(sock, length))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def send(sock: socket.socket, message: dict) -> None:
    body = json.dumps(message, default=str).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)
