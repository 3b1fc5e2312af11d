"""Django 4.2.11: Truncator.words(html=True) (the truncatewords_html filter)
used a regular expression that is quadratic on unclosed tags (denial of
service)."""
PACKAGE, FROM, TO = "django", "4.2.10", "4.2.11"
ADVISORY = "CVE-2024-27351 (GHSA-vm8q-m57g-pff3)"
SUMMARY = "Truncator.words(html=True) ReDoS"
REQUIRES = ()

import _django  # noqa: F401
from django.utils.text import Truncator
from _measure import superlinear


def check():
    return superlinear(lambda s: Truncator(s).words(10, html=True), lambda n: "<" * n, 2000)
