"""sqlparse 0.5.0: deeply nested lists made the grouping engine recurse until
RecursionError, crashing the caller (denial of service); the fix limits the
depth and raises SQLParseError."""
PACKAGE, FROM, TO = "sqlparse", "0.4.4", "0.5.0"
ADVISORY = "CVE-2024-4340 (GHSA-2m57-hf25-phgg)"
SUMMARY = "RecursionError on deeply nested input"
REQUIRES = ()

import sqlparse


def check():
    try:
        sqlparse.parse("[" * 10000 + "]" * 10000)
    except RecursionError:
        return True, "RecursionError"
    except Exception as exc:
        return False, f"refused: {type(exc).__name__}: {exc}"[:200]
    return False, "parsed"
