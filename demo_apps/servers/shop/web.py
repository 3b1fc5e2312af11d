"""The shop's HTTP routes, shared by the WSGI and ASGI entry points.

GET /health                 -> {"ok": true, "pid": ...}
GET /login?next=/orders/7   -> 302 to the page the user came from (on this site only)
GET /orders/7               -> {"order": 7, ...}
Every JSON body carries the serving process's PID."""

import json
import os
from urllib.parse import parse_qs

from . import links


def respond(path, query):
    """(status, headers, body bytes) for one GET request."""
    params = {k: v[0] for k, v in parse_qs(query).items()}
    pid = os.getpid()
    if path == "/health":
        return _json(200, {"ok": True, "pid": pid})
    if path == "/login":
        target = links.safe_next(params.get("next"))
        return _json(302, {"redirect": target, "pid": pid}, [("Location", target)])
    if path.startswith("/orders/") and path[len("/orders/"):].isdigit():
        return _json(200, {"order": int(path[len("/orders/"):]), "status": "shipped", "pid": pid})
    return _json(404, {"error": "not found", "pid": pid})


def _json(status, body, headers=()):
    data = json.dumps(body).encode()
    return status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers], data
