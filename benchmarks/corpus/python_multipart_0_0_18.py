"""python-multipart 0.0.18: bytes after the closing boundary (and CR/LF before
the first) were consumed one at a time, each logging a message: a body with
megabytes of trailing junk stalls the server (denial of service)."""
PACKAGE, FROM, TO = "python-multipart", "0.0.17", "0.0.18"
ADVISORY = "CVE-2024-53981 (GHSA-59g5-xgcq-4qw3)"
SUMMARY = "per-byte processing of data after the last boundary"
REQUIRES = ()

import logging

from python_multipart.multipart import MultipartParser


class Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = 0

    def emit(self, record):
        self.records += 1


def check():
    # step criterion: log records the parser emits for 1,000 junk bytes after the end
    counter = Count()
    logger = logging.getLogger("python_multipart.multipart")
    old_level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        parser = MultipartParser(b"b", {})
        parser.write(b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--b--\r\n" + b"x" * 1000)
    finally:
        logger.removeHandler(counter)
        logger.setLevel(old_level)
    return counter.records > 100, f"{counter.records} log records for 1000 trailing bytes"
