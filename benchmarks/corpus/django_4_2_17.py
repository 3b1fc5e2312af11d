"""Django 4.2.17: strip_tags re-ran its HTML parser until the text stopped
changing, and nested incomplete tags made that quadratic (denial of
service); the fix stops after 50 rounds with SuspiciousOperation."""
PACKAGE, FROM, TO = "django", "4.2.16", "4.2.17"
ADVISORY = "CVE-2024-53907 (GHSA-8498-2h75-472j)"
SUMMARY = "strip_tags quadratic on nested incomplete tags"
REQUIRES = ()

import _django  # noqa: F401
from django.core.exceptions import SuspiciousOperation
from django.utils import html


def check():
    # step criterion: the rounds of the parser on an input that needs one per nesting level
    rounds = 0
    original = html._strip_once

    def counted(value):
        nonlocal rounds
        rounds += 1
        return original(value)

    html._strip_once = counted
    try:
        html.strip_tags("<" * 100 + "a>" * 100)
    except SuspiciousOperation:
        return False, f"refused after {rounds} rounds"
    finally:
        html._strip_once = original
    return rounds > 50, f"{rounds} parser rounds"
