"""urllib3 1.26.18: a 303 redirect changed the method to GET but kept the request
body (and its content headers), sending e.g. a POSTed form to the redirect
target."""
PACKAGE, FROM, TO = "urllib3", "1.26.17", "1.26.18"
ADVISORY = "CVE-2023-45803 (GHSA-g4mx-q9vg-27p4)"
SUMMARY = "303 redirect keeps the request body"
REQUIRES = ()

import urllib3
from _measure import LoopbackServer


def check():
    with LoopbackServer({"/redirect": (303, "/landing")}) as srv:
        http = urllib3.PoolManager()
        http.request("POST", f"http://127.0.0.1:{srv.port}/redirect", body=b"password=hunter2",
                     headers={"Content-Type": "application/x-www-form-urlencoded"}, redirect=True)
        landing = [r for r in srv.seen if r["path"] == "/landing"]
    if not landing:
        return False, "no request reached the redirect target"
    body = landing[-1]["body"]
    return b"hunter2" in body, f"{landing[-1]['method']} /landing body={body!r}"
