"""Jinja2 3.1.4: after 3.1.3, xmlattr still accepted keys with '/', '>' or
'=', which also inject attributes or close the tag."""
PACKAGE, FROM, TO = "jinja2", "3.1.3", "3.1.4"
ADVISORY = "CVE-2024-34064 (GHSA-h75v-3vvj-5mfj)"
SUMMARY = "xmlattr: keys containing / > = inject attributes"
REQUIRES = ()

import jinja2


def check():
    env = jinja2.Environment(autoescape=True)
    try:
        out = env.from_string("<p{{ d|xmlattr }}>").render(d={"x/onclick=alert(1)": "y"})
    except ValueError as exc:
        return False, f"refused: {exc}"
    return "onclick=alert(1)" in out, out
