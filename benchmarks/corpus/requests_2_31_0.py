"""requests 2.31.0: on a redirect to an https URL through a proxy, requests
re-added the Proxy-Authorization header to the tunnelled request, leaking the
proxy credentials to the destination server."""
PACKAGE, FROM, TO = "requests", "2.30.0", "2.31.0"
ADVISORY = "CVE-2023-32681 (GHSA-j8r2-6x86-q33q)"
SUMMARY = "Proxy-Authorization leaked into TLS-tunnelled redirects"
REQUIRES = ()

import requests


def check():
    session = requests.Session()
    session.trust_env = False
    prepared = requests.Request("GET", "https://example.invalid/next").prepare()
    session.rebuild_proxies(prepared, {"https": "http://user:secret@proxy.invalid:3128"})
    header = prepared.headers.get("Proxy-Authorization")
    return header is not None, f"tunnelled request carries Proxy-Authorization: {header}"
