"""ASGI entry point, no framework: uvicorn shop.asgi:app"""

from . import web


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    status, headers, body = web.respond(scope["path"], scope["query_string"].decode("latin-1"))
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})
