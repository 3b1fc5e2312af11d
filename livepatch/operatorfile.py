"""Reading a file an operator names to the builder (a diff, a hooks
module): a regular file opened without following a final link and without
blocking on a FIFO, read up to a limit. Nothing in it is run."""

from __future__ import annotations

import os
import stat


def read_bounded(path: str, limit: int, option: str) -> bytes:
    """The file's bytes; ValueError naming `option` and what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"{option} {path}: not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{option} {path}: larger than {limit} bytes")
    return data
