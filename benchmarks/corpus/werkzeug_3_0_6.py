"""Werkzeug 3.0.6: max_form_memory_size was checked per read, not over a whole
non-file field, so a field sent in many reads could grow without limit
(memory exhaustion)."""
PACKAGE, FROM, TO = "werkzeug", "3.0.5", "3.0.6"
ADVISORY = "CVE-2024-49767 (GHSA-q34m-jh98-gwm2)"
SUMMARY = "max_form_memory_size not enforced across a field's chunks"
REQUIRES = ()

import io

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import MultiPartParser


def check():
    body = (b"--b\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\n" + b"x" * 20000 + b"\r\n--b--\r\n")
    parser = MultiPartParser(max_form_memory_size=4096, buffer_size=1024)
    try:
        form, _ = parser.parse(io.BytesIO(body), b"b", len(body))
    except RequestEntityTooLarge:
        return False, "refused: 413 Request Entity Too Large"
    return len(form["field"]) > 4096, f"accepted a {len(form['field'])}-byte field over a 4096-byte limit"
