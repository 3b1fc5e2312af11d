"""Django 4.2.18: IPv6 validation handed arbitrarily long strings to the
ipaddress parser, which is slow on them (denial of service through
GenericIPAddressField and clean_ipv6_address); the fix refuses anything
longer than 39 characters first."""
PACKAGE, FROM, TO = "django", "4.2.17", "4.2.18"
ADVISORY = "CVE-2024-56374 (GHSA-qcgg-j2x8-h9g8)"
SUMMARY = "IPv6 validation of very long strings"
REQUIRES = ()

import ipaddress

import _django  # noqa: F401
from django.utils.ipv6 import is_valid_ipv6_address


def check():
    # step criterion: does a 100,000-character value reach the ipaddress parser at all
    reached = []
    original = ipaddress.IPv6Address.__init__

    def spy(self, address):
        reached.append(len(str(address)))
        return original(self, address)

    ipaddress.IPv6Address.__init__ = spy
    try:
        valid = is_valid_ipv6_address("1:" * 50000)
    finally:
        ipaddress.IPv6Address.__init__ = original
    long_parsed = any(n > 39 for n in reached)
    return long_parsed, f"valid={valid}; lengths handed to ipaddress: {reached[:3]}"
