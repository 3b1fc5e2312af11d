"""WSGI entry point: gunicorn shop.wsgi:app"""

from http import HTTPStatus

from . import web


def app(environ, start_response):
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        start_response("405 Method Not Allowed", [("Content-Length", "0")])
        return [b""]
    status, headers, body = web.respond(environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", ""))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]
