"""Werkzeug 3.0.1: the multipart parser kept every byte after the last newline
buffered while looking for a boundary, rescanning it on each read: a file
part of many bytes after a newline costs quadratic time (denial of service)."""
PACKAGE, FROM, TO = "werkzeug", "3.0.0", "3.0.1"
ADVISORY = "CVE-2023-46136 (GHSA-hrfv-mqp8-q5rw)"
SUMMARY = "multipart parsing of a large part is quadratic"
REQUIRES = ()

from werkzeug.sansio.multipart import Data, MultipartDecoder, NeedData


def check():
    # size criterion: how much of a 64 KiB chunk, arriving after a newline and with
    # no boundary in sight, the decoder keeps buffered instead of handing it on
    decoder = MultipartDecoder(b"boundary")
    decoder.receive_data(b"--boundary\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n")
    decoder.next_event()
    decoder.receive_data(b"\n" + b"x" * 65536)
    handed = 0
    while True:
        event = decoder.next_event()
        if isinstance(event, Data):
            handed += len(event.data)
        if isinstance(event, NeedData) or event is None:
            break
    held = len(decoder.buffer)
    return held > 32768, f"handed on {handed} bytes, kept {held} buffered"
