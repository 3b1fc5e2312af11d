"""Jinja2 3.1.3: the xmlattr filter accepted keys with spaces, letting a
template inject attributes (XSS) when keys come from user input."""
PACKAGE, FROM, TO = "jinja2", "3.1.2", "3.1.3"
ADVISORY = "CVE-2024-22195 (GHSA-h5c8-rqwp-cp95)"
SUMMARY = "xmlattr: keys containing spaces inject attributes"
REQUIRES = ()

import jinja2


def check():
    env = jinja2.Environment(autoescape=True)
    try:
        out = env.from_string("<p{{ d|xmlattr }}>").render(d={"class onmouseover=alert(1)": "x"})
    except ValueError as exc:
        return False, f"refused: {exc}"
    return "onmouseover=alert(1)" in out, out
