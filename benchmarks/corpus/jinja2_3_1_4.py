"""Jinja2 3.1.4: after 3.1.3, xmlattr still accepted keys with '/', '>' or
'=', which also inject attributes or close the tag."""
PACKAGE, FROM, TO = "jinja2", "3.1.3", "3.1.4"
ADVISORY = "CVE-2024-34064 (GHSA-h75v-3vvj-5mfj)"
SUMMARY = "xmlattr: keys containing / > = inject attributes"
REQUIRES = ()

from _jinja2 import xmlattr_injects


def check():
    return xmlattr_injects('x/onclick=alert(1)', 'onclick=alert(1)')
