"""A bundle file's bytes and the size limit on them, without the bundle
format's parser (livepatch/bundle.py, which loads the engine's modules): the
CLI reads a bundle to send it to an agent, which verifies and parses it."""

MAX_BUNDLE_BYTES = 64 << 20


def read_file(path) -> bytes:
    """A bundle file's bytes, reading at most one byte past the size limit
    (read() then refuses it by size, without loading a huge file)."""
    with open(path, "rb") as fh:
        return fh.read(MAX_BUNDLE_BYTES + 1)
