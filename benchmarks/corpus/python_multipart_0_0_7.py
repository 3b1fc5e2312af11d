"""python-multipart 0.0.7: the Content-Type options were parsed with a regular
expression that backtracked catastrophically on crafted headers (ReDoS)."""
PACKAGE, FROM, TO = "python-multipart", "0.0.6", "0.0.7"
ADVISORY = "CVE-2024-24762 (GHSA-2jv5-9r88-3w3p)"
SUMMARY = "Content-Type header ReDoS"
REQUIRES = ()

from multipart.multipart import parse_options_header
from _measure import superlinear


def check():
    # an unterminated quoted value of backslashes: exponential backtracking in the old regex
    return superlinear(parse_options_header, lambda n: b'text/plain; a="' + b"\\" * n, 14, factor=2)
