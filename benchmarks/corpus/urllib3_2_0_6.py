"""urllib3 2.0.6: the Cookie header was not removed when following a redirect
to another origin, leaking a session cookie to the redirect target."""
PACKAGE, FROM, TO = "urllib3", "2.0.5", "2.0.6"
ADVISORY = "CVE-2023-43804 (GHSA-v845-jxx5-vc9f)"
SUMMARY = "Cookie header kept on a cross-origin redirect"
REQUIRES = ()

from _urllib3 import header_kept_cross_origin


def check():
    return header_kept_cross_origin("Cookie", "session=secret")
