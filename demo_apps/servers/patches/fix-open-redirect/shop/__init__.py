"""A small shop: login redirects, served by WSGI, ASGI, Django and a job pool."""

VERSION = "1.0"
