"""Flask 2.2.5: with permanent sessions refreshed on every request, a response
that set the session cookie without modifying the session lacked 'Vary:
Cookie', so a caching proxy could serve one user's session cookie to others."""
PACKAGE, FROM, TO = "flask", "2.2.4", "2.2.5"
ADVISORY = "CVE-2023-30861 (GHSA-m2qf-hxjv-5gpq)"
SUMMARY = "missing Vary: Cookie on refreshed sessions"
REQUIRES = ("werkzeug==2.2.3",)

import flask


def check():
    app = flask.Flask("corpus")
    app.secret_key = "corpus"

    @app.route("/login")
    def login():
        flask.session.permanent = True
        flask.session["user"] = "alice"
        return "ok"

    @app.route("/public")
    def public():
        return "ok"  # the session is not touched by the view

    client = app.test_client()
    client.get("/login")
    response = client.get("/public")
    sets_cookie = "Set-Cookie" in response.headers
    vary = response.headers.get("Vary", "")
    return sets_cookie and "Cookie" not in vary, f"Set-Cookie sent: {sets_cookie}, Vary: {vary!r}"
