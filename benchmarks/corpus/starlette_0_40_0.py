"""Starlette 0.40.0: multipart form fields without a filename were buffered in
memory without any size limit (memory exhaustion); the fix caps a part at 1 MiB."""
PACKAGE, FROM, TO = "starlette", "0.39.2", "0.40.0"
ADVISORY = "CVE-2024-47874 (GHSA-f96h-pmfr-66vw)"
SUMMARY = "unbounded in-memory form fields"
REQUIRES = ("python-multipart==0.0.12",)

import asyncio

from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser


def check():
    body = b"--b\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\n" + b"x" * (2 << 20) + b"\r\n--b--\r\n"

    async def stream():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    headers = Headers({"content-type": "multipart/form-data; boundary=b"})
    try:
        form = asyncio.run(MultiPartParser(headers, stream()).parse())
    except MultiPartException as exc:
        return False, f"refused: {exc}"
    return len(form["field"]) > 1 << 20, f"accepted a {len(form['field'])}-byte field in memory"
