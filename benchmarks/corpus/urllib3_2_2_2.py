"""urllib3 2.2.2: the Proxy-Authorization header was not removed when
following a redirect to another origin (used without a ProxyManager)."""
PACKAGE, FROM, TO = "urllib3", "2.2.1", "2.2.2"
ADVISORY = "CVE-2024-37891 (GHSA-34jh-p97f-mpxf)"
SUMMARY = "Proxy-Authorization kept on a cross-origin redirect"
REQUIRES = ()

from _urllib3 import header_kept_cross_origin


def check():
    return header_kept_cross_origin("Proxy-Authorization", "Basic c2VjcmV0")
