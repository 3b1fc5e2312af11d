"""Exploit checks shared by the urllib3 cases: one vulnerability fixed in
two release lines, and one header leak in two headers."""

import urllib3
from _measure import LoopbackServer


def body_kept_on_303():
    """A POST redirected with 303 (the method becomes GET) must lose its body."""
    with LoopbackServer({"/redirect": (303, "/landing")}) as srv:
        http = urllib3.PoolManager()
        http.request("POST", f"http://127.0.0.1:{srv.port}/redirect", body=b"password=hunter2",
                     headers={"Content-Type": "application/x-www-form-urlencoded"}, redirect=True)
        landing = [r for r in srv.seen if r["path"] == "/landing"]
    if not landing:
        return False, "no request reached the redirect target"
    body = landing[-1]["body"]
    return b"hunter2" in body, f"{landing[-1]['method']} /landing body={body!r}"


def header_kept_cross_origin(header: str, value: str):
    """A redirect to another origin must drop `header`."""
    with LoopbackServer({}) as target, LoopbackServer({}) as origin:
        origin.httpd.RequestHandlerClass.routes["/redirect"] = (302, f"http://localhost:{target.port}/landing")
        urllib3.PoolManager().request("GET", f"http://127.0.0.1:{origin.port}/redirect",
                                      headers={header: value}, redirect=True)
        landing = [r for r in target.seen if r["path"] == "/landing"]
    if not landing:
        return False, "no request reached the other origin"
    got = landing[-1]["headers"].get(header)
    return got is not None, f"other origin received {header}: {got}"
