"""Jinja2 3.1.6: the |attr filter fetched str.format itself, bypassing the
sandbox's wrapping of format, so a template could reach __class__ and beyond."""
PACKAGE, FROM, TO = "jinja2", "3.1.5", "3.1.6"
ADVISORY = "CVE-2025-27516 (GHSA-cpwx-vrp4-4pq7)"
SUMMARY = "sandbox: |attr('format') escapes the sandbox"
REQUIRES = ()

from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment


def check():
    env = SandboxedEnvironment()
    try:
        out = env.from_string('{{ "{0.__class__.__mro__}"|attr("format")(1) }}').render()
    except SecurityError as exc:
        return False, f"refused: {exc}"
    return "object" in out, out
