"""urllib3 2.2.2: the Proxy-Authorization header was not removed when
following a redirect to another origin (used without a ProxyManager)."""
PACKAGE, FROM, TO = "urllib3", "2.2.1", "2.2.2"
ADVISORY = "CVE-2024-37891 (GHSA-34jh-p97f-mpxf)"
SUMMARY = "Proxy-Authorization kept on a cross-origin redirect"
REQUIRES = ()

import urllib3
from _measure import LoopbackServer


def check():
    with LoopbackServer({}) as target, LoopbackServer({}) as origin:
        origin.httpd.RequestHandlerClass.routes["/redirect"] = (302, f"http://localhost:{target.port}/landing")
        urllib3.PoolManager().request("GET", f"http://127.0.0.1:{origin.port}/redirect",
                                      headers={"Proxy-Authorization": "Basic c2VjcmV0"}, redirect=True)
        landing = [r for r in target.seen if r["path"] == "/landing"]
    if not landing:
        return False, "no request reached the other origin"
    value = landing[-1]["headers"].get("Proxy-Authorization")
    return value is not None, f"other origin received Proxy-Authorization: {value}"
