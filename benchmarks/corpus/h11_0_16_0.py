"""h11 0.16.0: the two bytes ending a chunk of a chunked body were discarded
without checking that they are CRLF, so bodies other servers parse
differently were accepted (request smuggling)."""
PACKAGE, FROM, TO = "h11", "0.14.0", "0.16.0"
ADVISORY = "CVE-2025-43859 (GHSA-vqfr-h8mv-ghfj)"
SUMMARY = "chunk terminator not validated (request smuggling)"
REQUIRES = ()

import h11


def check():
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhelloXX0\r\n\r\n")
    events = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            events.append(type(event).__name__)
            if isinstance(event, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError as exc:
        return False, f"refused: {exc}"
    return "EndOfMessage" in events, f"events: {events}"
