"""sqlparse 0.4.4: a regular expression of the lexer backtracked
catastrophically on long runs of certain characters (ReDoS)."""
PACKAGE, FROM, TO = "sqlparse", "0.4.3", "0.4.4"
ADVISORY = "CVE-2023-30608 (GHSA-rrm6-wvj7-cwh2)"
SUMMARY = "lexer regular expression ReDoS"
REQUIRES = ()

import sqlparse
from _measure import superlinear


def check():
    return superlinear(sqlparse.format, lambda n: "SELECT " + "[" * n + " FROM t", 500)
