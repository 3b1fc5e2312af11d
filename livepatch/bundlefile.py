"""A bundle file's bytes and the size limit on them, without the bundle
format's parser (livepatch/bundle.py, which loads the engine's modules): the
CLI reads a bundle to send it to an agent, which verifies and parses it."""

MAX_BUNDLE_BYTES = 64 << 20


def read_file(path) -> bytes:
    """A bundle file's bytes, reading at most one byte past the size limit
    (read() then refuses it by size, without loading a huge file). Only a
    regular file: a FIFO or a device would block or never end (opened
    without blocking, then checked)."""
    import os
    import stat
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", path)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            fd = None
            return fh.read(MAX_BUNDLE_BYTES + 1)
    finally:
        if fd is not None:
            os.close(fd)
