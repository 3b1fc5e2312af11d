"""Werkzeug 2.2.3: a cookie with an empty name such as '=__Host-test=bad' was
parsed as the cookie '__Host-test', letting a subdomain (or a browser
accepting nameless cookies) forge a __Host- cookie."""
PACKAGE, FROM, TO = "werkzeug", "2.2.2", "2.2.3"
ADVISORY = "CVE-2023-23934 (GHSA-px8h-6qxv-m22q)"
SUMMARY = "nameless cookie parsed as a __Host- cookie"
REQUIRES = ()
# the release also limits multipart parts and changes routing; the fix is cookie parsing
ONLY = ("werkzeug.sansio.http:*", "werkzeug._internal:_cookie_parse_impl")

from werkzeug.http import parse_cookie


def check():
    cookies = parse_cookie("=__Host-test=bad; other=1")
    value = cookies.get("__Host-test")
    return value == "bad", f"parsed cookies: {dict(cookies)}"
