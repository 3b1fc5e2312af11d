"""Jinja2 3.1.5: the sandbox checked str.format only when called directly; a
reference to a string's format method passed on and called indirectly ran
unsandboxed, reaching attributes such as __class__ (sandbox escape)."""
PACKAGE, FROM, TO = "jinja2", "3.1.4", "3.1.5"
ADVISORY = "CVE-2024-56326 (GHSA-q2x7-8rv6-6q7h)"
SUMMARY = "sandbox: indirect call of str.format escapes the sandbox"
REQUIRES = ()
# the release also reworks async rendering and loaders; the fix is the sandbox
ONLY = ("jinja2.sandbox:*",)

from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment


def check():
    env = SandboxedEnvironment()
    # the format method is handed to a filter (map) that calls it outside the sandbox's call()
    source = '{% set f = "{0.__class__.__mro__}".format %}{{ [1]|map(f)|join }}'
    env.filters["map"] = lambda seq, func: [func(x) for x in seq]
    try:
        out = env.from_string(source).render()
    except SecurityError as exc:
        return False, f"refused: {exc}"
    return "object" in out, out
