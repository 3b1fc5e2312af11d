"""A small HTTP/1.1 server on asyncio streams. Run: python -m rooms.server [--port N] [--port-file PATH]

GET /rooms/<room>?user=<name>   -> the room's messages, if the user may read it (403 otherwise)
GET /wait?seconds=S             -> answers after S seconds (holds a suspended coroutine)
GET /health                     -> {"ok": true, "connections": N}

Connections are kept alive, so many clients stay connected at once."""

import argparse
import asyncio
import json
import os
import signal
from urllib.parse import parse_qs, urlparse

from . import access

MESSAGES = {"ops": ["deploy at 10:00"], "payroll": ["salaries: confidential"], "lobby": ["welcome"]}
connections = 0


async def route(path, params):
    if path == "/health":
        return 200, {"ok": True, "connections": connections, "pid": os.getpid()}
    if path == "/wait":
        await asyncio.sleep(float(params.get("seconds", "1")))
        return 200, {"waited": True}
    if path.startswith("/rooms/"):
        room = path[len("/rooms/"):]
        if room not in MESSAGES:
            return 404, {"error": "no such room"}
        if not access.can_read(params.get("user", ""), room):
            return 403, {"error": "forbidden"}
        return 200, {"room": room, "messages": MESSAGES[room]}
    return 404, {"error": "not found"}


async def handle_client(reader, writer):
    global connections
    connections += 1
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                break
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # headers: not needed here
            try:
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                url = urlparse(target)
                status, body = await route(url.path, {k: v[0] for k, v in parse_qs(url.query).items()})
            except ValueError as exc:
                status, body = 400, {"error": str(exc)}
            data = json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        connections -= 1
        writer.close()


async def serve(host, port, port_file):
    server = await asyncio.start_server(handle_client, host, port)
    bound = server.sockets[0].getsockname()[1]
    if port_file:
        with open(port_file + ".tmp", "w") as fh:
            fh.write(str(bound))
        os.replace(port_file + ".tmp", port_file)
    print(f"rooms service listening on http://{host}:{bound} (pid {os.getpid()})", flush=True)
    async with server:
        await server.serve_forever()


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the service cleanly, like Ctrl-C


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port-file")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        asyncio.run(serve(args.host, args.port, args.port_file))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
