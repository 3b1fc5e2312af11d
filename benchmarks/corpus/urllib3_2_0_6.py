"""urllib3 2.0.6: the Cookie header was not removed when following a redirect
to another origin, leaking a session cookie to the redirect target."""
PACKAGE, FROM, TO = "urllib3", "2.0.5", "2.0.6"
ADVISORY = "CVE-2023-43804 (GHSA-v845-jxx5-vc9f)"
SUMMARY = "Cookie header kept on a cross-origin redirect"
REQUIRES = ()

import urllib3
from _measure import LoopbackServer


def check():
    with LoopbackServer({}) as target, LoopbackServer({}) as origin:
        origin.httpd.RequestHandlerClass.routes["/redirect"] = (302, f"http://localhost:{target.port}/landing")
        urllib3.PoolManager().request("GET", f"http://127.0.0.1:{origin.port}/redirect",
                                      headers={"Cookie": "session=secret"}, redirect=True)
        landing = [r for r in target.seen if r["path"] == "/landing"]
    if not landing:
        return False, "no request reached the other origin"
    cookie = landing[-1]["headers"].get("Cookie")
    return cookie is not None, f"other origin received Cookie: {cookie}"
