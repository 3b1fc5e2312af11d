"""urllib3 2.0.7: a 303 redirect changed the method to GET but kept the request
body (and its content headers), sending e.g. a POSTed form to the redirect
target."""
PACKAGE, FROM, TO = "urllib3", "2.0.6", "2.0.7"
ADVISORY = "CVE-2023-45803 (GHSA-g4mx-q9vg-27p4)"
SUMMARY = "303 redirect keeps the request body"
REQUIRES = ()

from _urllib3 import body_kept_on_303 as check  # noqa: F401  (the case's check)
