"""Django 4.2.10: humanize's intcomma called itself once per group of three
digits, so a long number string exhausted the stack or the CPU (denial of
service)."""
PACKAGE, FROM, TO = "django", "4.2.9", "4.2.10"
ADVISORY = "CVE-2024-24680 (GHSA-xxj9-f6rv-m3x4)"
SUMMARY = "intcomma recursion on long strings"
REQUIRES = ()

import _django  # noqa: F401
from django.contrib.humanize.templatetags.humanize import intcomma


def check():
    try:
        out = intcomma("1" * 6000, use_l10n=False)
    except RecursionError:
        return True, "RecursionError on a 6000-digit number"
    return False, f"formatted ({len(out)} characters)"
