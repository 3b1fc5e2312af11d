"""Tornado 6.4.2: cookie value unquoting searched the rest of the string for
two patterns at every escape, quadratic in the value's length (denial of
service through a Cookie header)."""
PACKAGE, FROM, TO = "tornado", "6.4.1", "6.4.2"
ADVISORY = "CVE-2024-52804 (GHSA-8w49-h785-mj3c)"
SUMMARY = "quadratic cookie parsing"
REQUIRES = ()

from tornado.httputil import parse_cookie
from _measure import superlinear


def check():
    return superlinear(parse_cookie, lambda n: 'a="' + "\\x" * n + '"', 1000, factor=8)
