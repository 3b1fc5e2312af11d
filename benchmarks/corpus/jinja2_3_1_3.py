"""Jinja2 3.1.3: the xmlattr filter accepted keys with spaces, letting a
template inject attributes (XSS) when keys come from user input."""
PACKAGE, FROM, TO = "jinja2", "3.1.2", "3.1.3"
ADVISORY = "CVE-2024-22195 (GHSA-h5c8-rqwp-cp95)"
SUMMARY = "xmlattr: keys containing spaces inject attributes"
REQUIRES = ()

from _jinja2 import xmlattr_injects


def check():
    return xmlattr_injects('class onmouseover=alert(1)', 'onmouseover=alert(1)')
