"""Django 4.2.15: floatformat expanded numbers in scientific notation with huge
exponents into their full digits (memory and CPU exhaustion)."""
PACKAGE, FROM, TO = "django", "4.2.14", "4.2.15"
ADVISORY = "CVE-2024-41989 (GHSA-jh75-99hh-qvx9)"
SUMMARY = "floatformat expands huge exponents"
REQUIRES = ()

import _django  # noqa: F401
from django.template.defaultfilters import floatformat


def check():
    # size criterion: the output's length for an 8-character input
    out = floatformat("1e100000", 2)
    return len(out) > 1000, f"floatformat('1e100000', 2) is {len(out)} characters"
